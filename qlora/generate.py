"""Text generation with a KV cache: greedy or sampled (temperature, top-p), chat template aware.

Used by `qlora generate` (`generate_from_config`: a `GenerateConfig` in, texts out), by the demo's
accuracy check, and by benchmark-prompt generation. A list of prompts in, their new texts out, through the
generation engine (`qlora.generation`: one batch, a static cache, the decode step as a CUDA graph on GPUs).
Generation stops at EOS (the tokenizer's, plus any extra ids the caller gives, e.g. a chat model's
end-of-turn token) or after `max_new_tokens`.
"""

from __future__ import annotations

import dataclasses

import torch

from qlora.config import GenerateConfig
from qlora.generation import Engine, SamplingParams
from qlora.loading import load
from qlora.tokenizer import Tokenizer

MAX_SLOTS = 64  # sequences decoded together; more prompts wait for a free slot


def render_prompt(tokenizer: Tokenizer, prompt: str, use_chat_template: bool | None = None) -> str:
    """The text the model sees: the chat template around a user turn when the tokenizer has one."""
    if use_chat_template is None:
        use_chat_template = tokenizer.chat_template is not None
    if use_chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return prompt


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
    """Continue each prompt (already rendered; see `render_prompt`); return only the new text.

    Through the generation engine (`qlora.generation.Engine`: every prompt in one batch, a static cache);
    prompt i samples with seed `seed + i` (seed None: 0), so its text does not depend on the others'."""
    if not prompts:
        return []
    was_training = model.training
    add_bos = tokenizer.add_bos if add_bos is None else add_bos
    encoded = [tokenizer.encode(p, add_bos=add_bos and tokenizer.bos_id is not None) for p in prompts]
    longest = max(len(e) for e in encoded)
    engine = Engine(model, tokenizer, slots=min(len(prompts), MAX_SLOTS), max_len=longest + max_new_tokens,
                    stop_token_ids=tuple(stop_ids))  # fmt: skip
    base = seed or 0
    requests = [engine.submit(ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                                  top_p=top_p, seed=base + i))
                for i, ids in enumerate(encoded)]  # fmt: skip
    engine.run_until_idle()
    engine.close()
    model.train(was_training)
    return [r.completion().text for r in requests]


def generate_from_config(cfg: GenerateConfig) -> list[str]:
    """`qlora generate`: load `cfg.model` (`qlora.loading.load`), answer each of `cfg.prompt` in one batch."""
    loaded = load(**dataclasses.asdict(cfg.model))
    prompts = [render_prompt(loaded.tokenizer, text, use_chat_template=None if cfg.chat_template else False)
               for text in cfg.prompt]  # fmt: skip
    s = cfg.sampling
    return generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens=s.max_new_tokens,
                    temperature=s.temperature, top_p=s.top_p, seed=s.seed)  # fmt: skip
