"""LoRA adapters on disk in PEFT's format, so what `qlora train` writes loads with
`peft.PeftModel.from_pretrained` unchanged (format-spec 4.1).

    adapter_config.json          peft_type "LORA", task_type "CAUSAL_LM", r, lora_alpha, target_modules,
                                 lora_dropout, use_rslora, bias "none", base_model_name_or_path, ...
    adapter_model.safetensors    base_model.model.<module name>.lora_A.weight  [r, in]
                                 base_model.model.<module name>.lora_B.weight  [out, r]
                                 (safetensors metadata {"format": "pt"})

Our module names are transformers' own (see `qlora.model.llama`), so the only translation is the
`base_model.model.` prefix. Tensors are saved in float32 (exact for bfloat16-trained adapters too). Writing goes
through a temporary file and `os.replace`, so an interrupted save never leaves a torn adapter.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from qlora.lora import LoraSpec, lora_layers

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class AdapterError(ValueError):
    """An adapter directory that does not fit the model."""


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT-named adapter tensors of `model` (detached, contiguous, on the CPU)."""
    out = {}
    for name, layer in lora_layers(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().float().cpu().contiguous()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().float().cpu().contiguous()
    return out


def adapter_config(lora: LoraSpec, base_model: str) -> dict:
    """The adapter_config.json fields PEFT reads (missing ones take PEFT's defaults)."""
    return {
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": lora.r,
        "target_modules": sorted(lora.targets),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": lora.use_rslora,
    }


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_adapter(model: nn.Module, directory: str | Path, lora: LoraSpec, base_model: str) -> Path:
    """Write `model`'s adapters to `directory` in PEFT's format; return the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state_dict(model)
    if not tensors:
        raise AdapterError("the model has no LoRA adapters to save")
    _atomic_write(directory / ADAPTER_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    text = json.dumps(adapter_config(lora, base_model), indent=2, sort_keys=True) + "\n"
    _atomic_write(directory / ADAPTER_CONFIG, lambda p: p.write_text(text, encoding="utf-8"))
    return directory


def read_adapter_config(directory: str | Path) -> LoraSpec:
    """The LoraSpec of a PEFT adapter directory (ours or PEFT's)."""
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterError(f"{path}: not found (an adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type is {cfg.get('peft_type')!r}; only LORA adapters are supported")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        raise AdapterError(f"{path}: target_modules {targets!r} (a pattern) is not supported; list module names")
    suffixes = tuple(sorted({t.rsplit(".", 1)[-1] for t in targets}))
    return LoraSpec(r=int(cfg.get("r", 8)), alpha=float(cfg.get("lora_alpha", 8)),
                    dropout=float(cfg.get("lora_dropout", 0.0)), use_rslora=bool(cfg.get("use_rslora", False)),
                    targets=suffixes)  # fmt: skip


def load_adapter_weights(model: nn.Module, directory: str | Path) -> None:
    """Copy the adapter tensors of `directory` into `model`'s adapters (strict: names and shapes must match)."""
    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise AdapterError(f"{path}: not found")
    layers = lora_layers(model)
    expected = {f"{PEFT_PREFIX}{n}.lora_{ab}.weight": (layer, ab) for n, layer in layers.items() for ab in "AB"}
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        # PEFT keeps the adapter name out of saved keys; accept an explicit ".default" too.
        normalised = {k.replace(".default.", ".") if ".lora_" in k else k: k for k in keys}
        missing = sorted(set(expected) - set(normalised))
        unexpected = sorted(set(normalised) - set(expected))
        if missing or unexpected:
            raise AdapterError(f"{path}: adapter does not fit the model; missing {missing[:5]}, unexpected "
                               f"{unexpected[:5]} ({len(missing)} and {len(unexpected)} in all)")  # fmt: skip
        with torch.no_grad():
            for name, (layer, ab) in expected.items():
                tensor = f.get_tensor(normalised[name])
                target = layer.lora_A.weight if ab == "A" else layer.lora_B.weight
                if tensor.shape != target.shape:
                    raise AdapterError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model needs "
                                       f"{tuple(target.shape)}")  # fmt: skip
                target.copy_(tensor)
