#!/usr/bin/env bash
# Every BENCHMARKS.md row in one go on a GPU machine: GPU tests of the graph step and paged optimizer, then
# ours against the reference stack (same command, same GPU). Usage, from the repository root:
#   REFERENCE=path/to/reference_stack.py OUT=results/ bash bench/run_side_by_side.sh
# ROWS="tests t7b" runs only those parts (all of them, ~20 minutes: tests t7b t7b_plain t7b_eager t8b t65b t65b_fp32
# t65b_resident). Ours trains with the update in backward and the checkpoints offloaded (--step-in-backward
# --offload-checkpoints) unless the row says otherwise; t7b_plain is the optimizer after backward (page policy auto).
# (bitsandbytes importable for the reference, e.g. PYTHONPATH=/tmp/site:. as ../shared/bench/README.md says)
set -uo pipefail
: "${REFERENCE:?set REFERENCE to reference_stack.py}" "${OUT:?set OUT to a results folder}"
mkdir -p "$OUT"
ROWS=${ROWS:-tests t7b t7b_plain t7b_eager t8b t65b t65b_fp32 t65b_resident}
LEAN="--step-in-backward --offload-checkpoints"
wanted() { [[ " $ROWS " == *" $1 "* ]]; }
run() { local name=$1 limit=$2; shift 2; wanted "$name" || return 0; timeout "$limit" python -m bench.train_throughput "$@" --out "$OUT/$name.jsonl" \
    > "$OUT/$name.log" 2>&1; echo "== $name (exit $?)"; grep '^|' "$OUT/$name.log" | tail -n +3; }
wanted tests && timeout 480 python -m pytest -q -p no:cacheprovider tests/train/test_cuda_graph.py tests/optim/test_optim_gpu.py \
    tests/lora tests/test_fused.py tests/train/test_weight_reuse.py tests/kernels \
    tests/optim/test_in_backward.py tests/model/test_offload.py tests/ops tests/train/test_loop.py 2>&1 | tail -2
run t7b 300 --reference "$REFERENCE" --workloads 7b:qlora:4x512,1x2048,1x512 7b:lora16:4x512 --steps 10 --warmup 3 \
    --cuda-graph $LEAN
run t7b_plain 90 --workloads 7b:qlora:4x512,1x2048 --steps 10 --warmup 3 --cuda-graph
run t7b_eager 60 --workloads 7b:qlora:4x512 --steps 10 --warmup 3 $LEAN
run t8b 200 --reference "$REFERENCE" --workloads 8b:qlora:1x8192 --steps 4 --warmup 2 --cuda-graph $LEAN
run t65b 230 --reference "$REFERENCE" --workloads 65b:qlora:1x512 --steps 5 --warmup 2 --cuda-graph $LEAN --lora-dtype bfloat16
run t65b_fp32 150 --workloads 65b:qlora:1x512 --steps 5 --warmup 2 --cuda-graph $LEAN
run t65b_resident 150 --workloads 65b:qlora:1x512 --steps 5 --warmup 2 --cuda-graph --page-policy auto
