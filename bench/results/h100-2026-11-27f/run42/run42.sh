# call 42: every GPU test of bench/run_side_by_side.sh, then 65B side by side with the reference
set -u
pip install --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:.
mkdir -p ../shared/models ../shared/data/instruct && cp -r .carry/stories260K ../shared/models/ && cp .carry/alpaca_en_demo.json ../shared/data/instruct/
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
REFERENCE=.carry/shared/reference_stack.py OUT=$OUT ROWS="tests t65b" bash bench/run_side_by_side.sh
