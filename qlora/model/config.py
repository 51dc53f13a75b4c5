"""The decoder's configuration: one typed record read from a checkpoint's `config.json`.

Every model this engine trains is a Llama-family decoder: token embedding, N blocks of
(RMSNorm -> grouped-query attention with rotary positions -> residual, RMSNorm -> SwiGLU MLP ->
residual), a final RMSNorm and a vocabulary projection. The families differ in a handful of
switches, and `ModelConfig` names each of them explicitly instead of branching on `model_type`
inside the model code:

    family   q/k/v bias        o_proj bias       mlp bias     q/k RMSNorm   sliding window
    llama    attention_bias    attention_bias    mlp_bias     no            no
    mistral  no                no                no           no            all layers, if set
    qwen2    always            never             no           no            per layer_types
    qwen3    attention_bias    attention_bias    no           yes           per layer_types

`from_hf` is the only place that knows these per-family rules (read from transformers 5.23's
`modeling_{llama,mistral,qwen2,qwen3}.py`), so the model reads flags, never family names.
Anything we do not implement is refused with an error that names it rather than silently
computing a different function: an unsupported `model_type`, an activation other than SiLU,
partial rotary embeddings, and RoPE scaling types other than none/"default", "linear" and
"llama3" (Llama 3.1/3.2's frequency-dependent scaling).

Both spellings of the RoPE settings are accepted: the classic top-level `rope_theta` plus
`rope_scaling` (what checkpoints on the Hub carry) and transformers 5's `rope_parameters`
(which folds `rope_theta` into the dict). We normalise to `rope_theta: float` plus
`rope_scaling: dict | None` (None for plain RoPE) holding `rope_type` and that type's keys.

Sliding-window attention (Mistral v0.1, Qwen2 with `use_sliding_window`) is implemented in the
attention mask (`qlora.model.llama`), with transformers' semantics: a query at cache index i
may attend key index j when `i - window < j <= i`. `layer_types` records per layer whether the
window applies ("sliding_attention") or not ("full_attention").

`attention_dropout` is not implemented (the QLoRA recipes use 0.0); it is read and ignored.

Sizes are checked before anything is built: each must be a JSON integer (not a string, float or
bool) and at most `SIZE_LIMITS`, a wide margin above every released checkpoint, and without a
`head_dim` the heads must divide `hidden_size`. A damaged or hostile config.json (hidden_size 10**12,
num_hidden_layers -3) is then a `ModelConfigError` naming the key, not an allocator failure later;
the reader that knows the file (`from_json_file`, the loader) prefixes its name.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora.config.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")

# Keys each scaled RoPE type needs, besides `rope_type` (transformers' `_validate_*_rope_parameters`).
_ROPE_REQUIRED_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}

# transformers' per-family defaults for keys a config.json may leave out.
_DEFAULT_MAX_POSITIONS = {"llama": 2048, "mistral": 4096 * 32, "qwen2": 32768, "qwen3": 32768}
_DEFAULT_ROPE_THETA = 10000.0
_DEFAULT_RMS_NORM_EPS = 1e-6
_REQUIRED_HF_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


# Largest released Llama-family sizes (Llama 3.1 405B: hidden 16,384, intermediate 53,248, 126 layers, 128 heads;
# vocabularies up to 262,144; head_dim up to 256) times 8 or more: larger is a damaged or hostile config.
SIZE_LIMITS = {
    "vocab_size": 1 << 22,
    "hidden_size": 1 << 17,
    "intermediate_size": 1 << 19,
    "num_hidden_layers": 1 << 11,
    "num_attention_heads": 1 << 12,
    "num_key_value_heads": 1 << 12,
    "head_dim": 1 << 12,
}


class UnsupportedModelError(ValueError):
    """The checkpoint describes a model this engine does not implement (type, activation, RoPE, ...)."""


class ModelConfigError(ConfigError):
    """A config.json value no model can have (wrong type, out of range); the message names the key."""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _integer(key: str, value: Any, low: int = 1, high: int | None = None) -> int:
    """`value` of `key` if it is an integer in [low, high]; else ModelConfigError naming the key."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelConfigError(f"{key} is {_show(value)} ({type(value).__name__}); expected an integer")
    if value < low or (high is not None and value > high):
        bound = f"at least {low}" if high is None else f"between {low} and {high:,}"
        raise ModelConfigError(f"{key} is {value:,}; expected an integer {bound}")
    return value


def _positive(key: str, value: Any) -> float:
    """`value` of `key` as a float if it is a finite positive number; else ModelConfigError naming the key."""
    try:
        number = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan
    except OverflowError:
        number = math.inf
    if not (math.isfinite(number) and number > 0):
        raise ModelConfigError(f"{key} is {_show(value)}; expected a finite positive number")
    return number


@dataclass
class ModelConfig:
    """Shape and switches of a Llama-family decoder. Build it with `from_hf` / `from_json_file`."""

    model_type: str
    """Hugging Face family name: one of SUPPORTED_MODEL_TYPES."""
    vocab_size: int
    """Rows of the token embedding and of lm_head."""
    hidden_size: int
    """Width of the residual stream."""
    intermediate_size: int
    """Width of the SwiGLU MLP (gate_proj/up_proj output)."""
    num_hidden_layers: int
    """Number of decoder blocks."""
    num_attention_heads: int
    """Query heads."""
    num_key_value_heads: int
    """Key/value heads (grouped-query attention); divides num_attention_heads."""
    head_dim: int
    """Width of one head; q_proj has num_attention_heads * head_dim outputs."""
    rms_norm_eps: float = _DEFAULT_RMS_NORM_EPS
    """Epsilon inside every RMSNorm's rsqrt."""
    rope_theta: float = _DEFAULT_ROPE_THETA
    """RoPE base wavelength."""
    rope_scaling: dict[str, Any] | None = None
    """None for plain RoPE, else {"rope_type": "linear"|"llama3", ...that type's parameters}."""
    max_position_embeddings: int = 2048
    """Context length the checkpoint was trained for (informational; RoPE is computed on the fly)."""
    tie_word_embeddings: bool = False
    """lm_head.weight is the same Parameter as model.embed_tokens.weight."""
    attention_bias: bool = False
    """q_proj, k_proj and v_proj have a bias."""
    o_proj_bias: bool = False
    """o_proj has a bias (llama/qwen3: same as attention_bias; qwen2: never; mistral: never)."""
    mlp_bias: bool = False
    """gate_proj, up_proj and down_proj have a bias (llama's mlp_bias)."""
    qk_norm: bool = False
    """Per-head RMSNorm on queries and keys before RoPE (Qwen3's q_norm / k_norm)."""
    sliding_window: int | None = None
    """Attention window in tokens for layers whose layer_types entry is "sliding_attention"."""
    layer_types: list[str] = field(default_factory=list)
    """Per layer: "full_attention" or "sliding_attention". Filled with full attention if empty."""
    bos_token_id: int | None = None
    """Beginning-of-sequence token id."""
    eos_token_id: int | list[int] | None = None
    """End-of-sequence token id, or several."""
    pad_token_id: int | None = None
    """Padding token id (its embedding row gets no gradient, as in transformers)."""
    torch_dtype: str | None = None
    """The dtype the checkpoint was saved in ("bfloat16", "float32", ...), informational."""

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(_unsupported_type_message(self.model_type))
        for name, high in SIZE_LIMITS.items():
            _integer(name, getattr(self, name), 1, high)
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ModelConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention"
            )
        if self.head_dim % 2 != 0:
            raise ModelConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.sliding_window is not None:
            _integer("sliding_window", self.sliding_window)
        self.rope_scaling = _normalise_rope_scaling(self.rope_scaling, self.max_position_embeddings)
        if not self.layer_types:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ModelConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}; give one entry per layer"
            )
        for kind in self.layer_types:
            if kind not in LAYER_TYPES:
                raise UnsupportedModelError(
                    f"layer type {_show(kind)} is not supported; supported: {', '.join(LAYER_TYPES)}"
                )
        if "sliding_attention" in self.layer_types and self.sliding_window is None:
            raise ModelConfigError("layer_types has sliding_attention layers but sliding_window is None")

    # ---------------------------------------------------------------- construction from HF

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> ModelConfig:
        """Read a transformers-style config dict (the content of config.json)."""
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(_unsupported_type_message(model_type))
        missing = [k for k in _REQUIRED_HF_KEYS if d.get(k) is None]
        if missing:
            raise ModelConfigError(f"{model_type} config is missing required key(s): {', '.join(missing)}")
        for key in _REQUIRED_HF_KEYS + ("num_key_value_heads", "head_dim"):
            if d.get(key) is not None:  # the optional two: null means "the default", as in transformers
                _integer(key, d[key], 1, SIZE_LIMITS[key])
        for key, low in (("max_position_embeddings", 0), ("sliding_window", 1)):  # 0 positions: the default
            if d.get(key) is not None:
                _integer(key, d[key], low)
        for key in ("rope_scaling", "rope_parameters"):
            if d.get(key) is not None and not isinstance(d[key], dict):
                raise ModelConfigError(f"{key} is {_show(d[key])}; expected an object or null")
        if d.get("layer_types") is not None and not isinstance(d["layer_types"], list):
            raise ModelConfigError(f"layer_types is {_show(d['layer_types'])}; expected a list, one entry per layer")

        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedModelError(f"hidden_act {act!r} is not supported: the SwiGLU MLP here uses SiLU ('silu')")
        partial = d.get("partial_rotary_factor")
        rope_params = d.get("rope_scaling") or d.get("rope_parameters") or {}
        partial = rope_params.get("partial_rotary_factor", partial)
        if partial not in (None, 1, 1.0):
            raise UnsupportedModelError(
                f"partial_rotary_factor={partial} is not supported: RoPE is applied to the whole head"
            )

        heads = d["num_attention_heads"]
        hidden = d["hidden_size"]
        if model_type == "qwen3":
            head_dim = d.get("head_dim") or 128  # Qwen3Config's default
        elif d.get("head_dim"):
            head_dim = d["head_dim"]
        elif hidden % heads:
            raise ModelConfigError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads} "
                                   "(and there is no head_dim giving the width of a head)")  # fmt: skip
        else:
            head_dim = hidden // heads
        layers = d["num_hidden_layers"]
        max_pos = d.get("max_position_embeddings") or _DEFAULT_MAX_POSITIONS[model_type]

        rope_theta = _positive("rope_theta", rope_params.get("rope_theta", d.get("rope_theta", _DEFAULT_ROPE_THETA)))
        rope_type = rope_params.get("rope_type", rope_params.get("type", "default"))
        rope_scaling = None
        if rope_type != "default":
            rope_scaling = {k: v for k, v in rope_params.items() if k not in ("rope_theta", "type")}
            rope_scaling["rope_type"] = rope_type
            if "original_max_position_embeddings" in d and rope_type == "llama3":
                # transformers gives a top-level original_max_position_embeddings priority (Phi-3 style)
                rope_scaling["original_max_position_embeddings"] = d["original_max_position_embeddings"]

        attention_bias = bool(d.get("attention_bias", False))
        o_proj_bias = attention_bias
        mlp_bias = False
        qk_norm = False
        sliding_window = None
        layer_types = None
        if model_type == "llama":
            mlp_bias = bool(d.get("mlp_bias", False))
        elif model_type == "mistral":
            attention_bias = o_proj_bias = False
            sliding_window = d.get("sliding_window")
            if sliding_window is not None:
                layer_types = ["sliding_attention"] * layers
        else:  # qwen2, qwen3: the window is opt-in and applies from layer max_window_layers on
            if model_type == "qwen2":
                attention_bias, o_proj_bias = True, False
            else:
                qk_norm = True
            if d.get("use_sliding_window", False):
                sliding_window = d.get("sliding_window", 4096)
            layer_types = d.get("layer_types")
            if layer_types is None and sliding_window is not None:
                first = _integer("max_window_layers", d.get("max_window_layers", 28), 0)
                layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
            if layer_types is not None and sliding_window is None:
                layer_types = ["full_attention"] * layers  # transformers ignores them without the window

        return cls(
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=hidden,
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=_positive("rms_norm_eps", d.get("rms_norm_eps", _DEFAULT_RMS_NORM_EPS)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            o_proj_bias=o_proj_bias,
            mlp_bias=mlp_bias,
            qk_norm=qk_norm,
            sliding_window=sliding_window,
            layer_types=list(layer_types or []),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            torch_dtype=d.get("torch_dtype", d.get("dtype")),
        )

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        """Read a config.json; errors name the file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model config not found: {path} (expected a Hugging Face config.json)")
        try:
            d = json.loads(path.read_bytes().decode("utf-8"))
        except json.JSONDecodeError as e:
            raise ModelConfigError(f"{path}:{e.lineno}:{e.colno}: invalid JSON in model config: {e.msg}") from e
        except (ValueError, RecursionError) as e:  # bad UTF-8, nesting past the recursion limit, a 5,000-digit int
            raise ModelConfigError(f"{path}: not readable as JSON ({type(e).__name__}: {e})") from None
        if not isinstance(d, dict):
            raise ModelConfigError(f"{path}: model config must be a JSON object, got {type(d).__name__}")
        try:
            return cls.from_hf(d)
        except ValueError as e:
            raise type(e)(f"{path}: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (for logging and for saving beside a run)."""
        return dataclasses.asdict(self)


def _unsupported_type_message(model_type: object) -> str:
    return (
        f"model_type {model_type!r} is not supported; supported model types: "
        f"{', '.join(SUPPORTED_MODEL_TYPES)} (llama covers Llama 2/3/3.1/3.2, SmolLM2 and TinyLlama; "
        "qwen2 covers Qwen2.5)"
    )


def _normalise_rope_scaling(scaling: dict[str, Any] | None, max_positions: int) -> dict[str, Any] | None:
    """None/"default" -> None; "linear"/"llama3" -> a checked copy; anything else -> error naming it."""
    if not scaling:
        return None
    scaling = dict(scaling)
    rope_type = scaling.pop("type", None)
    rope_type = scaling.get("rope_type", rope_type)
    if rope_type in (None, "default"):
        return None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"RoPE scaling type {rope_type!r} is not supported; supported: "
            f"{', '.join(repr(t) for t in SUPPORTED_ROPE_TYPES)} (or no rope_scaling at all)"
        )
    scaling["rope_type"] = rope_type
    if rope_type == "llama3":
        # transformers falls back to max_position_embeddings when the original length is absent
        scaling.setdefault("original_max_position_embeddings", max_positions)
    missing = [k for k in _ROPE_REQUIRED_KEYS[rope_type] if scaling.get(k) is None]
    if missing:
        raise ModelConfigError(f"rope_scaling of type {rope_type!r} is missing key(s): {', '.join(missing)}")
    for key in _ROPE_REQUIRED_KEYS[rope_type]:
        _positive(f"rope_scaling.{key}", scaling[key])
    if rope_type == "llama3" and float(scaling["high_freq_factor"]) <= float(scaling["low_freq_factor"]):
        raise ModelConfigError(
            f"llama3 rope_scaling needs high_freq_factor > low_freq_factor, got "
            f"{scaling['high_freq_factor']} <= {scaling['low_freq_factor']}"
        )
    return scaling
