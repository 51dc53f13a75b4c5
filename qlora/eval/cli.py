"""`qlora eval`: perplexity and MMLU of a model (+ adapter); `answer`, `judge` and `datatypes` modes.

    qlora eval --model PATH [--adapter DIR] [--perplexity FILE] [--mmlu DIR|FILE --shots K] [--output FILE.json]
    qlora eval answer    --model PATH [--adapter DIR] --questions FILE.jsonl --output ANSWERS.jsonl
    qlora eval judge     --answers A.jsonl B.jsonl [...] (--judge-url URL --judge-model NAME | --judge-local PATH)
    qlora eval datatypes --model PATH --text FILE [--max-tokens N] [--output FILE.json]

Results are printed as a table; `--output` also writes them as JSON. Each mode is a thin shell over
the library functions of this package; its flags come from its typed configuration
(`qlora.config.EvalConfig`, `AnswerConfig`, `JudgeConfig`, `DatatypesConfig`), every model is loaded
by `qlora.loading.load`, and `--dtype` (the compute dtype) defaults to `auto`.

Perplexity and MMLU run on many processes too: `torchrun --nproc-per-node=N -m qlora eval ...` starts one
process per GPU, each holding the whole model on its own GPU (the model is not sharded for evaluation),
and each scores every N-th window or question (`qlora.eval.shares`); the report equals the one-process
report. Rank 0 alone prints and writes `--output`. Without torchrun nothing changes: one process, no
process group.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from qlora.cli_args import parse_config_args
from qlora.config import AnswerConfig, DatatypesConfig, EvalConfig, JudgeConfig, ModelSource


def _load(source: ModelSource, device=None):
    """(model, tokenizer) of `source` through `qlora.loading.load`, the one loader of every command;
    `device` (a `torch.device`) in place of the source's, e.g. this rank's GPU."""
    from qlora.loading import load

    fields = dataclasses.asdict(source)
    if device is not None:
        fields["device"] = device
    loaded = load(**fields)
    return loaded.model, loaded.tokenizer


def _write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {path}")


def evaluate(argv: Sequence[str]) -> int:
    cfg = parse_config_args(EvalConfig, argv, prog="qlora eval", epilog="Modes: qlora eval {answer,judge,datatypes} "
                            "--help. Precedence: built-in defaults < --config FILE < flags.")  # fmt: skip

    from qlora.distributed import Runtime

    runtime = Runtime.from_env(cfg.model.device)  # torchrun's job, or a world of one
    try:
        if not runtime.is_main:  # rank 0 speaks for the job (the others do the same work: errors only)
            logging.getLogger("qlora").setLevel(logging.ERROR)
        results, rows = _perplexity_and_mmlu(cfg, runtime)
        if runtime.is_main:
            width = max(len(r[0]) for r in rows)
            for name, value, note in rows:
                print(f"{name:<{width}}  {value:>8}  {note}")
            _write_json(cfg.output, results)
        return 0
    finally:
        runtime.shutdown()


def _perplexity_and_mmlu(cfg: EvalConfig, runtime) -> tuple[dict, list[tuple[str, str, str]]]:
    """(the JSON report, the table's rows), the same on every rank; each rank scores its share (`Runtime`)."""
    from qlora.eval.mmlu import evaluate_mmlu
    from qlora.eval.mmlu_data import load_examples
    from qlora.eval.perplexity import perplexity, text_ids

    model, tokenizer = _load(cfg.model, device=runtime.device)
    results: dict = {"model": cfg.model.path, "adapter": cfg.model.adapter, "quant_type": cfg.model.quant_type}
    rows = []
    ppl_cfg, mmlu_cfg = cfg.perplexity, cfg.mmlu
    if ppl_cfg.file:
        max_length = min(ppl_cfg.max_length, model.config.max_position_embeddings)
        stride = min(ppl_cfg.stride, max_length)
        ids = text_ids(tokenizer, ppl_cfg.file, ppl_cfg.max_tokens)
        ppl = perplexity(model, ids, max_length=max_length, stride=stride, runtime=runtime)
        results["perplexity"] = ppl.perplexity
        results["perplexity_detail"] = {**ppl.as_dict(), "file": ppl_cfg.file, "max_length": max_length,
                                        "stride": stride}  # fmt: skip
        rows.append(("perplexity", f"{ppl.perplexity:.4f}", f"{ppl.tokens} tokens, {ppl.windows} windows"))
    if mmlu_cfg.path:
        examples = load_examples(mmlu_cfg.path, mmlu_cfg.shots, mmlu_cfg.split, mmlu_cfg.subjects, mmlu_cfg.limit)
        mmlu = evaluate_mmlu(model, tokenizer, examples, batch_size=cfg.batch_size,
                             letter_prefix=" " if mmlu_cfg.letters == "space" else "", runtime=runtime)  # fmt: skip
        shots = mmlu_cfg.shots if Path(mmlu_cfg.path).is_dir() else "as written"
        results["mmlu"] = {**mmlu.as_dict(), "source": mmlu_cfg.path, "shots": shots}
        rows += [(f"mmlu {s}", f"{a:.4f}", "") for s, a in mmlu.per_subject.items()]
        note = f"mean of {len(mmlu.per_subject)} subjects, {mmlu.questions} questions, {shots} shots"
        rows.append(("mmlu accuracy", f"{mmlu.accuracy:.4f}", note))
    return results, rows


def answer(argv: Sequence[str]) -> int:
    cfg = parse_config_args(AnswerConfig, argv, prog="qlora eval answer")

    from qlora.eval.benchmarks import answer_questions, read_questions, write_answers

    questions = read_questions(cfg.questions)[: cfg.limit]
    model, tokenizer = _load(cfg.model)
    model_id = cfg.model_id or (cfg.model.adapter or cfg.model.path)
    s = cfg.sampling
    answers = answer_questions(model, tokenizer, questions, model_id=model_id, template=cfg.template,
                               batch_size=cfg.batch_size, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                               top_p=s.top_p, seed=s.seed)  # fmt: skip
    write_answers(cfg.output, answers)
    print(f"{len(answers)} answers by {model_id} written to {cfg.output}")
    return 0


def judge(argv: Sequence[str]) -> int:
    cfg = parse_config_args(JudgeConfig, argv, prog="qlora eval judge")

    import os

    from qlora.eval.benchmarks import read_answers
    from qlora.eval.elo import elo_table, format_elo_table
    from qlora.eval.judge import LocalModelJudge, OpenAIJudge, judge_all_pairs

    answer_sets = [read_answers(path) for path in cfg.answers]
    if cfg.judge_url:
        verdict = OpenAIJudge(cfg.judge_url, cfg.judge_model, api_key=os.environ.get(cfg.api_key_env))
    else:
        verdict = LocalModelJudge(*_load(cfg.judge_source()))
    judgments = judge_all_pairs(verdict, answer_sets)
    if cfg.judgments:
        Path(cfg.judgments).write_text("".join(json.dumps(j) + "\n" for j in judgments), encoding="utf-8")
    table = elo_table(judgments, initial=cfg.initial, k=cfg.k, orderings=cfg.orderings, seed=cfg.seed)
    print(format_elo_table(table))
    _write_json(cfg.output, {"elo": table, "games": len(judgments), "k": cfg.k, "initial": cfg.initial,
                             "orderings": cfg.orderings})  # fmt: skip
    return 0


def datatypes(argv: Sequence[str]) -> int:
    cfg = parse_config_args(DatatypesConfig, argv, prog="qlora eval datatypes")

    from qlora.eval.datatypes import datatype_table, format_table, rows_as_dicts
    from qlora.precision import dtype_name, resolve_compute_dtype, resolve_device

    device = resolve_device(cfg.device)
    dtype, reason = resolve_compute_dtype(cfg.compute_dtype, device)
    logging.getLogger(__name__).info("%s", reason)
    text = cfg.perplexity
    rows = datatype_table(cfg.model, text.file, max_tokens=text.max_tokens, max_length=text.max_length,
                          stride=text.stride, dtype=dtype, device=device)  # fmt: skip
    print(format_table(rows))
    command = "qlora eval datatypes " + " ".join(argv)
    _write_json(cfg.output, {"model": cfg.model, "text": text.file, "max_tokens": text.max_tokens,
                             "max_length": text.max_length, "stride": text.stride, "dtype": dtype_name(dtype),
                             "command": command, "rows": rows_as_dicts(rows)})  # fmt: skip
    return 0


MODES = {"answer": answer, "judge": judge, "datatypes": datatypes}


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to a mode; errors a user can fix print one line and exit with status 2."""
    from qlora.adapter import AdapterError
    from qlora.checkpoint_io import CheckpointError, GGUFError
    from qlora.config import ConfigError
    from qlora.eval.benchmarks import BenchmarkFileError
    from qlora.eval.judge import JudgeError
    from qlora.eval.mmlu_data import MMLUDataError
    from qlora.eval.scoring import ScoringError
    from qlora.loading import ModelSourceError
    from qlora.model.config import UnsupportedModelError

    argv = list(sys.argv[1:] if argv is None else argv)
    mode = argv[0] if argv and argv[0] in MODES else None
    try:
        return MODES[mode](argv[1:]) if mode else evaluate(argv)
    except (
        MMLUDataError,
        BenchmarkFileError,
        JudgeError,
        ScoringError,
        AdapterError,
        ConfigError,
        ModelSourceError,
        CheckpointError,
        GGUFError,
        UnsupportedModelError,
        FileNotFoundError,
    ) as e:
        print(f"qlora eval{' ' + mode if mode else ''}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
