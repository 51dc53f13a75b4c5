"""Paged optimizer state: explicit pinned host pages, staged to the GPU around each parameter's update.

QLoRA's "paged optimizers" keep optimizer state out of GPU memory so that transient spikes (a long
batch under gradient checkpointing) do not end the run. bitsandbytes uses CUDA managed memory
(format-spec 3.1); we use explicit page-locked host memory and two GPU staging slots, because
oversubscribed managed memory can hang a shared GPU and is invisible to PyTorch's allocator: here
peak GPU memory for optimizer state is 2 x (largest paged state) plus the resident states,
deterministically, with no page faults and no per-parameter synchronisation.

The pipeline (`StagedPager.run`), per step, over the paged parameters 0..N-1 and slots i % 2:

    side stream:    H2D(0)  H2D(1) | wait upd(0), D2H(0), H2D(2) | wait upd(1), D2H(1), H2D(3) ...
    compute stream:   wait H2D(0), upd(0) | wait H2D(1), upd(1) | wait H2D(2), upd(2) ...

One side stream carries both directions, so stream order alone keeps a slot from being refilled before
its write-back; the host is not blocked (`synchronize()` waits for the last write-back before Python
reads or writes the host pages). Only states with numel >= `PAGE_MIN_NUMEL` (1e5, bitsandbytes' rule)
are paged. The paged step is bound by the host link (measured: docs/design-notes.md, qlora/optim/paging.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

PAGE_MIN_NUMEL = 100_000
_ALIGN = 512  # bytes: every staged tensor starts on a 512-byte boundary inside its slot


def pinned_copy(t: torch.Tensor) -> torch.Tensor:
    """A page-locked host copy of `t` (same dtype and shape)."""
    page = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
    page.copy_(t)
    return page


def _aligned(nbytes: int) -> int:
    return (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN


def staged_bytes(pages: dict[str, torch.Tensor]) -> int:
    """Bytes one parameter's pages take in a staging slot (with alignment)."""
    return sum(_aligned(t.numel() * t.element_size()) for t in pages.values())


def slot_views(slot: torch.Tensor, pages: dict[str, torch.Tensor], offset: int = 0) -> dict[str, torch.Tensor]:
    """GPU views of a uint8 `slot` shaped like `pages`, laid out from byte `offset` as `staged_bytes` counts."""
    views = {}
    for name, page in pages.items():
        nbytes = page.numel() * page.element_size()
        views[name] = slot[offset : offset + nbytes].view(page.dtype).view(page.shape)
        offset += _aligned(nbytes)
    return views


class StagedPager:
    """Two GPU staging slots and one copy stream that page host states in and out around updates."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.slots: list[torch.Tensor] = []
        self._done: torch.cuda.Event | None = None

    @property
    def staging_bytes(self) -> int:
        return sum(s.numel() for s in self.slots)

    def _ensure_slots(self, nbytes: int) -> None:
        if self.slots and self.slots[0].numel() >= nbytes:
            return
        self.synchronize()  # the old slots may still be read by a pending copy
        self.slots = [torch.empty(nbytes, dtype=torch.uint8, device=self.device) for _ in range(2)]

    def run(
        self,
        items: Sequence[tuple[object, dict[str, torch.Tensor]]],
        update: Callable[[object, dict[str, torch.Tensor]], None],
    ) -> None:
        """For each (key, host pages): stage the pages on the GPU, `update(key, gpu_views)` on the
        current stream (in place on the views), write the views back to the pages asynchronously."""
        if not items:
            return
        self._ensure_slots(max(staged_bytes(pages) for _, pages in items))
        compute = torch.cuda.current_stream(self.device)
        side = self.stream
        side.wait_stream(compute)  # slots were allocated / last used on the compute stream

        def prefetch(i: int) -> tuple[dict[str, torch.Tensor], torch.cuda.Event]:
            with torch.cuda.stream(side):
                views = slot_views(self.slots[i % 2], items[i][1])
                for name, page in items[i][1].items():
                    views[name].copy_(page, non_blocking=True)
                loaded = torch.cuda.Event()
                loaded.record(side)
            return views, loaded

        upcoming = prefetch(0)
        for i, (key, pages) in enumerate(items):
            views, loaded = upcoming
            if i + 1 < len(items):
                upcoming = prefetch(i + 1)  # slot (i+1)%2: queued after D2H(i-1) on the same stream
            compute.wait_event(loaded)
            update(key, views)
            updated = torch.cuda.Event()
            updated.record(compute)
            with torch.cuda.stream(side):
                side.wait_event(updated)
                for name, page in pages.items():
                    page.copy_(views[name], non_blocking=True)
        self._done = torch.cuda.Event()
        self._done.record(side)

    def synchronize(self) -> None:
        """Block the host until every write-back to the host pages has landed."""
        if self._done is not None:
            self._done.synchronize()
            self._done = None
