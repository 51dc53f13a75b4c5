"""8-bit blockwise optimizer states: the two Adam moments stored as dynamic-map codes (format-spec 3.4).

A parameter of n >= `min_8bit_size` (bitsandbytes: 4096) elements keeps its moments as

    state1  uint8 [n]                 first moment m, codes of the SIGNED dynamic map
    absmax1 float32 [ceil(n / 256)]   max |m| per block of 256
    state2  uint8 [n]                 second moment v, codes of the UNSIGNED dynamic map
    absmax2 float32 [ceil(n / 256)]   max v per block of 256

(2 bytes + 8/256 bytes per element instead of 8). Each step: dequantize (`map[code] * absmax`),
run the float32 AdamW update of `qlora.optim.adamw` on the dequantized moments, then requantize
with the NEW block absmax. Smaller parameters keep float32 moments (`exp_avg`, `exp_avg_sq`): their
state is tiny and quantization noise matters most for them (biases, norms).

The quantizer is `qlora.quant.double_quant.quantize_8bit_dynamic`, the same code that writes the
nested absmax of 4-bit checkpoints: the EXACT nearest map entry (ties to the lower code). That is
what bitsandbytes-CUDA computes with its binary search + midpoint rounding; bitsandbytes-CPU (0.50)
uses an approximate lookup table and picks a farther entry for ~0.2% of values (the tests check we
are the nearer one wherever we differ).

The sign rule. bitsandbytes' 8-bit kernel moves a first-moment code one step toward the value's
sign when the decoded sign disagrees with the value's. With exact-nearest rounding the decoded
value can never have the opposite sign (0.0 at code 127 lies between the two signs), so the rule
only fires for a NEGATIVE value smaller than half the smallest map magnitude (|m| < 2.75e-7 *
absmax) that rounds to +0.0: bitsandbytes stores -5.5e-7 * absmax instead of 0. We do NOT apply
it: it moves the value away from the nearest entry, the effect on the update (|m| ~ 1e-7 of the
block's largest) is below the quantization noise of every other element, and without it the stored
state is exactly "quantize(fp32 moment)", which the tests can check bit for bit. Deliberate
difference from bitsandbytes; states are therefore not bit-identical to bitsandbytes' optimizer
states (they never are across optimizers anyway: its update decays weights after the step).

Speed (plain PyTorch, the reference floor): on an H100 (torch 2.11) the 8-bit AdamW step over 67M
parameters took 9.0 ms as 16 x 4M tensors but 44-51 ms as 64 x 1M, ~0.7 ms per tensor of fixed
overhead; about a third of it is `qlora.quant`'s code tables being copied host->device on every
call (caching them per device cut 50.6 -> 33.1 ms, `tests/optim/bench_optim_8bit_tables.py`). A
device cache in `qlora/quant/codes.py` and a fused Triton kernel are the follow-ups; the maths here
is the specification they must match.
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
