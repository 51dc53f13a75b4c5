# call 35: 8B x 8192: in-backward with and without checkpoint offload (graph), with the reference; offload eager
set -u
pip install --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:.
t() { local name=$1 limit=$2; shift 2; timeout "$limit" python -m bench.train_throughput "$@" --out "$OUT/$name.jsonl" > "$OUT/$name.log" 2>&1; echo "== $name (exit $?)"; grep "^|" "$OUT/$name.log" | tail -n +3; tail -3 "$OUT/$name.log" | grep -i error; }
t t8b_ib_off 200 --reference .carry/shared/reference_stack.py --workloads 8b:qlora:1x8192 --steps 4 --warmup 2 --cuda-graph --step-in-backward --offload-checkpoints
t t8b_ib 90 --workloads 8b:qlora:1x8192 --steps 4 --warmup 2 --cuda-graph --step-in-backward
t t8b_ib_off_eager 90 --workloads 8b:qlora:1x8192 --steps 3 --warmup 1 --step-in-backward --offload-checkpoints
t t8b_ib_eager 90 --workloads 8b:qlora:1x8192 --steps 3 --warmup 1 --step-in-backward
