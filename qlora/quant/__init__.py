"""Floor 1: the 4-bit formats (NF4, FP4, INT4), double quantization and the quantized container.

Imports only torch. This plain-PyTorch code is the specification every fast kernel is tested against.
"""

from qlora.quant.tensor import NestedAbsmax, QuantizedTensor, quantize

__all__ = ["NestedAbsmax", "QuantizedTensor", "quantize"]
