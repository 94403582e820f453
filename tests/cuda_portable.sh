#!/usr/bin/env bash
# A CUDA build must start and run on the CPU where no CUDA library or driver is present: it links
# no CUDA library dynamically (cudart is static; cuBLAS, cuBLASLt and cuDNN are opened with
# dlopen), generates on the CPU, and, without a usable GPU, answers --device cuda with one
# `error:` line naming the reason and exit code 2. Use: cuda_portable.sh ZIMAGE_BINARY TINY_MODEL
set -uo pipefail
bin=$1 model=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail=0
if libs=$(ldd "$bin" | grep -E 'libcublas|libcudart|libcudnn|libcuda\.so'); then
  echo "FAIL: $bin links CUDA libraries dynamically:"; echo "$libs"; fail=1
fi
if ! "$bin" generate -q --model "$model" -p "a fox" -W 64 -H 64 --steps 1 --seed 1 --device cpu -o "$tmp/cpu.png"; then
  echo "FAIL: generate --device cpu failed"; fail=1
elif [ ! -s "$tmp/cpu.png" ]; then
  echo "FAIL: generate --device cpu wrote no image"; fail=1
fi
if [ ! -e /dev/nvidia0 ]; then  # no GPU here: the request must fail cleanly, naming why
  "$bin" generate -q --model "$model" -p "a fox" -W 64 -H 64 --steps 1 --device cuda -o "$tmp/gpu.png" 2> "$tmp/err"
  rc=$?
  if [ $rc != 2 ]; then echo "FAIL: --device cuda without a GPU exited $rc, expected 2"; fail=1; fi
  if [ "$(wc -l < "$tmp/err")" != 1 ] || ! grep -q '^error: --device cuda: no usable CUDA GPU: .\+' "$tmp/err"; then
    echo "FAIL: expected one 'error: --device cuda: no usable CUDA GPU: <reason>' line, got:"; cat "$tmp/err"; fail=1
  fi
  [ -e "$tmp/gpu.png" ] && { echo "FAIL: an image was written"; fail=1; }
  echo "without a GPU: $(cat "$tmp/err")"
fi
[ $fail = 0 ] && echo "cuda build portable: ok"
exit $fail
