"""The dispatch point: which implementation runs where, how to force it, and that the twins are the model's formulas."""

import os
import threading

import pytest
import torch
import torch.nn.functional as F

import qlora
from qlora import ops
from qlora.lora import LoRALinear, LoraSpec, QuantSpec
from qlora.model.llama import RMSNorm, apply_rotary

# Kernels forced onto CPU tensors run in Triton's interpreter (TRITON_INTERPRET=1 from tests/conftest.py).

needs_triton = pytest.mark.skipif(not ops.triton_importable(), reason="triton is not installed")


def test_cpu_tensors_run_the_twins_by_default(monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    assert ops.implementation_for("cpu") == "torch"


@needs_triton
def test_cuda_tensors_run_the_kernels_by_default(monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    assert ops.implementation_for("cuda") == "triton"


def test_environment_variable_forces_the_twins(monkeypatch):
    monkeypatch.setenv(ops.ENV_VAR, "torch")
    assert ops.implementation_for("cuda") == "torch"
    monkeypatch.setenv(ops.ENV_VAR, "reference")
    assert ops.implementation_for("cuda") == "torch"


def test_a_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv(ops.ENV_VAR, "cutlass")
    with pytest.raises(ValueError, match="QLORA_KERNELS='cutlass'"):
        ops.implementation_for("cuda")


def test_use_implementation_reaches_other_threads():
    """Autograd runs the backward of CUDA tensors (and so checkpoint recomputation) on its own device
    threads: a choice visible only to the thread that opened the block would not reach them."""
    seen = []
    with ops.use_implementation("torch"):
        worker = threading.Thread(target=lambda: seen.append(ops.requested_implementation()))
        worker.start()
        worker.join()
    assert seen == ["torch"]
    assert not ops._forced  # the block closed


def test_use_implementation_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv(ops.ENV_VAR, "triton")
    with ops.use_implementation("reference"):
        assert ops.implementation_for("cuda") == "torch"
    with pytest.raises(ValueError, match="implementation must be one of"), ops.use_implementation("fast"):
        pass


def test_requiring_triton_where_it_cannot_run_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with ops.use_implementation("triton"), pytest.raises(RuntimeError, match="Triton needs CUDA|not installed"):
        ops.implementation_for("cpu")


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
    with ops.use_implementation("torch"):
        assert torch.equal(ops.rms_norm(x, norm.weight, norm.eps), norm(x))
        assert torch.equal(ops.apply_rotary(q, cos, sin), apply_rotary(q, cos, sin))
        assert torch.equal(ops.swiglu(x, x.flip(0)), F.silu(x) * x.flip(0))
        want = F.cross_entropy(logits.float(), labels, reduction="sum")
        assert torch.equal(ops.cross_entropy_sum(logits, labels), want)


@needs_triton
def test_forced_triton_runs_the_kernels_through_lora(monkeypatch):
    """A LoRA layer's forward and backward through the Triton dequantizer equal the reference path."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layer = LoRALinear(70, 33, quant=QuantSpec("nf4", 64, True), lora=LoraSpec(r=4, dropout=0.0), device=device)
    layer.set_base_weight(torch.randn(33, 70, generator=torch.Generator().manual_seed(1)).to(device) * 0.05)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.1)  # non-zero B, so the adapter path contributes
    x = torch.randn(3, 70, device=device, dtype=torch.bfloat16, requires_grad=True)
    results = {}
    for name in ("torch", "triton"):
        with ops.use_implementation(name):
            y = layer(x)
            y.float().square().sum().backward()
        results[name] = (y.detach(), x.grad.clone(), layer.lora_A.weight.grad.clone())
        x.grad = layer.lora_A.weight.grad = layer.lora_B.weight.grad = None
    for want, got in zip(results["torch"], results["triton"], strict=True):
        assert torch.equal(want, got)  # dequantization is bit-exact, so everything downstream is too
    assert isinstance(layer.base, qlora.QuantizedTensor)


@needs_triton
def test_inputs_a_kernel_does_not_cover_run_the_twin():
    """Mixed dtypes (float32 cos/sin or up with bfloat16 activations, as under autocast) promote as the model does."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 to force the kernels onto CPU tensors")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 8, generator=g).to(torch.bfloat16)
    cos, sin = torch.randn(1, 5, 8, generator=g), torch.randn(1, 5, 8, generator=g)  # float32
    gate, up = torch.randn(4, 6, generator=g).to(torch.bfloat16), torch.randn(4, 6, generator=g)
    with ops.use_implementation("triton"):
        rotated, activated = ops.apply_rotary(x, cos, sin), ops.swiglu(gate, up)
    assert rotated.dtype == torch.float32 and torch.equal(rotated, apply_rotary(x, cos, sin))
    assert activated.dtype == torch.float32 and torch.equal(activated, F.silu(gate) * up)


@pytest.mark.gpu
def test_columns_copy_kernel_runs_inside_a_graph_capture_and_the_twin_eagerly(monkeypatch):
    """The adapter columns' copy: torch's twin in an eager step (host-bound: a Triton launch costs ~70 us
    of host time), the kernel while a CUDA graph is captured; the same bits either way."""
    import qlora.kernels.columns_copy as columns_copy

    real, calls = columns_copy.copy_into_columns_, []
    monkeypatch.setattr(columns_copy, "copy_into_columns_", lambda *a: calls.append(1) or real(*a))
    src = torch.randn(64, 8, device="cuda")
    eager = torch.full((64, 80), float("nan"), dtype=torch.bfloat16, device="cuda")
    ops.copy_into_columns_(eager[:, 70:], src, 0.3)
    assert not calls
    captured = torch.full_like(eager, float("nan"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.copy_into_columns_(captured[:, 70:], src, 0.3)
    assert len(calls) == 1
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured[:, 70:], eager[:, 70:]) and torch.count_nonzero(eager[:, 78:]) == 0


@needs_triton
def test_graph_step_kernels_where_the_kernels_run_but_not_in_eager_cuda_steps(monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    assert not ops.graph_step_kernels("cpu")  # the twins: torch's dropout
    with ops.use_implementation("torch"):
        assert not ops.graph_step_kernels("cuda")
    if torch.cuda.is_available():
        assert not ops.graph_step_kernels("cuda")  # eager CUDA: Triton's launcher would cost more than it saves
    if os.environ.get("TRITON_INTERPRET") == "1":
        with ops.use_implementation("triton"):
            assert ops.graph_step_kernels("cpu")


@pytest.mark.gpu
def test_graph_step_kernels_while_a_cuda_graph_is_captured():
    seen = []
    graph = torch.cuda.CUDAGraph()
    x = torch.zeros(4, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        seen.append(ops.graph_step_kernels("cuda"))
        x.add_(1)
    assert seen == [True] and not ops.graph_step_kernels("cuda")
    with ops.graph_paths():  # the warm-ups before a capture take the graph's paths too
        assert ops.graph_step_kernels("cuda") and ops.in_graph_step("cuda")
    assert not ops.in_graph_step("cuda")


def test_graph_paths_mark_graph_steps_on_every_device():
    assert not ops.in_graph_step("cpu")
    with ops.graph_paths():
        assert ops.in_graph_step("cpu")
        with ops.use_implementation("torch"):
            assert not ops.graph_step_kernels("cpu")  # the twins never take the hashed mask unforced
    assert not ops.in_graph_step("cpu")
