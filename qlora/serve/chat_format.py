"""A conversation as the model sees it: messages through the checkpoint's chat template, and the tokens that end
an assistant turn; what `qlora chat` and the server's /v1/chat/completions share.

BOS: a template that writes the BOS token itself (Llama 2's "<s>[INST]") must not get a second one from the
encoder; one that does not (SmolLM2's ChatML) gets BOS only where the tokenizer adds it by default, as
transformers' `apply_chat_template(tokenize=True)` would give the model.

End of turn: chat models close a reply with a token of their own (ChatML's <|im_end|>, Llama 3's <|eot_id|>,
Gemma's <end_of_turn>, Phi-3's <|end|>) that is not always the tokenizer's EOS (Llama 3's EOS is
<|end_of_text|>). A candidate ends a reply when the template itself writes it after each turn, and it is one
token of the vocabulary; EOS always does (the engine stops at it). A template-derived list rather than a
per-model table: a new model whose template closes turns with one of these spellings needs nothing here.
"""

from __future__ import annotations

from collections.abc import Sequence

import jinja2

from qlora.tokenizer import Tokenizer

END_OF_TURN_SPELLINGS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                         "<|end_of_text|>", "</s>")  # fmt: skip


def end_of_turn_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """Token ids that end an assistant reply in `tokenizer`'s chat template (besides EOS); () without one."""
    template = tokenizer.chat_template or ""
    ids = []
    for spelling in END_OF_TURN_SPELLINGS:
        token_id = tokenizer.token_to_id(spelling)
        if spelling in template and token_id is not None and token_id != tokenizer.eos_id:
            ids.append(token_id)
    return tuple(ids)


def render_chat(tokenizer: Tokenizer, messages: Sequence[dict]) -> tuple[str, bool]:
    """The prompt text of `messages` ([{"role", "content"}, ...]) with the assistant's turn opened, and whether
    the encoder should add BOS. ValueError when the tokenizer has no template or the template refuses them."""
    try:
        text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
    except jinja2.TemplateError as e:  # the template's raise_exception ("roles must alternate"), or its sandbox
        raise ValueError(f"the model's chat template refused these messages: {e}") from e
    starts_with_bos = tokenizer.bos_token is not None and text.startswith(tokenizer.bos_token)
    return text, tokenizer.add_bos and tokenizer.bos_id is not None and not starts_with_bos
