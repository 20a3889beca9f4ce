#!/usr/bin/env bash
# How long `make install` takes with pip and with uv: the same pinned set (constraints.txt) into two fresh
# virtualenvs, side by side, each ROUNDS times (default 2: the first round may fill a cold cache; the
# median of the later ones is what a second clone on the same machine waits).
#
#     bash bench/install_time.sh            # from the project root
#     ROUNDS=3 bash bench/install_time.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
ROUNDS=${ROUNDS:-2}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

timed() {  # the command: prints its wall seconds
  local start=$EPOCHREALTIME
  "$@" >/dev/null 2>&1
  awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { print b - a }'
}

pip_install() {
  rm -rf "$scratch/pip" && $PYTHON -m venv "$scratch/pip"
  "$scratch/pip/bin/python" -m pip install --quiet -c constraints.txt -e ".[serve,dev]"
}
uv_install() {
  rm -rf "$scratch/uv" && $PYTHON -m venv "$scratch/uv"
  "$scratch/uv/bin/python" -m pip install --quiet -c constraints.txt uv
  "$scratch/uv/bin/uv" pip install --quiet --python "$scratch/uv/bin/python" -c constraints.txt -e ".[serve,dev]"
}

printf '%-6s %-5s %8s\n' round tool seconds
for round in $(seq 1 "$ROUNDS"); do
  for tool in pip uv; do
    printf '%-6s %-5s %8.1f\n' "$round" "$tool" "$(timed "${tool}_install")"
  done
done
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores;" \
     "$($PYTHON --version); pip $($PYTHON -m pip --version | cut -d' ' -f2); uv $(grep '^uv==' constraints.txt | cut -d= -f3)"
