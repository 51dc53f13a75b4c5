"""Every data format: exact token ids and label masks on stories260K and SmolLM2, detection, readers
(JSON / JSON Lines / CSV / TSV / text), OASST thread building, chat templates, located errors.

The pinned ids were produced by `load_dataset` and then checked once against transformers 5.23.0's
own tokenizers (`AutoTokenizer.from_pretrained(<stories260K dir>)` and `(..., gguf_file=<SmolLM2>)`):
for the pair formats `[bos] + tok.encode(source) + tok.encode(target) + [eos]` (no special tokens
added by `encode`), for plain text `[bos] + tok.encode(doc) + [eos]` cut in blocks, for chat
`tok.encode(tok.apply_chat_template(messages, tokenize=False))`; the trained chat tokens equal
`tok.encode(content + "<|im_end|>")` of each assistant message. All matched.
"""

import json
import logging
from pathlib import Path

import pytest
from tokenizers import Tokenizer as Backend

from qlora.data import IGNORE_INDEX, DataError, InstructionDataset, encode_example, format_alpaca, load_dataset
from qlora.data.chat import encode_chat
from qlora.data.formats import detect
from qlora.data.oasst import build_threads, read_messages, render_thread
from qlora.data.readers import read_any
from qlora.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "formats"
M = IGNORE_INDEX

CONV_A = "### Human: Name a color.### Assistant: Blue.### Human: Another?### Assistant: Green."
CONV_B = "### Human: Hallo!### Assistant: Guten Tag."

# fmt: off
_ST_HUMAN_COLOR = [410, 38, 38, 38, 320, 425, 423, 303, 467, 410, 458, 314, 411, 261, 280, 414, 421, 304, 426]
_ST_ASSISTANT = [38, 38, 38, 410, 447, 419, 419, 293, 413, 303, 413, 467]  # "### Assistant:" after text
_ST_CONV_A = (
    [1] + _ST_HUMAN_COLOR + _ST_ASSISTANT + [368, 421, 425, 411, 426, 38, 38, 38, 320, 425, 423, 303, 467, 410,
                                             447, 416, 309, 386, 450] + _ST_ASSISTANT + [410, 463, 276, 302, 426, 2]
)
_SM_CONV_A = [1, 3757, 4996, 42, 10181, 253, 2380, 30, 3757, 20108, 42, 10062, 30, 3757, 4996, 42, 5839, 47, 3757,
              20108, 42, 4910, 30, 2]
# (file, model) -> [(input_ids, number of masked leading positions)]; labels = ids with the prefix masked.
PINNED = {
    ("io_good.jsonl", "stories260K"): [
        ([1] + _ST_HUMAN_COLOR + [410, 38, 38, 38, 410, 447, 419, 419, 293, 413, 303, 413, 467, 368, 421, 425, 411,
                                  426, 2], 33),
        ([1, 320, 417, 443, 2], 1),
    ],
    ("io_good.jsonl", "smollm2"): [
        ([1, 3757, 4996, 42, 10181, 253, 2380, 30, 20749, 20108, 42, 23390, 30, 2], 11),
        ([1, 26843, 17, 2], 1),
    ],
    ("oasst_messages.jsonl", "stories260K"): [
        (_ST_CONV_A, 1),
        ([1, 410, 38, 38, 38, 320, 425, 423, 303, 467, 320, 388, 414, 443] + _ST_ASSISTANT
         + [410, 463, 323, 302, 274, 412, 428, 426, 2], 1),
    ],
    ("oasst_messages.jsonl", "smollm2"): [
        (_SM_CONV_A, 1),
        ([1, 3757, 4996, 42, 8501, 95, 17, 3757, 20108, 42, 452, 8775, 22786, 30, 2], 1),
    ],
    ("oasst_trees.jsonl", "stories260K"): [(_ST_CONV_A, 1)],
    ("oasst_trees.jsonl", "smollm2"): [(_SM_CONV_A, 1)],
    ("guanaco_good.jsonl", "stories260K"): [([1] + _ST_HUMAN_COLOR + _ST_ASSISTANT + [368, 421, 425, 411, 426, 2], 1)],
    ("guanaco_good.jsonl", "smollm2"): [([1, 3757, 4996, 42, 10181, 253, 2380, 30, 3757, 20108, 42, 10062, 30, 2], 1)],
    # plain text, block_size 8: every token trained, blocks never span two documents
    ("text_good.jsonl", "stories260K"): [
        ([1, 403, 407, 261, 378, 383, 286, 261], 0), ([280, 294, 426, 2], 0), ([1, 291, 344, 264, 426, 2], 0),
    ],
    ("text_good.jsonl", "smollm2"): [
        ([1, 6403, 1980, 253, 655, 665, 436, 253], 0), ([2644, 30, 2], 0), ([1, 504, 1112, 30, 2], 0),
    ],
}
# SmolLM2's template: default system prompt, <|im_start|>role\n ... <|im_end|>\n; trained: reply + <|im_end|> (2).
CHAT_SMOLLM2 = [
    [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2, 198,
     1, 4093, 198, 26843, 2, 198, 1, 520, 9531, 198, 19556, 17, 2, 198, 1, 4093, 198, 5820, 253, 2380, 30, 2, 198, 1,
     520, 9531, 198, 23390, 30, 2, 198],
    [1, 9690, 198, 6077, 5453, 30, 2, 198, 1, 4093, 198, 36218, 15876, 30, 2, 198, 1, 520, 9531, 198, 26843, 17, 2,
     198],
]
CHAT_SMOLLM2_TRAINED = [[(31, 34), (48, 51)], [(20, 23)]]  # [start, end) of each trained span
# fmt: on


def _tok(request, model):
    return request.getfixturevalue("stories" if model == "stories260K" else "smollm2")


@pytest.mark.parametrize(("name", "model"), list(PINNED), ids=[f"{n}-{m}" for n, m in PINNED])
def test_pinned_ids_and_label_masks(request, name, model):
    tok = _tok(request, model)
    examples, info = load_dataset(FIXTURES / name, tok, block_size=8)
    assert [(e.input_ids, e.labels) for e in examples] == [
        (ids, [M] * masked + ids[masked:]) for ids, masked in PINNED[(name, model)]
    ]
    assert info.detected and info.num_examples == len(examples)
    if info.format != "text":
        assert all(e.input_ids[-1] == e.labels[-1] == tok.eos_id for e in examples)


def test_oasst_text_and_threads():
    threads = build_threads(read_messages(read_any(FIXTURES / "oasst_messages.jsonl")))
    # rank 0 wins over rank 1; the trailing unanswered prompt ("Thanks.") is dropped; a deleted
    # best reply (b2) gives way to the next; a root without an answer (c1) makes no thread.
    assert [render_thread(t) for t in threads] == [CONV_A, CONV_B]
    assert [[m.message_id for m in t] for t in threads] == [["a1", "a3", "a4", "a5"], ["b1", "b3"]]
    de = build_threads(read_messages(read_any(FIXTURES / "oasst_messages.jsonl")), languages={"de"})
    assert [render_thread(t) for t in de] == [CONV_B]


def test_oasst_language_filter_and_deleted_subtrees(stories, tmp_path):
    examples, info = load_dataset(FIXTURES / "oasst_messages.jsonl", stories, languages={"en"})
    assert info.format == "oasst1" and info.num_records == 11 and info.lines == [1]
    assert stories.decode(examples[0].input_ids) == CONV_A
    with pytest.raises(DataError, match="no conversation thread with an assistant reply in languages"):
        load_dataset(FIXTURES / "oasst_messages.jsonl", stories, languages={"fr"})
    rows = [json.loads(line) for line in (FIXTURES / "oasst_messages.jsonl").read_text().splitlines()]
    for row in rows:
        if row["message_id"] == "a3":
            row["deleted"] = True  # its replies a4, a5, a7 go with it: a1 -> a2 -> a6 (prompter, dropped)
    path = tmp_path / "deleted.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    threads = build_threads(read_messages(read_any(path)), languages={"en"})
    assert [render_thread(t) for t in threads] == ["### Human: Name a color.### Assistant: Red."]


def _stories_with_template(stories, template):
    return Tokenizer(
        Backend.from_str(stories._backend.to_str()),
        special_tokens={"bos": "<s>", "eos": "</s>"},
        chat_template=template,
        source="stories260K+test-template",
    )


TEST_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'A: ' + m['content'] + eos_token }}"
    "{% else %}{{ 'U: ' + m['content'] + '\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'A: ' }}"
    "{% endif %}"
)


def test_chat_smollm2_pinned(smollm2):
    examples, info = load_dataset(FIXTURES / "chat_good.jsonl", smollm2)
    assert info.format == "chat" and info.lines == [1, 2]
    for example, ids, spans in zip(examples, CHAT_SMOLLM2, CHAT_SMOLLM2_TRAINED, strict=True):
        assert example.input_ids == ids
        want = [M] * len(ids)
        for start, end in spans:
            want[start:end] = ids[start:end]
            assert ids[end - 1] == smollm2.eos_id  # each reply's <|im_end|> is trained
        assert example.labels == want
    # The system and user turns end in the same <|im_end|> id, masked: only reply ends are trained.
    assert examples[0].input_ids.count(smollm2.eos_id) == 5


def test_chat_stories_with_a_test_template(stories):
    tok = _stories_with_template(stories, TEST_TEMPLATE)
    messages = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye"},
    ]
    example = encode_chat(tok, messages, max_len=512)
    full = "<s>U: Be kind.\nU: Hi\nA: Hello</s>U: Bye\nA: Bye</s>"
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == full
    # fmt: off
    ids = [1, 410, 471, 467, 368, 411, 409, 417, 264, 426, 13, 471, 467, 320, 417, 13, 447, 467,
           346, 306, 414, 2,  # "▁He" "ll" "o" "</s>": the first reply, trained
           410, 471, 467, 368, 422, 411, 13, 447, 467,
           368, 422, 411, 2]  # "▁B" "y" "e" "</s>": the second reply, trained
    # fmt: on
    assert example.input_ids == ids == tok.encode(full)
    assert example.labels == [M] * 18 + ids[18:22] + [M] * 9 + ids[31:]
    # "▁He" spans the template's space and the reply's "He": a token overlapping the reply is trained.
    assert tok.decode(ids[18:21]) == "Hello" and tok.decode(ids[31:34]) == "Bye"
    # train_on_source trains everything
    assert encode_chat(tok, messages, max_len=512, train_on_source=True).labels == example.input_ids


def test_chat_template_without_end_of_turn_gets_an_eos(stories):
    tok = _stories_with_template(stories, TEST_TEMPLATE.replace(" + eos_token", ""))
    example = encode_chat(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"}], max_len=64)
    assert example.input_ids[-1] == example.labels[-1] == tok.eos_id
    assert example.input_ids[:-1] == tok.encode("<s>U: Hi\nA: Yes")


def test_chat_template_errors(stories, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}\n')
    with pytest.raises(DataError) as caught:
        load_dataset(path, stories, "chat")  # stories260K has no template
    assert caught.value.line == 1 and "cannot render" in str(caught.value) and "no chat template" in str(caught.value)
    strict = _stories_with_template(
        stories,
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}",
    )
    path.write_text(
        '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}\n'
        '{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}, '
        '{"role": "assistant", "content": "Yo"}]}\n'
    )
    with pytest.raises(DataError) as caught:
        load_dataset(path, strict, "chat")
    assert (caught.value.path, caught.value.line) == (str(path), 2) and "no system role" in str(caught.value)
    reorders = _stories_with_template(
        stories, "{% for m in messages|reverse %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    )
    with pytest.raises(DataError, match="prefix by prefix"):
        load_dataset(FIXTURES / "chat_good.jsonl", reorders)
    with pytest.raises(DataError, match="no assistant token is left"):
        load_dataset(
            FIXTURES / "chat_good.jsonl",
            _stories_with_template(stories, TEST_TEMPLATE),
            max_source_len=2,
            max_target_len=2,
        )


def test_detection_order_and_logging(stories, caplog):
    assert detect({"instruction": "a", "input": "b", "output": "c"}) == "alpaca"
    assert detect({"input": "a", "output": "b"}) == "input-output"
    assert detect({"message_id": "1", "parent_id": None, "role": "prompter", "text": "t"}) == "oasst1"
    assert detect({"prompt": {"message_id": "1"}}) == "oasst1"
    assert detect({"messages": []}) == "chat"
    assert detect({"text": "### Human: a### Assistant: b"}) == "guanaco"
    assert detect({"text": "Once"}) == "text"
    assert detect({"question": "a"}) is None and detect([1]) is None
    with caplog.at_level(logging.INFO, logger="qlora.data.formats"):
        load_dataset(FIXTURES / "io_good.jsonl", stories)
        load_dataset(FIXTURES / "guanaco_good.jsonl", stories, "text")
    assert "io_good.jsonl: data format input-output (detected from the fields)" in caplog.text
    assert "guanaco_good.jsonl: data format text (named)" in caplog.text
    # A named format validates every record as that format.
    with pytest.raises(DataError, match="missing field 'instruction'"):
        load_dataset(FIXTURES / "io_good.jsonl", stories, "alpaca")
    with pytest.raises(ValueError, match="unknown data format 'vicuna'"):
        load_dataset(FIXTURES / "io_good.jsonl", stories, "vicuna")


def test_csv_and_tsv_read_like_json(stories):
    examples, info = load_dataset(FIXTURES / "alpaca_good.csv", stories)
    assert info.format == "alpaca" and info.lines == [2, 3, 5]  # row 3 starts at line 5 (blank line 4)
    records = [
        {"instruction": "Name a color.", "input": "", "output": "Blue."},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say\nhi.", "input": "", "output": "Hi!"},
    ]
    assert examples == [encode_example(stories, *format_alpaca(r)) for r in records]
    tsv, info = load_dataset(FIXTURES / "io_good.tsv", stories)
    assert info.format == "input-output" and tsv == [encode_example(stories, "", "Hi!")]


def test_instruction_dataset_reads_every_format(stories):
    dataset = InstructionDataset.from_file(FIXTURES / "oasst_messages.jsonl", stories, format="auto")
    assert len(dataset) == 2 and dataset.lines == [1, 8]
    assert InstructionDataset.from_file(FIXTURES / "io_good.jsonl", stories, format="input-output").lines == [1, 2]


def test_plain_text_file_and_truncation_log(stories, caplog):
    with caplog.at_level(logging.WARNING, logger="qlora.data.formats"):
        examples, info = load_dataset(FIXTURES / "story.txt", stories, block_size=8)
    first_document = [ids for ids, _ in PINNED[("text_good.jsonl", "stories260K")][:2]]
    assert info.format == "text" and [e.input_ids for e in examples] == first_document
    assert info.num_truncated == 2 and "2 of 2 blocks come from documents cut into blocks of 8 tokens" in caplog.text
    whole, info = load_dataset(FIXTURES / "story.txt", stories)
    assert len(whole) == 1 and info.num_truncated == 0


def test_hub_names_and_damaged_parquet_are_clear_errors(stories):
    with pytest.raises(DataError, match="Hugging Face dataset name") as caught:
        load_dataset("timdettmers/openassistant-guanaco", stories)
    assert "Download" in str(caught.value)
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="needs the `pyarrow` package"):
            load_dataset(FIXTURES / "table.parquet", stories)
    else:
        with pytest.raises(DataError, match="cannot read the Parquet file"):
            load_dataset(FIXTURES / "table.parquet", stories)  # a file that is not Parquet inside


@pytest.mark.parametrize(("fixture", "model"), [("io_good.jsonl", "stories"), ("oasst_trees.jsonl", "stories"),
                                                ("text_good.jsonl", "stories"), ("chat_good.jsonl", "smollm2")])
def test_parquet_gives_the_examples_of_the_same_records_as_jsonl(request, tmp_path, fixture, model):
    pa = pytest.importorskip("pyarrow")
    tokenizer = request.getfixturevalue(model)
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (FIXTURES / fixture).read_text().splitlines() if line.strip()]
    path = tmp_path / fixture.replace(".jsonl", ".parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)  # nested columns (chat messages) become list<struct>
    want, want_info = load_dataset(FIXTURES / fixture, tokenizer)
    got, got_info = load_dataset(path, tokenizer)
    assert got_info.format == want_info.format
    assert [(e.input_ids, e.labels) for e in got] == [(e.input_ids, e.labels) for e in want]


# (fixture, line, field, words the message must contain)
MALFORMED = [
    ("wrong_header.csv", 1, None, "the header's columns ['prompt', 'response'] match no data format"),
    ("ragged.csv", 3, None, "the row has 2 cells but the header has 3 columns"),
    ("bad_utf8.csv", 2, None, "invalid UTF-8"),
    ("bad_quote.csv", 2, None, "malformed CSV in the row starting here"),
    ("io_missing_output.jsonl", 2, "output", "missing field 'output'"),
    ("io_mistyped_input.jsonl", 1, "input", "field 'input' must be a string (got list)"),
    ("io_blank_output.jsonl", 1, "output", "must be a non-empty string (got a blank string)"),
    ("oasst_duplicate_id.jsonl", 4, "message_id", "duplicate message_id 'a2' (first seen at line 2)"),
    ("oasst_orphan.jsonl", 3, "parent_id", "parent_id 'zz' names no message of this file"),
    ("oasst_bad_role.jsonl", 2, "role", "field 'role' must be 'prompter' or 'assistant' (got 'bot')"),
    ("oasst_bad_rank.jsonl", 2, "rank", "field 'rank' must be an integer or null (got 'first')"),
    ("oasst_assistant_root.jsonl", 1, "role", "a root message (parent_id null) must have role 'prompter'"),
    ("oasst_empty_text.jsonl", 2, "text", "field 'text' must be a non-empty string (got an empty string)"),
    ("oasst_missing_parent.jsonl", 2, "parent_id", "missing field 'parent_id'"),
    ("chat_bad_role.jsonl", 2, "role", "message 0: 'role' must be one of"),
    ("chat_no_assistant.jsonl", 1, "messages", "the conversation has no assistant message"),
    ("chat_empty_content.jsonl", 1, "content", "message 1: 'content' must be a non-empty string"),
    ("chat_not_list.jsonl", 1, "messages", "field 'messages' must be a non-empty list (got str)"),
    ("text_empty.jsonl", 2, "text", "field 'text' must be a non-empty string (got an empty string)"),
    ("text_mistyped.jsonl", 1, "text", "field 'text' must be a non-empty string (got int)"),
    ("unknown_fields.jsonl", 1, None, "cannot tell the data format from the first record's fields"),
    ("mixed_formats.jsonl", 2, "instruction", "missing field 'instruction'"),
]


@pytest.mark.parametrize(("name", "line", "field", "words"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_input_is_a_located_data_error(smollm2, name, line, field, words):
    path = FIXTURES / name
    with pytest.raises(DataError) as caught:
        load_dataset(path, smollm2)
    err = caught.value
    assert (err.path, err.line) == (str(path), line)
    if field is not None:
        assert err.field == field
    assert str(err).startswith(f"{path}:{line}: ") and words in str(err) and err.hint


def test_csv_with_the_wrong_header_for_a_named_format(smollm2):
    path = FIXTURES / "wrong_header.csv"
    with pytest.raises(DataError) as caught:
        load_dataset(path, smollm2, "alpaca")
    assert caught.value.line == 1
    assert "the header has columns ['prompt', 'response'] but the alpaca format needs ['instruction', 'output']" in str(
        caught.value
    )
