"""The OpenAI API as this server speaks it: request bodies checked into what the engine runs, and the response
and stream-chunk shapes the official clients read.

Requests are checked strictly, each problem a 400 whose message and `param` name the field: a field this
server does not know is refused rather than ignored (a typo such as `max_token` would otherwise run with a
default), and so is a known feature it does not implement when it is asked for (`n` > 1, `logprobs`, `echo`,
`best_of`, `suffix`, penalties other than `repetition_penalty`, `logit_bias`, tools, a non-text
`response_format`); the feature's "off" value (`n: 1`, `echo: false`, `logprobs: null`) is accepted, since
clients send them. Bookkeeping fields (`user`, `metadata`, `store`, `service_tier`) are accepted and unused.

Defaults are OpenAI's: temperature 1, top_p 1, `max_tokens` 16 for /v1/completions and as many as fit for
/v1/chat/completions. Without a `seed` each request draws one (as OpenAI's sampling is not reproducible
without one); a given seed is reduced modulo 2^63 (the engine's range), so any 64-bit seed is accepted.
Extensions: `top_k` (0 or -1: off) and `repetition_penalty` (transformers' rule).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any

from qlora.generation import Completion, SamplingParams

FINISH_REASONS = {"stop": "stop", "length": "length"}  # the engine's reasons a client may see
COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream", "stream_options",
                 "n", "repetition_penalty", "frequency_penalty", "presence_penalty", "logit_bias", "logprobs",
                 "user", "metadata", "store", "service_tier"}  # fmt: skip
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                               "functions", "function_call", "response_format", "parallel_tool_calls"}  # fmt: skip
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


class ApiError(Exception):
    """A request that cannot be served: its HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Generation:
    """What one HTTP request asks of the engine: one prompt per choice, the sampling, how to answer."""

    model: str
    prompts: list[str | list[int]]
    params: SamplingParams
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the token counts
    add_bos: bool | None  # None: as the tokenizer adds it (a raw completion prompt)


def bad(param: str | None, message: str) -> ApiError:
    return ApiError(400, message, param=param)


# --- request fields -------------------------------------------------------------------------------------------
def _refuse_unknown(body: dict, known: set[str], endpoint: str) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise bad(unknown[0], f"unrecognized request field {unknown[0]!r} for {endpoint} (known: "
                  f"{', '.join(sorted(known))})")  # fmt: skip


def _refuse_unless_off(body: dict, field: str, off: tuple, why: str) -> None:
    if field in body and not any(body[field] is v or (type(body[field]) is type(v) and body[field] == v)
                                 for v in off):  # fmt: skip
        raise bad(field, f"{field}={body[field]!r} is not supported by this server: {why}")


def _integer(body: dict, field: str, default: int | None, minimum: int) -> int | None:
    value = body.get(field)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise bad(field, f"{field} must be an integer >= {minimum}, got {value!r}")
    return value


def _number(body: dict, field: str, default: float, ok, must: str) -> float:
    value = body.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or not ok(value):
        raise bad(field, f"{field} must be {must}, got {value!r}")
    return float(value)


def _bool(body: dict, field: str) -> bool:
    value = body.get(field, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(field, f"{field} must be true or false, got {value!r}")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise bad("stop", f"stop must be a non-empty string or a list of them, got {value!r}")
    return tuple(items)


def _include_usage(body: dict, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise bad("stream_options", "stream_options is only allowed with stream: true")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise bad("stream_options", f"stream_options must be {{\"include_usage\": bool}}, got {options!r}")
    return _bool(options, "include_usage")


def sampling(body: dict, *, default_max_tokens: int, max_tokens_field: str = "max_tokens",
             stop_token_ids: tuple[int, ...] = ()) -> SamplingParams:  # fmt: skip
    """The engine's `SamplingParams` from the body's sampling fields (each checked, naming the field)."""
    _refuse_unless_off(body, "n", (1,), "it returns one choice per prompt (send n requests, or several prompts)")
    for field in ("frequency_penalty", "presence_penalty"):
        _refuse_unless_off(body, field, (0, 0.0), "use repetition_penalty (> 1 discourages repeated tokens)")
    _refuse_unless_off(body, "logit_bias", ({},), "logit biases are not implemented")
    top_k = _integer(body, "top_k", 0, -1)
    seed = _integer(body, "seed", None, -(2**63))
    try:
        return SamplingParams(
            max_new_tokens=_integer(body, max_tokens_field, default_max_tokens, 1),
            temperature=_number(body, "temperature", 1.0, lambda v: v >= 0, "a number >= 0"),
            top_p=_number(body, "top_p", 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]"),
            top_k=max(top_k, 0),
            repetition_penalty=_number(body, "repetition_penalty", 1.0, lambda v: v > 0, "a number > 0"),
            stop=_stop(body),
            stop_token_ids=stop_token_ids,
            seed=secrets.randbelow(2**63) if seed is None else seed % 2**63,
        )
    except ValueError as e:  # SamplingParams' own checks (the fields above are already checked)
        raise bad(None, str(e)) from e


def _model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", f"model is required: the name of a served model (GET /v1/models), got {model!r}")
    return model


def parse_completion(body: dict) -> Generation:
    """POST /v1/completions: `prompt` a string, a list of strings, token ids, or a list of token-id lists."""
    _refuse_unknown(body, COMPLETION_FIELDS, "/v1/completions")
    model = _model(body)
    _refuse_unless_off(body, "logprobs", (None,), "log probabilities are not returned")
    _refuse_unless_off(body, "echo", (False,), "the prompt is not echoed")
    _refuse_unless_off(body, "best_of", (1,), "it returns one choice per prompt")
    _refuse_unless_off(body, "suffix", (None, ""), "insertion (a suffix) is not implemented")
    stream = _bool(body, "stream")
    return Generation(model, _prompts(body.get("prompt")), sampling(body, default_max_tokens=16), stream,
                      _include_usage(body, stream), None)  # fmt: skip


def _prompts(prompt: Any) -> list[str | list[int]]:
    def ids(v):
        return isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v)

    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if ids(prompt):
            return [list(prompt)]
        if all(ids(p) for p in prompt):
            return [list(p) for p in prompt]
    raise bad("prompt", "prompt is required: a string, a list of strings, a list of token ids or a list of such "
              f"lists (none empty), got {_short(prompt)}")  # fmt: skip


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def parse_chat(body: dict) -> tuple[Generation, list[dict]]:
    """POST /v1/chat/completions: the request (its prompt still to render) and its checked messages."""
    _refuse_unknown(body, CHAT_FIELDS, "/v1/chat/completions")
    model = _model(body)
    _refuse_unless_off(body, "logprobs", (None, False), "log probabilities are not returned")
    _refuse_unless_off(body, "top_logprobs", (None, 0), "log probabilities are not returned")
    for field in ("tools", "functions"):
        _refuse_unless_off(body, field, (None, []), "tool and function calls are not implemented")
    for field in ("tool_choice", "function_call"):
        _refuse_unless_off(body, field, (None, "none"), "tool and function calls are not implemented")
    _refuse_unless_off(body, "response_format", (None, {"type": "text"}), "only text responses are implemented")
    if "max_tokens" in body and "max_completion_tokens" in body:
        raise bad("max_completion_tokens", "give max_tokens or max_completion_tokens, not both")
    field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    stream = _bool(body, "stream")
    messages = _messages(body.get("messages"))
    params = sampling(body, default_max_tokens=2**31 - 1, max_tokens_field=field)  # "as many as fit": the cache
    return Generation(model, [], params, stream, _include_usage(body, stream), None), messages


def _messages(messages: Any) -> list[dict]:
    if messages is None:
        raise bad("messages", "messages is required: a list of {\"role\", \"content\"} objects")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", f"messages must be a non-empty list of {{\"role\", \"content\"}} objects, got "
                  f"{_short(messages)}")  # fmt: skip
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, f"{where} must be an object with role and content, got {_short(m)}")
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role", f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}")
        out.append({"role": ROLES[role], "content": _content(m.get("content"), f"{where}.content")})
    return out


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):  # fmt: skip
        return "\n".join(p["text"] for p in content)
    raise bad(where, f"{where} must be a string or a list of {{\"type\": \"text\", \"text\": ...}} parts "
              f"(text only), got {_short(content)}")  # fmt: skip


# --- responses ------------------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def usage_of(completions: list[Completion]) -> dict:
    return usage(sum(c.prompt_tokens for c in completions), sum(len(c.token_ids) for c in completions))


def completion_body(rid: str, created: int, model: str, completions: list[Completion]) -> dict:
    choices = [{"index": i, "text": c.text, "logprobs": None, "finish_reason": FINISH_REASONS[c.finish_reason]}
               for i, c in enumerate(completions)]  # fmt: skip
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": usage_of(completions)}  # fmt: skip


def completion_chunk(rid: str, created: int, model: str, index: int, text: str, finish: str | None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}  # fmt: skip


def chat_body(rid: str, created: int, model: str, completion: Completion) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": completion.text}, "logprobs": None,
              "finish_reason": FINISH_REASONS[completion.finish_reason]}  # fmt: skip
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": [choice],
            "usage": usage_of([completion])}  # fmt: skip


def chat_chunk(rid: str, created: int, model: str, delta: dict, finish: str | None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}  # fmt: skip


def usage_chunk(rid: str, created: int, model: str, obj: str, completions: list[Completion]) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage_of(completions)}  # fmt: skip


def model_card(name: str, created: int, parent: str | None) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "qlora", "parent": parent}
