"""bench/multi_gpu.py without GPUs: the commands it would run (world size, parallel mode, batch per GPU, the
accelerate config of PEFT's QLoRA + FSDP guide), the token blocks both sides train on, the table, and one CPU
self-check of both sides with two processes (gloo) at the tiny shape.

The tokenizer is trained on a small synthetic Alpaca file written here, so nothing needs ../shared.
"""

from __future__ import annotations

import json
import random
import shlex
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `bench` is a folder of the repository, not an installed package
    sys.path.insert(0, str(REPO_ROOT))

from bench.multi_gpu import WORKLOADS, accelerate_config, main, ratio, table, write_block_data  # noqa: E402
from bench.random_checkpoint import write_tokenizer  # noqa: E402

_VOCABULARY = ("the a model learns quickly slowly from data every step small large token answer question write list "
               "three reasons why people sleep well water plants cats dogs river mountain city explain describe")
WORDS = tuple(_VOCABULARY.split())


def _alpaca(path: Path, n: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)

    def words(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    records = [{"instruction": words(4, 12).capitalize() + ".", "input": "", "output": words(8, 60) + "."}
               for _ in range(n)]  # fmt: skip
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _dry_run(tmp_path: Path, capsys, *flags: str) -> dict[str, dict]:
    """{workload: {"ours": argv, "reference": argv, "config": accelerate config}} from the printed dry run."""
    work = tmp_path / "work"
    assert main(["--dry-run", "--tokenizer-from", str(tmp_path / "corpus.txt"), "--workdir", str(work), *flags]) == 0
    assert not work.exists()  # a dry run writes nothing
    plans: dict[str, dict] = {}
    current = None
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("# ") and ": " in line and line[2:].split(":")[0] in WORKLOADS:
            current = plans.setdefault(line[2:].split(":")[0], {})
        elif line.startswith("# accelerate config "):
            current["config"] = json.loads(line.split(": ", 1)[1])
        elif line.startswith(("ours: ", "reference: ")):
            side, command = line.split(": ", 1)
            current[side] = shlex.split(command)
    return plans


def _flag(argv: list[str], name: str) -> str:
    for i, arg in enumerate(argv):
        if arg == name:
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {argv}")


def test_dry_run_commands_run_each_workload_on_n_gpus(tmp_path, capsys):
    plans = _dry_run(tmp_path, capsys, "--gpus", "4", "--steps", "10")
    assert set(plans) == {"ddp-7b", "fsdp-70b", "fsdp-65b"}
    expected = {"ddp-7b": ("ddp", 4, "7b"), "fsdp-70b": ("fsdp", 1, "70b"), "fsdp-65b": ("fsdp", 1, "65b")}
    for name, (mode, micro, shape) in expected.items():
        ours, ref, config = plans[name]["ours"], plans[name]["reference"], plans[name]["config"]
        # ours: torchrun with 4 workers, `qlora train`, the mode, 4 or 1 x 512 per GPU and one micro-batch per step
        assert ours[1:4] == ["-m", "torch.distributed.run", "--standalone"]
        assert _flag(ours, "--nproc-per-node") == "4" and ours[ours.index("-m", 2) + 1 :][:2] == ["qlora", "train"]
        assert _flag(ours, "--parallel") == mode and _flag(ours, "--max-steps") == "10"
        assert _flag(ours, "--train.micro_batch_size") == str(micro)
        assert _flag(ours, "--train.global_batch_size") == str(4 * micro)  # so accumulation is 1
        assert _flag(ours, "--data.block_size") == "512" and _flag(ours, "--data.eval_fraction") == "0"
        assert _flag(ours, "--model").endswith(f"model-{shape}") and _flag(ours, "--device") == "cuda"
        # the reference: accelerate launch with 4 processes, the recipe with the same mode, batch and blocks
        assert ref[1:3] == ["-m", "accelerate.commands.launch"] and _flag(ref, "--num_processes") == "4"
        assert ref[ref.index("-m", 3) + 1] == "bench.hf_qlora_recipe"
        assert _flag(ref, "--parallel") == mode and _flag(ref, "--micro-batch-size") == str(micro)
        assert _flag(ref, "--grad-accum") == "1" and _flag(ref, "--text-blocks") == "512"
        assert _flag(ref, "--steps") == "10" and _flag(ref, "--model") == _flag(ours, "--model")
        assert _flag(ref, "--data") == _flag(ours, "--data")
        assert config["num_processes"] == 4 and config["mixed_precision"] == "no"
        assert config["distributed_type"] == {"ddp": "MULTI_GPU", "fsdp": "FSDP"}[mode]
        assert _flag(ref, "--config_file").endswith(".json")


def test_dry_run_on_8_gpus_and_one_workload(tmp_path, capsys):
    plans = _dry_run(tmp_path, capsys, "--gpus", "8", "--workloads", "ddp-7b", "--sides", "ours",
                     "--ours-args", "--lora.param_dtype bfloat16")  # fmt: skip
    (ours_only,) = plans.values()
    ours = ours_only["ours"]
    assert "reference" not in ours_only and "config" not in ours_only
    assert _flag(ours, "--nproc-per-node") == "8" and _flag(ours, "--train.global_batch_size") == "32"
    assert ours[-2:] == ["--lora.param_dtype", "bfloat16"]


def test_fsdp_config_is_pefts_qlora_guide():
    fsdp = accelerate_config("fsdp", 8, "cuda", cpu_offload=False)["fsdp_config"]
    # PEFT docs/source/accelerate/fsdp.md, fsdp_config_qlora.yaml: the keys QLoRA + FSDP needs
    assert fsdp["fsdp_use_orig_params"] is False and fsdp["fsdp_cpu_ram_efficient_loading"] is True
    assert fsdp["fsdp_sharding_strategy"] == "FULL_SHARD" and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_sync_module_states"] is True and fsdp["fsdp_offload_params"] is False
    assert accelerate_config("fsdp", 2, "cuda", cpu_offload=True)["fsdp_config"]["fsdp_offload_params"] is True
    assert "fsdp_config" not in accelerate_config("ddp", 2, "cuda", cpu_offload=False)


def test_arguments_that_cannot_run_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--dry-run", "--device", "cpu", "--workloads", "ddp-7b", "--gpus", "2"])
    assert "tiny self-checks" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--dry-run", "--device", "cpu", "--workloads", "fsdp-tiny", "--gpus", "2"])
    assert "--sides ours" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--dry-run", "--gpus", "2", "--steps", "2", "--skip", "2"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            main(["--dry-run"])
        assert "pass --gpus N" in capsys.readouterr().err


@pytest.mark.slow
def test_block_data_is_exactly_one_block_per_document_for_both_tokenizers(tmp_path):
    from transformers import AutoTokenizer

    from qlora.tokenizer import Tokenizer

    write_tokenizer(tmp_path, _alpaca(tmp_path / "corpus.json"), 2048)
    info = write_block_data(tmp_path, tmp_path / "data.jsonl", tokens=64, documents=20, seed=3)
    texts = [json.loads(line)["text"] for line in (tmp_path / "data.jsonl").read_text().splitlines()]
    assert len(texts) == 20 and info["distinct_words"] > 10
    ours, theirs = Tokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    for text in texts:
        ids = ours.encode(text, add_bos=True, add_eos=True)
        assert len(ids) == 64 and ids == [theirs.bos_token_id, *theirs(text, add_special_tokens=False)["input_ids"],
                                          theirs.eos_token_id]  # fmt: skip


def test_table_has_a_row_per_run_and_the_ratio():
    ours = {"workload": "ddp-7b", "side": "ours", "gpus": 8, "rc": 0, "tokens_per_s_median": 30000.0,
            "tokens_per_s_min": 29000.0, "tokens_per_s_max": 31000.0, "peak_allocated_gib_max_rank": 6.0,
            "peak_allocated_gib_min_rank": 5.5, "tokens_per_s_logged_median": 30500.0}  # fmt: skip
    ref = {"workload": "ddp-7b", "side": "reference", "gpus": 8, "rc": 0, "tokens_per_s_median": 10000.0,
           "peak_allocated_gib_max_rank": 8.0}  # fmt: skip
    r = ratio(ours, ref)
    assert r["tokens_per_s_median"] == 3.0 and r["peak_allocated_gib_max_rank"] == 0.75
    assert "tokens_per_s_min" not in r  # the reference has none
    rows = [line for line in table([ours, ref, r]).splitlines() if line.startswith("| ddp-7b")]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert cells[0][:5] == ["ddp-7b", "8", "ours", "30,000 (29,000-31,000)", "30,500"]
    assert cells[0][6] == "6.00 / 5.50" and cells[1][6] == "8.00 / -"
    assert cells[2][2:4] == ["ours/ref", "3.00"] and cells[2][6] == "0.75"


@pytest.mark.slow
def test_cpu_self_check_runs_both_sides_on_two_processes(tmp_path):
    for module in ("bitsandbytes", "peft", "transformers", "accelerate"):
        pytest.importorskip(module, reason=f"the reference recipe needs {module}")
    out, work = tmp_path / "results", tmp_path / "work"
    work.mkdir()
    (work / "keep-me").write_text("not ours")
    rc = main(["--workloads", "ddp-tiny", "--device", "cpu", "--gpus", "2", "--steps", "3", "--skip", "1",
               "--tokenizer-from", str(_alpaca(tmp_path / "corpus.json", n=80)), "--workdir", str(work),
               "--out", str(out)])  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert rc == 0, summary
    assert sorted(p.name for p in work.iterdir()) == ["keep-me"]  # a given workdir loses only what the run wrote
    runs = {r["side"]: r for r in summary["runs"]}
    assert set(runs) == {"ours", "reference", "ratio"}
    for side in ("ours", "reference"):
        r = runs[side]
        assert r["rc"] == 0 and r["steps"] == 3 and r["steady_steps"] == 2, r
        assert r["tokens_per_step_mean"] == 2 * 2 * 64 and "note" not in r  # 2 ranks x 2 blocks of 64, no padding
        assert all(t == 2 * 2 * 63 for t in r["target_tokens"])  # every token but each block's first is a target
        assert r["grad_accum"] == 1 and r["tokens_per_s_min"] <= r["tokens_per_s_median"] <= r["tokens_per_s_max"]
        assert (out / f"ddp-tiny.{side}.json").is_file() and (out / f"ddp-tiny.{side}.log").is_file()
    assert runs["reference"]["world_size"] == 2 and runs["reference"]["parallel"] == "ddp"
    assert runs["ratio"]["tokens_per_s_median"] == runs["ours"]["tokens_per_s_median"] / runs["reference"][
        "tokens_per_s_median"]  # fmt: skip
    assert "| ddp-tiny | 2 | ours/ref |" in (out / "summary.md").read_text()
