"""Chat conversations (`{"messages": [{"role", "content"}, ...]}`) rendered with the model's own
chat template, with the loss on every assistant turn and on nothing else.

Why render once and locate spans, rather than tokenize turn by turn: the template decides the
exact text between turns (role headers, separators, a default system prompt, BOS), and tokenizing
pieces separately can split differently at the seams than tokenizing the whole; the model at
inference sees the whole rendering. So:

1. `full` = the template's rendering of the whole conversation (`add_generation_prompt=False`).
2. For each assistant message i: `before` = rendering of messages[:i] with the generation prompt
   (everything up to where the reply text starts), `through` = rendering of messages[:i+1]. The
   reply's span in `full` is [len(before), len(through.rstrip())): its content and whatever the
   template closes the turn with (SmolLM2's "<|im_end|>", Llama 2's "</s>"), without the trailing
   whitespace separating it from the next turn. Both renderings must be prefixes of `full`; a
   template for which they are not (one that rewrites earlier turns depending on later ones) is
   refused with a `DataError`, as is one that fails to render (a jinja error or `raise_exception`,
   e.g. a template that forbids a system message), naming the line.
3. `full` is tokenized once (no special tokens added: the template writes BOS if the model wants
   one, as transformers' `apply_chat_template(tokenize=True)` does) with character offsets; a token
   is trained iff it overlaps an assistant span. With `train_on_source` every token is trained.

The end-of-turn token of each assistant reply is inside its span, so it is trained (the model
learns to stop). If the template closes a reply with nothing (a template without an end-of-turn
token) and the reply ends the rendering, EOS is appended and trained. Truncation keeps the first
`max_len` tokens (`max_source_len + max_target_len`); an example whose labels are then all masked
is an error, never a silent row of -100.

Roles: "system", "user", "assistant" (and "tool", masked); `content` a non-empty string (a system
message may be empty); at least one assistant message. Offsets come from the `tokenizers` backend
of `qlora.tokenizer.Tokenizer` (`_backend`: the wrapper has no public offsets call yet).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qlora.data.alpaca import SourceRecord, _describe
from qlora.data.encode import IGNORE_INDEX, EncodedExample
from qlora.data.errors import DataError

if TYPE_CHECKING:
    from qlora.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")


def matches_chat(value: Any) -> bool:
    return isinstance(value, dict) and "messages" in value


def validate_chat(record: SourceRecord) -> dict[str, list[dict[str, str]]]:
    """The record as {"messages": [{"role", "content"}, ...]}, or a located `DataError`."""
    value = record.value
    if not isinstance(value, dict) or "messages" not in value:
        raise record.error(f"a record must be a JSON object with 'messages' (got {_describe(value)})", "messages")
    messages = value["messages"]
    if not isinstance(messages, list) or not messages:
        raise record.error(f"field 'messages' must be a non-empty list (got {_describe(messages)})", "messages")
    clean = []
    for n, message in enumerate(messages):
        if not isinstance(message, dict):
            raise record.error(f"message {n} must be an object with 'role' and 'content'", "messages")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise record.error(f"message {n}: 'role' must be one of {list(ROLES)} (got {role!r})", "role")
        if not isinstance(content, str) or (role != "system" and not content.strip()):
            got = _describe(content)
            raise record.error(f"message {n}: 'content' must be a non-empty string (got {got})", "content")
        clean.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in clean):
        raise record.error("the conversation has no assistant message, so nothing would be trained", "messages")
    return {"messages": clean}


def _render(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except DataError:
        raise
    except Exception as err:  # jinja2 errors, raise_exception(), a tokenizer without a template
        raise DataError(
            None,
            None,
            f"the chat template of {tokenizer.source or 'the tokenizer'} cannot render this conversation: {err}",
            field="messages",
            hint="Use a model whose chat template accepts these roles, or another data format.",
        ) from None


def assistant_spans(tokenizer: Tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(full rendering, character spans of the assistant turns in it); see the module docstring."""
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(through) and through.startswith(before)):
            raise DataError(
                None,
                None,
                f"the chat template of {tokenizer.source or 'the tokenizer'} does not render conversations "
                f"prefix by prefix (assistant message {i}), so its turns cannot be located",
                field="messages",
                hint="Use a template that renders earlier turns the same whatever follows them.",
            )
        start, end = len(before), len(through.rstrip())
        if end <= start:
            raise DataError(None, None, f"assistant message {i} renders to no text", field="messages")
        spans.append((start, end))
    return full, spans


def encode_chat(
    tokenizer: Tokenizer, messages: list[dict], *, max_len: int, train_on_source: bool = False
) -> EncodedExample:
    """One conversation -> input ids and labels (assistant turns trained, everything else masked)."""
    if tokenizer.eos_id is None:
        raise ValueError(f"{tokenizer.source}: the tokenizer has no EOS token; replies must end in one")
    full, spans = assistant_spans(tokenizer, messages)
    encoding = tokenizer._backend.encode(full, add_special_tokens=False)
    ids, offsets = list(encoding.ids), list(encoding.offsets)
    trained = [train_on_source or any(s < end and e > start for start, end in spans) for s, e in offsets]
    if full[spans[-1][1] :].strip() == "" and (not ids or ids[-1] != tokenizer.eos_id):
        last = max(i for i, t in enumerate(trained) if t) if any(trained) else len(ids) - 1
        if ids[last] != tokenizer.eos_id:  # the template closes the reply with nothing: add EOS
            ids.insert(last + 1, tokenizer.eos_id)
            trained.insert(last + 1, True)
    truncated = len(ids) > max_len
    ids, trained = ids[:max_len], trained[:max_len]
    labels = [token if keep else IGNORE_INDEX for token, keep in zip(ids, trained, strict=True)]
    if all(label == IGNORE_INDEX for label in labels):
        raise DataError(
            None,
            None,
            f"after truncation to {max_len} tokens no assistant token is left to train on",
            field="messages",
            hint="Raise the length limits or shorten the conversation.",
        )
    return EncodedExample(ids, labels, truncated)
