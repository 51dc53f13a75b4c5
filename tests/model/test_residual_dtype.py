"""`model.residual_dtype = torch.float32`: a bf16 model whose residual stream is held and summed in fp32.

What it must do: leave an fp32 model exactly as it was; in a bf16 model carry fp32 between the
layers while every layer still computes in bf16; come closer to the fp32 model than the bf16 stream
does; and give the same gradients with and without gradient checkpointing.
"""

from __future__ import annotations

import copy

import pytest
import torch

from qlora.model import LlamaForCausalLM, ModelConfig

CONFIG = ModelConfig(
    model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
)  # fmt: skip


def random_model(seed: int = 0, sublayer_scale: float = 1.0) -> LlamaForCausalLM:
    """Unit-scale weights; `sublayer_scale` shrinks what each attention and MLP adds to the stream
    (small updates to a large stream are what bf16 rounding of the stream loses)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(CONFIG)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else torch.randn_like(p) / p.shape[-1] ** 0.5)
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(sublayer_scale)
    return model.eval()


def tokens(seed: int = 1, batch: int = 2, seq: int = 24) -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_float32_model_is_unchanged():
    model = random_model()
    ids = tokens()
    want = model(ids)
    model.residual_dtype = torch.float32
    assert torch.equal(model(ids), want)


def test_bf16_layers_compute_in_bf16_between_a_float32_stream():
    model = random_model().to(torch.bfloat16)
    model.residual_dtype = torch.float32
    seen = []
    model.model.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    logits = model(tokens())
    assert seen == [torch.float32, torch.bfloat16, torch.bfloat16]
    assert logits.dtype == torch.bfloat16  # the final norm hands lm_head bf16


def final_stream(model: LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """The residual stream after the last layer (the final norm's input), as float32."""
    seen = []
    handle = model.model.norm.register_forward_pre_hook(lambda m, args: seen.append(args[0].float()))
    model(ids)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_float32_stream_is_closer_to_the_float32_model(seed):
    ids = tokens(seed + 10)
    bf16 = random_model(seed, sublayer_scale=0.05).to(torch.bfloat16)
    want = final_stream(copy.deepcopy(bf16).float(), ids)  # the same (bf16-valued) weights, fp32 arithmetic
    err_bf16_stream = (final_stream(bf16, ids) - want).norm()
    bf16.residual_dtype = torch.float32
    err_fp32_stream = (final_stream(bf16, ids) - want).norm()
    assert err_fp32_stream < 0.6 * err_bf16_stream  # measured 0.46-0.48, (err_fp32_stream, err_bf16_stream)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = random_model().to(torch.bfloat16).train()
        model.residual_dtype = torch.float32
        model.gradient_checkpointing = checkpointing
        for p in model.parameters():
            p.requires_grad_("proj" in p_name(model, p))
        model(tokens()).float().logsumexp(-1).mean().backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    assert len(grads[0]) == 7 * CONFIG.num_hidden_layers
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def p_name(model: torch.nn.Module, param: torch.nn.Parameter) -> str:
    return next(n for n, p in model.named_parameters() if p is param)
