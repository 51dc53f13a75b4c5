"""LoRA adapters on disk in PEFT's format: the one reader and writer, used by loading, training
(`lora.init_from`, resume), merge and export, so what `qlora train` writes loads with
`peft.PeftModel.from_pretrained` unchanged and what PEFT writes loads here or is refused (format-spec 4.1).

    adapter_config.json          peft_type "LORA", task_type "CAUSAL_LM", r, lora_alpha, target_modules,
                                 rank_pattern, alpha_pattern, lora_dropout, use_rslora, bias "none", ...
    adapter_model.safetensors    base_model.model.<module name>.lora_A.weight  [r, in]
                                 base_model.model.<module name>.lora_B.weight  [out, r]
                                 (safetensors metadata {"format": "pt"})

Our module names are transformers' own (see `qlora.model.llama`), so the only translation is the
`base_model.model.` prefix. `target_modules` becomes the set of leaf names (PEFT matches an entry as a
suffix of the module name); the weights file then decides, strictly, which layers carry an adapter.

Per-layer r and alpha (`rank_pattern`, `alpha_pattern`) are applied as PEFT applies them: keys are
regular expressions matched against the full module name ("model.layers.0.self_attn.q_proj") as
`(.*\\.)?(key)`, the first matching key in the file's order wins, unmatched modules take `r` /
`lora_alpha` (`LoraSpec.for_layer`). PEFT saves the keys sorted, so where two keys match one module the
PEFT model that saved an adapter can differ from the one `PeftModel.from_pretrained` rebuilds; we follow
the file, as the latter does, and write our own patterns in the spec's order. Every other field PEFT
writes is either used, ignored because it does not change the adapter's maths (`IGNORED`, with the
reason), or refused when set (`REFUSED`): an adapter we would compute differently from PEFT is an error
naming the file and the field, never a silently different model. Fields of a newer PEFT that we do not
know are refused when set, ignored when empty or false (PEFT's features default to off).

Tensors are saved in float32 (exact for bfloat16-trained adapters too). Writing goes through a
temporary file and `os.replace`, so an interrupted save never leaves a torn adapter.

Reading trusts nothing in the files. A damaged adapter_config.json (bad UTF-8, bad or absurdly nested
JSON) or adapter_model.safetensors (a truncated or lying header) is an `AdapterError` naming it; a rank
above `MAX_RANK` is refused; when the weights file is there, `read_adapter_config` already checks its
header (names, dtypes, every pair's shape against the config's ranks), so a mismatch is reported
before a model is built with adapters of the wrong size. A pickled `adapter_model.bin` is never
unpickled (unpickling runs code stored in the file): the error says how to convert it.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from qlora.checkpoint_io.safetensors_dir import open_safetensors, read_json_file, read_tensor
from qlora.distributed.tensors import copy_full_into_, full_tensor
from qlora.lora import LoraSpec, lora_layers

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = "adapter_model.bin"
# Wider than every layer of every released model (the widest: 53,248), so never a rank anyone trains; the
# bound keeps a damaged config from sizing adapters beyond any memory.
MAX_RANK = 1 << 16
# Adapter tensor dtypes (safetensors' names) read: the floating-point ones PEFT saves.
ADAPTER_DTYPES = ("F32", "F16", "BF16", "F64")
PEFT_PREFIX = "base_model.model."
# base_model.model.<module>.lora_A.weight; PEFT keeps the adapter name out of saved keys, ".default" is accepted
_TENSOR_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight")

# Fields read into the LoraSpec.
USED = ("peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules", "rank_pattern",
        "alpha_pattern", "init_lora_weights")  # fmt: skip
# Fields that do not change what the saved adapter computes, and why.
IGNORED = {
    "task_type": "which PeftModel class wraps the model; the layers and their maths are the same",
    "auto_mapping": "which class PEFT wrapped (provenance)",
    "peft_version": "provenance",
    "base_model_name_or_path": "provenance; the base is given to qlora explicitly",
    "revision": "provenance",
    "inference_mode": "whether PEFT marks the adapter trainable; the qlora command decides",
    "megatron_core": "the Megatron module path, read only with megatron_config (refused when set)",
    "runtime_config": "runtime options (ephemeral GPU offload), not part of the adapter",
    "loftq_config": "read only by init_lora_weights 'loftq' (refused)",
    "eva_config": "read only by init_lora_weights 'eva' (the initial A; the saved tensors replace it)",
    "corda_config": "read only by init_lora_weights 'corda' (refused)",
    "lora_ga_config": "read only by init_lora_weights 'lora_ga' (refused)",
    "qalora_group_size": "read only with use_qalora (refused when true)",
}
# Fields refused when set (truthy), with what they are; `bias` is refused unless "none".
REFUSED = {
    "use_dora": "DoRA (a learned magnitude per output row)",
    "fan_in_fan_out": "weights stored transposed (GPT-2 style Conv1D layers)",
    "bias": "trained biases of the base layers",
    "lora_bias": "a bias on lora_B",
    "modules_to_save": "fully trained copies of extra modules",
    "layers_to_transform": "adapters on some layers only",
    "layers_pattern": "adapters on some layers only",
    "exclude_modules": "target modules excluded by name",
    "trainable_token_indices": "trained embedding rows",
    "layer_replication": "replicated decoder layers",
    "target_parameters": "adapters on parameters rather than linear layers",
    "megatron_config": "Megatron tensor-parallel layers",
    "use_qalora": "QA-LoRA (pooled adapter inputs)",
    "ensure_weight_tying": "adapters tied between embedding and output layers",
    "velora_config": "the VeLoRA variant",
    "alora_invocation_tokens": "activated LoRA (adapter on after an invocation sequence)",
    "monteclora_config": "the MonteCLoRA variant",
    "use_bdlora": "the BD-LoRA variant",
    "arrow_config": "Arrow routing between adapters",
    "kasa_config": "the KaSA variant",
}
# init_lora_weights values that only choose the initial A and B, which the saved tensors replace. The others
# (pissa, olora, corda, loftq, lora_ga, mica) also rewrite the base weight or change the layer: the adapter is
# relative to a base we do not have (PEFT saves a converted adapter with init_lora_weights true for those).
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


class AdapterError(ValueError):
    """An adapter directory that cannot be read, or does not fit the model."""


# ---------------------------------------------------------------------------------------------- writing


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT-named adapter tensors of `model` (detached, contiguous, on the CPU). Sharded (FSDP) adapters are
    gathered whole: every rank must call this, and every rank gets the same tensors."""
    out = {}
    for name, layer in lora_layers(model).items():
        for ab in ("lora_A", "lora_B"):
            weight = full_tensor(getattr(layer, ab).weight.detach())
            out[f"{PEFT_PREFIX}{name}.{ab}.weight"] = weight.float().cpu().contiguous()
    return out


def adapter_config(lora: LoraSpec, base_model: str) -> dict:
    """The adapter_config.json fields PEFT reads (missing ones take PEFT's defaults). The patterns keep the
    spec's order (the first match wins), so the file is written with this dict's key order."""
    fields = {
        "alpha_pattern": dict(lora.alpha_pattern),
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
        "rank_pattern": dict(lora.rank_pattern),
        "target_modules": sorted(lora.targets),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": lora.use_rslora,
    }
    return dict(sorted(fields.items()))


def _atomic_write(path: Path, write) -> None:
    """Write `path` through a hidden temporary beside it and one rename. Temporaries a killed writer left (any
    process id: a `finally` does not run under SIGKILL) are removed first; one writer per directory."""
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_adapter(model: nn.Module, directory: str | Path, lora: LoraSpec, base_model: str) -> Path:
    """Write `model`'s adapters (built from `lora`) to `directory` in PEFT's format; return the directory."""
    return write_adapter(adapter_state_dict(model), directory, lora, base_model)


def write_adapter(tensors: dict[str, torch.Tensor], directory: str | Path, lora: LoraSpec, base_model: str) -> Path:
    """Write the PEFT-named `tensors` (`adapter_state_dict`) and the config of `lora` to `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not tensors:
        raise AdapterError("the model has no LoRA adapters to save")
    _atomic_write(directory / ADAPTER_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    text = json.dumps(adapter_config(lora, base_model), indent=2) + "\n"  # key order: adapter_config's
    _atomic_write(directory / ADAPTER_CONFIG, lambda p: p.write_text(text, encoding="utf-8"))
    return directory


# ---------------------------------------------------------------------------------------------- reading


def _number(path: Path, key: str, value, kind=float, positive: bool = False, most: float = 2.0**53):
    """`value` of `key` as `kind`: a JSON number (integral for int), finite, positive if asked, at most `most`."""
    shown = repr(value) if len(repr(value)) <= 60 else f"{repr(value)[:57]}..."
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(value, float):
        number = math.isfinite(value) and (kind is float or value.is_integer())
    if not number:
        raise AdapterError(f"{path}: {key} is {shown}; expected {'an integer' if kind is int else 'a number'}")
    if positive and value <= 0:
        raise AdapterError(f"{path}: {key} is {shown}; expected a positive value")
    if abs(value) > most:
        raise AdapterError(f"{path}: {key} is {shown}; expected at most {most:,.0f}")
    return kind(value)


def _pattern(path: Path, cfg: dict, field: str, kind, most: float) -> tuple[tuple[str, int | float], ...]:
    value = cfg.get(field) or {}
    if not isinstance(value, dict):
        raise AdapterError(f"{path}: {field} is {value!r}; expected an object of module-name pattern: value")
    pairs = []
    for key, v in value.items():  # the file's order: PEFT takes the first key that matches
        try:
            re.compile(key)
        except re.error as e:
            raise AdapterError(f"{path}: {field} key {key!r} is not a valid regular expression ({e})") from None
        pairs.append((key, _number(path, f"{field}[{key!r}]", v, kind, positive=True, most=most)))
    return tuple(pairs)


def _refuse_unsupported(path: Path, cfg: dict) -> None:
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type is {cfg.get('peft_type')!r}; only LORA adapters are supported")
    for field, value in cfg.items():
        if field in USED or field in IGNORED:
            continue
        if field == "bias":
            if value not in (None, "none"):
                raise AdapterError(f"{path}: bias is {value!r} ({REFUSED['bias']}); qlora supports only "
                                   '"none": train the adapter with bias="none"')  # fmt: skip
        elif field in REFUSED:
            if value:
                raise AdapterError(f"{path}: {field} is {value!r}: {REFUSED[field]} is not supported by qlora; "
                                   f"train the adapter without {field}")  # fmt: skip
        elif value:
            raise AdapterError(f"{path}: {field} is {value!r}, a field this qlora does not know; refusing rather than "
                               "computing the adapter differently from PEFT")  # fmt: skip
    init = cfg.get("init_lora_weights", True)
    if init not in PLAIN_INITS:
        raise AdapterError(f"{path}: init_lora_weights is {init!r}: that initialisation changes the base weights, so "
                           "this adapter needs a base qlora does not have; save it with PEFT's "
                           "path_initial_model_for_weight_conversion to get a plain LoRA adapter")  # fmt: skip


def read_adapter_config(directory: str | Path) -> LoraSpec:
    """The LoraSpec of a PEFT adapter directory (ours or PEFT's), with its rank and alpha patterns; raises
    AdapterError naming the file and field for what qlora does not compute as PEFT does (see module doc)."""
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterError(f"{path}: not found (an adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    cfg = read_json_file(path, AdapterError)
    if not isinstance(cfg, dict):
        raise AdapterError(f"{path}: expected a JSON object, found {type(cfg).__name__}")
    _refuse_unsupported(path, cfg)
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        raise AdapterError(f"{path}: target_modules {targets!r} (a pattern) is not supported; list module names")
    if not targets or not all(isinstance(t, str) for t in targets):
        raise AdapterError(f"{path}: target_modules is {targets!r}; expected a non-empty list of module names")
    dropout = _number(path, "lora_dropout", cfg.get("lora_dropout", 0.0))
    if not 0.0 <= dropout < 1.0:
        raise AdapterError(f"{path}: lora_dropout is {dropout!r}; expected a probability in [0, 1)")
    use_rslora = cfg.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise AdapterError(f"{path}: use_rslora is {use_rslora!r}; expected true or false")
    spec = LoraSpec(
        r=_number(path, "r", cfg.get("r", 8), int, positive=True, most=MAX_RANK),  # PEFT's defaults: r 8, alpha 8
        alpha=_number(path, "lora_alpha", cfg.get("lora_alpha", 8)),
        dropout=dropout,
        use_rslora=use_rslora,
        targets=tuple(sorted({t.rsplit(".", 1)[-1] for t in targets})),
        rank_pattern=_pattern(path, cfg, "rank_pattern", int, MAX_RANK),
        alpha_pattern=_pattern(path, cfg, "alpha_pattern", float, 2.0**53),
    )
    weights = Path(directory) / ADAPTER_WEIGHTS
    if weights.is_file():  # the pairs' shapes against these ranks, before anyone sizes adapters with them
        with open_safetensors(weights, AdapterError) as f:
            _checked_header(weights, spec, f)
    return spec


def _tensor_keys(path: Path, keys) -> dict[str, dict[str, str]]:
    """{module name: {"A": key, "B": key}} of an adapter weights file; anything else is an error."""
    found: dict[str, dict[str, str]] = {}
    for key in keys:
        m = _TENSOR_KEY.fullmatch(key)
        if m is None:
            raise AdapterError(f"{path}: tensor {key!r} is not a LoRA weight ({PEFT_PREFIX}<module>.lora_A.weight or "
                               "lora_B.weight); qlora adapters hold only those")  # fmt: skip
        pair = found.setdefault(m["module"], {})
        if m["ab"] in pair:
            raise AdapterError(f"{path}: two tensors for {m['module']} lora_{m['ab']}: {pair[m['ab']]!r}, {key!r}")
        pair[m["ab"]] = key
    incomplete = sorted(n for n, p in found.items() if set(p) != {"A", "B"})
    if incomplete:
        raise AdapterError(f"{path}: modules without both lora_A and lora_B: {incomplete[:5]}")
    return found


def _weights_path(directory: Path) -> Path:
    path = directory / ADAPTER_WEIGHTS
    if not path.is_file() and (directory / PICKLED_WEIGHTS).is_file():
        raise AdapterError(f"{directory / PICKLED_WEIGHTS}: a pickled adapter, which qlora does not read (unpickling "
                           f"runs code stored in the file); it reads {ADAPTER_WEIGHTS}. Convert it once where you "
                           "trust the file: peft.PeftModel.from_pretrained(base, dir).save_pretrained(out, "
                           "safe_serialization=True)")  # fmt: skip
    if not path.is_file():
        raise AdapterError(f"{path}: not found")
    return path


def _checked_header(path: Path, spec: LoraSpec, f) -> dict[str, tuple[dict[str, str], list[int], list[int]]]:
    """{module: (its A/B keys, A's shape, B's shape)} from the open weights file `f`'s header, each pair checked
    (`_check_pair`) and of a floating-point dtype; no tensor data is read."""
    out = {}
    for module, keys in _tensor_keys(path, f.keys()).items():
        a, b = f.get_slice(keys["A"]), f.get_slice(keys["B"])
        for key, tensor in ((keys["A"], a), (keys["B"], b)):
            if tensor.get_dtype() not in ADAPTER_DTYPES:
                raise AdapterError(f"{path}: {key} has dtype {tensor.get_dtype()}; LoRA weights are floating point "
                                   f"({', '.join(ADAPTER_DTYPES)})")  # fmt: skip
        _check_pair(path, spec, module, a.get_shape(), b.get_shape())
        out[module] = (keys, a.get_shape(), b.get_shape())
    return out


def _check_pair(path: Path, spec: LoraSpec, module: str, a_shape, b_shape) -> None:
    """A [r, in] and B [out, r] of `module` agree with each other and with the config's r for it."""
    if module.rsplit(".", 1)[-1] not in spec.targets:
        raise AdapterError(f"{path}: adapter for {module}, which target_modules {list(spec.targets)} does not name")
    r = spec.for_layer(module).r
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != r or b_shape[1] != r:
        raise AdapterError(f"{path}: {module} has lora_A {list(a_shape)} and lora_B {list(b_shape)}, but "
                           f"{ADAPTER_CONFIG} gives it rank {r} (r, rank_pattern)")  # fmt: skip


def read_adapter(directory: str | Path) -> tuple[LoraSpec, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The adapter's spec and its float32 (A [r, in], B [out, r]) pairs by module name, checked against each
    other (per-layer ranks included); for code that needs the tensors without a model (merge)."""
    directory = Path(directory)
    spec = read_adapter_config(directory)
    path = _weights_path(directory)
    pairs = {}
    with open_safetensors(path, AdapterError) as f:
        for module, (keys, _, _) in _checked_header(path, spec, f).items():
            pairs[module] = tuple(read_tensor(f, path, keys[ab], AdapterError).float() for ab in "AB")
    return spec, pairs


def load_adapter_weights(model: nn.Module, directory: str | Path) -> None:
    """Copy the adapter of `directory` into `model`'s adapters. Strict: the adapted modules, every tensor's
    shape and every layer's scale must be the adapter's, i.e. the model was built with
    `read_adapter_config(directory)` (its r, alpha, rslora and patterns; dropout may differ). Nothing is
    copied unless all fit."""
    directory = Path(directory)
    spec = read_adapter_config(directory)
    path = _weights_path(directory)
    layers = lora_layers(model)
    with open_safetensors(path, AdapterError) as f:
        header = _checked_header(path, spec, f)
        keys = {module: pair for module, (pair, _, _) in header.items()}
        missing, unexpected = sorted(set(layers) - set(keys)), sorted(set(keys) - set(layers))
        if missing or unexpected:
            raise AdapterError(f"{path}: adapter does not fit the model; modules with an adapter in the model only "
                               f"{missing[:5]}, in the file only {unexpected[:5]} ({len(missing)} and "
                               f"{len(unexpected)} in all)")  # fmt: skip
        for module, (pair, a_shape, b_shape) in header.items():
            layer = layers[module]
            for ab, shape, target in (("A", a_shape, layer.lora_A.weight), ("B", b_shape, layer.lora_B.weight)):
                if tuple(shape) != tuple(target.shape):
                    raise AdapterError(f"{path}: {pair[ab]} has shape {tuple(shape)}, the model needs "
                                       f"{tuple(target.shape)}: build the model with "
                                       f"read_adapter_config({str(directory)!r}) (its r and rank_pattern)")  # fmt: skip
            want = spec.for_layer(module).scale
            if not math.isclose(layer.scale, want, rel_tol=1e-9):
                raise AdapterError(f"{path}: {module} has scale {want:g} in the adapter (lora_alpha, alpha_pattern, "
                                   f"use_rslora) but {layer.scale:g} in the model: build the model with "
                                   f"read_adapter_config({str(directory)!r})")  # fmt: skip
        with torch.no_grad():
            for module, pair in keys.items():  # (each rank's shard when sharded)
                copy_full_into_(layers[module].lora_A.weight, read_tensor(f, path, pair["A"], AdapterError))
                copy_full_into_(layers[module].lora_B.weight, read_tensor(f, path, pair["B"], AdapterError))
