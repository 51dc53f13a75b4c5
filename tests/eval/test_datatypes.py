"""The data-type table: each row is the model quantized on load to that type, and bits are counted right."""

import pytest
import torch

import qlora
from qlora.eval.datatypes import DATA_TYPES, datatype_table, format_table
from qlora.eval.perplexity import perplexity, text_ids
from qlora.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def wiki(shared_dir):
    return shared_dir / "data/text/wikitext-2-raw/wiki.test.raw"


@pytest.fixture(scope="module")
def rows(stories260k_dir, wiki):
    return datatype_table(stories260k_dir, wiki, max_tokens=1200, max_length=256, stride=128, dtype=torch.float32,
                          log=lambda *_: None)  # fmt: skip


def test_rows_and_bits_per_parameter(rows):
    assert [r.name for r in rows] == [name for name, _, _ in DATA_TYPES]
    bits = {r.name: r.bits_per_param for r in rows}
    assert bits["16-bit"] == 16.0
    # 4 bits + one fp32 absmax per 64 weights; with DQ one byte per 64 + an fp32 per 64*256 (+ partial blocks)
    assert bits["NF4"] == bits["FP4 (E2M1)"] == bits["INT4"] == pytest.approx(4.5)
    assert bits["NF4 + DQ"] == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=0.01)
    ppl = {r.name: r.perplexity for r in rows}
    assert all(ppl[n] != ppl["16-bit"] for n in ppl if n != "16-bit")  # quantization does change the model
    assert "| NF4 + DQ | 4.1" in format_table(rows)


@pytest.mark.parametrize(("name", "quant_type", "double_quant"), [("NF4", "nf4", False), ("FP4 + DQ", "fp4", True)])
def test_a_row_equals_the_model_quantized_on_load(rows, stories260k_dir, wiki, name, quant_type, double_quant):
    """Re-quantizing the loaded dense weights in place == `load_model` with that type (exact in fp32)."""
    model = qlora.load_model(stories260k_dir, quant_type, double_quant, compute_dtype=torch.float32, device="cpu")
    ids = text_ids(Tokenizer.from_pretrained(stories260k_dir), wiki, 1200)
    row = next(r for r in rows if r.name == name)
    assert perplexity(model, ids, max_length=256, stride=128).perplexity == pytest.approx(row.perplexity, rel=1e-6)
