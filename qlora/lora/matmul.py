"""The LoRA layer's forward product, `x W^T + scale h B^T`, rounded to the compute dtype once.

Why once: early in training (B starts at zero) the adapter's term `h B^T` is under half a bf16 step
of `x W^T` in most elements. Rounding `x W^T` first and adding the term after returns `x W^T` there,
which hides what the adapter has learned from the loss (docs/LOG.md, 2026-11-27: the same adapters
scored 11.07 instead of 10.59 at 7B). Here h = drop(x) A^T, [N, r].

Three ways to get one rounding, chosen by device and by the bytes each moves beyond a plain GEMM:

- `add_product_rounding_once` on the CPU: the term first, then the base GEMM accumulates onto it
  (`addmm_` rounds once there, measured).
- The same on CUDA cannot rely on `addmm`: its bf16 path rounds the product before adding C
  (measured on H200, torch 2.11, also with `allow_bf16_reduced_precision_reduction` off). So the
  product is taken in float32 (`torch.mm(out_dtype=)`) and the term added in one pass: an [N, out]
  float32 intermediate, ~8 extra bytes per output element.
- `adapter_columns_matmul` on CUDA: one GEMM over the inner dimension extended by the adapter's r
  columns, `[x | h] @ [W | scale B]^T`. The GEMM accumulates both parts in float32 and rounds once.
  It costs a copy of x into the wider matrix (4 bytes per input element), unless x's producer
  stored it there (`qlora.kernels.spare_columns`: the decoder's norms and SwiGLU do, for the
  q/k/v, gate/up and down projections); W costs nothing more: a 4-bit base is dequantized straight
  into the wider weight, and a LoRA layer's dense base is stored inside one (`dense_with_columns`).
  B (scaled) and h go into the spare columns by one small kernel each (`ops.copy_into_columns_`).
  `adapter_columns_pay` picks between the two CUDA paths (measured rule).

Each function returns the product and the dense weight it multiplied (a view into the wider matrix
for the adapter columns): under `KernelPolicy.reusing_dense_weights()` the LoRA layer saves that
weight for its backward instead of dequantizing it again there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qlora import ops
from qlora.ops import KernelPolicy
from qlora.quant.tensor import QuantizedTensor

_COLUMN_ALIGNMENT = 8  # pad the extended inner dimension to 8 elements: 16-byte rows for bf16 GEMMs


def dense_weight(
    base: torch.Tensor | QuantizedTensor, dtype: torch.dtype, out: torch.Tensor | None = None, *, policy: KernelPolicy
) -> torch.Tensor:
    """The base weight [out, in] in `dtype` (dequantized if 4-bit), written into `out` if given."""
    if isinstance(base, QuantizedTensor):
        return ops.dequantize(base, dtype, out=out, policy=policy)
    return base.to(dtype) if out is None else out.copy_(base)


def add_product_rounding_once(
    term: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, *, policy: KernelPolicy
) -> torch.Tensor:
    """x @ weight^T + term, rounded to term's dtype once; x [N, in], weight [out, in], term [N, out]
    (overwritten on the CPU). On CUDA the product is taken in float32; see the module docstring. A torch
    without `mm(out_dtype=)` rounds twice there (`KernelPolicy.product_in_float32`, decided and logged
    when the policy is made)."""
    if policy.product_rounding(term.device, term.dtype) == "float32_product":
        product = torch.mm(x, weight.t(), out_dtype=torch.float32)  # [N, out], not rounded
        return torch.add(product, term, out=torch.empty_like(term))  # one pass: fp32 sum, one rounding
    return term.addmm_(x, weight.t())


def columns_width(n_in: int, rank: int) -> int:
    """The extended inner dimension: in + r, padded with zero columns to a multiple of 8 (aligned rows)."""
    return -(-(n_in + rank) // _COLUMN_ALIGNMENT) * _COLUMN_ALIGNMENT


def dense_with_columns(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """A dense base weight [out, in] stored inside [out, columns_width] with the spare columns zeroed;
    `wide[:, :in]` is the weight. A LoRA layer keeps its dense base so, and the adapter columns then
    need no copy of W (`adapter_columns_matmul(..., wide=)`)."""
    n_out, n_in = weight.shape
    wide = torch.zeros(n_out, columns_width(n_in, rank), dtype=weight.dtype, device=weight.device)
    wide[:, :n_in].copy_(weight)
    return wide


def adapter_columns_matmul(
    x: torch.Tensor, base: torch.Tensor | QuantizedTensor, h: torch.Tensor, lora_B: torch.Tensor,
    wide: torch.Tensor | None = None, x_rows: torch.Tensor | None = None, scale: float = 1.0, *,
    policy: KernelPolicy,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """([x | h] @ [W | scale B]^T, W) : x W^T + scale h B^T in one GEMM, so rounded once; x [N, in],
    h [N, r], B [out, r] (the scale goes into the copy of B, not over h). `wide`: the dense base's own
    wider storage (`dense_with_columns`, base = wide[:, :in]): B is written into its spare columns
    instead of building the wider weight. `x_rows`: the [N, in + r + pad] matrix whose left columns x
    is (`qlora.kernels.spare_columns`), if a producer stored it so: h goes into its spare columns, and
    x is not copied (a matrix of another width is ignored)."""
    n_tokens, n_in = x.shape
    n_out, r = lora_B.shape
    width = columns_width(n_in, r)
    if wide is not None:
        weight = wide  # its padding columns are zero from the start
    else:
        weight = torch.empty(n_out, width, dtype=x.dtype, device=x.device)  # [out, in + r + pad]
        dense_weight(base, x.dtype, out=weight[:, :n_in], policy=policy)
    ops.copy_into_columns_(weight[:, n_in:], lora_B, scale, policy=policy)  # scale B, then zero padding columns
    if x_rows is not None and x_rows.shape == (n_tokens, width):
        inputs = x_rows
        ops.copy_into_columns_(inputs[:, n_in:], h, policy=policy)  # [N, r + pad]: small; x's own columns are untouched
    else:
        # one concatenation, not copies into column slices: torch copies into a strided destination
        # element by element, at about half the speed (docs/LOG.md, 2026-11-27)
        padded_h = h if width == n_in + r else F.pad(h, (0, width - n_in - r))
        inputs = torch.cat((x, padded_h), dim=1)  # [N, in + r + pad]
    return inputs @ weight.t(), weight[:, :n_in]  # [N, out], and W [out, in] as a view


def adapter_columns_pay(
    x: torch.Tensor, base: torch.Tensor | QuantizedTensor, n_out: int, has_columns: bool = False,
    x_has_columns: bool = False,
) -> bool:  # fmt: skip
    """Whether `adapter_columns_matmul` is faster than the float32-product path on CUDA.

    Beyond a plain GEMM, the extended columns copy x (read + write: 4 bytes per [N, in] element) and
    a dense W (4 per [out, in], unless it is stored with its columns: `has_columns`; x costs nothing
    when a producer stored it inside the wider matrix: `x_has_columns`); the float32
    product writes and reads [N, out] in float32 (8 bytes per element more than a bf16 product).
    Measured on an H200 (`bench/lora_forward.py`, 2026-11-27), both run at about the same fraction of
    bandwidth and this rule picked the faster path for all five 4-bit shapes (7B q/k/v/o, gate/up,
    down; 8B gate/up, down); the copy does not save the term tensor of the other path, as a pure byte
    count would suggest.
    """
    n_tokens, n_in = x.shape
    columns = 0 if x_has_columns else 4 * n_tokens * n_in
    if not isinstance(base, QuantizedTensor) and not has_columns:
        columns += 4 * n_out * n_in
    return columns < 8 * n_tokens * n_out


def base_plus_adapter(
    x: torch.Tensor, base: torch.Tensor | QuantizedTensor, h: torch.Tensor, lora_B: torch.Tensor,
    wide: torch.Tensor | None = None, x_rows: torch.Tensor | None = None, scale: float = 1.0, *,
    policy: KernelPolicy,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(x W^T + scale h B^T rounded once to x's dtype, W in x's dtype), the cheapest way for this device
    and shape; x [N, in], base W [out, in], h [N, r], lora_B [out, r] (any float dtype);
    `wide`: a dense base's storage with its adapter columns (`dense_with_columns`), if it has one;
    `x_rows`: the wider matrix x was stored in by its producer (`qlora.kernels.spare_columns`), if any."""
    n_out = lora_B.shape[0]
    wide = wide if wide is not None and wide.dtype == x.dtype else None
    fast = policy.product_rounding(x.device, x.dtype) != "addmm"
    x_has_columns = x_rows is not None and x_rows.shape == (x.shape[0], columns_width(x.shape[1], lora_B.shape[1]))
    if fast and adapter_columns_pay(x, base, n_out, has_columns=wide is not None, x_has_columns=x_has_columns):
        return adapter_columns_matmul(x, base, h, lora_B, wide, x_rows, scale, policy=policy)
    term = (h * scale if scale != 1.0 else h) @ lora_B.to(x.dtype).t()  # [N, r] @ [r, out]
    weight = dense_weight(base, x.dtype, policy=policy)
    return add_product_rounding_once(term, x, weight, policy=policy), weight
