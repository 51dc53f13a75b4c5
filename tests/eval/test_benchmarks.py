"""Benchmark prompt files: the three formats read, prompts built, answers generated and round-tripped."""

import json

import pytest
import torch

import qlora
from qlora.eval.benchmarks import (
    GUANACO_SYSTEM,
    BenchmarkFileError,
    Question,
    answer_questions,
    build_prompt,
    read_answers,
    read_questions,
    write_answers,
)
from qlora.tokenizer import Tokenizer


def test_the_three_benchmark_files_read(shared_dir):
    vicuna = read_questions(shared_dir / "data/eval/qlora/vicuna_questions.jsonl")
    assert len(vicuna) == 80 and vicuna[0] == Question(1, "generic", "How can I improve my time management skills?")
    mt = read_questions(shared_dir / "data/eval/fastchat-llm_judge/mt_bench_question.jsonl")
    assert len(mt) == 80 and mt[0].question_id == 81 and mt[0].text.startswith("Compose an engaging travel blog")
    assert "Rewrite your previous response" not in mt[0].text  # first turn only
    oa = read_questions(shared_dir / "data/eval/qlora/oa_questions.jsonl")
    assert len(oa) == 953 and all(q.preformatted and q.text.startswith("### Human:") for q in oa)
    assert oa[5].full_prompt == f"{GUANACO_SYSTEM} {oa[5].text}" and oa[5].question_id == oa[5].question_id.strip()


def test_prompt_templates(stories260k_dir):
    tok = Tokenizer.from_pretrained(stories260k_dir)  # no chat template
    q = Question(1, "generic", "Why is the sky blue?")
    assert build_prompt(tok, q) == f"{GUANACO_SYSTEM} ### Human: Why is the sky blue?### Assistant: "
    assert build_prompt(tok, q, "raw") == "Why is the sky blue?"
    oa = Question(7, "oasst", "### Human: Hi ### Assistant:", preformatted=True)
    assert build_prompt(tok, oa) == oa.text
    assert build_prompt(tok, Question(7, "", oa.text, True, "SYSTEM " + oa.text)) == "SYSTEM " + oa.text
    with pytest.raises(ValueError, match="unknown template"):
        build_prompt(tok, q, "alpaca")


def test_answers_are_generated_and_round_trip(stories260k_dir, tmp_path):
    model = qlora.load_model(stories260k_dir, "nf4", compute_dtype=torch.float32, device="cpu")
    tok = Tokenizer.from_pretrained(stories260k_dir)
    qs = [Question(1, "story", "Once upon a time"), Question(2, "story", "Lily had a dog")]
    out = answer_questions(model, tok, qs, model_id="s260k", template="raw", max_new_tokens=8, batch_size=1)
    assert [a.question_id for a in out] == [1, 2] and all(a.text for a in out)
    assert out[0].text.startswith(", there was a little girl")  # the checkpoint's published sample
    path = tmp_path / "answers.jsonl"
    write_answers(path, out)
    assert read_answers(path) == out
    assert json.loads(path.read_text().splitlines()[0])["text"] == out[0].text


def test_bad_files_name_the_line(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text('{"text": "ok"}\n')
    assert read_questions(p)[0].question_id == 1  # no question_id: the line number is the id
    p.write_text('{"text": "ok"}\n{"nothing": 1}\n')
    with pytest.raises(BenchmarkFileError, match=r"q.jsonl:2: no question found"):
        read_questions(p)
    p.write_text('{"text": "ok"}\n{bad json\n')
    with pytest.raises(BenchmarkFileError, match=r"q.jsonl:2: invalid JSON"):
        read_questions(p)
    a = tmp_path / "a.jsonl"
    a.write_text('{"question_id": 1, "question": "q", "text": "t"}\n')
    with pytest.raises(BenchmarkFileError, match=r"a.jsonl:1: answer lacks \['model_id'\]"):
        read_answers(a)
