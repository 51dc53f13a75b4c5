# call 47: review fixes: every GPU test of bench/run_side_by_side.sh; 7B side by side
set -u
pip install --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:.
mkdir -p ../shared/models ../shared/data/instruct && cp -r .carry/stories260K ../shared/models/ && cp .carry/alpaca_en_demo.json ../shared/data/instruct/
REFERENCE=.carry/shared/reference_stack.py OUT=$OUT ROWS="tests t7b" bash bench/run_side_by_side.sh
