# Sourced by the GPU-machine scripts (run_all.sh, serve_bench.sh, compare_builds.sh): the repo root,
# $OUT, a stamp helper, the CUDA libraries' folders (the toolkit or PyTorch's nvidia wheels) and
# the carried binaries. After sourcing: ROOT, OUT, ZIMAGE_MODEL, LD_LIBRARY_PATH are set;
# `gpu_unpack_bin` sets BIN (and ZLIB, the carried host libraries); `z CMD...` runs one of our
# binaries with ZLIB first on its library path (Python keeps the image's own libraries).
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export ZIMAGE_MODEL=${ZIMAGE_MODEL:-$ROOT/models/tiny-zimage}  # make-random-model copies the bundled tokenizer
cd "$ROOT"
OUT=${OUT:-/tmp/zi-out}
mkdir -p "$OUT"
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }

gpu_lib_dirs() {
  python3 - <<'PY' 2>/dev/null
import os, glob
dirs = set()
try:
    import nvidia
    for root in list(nvidia.__path__):
        for pat in ("**/libcublasLt.so*", "**/libcudnn.so*", "**/libcublas.so*"):
            dirs.update(os.path.dirname(f) for f in glob.glob(os.path.join(root, pat), recursive=True))
except Exception:
    pass
print(":".join(sorted(dirs)))
PY
}
export LD_LIBRARY_PATH="$(gpu_lib_dirs):/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"

ZLIB=""
z() { LD_LIBRARY_PATH="${ZLIB:+$ZLIB:}$LD_LIBRARY_PATH" "$@"; }

# gpu_unpack_bin [TARGETS...]: the carried binaries ($ZI_BIN_TAR, default .carry/zimage-bin.tar.xz
# from pack_carry.sh), else a build here (-j16) of TARGETS (default: zimage zimage_gpu_tests bench_kernels).
gpu_unpack_bin() {
  local tarball=${ZI_BIN_TAR:-.carry/zimage-bin.tar.xz}
  if [ -f "$tarball" ]; then
    rm -rf /tmp/zi && mkdir -p /tmp/zi && tar -C /tmp/zi -xJf "$tarball"
    BIN=/tmp/zi/bin; ZLIB=/tmp/zi/lib
  else
    local targets=${*:-zimage zimage_gpu_tests bench_kernels}
    cmake -S . -B build-gpu -G Ninja -DZIMAGE_CUDA=ON -DZIMAGE_BENCH=OFF -DCMAKE_BUILD_TYPE=Release > "$OUT/build.log" 2>&1 &&
      ninja -C build-gpu -j16 $targets >> "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
    BIN=$ROOT/build-gpu; cp build-gpu/bench/bench_kernels "$BIN/" 2>/dev/null
  fi
}

# need_random_model DIR: the real-size random checkpoint (turbo preset, bf16) at DIR unless it is there.
need_random_model() {
  [ -d "$1" ] || z "$BIN/zimage" make-random-model --preset turbo --dtype bf16 -q "$1" > "$OUT/make_model.log" 2>&1
}

# use_carried_diffusers: diffusers' src/ tree from .carry (the GPU image has torch, not diffusers),
# unpacked once, for bench_diffusers.py and oneshot_diffusers.py (DIFFUSERS_SRC).
use_carried_diffusers() {
  [ -f .carry/diffusers_src.tar.xz ] || return 0
  [ -d /tmp/diffusers/src ] || { mkdir -p /tmp/diffusers && tar -C /tmp/diffusers -xJf .carry/diffusers_src.tar.xz; }
  export DIFFUSERS_SRC=/tmp/diffusers/src
}

# run_bench_diffusers LOG TIMEOUT MODES...: bench_diffusers.py (the diffusers anchor) with those
# modes into $OUT/LOG, its exit status appended.
run_bench_diffusers() {
  local log=$1 limit=$2
  shift 2
  use_carried_diffusers
  PYTHONUNBUFFERED=1 timeout "$limit" python3 bench/gpu/bench_diffusers.py models/tiny-zimage/tokenizer "$@" > "$OUT/$log" 2>&1
  echo "rc=$?" >> "$OUT/$log"
}
