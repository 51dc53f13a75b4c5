"""The QLoRA paper's data-type comparison (its Table 2) at small scale: perplexity and bits per parameter.

The same dense checkpoint is quantized post hoc, without finetuning, to each 4-bit type (INT4,
FP4 = E2M1, NF4, each with and without double quantization of the block constants) and compared
with the 16-bit model on one text. The claim under test: at the same bits, NF4 loses less
perplexity than FP4, and FP4 less than INT4; double quantization costs (almost) nothing.

Only the block linears are quantized (q/k/v/o/gate/up/down), as bitsandbytes does; embeddings,
norms and lm_head stay in the compute dtype. "bits per parameter" is over those linears: codes plus
block constants (16 for the unquantized model). The model is loaded once, dense; each row swaps
every linear's base for a fresh quantization of the same dense weight (`LoRALinear.set_base_weight`),
so every row starts from the same weights.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from qlora.eval.perplexity import perplexity, text_ids
from qlora.loading import load_model
from qlora.lora import LoRALinear, QuantSpec
from qlora.tokenizer import Tokenizer

# (row name, quant_type, double_quant); None = the 16-bit model
DATA_TYPES = (
    ("16-bit", None, False),
    ("INT4", "int4", False),
    ("FP4 (E2M1)", "fp4", False),
    ("FP4 + DQ", "fp4", True),
    ("NF4", "nf4", False),
    ("NF4 + DQ", "nf4", True),
)


@dataclass
class DataTypeRow:
    name: str
    quant_type: str | None
    double_quant: bool
    bits_per_param: float
    perplexity: float
    nll: float
    tokens: int
    seconds: float


def _requantize(model, dense: dict[str, torch.Tensor], quant_type: str | None, double_quant: bool) -> float:
    """Give every block linear a new base from its dense weight; return bits per parameter over them."""
    bits = numel = 0
    for name, layer in model.named_modules():
        if not isinstance(layer, LoRALinear):
            continue
        layer.quant = replace(layer.quant, quant_type=quant_type, double_quant=double_quant)
        layer.set_base_weight(dense[name])
        n = dense[name].numel()
        bits += (16 if quant_type is None else layer.base.bits_per_param()) * n
        numel += n
    return bits / numel


def datatype_table(
    model_path: str | Path,
    text_path: str | Path,
    *,
    max_tokens: int | None = None,
    max_length: int = 1024,
    stride: int = 512,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    blocksize: int = 64,
    data_types=DATA_TYPES,
    log=print,
) -> list[DataTypeRow]:
    """Perplexity of `model_path` on `text_path` for each data type; see the module docstring."""
    model = load_model(model_path, None, compute_dtype=dtype, device=device)
    max_length = min(max_length, model.config.max_position_embeddings)
    stride = min(stride, max_length)
    dense = {n: m.dense_base_weight().clone() for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    for layer in model.modules():
        if isinstance(layer, LoRALinear):
            layer.quant = QuantSpec(None, blocksize, False)
    ids = text_ids(Tokenizer.from_pretrained(model_path), text_path, max_tokens)
    rows = []
    for name, quant_type, double_quant in data_types:
        start = time.perf_counter()
        bits = _requantize(model, dense, quant_type, double_quant)
        result = perplexity(model, ids, max_length=max_length, stride=stride)
        rows.append(DataTypeRow(name, quant_type, double_quant, bits, result.perplexity, result.nll, result.tokens,
                                time.perf_counter() - start))  # fmt: skip
        log(f"{name:12s} {bits:6.3f} bits/param  perplexity {result.perplexity:.4f}  ({result.tokens} tokens)")
    return rows


def format_table(rows: list[DataTypeRow]) -> str:
    """A Markdown table of the rows, with the perplexity change against the 16-bit row."""
    base = next((r.perplexity for r in rows if r.quant_type is None), None)
    lines = ["| data type | bits/param (linears) | perplexity | vs 16-bit |", "|---|---|---|---|"]
    for r in rows:
        delta = "" if base is None or r.quant_type is None else f"{100 * (r.perplexity / base - 1):+.2f}%"
        lines.append(f"| {r.name} | {r.bits_per_param:.3f} | {r.perplexity:.4f} | {delta} |")
    return "\n".join(lines)


def rows_as_dicts(rows: list[DataTypeRow]) -> list[dict]:
    return [asdict(r) for r in rows]
