#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (in build-fuzz) and fuzzes each for a set time.
#   fuzz/run.sh [SECONDS] [TARGET...]     default: 600 s each, all targets, one after another
#   PARALLEL=2 fuzz/run.sh 600            two targets at a time
#   fuzz/run.sh --merge [TARGET...]       fold the new coverage found into fuzz/corpus/<target>/
# Inputs found go to build-fuzz/fuzz-work/<target>/ (not committed), crashes to
# build-fuzz/fuzz-artifacts/<target>/, logs to build-fuzz/fuzz-logs/<target>.log; the
# committed corpus fuzz/corpus/<target>/ seeds every run and is replayed by ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
ALL=(safetensors index config tokenizer_json tokenize layout lora gguf http_request)
B=build-fuzz

max_len() {
  case "$1" in
    safetensors) echo 4096 ;; index) echo 2048 ;; config) echo 2048 ;;
    tokenizer_json) echo 16384 ;; tokenize) echo 1024 ;; layout) echo 4096 ;; lora) echo 4096 ;; gguf) echo 4096 ;; http_request) echo 4096 ;;
  esac
}

build() {
  if ! command -v clang++ >/dev/null; then
    echo "fuzz: clang++ is needed (Debian: apt-get install clang)" >&2
    exit 1
  fi
  CC=clang CXX=clang++ cmake -S . -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DZIMAGE_FUZZ=ON \
    -DZIMAGE_TESTS=OFF -DZIMAGE_BENCH=OFF >/dev/null
  local targets=()
  for t in "$@"; do targets+=("fuzz_$t"); done
  cmake --build "$B" -j"$(nproc)" --target "${targets[@]}"
}

if [ "${1:-}" = "--merge" ]; then
  shift
  targets=("${@:-${ALL[@]}}")
  [ $# -gt 0 ] || targets=("${ALL[@]}")
  build "${targets[@]}"
  for t in "${targets[@]}"; do
    [ -d "$B/fuzz-work/$t" ] || continue
    "$B/fuzz/fuzz_$t" -merge=1 -max_len="$(max_len "$t")" "fuzz/corpus/$t" "$B/fuzz-work/$t" 2>&1 | tail -1
  done
  du -sh fuzz/corpus
  exit 0
fi

secs="${1:-600}"
[ $# -gt 0 ] && shift
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${ALL[@]}")
build "${targets[@]}"
mkdir -p "$B/fuzz-logs"

run_one() {
  local t="$1"
  mkdir -p "$B/fuzz-work/$t" "$B/fuzz-artifacts/$t"
  echo "fuzz: $t for $secs s"
  if "$B/fuzz/fuzz_$t" -max_total_time="$secs" -max_len="$(max_len "$t")" -timeout=20 -rss_limit_mb=2560 \
      -print_final_stats=1 -artifact_prefix="$B/fuzz-artifacts/$t/" "$B/fuzz-work/$t" "fuzz/corpus/$t" \
      >"$B/fuzz-logs/$t.log" 2>&1; then
    echo "fuzz: $t clean: $(grep -E 'stat::number_of_executed_units' "$B/fuzz-logs/$t.log" | awk '{print $2}') executions," \
      "$(grep -E '^#[0-9]+[[:space:]]+DONE' "$B/fuzz-logs/$t.log" | grep -oE 'cov: [0-9]+ ft: [0-9]+')"
  else
    echo "fuzz: $t FOUND A PROBLEM: see $B/fuzz-logs/$t.log and $B/fuzz-artifacts/$t/" >&2
    return 1
  fi
}
export -f run_one max_len
export B secs
printf '%s\n' "${targets[@]}" | xargs -P "${PARALLEL:-1}" -I{} bash -c 'run_one {}'
