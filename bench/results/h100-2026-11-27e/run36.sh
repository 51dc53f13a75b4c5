# call 36: final code: every GPU test of run_side_by_side.sh; bf16 LoRA and an eager 7B step with the new options
set -u
pip install --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
mkdir -p ../shared/models ../shared/data/instruct && cp -r .carry/stories260K ../shared/models/ && cp .carry/alpaca_en_demo.json ../shared/data/instruct/
export PYTHONPATH=/tmp/site:.
ROWS="tests" REFERENCE=.carry/shared/reference_stack.py OUT=$OUT bash bench/run_side_by_side.sh
timeout 200 python -m pytest -q -p no:cacheprovider tests/train/test_loop.py tests/train/test_producer_rows.py tests/test_ops.py -m gpu 2>&1 | tail -2
t() { local name=$1 limit=$2; shift 2; timeout "$limit" python -m bench.train_throughput "$@" --out "$OUT/$name.jsonl" > "$OUT/$name.log" 2>&1; echo "== $name (exit $?)"; grep "^|" "$OUT/$name.log" | tail -n +3; tail -3 "$OUT/$name.log" | grep -i error; }
t t7b_lora16 90 --workloads 7b:lora16:4x512 --steps 8 --warmup 3 --cuda-graph --step-in-backward --offload-checkpoints
t t7b_eager 60 --workloads 7b:qlora:4x512 --steps 8 --warmup 3 --step-in-backward --offload-checkpoints
