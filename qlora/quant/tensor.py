"""`QuantizedTensor`: a frozen weight held as packed 4-bit codes plus the state to restore it.

A plain container, not a `torch.Tensor` subclass. A subclass would let the weight pass through
arbitrary torch ops, but it costs a large dispatch table (torchao's NF4Tensor is over a thousand
lines) and it is only needed for FSDP flattening or `torch.compile` tracing through the weight. A
QLoRA layer only ever needs three things from its base weight: dequantize it, move it, save it.
FSDP2 shards it without a subclass: `storage()` names the tensors that grow with the weight, the layer
holds them as parameters for the run (`LoRALinear.register_base_storage`) and `with_storage` reassembles it.

State and the bitsandbytes state-dict keys it maps to (format-spec 1.6), for a prefix `weight`:

    weight                                   packed codes, uint8 [(n+1)//2, 1]
    weight.absmax                            float32 [nblocks], or uint8 [nblocks] when double-quantized
    weight.quant_map                         float32 [16], the 4-bit table as bitsandbytes saves it
    weight.nested_absmax                     float32 [ceil(nblocks/256)]       (double-quantized only)
    weight.nested_quant_map                  float32 [256], signed dynamic map (double-quantized only)
    weight.quant_state.bitsandbytes__nf4     uint8 bytes of a JSON blob: quant_type, blocksize, dtype,
                                             shape, and nested_blocksize/nested_dtype/nested_offset

The container's `table` is what each code decodes to (`table_4bit`); the saved `quant_map` is
`saved_table_4bit`, equal in value but with +0.0 where FP4's code 8 decodes to -0.0, because that is
what bitsandbytes writes. Loading checks the saved map's values and keeps the decoding table.

INT4 has no bitsandbytes encoding (it exists for the paper's data-type comparison), so it cannot
be written in these keys; everything else round-trips bit-exactly through bitsandbytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch

from qlora.precision import DTYPES, dtype_name
from qlora.quant.blockwise import (
    check_blocksize,
    dequantize_4bit_blockwise,
    quantize_4bit_blockwise,
)
from qlora.quant.codes import QUANT_TYPES_4BIT, dynamic_map, saved_table_4bit, table_4bit
from qlora.quant.double_quant import NESTED_BLOCKSIZE, double_quantize, restore_absmax

# The blob's "dtype" is torch's attribute name (bitsandbytes writes str(dtype) less "torch."): the canonical
# names of qlora.precision's one table (floor 0, below this one). Exact names only: no aliases in a file.
_BNB_QUANT_TYPES = ("nf4", "fp4")
_BNB_STATE_KEYS = frozenset(
    {"absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_type", "blocksize", "dtype", "shape",
     "nested_blocksize", "nested_dtype", "nested_offset"}
)  # fmt: skip


@dataclass(frozen=True)
class NestedAbsmax:
    """The second quantization level of double quantization."""

    codes: torch.Tensor = field(repr=False)  # uint8 [nblocks]
    absmax: torch.Tensor = field(repr=False)  # float32 [ceil(nblocks / 256)]
    offset: torch.Tensor  # float32 0-d: the mean subtracted before quantizing
    table: torch.Tensor = field(repr=False)  # float32 [256]: the signed dynamic map
    blocksize: int = NESTED_BLOCKSIZE


@dataclass(frozen=True)
class QuantizedTensor:
    """Packed 4-bit codes of a tensor of `shape` and `dtype`, with their per-block scales."""

    packed: torch.Tensor  # uint8 [(n+1)//2, 1]
    absmax: torch.Tensor | None  # float32 [nblocks]; None when double-quantized (see `nested`)
    nested: NestedAbsmax | None
    table: torch.Tensor  # float32 [16]: what each code decodes to (`table_4bit`)
    quant_type: str
    blocksize: int
    shape: torch.Size
    dtype: torch.dtype

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def quantize(
        cls,
        t: torch.Tensor,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        chunk_elements: int | None = None,
    ) -> QuantizedTensor:
        if quant_type not in QUANT_TYPES_4BIT:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES_4BIT}, got {quant_type!r}")
        packed, absmax = quantize_4bit_blockwise(t.detach(), quant_type, blocksize, chunk_elements)
        nested = None
        if double_quant:
            codes, nested_absmax, offset = double_quantize(absmax)
            nested = NestedAbsmax(codes, nested_absmax, offset, dynamic_map(True, t.device))
            absmax = None
        return cls(packed, absmax, nested, table_4bit(quant_type, t.device), quant_type, blocksize,
                   torch.Size(t.shape), t.dtype)  # fmt: skip

    # --- use --------------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def double_quant(self) -> bool:
        return self.nested is not None

    def float_absmax(self) -> torch.Tensor:
        """The float32 per-block absmax (reconstructed from its 8-bit codes when double-quantized)."""
        if self.nested is None:
            assert self.absmax is not None
            return self.absmax
        n = self.nested
        return restore_absmax(n.codes, n.absmax, n.offset, n.table)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor in `dtype` (default: the dtype it was quantized from)."""
        return dequantize_4bit_blockwise(
            self.packed, self.float_absmax(), self.quant_type, self.blocksize, self.shape, dtype or self.dtype
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> QuantizedTensor:
        def move(x: torch.Tensor) -> torch.Tensor:
            return x.to(device, non_blocking=non_blocking)

        nested = None
        if self.nested is not None:
            n = self.nested
            nested = replace(n, codes=move(n.codes), absmax=move(n.absmax), offset=move(n.offset), table=move(n.table))
        absmax = None if self.absmax is None else move(self.absmax)
        return replace(self, packed=move(self.packed), absmax=absmax, nested=nested, table=move(self.table))

    def storage(self) -> dict[str, torch.Tensor]:
        """The tensors that grow with the weight, by name: `packed`, and `absmax` or (double-quantized)
        `absmax_codes` and `absmax_scales`; every one indexed by position along dim 0 (codes, blocks), so
        a sharder may split each along it. The code tables and the offset are per-tensor constants."""
        if self.nested is None:
            assert self.absmax is not None
            return {"packed": self.packed, "absmax": self.absmax}
        return {"packed": self.packed, "absmax_codes": self.nested.codes, "absmax_scales": self.nested.absmax}

    def with_storage(self, parts: Mapping[str, torch.Tensor]) -> QuantizedTensor:
        """This tensor with its `storage()` tensors replaced by `parts` (the same names), e.g. the full tensors
        a sharder gathered; shapes are the caller's to keep (see `storage`)."""
        if set(parts) != set(self.storage()):
            raise KeyError(f"storage parts {sorted(parts)} do not match {sorted(self.storage())}")
        if self.nested is None:
            return replace(self, packed=parts["packed"], absmax=parts["absmax"])
        nested = replace(self.nested, codes=parts["absmax_codes"], absmax=parts["absmax_scales"])
        return replace(self, packed=parts["packed"], nested=nested)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this container holds (for memory accounting and saved-tensor checks)."""
        held = [self.packed, self.table]
        if self.absmax is not None:
            held.append(self.absmax)
        if self.nested is not None:
            held += [self.nested.codes, self.nested.absmax, self.nested.offset, self.nested.table]
        return held

    def memory_bytes(self) -> int:
        """Bytes held, the shared code tables included."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def bits_per_param(self) -> float:
        """Storage per element: codes and scales (the 16/256-entry tables and the offset are
        per-tensor constants and are left out). NF4 + DQ at blocksize 64: 4.127; without DQ: 4.5."""
        per_element = [self.packed] + ([self.absmax] if self.absmax is not None else [])
        if self.nested is not None:
            per_element += [self.nested.codes, self.nested.absmax]
        return 8 * sum(t.numel() * t.element_size() for t in per_element) / self.numel

    def __repr__(self) -> str:
        dq = "+dq" if self.double_quant else ""
        return (f"QuantizedTensor({self.quant_type}{dq}, shape={tuple(self.shape)}, dtype={self.dtype}, "
                f"blocksize={self.blocksize}, device={self.device})")  # fmt: skip

    # --- bitsandbytes state-dict keys -------------------------------------------------------
    def to_bnb_state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """The tensors bitsandbytes' `Linear4bit` saves for a parameter named `prefix`."""
        if self.quant_type not in _BNB_QUANT_TYPES:
            raise ValueError(
                f"{self.quant_type} has no bitsandbytes encoding (only nf4 and fp4 do); "
                "it exists for data-type comparisons and cannot be saved in bitsandbytes' keys"
            )
        blob: dict[str, object] = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": dtype_name(self.dtype),
            "shape": list(self.shape),
        }
        out = {prefix: self.packed, f"{prefix}.quant_map": saved_table_4bit(self.quant_type, self.table.device)}
        if self.nested is not None:
            n = self.nested
            blob.update(nested_blocksize=n.blocksize, nested_dtype="float32", nested_offset=n.offset.item())
            out[f"{prefix}.absmax"] = n.codes
            out[f"{prefix}.nested_absmax"] = n.absmax
            out[f"{prefix}.nested_quant_map"] = n.table.clone()  # a clone: safetensors drops shared storage
        else:
            assert self.absmax is not None
            out[f"{prefix}.absmax"] = self.absmax
        encoded = json.dumps(blob).encode("utf-8")
        out[f"{prefix}.quant_state.bitsandbytes__{self.quant_type}"] = torch.tensor(list(encoded), dtype=torch.uint8)
        return out

    @classmethod
    def from_bnb_state_dict(cls, state_dict: Mapping[str, torch.Tensor], prefix: str = "weight") -> QuantizedTensor:
        """Read the keys bitsandbytes writes for the parameter `prefix` (see the module docstring)."""
        if prefix not in state_dict:
            raise KeyError(f"{prefix!r}: packed 4-bit weight not found in the state dict")
        head = prefix + "."
        keys = {k[len(head) :]: v for k, v in state_dict.items() if k.startswith(head)}
        blob_keys = [k for k in keys if k.startswith("quant_state.")]
        if len(blob_keys) != 1:
            raise KeyError(
                f"{prefix!r}: expected exactly one '{head}quant_state.bitsandbytes__nf4|fp4' key, found {blob_keys}"
            )
        blob_key = blob_keys[0]
        quant_type = blob_key.rsplit("bitsandbytes__", 1)[-1]
        if quant_type not in _BNB_QUANT_TYPES:
            raise ValueError(f"{head}{blob_key}: unknown bitsandbytes 4-bit type {quant_type!r}")
        try:
            blob = json.loads(bytes(keys.pop(blob_key).reshape(-1).tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{head}{blob_key}: not a valid JSON quant-state blob ({e})") from e
        unknown = (set(keys) | set(blob)) - _BNB_STATE_KEYS
        if unknown:
            raise KeyError(f"{prefix!r}: unexpected quant-state keys {sorted(unknown)}")
        for required in ("absmax", "quant_map"):
            if required not in keys:
                raise KeyError(f"{head}{required}: missing from the state dict")
        for blob_field in ("quant_type", "blocksize", "dtype", "shape"):
            if blob_field not in blob:
                raise KeyError(f"{head}{blob_key}: JSON blob lacks {blob_field!r}")
        if blob["quant_type"] != quant_type:
            raise ValueError(f"{head}{blob_key}: blob says quant_type {blob['quant_type']!r}")
        if blob["dtype"] not in DTYPES:
            raise ValueError(f"{head}{blob_key}: unsupported dtype {blob['dtype']!r} (one of {', '.join(DTYPES)})")
        blocksize = int(blob["blocksize"])
        check_blocksize(blocksize)
        packed = state_dict[prefix]
        if packed.dtype != torch.uint8:  # quant_storage bf16/fp16/fp32 holds the same bytes
            packed = packed.contiguous().view(torch.uint8)
        packed = packed.reshape(-1, 1)
        shape = torch.Size(blob["shape"])
        if packed.shape[0] != (shape.numel() + 1) // 2:
            raise ValueError(f"{prefix!r}: {packed.shape[0]} packed bytes do not fit shape {list(shape)}")
        nested = None
        absmax: torch.Tensor | None = keys["absmax"]
        if "nested_absmax" in keys:
            if "nested_quant_map" not in keys or "nested_offset" not in blob:
                raise KeyError(f"{prefix!r}: nested_absmax present but nested_quant_map/nested_offset missing")
            if int(blob.get("nested_blocksize", NESTED_BLOCKSIZE)) != NESTED_BLOCKSIZE:
                raise ValueError(f"{head}{blob_key}: nested_blocksize must be {NESTED_BLOCKSIZE}")
            assert absmax is not None
            offset = torch.tensor(blob["nested_offset"], dtype=torch.float32, device=packed.device)
            nested = NestedAbsmax(absmax.to(torch.uint8), keys["nested_absmax"].float(), offset,
                                  keys["nested_quant_map"].float())  # fmt: skip
            absmax = None
        else:
            absmax = absmax.float()
        table = table_4bit(quant_type, packed.device)
        saved = keys["quant_map"].reshape(-1).float()
        if saved.numel() != 16 or not torch.equal(saved.to(table.device), table):  # value equality: -0.0 == 0.0
            raise ValueError(
                f"{head}quant_map: not bitsandbytes' {quant_type} table (got {saved.tolist()}). "
                "The checkpoint is damaged or not a bitsandbytes one; re-export it from the original model."
            )
        return cls(packed, absmax, nested, table, quant_type, blocksize, shape,
                   DTYPES[blob["dtype"]])  # fmt: skip


def quantize(
    t: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True
) -> QuantizedTensor:
    """Quantize `t` blockwise to 4 bits (`"nf4"`, `"fp4"` or `"int4"`), optionally double-quantizing
    the block constants. Byte-identical to bitsandbytes' `quantize_4bit` for nf4/fp4."""
    return QuantizedTensor.quantize(t, quant_type, blocksize, double_quant)
