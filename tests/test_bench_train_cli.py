"""bench/train_cli.py and its two helpers on the CPU: the random checkpoint, its tokenizer, the step arithmetic, the
table, and one end-to-end run of each side at the tiny shape (ours; the reference recipe where bitsandbytes, peft
and transformers are installed: its 4-bit path runs on the CPU too, slowly).

The data is a small synthetic Alpaca file written here, so nothing needs ../shared.
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `bench` is a folder of the repository, not an installed package
    sys.path.insert(0, str(REPO_ROOT))

from bench.random_checkpoint import (  # noqa: E402
    COMPLETE_MARK,
    INDEX_FILE,
    SHAPES,
    read_complete,
    tensor_shapes,
    write_checkpoint,
    write_tokenizer,
)
from bench.train_cli import graph_captures, main, ratios, steady_stats, summarize_ours, table  # noqa: E402

_VOCABULARY = (
    "the a model learns quickly slowly from data every step small large token answer question write list three "
    "reasons why people sleep well water plants cats dogs river mountain city explain describe give short long "
    "story poem summary numbers colour blue green red because however therefore"
)
WORDS = tuple(_VOCABULARY.split())


def _alpaca(path: Path, n: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)

    def words(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    records = [{"instruction": words(4, 12).capitalize() + ".", "input": words(3, 10) if i % 3 == 0 else "",
                "output": words(8, 60).capitalize() + "."} for i in range(n)]  # fmt: skip
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path


def test_checkpoint_is_sharded_bf16_safetensors_of_the_shape(tmp_path):
    from safetensors import safe_open

    data = _alpaca(tmp_path / "data.json")
    directory = tmp_path / "model"
    info = write_checkpoint(directory, "tiny", data, torch.device("cpu"), max_shard_bytes=400_000)
    assert info.shards > 1 and read_complete(directory) == info
    index = json.loads((directory / INDEX_FILE).read_text())
    expected = dict(tensor_shapes(SHAPES["tiny"]))
    assert set(index["weight_map"]) == set(expected)
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-{k:05d}-of-{info.shards:05d}.safetensors" for k in range(1, info.shards + 1)]
    total = 0
    for name in files:
        with safe_open(str(directory / name), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                assert index["weight_map"][key] == name
                t = f.get_tensor(key)
                assert t.dtype == torch.bfloat16 and tuple(t.shape) == expected[key], key
                if t.dim() == 1:
                    assert torch.equal(t, torch.ones_like(t)), key  # RMSNorm weights
                else:  # N(0, 0.02): the std of >= 45k draws is within 3% of it
                    assert abs(t.float().std().item() - 0.02) < 0.0006, key
                total += t.numel() * 2
    assert total == index["metadata"]["total_size"] == info.weight_bytes
    config = json.loads((directory / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (128, 2, 2048)
    (directory / COMPLETE_MARK).unlink()
    assert read_complete(directory) is None  # an interrupted write is never reused


def test_7b_shape_is_llama2_7b():
    # Llama-2-7B's parameter count (6,738,415,616) from the tensors the checkpoint would hold
    n = sum(math.prod(dims) for _, dims in tensor_shapes(SHAPES["7b"]))
    assert n == 6_738_415_616


@pytest.mark.slow
def test_tokenizer_gives_both_sides_the_same_ids(tmp_path):
    from transformers import AutoTokenizer

    from qlora.tokenizer import Tokenizer

    data = _alpaca(tmp_path / "data.json", n=200)
    info = write_tokenizer(tmp_path, data, 600)
    assert 259 < info["tokenizer_vocab"] <= 600
    ours, theirs = Tokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert (ours.token_to_id("<unk>"), ours.bos_id, ours.eos_id, ours.token_to_id("<0x41>")) == (0, 1, 2, 3 + 0x41)
    texts = ["Explain why cats sleep.", "### Response: ", " two  spaces\n\nand lines", "Zebra café €5", "x</s>"]
    for text in texts:
        assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"], text
    assert ours.encode("€")[-3:] == [3 + b for b in "€".encode()]  # unseen characters fall back to bytes
    assert theirs("x</s>", add_special_tokens=False)["input_ids"][-1] == 2  # QLoRA spells EOS into the text


def test_steady_stats_times_each_step_from_the_previous_end():
    ends = [10.0, 11.0, 13.0, 14.0]  # step 1 ends at 10: it has no start, so it is never timed
    tokens = [999, 100, 400, 100]
    s = steady_stats(ends, tokens, skip=1)
    assert s["steady_steps"] == 3
    assert (s["tokens_per_s_min"], s["tokens_per_s_median"], s["tokens_per_s_max"]) == (100, 100, 200)
    assert s["tokens_per_s_aggregate"] == 600 / 4 and s["tokens_per_step_mean"] == 200
    s = steady_stats(ends, tokens, skip=2)
    assert s["steady_steps"] == 2 and s["tokens_per_s_median"] == 150
    assert steady_stats(ends, [None] * 4, skip=1) == {"steady_steps": 0}


def test_graph_captures_are_counted_per_step_from_the_log_order():
    log = "\n".join([
        "data.json: data format alpaca (detected from the fields)",
        "captured a CUDA graph for batch shape (1, 192) (1 held, 1 captures)",
        "captured a CUDA graph for batch shape (1, 256) (2 held, 2 captures)",
        "step 1 | loss 10.4 | lr 0.000e+00",
        "step 2 | loss 10.3 | lr 2.000e-04",
        "captured a CUDA graph for batch shape (1, 128) (3 held, 3 captures)",
        "step 3 | loss 10.2 | lr 2.000e-04",
        "step 3: eval_loss 10.2",
    ])  # fmt: skip
    assert graph_captures(log) == {1: 2, 2: 0, 3: 1}


def _write_run(output: Path, records: list[dict], counts: list[int], grad_accum: int) -> Path:
    output.mkdir()
    (output / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (output / "config.yaml").write_text(f"data:\n  max_source_len: 384\n  max_target_len: 128\ntrain:\n"
                                        f"  grad_accum: {grad_accum}\n")  # fmt: skip
    events = output / "events.jsonl"
    lines = [{"event": "start", "time": 99.0}, {"event": "load", "start": 100.0, "end": 102.5}]
    lines += [{"event": "tokens", "n": n} for n in counts] + [{"event": "end", "time": 120.0, "rc": 0}]
    events.write_text("".join(json.dumps(e) + "\n" for e in lines))
    return events


def test_summarize_ours_takes_tokens_from_the_records_else_from_the_probe(tmp_path):
    records = [{"kind": "train", "step": k + 1, "time": 110.0 + 2 * k, "loss": 7.0 - k / 10,
                "tokens_per_s": 150.0, "step_seconds": 2.0} for k in range(3)]  # fmt: skip
    records.insert(1, {"kind": "eval", "step": 1, "time": 111.0, "eval_loss": 7.0})  # not a step end
    events = _write_run(tmp_path / "a", records, [100, 200] * 3, grad_accum=2)
    out = summarize_ours(tmp_path / "a", events, spawn_time=95.0, skip=1)
    assert out["tokens_from"].startswith("metrics.jsonl") and out["tokens"] == [300] * 3
    assert out["probe_tokens"] == [300] * 3
    assert (out["load_s"], out["first_step_s"], out["steady_steps"], out["tokens_per_s_median"]) == (2.5, 15.0, 2, 150)
    assert out["losses"] == [7.0, 6.9, 6.8] and (out["source_max_len"], out["grad_accum"]) == (384, 2)

    for r in records:
        r.pop("step_seconds", None)
    events = _write_run(tmp_path / "b", records, [100, 200, 300, 400, 500, 600], grad_accum=2)
    out = summarize_ours(tmp_path / "b", events, spawn_time=95.0, skip=1)
    assert out["tokens_from"] == "probe (count_tokens)" and out["tokens"] == [300, 700, 1100]
    events = _write_run(tmp_path / "c", records, [100, 200, 300], grad_accum=2)  # counts that do not fit: none
    out = summarize_ours(tmp_path / "c", events, spawn_time=95.0, skip=1)
    assert out["tokens_from"].startswith("unavailable") and out["steady_steps"] == 0


def test_table_and_ratios_are_ours_over_the_reference():
    ours = {"side": "ours", "tokens_per_s_median": 3000.0, "load_s": 20.0, "loss_first": 10.4}
    ref = {"side": "reference", "tokens_per_s_median": 1000.0, "load_s": 40.0, "train_max_allocated_gib": 7.0}
    r = ratios(ours, ref)
    assert r == {"tokens_per_s_median": 3.0, "load_s": 0.5}
    text = table([ours, ref], r)
    row = next(line for line in text.splitlines() if "tokens/s steady, median" in line)
    assert [c.strip() for c in row.strip("|").split("|")][1:] == ["3,000", "1,000", "3.00"]
    row = next(line for line in text.splitlines() if "peak allocated, train" in line)
    assert [c.strip() for c in row.strip("|").split("|")][1:] == ["-", "7.00", "-"]


def _run_main(tmp_path: Path, *flags: str) -> dict[str, dict]:
    data = _alpaca(tmp_path / "data.json")
    out = tmp_path / "results" / "run.jsonl"
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "keep-me").write_text("not ours")
    rc = main(["--shape", "tiny", "--device", "cpu", "--data", str(data), "--workdir", str(workdir),
               "--out", str(out), "--grad-accum", "2", *flags])  # fmt: skip
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert rc == 0, lines
    assert all(line["tool"] == "bench.train_cli" for line in lines)
    assert sorted(p.name for p in workdir.iterdir()) == ["keep-me"]  # a given workdir loses only what the run wrote
    return {line["side"]: line for line in lines}


def _check_side(side: dict, steps: int, skip: int, vocab: int) -> None:
    positive = ["load_s", "first_step_s", "tokens_per_s_median", "tokens_per_s_min", "tokens_per_s_max",
                "tokens_per_s_aggregate", "step_s_median", "tokens_per_step_mean", "wall_s"]  # fmt: skip
    for key in positive:
        assert isinstance(side.get(key), float) and side[key] > 0, (side["side"], key, side.get(key))
    assert side["rc"] == 0 and side["steps"] == steps and side["steady_steps"] == steps - skip
    assert side["tokens_per_s_min"] <= side["tokens_per_s_median"] <= side["tokens_per_s_max"]
    assert side["load_s"] < side["first_step_s"] < side["wall_s"]
    assert len(side["losses"]) == steps
    assert all(abs(loss - math.log(vocab)) < 1.0 for loss in side["losses"])  # random weights: about ln(vocab)
    assert all(t > tt > 0 for t, tt in zip(side["tokens"], side["target_tokens"], strict=True))


@pytest.mark.slow
def test_end_to_end_ours_on_cpu(tmp_path, capsys):
    sides = _run_main(tmp_path, "--steps", "3", "--skip", "1", "--skip-reference")
    assert set(sides) == {"setup", "ours"}
    assert sides["setup"]["shape"] == "tiny" and sides["setup"]["reused"] is False
    ours = sides["ours"]
    _check_side(ours, steps=3, skip=1, vocab=SHAPES["tiny"].vocab)
    assert ours["user_command"].startswith("qlora train --model ")
    # two independent counts of the same tokens: the loop's (tokens/s x seconds) and the probe's count_tokens calls
    assert ours["tokens_from"].startswith("metrics.jsonl") and ours["tokens"] == ours["probe_tokens"]
    assert ours["grad_accum"] == 2 and ours["graph_captures"] == [0, 0, 0]  # no CUDA graphs on the CPU
    printed = capsys.readouterr().out
    assert "| tokens/s steady, median" in printed and "running the reference" not in printed
    assert (tmp_path / "results" / "run.jsonl.ours.log").is_file()


@pytest.mark.slow
def test_end_to_end_reference_on_cpu(tmp_path):
    for module in ("bitsandbytes", "peft", "transformers", "accelerate"):
        pytest.importorskip(module, reason=f"the reference recipe needs {module}")
    sides = _run_main(tmp_path, "--steps", "2", "--skip", "1", "--skip-ours", "--target-max-len", "64")
    assert set(sides) == {"setup", "reference"}
    ref = sides["reference"]
    _check_side(ref, steps=2, skip=1, vocab=SHAPES["tiny"].vocab)
    assert (ref["source_max_len"], ref["target_max_len"], ref["grad_accum"]) == (384, 64, 2)
    assert ref["recipe"] == "qlorapy" and ref["optimizer"].startswith("bitsandbytes.optim")
    assert all(tt <= 2 * 64 for tt in ref["target_tokens"])  # two micro-batches, each target cut to 64 tokens
