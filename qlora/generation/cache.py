"""`SlotKVCache`: one static key/value cache for a batch of independent sequences, each at its own position.

Continuous batching needs sequences that started at different times to decode together: slot b holds one
request's keys and values after RoPE, `positions[b]` is where its next token goes. A decode forward writes
every slot's new key at that slot's position (one indexed store per layer) and attends over all `max_len`
positions through a mask that allows keys 0..positions[b]. Every shape is fixed, so the decode step is one
CUDA graph whatever the slots hold. A prompt is prefilled into its slot through `slot(b)`, a `KVCache`
over views of that slot, with the ordinary causal path (`qlora.model.llama`). Slots without a request keep
decoding garbage at position 0 of their own rows: nothing reads it.
"""

from __future__ import annotations

import torch

from qlora.model.llama import KVCache


class SlotKVCache:
    """Keys/values [slots, n_kv, max_len, hd] per layer and each slot's next position (see the module doc)."""

    def __init__(self, num_layers: int, slots: int, num_kv_heads: int, max_len: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device | str) -> None:  # fmt: skip
        shape = (slots, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.slots, self.max_len = slots, max_len
        self.positions = torch.zeros(slots, dtype=torch.int64, device=device)  # the next position of each slot
        self._rows = torch.arange(slots, device=device)
        self._key_index = torch.arange(max_len, device=device)

    @classmethod
    def for_model(cls, model, slots: int, max_len: int) -> SlotKVCache:
        """A cache for `model` (a `LlamaForCausalLM`) in its embeddings' dtype and device."""
        cfg, weight = model.config, model.model.embed_tokens.weight
        return cls(cfg.num_hidden_layers, slots, cfg.num_key_value_heads, max_len, cfg.head_dim, dtype=weight.dtype,
                   device=weight.device)  # fmt: skip

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def slot(self, index: int) -> KVCache:
        """An empty `KVCache` over slot `index`'s rows, for prefilling a prompt there (then `set_position`)."""
        return KVCache.over([k[index : index + 1] for k in self.keys], [v[index : index + 1] for v in self.values])

    def set_position(self, index: int, position: int) -> None:
        self.positions[index] = position

    # --- the decode step's cache protocol (`LlamaForCausalLM.hidden_states`) ---------------------------------
    def keys_after(self, new: int) -> int:
        if new != 1:
            raise ValueError(f"a SlotKVCache decodes one token per slot at a time, got {new}")
        return self.max_len

    def decode_mask(self) -> torch.Tensor:
        """bool [slots, 1, 1, max_len]: slot b's new token attends to keys 0..positions[b]."""
        return (self._key_index[None, :] <= self.positions[:, None])[:, None, None, :]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [slots, n_kv, 1, hd] at each slot's position; return the whole layer [slots, n_kv, max_len, hd]."""
        self.keys[layer_idx][self._rows, :, self.positions] = k[:, :, 0]
        self.values[layer_idx][self._rows, :, self.positions] = v[:, :, 0]
        return self.keys[layer_idx], self.values[layer_idx]

    def advance(self, n: int) -> None:
        # a slot without a request stays in range (its position is reset when a request takes it)
        self.positions.add_(n).clamp_(max=self.max_len - 1)
