"""Compile every kernel for an H100 (sm_90) without a GPU and report facts about its PTX, as JSON.

Run in a subprocess by test_compile_sm90.py: the tests of this directory run kernels in Triton's
interpreter (TRITON_INTERPRET=1), which never compiles them, so a kernel that interprets fine but
does not compile (an unsupported op, a type error in a loop-carried value) would first fail on the
GPU machine. Triton's wheel carries ptxas, so the whole pipeline up to the cubin runs on a CPU.

Launch-time specialisation is reproduced: pointers 16-byte aligned and sizes divisible by 16 (what
torch allocations and 7B shapes give), unit strides as constants.
"""

from __future__ import annotations

import json
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from qlora.kernels import columns_copy, cross_entropy, dequantize, masked_lowrank, rms_norm, rotary, swiglu

TARGET = GPUTarget("cuda", 90, 32)


def compile_stats(fn, signature: dict, constexprs: dict, divisible=(), **options) -> dict:
    names = list(signature)
    attrs = {(i,): [["tt.divisibility", 16]] for i, k in enumerate(names)
             if signature[k].startswith("*") or k in divisible}  # fmt: skip
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=options)
    ptx = kernel.asm["ptx"]
    return {
        "vector_loads": len(re.findall(r"ld\.global\.v[24]\.", ptx)),
        "vector_stores": len(re.findall(r"st\.global\.v[24]\.", ptx)),
        "fma": len(re.findall(r"\bfma\.", ptx)),
        "mma": len(re.findall(r"\b(?:wgmma\.mma_async|mma\.sync)\.", ptx)),
        "cubin_bytes": len(kernel.asm["cubin"]),
    }


def dequantize_cases():
    for out in ("bf16", "fp16", "fp32"):
        for double_quant in (True, False):
            for select, strided in ((True, False), (False, False), (False, True)):
                sig = {"packed_ptr": "*u8", "absmax_ptr": "*u8" if double_quant else "*fp32",
                       "nested_absmax_ptr": "*fp32", "nested_table_ptr": "*fp32", "offset_ptr": "*fp32",
                       "table_ptr": "*fp32", "out_ptr": "*" + out, "n": "i32", "n_bytes": "i32", "n_blocks": "i32",
                       "blocks_per_row": "i32", "out_row_stride": "i32", "HALF_BLOCK": "constexpr",
                       "BLOCKS": "constexpr", "ROW_STRIDED": "constexpr", "ROW_ALIGN": "constexpr",
                       "DOUBLE_QUANT": "constexpr", "SELECT_LOOKUP": "constexpr",
                       "EMULATE_ROUNDING": "constexpr"}  # fmt: skip
                consts = {"HALF_BLOCK": 32, "BLOCKS": 128, "ROW_STRIDED": strided, "ROW_ALIGN": 16 if strided else 1,
                          "DOUBLE_QUANT": double_quant, "SELECT_LOOKUP": select, "EMULATE_ROUNDING": False}  # fmt: skip
                name = f"dequantize {out} dq={double_quant} select={select} strided={strided}"
                yield name, (dequantize._dequantize_4bit_kernel, sig, consts, ("n", "n_bytes", "n_blocks")), \
                    dict(num_warps=4, enable_fp_fusion=False)  # fmt: skip


def elementwise_cases():
    for dt in ("bf16", "fp32", "fp64"):  # fp64: the gradcheck tests run it on the GPU
        p = "*" + dt
        yield f"rms_norm forward {dt}", (rms_norm._rms_norm_forward_kernel,
            {"x_ptr": p, "w_ptr": p, "y_ptr": p, "rstd_ptr": "*fp32", "D": "i32", "y_row_stride": "i32", "eps": "fp32",
             "BLOCK_D": "constexpr", "EMULATE": "constexpr"}, {"BLOCK_D": 4096, "EMULATE": False},
            ("D", "y_row_stride")), \
            dict(num_warps=16)  # fmt: skip
        yield f"rms_norm backward {dt}", (rms_norm._rms_norm_backward_kernel,
            {"dy_ptr": p, "x_ptr": p, "w_ptr": p, "rstd_ptr": "*fp32", "dx_ptr": p, "dw_partial_ptr": "*fp32",
             "n_rows": "i32", "D": "i32", "ROWS_PER_PROGRAM": "constexpr", "BLOCK_D": "constexpr",
             "WANT_DW": "constexpr", "EMULATE": "constexpr"},
            {"ROWS_PER_PROGRAM": 4, "BLOCK_D": 4096, "WANT_DW": True, "EMULATE": False}, ("D",)), \
            dict(num_warps=16)  # fmt: skip
        for strided in (False, True) if dt == "bf16" else (False,):
            yield f"swiglu forward {dt}" + (" row-strided" if strided else ""), (swiglu._swiglu_forward_kernel,
                {"g_ptr": p, "u_ptr": p, "y_ptr": p, "n": "i32", "d": "i32", "y_row_stride": "i32",
                 "BLOCK": "constexpr", "ROW_STRIDED": "constexpr", "EMULATE": "constexpr"},
                {"BLOCK": swiglu.ROW_BLOCK if strided else swiglu.BLOCK, "ROW_STRIDED": strided, "EMULATE": False},
                ("n", "d", "y_row_stride")), dict(num_warps=8)  # fmt: skip
        yield f"swiglu backward {dt}", (swiglu._swiglu_backward_kernel,
            {"dy_ptr": p, "g_ptr": p, "u_ptr": p, "dg_ptr": p, "du_ptr": p, "n": "i32", "BLOCK": "constexpr",
             "EMULATE": "constexpr"}, {"BLOCK": 2048, "EMULATE": False}, ("n",)), dict(num_warps=8)  # fmt: skip
        sig = {"x_ptr": p, "cos_ptr": p, "sin_ptr": p, "y_ptr": p, "T": "i32", "H": "i32", "HALF": "i32"}
        strides = ["sxb", "sxh", "sxt", "sxd", "syb", "syh", "syt", "syd", "scb", "sct", "scd", "ssb", "sst", "ssd"]
        sig.update({s: "constexpr" if s.endswith("d") else "i32" for s in strides})
        sig.update({"BLOCK_H": "constexpr", "BLOCK_HALF": "constexpr", "BACKWARD": "constexpr", "EMULATE": "constexpr"})
        for backward in (False, True):
            consts = {"BLOCK_H": 8, "BLOCK_HALF": 64, "BACKWARD": backward, "EMULATE": False,
                      "sxd": 1, "syd": 1, "scd": 1, "ssd": 1}  # fmt: skip
            divisible = ["HALF"] + [s for s in strides if not s.endswith("d")]
            yield f"rotary backward={backward} {dt}", (rotary._rotary_kernel, sig, consts, divisible), \
                dict(num_warps=1, enable_fp_fusion=False)  # fmt: skip
        yield f"cross_entropy forward {dt}", (cross_entropy._ce_forward_kernel,
            {"logits_ptr": p, "labels_ptr": "*i64", "loss_ptr": "*fp32", "lse_ptr": "*fp32", "V": "constexpr",
             "stride_row": "i32", "ignore_index": "i32", "BLOCK_V": "constexpr"},
            {"V": 32000, "BLOCK_V": 4096}, ("stride_row",)), dict(num_warps=8)  # fmt: skip
        yield f"cross_entropy backward {dt}", (cross_entropy._ce_backward_kernel,
            {"logits_ptr": p, "labels_ptr": "*i64", "lse_ptr": "*fp32", "grad_ptr": "*fp32", "dlogits_ptr": p,
             "V": "constexpr", "stride_row": "i32", "ignore_index": "i32", "BLOCK_V": "constexpr",
             "EMULATE": "constexpr"}, {"V": 32000, "BLOCK_V": 4096, "EMULATE": False}, ("stride_row",)), \
            dict(num_warps=8)  # fmt: skip


def masked_lowrank_cases():
    for dt in ("bf16", "fp32"):
        p = "*" + dt
        sig = {"out_ptr": p, "g_ptr": p, "a_ptr": p, "keep_ptr": "*u8", "n_rows": "i32", "n_cols": "i32",
               "scale": "fp32", "stride_out": "i32", "stride_g": "i32", "stride_a": "i32", "stride_keep": "i32",
               "RANK": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_R": "constexpr",
               "EMULATE": "constexpr"}  # fmt: skip
        consts = {"RANK": 64, "BLOCK_M": masked_lowrank.BLOCK_M, "BLOCK_N": masked_lowrank.BLOCK_N, "BLOCK_R": 64,
                  "EMULATE": False}  # fmt: skip
        yield f"masked_lowrank {dt}", (masked_lowrank._masked_lowrank_add_kernel, sig, consts,
                                       ("n_cols", "stride_out", "stride_g", "stride_a", "stride_keep")), \
            dict(num_warps=masked_lowrank.NUM_WARPS)  # fmt: skip


def columns_copy_cases():
    for src in ("fp32", "bf16"):
        sig = {"dst_ptr": "*bf16", "src_ptr": "*" + src, "n_rows": "i32", "n_src_cols": "i32", "n_dst_cols": "i32",
               "dst_row_stride": "i32", "src_row_stride": "i32", "scale": "fp32", "BLOCK_ROWS": "constexpr",
               "BLOCK_COLS": "constexpr", "EMULATE": "constexpr"}  # fmt: skip
        consts = {"BLOCK_ROWS": columns_copy.BLOCK_ROWS, "BLOCK_COLS": 64, "EMULATE": False}
        yield f"columns_copy {src} -> bf16", (columns_copy._columns_copy_kernel, sig, consts,
                                              ("n_src_cols", "n_dst_cols", "dst_row_stride", "src_row_stride")), \
            dict(num_warps=columns_copy.NUM_WARPS)  # fmt: skip


def main() -> None:
    results = {}
    for name, (fn, sig, consts, divisible), options in [*dequantize_cases(), *elementwise_cases(),
                                                        *masked_lowrank_cases(), *columns_copy_cases()]:  # fmt: skip
        try:
            results[name] = compile_stats(fn, sig, consts, divisible, **options)
        except Exception as e:  # report every failure, not only the first
            results[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
    json.dump(results, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
