"""`lora.init_from` / `qlora train --adapter DIR`: training continues an adapter saved by PEFT (or by us)."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import ALPACA, STORIES, tiny_config

from qlora.cli import main as cli_main
from qlora.train.loop import train
from qlora.train.metrics import read_metrics

pytestmark = pytest.mark.skipif(not (STORIES.exists() and ALPACA.exists()), reason=f"needs {STORIES} and {ALPACA}")


def peft_adapter(directory):
    """A PEFT adapter whose shape differs from tiny_config's (r 4 on q, v; tiny_config says r 8 on all seven)."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM.from_pretrained(STORIES)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                             init_lora_weights=False, task_type="CAUSAL_LM")  # fmt: skip
    peft.get_peft_model(base, config).save_pretrained(directory)  # init_lora_weights=False: B is not zero
    return load_file(directory / "adapter_model.safetensors")


def continued(output, adapter_dir, lr, max_steps=1):
    cfg = tiny_config(output, max_steps=max_steps, warmup_steps=0)
    cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, init_from=str(adapter_dir)),
                              optim=dataclasses.replace(cfg.optim, lr=lr))  # fmt: skip
    train(cfg, progress=False)
    return load_file(output / "adapter_model.safetensors")


def first_loss(output):
    return next(r["loss"] for r in read_metrics(output / "metrics.jsonl") if r["kind"] == "train")


def test_training_starts_from_the_given_adapter(tmp_path):
    start = peft_adapter(tmp_path / "peft")
    # A vanishing lr moves each weight by ~1e-12 (Adam's first step is about lr in size): the saved adapter is
    # the one we started from, in its own shape (r 4 on q and v, whatever lora.r and targets say).
    after = continued(tmp_path / "still", tmp_path / "peft", lr=1e-12)
    assert after.keys() == start.keys()
    for key, value in start.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=1e-9, msg=key)
    # A real lr trains it further, from there.
    trained = continued(tmp_path / "trained", tmp_path / "peft", lr=1e-2)
    assert any(not torch.allclose(trained[k], start[k], atol=1e-4) for k in start)
    # Negative control: the adapter (B not zero) changes the first loss against fresh adapters (B zero).
    train(tiny_config(tmp_path / "fresh", max_steps=1, warmup_steps=0), progress=False)
    assert first_loss(tmp_path / "still") != pytest.approx(first_loss(tmp_path / "fresh"), rel=1e-4)


def test_missing_adapter_is_a_clear_cli_error(tmp_path, capsys):
    missing = tmp_path / "no-such-adapter"
    code = cli_main(["train", "--model", str(STORIES), "--data", str(ALPACA), "--output", str(tmp_path / "out"),
                     "--adapter", str(missing), "--max-steps", "1", "--device", "cpu"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "qlora train: error:" in err and str(missing / "adapter_config.json") in err and "not found" in err
