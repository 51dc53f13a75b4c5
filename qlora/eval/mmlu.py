"""MMLU accuracy with the QLoRA code's protocol: argmax over the A/B/C/D logits at the answer position.

Per example the prediction is the letter whose token (`scoring.candidate_ids`) gets the highest
next-token logit after the prompt; accuracy is computed per subject, and the reported accuracy is
the unweighted mean over subjects (QLoRA's `mmlu_<split>_accuracy`), not the mean over questions:
a subject with 100 questions counts as much as one with 1,500. The question-weighted mean is
reported beside it as `micro_accuracy`.

Under torchrun each process holds the whole model and scores every N-th question (`qlora.eval.shares`);
the predictions come back to every rank in the questions' order and are scored as one process scores
them, so the report (per-subject counts, accuracies) is the one-process report.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from qlora.distributed import Runtime
from qlora.eval.mmlu_data import LETTERS, MMLUExample
from qlora.eval.scoring import candidate_ids, encode_prompts, last_position_logits
from qlora.eval.shares import in_global_order, share_of
from qlora.tokenizer import Tokenizer


@dataclass
class MMLUResult:
    accuracy: float  # unweighted mean over subjects
    per_subject: dict[str, float]
    questions: int
    micro_accuracy: float
    predictions: list[int] = field(repr=False, default_factory=list)

    def as_dict(self) -> dict:
        return {"accuracy": self.accuracy, "per_subject": self.per_subject, "questions": self.questions,
                "micro_accuracy": self.micro_accuracy}  # fmt: skip


def score_predictions(examples: list[MMLUExample], predictions: list[int]) -> MMLUResult:
    if len(examples) != len(predictions):
        raise ValueError(f"{len(examples)} examples but {len(predictions)} predictions")
    if not examples:
        raise ValueError("no MMLU examples to score")
    hits: dict[str, list[bool]] = defaultdict(list)
    for ex, pred in zip(examples, predictions, strict=True):
        hits[ex.subject].append(pred == ex.answer)
    per_subject = {s: sum(h) / len(h) for s, h in sorted(hits.items())}
    correct = sum(sum(h) for h in hits.values())
    return MMLUResult(accuracy=sum(per_subject.values()) / len(per_subject), per_subject=per_subject,
                      questions=len(examples), micro_accuracy=correct / len(examples),
                      predictions=list(predictions))  # fmt: skip


def evaluate_mmlu(
    model, tokenizer: Tokenizer, examples: list[MMLUExample], *, batch_size: int = 8, max_length: int = 2048,
    add_bos: bool = True, letter_prefix: str = "", runtime: Runtime | None = None,
) -> MMLUResult:  # fmt: skip
    """Score `examples` (from `mmlu_data.load_examples`) with `model`; see the module docstring.

    `letter_prefix=" "` scores " A".." D" instead of QLoRA's "A".."D" (differs for byte-level BPE).
    With a distributed `runtime` (every rank holding the whole model and the same examples) rank r scores
    examples r, r + N, ... and every rank returns the report of all: a collective, every rank calls it.
    """
    runtime = runtime or Runtime()
    letters = candidate_ids(tokenizer, LETTERS, letter_prefix)
    mine = share_of(examples, runtime)
    ids = encode_prompts(tokenizer, [ex.prompt for ex in mine], add_bos=add_bos)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    logits = last_position_logits(model, ids, letters, batch_size=batch_size, max_length=max_length, pad_id=pad)
    predictions = in_global_order(logits.argmax(dim=-1).tolist(), len(examples), runtime)
    return score_predictions(examples, [int(p) for p in predictions])
