"""A small MLP with odd-sized layers and a frozen layer, and a deterministic training loop for it.

Layers (weight shapes): fc1 129x37 (4,773 elements: >= 4096, so 8-bit), frozen 129x129 (no state),
fc2 1000x129 (129,000: >= 1e5, paged on CUDA), fc3 3x1000 (3,000: < 4096, float32 state even for
8-bit optimizers). The loop does 2 micro-batches per step (gradient accumulation), clips the
gradient norm, steps the optimizer and a LambdaLR schedule; the data of step k depend only on k,
so a run resumed at step k sees exactly the batches the uninterrupted run saw.
"""

from __future__ import annotations

import torch
from torch import nn

MAX_GRAD_NORM = 0.5
MICRO_BATCHES = 2


def make_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(37, 129), nn.Tanh(),
        nn.Linear(129, 129), nn.Tanh(),
        nn.Linear(129, 1000), nn.Tanh(),
        nn.Linear(1000, 3),
    )  # fmt: skip
    for p in model[2].parameters():
        p.requires_grad_(False)
    return model


def lr_lambda(step: int) -> float:
    return min(1.0, (step + 1) / 5) * 0.97**step  # warm-up then decay: the lr changes every step


def make_scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)


def batch(step: int, micro: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 * step + micro)
    x = torch.randn(16, 37, generator=g)
    y = torch.randn(16, 3, generator=g)
    return x.to(device), y.to(device)


def train(model, optimizer, scheduler, first_step: int, n_steps: int, device="cpu") -> list[dict]:
    """Run steps first_step .. first_step + n_steps - 1; return per step {"loss", "grad_norm", "params"}."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    history = []
    for step in range(first_step, first_step + n_steps):
        total = 0.0
        for micro in range(MICRO_BATCHES):
            x, y = batch(step, micro, device)
            loss = nn.functional.mse_loss(model(x), y) / MICRO_BATCHES
            loss.backward()
            total += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({"loss": total, "grad_norm": float(grad_norm),
                        "params": [p.detach().clone().cpu() for p in model.parameters()]})  # fmt: skip
    return history
