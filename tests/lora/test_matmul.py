"""x W^T + h B^T rounded once: each path against the float64 result rounded once, on each device."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

import qlora
from qlora import ops
from qlora.kernels.spare_columns import left_columns, rows_of
from qlora.lora.dropout import HashedDropout
from qlora.lora.matmul import (
    adapter_columns_matmul,
    adapter_columns_pay,
    add_product_rounding_once,
    base_plus_adapter,
    columns_width,
    dense_with_columns,
)
from qlora.ops import KernelPolicy

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
POLICY = KernelPolicy()  # what a model runs by default: the kernels on CUDA, the twins on the CPU


def dequantize(q):
    return ops.dequantize(q, torch.bfloat16, policy=POLICY)


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
    w_dense = dequantize(q) if quantized else w_bf16
    base, term = exact(x, w_dense, h, b)
    got, weight = adapter_columns_matmul(x, q if quantized else w_bf16, h, b, policy=POLICY)
    assert got.dtype == torch.bfloat16 and got.shape == (100, 72)
    assert torch.equal(weight, w_dense)  # the weight it multiplied, for a backward to reuse
    assert (got == (base + term).bfloat16()).float().mean() > 0.99  # the rest: accumulation-order ties
    assert 0.9 < slope(got, base, term) < 1.1


@pytest.mark.parametrize("device", DEVICES)
def test_adapter_columns_with_a_weight_whose_rows_are_not_whole_blocks(device):
    """in = 100 is not a multiple of the blocksize: the weight is dequantized, then copied into place."""
    x, q, _, h, b = operands(33, 100, 40, 8, device)
    base, term = exact(x, dequantize(q), h, b)
    assert (adapter_columns_matmul(x, q, h, b, policy=POLICY)[0] == (base + term).bfloat16()).float().mean() > 0.99


@pytest.mark.parametrize("device", DEVICES)
def test_product_plus_term_is_rounded_once_on_each_device(device):
    """The float32-product path: CUDA's bf16 addmm rounds the product before adding (measured on an H200,
    torch 2.11), so the CUDA path must not rely on it."""
    x, _, w, h, b = operands(512, 1024, 768, 16, device, term_scale=1e-4)
    base, term = exact(x, w, h, b)
    term_bf16 = h @ b.bfloat16().t()
    assert 0.9 < slope(add_product_rounding_once(term_bf16.clone(), x, w, policy=POLICY), base, term) < 1.1
    assert slope(F.linear(x, w) + term_bf16, base, term) < 0.3  # negative control: two roundings lose it


@pytest.mark.gpu
def test_a_policy_without_float32_products_rounds_twice_on_cuda():
    """What a torch without `mm(out_dtype=)` gets (`KernelPolicy.product_in_float32` False, logged when the
    policy is made): CUDA's bf16 addmm, which loses a small term to rounding."""
    x, _, w, h, b = operands(512, 1024, 768, 16, "cuda", term_scale=1e-4)
    base, term = exact(x, w, h, b)
    twice = KernelPolicy(product_in_float32=False)
    assert twice.product_rounding("cuda", torch.bfloat16) == "twice"
    assert slope(add_product_rounding_once(h @ b.bfloat16().t(), x, w, policy=twice), base, term) < 0.3


class Float32ProductEverywhere(KernelPolicy):
    """Takes the float32-product path on any device (the CPU has no `mm(out_dtype=)`: the test replaces it)."""

    def product_rounding(self, device, dtype):
        return "float32_product"


def test_a_failure_inside_the_float32_product_is_raised_not_swallowed(monkeypatch):
    """No fallback at run time: an out-of-memory (or any error) in the product reaches the caller, and the
    policy is unchanged afterwards (the next call takes the same path)."""
    real_mm, calls = torch.mm, []

    def failing_mm(*args, **kwargs):
        if "out_dtype" in kwargs:
            calls.append(kwargs["out_dtype"])
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return real_mm(*args, **kwargs)

    monkeypatch.setattr(torch, "mm", failing_mm)
    policy = Float32ProductEverywhere()
    x, _, w, h, b = operands(8, 64, 16, 4, "cpu")
    term = h @ b.bfloat16().t()
    for _ in range(2):
        with pytest.raises(torch.OutOfMemoryError, match="injected"):
            add_product_rounding_once(term.clone(), x, w, policy=policy)
    assert calls == [torch.float32, torch.float32] and policy.product_in_float32

    def broken_mm(*args, **kwargs):
        raise RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED (injected by the test)")

    monkeypatch.setattr(torch, "mm", broken_mm)
    with pytest.raises(RuntimeError, match="CUBLAS_STATUS_EXECUTION_FAILED"):
        add_product_rounding_once(term.clone(), x, w, policy=policy)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_in,n_out", [(256, 128), (128, 256)])
def test_whichever_path_is_chosen_rounds_once(n_in, n_out, device):
    x, q, _, h, b = operands(64, n_in, n_out, 16, device)
    base, term = exact(x, dequantize(q), h, b)
    got, weight = base_plus_adapter(x, q, h, b, policy=POLICY)
    assert torch.equal(weight, dequantize(q))
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
    got, weight = adapter_columns_matmul(x, wide[:, :192], h, b, wide=wide, policy=POLICY)
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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("r", [8, 13], ids=["r8", "r13-padded"])
def test_adapter_columns_in_the_producer_matrix_equal_the_concatenation(r, device):
    """x stored by its producer as the left columns of [N, in + r + pad] (`left_columns`): h goes into the
    spare columns, and the product is the concatenation's, bit for bit; x's own elements are unchanged."""
    x, q, _, h, b = operands(50, 128, 40, r, device)
    width = columns_width(128, r)
    wide = torch.full((50, width), float("nan"), dtype=x.dtype, device=device)  # stale data
    stored = left_columns(wide, 128)
    stored.copy_(x)
    rows = rows_of(stored, width)
    assert rows is not None and rows.data_ptr() == wide.data_ptr() and rows.shape == wide.shape
    want, _ = adapter_columns_matmul(x, q, h, b, policy=POLICY)
    got, _ = adapter_columns_matmul(stored, q, h, b, x_rows=rows, policy=POLICY)
    assert torch.equal(got, want)
    assert torch.equal(wide[:, 128 : 128 + r], h)  # h was written beside x, not concatenated
    assert torch.equal(stored, x)


def test_rows_of_finds_only_rows_laid_out_that_wide():
    """The rows are found from the width the block that stored x vouches for (no mark on the tensor): a
    contiguous tensor, a transposed one, another width or rows that would run past the storage give None."""
    wide = torch.zeros(2, 3, 10)
    x = left_columns(wide, 7)
    assert x._base is None  # not an autograd view of the wider matrix (see spare_columns)
    rows = rows_of(x, 10)
    assert rows.shape == (6, 10) and rows.data_ptr() == wide.data_ptr()
    assert rows_of(x, 12) is None and rows_of(x, 7) is None  # another width; no spare columns
    assert rows_of(torch.zeros(6, 7), 10) is None  # contiguous: its rows are 7 apart
    assert rows_of(torch.zeros(10, 6).t(), 10) is None  # transposed: not unit-stride columns
    assert rows_of(torch.zeros(6, 10)[:, 3:], 10) is None  # the last row would run past the storage
    with pytest.raises(ValueError, match="contiguous"):
        left_columns(torch.zeros(10, 6).t(), 4)


@pytest.mark.gpu
def test_swiglu_stored_for_a_lora_down_projection_changes_nothing():
    """The MLP's SwiGLU output stored in down_proj's wider rows (`input_row_width`, handed to the layer as
    `row_width`): the same output and gradients, bit for bit, as with a concatenated copy; and h lands in
    the producer's spare columns."""
    layer, gate, up = _down_projection(dropout=0.0)
    width = layer.input_row_width(gate.device, gate.dtype)
    assert width == columns_width(96, 8) and layer.input_row_width("cpu", gate.dtype) is None
    results = []
    for row_width in (None, width):
        act, y, grads = _run_down_projection(layer, gate, up, row_width)
        results.append((y, *grads))
        if row_width is None:
            assert rows_of(act, width) is None  # negative control: a contiguous activation has no spare columns
        else:
            rows = rows_of(act, row_width)
            assert rows is not None and torch.count_nonzero(rows[:, 96:104]) > 0
    for want, got in zip(*results, strict=True):
        assert torch.equal(got, want)


@pytest.mark.gpu
def test_dropout_over_the_producer_rows_draws_the_same_hashed_mask_on_every_path():
    """The hashed mask (`qlora.lora.dropout`) in every mode: an eager step (the kernels for the products,
    the twin for the columns copy), a graph step's paths, the kernels forced, and the twins. Each follows
    autograd through the formula with the mask drawn from the same seed, and saves no mask; the kernel
    paths store the activation in the producer's rows and agree bit for bit."""
    layer, gate, up = _down_projection(dropout=0.3)
    width = layer.input_row_width(gate.device, gate.dtype)
    torch.manual_seed(1)  # the seed _run_down_projection sets before the layer draws its mask
    multipliers = HashedDropout.draw(0.3, "cuda").multipliers(21, 96, torch.float32)
    auto = KernelPolicy()
    paths = {"eager": (auto, contextlib.nullcontext), "graph step": (auto, auto.graph_step),
             "forced": (KernelPolicy(kernels="triton"), contextlib.nullcontext),
             "twins": (KernelPolicy(kernels="torch"), contextlib.nullcontext)}  # fmt: skip
    runs = {}
    for name, (policy, context) in paths.items():
        layer.policy = policy
        with context():
            masks, act, y, grads = _run_down_projection_saving_masks(layer, gate, up)
        assert masks == [], name
        assert (rows_of(act, width) is None) == (name == "twins"), name  # the twin ignores the row width
        _assert_down_projection_follows_the_formula(layer, gate, up, y, grads, multipliers)
        runs[name] = (y, *grads)
    for name in ("graph step", "forced"):
        for want, got in zip(runs["eager"], runs[name], strict=True):
            assert torch.equal(got, want), name
    torch.manual_seed(2)  # negative control: the formula with another seed's mask is told apart
    other = HashedDropout.draw(0.3, "cuda").multipliers(21, 96, torch.float32)
    with pytest.raises(AssertionError):
        _assert_down_projection_follows_the_formula(layer, gate, up, runs["eager"][0], runs["eager"][1:], other)


def _run_down_projection_saving_masks(layer, gate, up):
    """`_run_down_projection` into the layer's wider rows, and the bool tensors it saved for backward."""
    masks = []

    def pack(t):
        if t.dtype == torch.bool:
            masks.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        act, y, grads = _run_down_projection(layer, gate, up, layer.input_row_width(gate.device, gate.dtype))
    return masks, act, y, grads


def _assert_down_projection_follows_the_formula(layer, gate, up, y, grads, multipliers):
    """y and the gradients of (gate, up, A, B) against autograd through the formula in float32 with the
    dropout's `multipliers` [21, 96] (keep / (1 - p))."""
    g, u = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
    A = layer.lora_A.weight.detach().clone().requires_grad_(True)
    B = layer.lora_B.weight.detach().clone().requires_grad_(True)
    x = (F.silu(g.float()).bfloat16().float() * u.float()).reshape(-1, 96)
    w = layer.dense_base_weight(torch.float32)
    want = x @ w.t() + layer.scale * ((x * multipliers) @ A.t()) @ B.t()
    want.backward(torch.ones_like(want))
    # bf16 roundings (SwiGLU's output, the dropped x or h, g B) against float32: 3% of each tensor's scale
    torch.testing.assert_close(y.float().reshape(-1, 64), want, rtol=3e-2, atol=3e-2 * float(want.abs().max()))
    for got, ref in zip(grads, (g.grad, u.grad, A.grad, B.grad), strict=True):
        torch.testing.assert_close(got.float(), ref.float(), rtol=3e-2, atol=3e-2 * float(ref.abs().max()))


def _down_projection(dropout):
    from qlora.lora import LoRALinear, LoraSpec, QuantSpec

    torch.manual_seed(0)
    layer = LoRALinear(96, 64, quant=QuantSpec("nf4", 64, True), lora=LoraSpec(r=8, dropout=dropout),
                       device="cuda").train()  # fmt: skip
    layer.set_base_weight(torch.randn(64, 96, device="cuda") / 10)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.1)
    gate = torch.randn(3, 7, 96, device="cuda", dtype=torch.bfloat16)
    up = torch.randn(3, 7, 96, device="cuda", dtype=torch.bfloat16)
    return layer, gate, up


def _run_down_projection(layer, gate, up, row_width):
    g, u = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
    layer.zero_grad()
    torch.manual_seed(1)
    act = ops.swiglu(g, u, row_width, policy=layer.policy)
    y = layer(act, row_width)
    y.backward(torch.ones_like(y))
    return act, y, (g.grad, u.grad, layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone())
