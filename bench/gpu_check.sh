#!/usr/bin/env bash
# The GPU recipe, run for real: `make train`'s three families with the gpu profile on a machine
# that has a GPU, torch and Lightning but no network and no MLflow. One command, under 8 minutes.
#
#   bash bench/gpu_check.sh prepare           # here, with network: .gpu-carry/ = data tarball + MLflow wheels,
#                                             #   .gpu-carry-photos/ = photos-train, outliers-train, photos-dev, other-dev
#   bash bench/gpu_check.sh gpu [FOLDER]      # there: unpack, install the wheels to /tmp, train, print the table
#   bash bench/gpu_check.sh stash             # there: keep .gpu-carry-photos in .gpu-stash/ for the next call
#   bash bench/gpu_check.sh cpu-smoke FOLDER  # here: the same path on the CPU, 1 epoch of each family
#
# With the device tool: run(command='bash bench/gpu_check.sh gpu "$OUT"', carry=[".gpu-carry"], timeout_s=540).
#
# PHOTOS=1 trains `make train`'s README recipe instead: CIFAR-4 + photos-train with outliers-train, photos-dev
# and other-dev scored. The two carries together are over the tool's 64 MiB, so it takes two calls in a row
# while the machine is warm (it keeps ignored folders between calls, not after it goes back):
#   run(command='bash bench/gpu_check.sh stash', carry=[".gpu-carry-photos"], timeout_s=60)
#   run(command='PHOTOS=1 SEEDS=42 bash bench/gpu_check.sh gpu "$OUT"', carry=[".gpu-carry"], timeout_s=540)
# SEEDS=42,1,2 trains every family once per seed; MODELS=resnet,vgg picks families.
# It prints bench/train_budget.py's table (epochs, minutes, s/epoch, val and test accuracy, per-class
# test accuracy, precision, GPU memory peak) and the device name and versions, and keeps its evidence in
# FOLDER (default: $OUT, else gpu-check-out/): gpu_check.log (everything it printed), table.json and
# mlflow.db (every run, its params, metrics and curves; the artifacts stay behind). Telemetry is off:
# nothing reaches for the network.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-gpu}
carry=.gpu-carry
photos=.gpu-carry-photos
stash=.gpu-stash
photo_sets=(photos-train outliers-train photos-dev other-dev)
photo_src=${PHOTO_DATA:-../shared/data}
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true BENTOML_DO_NOT_TRACK=true
py=${PYTHON:-python3}
data_src=${DATA:-../shared/data/cifar4/train}

if [ "$mode" = prepare ]; then
  mkdir -p "$carry/wheels"
  tar czf "$carry/cifar4-train.tar.gz" -C "$(dirname "$data_src")" "$(basename "$data_src")"
  # MLflow and what it needs, for CPython 3.12 on x86-64, at the versions constraints.txt pins, minus what
  # the GPU image already has.
  "$py" -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -c constraints.txt -d "$carry/wheels" mlflow
  # Packages the GPU image has (device KINDS.md, read 2026-11-17): their wheels stay behind.
  have="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cycler cython filelock flatbuffers fonttools frozenlist fsspec grpcio h11 h5py httpcore httpx idna imageio iniconfig jinja2 joblib kiwisolver lightning lightning-utilities markdown markdown-it-py markupsafe matplotlib mdurl ml-dtypes mpmath msgpack multidict narwhals networkx numpy onnx onnx-ir onnxruntime onnxscript packaging pandas pillow pip pluggy prometheus-client propcache protobuf psutil pyarrow pygments pyparsing python-dateutil pytorch-lightning pyyaml regex requests rich scikit-learn scipy setuptools six sympy threadpoolctl torch torchmetrics torchvision tqdm typing-extensions typing-inspect urllib3 uvloop werkzeug wheel wrapt yarl zipp"
  for wheel in "$carry"/wheels/*.whl; do
    name=$(basename "$wheel" | cut -d- -f1 | tr 'A-Z_.' 'a-z--')
    if [[ " $have " == *" $name "* ]]; then rm "$wheel"; fi
  done
  mkdir -p "$photos"
  for set in "${photo_sets[@]}"; do tar czf "$photos/$set.tar.gz" -C "$photo_src" "$set"; done
  du -sh "$carry" "$carry"/* "$photos" "$photos"/*
  exit 0
fi
if [ "$mode" = stash ]; then
  mkdir -p "$stash"
  for set in "${photo_sets[@]}"; do
    test -s "$photos/$set.tar.gz" || { echo "error: $photos/$set.tar.gz is missing: carry .gpu-carry-photos." >&2; exit 2; }
    cp "$photos/$set.tar.gz" "$stash/"
  done
  du -sh "$stash"/*
  exit 0
fi

case "$mode" in gpu|cpu-smoke) ;; *) echo "error: mode $mode: use prepare, stash, gpu or cpu-smoke." >&2; exit 2;; esac
out=${2:-${OUT:-gpu-check-out}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
exec > >(tee "$out/gpu_check.log") 2>&1
work=$(mktemp -d /tmp/gpu-check.XXXXXX)
# mlflow.db goes to the evidence folder however the run ends: a failed family still leaves its runs.
trap 'cp -f "$work/project/mlflow.db" "$out/mlflow.db" 2>/dev/null || true' EXIT
echo "gpu_check.sh $mode: $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
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
if [ "${PHOTOS:-0}" = 1 ]; then
  folder=$(cd "$photo_src" && pwd)
  if [ "$mode" = gpu ]; then
    folder=$work
    for set in "${photo_sets[@]}"; do
      archive=$stash/$set.tar.gz
      [ -f "$archive" ] || archive=$photos/$set.tar.gz
      [ -f "$archive" ] || { echo "error: $set.tar.gz is in neither $stash nor $photos: run 'bash bench/gpu_check.sh stash' with .gpu-carry-photos carried first." >&2; exit 2; }
      tar xzf "$archive" -C "$work"
    done
  fi
  data=$data,$folder/photos-train
  extra+=(--outliers "$folder/outliers-train" --set "evaluation.folders.photos-dev=$folder/photos-dev"
          --set "evaluation.folders.other-dev=$folder/other-dev")
fi
if [ -n "${SEEDS:-}" ]; then extra+=(--seeds "$SEEDS"); fi
if [ -n "${MODELS:-}" ]; then extra+=(--models "$MODELS"); fi
if ! "$py" -c "import mlflow" 2>/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" "$carry"/wheels/*.whl
  export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$py" bench/train_budget.py --data "$data" --profile "$profile" --home "$work/project" --markdown \
  --json "$out/table.json" "${extra[@]}"
echo "evidence in $out: $(cd "$out" && ls | tr '\n' ' ')"
