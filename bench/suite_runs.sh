#!/usr/bin/env bash
# Runs what CI runs (`CI=true bash .ci/run`, no stdin) N times in a row, each from a fresh clone
# of this repository's HEAD, and prints one line per run (commit, exit code, wall time, pytest's
# closing line) and the run's slowest tests; stops at the first failing run.
#
#   bash bench/suite_runs.sh 5 /tmp/suite_runs    # N, and where the clones and logs go
set -u
N=${1:-5}
OUT=${2:-/tmp/suite_runs}
REPO=$(cd "$(dirname "$0")/.." && pwd)
REV=$(git -C "$REPO" rev-parse HEAD)
mkdir -p "$OUT"
echo "# $(date -u '+%Y-%m-%d %H:%M UTC'); $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for i in $(seq 1 "$N"); do
  clone="$OUT/clone$i"
  rm -rf "$clone" && git clone -q "$REPO" "$clone" && git -C "$clone" checkout -q "$REV"
  start=$(date +%s)
  (cd "$clone" && CI=true bash .ci/run 0<&- > "$OUT/log$i.txt" 2>&1)
  rc=$?
  wall=$(( $(date +%s) - start ))
  echo "run $i: $(git -C "$clone" rev-parse --short HEAD) rc=$rc wall=${wall}s (install included)" \
       "| $(grep -E '^[0-9]+ (passed|failed)' "$OUT/log$i.txt" | tail -1)"
  rm -rf "$clone"
  [ "$rc" -eq 0 ] || { echo "run $i failed: $OUT/log$i.txt"; break; }
done
echo "# slowest tests of the last run"
sed -n '/slowest 25 durations/,/^[0-9]* passed/p' "$OUT/log$i.txt" | sed '1d;$d' | head -12
