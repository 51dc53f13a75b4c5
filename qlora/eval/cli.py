"""`qlora eval`: perplexity and MMLU of a model (+ adapter); `answer`, `judge` and `datatypes` modes.

    qlora eval --model PATH [--adapter DIR] [--perplexity FILE] [--mmlu DIR|FILE --shots K] [--output FILE.json]
    qlora eval answer    --model PATH [--adapter DIR] --questions FILE.jsonl --output ANSWERS.jsonl
    qlora eval judge     --answers A.jsonl B.jsonl [...] (--judge-url URL --judge-model NAME | --judge-local PATH)
    qlora eval datatypes --model PATH --text FILE [--max-tokens N] [--output FILE.json]

Results are printed as a table; `--output` also writes them as JSON. Each mode is a thin shell over
the library functions of this package.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

DTYPES = ("bfloat16", "float16", "float32")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Model directory, .gguf file or hub id.")
    p.add_argument("--adapter", help="A LoRA adapter directory (ours or PEFT's) applied on the base.")
    p.add_argument(
        "--quant-type",
        default="nf4",
        choices=["nf4", "fp4", "int4", "none"],
        help="How the base is stored (default nf4 + double quantization; none = 16-bit).",
    )
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="Compute dtype.")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=8)


def _load(args):
    import torch

    from qlora.adapter import load_adapter_weights, read_adapter_config
    from qlora.loading import load_model
    from qlora.tokenizer import Tokenizer
    from qlora.train.loop import resolve_device

    lora = read_adapter_config(args.adapter) if args.adapter else None
    quant = None if args.quant_type == "none" else args.quant_type
    model = load_model(args.model, quant, True, getattr(torch, args.dtype), resolve_device(args.device), lora=lora)
    if args.adapter:
        load_adapter_weights(model, args.adapter)
    return model.eval(), Tokenizer.from_pretrained(args.model)


def _write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {path}")


def evaluate(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="qlora eval",
        allow_abbrev=False,
        description="Perplexity and MMLU of a model (+ adapter).",
        epilog="Modes: qlora eval {answer,judge,datatypes} --help",
    )
    _model_args(p)
    p.add_argument("--perplexity", metavar="FILE", help="Text file for sliding-window perplexity.")
    p.add_argument("--max-length", type=int, default=1024, help="Perplexity window (tokens; capped at the context).")
    p.add_argument("--stride", type=int, default=512, help="Perplexity stride (tokens).")
    p.add_argument("--max-tokens", type=int, help="Score only the first N tokens of the text.")
    p.add_argument("--mmlu", metavar="DIR|FILE", help="MMLU CSV directory (dev/, test/) or a QLoRA MMLU JSON file.")
    p.add_argument("--shots", type=int, default=5, help="Solved dev examples before each question (CSV only).")
    p.add_argument("--split", default="test", help="MMLU CSV split to score (test, val).")
    p.add_argument("--subjects", nargs="+", help="Only these MMLU subjects.")
    p.add_argument("--limit", type=int, help="Only the first N questions of each MMLU subject.")
    p.add_argument(
        "--letters",
        default="qlora",
        choices=["qlora", "space"],
        help="qlora: logits of tokenizer('A')[0] as the QLoRA code; space: of ' A' (lm-eval style).",
    )
    p.add_argument("--output", metavar="FILE.json", help="Also write the results here as JSON.")
    args = p.parse_args(argv)
    if not (args.perplexity or args.mmlu):
        p.error("nothing to evaluate: give --perplexity FILE and/or --mmlu DIR")

    from qlora.eval.mmlu import evaluate_mmlu
    from qlora.eval.mmlu_data import load_examples
    from qlora.eval.perplexity import perplexity, text_ids

    model, tokenizer = _load(args)
    results: dict = {"model": args.model, "adapter": args.adapter, "quant_type": args.quant_type}
    rows = []
    if args.perplexity:
        max_length = min(args.max_length, model.config.max_position_embeddings)
        ids = text_ids(tokenizer, args.perplexity, args.max_tokens)
        ppl = perplexity(model, ids, max_length=max_length, stride=min(args.stride, max_length))
        results["perplexity"] = ppl.perplexity
        results["perplexity_detail"] = {
            **ppl.as_dict(),
            "file": args.perplexity,
            "max_length": max_length,
            "stride": min(args.stride, max_length),
        }
        rows.append(("perplexity", f"{ppl.perplexity:.4f}", f"{ppl.tokens} tokens, {ppl.windows} windows"))
    if args.mmlu:
        examples = load_examples(args.mmlu, args.shots, args.split, args.subjects, args.limit)
        mmlu = evaluate_mmlu(
            model, tokenizer, examples, batch_size=args.batch_size, letter_prefix=" " if args.letters == "space" else ""
        )
        shots = args.shots if Path(args.mmlu).is_dir() else "as written"
        results["mmlu"] = {**mmlu.as_dict(), "source": args.mmlu, "shots": shots}
        rows += [(f"mmlu {s}", f"{a:.4f}", "") for s, a in mmlu.per_subject.items()]
        rows.append(
            (
                "mmlu accuracy",
                f"{mmlu.accuracy:.4f}",
                f"mean of {len(mmlu.per_subject)} subjects, {mmlu.questions} questions, {shots} shots",
            )
        )
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>8}  {note}")
    _write_json(args.output, results)
    return 0


def answer(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="qlora eval answer",
        allow_abbrev=False,
        description="Answer a benchmark prompt file (Vicuna, MT-bench, OA); JSONL out.",
    )
    _model_args(p)
    p.add_argument(
        "--questions",
        required=True,
        help="vicuna_questions.jsonl, mt_bench_question.jsonl, oa_questions.jsonl or any JSONL with text/turns/input.",
    )
    p.add_argument("--output", required=True, metavar="ANSWERS.jsonl")
    p.add_argument("--model-id", help="Name recorded with each answer (default: the model/adapter path).")
    p.add_argument("--template", default="auto", choices=["auto", "chat", "guanaco", "raw"])
    p.add_argument("--limit", type=int, help="Only the first N questions.")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from qlora.eval.benchmarks import answer_questions, read_questions, write_answers

    questions = read_questions(args.questions)[: args.limit]
    model, tokenizer = _load(args)
    model_id = args.model_id or (args.adapter or args.model)
    answers = answer_questions(
        model,
        tokenizer,
        questions,
        model_id=model_id,
        template=args.template,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    write_answers(args.output, answers)
    print(f"{len(answers)} answers by {model_id} written to {args.output}")
    return 0


def judge(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="qlora eval judge",
        allow_abbrev=False,
        description="Judge answer files pairwise (both orders) and rate them by Elo.",
    )
    p.add_argument("--answers", nargs="+", required=True, help="Two or more answer JSONL files (qlora eval answer).")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--judge-url", help="Base URL of an OpenAI-compatible API (…/v1); POSTs /chat/completions.")
    g.add_argument("--judge-local", metavar="PATH", help="A local model as judge (logits of 1/2/3).")
    p.add_argument("--judge-model", default="gpt-4", help="Model name sent to the endpoint.")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="Environment variable holding the API key.")
    p.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4", "int4", "none"])
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    p.add_argument("--device", default="auto")
    p.add_argument("--orderings", type=int, default=10_000, help="Random orderings of the games (the paper: 10,000).")
    p.add_argument("--k", type=float, default=32.0, help="Elo K-factor (the paper: 32).")
    p.add_argument("--initial", type=float, default=1000.0, help="Initial Elo rating (the paper: 1,000).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--judgments", metavar="FILE.jsonl", help="Write every judgment here.")
    p.add_argument("--output", metavar="FILE.json", help="Write the Elo table here.")
    args = p.parse_args(argv)

    import os

    from qlora.eval.benchmarks import read_answers
    from qlora.eval.elo import elo_table, format_elo_table
    from qlora.eval.judge import LocalModelJudge, OpenAIJudge, judge_all_pairs

    answer_sets = [read_answers(path) for path in args.answers]
    if args.judge_url:
        verdict = OpenAIJudge(args.judge_url, args.judge_model, api_key=os.environ.get(args.api_key_env))
    else:
        ns = argparse.Namespace(
            model=args.judge_local, adapter=None, quant_type=args.quant_type, dtype=args.dtype, device=args.device
        )
        verdict = LocalModelJudge(*_load(ns))
    judgments = judge_all_pairs(verdict, answer_sets)
    if args.judgments:
        Path(args.judgments).write_text("".join(json.dumps(j) + "\n" for j in judgments), encoding="utf-8")
    table = elo_table(judgments, initial=args.initial, k=args.k, orderings=args.orderings, seed=args.seed)
    print(format_elo_table(table))
    _write_json(
        args.output,
        {"elo": table, "games": len(judgments), "k": args.k, "initial": args.initial, "orderings": args.orderings},
    )
    return 0


def datatypes(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="qlora eval datatypes",
        allow_abbrev=False,
        description="The paper's data-type table: perplexity and bits/param per 4-bit type.",
    )
    p.add_argument("--model", required=True)
    p.add_argument("--text", required=True, help="Text file (e.g. wiki.test.raw).")
    p.add_argument("--max-tokens", type=int, help="Score only the first N tokens.")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--stride", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", metavar="FILE.json")
    args = p.parse_args(argv)

    import torch

    from qlora.eval.datatypes import datatype_table, format_table, rows_as_dicts

    rows = datatype_table(
        args.model,
        args.text,
        max_tokens=args.max_tokens,
        max_length=args.max_length,
        stride=args.stride,
        dtype=getattr(torch, args.dtype),
        device=args.device,
    )
    print(format_table(rows))
    _write_json(
        args.output,
        {
            "model": args.model,
            "text": args.text,
            "max_tokens": args.max_tokens,
            "max_length": args.max_length,
            "stride": args.stride,
            "dtype": args.dtype,
            "command": "qlora eval datatypes " + " ".join(argv),
            "rows": rows_as_dicts(rows),
        },
    )
    return 0


MODES = {"answer": answer, "judge": judge, "datatypes": datatypes}


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to a mode; errors a user can fix print one line and exit with status 2."""
    from qlora.adapter import AdapterError
    from qlora.eval.benchmarks import BenchmarkFileError
    from qlora.eval.judge import JudgeError
    from qlora.eval.mmlu_data import MMLUDataError
    from qlora.eval.scoring import ScoringError
    from qlora.loading import ModelSourceError

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
        ModelSourceError,
        FileNotFoundError,
    ) as e:
        print(f"qlora eval{' ' + mode if mode else ''}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
