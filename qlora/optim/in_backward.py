"""`StepInBackward`: each layer's AdamW update runs during backward, the moment its gradients exist.

Why. An optimizer step after backward needs every adapter gradient at once, and a paged optimizer
then moves every state across the host link twice with nothing left to overlap it with (at 65B a
large share of the step: docs/LOG.md, 2026-11-27 (fifth session)). Backward finishes the layers one
by one, last first: updating a layer as soon as its gradients are in frees them at once, and its
paged states travel while the GPU works on the layers below, off the critical path.

The pipeline, over groups 0..G-1 in the order backward completes them and three GPU slots:

    h2d stream:  H2D(0) H2D(1) ........ wait written(k-1), H2D(k+2) ..........
    compute:     backward of group k | wait loaded(k), update(k), free its gradients | backward of k+1
    d2h stream:                                          wait updated(k), D2H(k), record written(k)

Slot k % 3 holds group k; H2D(k+2) refills the slot of the last group written back. Everything is in
stream order with events, so it runs eagerly and inside a captured CUDA graph; the update is
`qlora.ops.adamw_step_`, whose lr and bias corrections come from a device row per parameter that
`prepare()` rewrites before each step, so a graph captured once follows the schedule.

Semantics: the optimizer's own AdamW on its own state tensors (same keys, step counts and
`state_dict`), only earlier. Refused: global-norm clipping, accumulation over micro-batches, fp16
loss scaling, 8-bit states. Every owned parameter must get a gradient in every backward, and groups
must complete in the order given (both checked, with an error saying which).

Use:
    stepper = StepInBackward(optimizer, backward_order_groups(model))
    stepper.prepare()          # host: count the step, write the coefficient rows
    stepper.backward(loss)     # prefetch, loss.backward() (hooks update), join the copy streams
    optimizer.zero_grad()      # nothing to zero: the hooks already dropped the gradients
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from qlora import ops
from qlora.ops import KernelPolicy
from qlora.optim.adamw import COEFFICIENT_NAMES, adamw_coefficients
from qlora.optim.optimizer import QAdamW
from qlora.optim.paging import slot_views, staged_bytes

SLOTS = 3  # groups in flight: one being updated, one arriving, one being written back
_LAYER = re.compile(r"(?:^|\.)layers\.\d+\.")


def backward_order_groups(model: torch.nn.Module) -> list[list[torch.nn.Parameter]]:
    """The trainable parameters grouped per decoder layer (`...layers.N.`) or, outside the layers, per
    module, in the order backward completes them: the reverse of the modules' (forward) order."""
    groups: list[list[torch.nn.Parameter]] = []
    last_key = None
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        match = _LAYER.search(name)
        key = name[: match.end()] if match else name.rpartition(".")[0]
        if key != last_key:
            groups.append([])
            last_key = key
        groups[-1].append(p)
    return groups[::-1]


class StepInBackward:
    """Runs a 32-bit `QAdamW`'s update per group of parameters from backward hooks (module docstring).

    Args:
        optimizer: the `QAdamW` (optim_bits=32) whose parameters, hyper-parameters and states are used.
            Its large CUDA states are paged (as with page policy "always"; unless an earlier `step()` under
            "auto" already made them resident), the others stay where they are.
        groups: a partition of the optimizer's parameters, in the order backward completes them
            (`backward_order_groups(model)`).
        policy: the `KernelPolicy` the update's op runs with (default: `KernelPolicy.from_env()`).
    """

    def __init__(self, optimizer: QAdamW, groups: Sequence[Sequence[torch.nn.Parameter]],
                 policy: KernelPolicy | None = None):  # fmt: skip
        if not isinstance(optimizer, QAdamW) or optimizer.optim_bits != 32:
            bits = f" ({optimizer.optim_bits}-bit)" if isinstance(optimizer, QAdamW) else ""
            raise ValueError(f"StepInBackward needs a 32-bit QAdamW (paged_adamw_32bit); got "
                             f"{type(optimizer).__name__}{bits}")  # fmt: skip
        self.optimizer = optimizer
        self.policy = policy if policy is not None else KernelPolicy.from_env()
        self.groups = [list(g) for g in groups if len(g)]
        self.params = [p for g in self.groups for p in g]
        owner = {id(p): i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}
        ids = [id(p) for p in self.params]
        if len(set(ids)) != len(ids):
            raise ValueError("StepInBackward: a parameter appears in more than one group")
        if set(ids) != set(owner):
            raise ValueError(f"StepInBackward: the groups hold {len(set(ids) - set(owner))} parameters the "
                             f"optimizer does not and miss {len(set(owner) - set(ids))} it has; pass a "
                             "partition of exactly the optimizer's parameters")  # fmt: skip
        devices = {p.device for p in self.params}
        if len(devices) != 1:
            raise ValueError(f"StepInBackward: parameters on several devices {sorted(map(str, devices))}")
        self.device = devices.pop()
        self._cuda = self.device.type == "cuda"
        self._param_group = [owner[id(p)] for p in self.params]
        self._row = {id(p): i for i, p in enumerate(self.params)}
        self._group_of = {id(p): k for k, g in enumerate(self.groups) for p in g}
        for p in self.params:
            if not p.is_contiguous():
                raise ValueError(f"StepInBackward: parameter of shape {tuple(p.shape)} is not contiguous")
            state = optimizer.state[p]
            if not state:
                state.update(optimizer._init_state(p))
        # Step counts: the optimizer's 0-d tensors (its state dict's), counted here in python too, all at once
        self._step_tensors = [optimizer.state[p]["step"] for p in self.params]
        self._steps = [int(t.item()) for t in self._step_tensors]
        self._group_index = torch.tensor(self._param_group, dtype=torch.long)
        n_rows = len(self.params)
        self._coef_host = torch.zeros(n_rows, len(COEFFICIENT_NAMES), dtype=torch.float32, pin_memory=self._cuda)
        self._coef = torch.zeros(n_rows, len(COEFFICIENT_NAMES), dtype=torch.float32, device=self.device)
        self._coef_copied: torch.cuda.Event | None = None
        # Paged states: per group, (parameter, its host pages); the slot views are fixed once (graphs keep addresses).
        self._pages = [[(p, self._moments(p)) for p in g if optimizer._is_paged(p)] for g in self.groups]
        nbytes = max((sum(staged_bytes(pages) for _, pages in items) for items in self._pages), default=0)
        self.slots = [torch.empty(nbytes, dtype=torch.uint8, device=self.device) for _ in range(SLOTS if nbytes else 0)]
        self._views = [self._slot_views(self.slots[k % SLOTS], items) if items else {}
                       for k, items in enumerate(self._pages)]  # fmt: skip
        self._h2d = torch.cuda.Stream(self.device) if self.slots else None
        self._d2h = torch.cuda.Stream(self.device) if self.slots else None
        self._loaded: list = []
        self._slot_written: list = [None] * SLOTS  # per slot: the event of its last write-back this backward
        self._remaining: list[int] = []
        self._next = 0
        self._active = False
        self._handles = [p.register_post_accumulate_grad_hook(self._on_gradient) for p in self.params]
        optimizer._in_backward = self

    # -- placement -----------------------------------------------------------------------------------
    def _moments(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.optimizer.state[p]
        if "exp_avg" not in state:
            raise ValueError("StepInBackward: the optimizer's state is not 32-bit AdamW moments")
        return {"exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"]}

    @staticmethod
    def _slot_views(slot: torch.Tensor, items) -> dict[int, dict[str, torch.Tensor]]:
        """Each parameter's pages as views of `slot`, one after another."""
        views, offset = {}, 0
        for p, pages in items:
            views[id(p)] = slot_views(slot, pages, offset)
            offset += staged_bytes(pages)
        return views

    @property
    def staging_bytes(self) -> int:
        return sum(s.numel() for s in self.slots)

    # -- the step ------------------------------------------------------------------------------------
    def prepare(self, dry: bool = False) -> None:
        """Host side, before each backward (or graph replay): count the step and write each parameter's
        coefficient row. `dry=True` counts nothing and makes the updates write nothing (warm-up runs)."""
        if not dry:
            torch._foreach_add_(self._step_tensors, 1.0)
            self._steps = [n + 1 for n in self._steps]

        def row(index: int, step: int) -> list[float]:
            group = self.optimizer.param_groups[index]
            beta1, beta2 = group["betas"]
            return adamw_coefficients(max(step, 1), float(group["lr"]), beta1, beta2, group["eps"],
                                      group["weight_decay"], apply=not dry)  # fmt: skip

        if len(set(self._steps)) == 1:  # the usual case: one row per parameter group, gathered
            table = torch.tensor([row(i, self._steps[0]) for i in range(len(self.optimizer.param_groups))],
                                 dtype=torch.float32)  # fmt: skip
            rows = table[self._group_index]
        else:
            rows = torch.tensor([row(i, n) for i, n in zip(self._param_group, self._steps, strict=True)],
                                dtype=torch.float32)  # fmt: skip
        if self._coef_copied is not None:
            self._coef_copied.synchronize()  # the host rows may still be in flight to the device
        self._coef_host.copy_(rows)
        self._coef.copy_(self._coef_host, non_blocking=self._cuda)
        if self._cuda:
            self._coef_copied = torch.cuda.Event()
            self._coef_copied.record(torch.cuda.current_stream(self.device))

    def backward(self, loss: torch.Tensor) -> None:
        """`loss.backward()` with every group's update run as soon as its gradients are in."""
        self._begin()
        try:
            loss.backward()
        finally:
            self._end()
        if self._next != len(self.groups):
            k = self._next
            raise RuntimeError(
                f"StepInBackward: group {k} of {len(self.groups)} ({len(self.groups[k])} parameters, first of shape "
                f"{tuple(self.groups[k][0].shape)}) got {len(self.groups[k]) - self._remaining[k]} of its gradients; "
                "every parameter must receive a gradient in every backward (freeze the unused ones)"
            )

    def _begin(self) -> None:
        if self._active:
            raise RuntimeError("StepInBackward.backward is already running")
        self._remaining = [len(g) for g in self.groups]
        self._next = 0
        self._active = True
        if self.slots:
            compute = torch.cuda.current_stream(self.device)
            self._h2d.wait_stream(compute)
            self._d2h.wait_stream(compute)
            self._loaded = [None] * len(self.groups)
            self._slot_written = [None] * SLOTS
            for k in range(min(SLOTS - 1, len(self.groups))):
                self._prefetch(k)

    def _end(self) -> None:
        self._active = False
        if self.slots:  # join the copy streams: a graph capture requires it, and the next step's reads rely on it
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(self._h2d)
            compute.wait_stream(self._d2h)

    def _prefetch(self, k: int) -> None:
        if not self._pages[k]:
            return
        with torch.cuda.stream(self._h2d):
            written = self._slot_written[k % SLOTS]  # the slot's last user (any number of groups back) is written back
            if written is not None:
                self._h2d.wait_event(written)
            for p, pages in self._pages[k]:
                for name, page in pages.items():
                    self._views[k][id(p)][name].copy_(page, non_blocking=True)
            self._loaded[k] = torch.cuda.Event()
            self._loaded[k].record(self._h2d)

    def _on_gradient(self, p: torch.Tensor) -> None:
        if not self._active:
            raise RuntimeError("these parameters are updated by StepInBackward: call stepper.prepare() and "
                               "stepper.backward(loss) instead of loss.backward()")  # fmt: skip
        k = self._group_of[id(p)]
        self._remaining[k] -= 1
        if self._remaining[k] == 0:
            if k != self._next:
                raise RuntimeError(f"StepInBackward: group {k} completed before group {self._next}; the groups must be "
                                   "listed in the order backward completes them (backward_order_groups)")  # fmt: skip
            self._update(k)
            self._next += 1

    @torch.no_grad()
    def _update(self, k: int) -> None:
        paged = self._pages[k]
        compute = torch.cuda.current_stream(self.device) if self._cuda else None
        if paged:
            compute.wait_event(self._loaded[k])
        views = self._views[k]
        for p in self.groups[k]:
            moments = views.get(id(p)) or self._moments(p)
            grad = p.grad
            ops.adamw_step_(p, grad if grad.is_contiguous() else grad.contiguous(), moments["exp_avg"],
                            moments["exp_avg_sq"], self._coef[self._row[id(p)]], policy=self.policy)  # fmt: skip
            p.grad = None
        if paged:
            updated = torch.cuda.Event()
            updated.record(compute)
            self._d2h.wait_event(updated)
            with torch.cuda.stream(self._d2h):
                for p, pages in paged:
                    for name, page in pages.items():
                        page.copy_(views[id(p)][name], non_blocking=True)
                written = torch.cuda.Event()
                written.record(self._d2h)
                self._slot_written[k % SLOTS] = written
        if self.slots and k + SLOTS - 1 < len(self.groups):
            self._prefetch(k + SLOTS - 1)

    # -- housekeeping --------------------------------------------------------------------------------
    def synchronize(self) -> None:
        """Block the host until the host pages hold the last update (before reading or saving them)."""
        if self._cuda:
            torch.cuda.synchronize(self.device)

    def remove(self) -> None:
        """Detach: remove the hooks; the optimizer steps after backward again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if getattr(self.optimizer, "_in_backward", None) is self:
            self.optimizer._in_backward = None
