# call 40: hashed dropout v2 (two draws per hash, fused backward): GPU tests, tile sweep, 7B before/after
set -u
pip install --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:.
mkdir -p ../shared/models ../shared/data/instruct && cp -r .carry/stories260K ../shared/models/ && cp .carry/alpaca_en_demo.json ../shared/data/instruct/
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 170 python -m pytest -q -p no:cacheprovider -x tests/kernels/test_hashed_dropout.py tests/kernels/test_masked_lowrank.py tests/kernels/test_gradcheck.py tests/test_lora.py tests/test_lora_matmul.py tests/train/test_cuda_graph.py tests/model/test_offload.py tests/optim/test_in_backward.py 2>&1 | tail -8
timeout 200 python -m bench.hashed_dropout --sweep --tokens 2048 512 --out $OUT/hashed_dropout.json > $OUT/hashed_dropout.log 2>&1; echo "micro exit $?"; tail -3 $OUT/hashed_dropout.log | grep -i error
LEAN="--workloads 7b:qlora:4x512,1x2048,1x512 --steps 8 --warmup 3 --cuda-graph --step-in-backward --offload-checkpoints"
(cd .carry/before && timeout 120 python -m bench.train_throughput $LEAN --out $OUT/before.jsonl > $OUT/before.log 2>&1; echo "before exit $?"; grep "^| 7b" $OUT/before.log)
timeout 130 python -m bench.train_throughput $LEAN --profile-kernels 30 --out $OUT/after.jsonl > $OUT/after.log 2>&1; echo "after exit $?"; grep "^| 7b" $OUT/after.log; tail -3 $OUT/after.log | grep -i error
