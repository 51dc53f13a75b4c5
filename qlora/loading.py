"""`load_model`: a checkpoint on disk -> a Llama-family model with a frozen 4-bit base and LoRA adapters.

The order of operations is the point of this module:

1. read the config and build the model on the `meta` device (no memory at all);
2. swap the block linears for `LoRALinear`s (still on meta; nothing is allocated);
3. stream the checkpoint one tensor at a time (safetensors shards or GGUF tensors); each block
   linear's weight is moved to the target device and quantized there as it arrives, every other
   tensor (embeddings, norms, lm_head, biases) is stored in the compute dtype;
4. tie embeddings, create the adapters on the target device, and check that every key the model
   needs arrived and nothing unknown did (errors name the keys).

A pre-quantized bitsandbytes 4-bit checkpoint (what `qlora quantize` or transformers'
`save_pretrained` writes) is used as it is: `iter_weights` yields each stored weight as a
`QuantizedTensor` that goes into its layer without a dequantize/requantize round trip; the stored
format wins over the requested `quant_type` (a warning says so when they differ), and
`quant_type=None` dequantizes to a dense model.

So peak host memory is about one tensor (safetensors maps shards; a tensor is copied out when
read) plus the quantized model, never the dense model: `tests/test_loading.py` measures it on a
sharded checkpoint in a fresh process. The checkpoint's own code is never run and only
safetensors or GGUF are read (no pickle).

Before step 4's adapters take any memory, the checkpoint's headers are compared with the model
config.json describes: the same names, and every tensor the shape the model gives it. A config
that does not describe its checkpoint (or a header that lies) is then a `CheckpointError` naming the
tensor, and what the adapters allocate is bounded by weights the files really hold. Each tensor is
checked again as it arrives (shape, and a floating-point dtype for a dense weight). Errors about
config.json name the file (`_model_config`).

`load` is the one entry point of the commands that run a model (`generate`, `eval`, the demo): the
`ModelSource` settings (`qlora.config`) in, the model with its adapter and the tokenizer out, with
the compute dtype `auto` and the adapter's training-run quantization resolved.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qlora.adapter import load_adapter_weights, read_adapter_config
from qlora.checkpoint_io.gguf_file import read_gguf
from qlora.checkpoint_io.safetensors_dir import (
    CheckpointError,
    ExpectedKeys,
    bnb_4bit_config,
    check_keys,
    expected_keys,
    header_shapes,
    iter_weights,
    read_config,
)
from qlora.config.files import run_quantization
from qlora.fused import use_fused_elementwise
from qlora.lora import DEFAULT_TARGETS, LoRALinear, LoraSpec, QuantSpec, replace_linears
from qlora.model.config import ModelConfig
from qlora.model.llama import LlamaForCausalLM
from qlora.ops import KernelPolicy
from qlora.precision import resolve_compute_dtype, resolve_device
from qlora.quant.tensor import QuantizedTensor
from qlora.tokenizer import Tokenizer

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelSourceError(ValueError):
    """The model path is neither a local checkpoint nor a reachable hub id."""


def resolve_model_path(path: str | Path) -> Path:
    """A local directory or .gguf file as given; a hub id ("org/name") downloaded through huggingface_hub."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    text = str(path)
    if not _HUB_ID.match(text):
        raise ModelSourceError(f"model path {text!r} does not exist (expected a model directory or a .gguf file)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ModelSourceError(
            f"{text!r} is not a local path; downloading it from the Hugging Face Hub needs huggingface_hub "
            "(pip install 'qlora[hub]'), or download the model yourself and pass its directory"
        ) from e
    try:
        local = snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.txt"])
    except Exception as e:  # the hub client raises many types; all mean the same to the user
        raise ModelSourceError(
            f"could not download {text!r} from the Hugging Face Hub ({type(e).__name__}: {str(e).splitlines()[0]}). "
            "Without network access, download the model elsewhere and pass its local directory."
        ) from None
    return Path(local)


def read_model_config(path: str | Path) -> ModelConfig:
    """The `ModelConfig` of a local directory (config.json) or GGUF file (its metadata)."""
    p = resolve_model_path(path)
    raw = read_gguf(p).hf_config if p.suffix == ".gguf" else read_config(p)
    return _model_config(raw, p)


def _model_config(raw: dict, path: Path) -> ModelConfig:
    """`ModelConfig.from_hf(raw)`, its errors prefixed with the file they are about."""
    try:
        return ModelConfig.from_hf(raw)
    except ValueError as e:  # ModelConfigError, UnsupportedModelError
        raise type(e)(f"{path if path.suffix == '.gguf' else path / 'config.json'}: {e}") from None


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load_model(
    path: str | Path,
    quant_type: str | None = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    *,
    blocksize: int = 64,
    lora: LoraSpec | None = None,
    quantized_modules: tuple[str, ...] = DEFAULT_TARGETS,
    policy: KernelPolicy | None = None,
    on_layer_loaded: Callable[[int, nn.Module], None] | None = None,
) -> LlamaForCausalLM:
    """Load a Llama-family checkpoint with its block linears quantized (`quant_type=None`: kept 16-bit).

    `path`: a Hugging Face model directory (safetensors, sharded or not), a .gguf file, or a hub id.
    `lora`: the adapters to create on the linears named by `lora.targets` (None: the frozen model
    only). `policy`: which kernels the model runs (default: `KernelPolicy.from_env()`), kept as
    `model.policy` and shared by every layer. Returns the model in eval mode on `device` (default: CUDA
    if available, else CPU). `on_layer_loaded(i, layer)` is called as soon as every weight of decoder layer i
    is in place (the adapters are made before any weight arrives), e.g. to shard it across processes while the
    next layers stream in, so that no device ever holds the whole model.
    """
    p = resolve_model_path(path)
    device = torch.device(device) if device is not None else _default_device()
    gguf = read_gguf(p) if p.suffix == ".gguf" else None
    raw_config = gguf.hf_config if gguf else read_config(p)
    config = _model_config(raw_config, p)
    if not gguf:
        bnb_4bit_config(raw_config, str(p / "config.json"))  # refuses quantization methods we cannot read
    model = LlamaForCausalLM.from_config(config, device="meta")
    needed = expected_keys(model)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}  # meta: no memory
    source = str(p)
    _check_header(source, gguf.tensor_shapes() if gguf else header_shapes(p), needed, shapes)
    quant = QuantSpec(quant_type, blocksize, double_quant)
    policy = policy if policy is not None else KernelPolicy.from_env()
    swapped = set(replace_linears(model, quant, lora, quantized_modules, device="meta", dtype=compute_dtype,
                                  policy=policy))  # fmt: skip
    use_fused_elementwise(model, policy)  # norms, SwiGLU, RoPE through qlora.ops: Triton on CUDA, the twins elsewhere
    model.policy = policy

    _init_adapters(model, device)  # before the weights (loading draws nothing from the RNG): a layer is whole
    layers_left = _keys_by_layer(needed.required, len(model.model.layers))  # when its last weight arrives
    seen: list[str] = []
    warned = False
    modules = dict(model.named_modules())
    for name, tensor in gguf.iter_tensors() if gguf else iter_weights(p):
        seen.append(name)
        module_name, _, leaf = name.rpartition(".")
        module = modules.get(module_name)
        if module is None or (leaf not in module._parameters and not (module_name in swapped and leaf == "weight")):
            continue  # reported by check_keys below, with every other unexpected key
        _check_tensor(source, name, tensor, shapes.get(name))
        if isinstance(tensor, QuantizedTensor) and module_name in swapped and quant_type is not None:
            stored = QuantSpec(tensor.quant_type, tensor.blocksize, tensor.double_quant)
            if stored != quant and not warned:
                log.warning("%s: the weights are stored pre-quantized as %s; using them as they are instead "
                            "of quantizing as %s", source, stored, quant)  # fmt: skip
                warned = True
            module.quant = stored
            module.set_base_quantized(_to_device(tensor, device))
        else:
            if isinstance(tensor, QuantizedTensor):  # a dense model was asked for, or a layer we keep dense
                tensor = tensor.dequantize(compute_dtype)
            if module_name in swapped and leaf == "weight":
                module.set_base_weight(_to_device(tensor, device))  # quantized there, on the device
            else:
                module._parameters[leaf] = nn.Parameter(_to_device(tensor, device, compute_dtype),
                                                        requires_grad=False)  # fmt: skip
        del tensor
        _one_loaded(name, layers_left, model, on_layer_loaded)
    check_keys(seen, needed, source=source)
    model.tie_weights()
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise RuntimeError(f"{source}: these tensors were never loaded: {left_on_meta[:10]}")
    return model.eval()


def _check_header(source: str, header: dict[str, tuple[int, ...] | None], needed: ExpectedKeys,
                  shapes: dict[str, tuple[int, ...]]) -> None:  # fmt: skip
    """The checkpoint's names and header shapes (None: a pre-quantized weight, checked on arrival) against the
    model's, before anything is allocated; CheckpointError naming the first tensor that does not fit."""
    check_keys(header, needed, source=source)
    for name, shape in header.items():
        want = shapes.get(name)
        if shape is not None and want is not None and shape != want:
            raise CheckpointError(f"{source}: tensor {name!r} has shape {list(shape)} in the checkpoint, but the model "
                                  f"its config describes needs {list(want)}; check that the config belongs to these "
                                  "weights")  # fmt: skip


def _check_tensor(source: str, name: str, tensor: torch.Tensor | QuantizedTensor, want: tuple[int, ...] | None) -> None:
    """A tensor as it arrives: the model's shape for it, and floating point if dense (not ints, bools, complex)."""
    if want is not None and tuple(tensor.shape) != want:
        raise CheckpointError(f"{source}: tensor {name!r} has shape {list(tensor.shape)}, the model needs {list(want)}")
    if isinstance(tensor, torch.Tensor) and not tensor.is_floating_point():
        raise CheckpointError(f"{source}: tensor {name!r} has dtype {tensor.dtype}; a weight must be floating point "
                              "(the file is corrupt, or not a checkpoint of this model)")  # fmt: skip


def _keys_by_layer(names: Iterable[str], n_layers: int) -> dict[int, set[str]]:
    """The checkpoint names each decoder layer needs ("model.layers.{i}.")."""
    return {i: {n for n in names if n.startswith(f"model.layers.{i}.")} for i in range(n_layers)}


def _one_loaded(name: str, layers_left: dict[int, set[str]], model: nn.Module,
                on_layer_loaded: Callable[[int, nn.Module], None] | None) -> None:  # fmt: skip
    """Cross `name` off its layer's list; call `on_layer_loaded` when that was the layer's last weight."""
    if not name.startswith("model.layers."):
        return
    i = int(name.split(".")[2])
    left = layers_left.get(i)
    if left is None or name not in left:
        return
    left.discard(name)
    if not left and on_layer_loaded is not None:
        on_layer_loaded(i, model.model.layers[i])


def _to_device(
    tensor: torch.Tensor | QuantizedTensor, device: torch.device, dtype: torch.dtype | None = None
) -> torch.Tensor | QuantizedTensor:
    """A checkpoint tensor on `device` (and in `dtype`): the one place where the loader's bytes cross to the
    device, so `bench/load_time.py` can time the transfer apart from the quantization that follows it."""
    if isinstance(tensor, QuantizedTensor):
        return tensor.to(device)
    return tensor.to(device, dtype) if dtype is not None else tensor.to(device)


def _init_adapters(model: nn.Module, device: torch.device) -> None:
    """Give every LoRA layer's adapter (built on meta) storage on `device` and its default init, in module order
    (the order draws from the global RNG, which the pinned golden losses depend on).

    New `torch.empty` parameters rather than `Module.to_empty`: that calls `empty_like` on the meta tensors,
    which runs torch's Python reference of it, whose first call imports sympy (0.85 s on a CPU, torch 2.13)."""
    for module in model.modules():
        if isinstance(module, LoRALinear) and module.r:
            for holder in (module.lora_A, module.lora_B):
                old = holder.weight
                holder.weight = nn.Parameter(torch.empty(old.shape, dtype=old.dtype, device=device),
                                             requires_grad=old.requires_grad)  # fmt: skip
            module.reset_adapter()


@dataclass(frozen=True)
class Loaded:
    """What `load` returns: the model and its tokenizer, and the compute dtype and device it resolved."""

    model: LlamaForCausalLM
    tokenizer: Tokenizer
    compute_dtype: torch.dtype
    device: torch.device
    dtype_reason: str  # why this compute dtype ("compute dtype float32 (auto): this CPU has AVX2 but ...")


def load(
    path: str | Path,
    adapter: str | Path | None = None,
    *,
    quant_type: str = "auto",
    double_quant: bool | None = None,
    blocksize: int | None = None,
    compute_dtype: str = "auto",
    device: str | torch.device = "auto",
) -> Loaded:
    """A model (+ adapter) and its tokenizer, ready to evaluate: what every command that runs a model loads.

    The parameters are `qlora.config.ModelSource`'s fields, so a command calls
    `load(**dataclasses.asdict(cfg.model))`. `quant_type` "auto" (and `double_quant` / `blocksize` None) take
    the adapter's training run's settings (the config.yaml `qlora train` writes beside the adapter), else
    nf4 with double quantization in blocks of 64; "none" keeps the base 16-bit. `compute_dtype` is a dtype
    name or alias or "auto" (`qlora.precision.resolve_compute_dtype`; the reason is logged and returned);
    `device` "auto" is CUDA if available, else the CPU. The adapter is read with
    `qlora.adapter.read_adapter_config` and `load_adapter_weights` (PEFT's format, ours or PEFT's).
    """
    run = run_quantization(adapter) if adapter is not None and quant_type == "auto" else {}
    quant = run.get("quant_type", "nf4") if quant_type == "auto" else quant_type
    double_quant = run.get("double_quant", True) if double_quant is None else double_quant
    blocksize = run.get("blocksize", 64) if blocksize is None else blocksize
    target = resolve_device(str(device))
    dtype, reason = resolve_compute_dtype(compute_dtype, target)
    log.info("%s", reason)
    lora = read_adapter_config(adapter) if adapter is not None else None
    local = resolve_model_path(path)
    model = load_model(local, None if quant == "none" else quant, double_quant, dtype, target, blocksize=blocksize,
                       lora=lora)  # fmt: skip
    if adapter is not None:
        load_adapter_weights(model, adapter)
    return Loaded(model.eval(), Tokenizer.from_pretrained(local), dtype, target, reason)
