"""The loop with every data format, packing and length grouping (issue 4's integration)."""

from pathlib import Path

import pytest
from train_fixtures import ALPACA, STORIES, tiny_config

from qlora.cli import main
from qlora.config import TrainConfig
from qlora.train.loop import train
from qlora.train.metrics import read_metrics

pytestmark = pytest.mark.skipif(not (STORIES.exists() and ALPACA.exists()), reason=f"needs {STORIES} and {ALPACA}")
FIXTURES = Path(__file__).resolve().parents[1] / "data" / "fixtures" / "formats"


def losses(output: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(output / "metrics.jsonl") if r["kind"] == "train"]


def with_data(output, data: dict, **train) -> TrainConfig:
    d = tiny_config(output, **train).to_dict()
    d["data"].update(data)
    return TrainConfig.from_dict(d)


@pytest.mark.parametrize("fixture", ["io_good.jsonl", "oasst_messages.jsonl", "guanaco_good.jsonl",
                                     "text_good.jsonl", "alpaca_good.csv"])  # fmt: skip
def test_train_accepts_every_format(tmp_path, fixture):
    cfg = with_data(tmp_path, {"path": str(FIXTURES / fixture), "eval_fraction": 0.0}, max_steps=2,
                    micro_batch_size=1, grad_accum=1, warmup_steps=0)  # fmt: skip
    result = train(cfg, progress=False)
    assert result.steps == 2 and len(losses(tmp_path)) == 2


def test_packed_grouped_training_resumes_exactly(tmp_path):
    data = {"pack_len": 160, "group_by_length": True}
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(with_data(straight, data, max_steps=4), progress=False)
    train(with_data(split, data, max_steps=2, save_every=2), progress=False)
    train(with_data(split, data, max_steps=4, resume=True), progress=False)
    assert losses(split) == pytest.approx(losses(straight), rel=1e-6, abs=1e-6)
    unpacked = tmp_path / "unpacked"
    train(tiny_config(unpacked, max_steps=4), progress=False)
    assert losses(unpacked) != pytest.approx(losses(straight), rel=1e-3)  # packing really changed the batches


def test_data_check_command(stories260k_dir, capsys):
    assert main(["data", "check", str(FIXTURES / "io_good.jsonl"), "--model", str(stories260k_dir)]) == 0
    assert main(["data", "check", str(FIXTURES / "io_blank_output.jsonl"), "--model", str(stories260k_dir)]) != 0
    captured = capsys.readouterr()
    assert "io_blank_output.jsonl" in captured.err + captured.out
