"""Llama-shaped models with random weights for GPU benchmarks, built and quantized one layer at a time.

The benchmarks compare our engine with the reference stack (`../shared/bench/reference_stack.py`:
transformers + peft + bitsandbytes) on the same shapes, so this module follows that script's
conventions (its docstring is the source): weights N(0, 0.02) in bf16, RMSNorm weights 1, untied
lm_head, lm_head and embeddings kept 16-bit, each decoder layer's linears quantized (NF4, block 64,
double quantization) before the next layer is built, so a 65B shape never exists densely; LoRA r=64,
alpha=16, dropout 0.05 on q, k, v, o, gate, up, down; labels = inputs (every token is a target).

The FLOP count for MFU is the reference script's definition (recomputation under gradient
checkpointing counted), re-derived here from its documented formula so both sides divide the same
number by their own step time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from qlora.fused import use_fused_elementwise
from qlora.lora import LoRALinear, LoraSpec, QuantSpec, mark_only_lora_trainable, replace_linears
from qlora.model.config import ModelConfig
from qlora.model.llama import LlamaForCausalLM
from qlora.ops import KernelPolicy, apply_policy
from qlora.optim.in_backward import StepInBackward
from qlora.train.cuda_graph import CudaGraphStep
from qlora.train.loss import loss_sum

GiB = 2**30
BENCH_LORA = LoraSpec(r=64, alpha=16.0, dropout=0.05)  # the reference script's adapter


@dataclass(frozen=True)
class Shape:
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int


# The reference script's shapes (Llama-2-7B/13B, LLaMA-33B/65B, Llama-2-70B; Llama-3.1-8B added here).
SHAPES = {
    "tiny": Shape(256, 704, 2, 4, 4, 32000),
    "7b": Shape(4096, 11008, 32, 32, 32, 32000),
    "8b": Shape(4096, 14336, 32, 32, 8, 128256),
    "13b": Shape(5120, 13824, 40, 40, 40, 32000),
    "33b": Shape(6656, 17920, 60, 52, 52, 32000),
    "65b": Shape(8192, 22016, 80, 64, 64, 32000),
    "70b": Shape(8192, 28672, 80, 64, 8, 32000),
}


def linear_shapes(s: Shape) -> list[tuple[int, int]]:
    """(in, out) of q, k, v, o, gate, up, down."""
    kv = s.kv_heads * (s.hidden // s.heads)
    return [(s.hidden, s.hidden), (s.hidden, kv), (s.hidden, kv), (s.hidden, s.hidden), (s.hidden, s.inter),
            (s.hidden, s.inter), (s.inter, s.hidden)]  # fmt: skip


def flops_per_token(s: Shape, seq: int, r: int) -> tuple[float, float]:
    """(FLOPs per token with recomputation counted, without it): the reference script's definition.

    base linears 2N fwd + 2N recompute + 2N input-grad; lm_head 2N_head fwd + 2N_head input-grad;
    LoRA 2N_lora x (fwd, recompute, input-grad, weight-grad); attention 4*L*S*H fwd, once more for the
    recompute, twice for backward.
    """
    n_frozen = s.layers * sum(i * o for i, o in linear_shapes(s))
    n_head = s.vocab * s.hidden
    n_lora = s.layers * sum(r * (i + o) for i, o in linear_shapes(s))
    attn_fwd = 4 * s.layers * seq * s.hidden
    total = 6 * n_frozen + 4 * n_head + 8 * n_lora + 4 * attn_fwd
    return total, total - 2 * n_frozen - 2 * n_lora - attn_fwd


def model_config(s: Shape, max_positions: int = 4096) -> ModelConfig:
    return ModelConfig(
        model_type="llama", vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.inter,
        num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
        head_dim=s.hidden // s.heads, rms_norm_eps=1e-5, max_position_embeddings=max_positions,
    )  # fmt: skip


def build_model(
    s: Shape,
    quant_type: str | None,
    device: torch.device,
    seed: int = 0,
    lora: LoraSpec = BENCH_LORA,
    fused: bool = True,
    policy: KernelPolicy | None = None,
) -> LlamaForCausalLM:
    """Random-weight model on `device`: built on meta, then filled (and quantized) one module at a time.
    `policy`: the kernels it runs (default `KernelPolicy.from_env()`), kept as `model.policy`."""
    dtype = torch.bfloat16
    policy = policy if policy is not None else KernelPolicy.from_env()
    model = LlamaForCausalLM.from_config(model_config(s), device="meta", dtype=dtype)
    replace_linears(model, QuantSpec(quant_type, 64, True), lora, device="meta", dtype=dtype, policy=policy)
    if fused:
        use_fused_elementwise(model, policy)  # as load_model does
    apply_policy(model, policy)
    gen = torch.Generator(device=device).manual_seed(seed)
    for module in reference_draw_order(model):
        if isinstance(module, LoRALinear):
            weight = torch.empty(module.out_features, module.in_features, device=device, dtype=dtype)
            module.set_base_weight(weight.normal_(0.0, 0.02, generator=gen))  # quantized here; dense freed
            del weight
            if module.r:
                module.lora_A.to_empty(device=device)
                module.lora_B.to_empty(device=device)
                module.reset_adapter()
            continue
        for name, p in list(module._parameters.items()):
            if p is None or not p.is_meta:
                continue
            fresh = torch.empty(p.shape, device=device, dtype=dtype)
            fresh = fresh.fill_(1.0) if p.dim() == 1 else fresh.normal_(0.0, 0.02, generator=gen)
            module._parameters[name] = nn.Parameter(fresh, requires_grad=False)
    model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"left on meta: {left[:5]}")
    model.gradient_checkpointing = True
    model.train()
    mark_only_lora_trainable(model)
    return model


def reference_draw_order(model: LlamaForCausalLM) -> Iterator[nn.Module]:
    """Every module, those holding random weights in the order the reference script draws them from
    its one generator (embeddings, lm_head, then each layer's q, k, v, o, gate, up, down; norms are
    filled with 1 and draw nothing), so the same seed gives both tools the same base weights."""
    drawn = [model.model.embed_tokens, model.lm_head]
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        drawn += [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]
    yield from drawn
    seen = {id(m) for m in drawn}
    yield from (m for m in model.modules() if id(m) not in seen)


def random_batch(s: Shape, batch: int, seq: int, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.randint(0, s.vocab, (batch, seq), device=device, generator=gen)
    return {"input_ids": ids, "labels": ids}


def reference_batches(s: Shape, batch: int, seq: int, device: torch.device, seed: int, n: int = 4) -> list[dict]:
    """The reference script's `n` token batches for one batch x seq (same generator seed, same draws),
    labels = inputs."""
    gen = torch.Generator(device=device).manual_seed(seed + batch * 100003 + seq)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, s.vocab, (batch, seq), device=device, generator=gen)
        batches.append({"input_ids": ids, "labels": ids})
    return batches


def train_step(
    model: LlamaForCausalLM,
    batch: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    graph_step: CudaGraphStep | None = None,
    stepper: StepInBackward | None = None,
) -> float:
    """One optimizer step on one micro-batch (mean loss over its targets); returns the loss.

    With `stepper` (`qlora.optim.in_backward`) the update runs inside backward (and inside the graph).

    With `graph_step` the forward and backward replay a CUDA graph (`qlora.train.cuda_graph`).
    The loss is read back only after the optimizer step is queued, so the host never waits for the
    GPU in the middle of a step."""
    if graph_step is not None:
        n = int((batch["labels"][:, 1:] != -100).sum())
        loss = graph_step.forward_backward(batch, 1.0 / n) / n
    else:
        total, n = loss_sum(model, batch)
        loss = total / n
        if stepper is not None:
            stepper.prepare()
            stepper.backward(loss)
        else:
            loss.backward()
    optimizer.step()  # with a stepper: nothing left to do (no gradient is held)
    if graph_step is not None:
        graph_step.zero_grad()  # in place: the graph owns the .grad buffers
    else:
        optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def timed_steps(
    model: LlamaForCausalLM,
    batches: Sequence[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    n: int,
    graph_step: CudaGraphStep | None = None,
    stepper: StepInBackward | None = None,
) -> Iterator[tuple[float, float]]:
    """(loss, seconds) of `n` optimizer steps cycling through `batches`, CUDA-synchronised around each whole step
    (forward, backward, optimizer step, zero_grad), as the reference script times its steps."""
    for i in range(n):
        torch.cuda.synchronize()
        started = time.perf_counter()
        loss = train_step(model, batches[i % len(batches)], optimizer, graph_step, stepper)
        torch.cuda.synchronize()
        yield loss, time.perf_counter() - started
