# call 34: final code: GPU tests of the new parts; 65B and 7B side by side with the reference (in-backward + offload)
set -u
pip install --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:.
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch, triton, transformers, peft, bitsandbytes; print(torch.__version__, triton.__version__, transformers.__version__, peft.__version__, bitsandbytes.__version__)" 2>&1 | tail -1
timeout 150 python -m pytest -q -p no:cacheprovider tests/model/test_offload.py tests/optim/test_in_backward.py tests/train/test_cuda_graph.py tests/kernels/test_adamw.py 2>&1 | tail -4
t() { local name=$1 limit=$2; shift 2; timeout "$limit" python -m bench.train_throughput "$@" --out "$OUT/$name.jsonl" > "$OUT/$name.log" 2>&1; echo "== $name (exit $?)"; grep "^|" "$OUT/$name.log"; tail -3 "$OUT/$name.log" | grep -i error; }
t t65b 230 --reference .carry/shared/reference_stack.py --workloads 65b:qlora:1x512 --steps 5 --warmup 2 --cuda-graph --step-in-backward --offload-checkpoints --lora-dtype bfloat16
t t7b 280 --reference .carry/shared/reference_stack.py --workloads 7b:qlora:4x512,1x2048,1x512 --steps 8 --warmup 3 --cuda-graph --step-in-backward --offload-checkpoints
