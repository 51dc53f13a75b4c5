"""`choose_mode`: DDP or FSDP for `--parallel auto`, from an estimate of what one GPU must hold.

DDP is faster (no per-layer gathers) but every GPU holds everything; FSDP divides the base, the
adapters, their gradients and the optimizer states by the number of GPUs. `auto` takes DDP when the
estimate fits in `FIT_FRACTION` of the GPU's memory (room for the allocator's fragmentation and the
kernels' workspaces), FSDP otherwise, and says which and why.

The estimate (`training_bytes`), per GPU without sharding:
    base        4-bit linears at 4.127 bits per parameter (NF4, blocksize 64, double-quantized scales)
                + embeddings, lm_head and norms in the 16-bit compute dtype
    adapters    r x (in + out) per adapted linear, x (4 weight + 4 gradient + 8 AdamW) bytes (float32)
    activations checkpointed layer inputs (layers x tokens x hidden x 2 bytes) + one layer's working set
                (tokens x (12 hidden + 4 intermediate) x 2 bytes) + a 2048-row chunk of logits in float32
"""

from __future__ import annotations

from qlora.distributed.runtime import Runtime
from qlora.model.config import ModelConfig

FIT_FRACTION = 0.8
BITS_4BIT = 4.127  # NF4 + double quantization at blocksize 64 (QuantizedTensor.bits_per_param)


def training_bytes(c: ModelConfig, r: int, targets: tuple[str, ...], tokens_per_micro_batch: int) -> int:
    """Bytes one GPU holds to train the model `c` without sharding (see the module docstring)."""
    h, i, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
              "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # fmt: skip
    linear = layers * sum(a * b for a, b in shapes.values())
    embeddings = c.vocab_size * h * (1 if c.tie_word_embeddings else 2)
    base = linear * BITS_4BIT / 8 + (embeddings + (2 * layers + 1) * h) * 2
    adapter = layers * sum(r * (a + b) for name, (a, b) in shapes.items() if name in targets) * 16
    t = tokens_per_micro_batch
    activations = layers * t * h * 2 + t * (12 * h + 4 * i) * 2 + 2048 * c.vocab_size * 4
    return int(base + adapter + activations)


def choose_mode(requested: str, runtime: Runtime, need_bytes: int, device_bytes: int | None) -> tuple[str, str]:
    """(mode, reason) for `requested` ("auto", "ddp" or "fsdp") on this job; "none" for one process.
    `device_bytes`: one GPU's memory (None on CPUs, where auto takes DDP)."""
    if not runtime.distributed or runtime.world_size == 1 and requested == "auto":
        return "none", "one process: no data parallelism"
    if requested != "auto":
        return requested, f"--parallel {requested}"
    gib = need_bytes / 2**30
    if device_bytes is None:
        return "ddp", f"auto: ddp on {runtime.device.type} (no device memory to divide); the estimate is {gib:.1f} GiB"
    room = FIT_FRACTION * device_bytes / 2**30
    if need_bytes <= FIT_FRACTION * device_bytes:
        return "ddp", f"auto: ddp, the run needs about {gib:.1f} GiB per GPU, within {room:.1f} GiB (80% of the GPU)"
    return "fsdp", (f"auto: fsdp, the run needs about {gib:.1f} GiB unsharded, over {room:.1f} GiB (80% of the "
                    f"GPU); sharded over {runtime.world_size} GPUs")  # fmt: skip
