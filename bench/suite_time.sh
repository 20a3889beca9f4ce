#!/usr/bin/env bash
# The whole test suite of an older commit and of a newer one (default HEAD), interleaved (old, new, old, new, ...),
# in the same virtualenv, so that the machine's drift within a session falls on both alike. Prints each
# round's wall seconds, passed/skipped counts and the median ratio new/old.
#
#     bash bench/suite_time.sh 4ef92c4          # from the project root, after `make install`
#     ROUNDS=3 bash bench/suite_time.sh 4ef92c4 HEAD
#
# Each commit is checked out in a temporary git worktree and run with its own src/ first on PYTHONPATH
# (the editable install points at this tree), so the work tree can change while this runs. Install time is measured apart: bench/install_time.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=${1:?usage: bench/suite_time.sh OLD_COMMIT [NEW_COMMIT]}
NEW=${2:-HEAD}
ROUNDS=${ROUNDS:-2}
PY=$PWD/.venv/bin/python
test -x "$PY" || { echo "no .venv here: run make install first" >&2; exit 2; }
old_tree=$(mktemp -d) new_tree=$(mktemp -d) logs=$(mktemp -d)
trap 'for t in "$old_tree" "$new_tree"; do git worktree remove --force "$t" >/dev/null 2>&1 || rm -rf "$t"; done' EXIT
git worktree add --detach --force "$old_tree" "$OLD" >/dev/null 2>&1
git worktree add --detach --force "$new_tree" "$NEW" >/dev/null 2>&1

run_suite() {  # which round: prints seconds, passed, skipped
  local which=$1 round=$2 dir=$new_tree
  [ "$which" = old ] && dir=$old_tree
  local log=$logs/$which-$round.log start=$EPOCHREALTIME
  (cd "$dir" && PYTHONPATH=$dir/src "$PY" -m pytest -q -p no:cacheprovider >"$log" 2>&1) || true
  local secs; secs=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", b - a }')
  local summary; summary=$(tail -1 "$log")
  count() { grep -o "[0-9]* $1" <<<"$summary" | cut -d' ' -f1 || true; }  # empty when pytest did not print it
  local passed skipped failed
  passed=$(count passed) skipped=$(count skipped) failed=$(count failed)
  printf '%-6s %-4s %8s %7s %8s %7s\n' "$round" "$which" "$secs" "${passed:-0}" "${skipped:-0}" "${failed:-0}"
  echo "$which $secs" >>"$logs/times"
}

echo "old: $(git log -1 --format=%h "$OLD"); new: $(git log -1 --format=%h "$NEW")"
printf '%-6s %-4s %8s %7s %8s %7s\n' round tree seconds passed skipped failed
for round in $(seq 1 "$ROUNDS"); do
  run_suite old "$round"
  run_suite new "$round"
done
median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
mo=$(awk '$1 == "old" { print $2 }' "$logs/times" | median)
mn=$(awk '$1 == "new" { print $2 }' "$logs/times" | median)
awk -v o="$mo" -v n="$mn" 'BEGIN { printf "median: old %.0f s, new %.0f s, new/old %.2f\n", o, n, n / o }'
echo "logs: $logs"
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores;" \
     "$("$PY" --version); torch $("$PY" -c 'import torch; print(torch.__version__)')"
