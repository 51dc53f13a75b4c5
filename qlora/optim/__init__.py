"""Optimizers selectable by name, as `--optim` / `optim.name` spells them (transformers' names; the
list is `qlora.config.OPTIMIZER_NAMES`, and importing this package fails if the two disagree).

    adamw               torch.optim.AdamW (as `TorchAdamW`, which adds `memory_report()`)
    paged_adamw_32bit   QAdamW(optim_bits=32, paged=True)   the QLoRA paper's default; the default on CUDA
    paged_adamw_8bit    QAdamW(optim_bits=8,  paged=True)
    adamw_8bit          QAdamW(optim_bits=8,  paged=False)

All follow torch's AdamW maths and weight-decay order (decay before the Adam step), save and load
their state through torch's `state_dict` conventions, and report where their state lives with
`memory_report()`. See `optimizer.py` (the class), `adamw.py` (the update), `state8bit.py`
(8-bit moments), `paging.py` (pinned host pages), `report.py` (memory report), `in_backward.py`
(a 32-bit QAdamW's update run per layer during backward, its states streamed through three slots).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from qlora.config import OPTIMIZER_NAMES
from qlora.optim.optimizer import QAdamW
from qlora.optim.report import TorchAdamW, state_memory_report

# The names are the config's registry (`qlora.config.names.OptimName`); this says how each is built.
_QADAMW_SETTINGS = {
    "paged_adamw_32bit": {"optim_bits": 32, "paged": True},
    "paged_adamw_8bit": {"optim_bits": 8, "paged": True},
    "adamw_8bit": {"optim_bits": 8, "paged": False},
}
if set(OPTIMIZER_NAMES) != {"adamw", *_QADAMW_SETTINGS}:  # a name added to one table but not the other
    raise ImportError(f"qlora.optim builds {sorted({'adamw', *_QADAMW_SETTINGS})} but the config registry "
                      f"(qlora.config.names.OptimName) names {sorted(OPTIMIZER_NAMES)}: make them agree")  # fmt: skip


def build_optimizer(
    name: str,
    params: Iterable[torch.nn.Parameter] | Iterable[dict],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    page_policy: str = "auto",
    **options,
) -> torch.optim.Optimizer:
    """The optimizer called `name` over `params`.

    `page_policy` ("auto" or "always", see `QAdamW`) says where the paged optimizers keep their state;
    the others keep it on the parameters' device and only check the value. `options` go to `QAdamW`
    (`min_8bit_size`, `page_min_numel`); `adamw` accepts none.
    """
    if page_policy not in QAdamW.PAGE_POLICIES:
        raise ValueError(f"page_policy must be one of {QAdamW.PAGE_POLICIES}, got {page_policy!r}")
    if name == "adamw":
        if options:
            raise TypeError(f"optimizer 'adamw' takes no options, got {sorted(options)}")
        return TorchAdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name not in _QADAMW_SETTINGS:
        raise ValueError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZER_NAMES)}")
    return QAdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, page_policy=page_policy,
                  **_QADAMW_SETTINGS[name], **options)  # fmt: skip


__all__ = ["OPTIMIZER_NAMES", "QAdamW", "TorchAdamW", "build_optimizer", "state_memory_report"]
