# call 46: final code: 7B and 65B side by side with the reference; eager 7B before (pre-session copy) and after, same lease
set -u
pip install --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:.
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
REFERENCE=.carry/shared/reference_stack.py OUT=$OUT ROWS="t7b t65b t7b_eager" bash bench/run_side_by_side.sh
(cd .carry/before && timeout 60 python -m bench.train_throughput --workloads 7b:qlora:4x512 --steps 10 --warmup 3 --step-in-backward --offload-checkpoints --out $OUT/before_eager.jsonl > $OUT/before_eager.log 2>&1; echo "== before eager exit $?"; grep "^| 7b" $OUT/before_eager.log)
