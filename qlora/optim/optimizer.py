"""`QAdamW`: AdamW with float32 or 8-bit blockwise states, optionally paged to pinned host memory.

One class for the three bitsandbytes-style registry choices (`qlora.optim`): `paged_adamw_32bit`
(optim_bits=32, paged=True; the QLoRA paper's default), `paged_adamw_8bit` (8, True) and `adamw_8bit`
(8, False). The maths is `qlora.optim.adamw` (torch's AdamW), 8-bit storage `qlora.optim.state8bit`,
paging `qlora.optim.paging`; on the CPU "paged" changes nothing, so `paged_adamw_32bit` there is
exactly `torch.optim.AdamW`.

Per parameter with a gradient, `self.state[p]` holds

    step                       float32 0-d CPU tensor, as torch.optim.AdamW keeps it
    exp_avg, exp_avg_sq        float32, shape of p                      (32-bit, or numel < min_8bit_size)
    state1, absmax1, state2, absmax2   uint8 [n], float32 [ceil(n/256)]  (8-bit)

on p's device, or in pinned host memory for a large state of a paged CUDA optimizer when the page
policy says so: `"always"`, or `"auto"` (the default), which pages only when the states would not
fit beside the memory peak seen so far, as bitsandbytes' managed pages do in effect.
`qlora.optim.in_backward.StepInBackward` can run a 32-bit QAdamW's update per layer inside backward.

`state_dict()` is torch's format (a 32-bit one has exactly torch.optim.AdamW's keys);
`load_state_dict` is our own so that float32 moments and host pages stay where this optimizer keeps
them. Details of the page policy and the checkpoint format: docs/design-notes.md, qlora/optim/optimizer.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from qlora.optim.adamw import adamw_update_many_
from qlora.optim.paging import PAGE_MIN_NUMEL, StagedPager, pinned_copy
from qlora.optim.report import state_memory_report
from qlora.optim.state8bit import (
    KEYS_8BIT,
    KEYS_32BIT,
    MIN_8BIT_SIZE,
    dequantize_moments,
    requantize_moments_,
    uses_8bit,
    zero_state_8bit,
)

# Elements per multi-tensor update: its float32 temporaries (the denominator; copies of non-float32 parameters
# and gradients) take at most 3 x 4 x this many bytes (192 MiB), not 3 x 4 bytes per adapter parameter.
MULTI_TENSOR_CHUNK = 1 << 24


def _chunks(items: list, max_numel: int) -> list[list]:
    """Consecutive runs of (parameter, states) items whose parameters hold at most `max_numel` elements
    together (a larger single parameter is a run of its own)."""
    runs, current, size = [], [], 0
    for item in items:
        n = item[0].numel()
        if current and size + n > max_numel:
            runs.append(current)
            current, size = [], 0
        current.append(item)
        size += n
    return runs + ([current] if current else [])


def device_memory_limit(device: torch.device) -> int:
    """Bytes this process may hold on `device`: total x per-process fraction, or what is free plus what we hold."""
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = torch.cuda.get_per_process_memory_fraction(device) \
        if hasattr(torch.cuda, "get_per_process_memory_fraction") else 1.0  # fmt: skip
    free, _ = torch.cuda.mem_get_info(device)
    return int(min(total * fraction, free + torch.cuda.memory_reserved(device)))


class QAdamW(torch.optim.Optimizer):
    """AdamW (torch's weight-decay order) with float32 or 8-bit states, optionally paged.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        lr, betas, eps, weight_decay: AdamW's hyper-parameters (per group; LR schedulers may edit "lr").
        optim_bits: 32 (float32 moments) or 8 (blockwise 8-bit moments for numel >= min_8bit_size).
        paged: keep the states of large CUDA parameters in pinned host memory (no effect on the CPU).
        min_8bit_size: smallest parameter that gets 8-bit moments (bitsandbytes: 4096).
        page_min_numel: smallest parameter whose state is paged (bitsandbytes: 1e5).
        page_policy: "auto" (page under memory pressure only) or "always" (see the module docstring).
    """

    PAGE_POLICIES = ("auto", "always")

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        optim_bits: int = 32,
        paged: bool = True,
        min_8bit_size: int = MIN_8BIT_SIZE,
        page_min_numel: int = PAGE_MIN_NUMEL,
        page_policy: str = "auto",
    ):
        if page_policy not in self.PAGE_POLICIES:
            raise ValueError(f"page_policy must be one of {self.PAGE_POLICIES}, got {page_policy!r}")
        if optim_bits not in (8, 32):
            raise ValueError(f"optim_bits must be 8 or 32, got {optim_bits!r}")
        if not lr >= 0.0 or not eps >= 0.0 or not weight_decay >= 0.0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got lr={lr}, eps={eps}, wd={weight_decay}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        self.optim_bits = optim_bits
        self.paged = paged
        self.min_8bit_size = int(min_8bit_size)
        self.page_min_numel = int(page_min_numel)
        self.page_policy = page_policy
        self._resident: dict[torch.device, bool] = {}  # "auto": the decision per device, once made
        self._pagers: dict[torch.device, StagedPager] = {}
        self._in_backward = None  # a StepInBackward that updates these parameters during backward, if any
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    # -- placement -------------------------------------------------------------------------------

    def _is_paged(self, p: torch.Tensor) -> bool:
        return (self.paged and p.is_cuda and p.numel() >= self.page_min_numel
                and not self._resident.get(p.device, False))  # fmt: skip

    def _state_nbytes(self, p: torch.Tensor) -> int:
        n = p.numel()
        return 2 * n + 8 * -(-n // 256) if self._is_8bit(p) else 8 * n

    def _apply_page_policy(self, params: list[torch.Tensor]) -> None:
        """`auto`: decide (first step on a device) or revise (pressure) where large CUDA states live."""
        if not self.paged or self.page_policy != "auto":
            return
        by_device: dict[torch.device, int] = {}
        for p in params:
            if p.is_cuda and p.numel() >= self.page_min_numel:
                by_device[p.device] = by_device.get(p.device, 0) + self._state_nbytes(p)
        for device, nbytes in by_device.items():
            decided = self._resident.get(device)
            if decided is False:
                continue  # paged for good: nothing to ask the device
            limit = device_memory_limit(device)
            margin = max(2**30, limit // 10)
            peak = torch.cuda.max_memory_reserved(device)
            if decided is None:
                self._resident[device] = peak + nbytes + margin <= limit
                if self._resident[device]:
                    self._relocate(device, resident=True)
            elif decided and peak + margin > limit:
                self._resident[device] = False
                self._relocate(device, resident=False)

    def _relocate(self, device: torch.device, resident: bool) -> None:
        """Move the existing large states of `device` onto it (resident) or into pinned host pages."""
        self._synchronize()
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state or p.device != device or p.numel() < self.page_min_numel:
                    continue
                for key, value in state.items():
                    if key != "step":
                        state[key] = value.to(device, copy=True) if resident else pinned_copy(value)

    def _is_8bit(self, p: torch.Tensor) -> bool:
        return self.optim_bits == 8 and uses_8bit(p.numel(), self.min_8bit_size)

    def _place(self, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Put a state tensor where this optimizer keeps p's state (a new tensor, never an alias of `t`)."""
        if self._is_paged(p):
            return pinned_copy(t)
        return t.to(p.device, copy=True)

    def _pager(self, device: torch.device) -> StagedPager:
        if device not in self._pagers:
            self._pagers[device] = StagedPager(device)
        return self._pagers[device]

    def _synchronize(self) -> None:
        for pager in self._pagers.values():
            pager.synchronize()
        if self._in_backward is not None:
            self._in_backward.synchronize()

    def _init_state(self, p: torch.Tensor) -> dict:
        if self._is_8bit(p):
            tensors = zero_state_8bit(p.numel(), "cpu" if self._is_paged(p) else p.device)
        else:
            zeros = torch.zeros(p.shape, dtype=torch.float32, device="cpu" if self._is_paged(p) else p.device)
            tensors = {"exp_avg": zeros, "exp_avg_sq": zeros.clone()}
        if self._is_paged(p):
            tensors = {k: pinned_copy(v) for k, v in tensors.items()}
        return {"step": torch.tensor(0.0, dtype=torch.float32), **tensors}

    # -- update ----------------------------------------------------------------------------------

    @staticmethod
    def _update(p: torch.Tensor, group: dict, tensors: dict[str, torch.Tensor], step: int) -> None:
        beta1, beta2 = group["betas"]
        hyper = {"lr": float(group["lr"]), "beta1": beta1, "beta2": beta2, "eps": group["eps"],
                 "weight_decay": group["weight_decay"]}  # fmt: skip
        if "state1" in tensors:
            m, v = dequantize_moments(tensors)  # float32 [n] each, fresh tensors
            adamw_update_many_([p], [p.grad], [m.view(p.shape)], [v.view(p.shape)], step, **hyper)
            requantize_moments_(tensors, m, v)
        else:
            adamw_update_many_([p], [p.grad], [tensors["exp_avg"]], [tensors["exp_avg_sq"]], step, **hyper)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._apply_page_policy([p for g in self.param_groups for p in g["params"] if p.grad is not None])
        paged: dict[torch.device, list] = {}
        together: dict[tuple, list] = {}  # (group index, device, step) -> parameters with resident 32-bit states
        for index, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("QAdamW does not support sparse gradients; use torch.optim.SparseAdam")
                state = self.state[p]
                if not state:
                    state.update(self._init_state(p))
                state["step"] += 1
                step = int(state["step"].item())
                tensors = {k: v for k, v in state.items() if k != "step"}
                if self._is_paged(p):
                    paged.setdefault(p.device, []).append(((p, group, step), tensors))
                elif "exp_avg" in tensors:
                    together.setdefault((index, p.device, step), []).append((p, tensors))
                else:
                    self._update(p, group, tensors, step)
        for (index, _, step), items in together.items():
            group = self.param_groups[index]
            beta1, beta2 = group["betas"]
            for chunk in _chunks(items, MULTI_TENSOR_CHUNK):
                adamw_update_many_([p for p, _ in chunk], [p.grad for p, _ in chunk], [t["exp_avg"] for _, t in chunk],
                                   [t["exp_avg_sq"] for _, t in chunk], step, lr=float(group["lr"]), beta1=beta1,
                                   beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])  # fmt: skip
        for device, items in paged.items():
            self._pager(device).run(items, lambda key, views: self._update(key[0], key[1], views, key[2]))
        return loss

    # -- checkpoints and reporting ---------------------------------------------------------------

    def state_dict(self) -> dict:
        self._synchronize()  # host pages must hold the last step's write-back
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        if self._in_backward is not None:
            raise RuntimeError("load the optimizer's state before building its StepInBackward (which holds the "
                               "state tensors, and a captured CUDA graph their addresses); or call its remove() first")
        self._synchronize()
        saved_groups = state_dict["param_groups"]
        # torch checks the group structure and restores the hyper-parameters; the state we place ourselves
        super().load_state_dict({"state": {}, "param_groups": saved_groups})
        by_id = {}
        for saved, group in zip(saved_groups, self.param_groups, strict=True):
            by_id.update(zip(saved["params"], group["params"], strict=True))
        for pid, saved in state_dict["state"].items():
            if pid not in by_id:
                raise KeyError(f"optimizer state for parameter id {pid} has no matching parameter in param_groups")
            self.state[by_id[pid]] = self._restore(pid, by_id[pid], saved)

    def _restore(self, pid: int, p: torch.Tensor, saved: dict) -> dict:
        keys = KEYS_8BIT if self._is_8bit(p) else KEYS_32BIT
        if set(saved) != {"step", *keys}:
            raise ValueError(
                f"optimizer state for parameter {pid} (shape {tuple(p.shape)}) has keys {sorted(saved)}, but this "
                f"optimizer (optim_bits={self.optim_bits}, min_8bit_size={self.min_8bit_size}) expects "
                f"{sorted(['step', *keys])}: resume with the optimizer and settings the checkpoint was written with"
            )
        n_blocks = -(-p.numel() // 256)
        expected = {"exp_avg": (torch.float32, p.shape), "exp_avg_sq": (torch.float32, p.shape),
                    "state1": (torch.uint8, (p.numel(),)), "state2": (torch.uint8, (p.numel(),)),
                    "absmax1": (torch.float32, (n_blocks,)), "absmax2": (torch.float32, (n_blocks,))}  # fmt: skip
        restored = {"step": torch.as_tensor(saved["step"], dtype=torch.float32).detach().clone().cpu()}
        for key in keys:
            t, (dtype, shape) = saved[key], expected[key]
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(
                    f"optimizer state {key!r} of parameter {pid}: expected {dtype} {tuple(shape)}, "
                    f"got {t.dtype} {tuple(t.shape)} (checkpoint from a different model or optimizer?)"
                )
            restored[key] = self._place(p, t)
        return restored

    def staging_bytes(self) -> int:
        """GPU bytes held by the paging slots (0 when nothing is paged)."""
        slots = self._in_backward.staging_bytes if self._in_backward is not None else 0
        return slots + sum(pager.staging_bytes for pager in self._pagers.values())

    def memory_report(self) -> dict[str, int]:
        """Bytes of optimizer state by location: gpu_bytes, pinned_host_bytes, cpu_bytes, gpu_staging_bytes."""
        self._synchronize()
        return state_memory_report(self)
