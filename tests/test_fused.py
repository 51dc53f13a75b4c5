"""The fused-module swap: same parameters, same logits (bit for bit on the twins), gradients through it."""

import os

import pytest
import torch

from qlora import ops
from qlora.fused import FusedRMSNorm, use_fused_elementwise
from qlora.model.config import ModelConfig
from qlora.model.llama import LlamaForCausalLM


def tiny_model(seed=0):
    cfg = ModelConfig.from_hf({"model_type": "llama", "vocab_size": 61, "hidden_size": 32, "intermediate_size": 48,
                                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                 "rms_norm_eps": 1e-5, "max_position_embeddings": 64})  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def test_swap_keeps_parameters_and_logits_on_the_twins():
    model = tiny_model()
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))
    before = {k: v for k, v in model.state_dict().items()}
    want = model(ids)
    replaced = use_fused_elementwise(model)
    assert len(replaced) == 2 * (2 + 1 + 1 + 1) + 1  # per layer: 2 norms, act, rotary, MLP; plus the final norm
    assert isinstance(model.model.norm, FusedRMSNorm)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(before[k] is after[k] or torch.equal(before[k], after[k])
                                                 for k in before)  # fmt: skip
    with ops.use_implementation("torch"):
        assert torch.equal(model(ids), want)


@pytest.mark.skipif(not ops.triton_importable(), reason="triton is not installed")
def test_swapped_model_through_the_kernels_matches_and_trains():
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_model().to(device)
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1)).to(device)
    want = model(ids)
    want.square().mean().backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    use_fused_elementwise(model)
    with ops.use_implementation("triton"):
        got = model(ids)
        got.square().mean().backward()
    # fp32 throughout; RMSNorm sums rows in another order: a few ulps, amplified by two layers
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want_grads[n], rtol=1e-3, atol=1e-5, msg=n)


def test_decoder_norms_learn_their_readers_and_ask_them_for_a_row_width():
    """Each decoder layer's two norms ask the projections that read them (q/k/v, gate/up) how wide to
    store their output; on the CPU they answer None (plain rows); the final norm asks nobody."""
    from qlora.fused import FusedMLP
    from qlora.lora import LoraSpec, QuantSpec, replace_linears

    model = tiny_model()
    replace_linears(model, QuantSpec(None), LoraSpec(r=4), device="cpu", dtype=torch.float32)
    use_fused_elementwise(model)
    for layer in model.model.layers:
        assert isinstance(layer.mlp, FusedMLP)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            assert norm.row_width_for is not None
            assert norm.row_width_for(torch.device("cpu"), torch.bfloat16) is None
            assert norm.row_width_for(torch.device("cuda"), torch.bfloat16) == 32 + 4 + 4  # in + r, padded to 8
    assert model.model.norm.row_width_for is None
    names = [n for n, _ in model.named_modules()]
    assert len(names) == len(set(names)) and not any(".row_width_for" in n for n in names)  # no second parent
