"""Regenerate tests/quant/quant_error_stats.json: round-trip error statistics of 4-bit quantization.

For each data type and blocksize, quantize TRIALS fresh N(0, 1) float32 tensors of N elements (seeds
1000.. so they differ from the test's seeds), and record the mean and standard deviation over
trials of the mean absolute round-trip error. The test then checks that a new tensor's error lies
within mean +- 7 sigma: loose enough never to flake, tight enough that a swapped or perturbed table,
a wrong rounding rule or a wrong scale fails it.

Run: .venv/bin/python tests/reference/quant_error_stats.py > tests/quant/quant_error_stats.json
"""

import json
import statistics

import torch

import qlora

N = 1 << 16
TRIALS = 40
CASES = [(qt, bs, dq) for qt in ("nf4", "fp4", "int4") for bs in (64, 256, 4096) for dq in (False, True)]


def mean_abs_error(quant_type: str, blocksize: int, double_quant: bool, seed: int) -> float:
    x = torch.randn(N, generator=torch.Generator().manual_seed(seed))
    q = qlora.quantize(x, quant_type, blocksize, double_quant)
    return (q.dequantize() - x).abs().mean().item()


def main() -> None:
    table = {}
    for quant_type, blocksize, double_quant in CASES:
        errors = [mean_abs_error(quant_type, blocksize, double_quant, 1000 + t) for t in range(TRIALS)]
        key = f"{quant_type}-bs{blocksize}-{'dq' if double_quant else 'nodq'}"
        table[key] = {"mean": statistics.fmean(errors), "std": statistics.stdev(errors)}
    print(json.dumps({"n": N, "trials": TRIALS, "stats": table}, indent=1))


if __name__ == "__main__":
    main()
