"""OpenAssistant (OASST1) message trees -> Guanaco conversations, and the Guanaco `text` format.

OASST1 ships every message as a row (`message_id`, `parent_id`, `role` "prompter"/"assistant",
`text`, `lang`, `rank`, ...; the `*.messages.jsonl` export and the Hub's parquet) or as nested trees
(`*.trees.jsonl`: `{"prompt": {message..., "replies": [message..., "replies": [...]]}}`). Guanaco
(timdettmers/openassistant-guanaco) is one thread per tree: from the root prompt, follow at each
turn the best-ranked reply (rank 0 is the best; a reply without a rank comes after ranked ones,
ties keep file order), stop where the thread has no reply, drop a trailing unanswered prompt, and
write the turns as

    ### Human: {prompt}### Assistant: {reply}### Human: {prompt}### Assistant: {reply}

(no separator between a turn's text and the next marker; this is the spacing of the Guanaco
inference prompt, `examples/guanaco_generate.py`, format-spec 5.3, whose note says the dataset's
own spacing is unverified). As in QLoRA's `oasst1` branch, the source is empty (BOS alone) and the
whole conversation is the target. `languages` keeps threads whose root prompt has one of the given
`lang` codes (None: all). Deleted messages (`deleted: true`) and their subtrees are skipped.

Errors are located: a duplicated `message_id`, a `parent_id` that names no message of the file, a
root that is not a prompter message, a wrong `role`, blank `text`, a `rank` that is not an integer
all name the line of the message. A message tree file is read whole (threads need every message),
so the records arrive together, not one at a time: this format encodes a *file*, not a record.

`guanaco` is the already-flattened form: `{"text": "### Human: ...### Assistant: ..."}`, source
empty, target the text (QLoRA's `oasst1` = `timdettmers/openassistant-guanaco`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from qlora.data.alpaca import SourceRecord, _describe, require_text

HUMAN = "### Human: "
ASSISTANT = "### Assistant: "
ROLES = ("prompter", "assistant")


@dataclass(frozen=True)
class Message:
    message_id: str
    parent_id: str | None
    role: str
    text: str
    lang: str
    rank: int | None
    order: int  # position in the file: the tie-break between equal ranks
    record: SourceRecord


def matches_oasst(value: Any) -> bool:
    if not isinstance(value, dict):
        return False
    if isinstance(value.get("prompt"), dict) and "message_id" in value["prompt"]:
        return True
    return {"message_id", "parent_id", "role", "text"} <= set(value)


def matches_guanaco(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("text"), str) and value["text"].lstrip().startswith("###")


def validate_guanaco(record: SourceRecord) -> dict[str, str]:
    value = record.value
    if not isinstance(value, dict):
        raise record.error(f"a record must be a JSON object with 'text' (got {_describe(value)})")
    text = require_text(record, value, "text")
    if HUMAN.strip() not in text or ASSISTANT.strip() not in text:
        raise record.error("field 'text' must hold a '### Human: ...### Assistant: ...' conversation", "text")
    return {"text": text}


def format_guanaco(record: dict) -> tuple[str, str]:
    return "", record["text"]


def _rank(record: SourceRecord, value: Any) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, float) and math.isnan(value):
        return None  # pandas/parquet exports write a missing rank as NaN
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise record.error(f"field 'rank' must be an integer or null (got {value!r})", "rank") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise record.error(f"field 'rank' must be an integer or null (got {_describe(value)})", "rank")
    return int(value)


def _message(record: SourceRecord, value: Any, parent_id: str | None, order: int) -> Message:
    if not isinstance(value, dict):
        raise record.error(f"an OASST message must be a JSON object (got {_describe(value)})")
    message_id = require_text(record, value, "message_id")
    role = require_text(record, value, "role")
    if role not in ROLES:
        raise record.error(f"field 'role' must be 'prompter' or 'assistant' (got {role!r})", "role")
    text = require_text(record, value, "text")
    lang = value.get("lang") or ""
    if not isinstance(lang, str):
        raise record.error(f"field 'lang' must be a string (got {_describe(lang)})", "lang")
    return Message(message_id, parent_id, role, text, lang, _rank(record, value.get("rank")), order, record)


def read_messages(records: list[SourceRecord]) -> list[Message]:
    """Every non-deleted message of the records (flat rows or nested trees), validated and located.

    Replies to a deleted message are dropped with it (a subtree of a nested tree is never read)."""
    messages: list[Message] = []
    deleted: set[str] = set()

    def add_tree(record: SourceRecord, node: Any, parent_id: str | None) -> None:
        if isinstance(node, dict) and node.get("deleted") is True:
            return
        message = _message(record, node, parent_id, len(messages))
        messages.append(message)
        replies = node.get("replies") or []
        if not isinstance(replies, list):
            raise record.error(f"field 'replies' must be a list (got {_describe(replies)})", "replies")
        for reply in replies:
            add_tree(record, reply, message.message_id)

    for record in records:
        value = record.value
        if isinstance(value, dict) and isinstance(value.get("prompt"), dict):
            add_tree(record, value["prompt"], None)
            continue
        if not isinstance(value, dict):
            raise record.error(f"an OASST message must be a JSON object (got {_describe(value)})")
        if value.get("deleted") is True or value.get("deleted") == "True":
            if isinstance(value.get("message_id"), str):
                deleted.add(value["message_id"])
            continue
        if "parent_id" not in value:
            raise record.error("missing field 'parent_id' (null for a root prompt)", "parent_id")
        parent = value["parent_id"]
        if parent == "":
            parent = None  # CSV writes null as an empty cell
        if parent is not None and not isinstance(parent, str):
            raise record.error(f"field 'parent_id' must be a string or null (got {_describe(parent)})", "parent_id")
        messages.append(_message(record, value, parent, len(messages)))
    while dropped := [m for m in messages if m.parent_id in deleted and m.message_id not in deleted]:
        deleted.update(m.message_id for m in dropped)
    return [m for m in messages if m.message_id not in deleted]


def build_threads(messages: list[Message], languages: set[str] | None = None) -> list[list[Message]]:
    """One Guanaco thread per root prompt (see the module docstring), in file order of the roots."""
    by_id: dict[str, Message] = {}
    for message in messages:
        if message.message_id in by_id:
            first = by_id[message.message_id].record.line
            raise message.record.error(
                f"duplicate message_id {message.message_id!r} (first seen at line {first})", "message_id"
            )
        by_id[message.message_id] = message
    children: dict[str, list[Message]] = {}
    roots = []
    for message in messages:
        if message.parent_id is None:
            if message.role != "prompter":
                raise message.record.error("a root message (parent_id null) must have role 'prompter'", "role")
            roots.append(message)
        elif message.parent_id not in by_id:
            raise message.record.error(f"parent_id {message.parent_id!r} names no message of this file", "parent_id")
        else:
            children.setdefault(message.parent_id, []).append(message)
    threads = []
    for root in roots:
        if languages is not None and root.lang not in languages:
            continue
        thread = [root]
        while replies := children.get(thread[-1].message_id):
            thread.append(min(replies, key=lambda m: (m.rank is None, m.rank or 0, m.order)))
        while thread and thread[-1].role != "assistant":
            thread.pop()
        if thread:
            threads.append(thread)
    return threads


def render_thread(thread: list[Message]) -> str:
    """The Guanaco text of a thread."""
    return "".join((HUMAN if m.role == "prompter" else ASSISTANT) + m.text for m in thread)
