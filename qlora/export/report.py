"""The merge report: how far the merged model is from base + adapter, on held-out text.

The reference is the model the adapter was trained with: the base quantized as in training
(`TrainedBase`) plus the adapter, evaluated in float32. The candidate is the merged directory,
loaded dense and evaluated in float32. Both see the same token windows; per predicted position
we compute KL(reference || merged) over the vocabulary and each model's negative log-likelihood.

    kl_mean, kl_max       nats per token, mean and worst position
    ppl_reference         exp(mean NLL) of base + adapter
    ppl_merged            exp(mean NLL) of the merged model
    ppl_diff              ppl_merged - ppl_reference
    top1_agreement        fraction of positions whose argmax token agrees

Evaluation runs in float32 so that the numbers measure the merge (rounding to the output dtype,
and with `--onto original` the quantization error the adapter was trained around), not the
arithmetic of the evaluation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from qlora.adapter import load_adapter_weights, read_adapter_config
from qlora.checkpoint_io.safetensors_dir import bnb_4bit_config, read_config
from qlora.export.merge import TrainedBase
from qlora.loading import load_model, resolve_model_path
from qlora.lora import LoRALinear
from qlora.tokenizer import Tokenizer

REPORT_FILE = "merge_report.json"


def text_windows(tokenizer: Tokenizer, text: str, max_tokens: int, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows [N, seq_len] of the text's first `max_tokens` tokens (BOS first if it has one)."""
    ids = tokenizer.encode(text)[:max_tokens]
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"the held-out text has {len(ids)} tokens, fewer than one window of {seq_len}")
    windows = torch.tensor(ids[: n * seq_len]).reshape(n, seq_len)
    if tokenizer.bos_id is not None:
        windows = torch.cat([torch.full((n, 1), tokenizer.bos_id), windows[:, :-1]], dim=1)
    return windows


def trained_reference(model_path, adapter_dir, base: TrainedBase, device="cpu"):
    """Base + adapter as trained, in float32: every quantized block linear holds dequant(quant(W))
    computed exactly as training did (W cast to the training dtype, then quantized); embeddings,
    norms and lm_head keep the checkpoint's values. A pre-quantized base keeps its stored codes."""
    lora = read_adapter_config(adapter_dir) if adapter_dir is not None else None
    path = resolve_model_path(model_path)
    prequantized = path.is_dir() and bnb_4bit_config(read_config(path)) is not None
    model = load_model(path, None, compute_dtype=torch.float32, device=device, lora=lora)
    if not prequantized:
        for layer in model.modules():
            if isinstance(layer, LoRALinear):
                layer.base = base.base_weight(layer.base)
    if adapter_dir is not None:
        load_adapter_weights(model, adapter_dir)
    return model


@torch.no_grad()
def compare_models(reference, merged, windows: torch.Tensor, batch: int = 4) -> dict[str, float]:
    """KL, perplexities and top-1 agreement of `merged` against `reference` on `windows` [N, T]."""
    kl_sum, kl_max, nll_ref, nll_merged, agree, count = 0.0, 0.0, 0.0, 0.0, 0, 0
    for start in range(0, windows.shape[0], batch):
        ids = windows[start : start + batch]
        targets = ids[:, 1:].reshape(-1)  # [B*(T-1)]
        logp_ref = F.log_softmax(reference(ids)[:, :-1].float(), dim=-1).flatten(0, 1)  # [B*(T-1), V]
        logp_merged = F.log_softmax(merged(ids)[:, :-1].float(), dim=-1).flatten(0, 1)
        kl = (logp_ref.exp() * (logp_ref - logp_merged)).sum(-1)  # [B*(T-1)]
        kl_sum += kl.sum().item()
        kl_max = max(kl_max, kl.max().item())
        nll_ref -= logp_ref.gather(1, targets[:, None]).sum().item()
        nll_merged -= logp_merged.gather(1, targets[:, None]).sum().item()
        agree += (logp_ref.argmax(-1) == logp_merged.argmax(-1)).sum().item()
        count += targets.numel()
    ppl_ref, ppl_merged = math.exp(nll_ref / count), math.exp(nll_merged / count)
    return {
        "tokens": count,
        "kl_mean": kl_sum / count,
        "kl_max": kl_max,
        "ppl_reference": ppl_ref,
        "ppl_merged": ppl_merged,
        "ppl_diff": ppl_merged - ppl_ref,
        "top1_agreement": agree / count,
    }


def merge_report(
    model_path: str | Path,
    adapter_dir: str | Path | None,
    merged_dir: str | Path,
    text_file: str | Path,
    *,
    base: TrainedBase,
    onto: str,
    dtype_name: str,
    max_tokens: int = 4096,
    seq_len: int = 256,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Evaluate the merged directory against base + adapter on `text_file`; save and return the report."""
    reference = trained_reference(model_path, adapter_dir, base, device)
    merged = load_model(merged_dir, None, compute_dtype=torch.float32, device=device)
    tokenizer = Tokenizer.from_pretrained(merged_dir)
    text = Path(text_file).read_text(encoding="utf-8")
    windows = text_windows(tokenizer, text, max_tokens, seq_len).to(device)
    report = {
        "model": str(model_path),
        "adapter": None if adapter_dir is None else str(adapter_dir),
        "merged": str(merged_dir),
        "onto": onto,
        "dtype": dtype_name,
        "trained_base": {"quant_type": base.quant_type, "double_quant": base.double_quant,
                         "blocksize": base.blocksize, "dtype": str(base.dtype).removeprefix("torch.")},
        "text": str(text_file),
        **compare_models(reference, merged, windows),
    }  # fmt: skip
    (Path(merged_dir) / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def format_report(report: dict[str, Any]) -> str:
    return (
        f"merge report ({report['onto']}, {report['dtype']}) on {report['tokens']} tokens of {report['text']}:\n"
        f"  KL(base+adapter || merged)  mean {report['kl_mean']:.3e}  max {report['kl_max']:.3e} nats/token\n"
        f"  perplexity  base+adapter {report['ppl_reference']:.4f}  merged {report['ppl_merged']:.4f}  "
        f"diff {report['ppl_diff']:+.4f}\n"
        f"  top-1 agreement {report['top1_agreement']:.4f}"
    )
