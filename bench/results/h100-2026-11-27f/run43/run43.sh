# call 43: the rewritten GPU test; eager 7B, 7B with the optimizer after backward, 8B x 8192 side by side
set -u
pip install --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:.
mkdir -p ../shared/models ../shared/data/instruct && cp -r .carry/stories260K ../shared/models/ && cp .carry/alpaca_en_demo.json ../shared/data/instruct/
timeout 60 python -m pytest -q -p no:cacheprovider tests/test_lora_matmul.py tests/kernels/test_hashed_dropout.py -k "producer_rows or split_reduction" 2>&1 | tail -2
REFERENCE=.carry/shared/reference_stack.py OUT=$OUT ROWS="t7b_eager t7b_plain t8b" bash bench/run_side_by_side.sh
(cd .carry/before && timeout 60 python -m bench.train_throughput --workloads 7b:qlora:4x512 --steps 10 --warmup 3 --step-in-backward --offload-checkpoints --out $OUT/before_eager.jsonl > $OUT/before_eager.log 2>&1; echo "before eager exit $?"; grep "^| 7b" $OUT/before_eager.log)
