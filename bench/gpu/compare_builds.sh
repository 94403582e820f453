#!/usr/bin/env bash
# Issue 12's acceptance run, in one GPU-machine call: the GPU tests of the new build, then the
# 1024² image (8 steps, 2 images a process; the second, warm image's compute times count, as in
# run_all.sh) with the OLD build (main at f56d15d, before the device-boundary refactor) and the
# NEW one, alternating old/new ROUNDS times on the same random real-size model, and one table.
#
# Here first (the GPU-less machine):
#   bench/gpu/compare_builds.sh pack       # packs the new binaries (BUILD_DIR, default build/) into
#                                          # .carry/zimage-bin.tar.xz and f56d15d's source into
#                                          # .carry/zimage-old-src.tar.xz (the old build is then made
#                                          # on the GPU machine, -j16, a few minutes of device time)
#   bench/gpu/compare_builds.sh pack-old   # the same, and builds the old binaries here instead
# then on the GPU machine:  bench/gpu/compare_builds.sh [ROUNDS]   (default 2; logs in $OUT)
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
export ZIMAGE_MODEL=${ZIMAGE_MODEL:-$ROOT/models/tiny-zimage}  # make-random-model copies the bundled tokenizer
cd "$ROOT"
OLD_REV=${OLD_REV:-f56d15d}

if [ "${1:-}" = pack ] || [ "${1:-}" = pack-old ]; then
  set -e
  mkdir -p .carry
  git archive --format=tar "$OLD_REV" -- src CMakeLists.txt bench | xz -T2 > .carry/zimage-old-src.tar.xz
  BUILD_DIR=${BUILD_DIR:-build} bench/gpu/pack_carry.sh  # the new binaries: .carry/zimage-bin.tar.xz
  if [ "$1" = pack-old ]; then  # the old binaries too, built here (a full CUDA build: slow on 2 cores)
    rm -rf build-old-src && mkdir -p build-old-src && tar -C build-old-src -xJf .carry/zimage-old-src.tar.xz
    cmake -S build-old-src -B build-old-src/build-cuda -G Ninja -DZIMAGE_CUDA=ON -DZIMAGE_TESTS=OFF -DZIMAGE_BENCH=OFF \
      -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache
    ninja -C build-old-src/build-cuda -j"${JOBS:-2}" zimage
    stage=$(mktemp -d) && mkdir -p "$stage/bin" "$stage/lib" && cp build-old-src/build-cuda/zimage "$stage/bin/"
    tar -xJf .carry/zimage-bin.tar.xz -C "$stage" lib  # the same host libraries as the new build
    tar -C "$stage" -cJf .carry/zimage-bin-old.tar.xz bin lib && rm -rf "$stage"
  else
    rm -f .carry/zimage-bin-old.tar.xz  # built on the GPU machine from the source archive
  fi
  ls -la .carry
  exit 0
fi

ROUNDS=${1:-2}
OUT=${OUT:-/tmp/zi-out}
mkdir -p "$OUT"
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }

# Libraries as run_all.sh finds them (toolkit or PyTorch's wheels).
source "$(dirname "$0")/lib.sh"

# unpack_or_build NAME TARBALL SRC_DIR: binaries into /tmp/zi-NAME/{bin,lib}
unpack_or_build() {
  local name=$1 tarball=$2 src=$3 dst=/tmp/zi-$1
  rm -rf "$dst" && mkdir -p "$dst/bin" "$dst/lib"
  if [ -f "$tarball" ]; then
    tar -C "$dst" -xJf "$tarball"
  else
    local targets="zimage zimage_gpu_tests" tests=ON
    [ "$name" = old ] && targets=zimage tests=OFF  # the old tree is carried without its tests
    cmake -S "$src" -B "$src/build-gpu" -G Ninja -DZIMAGE_CUDA=ON -DZIMAGE_BENCH=OFF -DZIMAGE_TESTS=$tests \
      -DCMAKE_BUILD_TYPE=Release > "$OUT/build_$name.log" 2>&1 &&
      ninja -C "$src/build-gpu" -j16 $targets >> "$OUT/build_$name.log" 2>&1 ||
      { tail -30 "$OUT/build_$name.log"; exit 1; }
    for t in $targets; do cp "$src/build-gpu/$t" "$dst/bin/"; done
    cp /tmp/zi-new/lib/* "$dst/lib/" 2>/dev/null || true
  fi
}
unpack_or_build new .carry/zimage-bin.tar.xz "$ROOT"
if [ ! -f .carry/zimage-bin-old.tar.xz ]; then
  rm -rf /tmp/zi-old-src && mkdir -p /tmp/zi-old-src && tar -C /tmp/zi-old-src -xJf .carry/zimage-old-src.tar.xz
fi
unpack_or_build old .carry/zimage-bin-old.tar.xz /tmp/zi-old-src
run() { local b=$1; shift; LD_LIBRARY_PATH="/tmp/zi-$b/lib:$LD_LIBRARY_PATH" "/tmp/zi-$b/bin/$1" "${@:2}"; }
stamp "binaries ready"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
for b in old new; do echo "$b: $(ldd "/tmp/zi-$b/bin/zimage" 2>/dev/null | grep -cE 'cublas|cudart') cuBLAS/cudart libraries linked"; done

# The GPU suite of the new build (ctest -L gpu runs this executable).
ZI_TEST_DATA_DIR=$ROOT/tests/data ZI_TINY_MODEL_DIR=$ROOT/models/tiny-zimage \
  run new zimage_gpu_tests --gtest_color=no > "$OUT/gpu_tests_new.log" 2>&1
echo "new gpu tests rc=$?" | tee -a "$OUT/gpu_tests_new.log"
grep -E "^\[  (PASSED|FAILED)|FAILED" "$OUT/gpu_tests_new.log" | head -30
stamp "tests done"

M=/tmp/zrm
[ -d "$M" ] || run new zimage make-random-model --preset turbo --dtype bf16 -q "$M" > "$OUT/make_model.log" 2>&1
stamp "random model ready"
PROMPT="A cinematic photo of a red fox standing in fresh snow at dawn, soft light, highly detailed fur, 85mm lens"
export ZIMAGE_CACHE_DIR=off  # both builds measure their own kernel choices
for r in $(seq 1 "$ROUNDS"); do
  for b in old new; do
    run $b zimage generate --model "$M" -p "$PROMPT" -W 1024 -H 1024 --steps 8 --seed 1 --count 2 --device cuda \
      -o "$OUT/cmp_$b.png" > "$OUT/cmp_${b}_$r.log" 2>&1
    echo "rc=$?" >> "$OUT/cmp_${b}_$r.log"
    stamp "$b round $r done"
  done
done

python3 - "$OUT" "$ROUNDS" <<'PY'
import re, sys, statistics
out, rounds = sys.argv[1], int(sys.argv[2])
def times(path):
    log = open(path).read()
    ph = {}
    for m in re.finditer(r"^\s+(encode|denoise|decode)\s+([\d.]+) s\s+\(load ([\d.]+) s, compute ([\d.]+) s", log, re.M):
        ph[m.group(1)] = float(m.group(4))  # the last (warm) image's
    ok = "rc=0" in log
    return (dict(ph, total=sum(ph.values())) if len(ph) == 3 else None), ok
rows = {}
for b in ("old", "new"):
    rows[b] = [times(f"{out}/cmp_{b}_{r}.log") for r in range(1, rounds + 1)]
print("\n| build | round | rc ok | total s | encode s | denoise s | decode s |")
print("|---|---|---|---|---|---|---|")
for b in ("old", "new"):
    for i, (t, ok) in enumerate(rows[b], 1):
        if t: print(f"| {b} | {i} | {ok} | {t['total']:.3f} | {t['encode']:.3f} | {t['denoise']:.3f} | {t['decode']:.3f} |")
        else: print(f"| {b} | {i} | {ok} | (no times: see cmp_{b}_{i}.log) | | | |")
med = {b: statistics.median([t["total"] for t, _ in rows[b] if t] or [float("nan")]) for b in rows}
print(f"\nmedian total: old {med['old']:.3f} s, new {med['new']:.3f} s, new/old = {med['new'] / med['old']:.4f} "
      f"(issue 12 asks for within 2 %)")
PY
cmp -s "$OUT/cmp_old.png" "$OUT/cmp_new.png" && echo "images: identical" || echo "images: differ (see $OUT/cmp_*.png)"
(cd "$OUT" && tar -czf logs.tgz ./*.log && rm -f ./*.log)
stamp "done"
