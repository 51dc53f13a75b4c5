"""Dequantization against an independent numpy evaluation of the format's formula."""

import numpy as np
import pytest
import torch
from quant_inputs import DTYPES, randn

import qlora

NP_DTYPE = {torch.float32: np.float32, torch.float16: np.float16}


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,blocksize", [((64, 64), 128), ((5, 123), 64), ((1001,), 32), ((7, 4096), 4096)])
def test_dequantize_equals_numpy_formula(shape, blocksize, dtype, quant_type, double_quant):
    q = qlora.quantize(randn(shape, dtype, seed=3), quant_type, blocksize, double_quant)
    raw = q.packed.numpy()[:, 0]
    codes = np.stack([raw >> 4, raw & 0xF], axis=1).reshape(-1)[: q.numel]
    if double_quant:
        n = q.nested
        scaled = (n.table.numpy()[n.codes.numpy()] * np.repeat(n.absmax.numpy(), 256)[: n.codes.numel()]).astype(
            np.float32
        )
        absmax = (scaled + n.offset.numpy()).astype(np.float32)  # multiply, then a separate add
    else:
        absmax = q.absmax.numpy()
    values = (q.table.numpy()[codes] * np.repeat(absmax, blocksize)[: q.numel]).astype(np.float32)
    out = q.dequantize()
    if dtype == torch.bfloat16:  # numpy has no bfloat16: compare the float32 values torch rounds (RNE)
        expected = torch.from_numpy(values).to(torch.bfloat16).reshape(shape)
        assert torch.equal(out, expected)
    else:
        assert np.array_equal(out.numpy(), values.astype(NP_DTYPE[dtype]).reshape(shape))
