"""`qlora eval` end to end: the printed table, the JSON keys, the modes, and clean errors."""

import json

import pytest
from test_judge import FakeChatServer

from qlora.cli import main as qlora_main
from qlora.eval.cli import main


@pytest.fixture(scope="module")
def wiki(shared_dir):
    return shared_dir / "data/text/wikitext-2-raw/wiki.test.raw"


def test_perplexity_table_and_json(stories260k_dir, wiki, tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["--model", str(stories260k_dir), "--quant-type", "none", "--dtype", "float32", "--perplexity", str(wiki),
            "--max-tokens", "1000", "--max-length", "256", "--stride", "128", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["perplexity"] == pytest.approx(result["perplexity_detail"]["perplexity"]) and result["perplexity"] > 1
    assert result["perplexity_detail"]["tokens"] == 999
    assert "perplexity" in capsys.readouterr().out


def test_eval_is_a_qlora_command(stories260k_dir, wiki, capsys):
    argv = ["eval", "--model", str(stories260k_dir), "--perplexity", str(wiki), "--max-tokens", "300",
            "--max-length", "128", "--stride", "64", "--dtype", "float32"]  # fmt: skip
    assert qlora_main(argv) == 0
    assert "perplexity" in capsys.readouterr().out


def test_user_errors_exit_2_with_one_line(stories260k_dir, shared_dir, tmp_path, capsys):
    mmlu = shared_dir / "data/mmlu/qlora/zero_shot_mmlu_val.json"
    assert main(["--model", str(stories260k_dir), "--mmlu", str(mmlu), "--dtype", "float32"]) == 2
    assert "cannot tell them apart" in capsys.readouterr().err  # stories260K's 512 pieces split "A"
    assert main(["--model", str(stories260k_dir), "--mmlu", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", str(stories260k_dir)])  # nothing to evaluate


@pytest.mark.slow
def test_mmlu_json_keys_with_smollm2(smollm2_gguf, shared_dir, tmp_path):
    out = tmp_path / "m.json"
    mmlu = shared_dir / "data/mmlu/cais-mmlu-csv"
    argv = ["--model", str(smollm2_gguf), "--mmlu", str(mmlu), "--shots", "5", "--subjects", "astronomy", "virology",
            "--limit", "6", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    m = json.loads(out.read_text())["mmlu"]
    assert set(m["per_subject"]) == {"astronomy", "virology"} and m["questions"] == 12 and m["shots"] == 5
    assert m["accuracy"] == pytest.approx((m["per_subject"]["astronomy"] + m["per_subject"]["virology"]) / 2)


def test_answer_then_judge_locally_and_over_http(stories260k_dir, shared_dir, tmp_path, capsys):
    questions = shared_dir / "data/eval/qlora/vicuna_questions.jsonl"
    files = []
    for quant in ("nf4", "fp4"):
        files.append(tmp_path / f"{quant}.jsonl")
        argv = ["answer", "--model", str(stories260k_dir), "--quant-type", quant, "--dtype", "float32",
                "--questions", str(questions), "--limit", "3", "--max-new-tokens", "6", "--model-id", quant,
                "--output", str(files[-1])]  # fmt: skip
        assert main(argv) == 0
    assert len(files[0].read_text().splitlines()) == 3
    elo = tmp_path / "elo.json"
    argv = ["judge", "--answers", *map(str, files), "--judge-local", str(stories260k_dir), "--dtype", "float32",
            "--orderings", "500", "--output", str(elo), "--judgments", str(tmp_path / "j.jsonl")]  # fmt: skip
    assert main(argv) == 0
    table = json.loads(elo.read_text())
    assert set(table["elo"]) == {"nf4", "fp4"} and table["games"] == 6 and table["k"] == 32
    assert sum(r["elo"] for r in table["elo"].values()) == pytest.approx(2000.0)
    with FakeChatServer() as server:
        argv = ["judge", "--answers", *map(str, files), "--judge-url", server.url, "--orderings", "100"]
        assert main(argv) == 0
        assert len(server.requests) == 6
    assert "| model | Elo |" in capsys.readouterr().out


def test_adapter_is_applied(stories260k_dir, wiki, tmp_path):
    """--adapter DIR: the perplexity of the saved adapter's model, not the base's (negative control)."""
    import torch

    import qlora
    from qlora.adapter import save_adapter
    from qlora.eval.perplexity import perplexity, text_ids
    from qlora.lora import LoraSpec
    from qlora.tokenizer import Tokenizer

    spec = LoraSpec(r=4, alpha=8, dropout=0.0)
    model = qlora.load_model(stories260k_dir, "nf4", compute_dtype=torch.float32, device="cpu", lora=spec)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B.weight"):
                p.normal_(0, 0.05)
    save_adapter(model, tmp_path / "adapter", spec, str(stories260k_dir))
    ids = text_ids(Tokenizer.from_pretrained(stories260k_dir), wiki, 600)
    expected = perplexity(model, ids, max_length=256, stride=128).perplexity
    common = ["--model", str(stories260k_dir), "--dtype", "float32", "--perplexity", str(wiki), "--max-tokens", "600",
              "--max-length", "256", "--stride", "128"]  # fmt: skip
    main([*common, "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "a.json")])
    main([*common, "--output", str(tmp_path / "b.json")])
    with_adapter = json.loads((tmp_path / "a.json").read_text())["perplexity"]
    base = json.loads((tmp_path / "b.json").read_text())["perplexity"]
    assert with_adapter == pytest.approx(expected, rel=1e-6)
    assert abs(base - with_adapter) > 1e-3 * base
