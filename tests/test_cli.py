"""The `qlora` command line: train end to end, generate, and errors as messages (exit 2), not tracebacks."""

import json
import subprocess
import sys

import pytest

from qlora.cli import main


def test_train_then_generate_with_the_adapter(stories260k_dir, shared_dir, tmp_path, capsys):
    out, data = tmp_path / "run", shared_dir / "data/instruct/alpaca_en_demo.json"
    rc = main(["train", "--model", str(stories260k_dir), "--data", str(data),
               "--output", str(out), "--max-steps", "2", "--lora-r", "4", "--lr", "1e-3", "--seed", "1",
               "--device", "cpu", "--quant-type", "nf4", "--model.compute_dtype", "float32",
               "--data.max_source_len", "32", "--data.max_target_len", "16", "--train.grad_accum", "2"])  # fmt: skip
    assert rc == 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert "trained 2 steps" in capsys.readouterr().out
    rc = main(["generate", "--model", str(stories260k_dir), "--adapter", str(out), "--prompt", "Once upon a time",
               "--max-new-tokens", "8", "--dtype", "float32", "--device", "cpu"])  # fmt: skip
    assert rc == 0
    assert "### Once upon a time" in capsys.readouterr().out


def test_bad_data_is_a_message_with_file_and_line(stories260k_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": 3}\n')
    proc = subprocess.run([sys.executable, "-m", "qlora.cli", "train", "--model", str(stories260k_dir), "--data",
                           str(bad), "--output", str(tmp_path / "o"), "--device", "cpu"],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2
    assert "bad.jsonl:2" in proc.stderr and "output" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o" / "adapter_model.safetensors").exists()


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as bad_flag:
        main(["train", "--lora-r", "-3"])
    assert bad_flag.value.code == 2
    assert main(["frobnicate"]) == 2


def test_damaged_model_files_are_one_message_not_a_traceback(stories260k_dir, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(stories260k_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # cut inside the tensor data
    assert main(["generate", "--model", str(model), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qlora generate: error: ") and "model.safetensors" in err and "Traceback" not in err
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"NOTGGUF!" + bytes(64))
    assert main(["generate", "--model", str(fake), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qlora generate: error: ") and "fake.gguf" in err and "Traceback" not in err
