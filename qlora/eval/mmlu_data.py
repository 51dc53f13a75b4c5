"""MMLU questions and prompts: the CSV release and the QLoRA repository's JSON, in one shape.

Two sources are read:

- **CSV directories** (`<dir>/dev/<subject>_dev.csv`, `<dir>/test/<subject>_test.csv`, optionally
  `val/`): header `question,choice0,choice1,choice2,choice3,answer`, answer an index 0-3 (the
  layout of ../shared/data/mmlu/cais-mmlu-csv). The original Hendrycks CSVs have no header and the
  answer as a letter; both are accepted.
- **QLoRA's JSON** (`zero_shot_mmlu_{val,test}.json`, `five_shot_mmlu_{val,test}.json`): one JSON
  object per line, `{"subject", "input", "output"}`, the prompt already written out and the answer a
  letter. A JSON array of the same objects is accepted too.

Prompts follow the MMLU paper's evaluation code (Hendrycks et al., `evaluate.py`), which is also
how QLoRA's JSON files were written (checked against zero_shot_mmlu_val.json in the tests):

    The following are multiple choice questions (with answers) about  <subject words>.\\n\\n
    [k solved dev examples: <question>\\nA. <a>\\nB. <b>\\nC. <c>\\nD. <d>\\nAnswer: <X>\\n\\n]
    <question>\\nA. <a>\\nB. <b>\\nC. <c>\\nD. <d>\\nAnswer:

(two spaces after "about": the subject is joined as " " + word for each word). The k-shot examples
are the first k dev questions of the same subject, as in that code.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

LETTERS = ("A", "B", "C", "D")


class MMLUDataError(ValueError):
    """An MMLU file that cannot be read; the message names the file and row."""


@dataclass(frozen=True)
class MMLUQuestion:
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # 0..3


@dataclass(frozen=True)
class MMLUExample:
    """A prompt ready for scoring: the text ends at "Answer:", the answer is an index into LETTERS."""

    subject: str
    prompt: str
    answer: int


def subject_header(subject: str) -> str:
    words = "".join(" " + w for w in subject.split("_"))
    return f"The following are multiple choice questions (with answers) about {words}.\n\n"


def format_question(q: MMLUQuestion, with_answer: bool) -> str:
    text = q.question + "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices, strict=True))
    text += "\nAnswer:"
    return text + f" {LETTERS[q.answer]}\n\n" if with_answer else text


def build_prompt(q: MMLUQuestion, shots: list[MMLUQuestion]) -> str:
    return subject_header(q.subject) + "".join(format_question(s, True) for s in shots) + format_question(q, False)


def _parse_answer(value: str, where: str) -> int:
    v = value.strip()
    if v in LETTERS:
        return LETTERS.index(v)
    if v in ("0", "1", "2", "3"):
        return int(v)
    raise MMLUDataError(f"{where}: answer {value!r} is neither A-D nor 0-3")


def read_csv_split(path: Path, subject: str) -> list[MMLUQuestion]:
    """One subject's CSV (with or without the `question,choice0,...` header)."""
    out = []
    with path.open(newline="", encoding="utf-8") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if line_no == 1 and row and row[0] == "question":
                continue
            where = f"{path}:{line_no}"
            if len(row) != 6:
                raise MMLUDataError(f"{where}: expected 6 columns (question, 4 choices, answer), got {len(row)}")
            out.append(MMLUQuestion(subject, row[0], tuple(row[1:5]), _parse_answer(row[5], where)))
    return out


def read_csv_dir(directory: str | Path, split: str = "test") -> dict[str, list[MMLUQuestion]]:
    """{subject: questions} of `<directory>/<split>/<subject>_<split>.csv`, subjects sorted."""
    d = Path(directory) / split
    files = sorted(d.glob(f"*_{split}.csv"))
    if not files:
        raise MMLUDataError(f"{d}: no *_{split}.csv files (expected MMLU's <subject>_{split}.csv layout)")
    return {f.name.removesuffix(f"_{split}.csv"): read_csv_split(f, f.name.removesuffix(f"_{split}.csv"))
            for f in files}  # fmt: skip


def examples_from_csv(
    directory: str | Path, shots: int = 5, split: str = "test", subjects: list[str] | None = None
) -> list[MMLUExample]:
    """Prompts for `split` with `shots` solved dev examples of the same subject before each question."""
    questions = read_csv_dir(directory, split)
    dev = read_csv_dir(directory, "dev") if shots else {}
    if subjects:
        unknown = sorted(set(subjects) - set(questions))
        if unknown:
            raise MMLUDataError(f"{directory}: unknown subjects {unknown}; known: {sorted(questions)}")
        questions = {s: questions[s] for s in subjects}
    out = []
    for subject, qs in questions.items():
        pool = dev.get(subject, [])
        if len(pool) < shots:
            raise MMLUDataError(f"{directory}/dev: {subject} has {len(pool)} dev questions, {shots} shots asked")
        out += [MMLUExample(subject, build_prompt(q, pool[:shots]), q.answer) for q in qs]
    return out


def examples_from_qlora_json(path: str | Path, subjects: list[str] | None = None) -> list[MMLUExample]:
    """QLoRA's `{subject, input, output}` records (JSON lines, or one JSON array)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as e:
            raise MMLUDataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    else:
        records = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append((line_no, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise MMLUDataError(f"{path}:{line_no}: invalid JSON ({e.msg})") from None
    out = []
    for where, rec in records:
        missing = [k for k in ("subject", "input", "output") if not isinstance(rec, dict) or k not in rec]
        if missing:
            raise MMLUDataError(f"{path}:{where}: record lacks {missing} (QLoRA's MMLU format)")
        if subjects and rec["subject"] not in subjects:
            continue
        out.append(MMLUExample(rec["subject"], rec["input"], _parse_answer(rec["output"], f"{path}:{where}")))
    return out


def load_examples(
    source: str | Path, shots: int = 5, split: str = "test", subjects: list[str] | None = None,
    limit_per_subject: int | None = None,
) -> list[MMLUExample]:  # fmt: skip
    """A CSV directory (prompts built with `shots`) or a QLoRA JSON file (prompts as written);
    `limit_per_subject` keeps the first N questions of each subject (a quick, smaller MMLU)."""
    p = Path(source)
    if p.is_dir():
        examples = examples_from_csv(p, shots, split, subjects)
    elif p.is_file():
        examples = examples_from_qlora_json(p, subjects)
    else:
        raise MMLUDataError(
            f"{p}: not found (give an MMLU CSV directory with dev/ and test/, or a QLoRA MMLU JSON file)"
        )
    if limit_per_subject is None:
        return examples
    seen: dict[str, int] = {}
    kept = []
    for e in examples:
        seen[e.subject] = seen.get(e.subject, 0) + 1
        if seen[e.subject] <= limit_per_subject:
            kept.append(e)
    return kept
