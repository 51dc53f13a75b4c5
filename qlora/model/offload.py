"""`CheckpointOffload`: the checkpointed layers' inputs wait for backward in pinned host memory, not on the GPU.

Why. With gradient checkpointing the only activations kept between forward and backward are each
decoder layer's input (the residual stream): layers x tokens x hidden values. Backward needs them one
layer at a time, last layer first, and each layer's backward takes far longer than its input's copy
across the host link, so they can leave the GPU during forward and come back just ahead of their
recompute at no cost in time (measured: docs/LOG.md, 2026-11-27 (fifth session), item 2).

How, per decoder layer i (all in stream order, so it runs eagerly and inside a captured CUDA graph):

    forward   after layer i has read its input h_i: the D2H stream waits for the compute stream and
              copies h_i into a pinned buffer; one layer later the compute stream waits for that
              copy and frees h_i's GPU storage (`untyped_storage().resize_(0)`: the tensor object,
              which the checkpoint holds for its recompute, stays; only its memory goes)
    backward  when layer i's recompute starts (the checkpoint's recompute context), its input is
              waited for and the input of layer i-1 is brought back: the compute stream gives the
              storage its size back, the H2D stream copies the bytes in; layer i-1's recompute
              waits for that copy

The last layer's input stays on the GPU (backward needs it first); a view is left where it is.
Pinned buffers are per layer, of power-of-two sizes, never freed (a captured graph may copy into
any of them). Contract: one forward, then its backward (or none: the next forward drops it after
waiting for every copy still in flight). Details: docs/design-notes.md, qlora/model/offload.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class CheckpointOffload:
    """Moves checkpointed layer inputs to pinned host memory in forward and back ahead of backward."""

    def __init__(self, device: torch.device):
        self.device = device
        self._out = torch.cuda.Stream(device)
        self._in = torch.cuda.Stream(device)
        self._host: dict[int, list[torch.UntypedStorage]] = {}  # layer -> pinned buffers, ascending sizes
        self._held: dict[int, tuple[torch.Tensor, torch.UntypedStorage]] = {}  # layer -> (its input, host bytes)
        self._copied: dict[int, torch.cuda.Event] = {}
        self._loaded: dict[int, torch.cuda.Event] = {}
        self._to_free: int | None = None

    @property
    def host_bytes(self) -> int:
        return sum(buffer.nbytes() for buffers in self._host.values() for buffer in buffers)

    def _buffer(self, layer: int, nbytes: int) -> torch.UntypedStorage:
        """`nbytes` of pinned host memory for `layer`: the front of its smallest buffer that holds them."""
        buffers = self._host.setdefault(layer, [])
        for buffer in buffers:
            if buffer.nbytes() >= nbytes:
                return buffer[0:nbytes]  # a storage slice: the same memory
        buffer = torch.empty(1 << (nbytes - 1).bit_length(), dtype=torch.uint8, pin_memory=True).untyped_storage()
        buffers.append(buffer)
        buffers.sort(key=lambda b: b.nbytes())
        return buffer[0:nbytes]

    # -- forward -----------------------------------------------------------------------------------
    def start_forward(self) -> None:
        if not torch.cuda.is_current_stream_capturing():  # (a capture starts from a synchronised device)
            compute = torch.cuda.current_stream(self.device)  # copies of a forward whose backward never ran
            compute.wait_stream(self._out)
            compute.wait_stream(self._in)
        self._held.clear()
        self._copied.clear()
        self._loaded.clear()
        self._to_free = None

    def offload(self, layer: int, h: torch.Tensor) -> None:
        """After layer `layer` has been queued with input `h`: copy `h` out, free the previous layer's input."""
        self._free_pending()
        storage = h.untyped_storage()
        if not h.is_cuda or h.storage_offset() != 0 or storage.nbytes() != h.numel() * h.element_size():
            return  # a view or a CPU tensor: left in place
        compute = torch.cuda.current_stream(self.device)
        host = self._buffer(layer, storage.nbytes())
        self._out.wait_stream(compute)
        with torch.cuda.stream(self._out):
            host.copy_(storage, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self._out)
        self._held[layer], self._copied[layer], self._to_free = (h, host), copied, layer

    def finish_forward(self) -> None:
        """After the last offloaded layer: free its input too, once copied."""
        self._free_pending()

    def _free_pending(self) -> None:
        if self._to_free is None:
            return
        layer, self._to_free = self._to_free, None
        torch.cuda.current_stream(self.device).wait_event(self._copied[layer])
        self._held[layer][0].untyped_storage().resize_(0)

    # -- backward ----------------------------------------------------------------------------------
    def _load(self, layer: int) -> None:
        if layer not in self._held or layer in self._loaded:  # not offloaded, or already on its way
            return
        h, host = self._held[layer]
        compute = torch.cuda.current_stream(self.device)
        h.untyped_storage().resize_(host.nbytes())  # allocated in compute-stream order
        self._in.wait_stream(compute)
        with torch.cuda.stream(self._in):
            h.untyped_storage().copy_(host, non_blocking=True)
            loaded = torch.cuda.Event()
            loaded.record(self._in)
        self._loaded[layer] = loaded

    @contextlib.contextmanager
    def recompute(self, layer: int) -> Iterator[None]:
        """Entered around layer `layer`'s recompute: its input is back on the GPU, the one below is on its way."""
        if layer in self._held:
            self._load(layer)  # normally already queued by the layer above
            torch.cuda.current_stream(self.device).wait_event(self._loaded.pop(layer))
            del self._held[layer]  # the checkpoint holds the input until its backward is done: then it is freed
        self._load(layer - 1)
        yield
