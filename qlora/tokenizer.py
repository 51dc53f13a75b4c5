"""The tokenizer: text to token ids and back, exactly as the checkpoint's own tokenizer does it.

A finetune is only as good as its ids: one id off and the model trains on noise that no loss curve
will show. So we do not implement BPE. The Rust `tokenizers` library runs the algorithm, and this
module's job is to *build* the right `tokenizers.Tokenizer` from whatever a checkpoint ships, then
wrap it in a small interface that the data layer and the evaluation code can rely on:

- **`tokenizer.json`** (a Hugging Face directory): it is the whole pipeline (normalizer,
  pre-tokenizer, model, decoder), loaded as written. transformers 5 instead rebuilds some classes
  (`LlamaTokenizer`, `Qwen2Tokenizer`, ...) from the file's vocabulary and its own hard-coded
  pipeline; we take the file as the checkpoint's word. (Measured with transformers 5.23: the
  tokenizer.json it writes for stories260K's LlamaTokenizer reloads in transformers with different
  ids for "<s>x</s>"; loading the file as written reproduces the tokenizer that wrote it.)
- **`tokenizer.model`** (sentencepiece, BPE type: Llama 1/2, TinyLlama, llama2.c's stories models):
  we read the protobuf ourselves (a few lines of wire format; no protobuf dependency, nothing is
  executed) and build what transformers' `LlamaTokenizer` builds from it: BPE over the pieces with
  byte fallback, merges ordered by the id of the merged piece, a `Metaspace` pre-tokenizer whose
  prefix scheme follows `legacy`/`add_prefix_space` in `tokenizer_config.json`.
- **a `.gguf` file**: llama.cpp stores the vocabulary as metadata (`tokenizer.ggml.*`). For
  `model == "gpt2"` we build byte-level BPE from the tokens and merges, with the pre-tokenizer the
  `pre` name stands for (table `_GGUF_PRE_TOKENIZERS`; an unknown name is an error, where transformers
  silently falls back to GPT-2's split). For `model == "llama"` (sentencepiece vocabularies) we
  build the sentencepiece BPE above, merges recovered from the scores as transformers does, prefix
  scheme "first" (transformers) unless the file says `add_space_prefix = false` (then none; llama.cpp
  honours the flag, transformers ignores it). Tokens marked CONTROL or UNKNOWN become special
  tokens, USER_DEFINED ones plain added tokens, so all of them encode atomically.

Special tokens. `bos_id`/`eos_id`/`pad_id` come from `tokenizer_config.json`, then
`special_tokens_map.json`, then the ids in `config.json` (a GGUF names the ids itself). A BOS or
EOS that is not in the vocabulary is an error; a PAD or UNK is dropped with a warning (transformers
would add it as a new id past the model's embedding). They are registered as special tokens of
the backend, so "<|im_end|>" written in text encodes to its single id, as in transformers (chat
templates rely on it), and `decode` can skip them.
`encode` never adds BOS/EOS unless asked: the data layer decides, and appends ids, never the
spelling "<s>". `decode` is lossless: no "clean up tokenization spaces" (transformers 5 ignores that
option for BPE too).

Chat templates are jinja2, rendered the way transformers renders them: an immutable sandboxed
environment with `trim_blocks`/`lstrip_blocks`, the `loopcontrols` extension, `raise_exception`,
`strftime_now`, a `tojson` that does not HTML-escape, `{% generation %}` blocks accepted (rendered
as plain text), and the special-token strings (`bos_token`, `eos_token`, ...) as variables. The
sandbox is what makes a template from the Hub safe to render; no code from a checkpoint is ever
imported or executed.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import struct
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

# sentencepiece / llama.cpp token types (sentencepiece_model.proto `SentencePiece.Type`).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_SPECIAL_NAMES = ("bos", "eos", "pad", "unk")
logger = logging.getLogger(__name__)

_LOOKED_FOR = "tokenizer.json (Hugging Face tokenizers) or tokenizer.model (sentencepiece)"


class Tokenizer:
    """A checkpoint's tokenizer. Build it with `Tokenizer.from_pretrained(directory or .gguf)`.

    Attributes: `bos_id`, `eos_id`, `pad_id`, `unk_id` (None where the tokenizer has none),
    `bos_token`/`eos_token`/... (their spellings), `vocab_size` (ids it can produce, added tokens
    included), `chat_template` (jinja2 source or None), `add_bos` (whether the checkpoint's own
    tokenizer prepends BOS by default; informative: `encode` only adds what it is asked to).
    """

    def __init__(
        self,
        backend: Backend,
        *,
        special_tokens: dict[str, str | None] | None = None,
        chat_template: str | None = None,
        add_bos: bool = False,
        source: str = "",
    ) -> None:
        self._backend = backend
        self.source = source
        self.chat_template = chat_template
        self.add_bos = bool(add_bos)
        special_tokens = special_tokens or {}
        for name in _SPECIAL_NAMES:
            token = special_tokens.get(name)
            token_id = None if token is None else backend.token_to_id(token)
            if token is not None and token_id is None:
                if name in ("bos", "eos"):
                    raise ValueError(
                        f"{source}: the {name} token {token!r} is not in the vocabulary. "
                        "Fix the tokenizer files, or pass a checkpoint whose special tokens exist."
                    )
                # transformers would add it as a new id past the model's embedding; we go without.
                logger.warning(
                    "%s: the %s token %r is not in the vocabulary; treating it as absent", source, name, token
                )
                token = None
            setattr(self, f"{name}_token", token)
            setattr(self, f"{name}_id", token_id)
        # Special tokens encode atomically and are skipped by decode; adding a token that is
        # already in the vocabulary keeps its id.
        already = {t.content for t in backend.get_added_tokens_decoder().values()}
        named = [getattr(self, f"{n}_token") for n in _SPECIAL_NAMES if getattr(self, f"{n}_token") is not None]
        missing = [t for t in dict.fromkeys(named) if t not in already]
        if missing:
            backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in missing])
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None

    # ----------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Tokenizer:
        """Load from a Hugging Face model directory or a `.gguf` file (see the module docstring)."""
        path = Path(path)
        if path.is_file() and path.suffix.lower() == ".gguf":
            return _from_gguf(path)
        if path.is_dir():
            return _from_directory(path)
        if path.is_file():
            raise ValueError(f"{path}: expected a model directory or a .gguf file")
        raise FileNotFoundError(f"{path}: no such directory or .gguf file (looked for {_LOOKED_FOR})")

    # ------------------------------------------------------------------------------ text and ids

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`, with no special tokens unless asked (BOS/EOS appended as ids)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_bos:
            ids.insert(0, self._require("bos"))
        if add_eos:
            ids.append(self._require("eos"))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens are dropped unless `skip_special_tokens=False`."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(int(token_id))

    def _require(self, name: str) -> int:
        token_id = getattr(self, f"{name}_id")
        if token_id is None:
            raise ValueError(f"{self.source}: this tokenizer has no {name} token")
        return token_id

    # ---------------------------------------------------------------------------- chat templates

    def apply_chat_template(
        self, messages: Sequence[dict], add_generation_prompt: bool = True, **variables: Any
    ) -> str:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) with the checkpoint's template.

        Keys whose value is None are dropped from each message (as transformers does: templates
        test for presence). `variables` are passed to the template and override the special-token
        variables.
        """
        if self.chat_template is None:
            raise ValueError(
                f"{self.source}: this tokenizer has no chat template (none in tokenizer_config.json, "
                "chat_template.jinja or the GGUF metadata). Use a chat model or a plain-text format."
            )
        if not messages:
            raise ValueError("apply_chat_template needs at least one message")
        clean = []
        for message in messages:
            if not isinstance(message, dict):
                raise TypeError(f"a chat message must be a dict, got {type(message).__name__}")
            clean.append({k: v for k, v in message.items() if v is not None})
        context: dict[str, Any] = {
            f"{n}_token": getattr(self, f"{n}_token") for n in _SPECIAL_NAMES if getattr(self, f"{n}_token") is not None
        }
        context.update(variables)
        return _compile_chat_template(self.chat_template).render(
            messages=clean,
            tools=context.pop("tools", None),
            documents=context.pop("documents", None),
            add_generation_prompt=add_generation_prompt,
            **context,
        )

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, pad_id={self.pad_id})"
        )


# -------------------------------------------------------------------------- Hugging Face directory


def _from_directory(directory: Path) -> Tokenizer:
    config = _read_json(directory / "tokenizer_config.json")
    special_map = _read_json(directory / "special_tokens_map.json")
    model_config = _read_json(directory / "config.json")
    if (directory / "tokenizer.json").is_file():
        backend = Backend.from_file(str(directory / "tokenizer.json"))
    elif (directory / "tokenizer.model").is_file():
        backend = _sentencepiece_directory_backend(directory / "tokenizer.model", config)
    else:
        raise FileNotFoundError(
            f"{directory}: no tokenizer files. Looked for {_LOOKED_FOR}. "
            "Pass the model directory that holds them, or a .gguf file."
        )
    _add_declared_tokens(backend, config.get("added_tokens_decoder") or {}, directory)

    special: dict[str, str | None] = {}
    for name in _SPECIAL_NAMES:
        token = _token_spelling(config.get(f"{name}_token")) or _token_spelling(special_map.get(f"{name}_token"))
        if token is None:
            token_id = model_config.get(f"{name}_token_id")
            if isinstance(token_id, list):  # e.g. Llama 3 instruct lists several EOS ids
                token_id = token_id[0] if token_id else None
            if isinstance(token_id, int):
                token = backend.id_to_token(token_id)
        special[name] = token

    template_file = directory / "chat_template.jinja"
    if template_file.is_file():
        chat_template = template_file.read_text(encoding="utf-8")
    else:
        chat_template = _pick_chat_template(config.get("chat_template"))
    add_bos = config.get("add_bos_token")
    if add_bos is None:  # the file's own post-processor says; LlamaTokenizer's default is True
        is_json = (directory / "tokenizer.json").is_file()
        add_bos = _post_processor_adds_bos(backend, special["bos"]) if is_json else True
    return Tokenizer(
        backend,
        special_tokens=special,
        chat_template=chat_template,
        add_bos=add_bos,
        source=str(directory),
    )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level")
    return data


def _token_spelling(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or a serialized AddedToken."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _pick_chat_template(value: Any) -> str | None:
    """`chat_template` is a string, or a list of {"name", "template"} of which we take "default"."""
    if isinstance(value, str) or value is None:
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" in named:
            return named["default"]
        if len(named) == 1:
            return next(iter(named.values()))
    return None


def _post_processor_adds_bos(backend: Backend, bos_token: str | None) -> bool:
    """Whether the tokenizer.json post-processor puts a special token first (Llama 3 style)."""
    processor = json.loads(backend.to_str()).get("post_processor")
    stack = [processor] if processor else []
    while stack:
        node = stack.pop()
        if node.get("type") == "Sequence":
            stack.extend(node.get("processors", []))
        elif node.get("type") == "TemplateProcessing" and node.get("single"):
            first = node["single"][0]
            if "SpecialToken" in first:
                return bos_token is None or first["SpecialToken"]["id"] == bos_token
    return False


def _add_declared_tokens(backend: Backend, declared: dict, directory: Path) -> None:
    """Register `added_tokens_decoder` entries, checking each lands on the id the file gives it."""
    for key in sorted(declared, key=int):
        spec = declared[key]
        content = spec["content"] if isinstance(spec, dict) else str(spec)
        options = spec if isinstance(spec, dict) else {}
        token = AddedToken(
            content,
            single_word=options.get("single_word", False),
            lstrip=options.get("lstrip", False),
            rstrip=options.get("rstrip", False),
            normalized=options.get("normalized", not options.get("special", False)),
            special=options.get("special", False),
        )
        if token.special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])
        if backend.token_to_id(content) != int(key):
            raise ValueError(
                f"{directory}/tokenizer_config.json: added token {content!r} is declared with id {key} "
                f"but lands on id {backend.token_to_id(content)}. The tokenizer files disagree; "
                "re-save the tokenizer with the library that made it."
            )


# ----------------------------------------------------------------------------------- sentencepiece


def _sentencepiece_directory_backend(model_file: Path, config: dict) -> Backend:
    tokenizer_class = config.get("tokenizer_class")
    if tokenizer_class is not None and not str(tokenizer_class).startswith("Llama"):
        raise ValueError(
            f"{model_file}: a bare tokenizer.model is supported for Llama-style tokenizers only "
            f"(tokenizer_config.json says {tokenizer_class!r}). Provide a tokenizer.json."
        )
    pieces, scores, types, model_type = _read_sentencepiece_model(model_file)
    if model_type != 2:
        raise ValueError(
            f"{model_file}: sentencepiece model type {model_type} (1 = unigram) is not supported; "
            "only BPE sentencepiece models (Llama family) are. Provide a tokenizer.json."
        )
    add_prefix_space = config.get("add_prefix_space")
    if add_prefix_space is False:
        prepend = "never"
    else:  # transformers' LlamaTokenizer: legacy=True means "always", anything else "first"
        prepend = "always" if config.get("legacy") is True else "first"
    # transformers orders the recovered merges by the id of the merged piece, then left length.
    vocab = {piece: i for i, piece in enumerate(pieces)}
    merges = _recover_merges(pieces, vocab, key=lambda merged, left, right: (vocab[merged], len(left)))
    return _sentencepiece_backend(vocab, merges, types, prepend)


def _read_sentencepiece_model(path: Path) -> tuple[list[str], list[float], list[int], int]:
    """(pieces, scores, types, model_type) from a sentencepiece ModelProto, by its wire format.

    Fields read (sentencepiece_model.proto): ModelProto.pieces = 1 {piece = 1 (string),
    score = 2 (float), type = 3 (enum, default NORMAL)}, ModelProto.trainer_spec = 2
    {model_type = 3 (enum, default UNIGRAM = 1; BPE = 2)}. Everything else is skipped.
    """
    data = path.read_bytes()
    pieces, scores, types, model_type = [], [], [], 1
    try:
        for number, value in _protobuf_fields(data):
            if number == 1:
                piece, score, kind = "", 0.0, _NORMAL
                for sub_number, sub_value in _protobuf_fields(value):
                    if sub_number == 1:
                        piece = sub_value.decode("utf-8")
                    elif sub_number == 2:
                        score = struct.unpack("<f", sub_value)[0]
                    elif sub_number == 3:
                        kind = sub_value
                pieces.append(piece)
                scores.append(score)
                types.append(kind)
            elif number == 2:
                for sub_number, sub_value in _protobuf_fields(value):
                    if sub_number == 3:
                        model_type = sub_value
    except (IndexError, ValueError, struct.error, UnicodeDecodeError, AttributeError) as err:
        raise ValueError(f"{path}: not a readable sentencepiece model ({err})") from err
    if not pieces:
        raise ValueError(f"{path}: no pieces found; is it a sentencepiece model?")
    return pieces, scores, types, model_type


def _protobuf_fields(data: bytes):
    """Yield (field number, value) of a protobuf message: ints for varints, bytes otherwise."""
    position = 0
    while position < len(data):
        key, position = _varint(data, position)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, position = _varint(data, position)
        elif wire_type == 2:
            length, position = _varint(data, position)
            value, position = data[position : position + length], position + length
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
            value, position = data[position : position + size], position + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        if position > len(data):
            raise ValueError("truncated protobuf message")
        yield number, value


def _varint(data: bytes, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, position
        shift += 7


def _recover_merges(pieces: Sequence[str], vocab: dict[str, int], key) -> list[tuple[str, str]]:
    """Every split of every piece into two pieces of the vocabulary, sorted by `key`.

    A sentencepiece BPE model stores pieces and scores, not merges; each way of writing a piece
    as the concatenation of two pieces is a merge, ranked by `key(merged, left, right)`. The
    sort is stable over (piece order, then left/right ids), which fixes the order of ties.
    """
    found = []
    for merged in dict.fromkeys(pieces):
        local = [(merged[:i], merged[i:]) for i in range(1, len(merged))]
        local = [(l, r) for l, r in local if l in vocab and r in vocab]
        local.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        found.extend((merged, l, r) for l, r in local)
    found.sort(key=lambda item: key(*item))
    return [(l, r) for _, l, r in found]


def _sentencepiece_backend(
    vocab: dict[str, int], merges: list[tuple[str, str]], types: Sequence[int], prepend: str
) -> Backend:
    """Sentencepiece-style BPE: byte fallback, `Metaspace` ("▁" for spaces), no normalizer."""
    backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prepend != "never":
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    id_to_piece = {i: piece for piece, i in vocab.items()}
    _add_typed_tokens(backend, [id_to_piece.get(i, "") for i in range(len(types))], types, None)
    return backend


def _add_typed_tokens(backend: Backend, tokens: Sequence[str], types: Sequence[int], alphabet: set[str] | None) -> None:
    """CONTROL and UNKNOWN tokens become special tokens, USER_DEFINED ones plain added tokens (all
    encode atomically; specials are skipped by decode).

    In a byte-level vocabulary (`alphabet` given) every real token is spelled in the byte
    alphabet; a CONTROL token that is not is a converter's mislabel and would grow the
    vocabulary past the model's embedding if added, so it is skipped (as transformers does).
    """
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, kind in zip(tokens, types, strict=True)
        if kind in (_CONTROL, _UNKNOWN) and t and (alphabet is None or set(t) <= alphabet)
    ]
    if control:
        backend.add_special_tokens(control)
    vocab = backend.get_vocab(with_added_tokens=True)
    user = [
        AddedToken(t, normalized=False, special=False)
        for t, kind in zip(tokens, types, strict=True)
        if kind == _USER_DEFINED and t in vocab
    ]
    if user:
        backend.add_tokens(user)


# -------------------------------------------------------------------------------------------- GGUF

# The split each llama.cpp `tokenizer.ggml.pre` name stands for, before byte-level BPE. These are
# the published pre-tokenizer patterns of those model families (their tokenizer.json files).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_split() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2_split() -> pre_tokenizers.PreTokenizer:
    # SmolLM/StarCoder: each digit on its own, then GPT-2's split (their tokenizer.json).
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_split()])


def _regex_split(pattern: str):
    def build() -> pre_tokenizers.PreTokenizer:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    return build


_GGUF_PRE_TOKENIZERS = {
    "gpt2": _gpt2_split,
    "smollm": _digits_then_gpt2_split,
    "llama-bpe": _regex_split(_LLAMA3_SPLIT),
    "llama3": _regex_split(_LLAMA3_SPLIT),
    "llama-v3": _regex_split(_LLAMA3_SPLIT),
    "qwen2": _regex_split(_QWEN2_SPLIT),
}
# Sentencepiece GGUFs of these architectures need more than the generic build (transformers has
# special cases for them); refuse rather than tokenize subtly wrong.
_UNSUPPORTED_SENTENCEPIECE_ARCHITECTURES = ("gemma", "gemma2", "gemma3", "gemma4", "phi3")


def _from_gguf(path: Path) -> Tokenizer:
    import gguf  # heavy import, only needed here

    reader = gguf.GGUFReader(path)

    def meta(key: str, default: Any = None) -> Any:
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    kind = meta("tokenizer.ggml.model")
    tokens = meta("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise ValueError(f"{path}: the GGUF metadata has no tokenizer (tokenizer.ggml.model / tokens)")
    types = meta("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    scores = meta("tokenizer.ggml.scores")
    for key, values in (("token_type", types), ("scores", scores)):
        if values is not None and len(values) != len(tokens):
            raise ValueError(f"{path}: tokenizer.ggml.{key} has {len(values)} entries for {len(tokens)} tokens")
    merges = meta("tokenizer.ggml.merges")
    architecture = meta("general.architecture")
    if kind == "gpt2":
        backend = _gguf_byte_level_backend(path, tokens, types, merges, meta("tokenizer.ggml.pre", "gpt2"))
    elif kind == "llama":
        if architecture in _UNSUPPORTED_SENTENCEPIECE_ARCHITECTURES:
            raise ValueError(
                f"{path}: sentencepiece GGUF tokenizers of architecture {architecture!r} are not "
                "supported. Use the model's Hugging Face directory (tokenizer.json) instead."
            )
        if merges is None and scores is None:
            raise ValueError(f"{path}: a sentencepiece GGUF needs tokenizer.ggml.scores or .merges")
        vocab = {t: i for i, t in enumerate(tokens)}
        if merges is not None:
            pairs = _split_merges(path, merges)
        else:  # transformers: by score, best first; longer left piece first on ties
            score_of = dict(zip(tokens, scores, strict=True))
            pairs = _recover_merges(
                tokens, vocab, key=lambda merged, left, right: (-score_of[merged], -len(left), -len(right))
            )
        prepend = "never" if meta("tokenizer.ggml.add_space_prefix") is False else "first"
        backend = _sentencepiece_backend(vocab, pairs, types, prepend)
    else:
        raise ValueError(
            f"{path}: GGUF tokenizer model {kind!r} is not supported (supported: 'gpt2' byte-level "
            "BPE, 'llama' sentencepiece BPE). Use the model's Hugging Face directory instead."
        )

    special = {}
    for name, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown")):
        token_id = meta(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise ValueError(f"{path}: tokenizer.ggml.{key}_token_id = {token_id} is outside the vocabulary")
        special[name] = None if token_id is None else tokens[token_id]
    if special["unk"] is None and _UNKNOWN in types:
        special["unk"] = tokens[types.index(_UNKNOWN)]
    add_bos = meta("tokenizer.ggml.add_bos_token")
    return Tokenizer(
        backend,
        special_tokens=special,
        chat_template=meta("tokenizer.chat_template"),
        add_bos=(kind == "llama") if add_bos is None else add_bos,
        source=str(path),
    )


def _split_merges(path: Path, merges: Sequence[str]) -> list[tuple[str, str]]:
    pairs = []
    for number, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{path}: tokenizer.ggml.merges[{number}] = {merge!r} is not 'left right'")
        pairs.append((parts[0], parts[1]))
    return pairs


def _gguf_byte_level_backend(
    path: Path, tokens: Sequence[str], types: Sequence[int], merges: Sequence[str] | None, pre: str
) -> Backend:
    if merges is None:
        raise ValueError(f"{path}: a byte-level BPE GGUF needs tokenizer.ggml.merges")
    if pre not in _GGUF_PRE_TOKENIZERS:
        raise ValueError(
            f"{path}: unknown GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre). Supported: "
            f"{sorted(_GGUF_PRE_TOKENIZERS)}. Use the model's Hugging Face directory (tokenizer.json)."
        )
    byte_to_char = _byte_level_alphabet()
    alphabet = set(byte_to_char.values())
    # A token spelled outside the byte alphabet (raw text) is respelled byte by byte.
    spelled = [t if set(t) <= alphabet else "".join(byte_to_char[b] for b in t.encode("utf-8")) for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    backend = Backend(models.BPE(vocab=vocab, merges=_split_merges(path, merges), dropout=None))
    backend.pre_tokenizer = _GGUF_PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    _add_typed_tokens(backend, tokens, types, alphabet)
    return backend


@functools.cache
def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte-to-character map: printable Latin-1 bytes stand for themselves; the others
    (controls, space, 0x7F-0xA0, 0xAD) take the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


# ---------------------------------------------------------------------------------- chat templates


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker), as plain text."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # jinja's own tojson HTML-escapes; chat templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile_chat_template(source: str) -> jinja2.Template:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment.from_string(source)
