"""Text generation with a KV cache: greedy or sampled (temperature, top-p), chat template aware.

Used by `qlora generate` (`generate_from_config`: a `GenerateConfig` in, texts out), by the demo's
accuracy check, and by benchmark-prompt generation.
Prompts are encoded one at a time and decoded together, left-padded, so a batch needs one prefill
and one cached forward per new token. Generation stops at EOS (the tokenizer's, plus any extra
ids the caller gives, e.g. a chat model's end-of-turn token) or after `max_new_tokens`.
"""

from __future__ import annotations

import dataclasses

import torch

from qlora.config import GenerateConfig
from qlora.loading import load
from qlora.tokenizer import Tokenizer


def render_prompt(tokenizer: Tokenizer, prompt: str, use_chat_template: bool | None = None) -> str:
    """The text the model sees: the chat template around a user turn when the tokenizer has one."""
    if use_chat_template is None:
        use_chat_template = tokenizer.chat_template is not None
    if use_chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return prompt


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [B, V]
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    tokenizer: Tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    add_bos: bool | None = None,
    stop_ids: tuple[int, ...] = (),
    seed: int | None = None,
) -> list[str]:
    """Continue each prompt (already rendered; see `render_prompt`); return only the new text."""
    was_training = model.training
    model.eval()
    device = model.model.embed_tokens.weight.device
    add_bos = tokenizer.add_bos if add_bos is None else add_bos
    encoded = [tokenizer.encode(p, add_bos=add_bos and tokenizer.bos_id is not None) for p in prompts]
    width = max(len(e) for e in encoded)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width + max_new_tokens), dtype=torch.long)
    for row, e in enumerate(encoded):  # left padding: every prompt ends at the same column
        ids[row, width - len(e) :] = torch.tensor(e)
        mask[row, width - len(e) : width] = 1
    ids, mask = ids.to(device), mask.to(device)
    stops = torch.tensor(sorted({*stop_ids, *([tokenizer.eos_id] if tokenizer.eos_id is not None else [])}),
                         device=device)  # fmt: skip
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    cache = model.new_kv_cache(len(prompts), width + max_new_tokens)
    logits = model(ids, attention_mask=mask[:, :width], kv_cache=cache)[:, -1]  # prefill
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    new_tokens = []
    for t in range(max_new_tokens):
        token = _sample(logits, temperature, top_p, generator)
        token = torch.where(done, torch.full_like(token, pad), token)
        new_tokens.append(token)
        done |= torch.isin(token, stops)
        if bool(done.all()):
            break
        mask[:, width + t] = 1
        logits = model(token[:, None], attention_mask=mask[:, : width + t + 1], kv_cache=cache)[:, -1]
    model.train(was_training)
    out = torch.stack(new_tokens, dim=1).tolist() if new_tokens else [[] for _ in prompts]
    texts = []
    for row in out:
        kept = []
        for tok in row:
            if tok in stops.tolist():
                break
            kept.append(tok)
        texts.append(tokenizer.decode(kept))
    return texts


def generate_from_config(cfg: GenerateConfig) -> list[str]:
    """`qlora generate`: load `cfg.model` (`qlora.loading.load`), answer each of `cfg.prompt` in one batch."""
    loaded = load(**dataclasses.asdict(cfg.model))
    prompts = [render_prompt(loaded.tokenizer, text, use_chat_template=None if cfg.chat_template else False)
               for text in cfg.prompt]  # fmt: skip
    s = cfg.sampling
    return generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens=s.max_new_tokens,
                    temperature=s.temperature, top_p=s.top_p, seed=s.seed)  # fmt: skip
