"""A compact Llama-family decoder (Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3, SmolLM2, TinyLlama).

What it is. One `nn.Module` tree computing exactly what transformers' `LlamaForCausalLM`,
`MistralForCausalLM`, `Qwen2ForCausalLM` and `Qwen3ForCausalLM` compute (tested: logits equal
at fp32 default tolerances on random tiny configs of each, and on real checkpoints), with the
per-family differences read from `ModelConfig` flags (see `qlora.model.config`).

Why it is shaped so.
- Names are Hugging Face's, module for module (`model.embed_tokens`,
  `model.layers.{i}.self_attn.{q,k,v,o}_proj`, `model.layers.{i}.self_attn.{q,k}_norm`,
  `model.layers.{i}.mlp.{gate,up,down}_proj`, `model.layers.{i}.{input,post_attention}_layernorm`,
  `model.norm`, `lm_head`), so a checkpoint's state dict loads without a name map and a PEFT
  adapter's keys are `base_model.model.<our module name>`.
- It knows nothing about quantization or LoRA. Every projection is a plain `nn.Linear` that the
  forward only *calls* (never reads `.weight`), so a later pass can swap any of them, by module
  name, for a quantized or LoRA module with the same call signature.
- Attention is `F.scaled_dot_product_attention`. With no mask and no cache we pass
  `is_causal=True` (the fused fast path); otherwise we build one boolean mask `[B|1, 1, T, S]`
  (True = may attend) from causality, the optional sliding window, a `[B, S]` padding mask and/or
  an explicit `[B, 1, T, S]` mask (always ANDed with causality: this is a causal LM).
  K/V heads are repeated to the query heads (`expand` + `reshape`) rather than passing
  `enable_gqa`, which keeps every SDPA backend that takes a mask available and works on torch 2.4.
- Fully masked query rows (the padding queries of a left-padded batch) would be a softmax over
  nothing, i.e. NaN. We let such a row attend to every key instead: its output is finite garbage
  at a position no loss or sample ever reads (see Note: Fully masked rows).
- Positions: explicit `position_ids` win. Otherwise, with a 2D padding mask, position = number of
  real tokens before this one (`cumsum(mask) - 1`, clamped at 0 for leading pads), as transformers'
  `generate` does; so a left-padded row gets the same positions, hence the same logits, as the
  unpadded sequence. Without a 2D mask positions are `past + arange(T)`.
- RoPE uses the `rotate_half` layout (first half of a head pairs with the second half), as HF
  checkpoints store q/k rows. The inverse frequencies are computed once in fp32 on the CPU (as
  transformers does) and kept out of the state dict and out of `.to(dtype)`: a bf16 copy of them
  would shift every angle. cos/sin are built per forward in fp32 and cast to the activation dtype.
- RMSNorm follows transformers exactly: normalise in fp32, cast back to the input dtype, then
  multiply by the weight (`weight * x_normed.to(input_dtype)`).
- `model.residual_dtype = torch.float32` holds the residual stream (embeddings, each layer's
  input and output, the checkpointed activations) in fp32 while the layers compute in the
  embeddings' dtype: each norm rounds its fp32 output to that dtype once, and each sublayer's
  output is summed into the stream in fp32. That is what a transformers user fine-tuning a bnb
  4-bit model gets from `prepare_model_for_kbit_training` (fp32 embeddings and norms promote the
  stream), and Dettmers' qlora.py (fp32 norms), without fp32 matmuls. None (the default) keeps the
  stream in the embeddings' dtype.
- Gradient checkpointing: `model.gradient_checkpointing = True` makes each decoder layer run under
  `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)` while training;
  `model.checkpoint_context`, if set, is a context-manager factory entered around both the forward
  and the recompute of each checkpointed layer (the training loop uses it to let LoRA layers keep
  their dense weights from the recompute for the backward). `model.checkpoint_offload`, if set
  (`qlora.model.offload.CheckpointOffload`, CUDA), keeps the checkpointed layer inputs in pinned
  host memory between forward and backward.
- `KVCache` is preallocated per layer (`[B, n_kv, max_len, head_dim]`) and stores keys after RoPE;
  a cached forward takes the 2D padding mask over all `S = past + T` positions, like transformers.

Note: Fully masked rows. A query whose mask row is all False makes softmax divide 0 by 0; some
SDPA backends return NaN, others zeros, and a NaN in a forward becomes NaN gradients through the
whole batch even if the loss ignores that position. `build_attention_mask` ORs every such row with
"all keys" so every backend returns a finite value.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

from qlora.model.config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm, transformers' LlamaRMSNorm semantics (fp32 inside, weight outside)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """`out_dtype`: round the result once more to it (a float32 residual stream feeding bf16 layers)."""
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        y = self.weight * h.to(dtype)
        return y if out_dtype is None else y.to(out_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


def rope_inverse_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """RoPE inverse frequencies `[head_dim / 2]`, fp32, on the CPU, with the config's scaling.

    Plain RoPE: inv_freq[i] = theta ** (-2i / head_dim). "linear" divides them all by `factor`.
    "llama3" (Meta's Llama 3.1 reference `apply_scaling`): with wavelength w = 2*pi / inv_freq and
    the original context L, frequencies with w < L / high_freq_factor are kept, those with
    w > L / low_freq_factor are divided by `factor`, and those between are interpolated:
    s = (L / w - low_freq_factor) / (high_freq_factor - low_freq_factor),
    inv_freq' = (1 - s) * inv_freq / factor + s * inv_freq.
    """
    dim = cfg.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / dim
    inv_freq = 1.0 / (cfg.rope_theta**exponents)
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    if scaling["rope_type"] == "llama3":
        low = float(scaling["low_freq_factor"])
        high = float(scaling["high_freq_factor"])
        context = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        smooth = (context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        scaled = torch.where(wavelen > context / low, inv_freq / factor, smoothed)
        return torch.where(wavelen < context / high, inv_freq, scaled)
    raise ValueError(f"unknown rope_type {scaling['rope_type']!r} (ModelConfig should have refused it)")


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions. Holds no parameters and no state-dict entries."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # Plain attributes, not buffers: never in the state dict, never cast by `.to(dtype)`,
        # real even when the model is built on the meta device.
        self._inv_freq_cpu = rope_inverse_frequencies(cfg)
        self._inv_freq_on: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq_on:
            self._inv_freq_on[device] = self._inv_freq_cpu.to(device)
        return self._inv_freq_on[device]

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq(position_ids.device)
        # [B, T, 1] * [hd/2] -> [B, T, hd/2]; duplicated to [B, T, hd] for the rotate_half layout
        freqs = position_ids[..., None].to(torch.float32) * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dimension (halves of a head)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, hd]; cos/sin: [B|1, T, hd] -> rotated x, same shape."""
    cos, sin = cos[:, None], sin[:, None]  # [B|1, 1, T, hd]
    return x * cos + rotate_half(x) * sin


def build_attention_mask(
    q_len: int,
    kv_len: int,
    *,
    padding_mask: torch.Tensor | None,
    explicit_mask: torch.Tensor | None,
    sliding_window: int | None,
    device: torch.device,
) -> tuple[torch.Tensor | None, bool]:
    """(boolean mask [B|1, 1, T, S] or None, is_causal) for SDPA; queries are the last T of S keys.

    padding_mask: [B, S] bool (True = real token). explicit_mask: [B, 1, T, S] bool (True = may
    attend). A key j may be attended from query i (cache index past + t) when j <= i, and, with a
    window W, j > i - W (transformers' sliding-window rule), and both masks allow it.
    """
    past = kv_len - q_len
    window_bites = sliding_window is not None and sliding_window < kv_len
    if padding_mask is None and explicit_mask is None and not window_bites:
        if q_len == kv_len:
            return None, True
        if q_len == 1:
            return None, False  # one new token sees the whole cache
    q_idx = torch.arange(past, kv_len, device=device)[:, None]  # [T, 1]
    k_idx = torch.arange(kv_len, device=device)[None, :]  # [1, S]
    allowed = k_idx <= q_idx  # [T, S]
    if window_bites:
        allowed = allowed & (k_idx > q_idx - sliding_window)
    allowed = allowed[None, None]  # [1, 1, T, S]
    if padding_mask is not None:
        allowed = allowed & padding_mask[:, None, None, :]  # [B, 1, T, S]
    if explicit_mask is not None:
        allowed = allowed & explicit_mask
    # See Note: Fully masked rows.
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    return allowed, False


class KVCache:
    """Preallocated keys/values (after RoPE) for incremental decoding, one pair per layer.

    `length` is the number of positions already filled. A forward with a cache writes its T new
    positions at `[length, length + T)` in every layer, then advances `length` by T.
    """

    def __init__(
        self,
        num_layers: int,
        batch: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.batch = batch
        self.max_len = max_len
        self.length = 0

    @classmethod
    def over(cls, keys: list[torch.Tensor], values: list[torch.Tensor]) -> KVCache:
        """An empty cache that writes into the given per-layer tensors [B, n_kv, max_len, hd] (e.g. views of
        one slot of a larger cache) instead of allocating its own."""
        cache = cls.__new__(cls)
        cache.keys, cache.values = list(keys), list(values)
        cache.batch, cache.max_len, cache.length = keys[0].shape[0], keys[0].shape[2], 0
        return cache

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, n_kv, T, hd] at the current length; return all keys/values so far [B, n_kv, S, hd]."""
        start, end = self.length, self.length + k.shape[2]
        if k.shape[0] != self.batch:
            raise ValueError(f"KVCache was made for batch {self.batch}, got a batch of {k.shape[0]}")
        if end > self.max_len:
            raise ValueError(
                f"KVCache is full: {start} positions cached + {k.shape[2]} new > max_len {self.max_len}; "
                "make the cache with a larger max_len"
            )
        self.keys[layer_idx][:, :, start:end] = k
        self.values[layer_idx][:, :, start:end] = v
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def keys_after(self, new: int) -> int:
        """How many key positions attention sees once `new` positions are written (S = cached + new)."""
        return self.length + new

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        self.length = 0


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        sliding = cfg.layer_types[layer_idx] == "sliding_attention"
        self.sliding_window = cfg.sliding_window if sliding else None
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_out, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_out, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_out, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q_out, cfg.hidden_size, bias=cfg.o_proj_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.rotary = Rotary()

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        return self.attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), cos, sin, mask, is_causal, kv_cache)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Everything after the q/k/v projections ([B, T, heads * hd] each): norms, RoPE, attention, o_proj.
        Apart from `forward` so a block that computes the projections its own way reuses the rest."""
        B, T, _ = q.shape
        q = q.view(B, T, self.num_heads, self.head_dim)  # [B, T, nh, hd]
        k = k.view(B, T, self.num_kv_heads, self.head_dim)  # [B, T, nkv, hd]
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, hd]
        q, k = self.rotary(q, cos, sin), self.rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # [B, nkv, S, hd]
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            S = k.shape[2]
            # [B, nkv, S, hd] -> [B, nkv, groups, S, hd] -> [B, nh, S, hd]; query head h uses kv head h // groups
            k = k[:, :, None].expand(B, self.num_kv_heads, groups, S, self.head_dim).reshape(B, -1, S, self.head_dim)
            v = v[:, :, None].expand(B, self.num_kv_heads, groups, S, self.head_dim).reshape(B, -1, S, self.head_dim)
        # softmax(q k^T / sqrt(hd) + mask) v: [B, nh, T, hd] @ [B, nh, hd, S] @ [B, nh, S, hd] -> [B, nh, T, hd]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # [B, T, nh*hd]
        return self.o_proj(out)


class SiluMul(nn.Module):
    """silu(gate) * up. A parameter-free module (not inline code) so a fused kernel can replace it by type."""

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.silu(gate) * up


class Rotary(nn.Module):
    """`apply_rotary` as a parameter-free module, so a fused kernel can replace it by type."""

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_rotary(x, cos, sin)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = SiluMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        kv_cache: KVCache | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """`compute_dtype`: what the norms hand the attention and MLP when the residual stream `h` is
        held in another (wider) dtype; the sublayers' outputs are added to `h` in `h`'s dtype."""
        h = h + self.self_attn(self.input_layernorm(h, compute_dtype), cos, sin, mask, is_causal, kv_cache)
        return h + self.mlp(self.post_attention_layernorm(h, compute_dtype))


class LlamaModel(nn.Module):
    """The decoder stack without the vocabulary projection (HF's `model.` prefix)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        pad = cfg.pad_token_id
        padding_idx = pad if isinstance(pad, int) and 0 <= pad < cfg.vocab_size else None
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=padding_idx)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)


# What `nn.Module` constructors call to fill their parameters (nn.init's functions and the tensor methods
# they and `nn.Embedding`'s padding row use); all take the tensor first (positionally or as `tensor=`).
_INITIALISERS = frozenset({
    nn.init.uniform_, nn.init.normal_, nn.init.trunc_normal_, nn.init.constant_, nn.init.ones_, nn.init.zeros_,
    nn.init.eye_, nn.init.dirac_, nn.init.xavier_uniform_, nn.init.xavier_normal_, nn.init.kaiming_uniform_,
    nn.init.kaiming_normal_, nn.init.orthogonal_, nn.init.sparse_,
    torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.fill_, torch.Tensor.zero_,
})  # fmt: skip


class SkipInitOnMeta(TorchFunctionMode):
    """While entered (this thread only), an initialiser called on a meta tensor returns it untouched.

    A meta tensor has no values to fill, yet building a module on meta still runs its `reset_parameters`;
    meta has no `normal_` kernel, so `nn.Embedding`'s init runs torch's Python reference of it, whose first
    call imports torch._dynamo (4 s on a CPU, torch 2.13). Initialisers on real tensors run as usual.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _INITIALISERS:
            target = args[0] if args else kwargs.get("tensor")
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


@contextlib.contextmanager
def _entered_in_turn(factories: list[Callable[[], contextlib.AbstractContextManager]]):
    """One context that makes and enters each factory's context in turn (and leaves them in reverse)."""
    with contextlib.ExitStack() as stack:
        for make in factories:
            stack.enter_context(make())
        yield


class LlamaForCausalLM(nn.Module):
    """Decoder + lm_head. `forward` gives logits [B, T, V]; `hidden_states` gives [B, T, H]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False
        # None: the residual stream is held in the embeddings' dtype (transformers' behaviour);
        # torch.float32: held and summed in fp32 while the layers compute in the embeddings' dtype.
        self.residual_dtype: torch.dtype | None = None
        self.checkpoint_context: Callable[[], contextlib.AbstractContextManager] | None = None
        # A `qlora.model.offload.CheckpointOffload`: the checkpointed layer inputs wait in host memory.
        self.checkpoint_offload = None
        self.tie_weights()

    def _checkpoint_contexts(
        self, layer: int
    ) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """(forward, recompute) contexts for torch.utils.checkpoint of decoder layer `layer`:
        `checkpoint_context` around both, and the offload's recompute context around the recompute.
        Each is made and entered only when torch enters it."""
        forward = [self.checkpoint_context] if self.checkpoint_context is not None else []
        recompute = list(forward)
        if self.checkpoint_offload is not None:
            recompute.append(functools.partial(self.checkpoint_offload.recompute, layer))
        return _entered_in_turn(forward), _entered_in_turn(recompute)

    @classmethod
    def from_config(
        cls, cfg: ModelConfig, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> LlamaForCausalLM:
        """Build on `device` ("meta" allocates nothing: load with `load_state_dict(assign=True)`,
        then call `tie_weights()`), parameters in `dtype` if given.

        On "meta" the initialisers are skipped (`SkipInitOnMeta`): there is nothing to fill, and the first
        meta `normal_` (the embedding's) would import torch._dynamo, seconds of a load. On a real device
        the parameters are initialised as `cls(cfg)` does."""
        on_meta = device is not None and torch.device(device).type == "meta"
        with (
            torch.device(device) if device is not None else contextlib.nullcontext(),
            SkipInitOnMeta() if on_meta else contextlib.nullcontext(),
        ):
            model = cls(cfg)
        if dtype is not None:
            model.to(dtype)
        return model

    def tie_weights(self) -> None:
        """Make lm_head.weight the embedding's Parameter (when tied). Call again after assign-loading."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def new_kv_cache(
        self,
        batch: int,
        max_len: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """An empty cache for `batch` sequences of up to `max_len` positions (default: embedding's dtype/device)."""
        weight = self.model.embed_tokens.weight
        cfg = self.config
        return KVCache(
            cfg.num_hidden_layers,
            batch,
            cfg.num_key_value_heads,
            max_len,
            cfg.head_dim,
            dtype=dtype or weight.dtype,
            device=device or weight.device,
        )

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final-norm output [B, T, H] (before lm_head).

        attention_mask: None; [B, S] with 1 = real token, 0 = padding (left or right), where
        S = cached positions + T; or bool [B, 1, T, S] with True = may attend (ANDed with causality).
        position_ids: [B, T] or [1, T]; default derived as described in the module docstring.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        S = kv_cache.keys_after(T) if kv_cache is not None else T  # a static cache: all its positions
        past = S - T
        device = input_ids.device

        padding_mask = explicit_mask = None
        if attention_mask is not None:
            if attention_mask.dim() == 2:
                if tuple(attention_mask.shape) != (B, S):
                    raise ValueError(
                        f"2D attention_mask must be [batch, cached + new] = [{B}, {S}], "
                        f"got {tuple(attention_mask.shape)}"
                    )
                padding_mask = attention_mask.to(torch.bool)
            elif attention_mask.dim() == 4:
                if tuple(attention_mask.shape) != (B, 1, T, S) or attention_mask.dtype != torch.bool:
                    raise ValueError(
                        f"4D attention_mask must be bool [batch, 1, new, cached + new] = [{B}, 1, {T}, {S}], "
                        f"got {attention_mask.dtype} {tuple(attention_mask.shape)}"
                    )
                explicit_mask = attention_mask
            else:
                raise ValueError(
                    f"attention_mask must be [batch, seq] (padding) or bool [batch, 1, seq, seq], "
                    f"got shape {tuple(attention_mask.shape)}"
                )

        if position_ids is None:
            if padding_mask is not None:
                # real tokens count from 0 whatever padding precedes them; pads get 0 or a repeat
                position_ids = (padding_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # [B, T]
            else:
                position_ids = torch.arange(past, S, device=device)[None]  # [1, T]
        if padding_mask is not None and bool(padding_mask.all()):
            padding_mask = None  # nothing padded: keep the is_causal fast path

        h = self.model.embed_tokens(input_ids)  # [B, T, H]
        cos, sin = self.model.rotary_emb(position_ids, h.dtype)  # [B|1, T, hd]
        compute_dtype = None  # the norms keep transformers' output dtype
        if self.residual_dtype is not None and self.residual_dtype != h.dtype:
            compute_dtype, h = h.dtype, h.to(self.residual_dtype)
        masks = {
            window: build_attention_mask(
                T, S, padding_mask=padding_mask, explicit_mask=explicit_mask, sliding_window=window, device=device
            )
            for window in {layer.self_attn.sliding_window for layer in self.model.layers}
        }
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and kv_cache is None
        offload = self.checkpoint_offload if use_checkpoint else None  # made only on CUDA (prepare_for_training)
        if offload is not None:
            offload.start_forward()
        last = len(self.model.layers) - 1
        for i, layer in enumerate(self.model.layers):
            mask, is_causal = masks[layer.self_attn.sliding_window]
            if use_checkpoint:
                h_in = h
                h = checkpoint(layer, h, cos, sin, mask, is_causal, None, compute_dtype, use_reentrant=False,
                               context_fn=functools.partial(self._checkpoint_contexts, i))  # fmt: skip
                if offload is not None and i != last:  # backward needs the last input first: it stays
                    offload.offload(i, h_in)
            else:
                h = layer(h, cos, sin, mask, is_causal, kv_cache, compute_dtype)
        if offload is not None:
            offload.finish_forward()
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.model.norm(h, compute_dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] (see `hidden_states` for the arguments)."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids, kv_cache))
