"""The fused-module swap: same parameters, same logits and gradients (bit for bit on the twins); the
decoder block that owns its projections' wide rows computes what the plain block computes."""

import os

import pytest
import torch
from torch import nn

from qlora.fused import FusedDecoderLayer, FusedRMSNorm, readers_row_width, use_fused_elementwise
from qlora.kernels import triton_importable
from qlora.kernels.spare_columns import rows_of
from qlora.lora import DEFAULT_TARGETS, LoRALinear, LoraSpec, QuantSpec, lora_layers, replace_linears
from qlora.lora.matmul import columns_width
from qlora.model.config import ModelConfig
from qlora.model.llama import DecoderLayer, LlamaForCausalLM
from qlora.ops import KernelPolicy

TWINS = KernelPolicy(kernels="torch")
needs_kernels = pytest.mark.skipif(
    not triton_importable() or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs triton, and CUDA or TRITON_INTERPRET=1",
)
needs_interpreter = pytest.mark.skipif(
    not triton_importable() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs triton and TRITON_INTERPRET=1 to force the kernels onto CPU tensors",
)


class CudaLikePolicy(KernelPolicy):
    """CUDA's rule for 16-bit LoRA outputs on any device: the product is not rounded by `addmm`, so LoRA
    layers ask for wide rows (`LoRALinear.input_row_width`) and multiply `[x | h]` in one GEMM, as on CUDA.
    "twice", not "float32_product": the CPU has no `mm(out_dtype=)`; the columns GEMM is the same either way."""

    def product_rounding(self, device, dtype):
        return "twice" if dtype in (torch.float16, torch.bfloat16) else "addmm"


def tiny_model(seed=0, dtype=torch.float32):
    cfg = ModelConfig.from_hf({"model_type": "llama", "vocab_size": 61, "hidden_size": 32, "intermediate_size": 48,
                                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                 "rms_norm_eps": 1e-5, "max_position_embeddings": 64})  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def tiny_lora_model(policy, seed=0, dtype=torch.float32):
    """`tiny_model` with NF4 LoRA layers on every projection, B non-zero (with B = 0 the adapter would
    contribute nothing and the comparisons below could not see it), run with `policy`."""
    model = tiny_model(seed, dtype)
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in DEFAULT_TARGETS}  # fmt: skip
    replace_linears(model, QuantSpec("nf4", 64, True), LoraSpec(r=4, alpha=8.0, dropout=0.0), device="cpu",
                    dtype=dtype, policy=policy)  # fmt: skip
    torch.manual_seed(seed + 1)
    for name, layer in lora_layers(model).items():
        layer.set_base_weight(dense[name])
        with torch.no_grad():
            layer.lora_B.weight.normal_(0, 0.3)
    return model


def unfused_blocks(model):
    """Each `FusedDecoderLayer` back to a plain `DecoderLayer` holding the same modules (the inverse of the
    swap): the norms, SwiGLU and RoPE still run through `ops`, the projections get no row width."""
    for i, layer in enumerate(model.model.layers):
        plain = DecoderLayer.__new__(DecoderLayer)
        plain.__dict__ = {k: v for k, v in layer.__dict__.items() if k != "policy"}
        model.model.layers[i] = plain
    return model


def logits_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(ids)
    logits.float().square().mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


IDS = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))


def test_swap_keeps_parameters_logits_and_gradients_on_the_twins():
    model = tiny_model()
    before = {k: v for k, v in model.state_dict().items()}
    want, want_grads = logits_and_grads(model, IDS)
    replaced = use_fused_elementwise(model, TWINS)
    assert len(replaced) == 2 * (2 + 1 + 1 + 1) + 1  # per layer: 2 norms, act, rotary, the block; the final norm
    assert isinstance(model.model.norm, FusedRMSNorm) and all(isinstance(m, FusedDecoderLayer)
                                                              for m in model.model.layers)  # fmt: skip
    assert all(model.get_submodule(name).policy is TWINS for name in replaced)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(before[k] is after[k] or torch.equal(before[k], after[k])
                                                 for k in before)  # fmt: skip
    got, got_grads = logits_and_grads(model, IDS)
    assert torch.equal(got, want) and got_grads.keys() == want_grads.keys()
    for name, grad in got_grads.items():
        assert torch.equal(grad, want_grads[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_block_computes_what_the_plain_block_computes_with_lora(dtype):
    """FusedDecoderLayer and DecoderLayer over the same LoRA projections, on the twins: the same logits and
    gradients, bit for bit. Negative control: another adapter changes the logits."""
    want, want_grads = logits_and_grads(tiny_lora_model(TWINS, dtype=dtype), IDS)
    fused = tiny_lora_model(TWINS, dtype=dtype)
    use_fused_elementwise(fused, TWINS)
    got, got_grads = logits_and_grads(fused, IDS)
    assert torch.equal(got, want) and got_grads.keys() == want_grads.keys()
    assert sum(".lora_" in name for name in got_grads) == 2 * 7 * 2  # A and B of 7 projections, 2 layers
    for name, grad in got_grads.items():
        assert torch.equal(grad, want_grads[name]), name
    with torch.no_grad():
        fused.model.layers[1].mlp.down_proj.lora_B.weight.mul_(2)
    assert not torch.equal(fused(IDS), want)


@pytest.mark.slow
@needs_kernels
def test_swapped_model_through_the_kernels_matches_and_trains():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_model().to(device)
    ids = IDS.to(device)
    want, want_grads = logits_and_grads(model, ids)
    use_fused_elementwise(model, KernelPolicy(kernels="triton"))
    got, got_grads = logits_and_grads(model, ids)
    # fp32 throughout; RMSNorm sums rows in another order: a few ulps, amplified by two layers
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for n, grad in got_grads.items():
        torch.testing.assert_close(grad, want_grads[n], rtol=1e-3, atol=1e-5, msg=n)


def test_the_block_asks_its_readers_for_a_row_width():
    """The norms' readers (q/k/v, gate/up) and SwiGLU's (down): in + r padded to 8 where the LoRA output is
    not rounded by addmm (16-bit on CUDA), None elsewhere (the CPU, float32) and for a layer without an
    adapter; the first reader with a preference decides."""
    model = tiny_lora_model(KernelPolicy())
    layer = model.model.layers[0]
    qkv = (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert readers_row_width(qkv, cpu, torch.bfloat16) is None
    assert readers_row_width(qkv, cuda, torch.float32) is None
    assert readers_row_width(qkv, cuda, torch.bfloat16) == columns_width(32, 4) == 40
    assert readers_row_width((layer.mlp.down_proj,), cuda, torch.bfloat16) == columns_width(48, 4) == 56
    frozen = LoRALinear(32, 32, quant=QuantSpec("nf4"), lora=None, device="cpu")
    assert readers_row_width((frozen, nn.Identity(), *qkv), cuda, torch.bfloat16) == 40
    assert readers_row_width((frozen, nn.Identity()), cuda, torch.bfloat16) is None


@pytest.mark.slow
@needs_interpreter
def test_wide_rows_are_used_where_the_product_is_not_rounded_by_addmm(monkeypatch):
    """The kernels forced onto CPU tensors (they store into wide rows; the twins ignore the hint) with CUDA's
    rounding rule: every LoRA projection but o_proj finds its input in rows as wide as it asked for, and the
    model computes what the plain block (which concatenates x and h) computes, bit for bit. Both take the
    columns GEMM everywhere (the measured rule sends k/v, whose outputs are narrow, to the other path when x
    must be copied), so that the only difference is where [x | h] lives."""
    import qlora.lora.layer
    import qlora.lora.matmul

    monkeypatch.setattr(qlora.lora.matmul, "adapter_columns_pay", lambda *args, **kwargs: True)

    found = []

    def recording(x, width):
        found.append(rows_of(x, width))
        return found[-1]

    policy = CudaLikePolicy(kernels="triton")
    monkeypatch.setattr(qlora.lora.layer, "rows_of", recording)
    want, want_grads = logits_and_grads(unfused_blocks(_fused_lora_model(policy)), IDS)
    assert found == []  # negative control: the plain block passes no width, so no layer looks for wide rows
    got, got_grads = logits_and_grads(_fused_lora_model(policy), IDS)
    assert sum(rows is not None for rows in found) == len(found) == 2 * 6  # q k v gate up down, two layers
    assert {tuple(rows.shape) for rows in found} == {(18, 40), (18, 56)}  # [B*T, in + r + pad]
    # h was written beside x (r = 4 columns, then 4 of zero padding), not into a concatenated copy
    assert all(rows[:, -8:-4].count_nonzero() > 0 and rows[:, -4:].count_nonzero() == 0 for rows in found)
    assert torch.equal(got, want) and got_grads.keys() == want_grads.keys()
    for name, grad in got_grads.items():
        assert torch.equal(grad, want_grads[name]), name


def _fused_lora_model(policy):
    model = tiny_lora_model(policy, dtype=torch.bfloat16)
    use_fused_elementwise(model, policy)
    return model
