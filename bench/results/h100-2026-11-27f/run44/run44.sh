# call 44: policy change (hashed mask only under capture): GPU tests touched; eager 7B; 7B side by side again
set -u
pip install --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:.
mkdir -p ../shared/models ../shared/data/instruct && cp -r .carry/stories260K ../shared/models/ && cp .carry/alpaca_en_demo.json ../shared/data/instruct/
timeout 150 python -m pytest -q -p no:cacheprovider tests/train/test_cuda_graph.py tests/test_lora_matmul.py tests/test_ops.py tests/kernels/test_hashed_dropout.py tests/test_lora.py tests/train/test_loop.py 2>&1 | tail -3
REFERENCE=.carry/shared/reference_stack.py OUT=$OUT ROWS="t7b_eager t7b" bash bench/run_side_by_side.sh
