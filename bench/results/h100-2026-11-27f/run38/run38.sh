# call 38 (sixth session): GPU tests of the fifth session's review fixes; kernel profile of the graphed 7B 1x2048 step
set -u
pip install --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:.
mkdir -p ../shared/models ../shared/data/instruct && cp -r .carry/stories260K ../shared/models/ && cp .carry/alpaca_en_demo.json ../shared/data/instruct/
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 200 python -m pytest -q -p no:cacheprovider tests/model/test_offload.py tests/optim/test_in_backward.py tests/train/test_cuda_graph.py tests/kernels/test_adamw.py tests/optim/test_optim_gpu.py 2>&1 | tail -6
timeout 200 python -m bench.train_throughput --workloads 7b:qlora:1x2048 --steps 6 --warmup 3 --cuda-graph --step-in-backward --offload-checkpoints --profile-kernels 60 --out $OUT/prof2048.jsonl > $OUT/prof2048.log 2>&1; echo "prof exit $?"; grep "^|" $OUT/prof2048.log
python - <<'P'
import json,os
for line in open(os.environ["OUT"]+"/prof2048.jsonl"):
    r=json.loads(line)
    if "top_kernels" in r:
        print(r["tokens_per_s"], r["step_s_median"], r["peak_alloc_GiB"])
        for k,v in r["top_kernels"].items(): print(f"{v:8.2f}  {k[:150]}")
P
