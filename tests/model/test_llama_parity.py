"""Our decoder computes what transformers' own models compute.

Random tiny configs (2 layers, hidden 64, vocab 256, GQA 4:2) of every supported family are built
with transformers under a fixed seed, their weights re-drawn at a scale that gives O(1) logits
(transformers' 0.02 init gives logits ~0.5, which would make atol 1e-5 lenient) and with non-unit
norm weights (so a misplaced RMSNorm shows), then copied into ours with a strict load. Logits are
compared at fp32 with `torch.testing.assert_close` defaults (rtol 1.3e-6, atol 1e-5). Everything
else (KV cache, packing masks, gradient checkpointing) is checked against our own full forward.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from qlora.checkpoint_io import check_keys, expected_keys, iter_tensors, read_config
from qlora.model import LlamaForCausalLM, ModelConfig

SHAPE = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=4096,
)  # fmt: skip
# Llama 3.1 scaling with a short "original context" so that, at head_dim 16, two frequencies are
# interpolated and five divided by the factor: the scaling then shows in logits at short lengths.
LLAMA3_ROPE = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64, "rope_theta": 10000.0,
}  # fmt: skip
ARCHS = {
    "llama": (LlamaConfig, {}),
    "llama-bias": (LlamaConfig, {"attention_bias": True, "mlp_bias": True}),
    "llama-tied": (LlamaConfig, {"tie_word_embeddings": True}),
    "llama3-rope": (LlamaConfig, {"rope_parameters": LLAMA3_ROPE}),
    "llama-linear-rope": (LlamaConfig, {"rope_parameters": {"rope_type": "linear", "factor": 4.0}}),
    "mistral": (MistralConfig, {"sliding_window": None}),
    "mistral-window": (MistralConfig, {"sliding_window": 5}),
    "qwen2": (Qwen2Config, {}),
    "qwen2-window": (Qwen2Config, {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1}),
    "qwen3": (Qwen3Config, {"head_dim": 32}),  # 4 heads x 32 != hidden 64: head_dim is its own knob
}
T = 16


def hf_config(arch: str):
    cls, extra = ARCHS[arch]
    return cls(**SHAPE, **extra)


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2), norm weights ~ 1 + N(0, 0.2^2), embeddings ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[1]))


def load_hf_state(model: LlamaForCausalLM, state: dict[str, torch.Tensor]) -> None:
    if model.config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    model.load_state_dict(state, strict=True)


def make_pair(arch: str, seed: int = 0):
    config = hf_config(arch)
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(config).eval()
    randomize_(hf, seed)
    ours = LlamaForCausalLM(ModelConfig.from_hf(config.to_dict())).eval()
    load_hf_state(ours, dict(hf.state_dict()))
    return hf, ours


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, SHAPE["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def padding_mask(lengths: list[int], side: str) -> torch.Tensor:
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for row, n in enumerate(lengths):
        if side == "right":
            mask[row, :n] = 1
        else:
            mask[row, mask.shape[1] - n :] = 1
    return mask


@pytest.mark.parametrize("arch", list(ARCHS))
@torch.no_grad()
def test_logits_and_hidden_states_equal_transformers(arch):
    hf, ours = make_pair(arch)
    x = tokens(2, T)
    expected = hf(x).logits
    assert expected.abs().max() > 1.0  # the re-drawn weights give O(1) logits
    torch.testing.assert_close(ours(x), expected)
    torch.testing.assert_close(ours.hidden_states(x), hf.model(x).last_hidden_state)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("side", ["right", "left"])
@torch.no_grad()
def test_padded_batch_equals_transformers_on_real_tokens(arch, side):
    hf, ours = make_pair(arch)
    mask = padding_mask([T, 11, 6], side)
    x = tokens(3, T, seed=2)
    # transformers' forward uses arange positions whatever the mask; generate() derives them from the
    # mask as we do. Give transformers our positions (for right padding they equal arange).
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    expected = hf(x, attention_mask=mask, position_ids=positions).logits
    got = ours(x, attention_mask=mask)
    assert torch.isfinite(got).all()
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real])


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral-window"])
@torch.no_grad()
def test_left_padded_row_equals_the_unpadded_sequence(arch):
    _, ours = make_pair(arch)
    x = tokens(2, T, seed=3)
    mask = padding_mask([T, 9], "left")
    batched = ours(x, attention_mask=mask)
    alone = ours(x[1:, T - 9 :])
    torch.testing.assert_close(batched[1, T - 9 :], alone[0])


@pytest.mark.parametrize("arch", ["llama", "llama3-rope", "qwen2"])
@torch.no_grad()
def test_far_positions_equal_transformers(arch):
    hf, ours = make_pair(arch)
    x = tokens(1, T, seed=4)
    positions = torch.arange(3000, 3000 + T)[None]
    torch.testing.assert_close(ours(x, position_ids=positions), hf(x, position_ids=positions).logits)


@torch.no_grad()
def test_negative_controls_rope_scaling_and_window_change_logits():
    """The parity cases above would pass vacuously if the scaling or the window never mattered."""
    x = tokens(1, T, seed=5)
    for arch, plain in (("llama3-rope", "llama"), ("mistral-window", "mistral"), ("qwen2-window", "qwen2")):
        _, ours = make_pair(arch)
        _, ref = make_pair(plain)  # same seed: same weights, without the scaling / window
        assert ours.config.rope_scaling != ref.config.rope_scaling or ours.config.layer_types != ref.config.layer_types
        ref.load_state_dict(ours.state_dict())
        assert not torch.allclose(ours(x), ref(x), atol=1e-3), arch


@pytest.mark.parametrize("arch", ["llama", "llama3-rope", "qwen2", "qwen3"])
@torch.no_grad()
def test_bf16_equals_transformers_bf16(arch):
    """RMSNorm's cast order (weight * x_normed.to(bf16)) and the cos/sin casts match in bf16 too.

    transformers is built in bf16 the way `from_pretrained(dtype=bf16)` builds it: its RoPE
    inv_freq buffer stays fp32. (`hf.to(torch.bfloat16)` would round that buffer to bf16 and
    shift every angle, which is why ours keeps inv_freq out of `.to(dtype)`.)
    """
    hf32, ours = make_pair(arch)
    hf = AutoModelForCausalLM.from_config(hf32.config, dtype=torch.bfloat16).eval()
    hf.load_state_dict(hf32.state_dict())
    assert hf.model.rotary_emb.inv_freq.dtype == torch.float32
    ours.to(torch.bfloat16)
    assert ours.model.rotary_emb.inv_freq(torch.device("cpu")).dtype == torch.float32
    x = tokens(2, T)
    got, expected = ours(x), hf(x).logits
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected)


def test_tied_head_is_the_embedding_parameter():
    _, ours = make_pair("llama-tied")
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    keys = expected_keys(ours)
    assert "lm_head.weight" in keys.optional and "lm_head.weight" not in keys.required
    _, untied = make_pair("llama")
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


@pytest.mark.parametrize("arch", ["llama-tied", "qwen2"])
@torch.no_grad()
def test_build_on_meta_then_assign_load(arch):
    hf, _ = make_pair(arch)
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    ours = LlamaForCausalLM.from_config(cfg, device="meta")
    assert ours.lm_head.weight.is_meta
    state = dict(hf.state_dict())
    check_keys(state, expected_keys(ours))
    ours.load_state_dict(state, strict=False, assign=True)
    ours.tie_weights()
    assert not any(p.is_meta for p in ours.parameters())
    if cfg.tie_word_embeddings:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    x = tokens(2, T)
    torch.testing.assert_close(ours.eval()(x), hf(x).logits)


class _Calls(TorchFunctionMode):
    """Records every torch function that reaches it (it is entered outside the code under test)."""

    def __init__(self):
        super().__init__()
        self.funcs = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.funcs.append(func)
        return func(*args, **(kwargs or {}))


def test_building_on_meta_runs_no_initialiser_and_real_devices_still_initialise():
    cfg = ModelConfig.from_hf(hf_config("llama-bias").to_dict() | {"pad_token_id": 0})  # padding row: a fill_
    inits = {torch.nn.init.normal_, torch.nn.init.kaiming_uniform_, torch.nn.init.uniform_, torch.Tensor.fill_}
    with _Calls() as calls:
        meta = LlamaForCausalLM.from_config(cfg, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    assert not inits & set(calls.funcs)
    with _Calls() as calls, torch.device("meta"):
        LlamaForCausalLM(cfg)  # negative control: a plain build on meta does call them (the recorder sees them)
    assert inits <= set(calls.funcs)
    # a real device: the same parameters as the plain constructor under the same seed, and really random
    torch.manual_seed(3)
    built = LlamaForCausalLM.from_config(cfg, device="cpu")
    torch.manual_seed(3)
    plain = LlamaForCausalLM(cfg)
    for (name, a), (_, b) in zip(built.named_parameters(), plain.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert meta.model.embed_tokens.weight.shape == built.model.embed_tokens.weight.shape
    assert built.model.embed_tokens.weight[1:].std() > 0.5 and not built.model.embed_tokens.weight[0].any()


@torch.no_grad()
def test_packed_documents_with_explicit_mask_equal_separate_forwards():
    _, ours = make_pair("qwen3")
    docs = [tokens(1, n, seed=10 + n) for n in (5, 7, 4)]
    packed = torch.cat(docs, dim=1)  # [1, 16]
    doc_id = torch.cat([torch.full((d.shape[1],), i) for i, d in enumerate(docs)])
    allowed = (doc_id[:, None] == doc_id[None, :])[None, None]  # [1, 1, 16, 16], causality is added inside
    positions = torch.cat([torch.arange(d.shape[1]) for d in docs])[None]
    got = ours(packed, attention_mask=allowed, position_ids=positions)
    expected = torch.cat([ours(d) for d in docs], dim=1)
    torch.testing.assert_close(got, expected)
    # negative control: without the document mask the later documents see the earlier ones
    assert not torch.allclose(ours(packed, position_ids=positions), expected, atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "mistral-window", "qwen2-window", "qwen3"])
@torch.no_grad()
def test_kv_cache_incremental_decode_equals_full_forward(arch):
    _, ours = make_pair(arch)
    x = tokens(2, T, seed=6)
    full = ours(x)
    cache = ours.new_kv_cache(batch=2, max_len=T)
    steps = [ours(x[:, :6], kv_cache=cache), ours(x[:, 6:9], kv_cache=cache)]  # prefill, then a chunk
    steps += [ours(x[:, t : t + 1], kv_cache=cache) for t in range(9, T)]  # then one token at a time
    assert cache.length == T
    torch.testing.assert_close(torch.cat(steps, dim=1), full)
    with pytest.raises(ValueError, match="KVCache is full"):
        ours(x[:, :1], kv_cache=cache)


@torch.no_grad()
def test_kv_cache_with_left_padding_equals_full_forward():
    _, ours = make_pair("llama")
    x = tokens(3, T, seed=7)
    mask = padding_mask([10, 7, 4], "left")
    mask = torch.cat([mask, torch.ones(3, T - 10, dtype=torch.long)], dim=1)  # prompts, then 6 generated
    full = ours(x, attention_mask=mask)
    cache = ours.new_kv_cache(batch=3, max_len=T)
    steps = [ours(x[:, :10], attention_mask=mask[:, :10], kv_cache=cache)]
    steps += [ours(x[:, t : t + 1], attention_mask=mask[:, : t + 1], kv_cache=cache) for t in range(10, T)]
    got = torch.cat(steps, dim=1)
    assert torch.isfinite(got).all()
    real = mask.bool()
    torch.testing.assert_close(got[real], full[real])


def lm_loss(model: LlamaForCausalLM, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    logits = model(x, attention_mask=mask)[:, :-1]
    labels = x[:, 1:].clone()
    if mask is not None:
        labels[mask[:, 1:] == 0] = -100
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_gradient_checkpointing_gives_identical_loss_and_gradients(arch):
    _, ours = make_pair(arch)
    ours.train()
    x = tokens(2, T, seed=8)
    mask = padding_mask([T, 10], "left")
    results = []
    for on in (False, True):
        ours.gradient_checkpointing = on
        ours.zero_grad(set_to_none=True)
        loss = lm_loss(ours, x, mask)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in ours.named_parameters()}))
    (loss_off, grads_off), (loss_on, grads_on) = results
    torch.testing.assert_close(loss_on, loss_off)
    assert grads_on.keys() == grads_off.keys()
    for name in grads_off:
        assert torch.isfinite(grads_off[name]).all(), name  # left padding: fully masked rows stay finite
        torch.testing.assert_close(grads_on[name], grads_off[name], msg=name)


def test_gradient_checkpointing_really_recomputes():
    """Negative control for the test above: with checkpointing on, each layer's forward runs twice."""
    _, ours = make_pair("llama")
    ours.train()
    calls = []
    ours.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))  # pre: recompute may stop early
    x = tokens(1, T)
    for on, expected in ((False, 1), (True, 2)):
        calls.clear()
        ours.gradient_checkpointing = on
        lm_loss(ours, x).backward()
        assert len(calls) == expected


def test_bad_masks_are_refused_with_their_shapes():
    _, ours = make_pair("llama")
    x = tokens(2, T)
    with pytest.raises(ValueError, match=r"\[2, 16\]"):
        ours(x, attention_mask=torch.ones(2, T + 1))
    with pytest.raises(ValueError, match="4D attention_mask must be bool"):
        ours(x, attention_mask=torch.ones(2, 1, T, T))


# ------------------------------------------------------------------------- stories260K


def greedy(model, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    cache = model.new_kv_cache(batch=1, max_len=prompt.shape[1] + new_tokens)
    logits = model(prompt, kv_cache=cache)
    out = []
    for _ in range(new_tokens):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(int(nxt))
        logits = model(nxt, kv_cache=cache)
    return out


@torch.no_grad()
def test_stories260k_logits_and_greedy_decode_equal_transformers(stories260k_dir):
    import sentencepiece
    from transformers import LlamaForCausalLM as HFLlama

    cfg = ModelConfig.from_hf(read_config(stories260k_dir))
    ours = LlamaForCausalLM(cfg).eval()
    state = dict(iter_tensors(stories260k_dir))
    check_keys(state, expected_keys(ours), source=str(stories260k_dir))
    load_hf_state(ours, state)
    hf = HFLlama.from_pretrained(stories260k_dir).eval()

    sp = sentencepiece.SentencePieceProcessor(model_file=str(stories260k_dir / "tokenizer.model"))
    prompt = torch.tensor([[cfg.bos_token_id, *sp.encode("Once upon a time")]])
    torch.testing.assert_close(ours(prompt), hf(prompt).logits)

    ids = greedy(ours, prompt, 40)
    expected = hf.generate(prompt, max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ids == expected[0, prompt.shape[1] :].tolist()
    assert len(set(ids)) > 5  # a real continuation, not one token repeated
