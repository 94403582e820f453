#!/usr/bin/env bash
# The layering rules of ARCHITECTURE.md, checked on the sources (a CTest test and part of CI):
# each directory of src/ may include only the layers below it, and only backends/ touches CUDA,
# cuBLAS, cuDNN or a BLAS library. Prints every violation and fails when there is one.
set -uo pipefail
SRC=${1:-$(dirname "$0")/../src}
cd "$SRC" || exit 2
fail=0
# layer: the directories its files may include (besides its own)
declare -A allowed=(
  [core]="core"
  [text]="core"
  [scheduler]="core"
  [backends]="core backends"
  [ops]="core backends"
  [io]="core backends io"
  [models]="core ops io models"
  [pipeline]="core ops io text scheduler models pipeline backends"
  [tools]="core ops io text scheduler models pipeline tools"
  [cli]="core io text scheduler models pipeline tools cli backends"
)
for layer in "${!allowed[@]}"; do
  [ -d "$layer" ] || continue
  while IFS= read -r line; do
    file=${line%%:*}
    inc=$(sed -E 's/.*#include "([^"]+)".*/\1/' <<<"${line#*:}")
    dir=${inc%%/*}
    [ "$dir" = "$inc" ] && continue  # same-directory include
    ok=0
    [ "$dir" = "$layer" ] && ok=1
    # core's Tensor allocates and copies through the device runtime: its one view of backends/.
    [ "$layer" = core ] && [ "$inc" = backends/device.h ] && ok=1
    for a in ${allowed[$layer]}; do [ "$a" = "$dir" ] && ok=1; done
    if [ $ok = 0 ]; then echo "layer violation: $file includes \"$inc\" ($layer may include: ${allowed[$layer]})"; fail=1; fi
    # Above the backends, only the device runtime (backends/device.h) is visible.
    if [ "$dir" = backends ] && [ "$layer" != backends ] && [ "$layer" != ops ] && [ "$inc" != backends/device.h ]; then
      echo "layer violation: $file includes \"$inc\" (only backends/device.h is visible above the backends)"; fail=1
    fi
  done < <(grep -rnE '^\s*#\s*include\s+"' "$layer" --include='*.cpp' --include='*.h' --include='*.cu' --include='*.cuh' | sed -E 's/^([^:]+):[0-9]+:/\1:/')
done
# No CUDA, cuDNN or BLAS calls outside the backends (ops.cpp dispatches to cuda:: and cpu::).
if out=$(grep -rnE '\bcuda::|\bcuda[A-Z][A-Za-z]+\(|\bcublas|\bcudnn|\bcblas_|#include <(cuda|cublas|cudnn|cblas)' \
           core text scheduler io models pipeline cli tools 2>/dev/null | grep -v '^\S*:[0-9]*:\s*//'); then
  echo "$out" | sed 's/^/backend call outside backends\/: /'
  fail=1
fi
[ $fail = 0 ] && echo "layers ok"
exit $fail
