#!/usr/bin/env bash
# The GPU recipe, run for real: `make train`'s three families with the gpu profile on a machine
# that has a GPU, torch and Lightning but no network and no MLflow. One command, under 8 minutes.
#
#   bash bench/gpu_check.sh prepare        # here, with network: .gpu-carry/ = data tarball + MLflow wheels
#   bash bench/gpu_check.sh                # there: unpack, install the wheels to /tmp, train, print the table
#   bash bench/gpu_check.sh cpu-smoke      # here: the same path on the CPU, 1 epoch of each family
#
# With the device tool: run(command="bash bench/gpu_check.sh", carry=[".gpu-carry"], timeout_s=540).
# It prints bench/train_budget.py's table (epochs, minutes, s/epoch, val and test accuracy, per-class
# test accuracy, precision, GPU memory peak) and the device name and versions.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-gpu}
carry=.gpu-carry
py=${PYTHON:-python3}
data_src=${DATA:-../shared/data/cifar4/train}

if [ "$mode" = prepare ]; then
  mkdir -p "$carry/wheels"
  tar czf "$carry/cifar4-train.tar.gz" -C "$(dirname "$data_src")" "$(basename "$data_src")"
  # MLflow and what it needs, for CPython 3.12 on x86-64, minus what the GPU image already has.
  "$py" -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$carry/wheels" "mlflow==3.17.2"
  # Packages the GPU image has (device KINDS.md, read 2026-11-17): their wheels stay behind.
  have="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cycler cython filelock flatbuffers fonttools frozenlist fsspec grpcio h11 h5py httpcore httpx idna imageio iniconfig jinja2 joblib kiwisolver lightning lightning-utilities markdown markdown-it-py markupsafe matplotlib mdurl ml-dtypes mpmath msgpack multidict narwhals networkx numpy onnx onnx-ir onnxruntime onnxscript packaging pandas pillow pip pluggy prometheus-client propcache protobuf psutil pyarrow pygments pyparsing python-dateutil pytorch-lightning pyyaml regex requests rich scikit-learn scipy setuptools six sympy threadpoolctl torch torchmetrics torchvision tqdm typing-extensions typing-inspect urllib3 uvloop werkzeug wheel wrapt yarl zipp"
  for wheel in "$carry"/wheels/*.whl; do
    name=$(basename "$wheel" | cut -d- -f1 | tr 'A-Z_.' 'a-z--')
    if [[ " $have " == *" $name "* ]]; then rm "$wheel"; fi
  done
  du -sh "$carry" "$carry"/*
  exit 0
fi

work=$(mktemp -d /tmp/gpu-check.XXXXXX)
if [ "$mode" = cpu-smoke ]; then
  data=$data_src
  profile=cpu
  extra=(--epochs 1)
else
  if [ ! -f "$carry/cifar4-train.tar.gz" ]; then
    echo "error: $carry/cifar4-train.tar.gz is missing: run 'bash bench/gpu_check.sh prepare' first." >&2
    exit 2
  fi
  tar xzf "$carry/cifar4-train.tar.gz" -C "$work"
  data=$work/$(basename "$data_src")
  profile=gpu
  extra=()
fi
if ! "$py" -c "import mlflow" 2>/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" "$carry"/wheels/*.whl
  export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$py" bench/train_budget.py --data "$data" --profile "$profile" --home "$work/project" --markdown "${extra[@]}"
