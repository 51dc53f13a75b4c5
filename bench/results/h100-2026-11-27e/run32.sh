# call 32: checkpoint offload: GPU tests; 65B in-backward + offload (bf16, fp32 adapters); 8B x 8192; 7B
set -u
pip install --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
mkdir -p ../shared/models ../shared/data/instruct && cp -r .carry/stories260K ../shared/models/ && cp .carry/alpaca_en_demo.json ../shared/data/instruct/
export PYTHONPATH=/tmp/site:.
timeout 200 python -m pytest -q -p no:cacheprovider tests/model/test_offload.py tests/optim/test_in_backward.py tests/train/test_cuda_graph.py 2>&1 | tail -30
t() { local name=$1 limit=$2; shift 2; timeout "$limit" python -m bench.train_throughput "$@" --out "$OUT/$name.jsonl" > "$OUT/$name.log" 2>&1; echo "== $name (exit $?)"; grep "^|" "$OUT/$name.log" | tail -n 2; tail -3 "$OUT/$name.log" | grep -i error; }
t t65b_ib_off_bf16 150 --workloads 65b:qlora:1x512 --steps 5 --warmup 2 --cuda-graph --step-in-backward --offload-checkpoints --lora-dtype bfloat16
t t65b_ib_off_fp32 150 --workloads 65b:qlora:1x512 --steps 5 --warmup 2 --cuda-graph --step-in-backward --offload-checkpoints
t t8b_ib_off 120 --workloads 8b:qlora:1x8192 --steps 4 --warmup 2 --cuda-graph --step-in-backward --offload-checkpoints
t t7b_ib_off 100 --workloads 7b:qlora:4x512,1x2048 --steps 8 --warmup 3 --cuda-graph --step-in-backward --offload-checkpoints
