# Source this first in every command on the GPU machine (carry .whl): installs the wheels the GPU
# image lacks (transformer-lens and its needs, liger-kernel) into /tmp/site and the project editable.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . || return 1
