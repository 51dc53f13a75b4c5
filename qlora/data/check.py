"""`qlora data check`: read a data file the way training will, and say whether it is fit to train on.

Training on broken data fails late and quietly: a row of all -100 labels trains on nothing (and a
batch of them averages to NaN), a masked EOS teaches the model never to stop, a template that
cannot render a conversation stops the run an hour in. `check_file` runs the real loader
(`formats.load_dataset`, same tokenizer, same length limits) and then audits every example:

- fatal (the command exits 1): any `DataError` from reading/encoding (malformed JSON, bad UTF-8,
  a missing or mistyped field, blank text, a wrong CSV header, a template that cannot render, an
  empty target), reported with file and line and what to fix; an example whose labels are all
  masked; a masked EOS (an EOS right after a trained token whose own label is -100); an example
  (other than plain-text blocks, which are cut anywhere, and truncated conversations) with no
  trained EOS at all;
- statistics: records, examples, tokens, trained (target) tokens and their fraction, truncated
  examples, exact duplicates (same input ids as an earlier example), longest example.

`check(cfg)` is the command (`qlora data check FILE --model PATH [--config FILE] [options]`, parsed
by `qlora.cli`): its flags are `qlora.config.DataCheckConfig`'s, whose `data` section is `train`'s
own, so `--data.max_source_len`, `--format`, `--lang CODE` (once per language) and the rest mean
what they mean to `qlora train`, and a file is checked with the settings training will use. It
prints the report (problems first, each on its own line) and returns the exit status.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qlora.config import DataCheckConfig
from qlora.data.encode import IGNORE_INDEX, EncodedExample
from qlora.data.errors import DataError
from qlora.data.formats import FORMAT_REGISTRY, load_dataset

if TYPE_CHECKING:
    from qlora.tokenizer import Tokenizer

MAX_LISTED = 20  # problems printed one by one; the rest are counted


@dataclass
class CheckReport:
    path: str
    format: str | None = None
    records: int = 0
    examples: int = 0
    tokens: int = 0
    target_tokens: int = 0
    truncated: int = 0
    duplicates: int = 0
    longest: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def target_fraction(self) -> float:
        return self.target_tokens / self.tokens if self.tokens else 0.0

    def render(self) -> str:
        lines = [f"{p}" for p in self.problems[:MAX_LISTED]]
        if len(self.problems) > MAX_LISTED:
            lines.append(f"... and {len(self.problems) - MAX_LISTED} more problems")
        lines.append(
            f"{self.path}: format {self.format}, {self.records} records -> {self.examples} examples, "
            f"{self.tokens} tokens ({self.target_fraction:.1%} trained), longest {self.longest}, "
            f"{self.truncated} truncated, {self.duplicates} duplicates"
        )
        lines.append("OK" if self.ok else f"FAILED: {len(self.problems)} problem(s)")
        return "\n".join(lines)


def example_problems(example: EncodedExample, eos_id: int, *, needs_eos: bool) -> list[str]:
    """What is wrong with one encoded example (empty: nothing)."""
    problems = []
    labels, ids = example.labels, example.input_ids
    if all(label == IGNORE_INDEX for label in labels):
        problems.append("all labels are masked, so the example trains on nothing")
    masked_eos = [
        i
        for i in range(1, len(ids))
        if ids[i] == eos_id and labels[i] == IGNORE_INDEX and labels[i - 1] != IGNORE_INDEX
    ]
    if masked_eos:
        problems.append(f"the EOS at position {masked_eos[0]} ends a trained span but is masked")
    if (
        needs_eos
        and not example.truncated
        and not any(t == eos_id and label != IGNORE_INDEX for t, label in zip(ids, labels, strict=True))
    ):
        problems.append("no trained EOS: the model would not learn to stop")
    return problems


def check_file(
    path: str | os.PathLike,
    tokenizer: Tokenizer,
    format: str = "auto",
    *,
    max_source_len: int = 384,
    max_target_len: int = 128,
    train_on_source: bool = False,
    languages: set[str] | None = None,
    block_size: int | None = None,
) -> CheckReport:
    """Load `path` as training would and audit it (see the module docstring)."""
    report = CheckReport(str(path))
    try:
        examples, info = load_dataset(
            path,
            tokenizer,
            format,
            max_source_len=max_source_len,
            max_target_len=max_target_len,
            train_on_source=train_on_source,
            languages=languages,
            block_size=block_size,
        )
    except DataError as err:
        report.problems.append(str(err))
        return report
    report.format, report.records, report.examples = info.format, info.num_records, info.num_examples
    report.truncated = info.num_truncated
    seen: set[tuple[int, ...]] = set()
    for example, line in zip(examples, info.lines, strict=True):
        report.tokens += len(example)
        report.target_tokens += sum(label != IGNORE_INDEX for label in example.labels)
        report.longest = max(report.longest, len(example))
        key = tuple(example.input_ids)
        if key in seen:
            report.duplicates += 1
        seen.add(key)
        for problem in example_problems(example, tokenizer.eos_id, needs_eos=info.format != "text"):
            report.problems.append(f"{path}:{line}: {problem}.")
    return report


def check(cfg: DataCheckConfig) -> int:
    """`qlora data check`: check `cfg.data` with the tokenizer of `cfg.model` and print the report. Returns 0 when
    the file is fit to train on, 1 when not, 2 when the check cannot run as asked (no tokenizer, unknown format)."""
    d = cfg.data
    if d.format != "auto" and d.format not in FORMAT_REGISTRY:
        print(f"qlora data check: error: --format / data.format: unknown data format {d.format!r}; use auto or "
              f"one of {', '.join(FORMAT_REGISTRY)}", file=sys.stderr)  # fmt: skip
        return 2
    from qlora.loading import resolve_model_path
    from qlora.tokenizer import Tokenizer

    try:
        tokenizer = Tokenizer.from_pretrained(resolve_model_path(cfg.model))
    except (OSError, ValueError) as err:
        print(f"qlora data check: error: cannot load the tokenizer of {cfg.model}: {err}", file=sys.stderr)
        return 2
    report = check_file(
        d.path,
        tokenizer,
        d.format,
        max_source_len=d.max_source_len,
        max_target_len=d.max_target_len,
        train_on_source=d.train_on_source,
        languages=set(d.languages) if d.languages else None,
        block_size=d.block_size,
    )
    print(report.render(), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1
