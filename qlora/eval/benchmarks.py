"""Benchmark prompt files in, answers out: what the paper's pairwise judging (and Elo) compares.

Question files read (one JSON object per line):

- QLoRA's `vicuna_questions.jsonl`: `{question_id, text, category}`;
- FastChat's `mt_bench_question.jsonl` / `vicuna_bench_question.jsonl`: `{question_id, category,
  turns}`; only the first turn is asked (the paper's protocol is single-turn);
- QLoRA's `oa_questions.jsonl`: `{question_id, input, prompt, output, ...}`, the dialogue already
  written in the Guanaco format ("### Human: ... ### Assistant:", earlier turns included), `prompt`
  the same with the Guanaco system line before it (what QLoRA generated from), `output` the OASST
  reference reply. Without a `question_id` the line number is the id.

The prompt around a question (`template`): `chat` uses the tokenizer's chat template; `guanaco`
the Guanaco inference prompt of the QLoRA repository (examples/guanaco_generate.py: the system
line, then "### Human: {question}### Assistant: "); `raw` the text as it is (OA: its `prompt`); `auto` is raw
for files that carry their own format (`input`), else chat when the tokenizer has a template, else
guanaco. Answers are JSONL `{question_id, category, question, prompt, text, model_id}` ("text" is
the answer: the key QLoRA's and FastChat's review scripts read).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from qlora.generate import generate, render_prompt
from qlora.tokenizer import Tokenizer

GUANACO_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)


class BenchmarkFileError(ValueError):
    """A question or answer file that cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class Question:
    question_id: int | str
    category: str
    text: str  # the question as a user would ask it (OA: the whole formatted dialogue)
    preformatted: bool = False  # True when `text` is already formatted (OA's Guanaco dialogue)
    full_prompt: str | None = None  # OA: the dialogue with the system line, as QLoRA prompted


@dataclass(frozen=True)
class Answer:
    question_id: int | str
    category: str
    question: str
    prompt: str
    text: str
    model_id: str


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise BenchmarkFileError(f"{path}: not found")
    out = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchmarkFileError(f"{path}:{line_no}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise BenchmarkFileError(f"{path}:{line_no}: expected a JSON object")
        out.append((line_no, record))
    return out


def read_questions(path: str | Path) -> list[Question]:
    """The questions of a QLoRA or FastChat benchmark file (see the module docstring)."""
    path = Path(path)
    questions = []
    for line_no, rec in _read_jsonl(path):
        qid = rec.get("question_id", line_no)
        category = str(rec.get("category", ""))
        if isinstance(rec.get("turns"), list) and rec["turns"]:
            questions.append(Question(qid, category, str(rec["turns"][0])))
        elif isinstance(rec.get("input"), str):
            prompt = rec.get("prompt") if isinstance(rec.get("prompt"), str) else None
            questions.append(Question(qid, category or "oasst", rec["input"], preformatted=True, full_prompt=prompt))
        elif isinstance(rec.get("text"), str):
            questions.append(Question(qid, category, rec["text"]))
        else:
            raise BenchmarkFileError(f"{path}:{line_no}: no question found (expected 'turns', 'text' or 'input')")
    if not questions:
        raise BenchmarkFileError(f"{path}: no questions")
    return questions


def build_prompt(tokenizer: Tokenizer, question: Question, template: str = "auto") -> str:
    if template == "auto":
        template = "raw" if question.preformatted else ("chat" if tokenizer.chat_template else "guanaco")
    if template == "raw":
        return question.full_prompt or question.text
    if template == "chat":
        return render_prompt(tokenizer, question.text, use_chat_template=True)
    if template == "guanaco":
        return f"{GUANACO_SYSTEM} ### Human: {question.text}### Assistant: "
    raise ValueError(f"unknown template {template!r} (auto, chat, guanaco, raw)")


def answer_questions(
    model, tokenizer: Tokenizer, questions: list[Question], *, model_id: str, template: str = "auto",
    batch_size: int = 8, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
) -> list[Answer]:  # fmt: skip
    """Generate an answer to each question (greedy by default; the paper sampled top-p 0.9, T 0.7)."""
    prompts = [build_prompt(tokenizer, q, template) for q in questions]
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        texts += generate(model, tokenizer, prompts[start : start + batch_size], max_new_tokens=max_new_tokens,
                          temperature=temperature, top_p=top_p, seed=seed + start)  # fmt: skip
    # a Guanaco-format model continues with the next "### Human:" turn; the answer ends before it
    texts = [t.split("### Human:")[0].strip() for t in texts]
    return [Answer(q.question_id, q.category, q.text, p, t, model_id)
            for q, p, t in zip(questions, prompts, texts, strict=True)]  # fmt: skip


def write_answers(path: str | Path, answers: list[Answer]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(json.dumps(asdict(a), ensure_ascii=False) + "\n" for a in answers), encoding="utf-8")


def read_answers(path: str | Path) -> list[Answer]:
    """Answers written by `write_answers` (all from one model)."""
    path = Path(path)
    out = []
    for line_no, rec in _read_jsonl(path):
        missing = [k for k in ("question_id", "question", "text", "model_id") if k not in rec]
        if missing:
            raise BenchmarkFileError(f"{path}:{line_no}: answer lacks {missing}")
        out.append(Answer(rec["question_id"], rec.get("category", ""), rec["question"], rec.get("prompt", ""),
                          rec["text"], rec["model_id"]))  # fmt: skip
    if len({a.model_id for a in out}) > 1:
        raise BenchmarkFileError(f"{path}: answers from several models ({sorted({a.model_id for a in out})})")
    return out
