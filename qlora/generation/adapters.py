"""Several LoRA adapters on one base, chosen per sequence: `AdapterBank`.

A server holds one 4-bit base and answers requests for different finetunes in the same batch. Each adapter
stays unmerged (A [r, in], B [out, r], its scale), next to the base; a sequence's adapter is a one-hot row of
`selection` [sequences, 1 + adapters] (column 0: the adapter the model was built with, if any; all zeros:
the base alone). A projection then computes

    y = x W^T + sum over columns c of selection[row, c] * scale_c * (x A_c^T) B_c^T

for every row at once: a few small GEMMs per adapter and no data-dependent branching, so the decode step stays
one CUDA graph. The engine points `current` at the whole batch's selection for a decode step, or at one row
for a prompt's prefill.

While installed (`install`, undone by `remove`) every `LoRALinear` of the model (adapted or not) routes its no-gradient
eval-mode forward here (`LoRALinear.serving`); training is untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

from qlora import ops
from qlora.adapter import AdapterError, read_adapter
from qlora.lora import LoRALinear
from qlora.quant.tensor import QuantizedTensor


class LayerAdapters:
    """One projection's extra adapters and its bank (what `LoRALinear.serving` calls)."""

    def __init__(self, bank: AdapterBank, layer: LoRALinear) -> None:
        self.bank, self.layer = bank, layer
        self.extra: list[tuple[int, torch.Tensor, torch.Tensor, float]] = []  # (column, A, B, scale)

    def __call__(self, x: torch.Tensor, base: torch.Tensor | QuantizedTensor) -> torch.Tensor:
        layer = self.layer
        if isinstance(base, QuantizedTensor):
            y = ops.matmul_4bit(x, base, policy=layer.policy)
        else:
            y = F.linear(x, base.to(x.dtype))
        rows = x.reshape(-1, x.shape[-1])  # [N, in]
        y2 = y.view(-1, y.shape[-1])  # [N, out]
        select = self.bank.current.to(x.dtype)  # [B, 1 + adapters]
        per_row = select.repeat_interleave(rows.shape[0] // select.shape[0], dim=0)  # [N, 1 + adapters]
        if layer.r:
            own = F.linear(F.linear(rows, layer.lora_A.weight.to(x.dtype)), layer.lora_B.weight.to(x.dtype))
            y2 += own * (layer.scale * per_row[:, :1])
        for column, a, b, scale in self.extra:
            y2 += F.linear(F.linear(rows, a), b) * (scale * per_row[:, column : column + 1])
        if layer.bias is not None:
            y2 += layer.bias.to(x.dtype)
        return y


class AdapterBank:
    """Named adapters loaded beside `model`'s own, and which one each of `rows` sequences uses."""

    def __init__(self, model: torch.nn.Module, adapters: Mapping[str, str | Path], rows: int) -> None:
        weight = model.model.embed_tokens.weight
        self.names = list(adapters)
        self.selection = torch.zeros(rows, 1 + len(self.names), dtype=torch.float32, device=weight.device)
        self.current = self.selection
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}  # adapted or not
        self.entries = {name: LayerAdapters(self, layer) for name, layer in self.layers.items()}
        for column, (name, directory) in enumerate(adapters.items(), start=1):
            spec, pairs = read_adapter(directory)
            unknown = sorted(set(pairs) - set(self.layers))
            if unknown:
                raise AdapterError(f"adapter {name!r} ({directory}): modules the model does not have: {unknown[:5]}")
            for module, (a, b) in pairs.items():
                layer = self.layers[module]
                if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
                    raise AdapterError(f"adapter {name!r} ({directory}): {module} is [{b.shape[0]} x {a.shape[1]}], "
                                       f"the model's is [{layer.out_features} x {layer.in_features}]")  # fmt: skip
                dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
                self.entries[module].extra.append((column, a.to(weight.device, dtype), b.to(weight.device, dtype),
                                                   spec.for_layer(module).scale))  # fmt: skip

    def column(self, adapter: str | None) -> int | None:
        """The selection column of `adapter` (None: the model's own adapter, column 0)."""
        if adapter is None:
            return 0
        if adapter not in self.names:
            raise ValueError(f"unknown adapter {adapter!r}; loaded: {', '.join(self.names) or 'none'}")
        return self.names.index(adapter) + 1

    def select(self, row: int, adapter: str | None) -> None:
        self.selection[row] = 0.0
        self.selection[row, self.column(adapter)] = 1.0

    @contextlib.contextmanager
    def only_row(self, row: int) -> Iterator[None]:
        """Forwards inside see row `row`'s selection alone (a prompt's prefill)."""
        self.current = self.selection[row : row + 1]
        try:
            yield
        finally:
            self.current = self.selection

    def install(self) -> AdapterBank:
        for name, layer in self.layers.items():
            layer.serving = self.entries[name]
        return self

    def remove(self) -> None:
        for layer in self.layers.values():
            layer.serving = None
