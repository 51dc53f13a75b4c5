"""x W^T + h B^T rounded once: each path against the float64 result rounded once, on each device."""

import pytest
import torch
import torch.nn.functional as F

import qlora
from qlora import ops
from qlora.lora_matmul import (
    adapter_columns_matmul,
    adapter_columns_pay,
    add_product_rounding_once,
    base_plus_adapter,
    columns_width,
    dense_with_columns,
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def operands(n_tokens, n_in, n_out, r, device, term_scale=1e-3, seed=0):
    """bf16 x [N, in], W [out, in] (4-bit and dense), h [N, r], B [out, r] (float32, as adapters are kept)
    with the adapter's term ~`term_scale` against a unit-scale x W^T: B after a few Adam steps."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tokens, n_in, generator=g).bfloat16().to(device)
    w = (torch.randn(n_out, n_in, generator=g) / n_in**0.5).to(device)
    h = torch.randn(n_tokens, r, generator=g).bfloat16().to(device)
    b = (torch.randn(n_out, r, generator=g) * term_scale / r**0.5).to(device)
    return x, qlora.quantize(w, "nf4", 64, True), w.bfloat16(), h, b


def exact(x, w_dense, h, b):
    """(x W^T, h B^T) in float64 from the bf16 values the GEMMs multiply."""
    return x.double() @ w_dense.double().t(), h.double() @ b.bfloat16().double().t()


def slope(y, base, term) -> float:
    """Least-squares slope of (y - round(x W^T)) on the term: 1 = the term kept, 0 = lost to rounding."""
    moved = y.double() - base.bfloat16().double()
    return float((moved * term).sum() / term.square().sum())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("r", [8, 13], ids=["r8", "r13-padded"])
@pytest.mark.parametrize("quantized", [True, False], ids=["nf4", "dense"])
def test_adapter_columns_round_once(quantized, r, device):
    x, q, w_bf16, h, b = operands(100, 192, 72, r, device)
    w_dense = ops.dequantize(q, torch.bfloat16) if quantized else w_bf16
    base, term = exact(x, w_dense, h, b)
    got, weight = adapter_columns_matmul(x, q if quantized else w_bf16, h, b)
    assert got.dtype == torch.bfloat16 and got.shape == (100, 72)
    assert torch.equal(weight, w_dense)  # the weight it multiplied, for a backward to reuse
    assert (got == (base + term).bfloat16()).float().mean() > 0.99  # the rest: accumulation-order ties
    assert 0.9 < slope(got, base, term) < 1.1


@pytest.mark.parametrize("device", DEVICES)
def test_adapter_columns_with_a_weight_whose_rows_are_not_whole_blocks(device):
    """in = 100 is not a multiple of the blocksize: the weight is dequantized, then copied into place."""
    x, q, _, h, b = operands(33, 100, 40, 8, device)
    base, term = exact(x, ops.dequantize(q, torch.bfloat16), h, b)
    assert (adapter_columns_matmul(x, q, h, b)[0] == (base + term).bfloat16()).float().mean() > 0.99


@pytest.mark.parametrize("device", DEVICES)
def test_product_plus_term_is_rounded_once_on_each_device(device):
    """The float32-product path: CUDA's bf16 addmm rounds the product before adding (measured on an H200,
    torch 2.11), so the CUDA path must not rely on it."""
    x, _, w, h, b = operands(512, 1024, 768, 16, device, term_scale=1e-4)
    base, term = exact(x, w, h, b)
    term_bf16 = (h @ b.bfloat16().t())
    assert 0.9 < slope(add_product_rounding_once(term_bf16.clone(), x, w), base, term) < 1.1
    assert slope(F.linear(x, w) + term_bf16, base, term) < 0.3  # negative control: two roundings lose it


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_in,n_out", [(256, 128), (128, 256)])
def test_whichever_path_is_chosen_rounds_once(n_in, n_out, device):
    x, q, _, h, b = operands(64, n_in, n_out, 16, device)
    base, term = exact(x, ops.dequantize(q, torch.bfloat16), h, b)
    got, weight = base_plus_adapter(x, q, h, b)
    assert torch.equal(weight, ops.dequantize(q, torch.bfloat16))
    assert (got == (base + term).bfloat16()).float().mean() > 0.99
    assert 0.9 < slope(got, base, term) < 1.1


def test_adapter_columns_are_chosen_where_they_were_measured_faster():
    """bench/lora_forward.py on an H200: the columns were faster for 7B q/k/v/o (in 4096, out 4096) and
    gate/up (4096 -> 11008) and 8B gate/up (4096 -> 14336); the float32 product for 7B down
    (11008 -> 4096) and 8B down (14336 -> 4096). A dense base pays for copying W too, unless it is
    stored with its columns."""
    quantized = qlora.quantize(torch.randn(64, 64), "nf4", 64, True)  # only its type matters here

    def pay(tokens, n_in, n_out, base=quantized):
        return adapter_columns_pay(torch.empty(tokens, n_in, device="meta"), base, n_out)

    assert pay(2048, 4096, 4096) and pay(2048, 4096, 11008) and pay(8192, 4096, 14336)
    assert not pay(2048, 11008, 4096) and not pay(8192, 14336, 4096)
    dense = torch.empty(4096, 4096, device="meta")
    assert not pay(16, 4096, 4096, dense) and pay(8192, 4096, 11008, dense)
    assert not pay(2048, 4096, 4096, dense)  # copying W as well as x: the float32 product is cheaper
    # a dense base stored with its columns (`dense_with_columns`) copies no W: the quantized rule applies
    assert adapter_columns_pay(torch.empty(2048, 4096, device="meta"), dense, 4096, has_columns=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("r", [8, 13], ids=["r8", "r13-padded"])
def test_adapter_columns_in_a_dense_base_own_storage(r, device):
    """A dense base kept inside its wider matrix: B goes into the spare columns, W and the zero padding stay."""
    x, _, w_bf16, h, b = operands(100, 192, 72, r, device)
    wide = dense_with_columns(w_bf16, r)
    assert wide.shape == (72, columns_width(192, r)) and not wide[:, 192:].any()
    base, term = exact(x, w_bf16, h, b)
    got, weight = adapter_columns_matmul(x, wide[:, :192], h, b, wide=wide)
    assert weight.data_ptr() == wide.data_ptr() and torch.equal(weight, w_bf16)
    assert torch.equal(wide[:, 192 : 192 + r], b.bfloat16()) and not wide[:, 192 + r :].any()
    assert (got == (base + term).bfloat16()).float().mean() > 0.99


def test_lora_layer_keeps_a_dense_base_in_its_columns_storage():
    from qlora.lora import LoRALinear, LoraSpec, QuantSpec

    layer = LoRALinear(96, 40, quant=QuantSpec(None), lora=LoraSpec(r=8), dtype=torch.bfloat16, device="cpu")
    w = torch.randn(40, 96)
    layer.set_base_weight(w)
    assert torch.equal(layer.base, w.bfloat16()) and layer._wide_base() is not None
    layer.to(torch.float32)  # casts and moves keep the base a view of its storage
    assert layer.base.dtype == torch.float32 and layer._wide_base() is not None
    assert torch.equal(layer.base, w.bfloat16().float())
    layer.base = layer.base.clone()  # a caller replacing the base: the stale storage is not used
    assert layer._wide_base() is None
    plain = LoRALinear(96, 40, quant=QuantSpec(None), lora=None, dtype=torch.bfloat16, device="cpu")
    plain.set_base_weight(w)
    assert plain._wide_base() is None and plain.base.is_contiguous()
