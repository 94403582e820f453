#!/usr/bin/env bash
# Builds the GPU binaries on this (GPU-less) machine and packs them, with the shared libraries
# the GPU machine's image may lack (OpenBLAS, libpng, PCRE2, utf8proc, their runtimes), into
# .carry/zimage-bin.tar.xz, which run_all.sh unpacks there. cuBLAS and cuDNN are not packed:
# the GPU machine has them (CUDA toolkit or PyTorch's wheels). Use: bench/gpu/pack_carry.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
B=${BUILD_DIR:-build-cuda}
[ -f "$B/CMakeCache.txt" ] || cmake -S . -B "$B" -G Ninja -DZIMAGE_CUDA=ON -DZIMAGE_BENCH=OFF -DCMAKE_BUILD_TYPE=Release
ninja -C "$B" -j"${JOBS:-2}" zimage zimage_gpu_tests bench_kernels bench_dit_batch bench_quant bench_prompts fp8_probe
stage=$(mktemp -d)
mkdir -p "$stage/bin" "$stage/lib" .carry
cp "$B/zimage" "$B/zimage_gpu_tests" "$B/bench/bench_kernels" "$B/bench/bench_dit_batch" "$B/bench/bench_quant" "$B/bench/bench_prompts" "$B/bench/fp8_probe" "$stage/bin/"
strip "$stage/bin/"* || true
for lib in $(ldd "$B/zimage" "$B/zimage_gpu_tests" | awk '/=>/ {print $3}' | sort -u); do
  case "$(basename "$lib")" in
    libc.so*|libm.so*|libdl.so*|libpthread.so*|librt.so*|ld-linux*|libcuda.so*|libcublas*|libcudnn*) ;;
    libstdc++.so*|libgcc_s.so*|libz.so*) ;;  # the GPU image has these, newer
    *) cp -L "$lib" "$stage/lib/" ;;
  esac
done
tar -C "$stage" -cJf .carry/zimage-bin.tar.xz bin lib
rm -rf "$stage"
ls -la .carry/zimage-bin.tar.xz
