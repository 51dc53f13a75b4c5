"""`KernelPolicy`: which implementation runs where, how a test forces it, and that its state belongs to
one policy object (one model), not to the process."""

import logging
import os
import threading

import pytest
import torch

from qlora import ops
from qlora.kernels import triton_importable
from qlora.lora import LoRALinear, LoraSpec, QuantSpec
from qlora.ops import KernelPolicy, apply_policy, policy_of

# Kernels forced onto CPU tensors run in Triton's interpreter (TRITON_INTERPRET=1 from tests/conftest.py).
needs_triton = pytest.mark.skipif(not triton_importable(), reason="triton is not installed")
needs_interpreter = pytest.mark.skipif(
    not triton_importable() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs triton and TRITON_INTERPRET=1 to force the kernels onto CPU tensors",
)


# --- kernels or twins -------------------------------------------------------------------------------
def test_cpu_tensors_run_the_twins_by_default():
    assert KernelPolicy().implementation_for("cpu") == "torch"  # even under the interpreter: "auto" asks for CUDA
    assert not KernelPolicy().uses_kernels("cpu")


@needs_triton
def test_cuda_tensors_run_the_kernels_by_default():
    assert KernelPolicy().implementation_for("cuda") == "triton"
    assert KernelPolicy(kernels="torch").implementation_for("cuda") == "torch"


def test_the_environment_variable_is_read_when_the_policy_is_made(monkeypatch):
    monkeypatch.setenv(ops.ENV_VAR, "torch")
    made_before = KernelPolicy.from_env()
    assert made_before.kernels == "torch" and made_before.implementation_for("cuda") == "torch"
    monkeypatch.setenv(ops.ENV_VAR, "reference")  # the quant floor's name for the twin
    assert KernelPolicy.from_env().kernels == "torch"
    monkeypatch.setenv(ops.ENV_VAR, "auto")
    assert made_before.kernels == "torch"  # read once: changing the variable later changes no policy
    monkeypatch.delenv(ops.ENV_VAR)
    assert KernelPolicy.from_env().kernels == "auto"


def test_bad_values_name_where_they_came_from(monkeypatch):
    monkeypatch.setenv(ops.ENV_VAR, "cutlass")
    with pytest.raises(ValueError, match="QLORA_KERNELS='cutlass'"):
        KernelPolicy.from_env()
    with pytest.raises(ValueError, match="kernels must be one of"):
        KernelPolicy(kernels="fast")
    assert KernelPolicy(kernels="reference").kernels == "torch"


def test_requiring_triton_where_it_cannot_run_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="Triton needs CUDA|not installed"):
        KernelPolicy(kernels="triton").implementation_for("cpu")
    assert KernelPolicy().implementation_for("cpu") == "torch"  # "auto" falls back to the twins, not an error


# --- one policy per model ---------------------------------------------------------------------------
def _layer(policy: KernelPolicy) -> LoRALinear:
    layer = LoRALinear(70, 33, quant=QuantSpec("nf4", 64, True), lora=LoraSpec(r=4, dropout=0.0), device="cpu",
                       dtype=torch.float32, policy=policy)  # fmt: skip
    layer.set_base_weight(torch.randn(33, 70, generator=torch.Generator().manual_seed(1)) * 0.05)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.1)  # non-zero B, so the adapter path contributes
    return layer


@needs_interpreter
def test_a_policy_given_to_one_model_does_not_affect_another(monkeypatch):
    """Two layers in one process, one forced onto the kernels: only that one calls them, and both compute
    the same (dequantization is bit-exact either way)."""
    import qlora.kernels.dequantize as kernel

    real, calls = kernel.dequantize_4bit, []
    monkeypatch.setattr(kernel, "dequantize_4bit", lambda *a, **k: calls.append(1) or real(*a, **k))
    forced, plain = _layer(KernelPolicy(kernels="triton")), _layer(KernelPolicy(kernels="torch"))
    plain.load_state_dict(forced.state_dict())
    plain.base = forced.base
    x = torch.randn(3, 70)
    want = plain(x)
    assert calls == []  # negative control: the twin's model never reaches the kernel
    got = forced(x)
    assert calls and torch.equal(got, want)
    calls.clear()
    plain(x)
    assert calls == []  # the forced model's policy did not leak into the other one


def test_apply_policy_hands_one_policy_to_every_module_of_one_model():
    from qlora.fused import use_fused_elementwise
    from qlora.lora import replace_linears
    from qlora.model.config import ModelConfig
    from qlora.model.llama import LlamaForCausalLM

    cfg = ModelConfig.from_hf({"model_type": "llama", "vocab_size": 61, "hidden_size": 32, "intermediate_size": 48,
                                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                 "rms_norm_eps": 1e-5, "max_position_embeddings": 64})  # fmt: skip
    models = []
    for _ in range(2):
        model = LlamaForCausalLM(cfg)
        replace_linears(model, QuantSpec(None), LoraSpec(r=4), device="cpu", dtype=torch.float32)
        use_fused_elementwise(model, KernelPolicy())
        models.append(model)
    first, second = KernelPolicy(kernels="torch"), KernelPolicy(kernels="torch")
    assert apply_policy(models[0], first) is first and apply_policy(models[1], second) is second
    for model, policy in zip(models, (first, second), strict=True):
        holders = [m for m in model.modules() if isinstance(getattr(m, "policy", None), KernelPolicy)]
        assert len(holders) == 1 + 2 * (7 + 5) + 1  # the model; per layer 7 LoRA layers and 5 fused modules; norm
        assert all(m.policy is policy for m in holders) and policy_of(model) is policy
    assert first is not second and first != second  # policies compare by identity: each model has its own


def test_policy_of_a_model_without_one_is_a_fresh_default_not_stored(monkeypatch):
    monkeypatch.setenv(ops.ENV_VAR, "torch")
    model = torch.nn.Linear(2, 2)
    policy = policy_of(model)
    assert policy.kernels == "torch" and not hasattr(model, "policy")
    assert policy_of(model) is not policy


# --- graph steps and dense-weight reuse: state on the object ----------------------------------------
def _seen_from_another_thread(fn):
    seen = []
    worker = threading.Thread(target=lambda: seen.append(fn()))
    worker.start()
    worker.join()
    return seen[0]


def test_graph_step_and_reuse_are_visible_from_another_thread_and_to_no_other_policy():
    """Autograd runs the backward of CUDA tensors (and so a checkpoint's recompute) on its own device
    thread: the state is on the policy object, so that thread sees what the step's thread entered."""
    policy, other = KernelPolicy(), KernelPolicy()
    assert not policy.in_graph_step() and not policy.reuse_dense_weights()
    with policy.graph_step():
        assert _seen_from_another_thread(policy.in_graph_step)
        assert not other.in_graph_step()
        with policy.graph_step():  # nested: still inside after the inner block closes
            pass
        assert policy.in_graph_step()
    with policy.reusing_dense_weights():
        assert _seen_from_another_thread(policy.reuse_dense_weights)
        assert not other.reuse_dense_weights() and not policy.in_graph_step()
    assert not _seen_from_another_thread(policy.in_graph_step) and not policy.reuse_dense_weights()


def test_graph_step_state_is_left_even_when_the_block_raises():
    policy = KernelPolicy()
    with pytest.raises(KeyError), policy.graph_step(), policy.reusing_dense_weights():
        raise KeyError("inside")
    assert not policy.in_graph_step() and not policy.reuse_dense_weights()


@needs_triton
def test_graph_step_kernels_run_in_graph_steps_or_when_forced():
    auto = KernelPolicy()
    assert not auto.graph_step_kernels("cpu")  # the twins
    assert not auto.graph_step_kernels("cuda")  # eager CUDA: Triton's launcher would cost more than it saves
    with auto.graph_step():
        assert auto.graph_step_kernels("cuda") and not auto.graph_step_kernels("cpu")
    twins = KernelPolicy(kernels="torch")
    with twins.graph_step():
        assert twins.in_graph_step() and not twins.graph_step_kernels("cuda")  # the twins are never left
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert KernelPolicy(kernels="triton").graph_step_kernels("cpu")  # forced: in eager steps too


# --- the rounding of a LoRA output -------------------------------------------------------------------
def test_product_rounding_by_device_and_dtype():
    policy = KernelPolicy(product_in_float32=True)
    assert policy.product_rounding("cpu", torch.bfloat16) == "addmm"
    assert policy.product_rounding("cuda", torch.float32) == "addmm"
    assert policy.product_rounding("cuda", torch.bfloat16) == "float32_product"
    assert policy.product_rounding("cuda", torch.float16) == "float32_product"
    assert KernelPolicy(product_in_float32=False).product_rounding("cuda", torch.bfloat16) == "twice"


def test_a_torch_without_float32_products_gives_a_policy_that_says_so(monkeypatch, caplog):
    """Decided when the policy is made, from `has_float32_product_mm`, and logged once with the reason."""
    monkeypatch.setattr("qlora.ops.policy.has_float32_product_mm", lambda: False)
    with caplog.at_level(logging.WARNING, logger="qlora.ops"):
        policy = KernelPolicy.from_env()
    assert not policy.product_in_float32 and policy.product_rounding("cuda", torch.bfloat16) == "twice"
    warnings = [r for r in caplog.records if r.name == "qlora.ops" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "out_dtype" in warnings[0].getMessage()
    caplog.clear()
    monkeypatch.setattr("qlora.ops.policy.has_float32_product_mm", lambda: True)
    with caplog.at_level(logging.WARNING, logger="qlora.ops"):
        assert KernelPolicy().product_in_float32  # negative control: this torch has it, and nothing is logged
    assert not [r for r in caplog.records if r.name == "qlora.ops"]
