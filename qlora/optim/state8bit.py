"""8-bit blockwise optimizer states: the two Adam moments stored as dynamic-map codes (format-spec 3.4).

A parameter of n >= `min_8bit_size` (bitsandbytes: 4096) elements keeps its moments as

    state1  uint8 [n]                 first moment m, codes of the SIGNED dynamic map
    absmax1 float32 [ceil(n / 256)]   max |m| per block of 256
    state2  uint8 [n]                 second moment v, codes of the UNSIGNED dynamic map
    absmax2 float32 [ceil(n / 256)]   max v per block of 256

Each step: dequantize (`map[code] * absmax`), run the float32 update of `qlora.optim.adamw`, requantize
with the NEW block absmax. Smaller parameters keep float32 moments (tiny state; noise matters most
there). The quantizer is `qlora.quant.double_quant.quantize_8bit_dynamic`: the EXACT nearest map entry,
as bitsandbytes-CUDA computes it. bitsandbytes' sign rule (moving a first-moment code toward the
value's sign) is deliberately not applied, so the stored state is exactly "quantize(fp32 moment)",
checkable bit for bit. This plain-PyTorch code is the specification a fused kernel must match; its
speed: docs/design-notes.md, qlora/optim/state8bit.py.
"""

from __future__ import annotations

import torch

from qlora.quant.double_quant import dequantize_8bit_dynamic, quantize_8bit_dynamic

BLOCKSIZE = 256
MIN_8BIT_SIZE = 4096
KEYS_8BIT = ("state1", "absmax1", "state2", "absmax2")
KEYS_32BIT = ("exp_avg", "exp_avg_sq")


def uses_8bit(numel: int, min_8bit_size: int) -> bool:
    """True when a parameter of `numel` elements gets 8-bit moments (bitsandbytes' rule: numel >= 4096)."""
    return numel >= min_8bit_size


def zero_state_8bit(numel: int, device: torch.device | str) -> dict[str, torch.Tensor]:
    """The quantized form of m = v = 0 (codes of 0.0: 127 signed, 0 unsigned; absmax 0)."""
    zeros = torch.zeros(numel, dtype=torch.float32, device=device)
    state1, absmax1 = quantize_8bit_dynamic(zeros, BLOCKSIZE, signed=True)
    state2, absmax2 = quantize_8bit_dynamic(zeros, BLOCKSIZE, signed=False)
    return {"state1": state1, "absmax1": absmax1, "state2": state2, "absmax2": absmax2}


def dequantize_moments(state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit state -> (m, v) as new float32 1-D tensors on the state's device."""
    m = dequantize_8bit_dynamic(state["state1"], state["absmax1"], BLOCKSIZE, signed=True)
    v = dequantize_8bit_dynamic(state["state2"], state["absmax2"], BLOCKSIZE, signed=False)
    return m, v


def requantize_moments_(state: dict[str, torch.Tensor], m: torch.Tensor, v: torch.Tensor) -> None:
    """Write quantize(m), quantize(v) (new block absmax) into the state's tensors in place."""
    for key, x, signed in (("1", m, True), ("2", v, False)):
        codes, absmax = quantize_8bit_dynamic(x.reshape(-1), BLOCKSIZE, signed=signed)
        state["state" + key].copy_(codes)
        state["absmax" + key].copy_(absmax)
