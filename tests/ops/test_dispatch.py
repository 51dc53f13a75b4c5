"""The ops: each runs the kernel or the twin its policy picks; the twins are the model's own formulas."""

import os

import pytest
import torch
import torch.nn.functional as F

import qlora
from qlora import ops
from qlora.kernels import triton_importable
from qlora.lora import HashedDropout, LoRALinear, LoraSpec, QuantSpec
from qlora.model.llama import RMSNorm, apply_rotary
from qlora.ops import KernelPolicy

TWINS = KernelPolicy(kernels="torch")
# Kernels forced onto CPU tensors run in Triton's interpreter (TRITON_INTERPRET=1 from tests/conftest.py).
needs_kernels = pytest.mark.skipif(
    not triton_importable() or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs triton, and CUDA or TRITON_INTERPRET=1",
)


def test_twins_are_the_model_formulas_bit_for_bit():
    """The torch path of each op computes exactly what the model's own code computes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 24, generator=g).to(torch.bfloat16)
    norm = RMSNorm(24, 1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3, generator=g)
    q = torch.randn(2, 3, 5, 8, generator=g).to(torch.bfloat16)
    cos, sin = torch.randn(2, 1, 5, 8, generator=g).to(torch.bfloat16).unbind(0)
    logits, labels = torch.randn(6, 11, generator=g).to(torch.bfloat16), torch.tensor([1, -100, 3, 4, 10, 0])
    assert torch.equal(ops.rms_norm(x, norm.weight, norm.eps, policy=TWINS), norm(x))
    assert torch.equal(ops.rms_norm(x, norm.weight, norm.eps, torch.float32, policy=TWINS), norm(x, torch.float32))
    assert torch.equal(ops.rms_norm(x, norm.weight, norm.eps, row_width=40, policy=TWINS), norm(x))  # a hint only
    assert torch.equal(ops.apply_rotary(q, cos, sin, policy=TWINS), apply_rotary(q, cos, sin))
    assert torch.equal(ops.swiglu(x, x.flip(0), policy=TWINS), F.silu(x) * x.flip(0))
    want = F.cross_entropy(logits.float(), labels, reduction="sum")
    assert torch.equal(ops.cross_entropy_sum(logits, labels, policy=TWINS), want)


def test_every_op_needs_its_policy():
    """No op falls back on process state: the policy is a required keyword."""
    x = torch.randn(3, 4)
    with pytest.raises(TypeError, match="policy"):
        ops.swiglu(x, x)
    with pytest.raises(TypeError, match="policy"):
        ops.add_masked_lowrank_(x, x[:, :2], x[:2], None, 1.0)


@needs_kernels
def test_forced_triton_runs_the_kernels_through_lora():
    """A LoRA layer's forward and backward through the Triton dequantizer equal the twin's, bit for bit."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layer = LoRALinear(70, 33, quant=QuantSpec("nf4", 64, True), lora=LoraSpec(r=4, dropout=0.0), device=device)
    layer.set_base_weight(torch.randn(33, 70, generator=torch.Generator().manual_seed(1)).to(device) * 0.05)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.1)  # non-zero B, so the adapter path contributes
    x = torch.randn(3, 70, device=device, dtype=torch.bfloat16, requires_grad=True)
    results = {}
    for name in ("torch", "triton"):
        layer.policy = KernelPolicy(kernels=name)
        y = layer(x)
        y.float().square().sum().backward()
        results[name] = (y.detach(), x.grad.clone(), layer.lora_A.weight.grad.clone())
        x.grad = layer.lora_A.weight.grad = layer.lora_B.weight.grad = None
    for want, got in zip(results["torch"], results["triton"], strict=True):
        assert torch.equal(want, got)  # dequantization is bit-exact, so everything downstream is too
    assert isinstance(layer.base, qlora.QuantizedTensor)


@pytest.mark.skipif(not triton_importable() or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs TRITON_INTERPRET=1 to force the kernels onto CPU tensors")  # fmt: skip
def test_inputs_a_kernel_does_not_cover_run_the_twin():
    """Mixed dtypes (float32 cos/sin or up with bfloat16 activations, as under autocast) promote as the model does."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 8, generator=g).to(torch.bfloat16)
    cos, sin = torch.randn(1, 5, 8, generator=g), torch.randn(1, 5, 8, generator=g)  # float32
    gate, up = torch.randn(4, 6, generator=g).to(torch.bfloat16), torch.randn(4, 6, generator=g)
    forced = KernelPolicy(kernels="triton")
    rotated, activated = ops.apply_rotary(x, cos, sin, policy=forced), ops.swiglu(gate, up, policy=forced)
    assert rotated.dtype == torch.float32 and torch.equal(rotated, apply_rotary(x, cos, sin))
    assert activated.dtype == torch.float32 and torch.equal(activated, F.silu(gate) * up)


def test_masked_lowrank_without_a_mask_is_one_addmm_and_with_one_uses_its_keep_and_scale():
    g = torch.Generator().manual_seed(2)
    out, lo, a = torch.randn(9, 20, generator=g), torch.randn(9, 3, generator=g), torch.randn(3, 20, generator=g)
    assert torch.equal(ops.add_masked_lowrank_(out.clone(), lo, a, None, 0.5, policy=TWINS),
                       out.clone().addmm_(lo, a, alpha=0.5))  # fmt: skip
    mask = HashedDropout(torch.tensor([11, 12]), 0.3)
    got = ops.add_masked_lowrank_(out.clone(), lo, a, mask, 0.5, policy=TWINS)
    want = out.double() + 0.5 * mask.multipliers(9, 20, torch.float64) * (lo.double() @ a.double())
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)  # float32 rounding of the product
    other = HashedDropout(torch.tensor([11, 13]), 0.3)  # negative control: another seed, another result
    assert not torch.allclose(ops.add_masked_lowrank_(out.clone(), lo, a, other, 0.5, policy=TWINS), got)


@pytest.mark.gpu
def test_columns_copy_kernel_runs_in_graph_steps_and_the_twin_eagerly(monkeypatch):
    """The adapter columns' copy: torch's twin in an eager step (host-bound: a Triton launch costs ~70 us
    of host time), the kernel in a graph step (`KernelPolicy.graph_step`, entered around the warm-ups and
    the capture); the same bits either way."""
    import qlora.kernels.columns_copy as columns_copy

    real, calls = columns_copy.copy_into_columns_, []
    monkeypatch.setattr(columns_copy, "copy_into_columns_", lambda *a: calls.append(1) or real(*a))
    policy = KernelPolicy()
    src = torch.randn(64, 8, device="cuda")
    eager = torch.full((64, 80), float("nan"), dtype=torch.bfloat16, device="cuda")
    ops.copy_into_columns_(eager[:, 70:], src, 0.3, policy=policy)
    assert not calls
    captured = torch.full_like(eager, float("nan"))
    with policy.graph_step():  # a warm-up: compiles the kernel outside the capture
        ops.copy_into_columns_(captured[:, 70:], src, 0.3, policy=policy)
    assert len(calls) == 1
    captured.fill_(float("nan"))
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with policy.graph_step(), torch.cuda.graph(graph):
        ops.copy_into_columns_(captured[:, 70:], src, 0.3, policy=policy)
    assert len(calls) == 2
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured[:, 70:], eager[:, 70:]) and torch.count_nonzero(eager[:, 78:]) == 0
