"""`qlora merge`: the merged directory loads in transformers and computes base + adapter.

Tolerances. Both sides run float32. Merged, one matmul uses W + s*B*A; unmerged, the adapter is a
separate branch added after its own two matmuls. The logits (|logit| up to 17 on stories260K, float32
ulp there ~2e-6) then differ by rounding accumulated over 5 layers: measured max |diff| 3.5e-5
(onto original) and 1.1e-5 (dequantized); asserted at atol 1e-4 + rtol 1e-4. The negative controls
show that the adapter moved the logits by far more (> 0.1; measured ~9), and that "original" and
"dequantized" merges differ by the 4-bit quantization error (> 1e-2; measured 2.4 to 7).
"""

import json

import pytest
import torch

import qlora
from qlora.adapter import load_adapter_weights
from qlora.cli import main
from qlora.config import ConfigError
from qlora.export.merge import MergeError, TrainedBase, merge, read_trained_base

IDS = torch.tensor([[1, 403, 407, 261, 378, 30, 5, 60, 2, 17, 99]])
# Same float32 maths in another order (see the module docstring).
TOL = {"rtol": 1e-4, "atol": 1e-4}


def ours_with_adapter(model_path, adapter, quant_type, lora):
    """Our base (+ quantization as in training, here in float32) + adapter: the reference."""
    model = qlora.load_model(model_path, quant_type, compute_dtype=torch.float32, device="cpu", lora=lora)
    load_adapter_weights(model, adapter)
    return model


@pytest.mark.parametrize(("onto", "quant_type"), [("original", None), ("dequantized", "nf4")])
def test_transformers_loads_the_merge_with_base_plus_adapter_logits(
    stories260k_dir, tmp_path, make_adapter, onto, quant_type
):
    transformers = pytest.importorskip("transformers")
    lora = make_adapter(stories260k_dir, tmp_path / "adapter")
    base = TrainedBase(dtype=torch.float32)  # training quantized the float32 weights (as `ours_with_adapter` does)
    out = merge(stories260k_dir, tmp_path / "adapter", tmp_path / "merged", dtype=torch.float32, onto=onto,
                base=base, max_shard_bytes=300_000)  # fmt: skip
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # stories260K is ~1 MB in float32: sharded
    for name in ("config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ours = ours_with_adapter(stories260k_dir, tmp_path / "adapter", quant_type, lora)
    plain = qlora.load_model(stories260k_dir, None, compute_dtype=torch.float32, device="cpu")
    other = ours_with_adapter(stories260k_dir, tmp_path / "adapter", "nf4" if quant_type is None else None, lora)
    with torch.no_grad():
        merged_logits, reference = theirs(IDS).logits, ours(IDS)
        torch.testing.assert_close(merged_logits, reference, **TOL)
        assert (merged_logits - plain(IDS)).abs().max() > 0.1  # the adapter is in the merge
        assert (merged_logits - other(IDS)).abs().max() > 1e-2  # onto matters: the 4-bit base differs


def test_merge_cli_writes_report_and_bf16_directory(stories260k_dir, shared_dir, tmp_path, capsys, make_adapter):
    make_adapter(stories260k_dir, tmp_path / "adapter")
    text = shared_dir / "data/text/wikitext-2-raw/wiki.test.raw"
    reports = {}
    for onto in ("dequantized", "original"):
        out = tmp_path / onto
        rc = main(["merge", "--model", str(stories260k_dir), "--adapter", str(tmp_path / "adapter"), "--output",
                   str(out), "--onto", onto, "--text", str(text), "--report-tokens", "1024",
                   "--report-seq-len", "128"])  # fmt: skip
        assert rc == 0
        assert "KL(base+adapter || merged)" in capsys.readouterr().out
        reports[onto] = json.loads((out / "merge_report.json").read_text())
        assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    dq, orig = reports["dequantized"], reports["original"]
    assert dq["tokens"] == 8 * 127 and dq["trained_base"]["quant_type"] == "nf4"
    # dequantized + bf16: only the bf16 rounding of the merged weights separates the two models
    assert dq["kl_mean"] < 1e-3 and abs(dq["ppl_diff"]) < 0.01 * dq["ppl_reference"]
    # original: the 4-bit quantization error of this tiny model shows up, by orders of magnitude more
    assert orig["kl_mean"] > 10 * dq["kl_mean"]


def test_trained_base_comes_from_the_run_config(tmp_path):
    (tmp_path / "config.yaml").write_text(
        "model:\n  compute_dtype: float16\nquant:\n  quant_type: fp4\n  double_quant: false\n  blocksize: 128\n"
    )
    assert read_trained_base(tmp_path) == TrainedBase("fp4", False, 128, torch.float16)
    assert read_trained_base(tmp_path, quant_type="none").quant_type is None
    assert read_trained_base(tmp_path / "absent") == TrainedBase()
    # What a run writes now: the compute dtype it resolved ("auto" on a CPU without bf16 -> float32).
    (tmp_path / "config.yaml").write_text("model:\n  compute_dtype: float32\n")
    assert read_trained_base(tmp_path) == TrainedBase(dtype=torch.float32)
    assert read_trained_base(tmp_path, blocksize=256) == TrainedBase(blocksize=256, dtype=torch.float32)


@pytest.mark.parametrize(("value", "hint"), [("auto", "not the dtype it resolved"), ("bfloat61", "not one of"),
                                             ("[bfloat16]", "not one of")])  # fmt: skip
def test_a_compute_dtype_that_names_no_dtype_is_an_error(tmp_path, value, hint):
    (tmp_path / "config.yaml").write_text(f"model:\n  compute_dtype: {value}\nquant:\n  quant_type: nf4\n")
    with pytest.raises(MergeError, match="model.compute_dtype is") as err:
        read_trained_base(tmp_path)
    assert str(tmp_path / "config.yaml") in str(err.value) and hint in str(err.value)


def test_run_quantization_errors_name_the_file_and_key(tmp_path):
    (tmp_path / "config.yaml").write_text("model:\n  compute_dtype: bfloat16\nquant:\n  quant_type: nf5\n")
    with pytest.raises(ConfigError, match="config.yaml.*quant.quant_type"):
        read_trained_base(tmp_path)


def test_merge_errors_name_the_problem(stories260k_dir, tmp_path, capsys, make_adapter):
    make_adapter(stories260k_dir, tmp_path / "adapter")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(MergeError, match="not empty"):
        merge(stories260k_dir, tmp_path / "adapter", tmp_path / "full")
    with pytest.raises(MergeError, match="onto must be one of"):
        merge(stories260k_dir, tmp_path / "adapter", tmp_path / "o1", onto="both")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    rc = main(["merge", "--model", str(stories260k_dir), "--adapter", str(tmp_path / "adapter"), "--output",
               str(tmp_path / "o2"), "--no-report"])  # fmt: skip
    err = capsys.readouterr().err  # the adapter reader's refusal, naming the file and the field
    assert rc == 2 and "adapter_config.json: use_dora is True" in err and "not supported" in err
    (tmp_path / "adapter" / "config.yaml").write_text("model:\n  compute_dtype: auto\n")
    rc = main(["merge", "--model", str(stories260k_dir), "--adapter", str(tmp_path / "adapter"), "--output",
               str(tmp_path / "o3"), "--no-report"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "config.yaml: model.compute_dtype is 'auto'" in err
