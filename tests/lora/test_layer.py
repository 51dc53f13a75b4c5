"""LoRALinear and its autograd function, checked against autograd through the reference formula."""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qlora
from qlora.kernels import triton_importable
from qlora.lora import (
    HashedDropout,
    LoRALinear,
    LoRALinearFunction,
    LoraSpec,
    QuantSpec,
    mark_only_lora_trainable,
    replace_linears,
)
from qlora.ops import KernelPolicy


def make_layer(quant_type="nf4", r=4, alpha=8.0, dropout=0.0, bias=True, in_f=96, out_f=80, dtype=torch.float32,
               seed=0, init_b_nonzero=True, rslora=False):  # fmt: skip
    torch.manual_seed(seed)
    layer = LoRALinear(in_f, out_f, bias=bias, quant=QuantSpec(quant_type), dtype=dtype, device="cpu",
                       lora=LoraSpec(r=r, alpha=alpha, dropout=dropout, use_rslora=rslora) if r else None)  # fmt: skip
    layer.set_base_weight(torch.randn(out_f, in_f) * 0.05)
    if bias:
        with torch.no_grad():
            layer.bias.copy_(torch.randn(out_f) * 0.1)
    if r and init_b_nonzero:  # PEFT's init_lora_weights=False: with B = 0 the adapter tests would check nothing
        with torch.no_grad():
            layer.lora_B.weight.normal_(0, 0.1)
    return layer


def reference_forward(layer: LoRALinear, x, x_dropped, A, B):
    """The formula with plain autograd: what the custom backward must reproduce."""
    w = layer.dense_base_weight(x.dtype)
    y = F.linear(x, w, layer.bias.to(x.dtype) if layer.bias is not None else None)
    return y + layer.scale * F.linear(F.linear(x_dropped, A.to(x.dtype)), B.to(x.dtype))


def test_gradcheck_float64_dense_base():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    A = torch.randn(2, 7, dtype=torch.float64, requires_grad=True)
    B = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    W = torch.randn(6, 7, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *a: LoRALinearFunction.apply(*a, b, W, 0.75), (x, A, B))


def test_gradcheck_float64_through_dropout():
    """The adapter's input gradient through the dropout's mask: the same draws on every call (reseeded)."""
    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    A = torch.randn(2, 7, dtype=torch.float64, requires_grad=True)
    B = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    W, b = torch.randn(6, 7, dtype=torch.float64), torch.randn(6, dtype=torch.float64)

    def seeded(*args):
        torch.manual_seed(5)
        return LoRALinearFunction.apply(*args, b, W, 0.75, None, 0.4)

    assert torch.autograd.gradcheck(seeded, (x, A, B))


# Tolerances: float32 runs the same matmuls in another order (scale applied before vs after a
# product): a few ulps of accumulated rounding -> torch's float32 defaults. bfloat16 carries 8
# significant bits and the two paths round intermediates at different points -> 2 bf16 ulps of
# the gradient's magnitude.
TOLERANCES = {torch.float32: {}, torch.bfloat16: {"rtol": 2**-7, "atol": 2**-7}}


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4", None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradients_match_autograd_through_reference(quant_type, dtype):
    layer = make_layer(quant_type, dtype=dtype)
    x = torch.randn(2, 9, 96, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(2, 9, 80, dtype=dtype)
    layer(x).backward(grad_out)
    ours = (x.grad.clone(), layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone())
    x_ref = x.detach().clone().requires_grad_(True)
    A = layer.lora_A.weight.detach().clone().requires_grad_(True)
    B = layer.lora_B.weight.detach().clone().requires_grad_(True)
    reference_forward(layer, x_ref, x_ref, A, B).backward(grad_out)
    tol = TOLERANCES[dtype]
    # The gradients of A and B are computed in the compute dtype then returned in float32.
    for got, want in zip(ours, (x_ref.grad, A.grad, B.grad), strict=True):
        torch.testing.assert_close(got.to(dtype), want.to(dtype), **tol)
    assert layer.lora_A.weight.grad.dtype == torch.float32
    torch.testing.assert_close(layer(x), reference_forward(layer, x, x, layer.lora_A.weight, layer.lora_B.weight),
                               **tol)  # fmt: skip


def test_dropout_gradients_match_autograd_with_the_same_mask():
    """The dropout is the hashed mask (`qlora.lora.dropout`) on every device: the layer draws its seed from
    torch's generator, so the same seed gives the reference the very mask the layer applied."""
    layer = make_layer("nf4", dropout=0.3).train()
    assert layer.dropout == 0.3  # the probability; the mask is drawn per call
    x = torch.randn(4, 96, requires_grad=True)
    torch.manual_seed(123)
    layer(x).sum().backward()
    grads = (x.grad.clone(), layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone())
    x2 = x.detach().clone().requires_grad_(True)
    A = layer.lora_A.weight.detach().clone().requires_grad_(True)
    B = layer.lora_B.weight.detach().clone().requires_grad_(True)
    torch.manual_seed(123)
    mask = HashedDropout.draw(0.3, "cpu")
    reference_forward(layer, x2, x2 * mask.multipliers(4, 96, torch.float32), A, B).sum().backward()
    for got, want in zip(grads, (x2.grad, A.grad, B.grad), strict=True):
        torch.testing.assert_close(got, want)
    # Negative control: with a different mask the gradients differ, so the check above can fail.
    layer.zero_grad()
    torch.manual_seed(7)
    layer(x.detach().requires_grad_(True)).sum().backward()
    assert not torch.allclose(layer.lora_A.weight.grad, A.grad)


def test_no_dropout_in_eval_mode():
    layer = make_layer("nf4", dropout=0.3)
    x = torch.randn(4, 96)
    want = reference_forward(layer, x, x, layer.lora_A.weight, layer.lora_B.weight)
    torch.testing.assert_close(layer.eval()(x), want)
    assert not torch.allclose(layer.train()(x), want)  # negative control: training mode drops


@pytest.mark.skipif(not triton_importable() or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs triton and TRITON_INTERPRET=1 to force the kernels onto CPU tensors")  # fmt: skip
def test_the_twins_and_the_kernels_draw_the_same_mask():
    """One dropout everywhere: a layer on the twins (an eager CPU step) and one forced onto the kernels (what
    a graph step runs) apply the same mask after the same seed, so they agree to float32 rounding."""
    layer = make_layer("nf4", dropout=0.3).train()
    x = torch.randn(5, 96, requires_grad=True)
    runs = []
    for kernels, seed in (("torch", 9), ("triton", 9), ("torch", 10)):
        layer.policy = KernelPolicy(kernels=kernels)
        layer.zero_grad()
        x.grad = None
        torch.manual_seed(seed)
        y = layer(x)
        y.square().sum().backward()
        runs.append((y.detach(), x.grad.clone(), layer.lora_A.weight.grad.clone()))
    for twin, kernel in zip(runs[0], runs[1], strict=True):
        torch.testing.assert_close(kernel, twin, rtol=1e-5, atol=1e-5)  # float32 sums in another order
    assert not torch.allclose(runs[2][2], runs[0][2], rtol=1e-3, atol=1e-3)  # negative control: another seed


def _saved_tensor_shapes(fn) -> list[tuple[tuple[int, ...], torch.dtype]]:
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


@pytest.mark.parametrize("r", [0, 4])
def test_no_dense_weight_is_saved_for_backward(r):
    layer = make_layer("nf4", r=r, dtype=torch.bfloat16)
    x = torch.randn(5, 96, dtype=torch.bfloat16, requires_grad=True)
    dense_numel = 80 * 96  # in any view or layout

    def dense_copies(saved):
        return [s for s, dtype in saved if dtype.is_floating_point and math.prod(s) == dense_numel]

    assert dense_copies(_saved_tensor_shapes(lambda: layer(x))) == []
    # Negative control: the naive formula saves the dequantized weight, and the hook sees it.
    assert dense_copies(_saved_tensor_shapes(lambda: F.linear(x, layer.dense_base_weight()))) != []


def test_fresh_adapter_is_identity_and_nonzero_b_changes_output():
    layer = make_layer("nf4", init_b_nonzero=False)
    x = torch.randn(3, 96)
    base_only = F.linear(x, layer.dense_base_weight(torch.float32), layer.bias)
    assert torch.equal(layer(x), base_only)  # B = 0: exactly the base
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    assert not torch.allclose(layer(x), base_only)
    bound = 1 / math.sqrt(96)  # kaiming_uniform(a=sqrt(5)) bound, as PEFT initialises A
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.abs().max() > 0.9 * bound


def test_frozen_base_gets_no_gradient_and_scale_options():
    layer = make_layer("nf4")
    x = torch.randn(3, 96, requires_grad=True)
    layer(x).sum().backward()
    assert layer.bias.grad is None and not layer.bias.requires_grad
    assert layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad is not None
    assert make_layer(r=16, alpha=16).scale == 1.0
    assert make_layer(r=16, alpha=16, rslora=True).scale == 4.0


def test_quantized_base_is_what_the_layer_uses():
    layer = make_layer("nf4", r=0, bias=False)
    x = torch.randn(2, 96)
    expected = x @ layer.base.dequantize(torch.float32).t()
    assert torch.equal(layer(x), expected)
    q = qlora.quantize(torch.randn(80, 96), "fp4")
    layer.set_base_quantized(q)
    assert torch.equal(layer(x), x @ q.dequantize().t())
    with pytest.raises(ValueError, match=r"shape \(96, 80\) given to a linear layer of shape \(80, 96\)"):
        layer.set_base_weight(torch.randn(96, 80))


class TinyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.v_proj = nn.Linear(8, 8, bias=True), nn.Linear(8, 4, bias=False)
        self.mlp = nn.ModuleDict({"down_proj": nn.Linear(16, 8, bias=False)})
        self.lm_head = nn.Linear(8, 32, bias=False)


def test_replace_linears_targets_and_errors():
    model = TinyBlock()
    swapped = replace_linears(model, QuantSpec("nf4"), LoraSpec(r=2, targets=("q_proj", "v_proj")), device="cpu",
                              dtype=torch.float32)  # fmt: skip
    assert sorted(swapped) == ["mlp.down_proj", "q_proj", "v_proj"]
    assert isinstance(model.lm_head, nn.Linear)  # stays 16-bit
    assert model.q_proj.r == 2 and model.mlp.down_proj.r == 0 and model.q_proj.bias is not None
    for layer in (model.q_proj, model.v_proj, model.mlp.down_proj):
        layer.set_base_weight(torch.randn(layer.out_features, layer.in_features))
    assert len({id(layer.policy) for layer in (model.q_proj, model.v_proj, model.mlp.down_proj)}) == 1  # one policy
    given = KernelPolicy(kernels="torch")
    again = TinyBlock()
    replace_linears(again, QuantSpec("nf4"), LoraSpec(r=2, targets=("q_proj",)), device="cpu", policy=given)
    assert again.q_proj.policy is given and again.v_proj.policy is given and model.q_proj.policy is not given
    trainable = mark_only_lora_trainable(model)
    assert len(trainable) == 4
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "q_proj.lora_A.weight", "q_proj.lora_B.weight", "v_proj.lora_A.weight", "v_proj.lora_B.weight"]  # fmt: skip
    with pytest.raises(ValueError, match=r"\['o_proj'\] match no linear layer"):
        replace_linears(TinyBlock(), QuantSpec("nf4"), LoraSpec(targets=("q_proj", "o_proj")), device="cpu")


def test_bfloat16_adapter_weights_compute_like_their_float32_upcast():
    """param_dtype=bfloat16 (the QLoRA script's choice): bf16 weights and gradients, same maths as float32
    weights holding the same values (the matmuls see identical numbers)."""
    torch.manual_seed(0)
    half = LoRALinear(96, 80, quant=QuantSpec("nf4"), dtype=torch.float32, device="cpu",
                      lora=LoraSpec(r=4, alpha=8.0, dropout=0.0, param_dtype=torch.bfloat16))  # fmt: skip
    half.set_base_weight(torch.randn(80, 96) * 0.05)
    with torch.no_grad():
        half.lora_B.weight.normal_(0, 0.1)
    full = LoRALinear(96, 80, quant=QuantSpec("nf4"), dtype=torch.float32, device="cpu",
                      lora=LoraSpec(r=4, alpha=8.0, dropout=0.0))  # fmt: skip
    full.base = half.base
    with torch.no_grad():
        full.lora_A.weight.copy_(half.lora_A.weight.float())
        full.lora_B.weight.copy_(half.lora_B.weight.float())
    assert half.lora_A.weight.dtype == half.lora_B.weight.dtype == torch.bfloat16
    x = torch.randn(3, 5, 96)
    y_half, y_full = half(x), full(x)
    assert torch.equal(y_half, y_full)
    y_half.square().sum().backward()
    y_full.square().sum().backward()
    for h, f in [(half.lora_A, full.lora_A), (half.lora_B, full.lora_B)]:
        assert h.weight.grad.dtype == torch.bfloat16
        assert torch.equal(h.weight.grad, f.weight.grad.to(torch.bfloat16))


def small_adapter_layer(bias: bool) -> tuple[LoRALinear, torch.Tensor]:
    """bf16 NF4 layer whose adapter term is ~1e-4..1e-3 (B after a few Adam steps) against a unit-scale x W^T."""
    torch.manual_seed(0)
    layer = LoRALinear(256, 96, bias=bias, quant=QuantSpec("nf4"), lora=LoraSpec(r=8, alpha=16, dropout=0.0),
                       dtype=torch.bfloat16)  # fmt: skip
    layer.set_base_weight(torch.randn(96, 256) * 0.05)
    if bias:
        layer.bias.data.normal_(0, 0.1)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0.0, 1e-4)
    return layer, torch.randn(4, 9, 256, dtype=torch.bfloat16)


def exact_parts(layer: LoRALinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x W^T, scale * x A^T B^T) in float64 from the bf16 operands the layer multiplies."""
    w = layer.dense_base_weight(torch.bfloat16).double()
    a, b = layer.lora_A.weight.detach().bfloat16().double(), layer.lora_B.weight.detach().bfloat16().double()
    return x.double() @ w.t(), layer.scale * (x.double() @ a.t()) @ b.t()


@pytest.mark.parametrize("bias", [False, True])
def test_base_and_adapter_terms_are_rounded_once(bias):
    """bf16: y = round(x W^T + scale * drop(x) A^T B^T), then + b; not round(round(x W^T) + term)."""
    layer, x = small_adapter_layer(bias)
    base, term = exact_parts(layer, x)
    once = (base + term).to(torch.bfloat16)
    if bias:
        once = (once.double() + layer.bias.double()).to(torch.bfloat16)
    assert (layer(x) == once).float().mean() > 0.99  # the rest: accumulation-order ties (measured 0.9986)


def test_a_small_adapter_term_is_not_lost_to_rounding():
    """With B small (early training) the term is under half a bf16 step of x W^T almost everywhere.
    Rounded once, the output still moves by the term on average (regression slope ~1); rounding x W^T
    first and adding the term after (the formula this replaced) keeps the output at x W^T (slope ~0)."""
    layer, x = small_adapter_layer(bias=False)
    base, term = exact_parts(layer, x)
    base_rounded = base.to(torch.bfloat16).double()
    assert (term.abs() < 0.5 * base_rounded.abs() * 2**-8).float().mean() > 0.7

    def slope(y: torch.Tensor) -> float:  # least-squares slope of (y - round(x W^T)) on the term
        return float(((y.double() - base_rounded) * term).sum() / (term * term).sum())

    assert 0.8 < slope(layer(x).detach()) < 1.2
    assert slope((base_rounded + term).to(torch.bfloat16)) < 0.5


@pytest.mark.skipif(not triton_importable() or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs triton and TRITON_INTERPRET=1 to force the kernels onto CPU tensors")  # fmt: skip
@pytest.mark.parametrize("rows", [1, 3, 33])
def test_decoding_rows_read_the_4bit_codes_and_agree_with_the_training_path(rows, monkeypatch):
    """Few rows without gradients (a decoding step) go through `ops.matmul_4bit` with the adapter unmerged; more
    rows, gradients or training mode take the training path. Both agree to float32 rounding."""
    layer = make_layer("nf4")
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.1)
    layer.policy = KernelPolicy(kernels="triton")
    x = torch.randn(rows, 96)
    calls = []
    decode = type(layer)._decode
    monkeypatch.setattr(type(layer), "_decode", lambda self, x, base: calls.append(1) or decode(self, x, base))
    with torch.no_grad():
        fast = layer.eval()(x)
    want = layer(x.requires_grad_()).detach()  # with gradients: the training path
    assert len(calls) == (1 if rows <= 32 else 0)
    torch.testing.assert_close(fast, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        layer.train()(x)
    assert len(calls) == (1 if rows <= 32 else 0)  # training mode (dropout) never decodes from the codes
