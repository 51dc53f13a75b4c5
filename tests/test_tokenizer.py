"""The tokenizer against transformers' own: same ids, same decoded text, same rendered chat.

transformers 5.23.0 is the reference (a test-only dependency). Every loading path is compared on
strings chosen to break tokenizers: leading/doubled/trailing spaces, newlines and CRLF, tabs,
unicode (CJK, accents, emoji), digit runs, contractions, the Alpaca "### Response: " with its
trailing space, and special tokens written in the text.

Paths covered: stories260K's sentencepiece `tokenizer.model` (legacy true, false, absent);
SmolLM2's GGUF (byte-level BPE, pre "smollm"); `tokenizer.json` directories written by
transformers; a sentencepiece ("llama") GGUF and byte-level GGUFs with pre "llama-bpe", "qwen2"
and "gpt2", written here with `gguf.GGUFWriter` from those same vocabularies.
"""

import json
import shutil

import pytest

from qlora.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

TRICKY = [
    "Hello world",
    " Hello",
    "  two  spaces  ",
    "a\n\nb\n",
    "\n",
    " ",
    "tab\there",
    "\r\n crlf\r\n",
    "日本語 é ü ß 🙂",
    "123 4567 89.5 2024-01-01",
    "### Response: ",
    "### Response:\n",
    "it's I'll we've DON'T",
    "end.  ",
    "x" * 40,
    "<s>x</s>",
    "x <s> y</s> z",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<unk> <|endoftext|>",
    "",
]
PLAIN = [s for s in TRICKY if "<" not in s]


def assert_same_as_transformers(ours, reference, strings=TRICKY):
    for text in strings:
        ids = ours.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False), text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip), text


@pytest.fixture(scope="module")
def stories(stories260k_dir):
    return Tokenizer.from_pretrained(stories260k_dir)


@pytest.fixture(scope="module")
def hf_stories(stories260k_dir):
    return transformers.AutoTokenizer.from_pretrained(str(stories260k_dir))


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return Tokenizer.from_pretrained(smollm2_gguf)


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_gguf):
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


# ------------------------------------------------------------------------------------ stories260K


def test_stories260k_matches_transformers(stories, hf_stories):
    assert_same_as_transformers(stories, hf_stories)
    assert (stories.bos_id, stories.eos_id, stories.pad_id, stories.unk_id) == (1, 2, None, 0)
    assert stories.vocab_size == 512 and stories.add_bos and stories.chat_template is None
    assert stories.encode("<s>x</s>") == [1, 410, 444, 2]  # special tokens in text stay whole
    assert stories.encode("Hello", add_bos=True, add_eos=True) == [1, *stories.encode("Hello"), 2]


def test_stories260k_decode_round_trips(stories):
    # Metaspace with a prefix: leading spaces are not recoverable, everything else is.
    for text in PLAIN:
        if not text.startswith(" "):
            assert stories.decode(stories.encode(text)) == text, text


@pytest.mark.parametrize("legacy", [False, None])
def test_stories260k_prefix_scheme_follows_legacy(stories260k_dir, tmp_path, legacy):
    directory = tmp_path / "model"
    shutil.copytree(stories260k_dir, directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    if legacy is None:
        del config["legacy"]
    else:
        config["legacy"] = legacy
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    ours = Tokenizer.from_pretrained(directory)
    assert_same_as_transformers(ours, transformers.AutoTokenizer.from_pretrained(str(directory)))
    # Negative control: "first" differs from the shipped "always" after a special token.
    assert ours.encode("<s>x") != Tokenizer.from_pretrained(stories260k_dir).encode("<s>x")


# ---------------------------------------------------------------------------------------- SmolLM2


def test_smollm2_gguf_matches_transformers(smollm2, hf_smollm2):
    assert_same_as_transformers(smollm2, hf_smollm2)
    assert (smollm2.bos_id, smollm2.eos_id, smollm2.pad_id, smollm2.unk_id) == (1, 2, 2, 0)
    assert smollm2.vocab_size == 49152 and not smollm2.add_bos
    assert smollm2.encode("<|im_end|>") == [2]
    assert smollm2.encode("### Response: ")[-1] == smollm2.token_to_id("Ġ")  # the trailing space


def test_smollm2_decode_round_trips(smollm2):
    for text in PLAIN:  # byte-level BPE is lossless
        assert smollm2.decode(smollm2.encode(text)) == text, text
    ids = smollm2.encode("<|im_start|>user\nhi<|im_end|>")
    assert smollm2.decode(ids) == "user\nhi"
    assert smollm2.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"


CHATS = [
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?  "},
    ],
    [{"role": "user", "content": "Hi there\n"}, {"role": "assistant", "content": "Hello! 👋", "name": None}],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_smollm2_chat_template_matches_transformers(smollm2, hf_smollm2, chat, add_generation_prompt):
    messages = CHATS[chat]
    ours = smollm2.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    reference = hf_smollm2.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == reference
    assert smollm2.encode(ours) == hf_smollm2.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )


# A template exercising what transformers' environment adds: trim/lstrip blocks, loop controls,
# the non-escaping tojson, raise_exception, the special-token variables, {% generation %}.
CUSTOM_TEMPLATE = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}
    {% if message['role'] == 'system' %}
        {% continue %}
    {% endif %}
    [{{ message['role'] }}] {{ message | tojson }}
    {% if message['role'] == 'assistant' %}
{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}[assistant]{% endif %}"""


def test_custom_template_matches_transformers(smollm2, hf_smollm2):
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": '<b>é & "q"</b>'},
        {"role": "assistant", "content": "ok"},
    ]
    smollm2.chat_template, saved = CUSTOM_TEMPLATE, smollm2.chat_template
    try:
        ours = smollm2.apply_chat_template(messages)
        assert ours == hf_smollm2.apply_chat_template(
            messages, chat_template=CUSTOM_TEMPLATE, tokenize=False, add_generation_prompt=True
        )
        assert '"<b>é & \\"q\\"</b>"' in ours  # tojson neither escapes HTML nor ASCII-encodes
        with pytest.raises(Exception, match="no tools here"):
            smollm2.apply_chat_template([{"role": "tool", "content": "x"}])
        # The sandbox refuses attribute access into Python internals.
        smollm2.chat_template = "{{ messages.__class__.__mro__ }}"
        with pytest.raises(Exception, match="unsafe|access"):
            smollm2.apply_chat_template(messages)
    finally:
        smollm2.chat_template = saved


def test_no_chat_template_is_a_clear_error(stories):
    with pytest.raises(ValueError, match="no chat template"):
        stories.apply_chat_template([{"role": "user", "content": "hi"}])


# ------------------------------------------------------------------------- tokenizer.json folders


@pytest.mark.parametrize("which", ["stories", "smollm2"])
def test_tokenizer_json_directory_reproduces_the_tokenizer_that_wrote_it(request, tmp_path, which):
    reference = request.getfixturevalue(f"hf_{which}")
    reference.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    ours = Tokenizer.from_pretrained(tmp_path)
    assert_same_as_transformers(ours, reference)
    original = request.getfixturevalue(which)
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.add_bos) == (
        original.bos_id,
        original.eos_id,
        original.pad_id,
        original.add_bos,
    )
    # transformers writes no add_bos_token: it is read from the post-processor (stories: BOS first).
    assert ours.chat_template == original.chat_template  # SmolLM2's comes from chat_template.jinja


def _edited_copy(stories260k_dir, tmp_path, **changes):
    directory = tmp_path / "model"
    shutil.copytree(stories260k_dir, directory)
    (directory / "special_tokens_map.json").unlink()
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config.update(changes)
    (directory / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if v != "DROP"}))
    return directory


def test_special_tokens_resolution(stories260k_dir, tmp_path, caplog):
    # Named nowhere in the tokenizer files: config.json's ids (bos 1, eos 2) are the fallback.
    directory = _edited_copy(stories260k_dir, tmp_path, bos_token="DROP", eos_token="DROP")
    ours = Tokenizer.from_pretrained(directory)
    assert (ours.bos_id, ours.eos_id, ours.bos_token) == (1, 2, "<s>")
    # A pad token that is not in the vocabulary is dropped with a warning; a missing EOS is an error.
    shutil.rmtree(directory)
    directory = _edited_copy(stories260k_dir, tmp_path, pad_token={"content": "<pad>"})
    assert Tokenizer.from_pretrained(directory).pad_id is None
    assert "'<pad>' is not in the vocabulary" in caplog.text
    shutil.rmtree(directory)
    directory = _edited_copy(stories260k_dir, tmp_path, eos_token="<eos>")
    with pytest.raises(ValueError, match="the eos token '<eos>' is not in the vocabulary"):
        Tokenizer.from_pretrained(directory)
    # Named chat templates: "default" is taken.
    shutil.rmtree(directory)
    templates = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ bos_token }}D"}]
    directory = _edited_copy(stories260k_dir, tmp_path, chat_template=templates)
    assert Tokenizer.from_pretrained(directory).apply_chat_template([{"role": "user", "content": "x"}]) == "<s>D"


def test_missing_tokenizer_files_name_the_directory_and_the_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as caught:
        Tokenizer.from_pretrained(tmp_path)
    message = str(caught.value)
    assert str(tmp_path) in message and "tokenizer.json" in message and "tokenizer.model" in message
    with pytest.raises(FileNotFoundError, match="no such directory"):
        Tokenizer.from_pretrained(tmp_path / "absent")


# ---------------------------------------------------------------------------------- written GGUFs


def _write_gguf(path, tokens, types, *, model, scores=None, merges=None, pre=None, **ids):
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if scores is not None:
        writer.add_token_scores(scores)
    if merges is not None:
        writer.add_token_merges(merges)
    writer.add_bos_token_id(ids["bos"])
    writer.add_eos_token_id(ids["eos"])
    writer.add_context_length(512)
    writer.add_embedding_length(64)
    writer.add_block_count(1)
    writer.add_head_count(8)
    writer.add_feed_forward_length(172)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_sentencepiece_gguf_matches_transformers(stories260k_dir, tmp_path):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(stories260k_dir / "tokenizer.model"))
    n = sp.get_piece_size()
    types = [3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    path = _write_gguf(
        tmp_path / "stories.gguf",
        [sp.id_to_piece(i) for i in range(n)],
        types,
        model="llama",
        scores=[sp.get_score(i) for i in range(n)],
        bos=1,
        eos=2,
    )
    ours = Tokenizer.from_pretrained(path)
    assert_same_as_transformers(ours, transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name))
    assert ours.add_bos and (ours.bos_id, ours.eos_id) == (1, 2)


@pytest.fixture(scope="module")
def smollm2_vocabulary(smollm2_gguf):
    """A 3,000-token cut of SmolLM2's vocabulary (its first tokens, every single character, and the
    merges among them): a real byte-level BPE that writes and loads in a fraction of a second."""
    reader = gguf.GGUFReader(smollm2_gguf)
    tokens, types, merges = (
        reader.fields[f"tokenizer.ggml.{k}"].contents() for k in ("tokens", "token_type", "merges")
    )
    keep = list(range(3000)) + [i for i in range(3000, len(tokens)) if len(tokens[i]) == 1]
    kept = {tokens[i] for i in keep}
    merges = [m for m in merges if (lambda l, r: l in kept and r in kept and l + r in kept)(*m.split(" "))]
    return {"tokens": [tokens[i] for i in keep], "token_type": [types[i] for i in keep], "merges": merges}


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt2"])
def test_byte_level_gguf_pre_tokenizers_match_transformers(smollm2_vocabulary, tmp_path, pre):
    v = smollm2_vocabulary
    path = _write_gguf(
        tmp_path / f"{pre}.gguf",
        v["tokens"],
        v["token_type"],
        model="gpt2",
        merges=v["merges"],
        pre=pre,
        bos=1,
        eos=2,
    )
    ours = Tokenizer.from_pretrained(path)
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert_same_as_transformers(ours, reference)
    # The split itself, where the families differ (digit groups, contractions, newlines, spaces).
    for text in ["12345 678", "I'M here\n\n  x", "a1b22c333d4444", "  \n\t  end"]:
        assert ours._backend.pre_tokenizer.pre_tokenize_str(text) == (
            reference.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)
        )


def test_pre_tokenizer_families_differ():
    # Negative control for the test above: the table entries are not all the same split.
    from qlora.tokenizer import _GGUF_PRE_TOKENIZERS

    splits = {
        name: tuple(piece for piece, _ in build().pre_tokenize_str("a12345 I'M"))
        for name, build in _GGUF_PRE_TOKENIZERS.items()
    }
    assert splits["llama-bpe"] == splits["llama3"] == splits["llama-v3"]
    assert len({splits[name] for name in ("gpt2", "smollm", "llama-bpe", "qwen2")}) == 4


def test_unknown_gguf_tokenizers_are_refused(smollm2_vocabulary, tmp_path):
    v = smollm2_vocabulary
    path = _write_gguf(
        tmp_path / "odd.gguf",
        v["tokens"],
        v["token_type"],
        model="gpt2",
        merges=v["merges"],
        pre="tekken",
        bos=1,
        eos=2,
    )
    with pytest.raises(ValueError, match="unknown GGUF pre-tokenizer 'tekken'"):
        Tokenizer.from_pretrained(path)
    path = _write_gguf(tmp_path / "t5.gguf", ["<pad>", "</s>", "a"], [3, 3, 1], model="t5", bos=0, eos=1)
    with pytest.raises(ValueError, match="GGUF tokenizer model 't5' is not supported"):
        Tokenizer.from_pretrained(path)
