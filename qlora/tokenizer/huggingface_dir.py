"""A tokenizer from a Hugging Face model directory: `tokenizer.json`, or a bare `tokenizer.model`.

- **`tokenizer.json`** is the whole pipeline (normalizer, pre-tokenizer, model, decoder), loaded as
  written. transformers 5 instead rebuilds some classes (`LlamaTokenizer`, `Qwen2Tokenizer`, ...)
  from the file's vocabulary and its own hard-coded pipeline; we take the file as the checkpoint's
  word (with transformers 5.23 the tokenizer.json it writes for stories260K's LlamaTokenizer reloads
  there with other ids for "<s>x</s>"; loaded as written it reproduces the tokenizer that wrote it).
- **`tokenizer.model`** (sentencepiece, BPE type) becomes what transformers' `LlamaTokenizer`
  builds: merges ordered by the id of the merged piece, the prefix scheme from `legacy` /
  `add_prefix_space` in `tokenizer_config.json`.

Special tokens come from `tokenizer_config.json`, then `special_tokens_map.json`, then the ids in
`config.json`; the chat template from `chat_template.jinja`, else `tokenizer_config.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

from qlora.tokenizer.chat_template import pick_chat_template
from qlora.tokenizer.parts import TokenizerParts
from qlora.tokenizer.sentencepiece_bpe import recover_merges, sentencepiece_backend
from qlora.tokenizer.sentencepiece_file import read_sentencepiece_model
from qlora.tokenizer.special_tokens import SPECIAL_NAMES, token_spelling

LOOKED_FOR = "tokenizer.json (Hugging Face tokenizers) or tokenizer.model (sentencepiece)"


def read_directory(directory: Path) -> TokenizerParts:
    """The tokenizer parts of the model directory `directory`; errors name the file."""
    config = _read_json(directory / "tokenizer_config.json")
    special_map = _read_json(directory / "special_tokens_map.json")
    model_config = _read_json(directory / "config.json")
    if (directory / "tokenizer.json").is_file():
        backend = Backend.from_file(str(directory / "tokenizer.json"))
    elif (directory / "tokenizer.model").is_file():
        backend = _sentencepiece_directory_backend(directory / "tokenizer.model", config)
    else:
        raise FileNotFoundError(
            f"{directory}: no tokenizer files. Looked for {LOOKED_FOR}. "
            "Pass the model directory that holds them, or a .gguf file."
        )
    _add_declared_tokens(backend, config.get("added_tokens_decoder") or {}, directory)

    special: dict[str, str | None] = {}
    for name in SPECIAL_NAMES:
        token = token_spelling(config.get(f"{name}_token")) or token_spelling(special_map.get(f"{name}_token"))
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
        chat_template = pick_chat_template(config.get("chat_template"))
    add_bos = config.get("add_bos_token")
    if add_bos is None:  # the file's own post-processor says; LlamaTokenizer's default is True
        is_json = (directory / "tokenizer.json").is_file()
        add_bos = _post_processor_adds_bos(backend, special["bos"]) if is_json else True
    return TokenizerParts(
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


def _sentencepiece_directory_backend(model_file: Path, config: dict) -> Backend:
    tokenizer_class = config.get("tokenizer_class")
    if tokenizer_class is not None and not str(tokenizer_class).startswith("Llama"):
        raise ValueError(
            f"{model_file}: a bare tokenizer.model is supported for Llama-style tokenizers only "
            f"(tokenizer_config.json says {tokenizer_class!r}). Provide a tokenizer.json."
        )
    pieces, scores, types, model_type = read_sentencepiece_model(model_file)
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
    merges = recover_merges(pieces, vocab, key=lambda merged, left, right: (vocab[merged], len(left)))
    return sentencepiece_backend(vocab, merges, types, prepend)
