# call 31: StepInBackward: GPU tests, 7B always vs in-backward, 65B in-backward (bf16 and fp32 adapters)
set -u
pip install --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
mkdir -p ../shared/models ../shared/data/instruct && cp -r .carry/stories260K ../shared/models/ && cp .carry/alpaca_en_demo.json ../shared/data/instruct/
export PYTHONPATH=/tmp/site:.
timeout 200 python -m pytest -q -x -p no:cacheprovider tests/optim/test_in_backward.py tests/train/test_cuda_graph.py tests/kernels/test_adamw.py 2>&1 | tail -30
t() { local name=$1 limit=$2; shift 2; timeout "$limit" python -m bench.train_throughput "$@" --out "$OUT/$name.jsonl" > "$OUT/$name.log" 2>&1; echo "== $name (exit $?)"; grep "^|" "$OUT/$name.log" | tail -n 2; tail -3 "$OUT/$name.log" | grep -i error; }
# t t7b_always 100 --workloads 7b:qlora:4x512,1x2048 --steps 8 --warmup 3 --cuda-graph --page-policy always
t t7b_inbwd 100 --workloads 7b:qlora:4x512,1x2048 --steps 8 --warmup 3 --cuda-graph --step-in-backward
# t t7b_auto 100 --workloads 7b:qlora:4x512,1x2048 --steps 8 --warmup 3 --cuda-graph
t t65b_inbwd_bf16 150 --workloads 65b:qlora:1x512 --steps 5 --warmup 2 --cuda-graph --step-in-backward --lora-dtype bfloat16
t t65b_inbwd_fp32 150 --workloads 65b:qlora:1x512 --steps 5 --warmup 2 --cuda-graph --step-in-backward
