#!/usr/bin/env bash
# The thread trap of issue 15: the bundled tiny model at 256x256 (8 steps) with the default
# thread count, timed idle and under a concurrent CPU load of 2 busy-looping processes.
# Prints min / median / max wall seconds of each and the ratio of the medians (target: <= 2.5;
# a fair share of 2 cores alone makes it 2). Usage:
#   bench/oversubscription.sh [BINARY] [RUNS]        (default build/zimage, 7 runs)
# Extra environment: ZIMAGE_BENCH_ARGS (appended to the generate command line),
# BUSY (number of busy loops, default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-build/zimage}
RUNS=${2:-7}
BUSY=${BUSY:-2}
OUT=$(mktemp -d)
trap 'kill ${LOAD_PIDS:-} 2>/dev/null || true; rm -rf "$OUT"' EXIT

run_once() {
  local t0 t1
  t0=$(date +%s.%N)
  "$BIN" generate -p "a red fox in fresh snow" -W 256 -H 256 --seed 1 -q -o "$OUT/x.png" ${ZIMAGE_BENCH_ARGS:-}
  t1=$(date +%s.%N)
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f\n", b - a }'
}

stats() {  # min median max of the numbers on stdin
  sort -g | awk '{a[NR]=$1} END {m = (NR % 2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2;
                 printf "%.3f %.3f %.3f\n", a[1], m, a[NR]}'
}

series() {
  run_once >/dev/null  # warm-up (page cache)
  for _ in $(seq "$RUNS"); do run_once; done | stats
}

echo "machine: $(nproc) cores, $(uname -m), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "binary: $BIN ($("$BIN" --version | head -1)), runs: $RUNS"
read -r imin imed imax < <(series)
printf "idle:            min %s  median %s  max %s s\n" "$imin" "$imed" "$imax"
LOAD_PIDS=""
for _ in $(seq "$BUSY"); do
  sh -c 'while :; do :; done' &
  LOAD_PIDS="$LOAD_PIDS $!"
done
read -r lmin lmed lmax < <(series)
kill $LOAD_PIDS 2>/dev/null || true
wait $LOAD_PIDS 2>/dev/null || true
LOAD_PIDS=""
printf "under %s busy:    min %s  median %s  max %s s\n" "$BUSY" "$lmin" "$lmed" "$lmax"
awk -v a="$lmed" -v b="$imed" 'BEGIN { printf "ratio of medians: %.2f\n", a / b }'
