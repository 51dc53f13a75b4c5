"""The Trainer API: config as object, dict or file; records as data; its parts one at a time; the CLI's step
for a Python user (`prepare_for_training`); fallbacks only for named conditions; true timing."""

import json
import logging

import pytest
import torch
from train_fixtures import ALPACA, STORIES, tiny_config

import qlora
from qlora.data.collate import collate
from qlora.data.encode import EncodedExample
from qlora.lora import LoraSpec, lora_layers
from qlora.train.metrics import read_metrics
from qlora.train.step import TrainStep
from qlora.train.trainer import DATA_FILE, Trainer

pytestmark = pytest.mark.skipif(not (STORIES.exists() and ALPACA.exists()), reason=f"needs {STORIES} and {ALPACA}")


def _losses(output):
    return [r["loss"] for r in read_metrics(output / "metrics.jsonl") if r["kind"] == "train"]


@pytest.mark.slow
def test_a_dict_a_file_and_a_config_object_train_the_same(tmp_path):
    cfg = tiny_config(tmp_path / "object", max_steps=3)
    Trainer(cfg, progress=False).fit()
    tree = cfg.to_dict()
    tree["output"] = str(tmp_path / "dict")
    Trainer(tree, progress=False).fit()
    tree["output"] = str(tmp_path / "file")
    path = tmp_path / "run.json"
    path.write_text(json.dumps(tree), encoding="utf-8")
    Trainer(path, progress=False).fit()
    want = _losses(tmp_path / "object")
    assert len(want) == 3
    assert _losses(tmp_path / "dict") == want and _losses(tmp_path / "file") == want


def test_records_given_as_a_list_are_written_beside_the_run(tmp_path):
    records = json.loads(ALPACA.read_text(encoding="utf-8"))[:40]
    tree = tiny_config(tmp_path, max_steps=2).to_dict()
    trainer = Trainer(tree, data=records, progress=False)
    assert trainer.config.data.path == str(tmp_path / DATA_FILE)
    written = [json.loads(line) for line in (tmp_path / DATA_FILE).read_text(encoding="utf-8").splitlines()]
    assert written == records
    result = trainer.fit()
    assert result.steps == 2 and (tmp_path / "adapter_model.safetensors").is_file()
    with pytest.raises(TypeError, match="list of records"):
        Trainer(tree, data="not records")


def test_the_parts_one_at_a_time_equal_fit(tmp_path):
    """setup, step, step, evaluate, save: the losses `fit` logs, the adapter it writes."""
    fitted = Trainer(tiny_config(tmp_path / "fit", max_steps=2, eval_every=0), progress=False)
    fitted.fit()
    trainer = Trainer(tiny_config(tmp_path / "parts", max_steps=2), progress=False).setup()
    stats = [trainer.step(), trainer.step()]
    assert [s.loss for s in stats] == _losses(tmp_path / "fit")
    assert all(s.seconds > 0 and s.tokens > 0 and s.tokens_per_s > 0 and s.grad_norm is not None for s in stats)
    assert trainer.step_count == 2
    assert trainer.evaluate() == pytest.approx(trainer.evaluate())  # deterministic, model left in train mode
    assert trainer.model.training
    saved = trainer.save(tmp_path / "adapter")
    from safetensors.torch import load_file

    a, b = load_file(saved / "adapter_model.safetensors"), load_file(tmp_path / "fit" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_bad_config_is_refused_before_anything_is_built(tmp_path):
    tree = tiny_config(tmp_path).to_dict()
    tree["lora"]["rank"] = 8
    with pytest.raises(ValueError, match="lora.rank"):
        Trainer(tree)
    with pytest.raises(TypeError, match="TrainConfig, a dict or a config file"):
        Trainer(42)


def test_prepare_for_training_gives_a_python_user_the_clis_step(tmp_path):
    """A model from qlora.load_model + prepare_for_training is set up exactly as the Trainer sets its own."""
    trainer = Trainer(tiny_config(tmp_path, max_steps=2), progress=False).setup()
    model = qlora.load_model(STORIES, "nf4", compute_dtype=torch.float32, device="cpu", lora=LoraSpec(r=8))
    assert model.checkpoint_context is None and not model.gradient_checkpointing  # as loaded: eval only
    params = qlora.prepare_for_training(model)
    for attr in ("gradient_checkpointing", "residual_dtype", "checkpoint_offload"):
        assert getattr(model, attr) == getattr(trainer.model, attr), attr
    assert model.checkpoint_context == model.policy.reusing_dense_weights  # the model's own policy's
    assert trainer.model.checkpoint_context == trainer.model.policy.reusing_dense_weights
    assert {id(p) for p in params} == {id(p) for layer in lora_layers(model).values() for p in layer.parameters()}
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert model.training
    off = qlora.load_model(STORIES, "nf4", compute_dtype=torch.float32, device="cpu", lora=LoraSpec(r=8))
    qlora.prepare_for_training(off, gradient_checkpointing=False, reuse_dense_weights=True)
    assert off.checkpoint_context is None  # reuse only means something inside a checkpoint
    with pytest.raises(ValueError, match="no LoRA adapters"):
        qlora.prepare_for_training(qlora.load_model(STORIES, "nf4", compute_dtype=torch.float32, device="cpu"))


def test_packed_batches_train_eagerly_with_the_reason_logged_once(tmp_path, caplog, monkeypatch):
    """The graph step's only per-batch fallback is a named condition (a packed batch's extra keys), logged once;
    it lasts for that micro-batch only (a padded batch after it replays the graph)."""
    trainer = Trainer(tiny_config(tmp_path, max_steps=2), progress=False).setup()
    calls = []

    class RecordingGraphs:  # stands in for CudaGraphStep, which needs CUDA; records what it was given
        def forward_backward(self, batch, scale):
            calls.append(set(batch))
            return torch.zeros(())

        def zero_grad(self):
            pass

    step = TrainStep(trainer.model, trainer.params, trainer.optimizer, trainer.scheduler, scaler=trainer.scaler,
                     cuda_graphs=False)  # fmt: skip
    step.graphs = RecordingGraphs()
    padded = collate([EncodedExample([1, 5, 6, 7], [-100, 5, 6, 7])], pad_id=0)
    packed = dict(padded, position_ids=torch.arange(4)[None])
    with caplog.at_level(logging.INFO, logger="qlora.train"):
        step([packed, padded])
        step([packed])
    reasons = [r.getMessage() for r in caplog.records if "train eagerly" in r.getMessage()]
    assert reasons == ["cuda_graphs: batches with ['position_ids'] (packed) train eagerly"]
    assert calls == [set(padded)]  # the padded batch went to the graph; the packed ones did not


def test_errors_inside_a_step_are_raised_not_swallowed(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, max_steps=2), progress=False).setup()
    step = TrainStep(trainer.model, trainer.params, trainer.optimizer, trainer.scheduler, scaler=trainer.scaler)

    class FailingGraphs:
        def forward_backward(self, batch, scale):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    step.graphs = FailingGraphs()
    batch = collate([EncodedExample([1, 5, 6, 7], [-100, 5, 6, 7])], pad_id=0)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        step([batch])
    assert step.graphs is not None  # nothing switched to another path for later steps


def test_the_run_config_records_the_resolved_compute_dtype(tmp_path):
    """`auto` is resolved once and written as the dtype the run computed in (merge rebuilds the base from it)."""
    import yaml

    from qlora.precision import dtype_name

    tree = tiny_config(tmp_path, max_steps=2).to_dict()
    tree["model"]["compute_dtype"] = "auto"
    trainer = Trainer(tree, progress=False).setup()
    written = yaml.safe_load((tmp_path / "config.yaml").read_text(encoding="utf-8"))["model"]["compute_dtype"]
    assert written == dtype_name(trainer.dtype) and written != "auto"
    assert trainer.config.model.compute_dtype == "auto"  # the user's config object is left as given
