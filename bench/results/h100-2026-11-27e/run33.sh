# call 33: checkpoint offload fixed (restored inputs freed after their layer): GPU tests; 65B in-backward + offload
set -u
pip install --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:.
timeout 200 python -m pytest -q -p no:cacheprovider tests/model/test_offload.py tests/train/test_cuda_graph.py 2>&1 | tail -20
t() { local name=$1 limit=$2; shift 2; timeout "$limit" python -m bench.train_throughput "$@" --out "$OUT/$name.jsonl" > "$OUT/$name.log" 2>&1; echo "== $name (exit $?)"; grep "^|" "$OUT/$name.log" | tail -n 2; tail -3 "$OUT/$name.log" | grep -i error; }
t t65b_ib_off_bf16 150 --workloads 65b:qlora:1x512 --steps 5 --warmup 2 --cuda-graph --step-in-backward --offload-checkpoints --lora-dtype bfloat16
t t65b_ib_off_fp32 150 --workloads 65b:qlora:1x512 --steps 5 --warmup 2 --cuda-graph --step-in-backward --offload-checkpoints
