"""Shared helpers for the quantization tests."""

import torch

# Random inputs like real weights and activations: standard normal, in each supported dtype.
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def randn(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)
