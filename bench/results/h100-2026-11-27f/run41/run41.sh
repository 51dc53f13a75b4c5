# call 41: tuned hashed dropout: affected GPU tests; 7B side by side with the reference (bench/run_side_by_side.sh t7b)
set -u
pip install --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:.
mkdir -p ../shared/models ../shared/data/instruct && cp -r .carry/stories260K ../shared/models/ && cp .carry/alpaca_en_demo.json ../shared/data/instruct/
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch, triton, transformers, peft, bitsandbytes; print(torch.__version__, triton.__version__, transformers.__version__, peft.__version__, bitsandbytes.__version__)" 2>&1 | tail -1
timeout 150 python -m pytest -q -p no:cacheprovider tests/kernels/test_hashed_dropout.py tests/kernels/test_masked_lowrank.py tests/kernels/test_gradcheck.py tests/test_lora.py tests/train/test_cuda_graph.py 2>&1 | tail -4
REFERENCE=.carry/shared/reference_stack.py OUT=$OUT ROWS="t7b" bash bench/run_side_by_side.sh
timeout 60 python -m bench.hashed_dropout --tokens 2048 512 --out $OUT/hashed_dropout.json > $OUT/hashed_dropout.log 2>&1; echo "micro exit $?"
