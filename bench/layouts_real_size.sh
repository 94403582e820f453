#!/usr/bin/env bash
# Real-size check of single-file loading and convert (issue 16). Makes the real-size random
# model (bf16), converts its transformer to a ComfyUI-layout single file, loads that with
# --memory-report next to the diffusers folder (same run settings), converts it back to a
# diffusers folder and to a single file again, and checks both round trips byte for byte.
# Needs ~50 GB of disk and ~13 GB of RAM; run it alone:
#   flock /tmp/zimage-bigmem.lock bench/layouts_real_size.sh [WORKDIR]
set -euo pipefail
Z=${ZIMAGE:-build/zimage}
D=${1:-/tmp/zimage-layouts-real}
PY=${PYTHON:-python3}
mkdir -p "$D"
T="/usr/bin/time -f %e_s_%M_KiB"
if [ ! -f "$D/model/model_index.json" ]; then
  echo "== make-random-model turbo (bf16)"
  $Z make-random-model --preset turbo --dtype bf16 -q "$D/model"
fi
rm -rf "$D/comfy_dit.safetensors" "$D/back" "$D/again.safetensors"
echo "== convert folder -> ComfyUI single file (transformer): seconds, peak RSS"
$T $Z convert -q --to single-file --component transformer "$D/model" "$D/comfy_dit.safetensors"
$Z inspect "$D/comfy_dit.safetensors" | grep 'layout:'
echo "== load the transformer alone (bf16), twice each, interleaved: folder vs ComfyUI file"
g++ -std=c++20 -O2 -Isrc bench/layouts_load.cpp build/libzimage_core.a -o "$D/layouts_load" \
  $(pkg-config --libs openblas libpng libpcre2-8 libutf8proc) -fopenmp
for run in folder comfy folder comfy; do
  if [ $run = comfy ]; then "$D/layouts_load" "$D/model" "$D/comfy_dit.safetensors"; else "$D/layouts_load" "$D/model"; fi
done
# One whole run each (slow on a CPU: the 256² step dominates).
for run in folder comfy; do
  extra=()
  [ $run = comfy ] && extra=(--diffusion-model "$D/comfy_dit.safetensors")
  echo "== generate 256x256, 1 step, transformer from the $run"
  $T $Z generate --device cpu --model "$D/model" "${extra[@]}" -p "a lighthouse" -W 256 -H 256 --steps 1 --seed 1 \
    -o "$D/$run.png" --memory-report "$D/$run.json" 2>&1 | grep -E 'denoise|decode|encode|peak|_s_|warning'
done
echo "== convert ComfyUI single file -> diffusers folder (transformer): seconds, peak RSS"
$T $Z convert -q --to diffusers "$D/comfy_dit.safetensors" "$D/back"
echo "== convert back -> single file again: seconds, peak RSS"
$T $Z convert -q --to single-file "$D/back/transformer/diffusion_pytorch_model.safetensors" "$D/again.safetensors"
cmp "$D/comfy_dit.safetensors" "$D/again.safetensors" && echo "single file -> diffusers -> single file: byte-identical"
echo "== the round trip's transformer tensors against the original folder's (sha256 per tensor)"
$PY - "$D/model/transformer" "$D/back/transformer" <<'PY'
import glob, hashlib, os, sys, json, struct
def tensors(d):
    out = {}
    for f in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            h = json.loads(fh.read(n)); base = 8 + n
            for k, v in h.items():
                if k == "__metadata__": continue
                b, e = v["data_offsets"]; fh.seek(base + b)
                out[k] = (v["dtype"], v["shape"], hashlib.sha256(fh.read(e - b)).hexdigest())
    return out
a, b = tensors(sys.argv[1]), tensors(sys.argv[2])
assert a == b, sorted(set(a.items()) ^ set(b.items()))[:4]
print("folder -> single file -> folder: %d tensors identical (name, dtype, shape, sha256)" % len(a))
PY
