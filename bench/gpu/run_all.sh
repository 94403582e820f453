#!/usr/bin/env bash
# One GPU-machine call: binaries (carried from pack_carry.sh, else built here with -j16), the
# GPU tests, kernel ceilings and rates, a real-size random checkpoint (turbo preset, bf16 to
# keep it ~20 GB and quick to write; deleted at the end), zimage at 1024² (8 steps) and 512²,
# one profiled 1024² image (ZI_CUDA_PROFILE=1: GPU time per op), then diffusers eager and
# torch.compile on the same card, and one table last (summarize.py). About 2.5 minutes on an H200.
# Here first: bench/gpu/pack_carry.sh, and .carry/diffusers_src.tar.xz (diffusers' src/ tree).
# Use: bench/gpu/run_all.sh [fp8probe|tests|kernels|bench|vaetile|firstuse|controlnet|diffusers|budget|quant|fused|trace|oneshot|scaling|all]...  (default: all,
# which leaves out fp8probe, budget, quant, fused, trace, oneshot and scaling; bench includes kernels; ZI_GTEST_FILTER narrows the tests). Logs go to $OUT.
set -uo pipefail
source "$(dirname "$0")/lib.sh"
WHAT=" ${*:-all} "
want() { [[ "$WHAT" == *" $1 "* || "$WHAT" == *" all "* ]]; }
gpu_unpack_bin zimage zimage_gpu_tests bench_kernels bench_quant bench_prompts fp8_probe
stamp "binaries ready ($BIN)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/gpu.txt"
(dpkg -l 2>/dev/null | grep -E "libopenblas|libpng-dev|libpcre2-dev|libutf8proc|libgtest|nlohmann|libcli11" | awk '{print $2}' | tr '\n' ' '; echo) > "$OUT/build_deps.txt"
z ldd "$BIN/zimage" | grep -E "not found|cublas|cudnn" | tee "$OUT/ldd.txt"

if [[ "$WHAT" == *" fp8probe "* ]]; then  # (not in all) which fp8 GEMMs this cuBLASLt has (bench/gpu/fp8_probe.cpp)
  z "$BIN/fp8_probe" > "$OUT/fp8_probe.log" 2>&1
  grep FP8PROBE "$OUT/fp8_probe.log" | head -70
  # cuBLASLt's own reasons for the descriptor zimage builds (errors and hints), one shape.
  CUBLASLT_LOG_LEVEL=${ZI_FP8_LOG_LEVEL:-3} z "$BIN/fp8_probe" > "$OUT/fp8_probe_lt.log" 2>&1
  grep -v FP8PROBE "$OUT/fp8_probe_lt.log" | grep -vi "cublasLtCreate\|trace" | head -40
  stamp "fp8 probe done"
fi

if want tests; then
  ZI_TEST_DATA_DIR=$ROOT/tests/data ZI_TINY_MODEL_DIR=$ROOT/models/tiny-zimage \
    z "$BIN/zimage_gpu_tests" --gtest_color=no --gtest_filter="${ZI_GTEST_FILTER:-*}" > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests rc=$?" | tee -a "$OUT/gpu_tests.log"
  grep -E "^\[  (PASSED|FAILED)|FAILED|rel_l2|device:|turbo|cfg |truncated" "$OUT/gpu_tests.log" | head -60
  stamp "tests done"
fi

PROMPT="A cinematic photo of a red fox standing in fresh snow at dawn, soft light, highly detailed fur, 85mm lens"
if want bench || want kernels; then
  z "$BIN/bench_kernels" 2>&1 | tee "$OUT/kernels.log"
  # The fp8 GEMMs again without Hopper's fast accumulation (the default since 2026-12-08;
  # ZI_FP8_FAST_ACCUM is read once per process).
  ZI_KERNELS_FP8_ONLY=1 ZI_FP8_FAST_ACCUM=0 z "$BIN/bench_kernels" 2>&1 | grep fp8 | tee "$OUT/kernels_nofastacc.log"
  stamp "kernels done"
fi
if want bench; then
  M=/tmp/zrm
  rm -rf "$M"
  z "$BIN/zimage" make-random-model --preset turbo --dtype bf16 -q "$M" > "$OUT/make_model.log" 2>&1 || { cat "$OUT/make_model.log"; }
  du -sh "$M" | tee -a "$OUT/make_model.log"
  stamp "random model written"
  for sz in 1024 512; do
    z "$BIN/zimage" generate --model "$M" -p "$PROMPT" -W $sz -H $sz --steps 8 --seed 1 --count 2 --device cuda \
      -o "$OUT/zimage_$sz.png" > "$OUT/zimage_$sz.log" 2>&1
    echo "rc=$?" >> "$OUT/zimage_$sz.log"
    tail -12 "$OUT/zimage_$sz.log"
    stamp "zimage $sz done"
  done
  # One more 1024² image with per-op GPU timing (events around every op: a little slower).
  # --keep-models: three images with every model resident (no loading after the first).
  z "$BIN/zimage" generate --model "$M" -p "$PROMPT" -W 1024 -H 1024 --steps 8 --seed 1 --count 3 --keep-models \
    --device cuda -o "$OUT/zimage_keep.png" > "$OUT/zimage_keep.log" 2>&1
  echo "rc=$?" >> "$OUT/zimage_keep.log"
  tail -7 "$OUT/zimage_keep.log"
  # Two images: the second one's per-phase tables are free of first-use costs.
  ZI_CUDA_PROFILE=1 z "$BIN/zimage" generate --model "$M" -p "$PROMPT" -W 1024 -H 1024 --steps 8 --seed 1 \
    --count 2 --device cuda -o "$OUT/zimage_prof.png" > "$OUT/zimage_prof.log" 2>&1
  sed -n '/image 2\/2/,$p' "$OUT/zimage_prof.log" | grep -E "PROF|profile|^\[" | head -60
  stamp "profile done"
  rm -f "$OUT"/zimage_*-000?.png
  rm -rf "$M"
fi

if want vaetile; then  # the GPU decode at 1024², whole and in 256-pixel tiles, with memory reports
  M=/tmp/zrm
  need_random_model "$M"
  for t in 0 256; do
    z "$BIN/zimage" generate --model "$M" -p "$PROMPT" -W 1024 -H 1024 --steps 2 --seed 1 --device cuda \
      --vae-tile $t --memory-report -o "$OUT/zimage_tile$t.png" > "$OUT/zimage_tile$t.log" 2>&1
    echo "rc=$?" >> "$OUT/zimage_tile$t.log"
    echo "--vae-tile $t:"; grep -E "decode|rc=" "$OUT/zimage_tile$t.log" | tail -6
  done
  stamp "vae tiles done"
fi

if want firstuse; then  # one image per process: the 2nd process reuses the 1st one's measured kernel choices
  M=/tmp/zrm
  need_random_model "$M"
  export ZIMAGE_CACHE_DIR=/tmp/zi-tuning-$$
  for run in 1 2; do
    z "$BIN/zimage" generate --model "$M" -p "$PROMPT" -W 1024 -H 1024 --steps 8 --seed 1 --device cuda \
      -o "$OUT/zimage_first$run.png" > "$OUT/zimage_first$run.log" 2>&1
    echo "process $run (rc=$?):"; grep -E "^  (encode|denoise|decode) |wall clock" "$OUT/zimage_first$run.log"
  done
  # The encode's 245 linears took 128 ms of profiled time for a 2.3 ms read of the weights
  # (2026-12-07): lazy module loading of each new cuBLASLt kernel? A process with every module
  # loaded at start, and one with each op timed (host gaps count inside the op's events).
  CUDA_MODULE_LOADING=EAGER z "$BIN/zimage" generate --model "$M" -p "$PROMPT" -W 1024 -H 1024 --steps 8 --seed 1 \
    --device cuda -o "$OUT/zimage_first3.png" > "$OUT/zimage_first_eager.log" 2>&1
  echo "process 3, CUDA_MODULE_LOADING=EAGER (rc=$?):"
  grep -E "^  (encode|denoise|decode) |wall clock" "$OUT/zimage_first_eager.log"
  ZI_CUDA_PROFILE=1 z "$BIN/zimage" generate --model "$M" -p "$PROMPT" -W 1024 -H 1024 --steps 8 --seed 1 \
    --device cuda -o "$OUT/zimage_first4.png" > "$OUT/zimage_first_prof.log" 2>&1
  echo "process 4, profiled: the encode's ops"; grep -A8 "^\[encode\]" "$OUT/zimage_first_prof.log" | head -9
  # The encoder's GEMM warm-up (the default since 2026-12-07) off (the VAE's with it), then the
  # VAE's warm-up alone off (ZI_WARM_VAE=0; the default since 2026-12-08 is a decode of this size
  # with zero weights while the encoder loads).
  ZI_WARM_GEMMS=0 z "$BIN/zimage" generate --model "$M" -p "$PROMPT" -W 1024 -H 1024 --steps 8 --seed 1 \
    --device cuda -o "$OUT/zimage_first5.png" > "$OUT/zimage_first_warm.log" 2>&1
  echo "process 5, ZI_WARM_GEMMS=0 (rc=$?; PNG vs process 2: $(cmp -s "$OUT/zimage_first5.png" "$OUT/zimage_first2.png" && echo identical || echo DIFFERENT)):"
  grep -E "^  (encode|denoise|decode) |wall clock" "$OUT/zimage_first_warm.log"
  ZI_WARM_VAE=0 z "$BIN/zimage" generate --model "$M" -p "$PROMPT" -W 1024 -H 1024 --steps 8 --seed 1 \
    --device cuda -o "$OUT/zimage_first6.png" > "$OUT/zimage_first_warmvae.log" 2>&1
  echo "process 6, ZI_WARM_VAE=0 (rc=$?; PNG vs process 2: $(cmp -s "$OUT/zimage_first6.png" "$OUT/zimage_first2.png" && echo identical || echo DIFFERENT)):"
  grep -E "^  (encode|denoise|decode) |wall clock|GPU peak" "$OUT/zimage_first_warmvae.log"
  # Checksums only: the device returns a limited count of files.
  (cd "$OUT" && md5sum zimage_first*.png | tee first_png_md5.txt && rm -f zimage_first*.png)
  wc -l "$ZIMAGE_CACHE_DIR"/*.txt; unset ZIMAGE_CACHE_DIR
  stamp "first use done"
fi

if [[ "$WHAT" == *" oneshot "* ]]; then  # (not in all) issue 19: one process, exec to PNG on disk, 1024² 8 steps, warm page cache and tuning cache; beside diffusers' from_pretrained + one image
  M=/tmp/zrm
  need_random_model "$M"
  export ZIMAGE_CACHE_DIR=/tmp/zi-tuning-oneshot
  cat "$M"/*/*.safetensors > /dev/null  # the page cache holds the model
  z "$BIN/zimage" generate --model "$M" -p "$PROMPT" -W 1024 -H 1024 --steps 8 --seed 1 --device cuda -q -o /tmp/zo_warm.png
  for rep in $(seq 1 ${ZI_ONESHOT_REPS:-2}); do
    for cf in ${ZI_ONESHOT_CFGS:-off:0 on:0 on:1}; do  # --prefetch : ZI_UPLOAD_READ [: --png-level]
      IFS=: read -r pf rd pl <<< "$cf"
      t0=$(date +%s.%N)
      ZI_UPLOAD_READ=$rd z "$BIN/zimage" generate --model "$M" -p "$PROMPT" -W 1024 -H 1024 --steps 8 --seed 1 --device cuda \
        --prefetch $pf ${pl:+--png-level $pl} --memory-report "$OUT/oneshot_${pf}$rd$pl.json" -o "$OUT/zo_${pf}$rd$pl.png" > "$OUT/oneshot_${pf}${rd}${pl}_$rep.log" 2>&1
      rc=$?; t1=$(date +%s.%N)
      echo "ONESHOT zimage prefetch=$pf upload_read=$rd png_level=${pl:-default} rep=$rep rc=$rc wall_s=$(python3 -c "print(f'{$t1 - $t0:.3f}')")"
      grep -E "^  (encode|denoise|decode) |load:|loaded during|context created|wall clock|rror" "$OUT/oneshot_${pf}${rd}${pl}_$rep.log" | head -13
      [ -z "$pl" ] && [ -f "$OUT/zo_off0.png" ] && [ "$pf$rd" != off0 ] && { cmp -s "$OUT/zo_off0.png" "$OUT/zo_${pf}$rd.png" && echo "PNG identical to prefetch off, mapped upload" || echo "PNG DIFFERS from prefetch off, mapped upload"; }
    done
  done
  unset ZIMAGE_CACHE_DIR
  rm -f "$OUT"/zo_*.png
  stamp "zimage one-shot done"
  use_carried_diffusers
  for rep in $(seq 1 ${ZI_ONESHOT_DIFFUSERS_REPS:-${ZI_ONESHOT_REPS:-2}}); do  # 0: diffusers not run
    t0=$(date +%s.%N)
    PYTHONUNBUFFERED=1 timeout 300 python3 bench/gpu/oneshot_diffusers.py "$M" /tmp/zo_diffusers.png > "$OUT/oneshot_diffusers_$rep.log" 2>&1
    rc=$?; t1=$(date +%s.%N)
    echo "ONESHOT diffusers rep=$rep rc=$rc wall_s=$(python3 -c "print(f'{$t1 - $t0:.3f}')")"
    grep -E "ONESHOT_DIFFUSERS|Error|error" "$OUT/oneshot_diffusers_$rep.log" | tail -3
  done
  stamp "diffusers one-shot done"
fi

if want controlnet; then  # issue 17: a random Fun ControlNet Union 2.1 (published config) at 1024², 8 steps, beside plain t2i
  M=/tmp/zrmc
  rm -rf "$M"
  z "$BIN/zimage" make-random-model --preset turbo --dtype bf16 --controlnet 2.1 -q "$M" > "$OUT/make_model_cn.log" 2>&1 ||
    cat "$OUT/make_model_cn.log"
  python3 -c "
import numpy as np, zlib, struct
a = np.zeros((1024, 1024, 3), np.uint8); a[100:104, :] = 255; a[:, 500:504] = 255
raw = b''.join(b'\\x00' + a[y].tobytes() for y in range(1024))
chunk = lambda t, d: struct.pack('>I', len(d)) + t + d + struct.pack('>I', zlib.crc32(t + d) & 0xffffffff)
open('/tmp/zi_control.png', 'wb').write(b'\\x89PNG\\r\\n\\x1a\\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', 1024, 1024, 8, 2, 0, 0, 0))
                                   + chunk(b'IDAT', zlib.compress(raw)) + chunk(b'IEND', b''))"
  z "$BIN/zimage" generate --model "$M" -p "$PROMPT" -W 1024 -H 1024 --steps 8 --seed 1 --count 2 --device cuda \
    -o "$OUT/zimage_t2i.png" > "$OUT/zimage_t2i.log" 2>&1
  echo "rc=$?" >> "$OUT/zimage_t2i.log"
  z "$BIN/zimage" generate --model "$M" -p "$PROMPT" -W 1024 -H 1024 --steps 8 --seed 1 --count 2 --device cuda \
    --control-image /tmp/zi_control.png --controlnet "$M/controlnet" --control-scale 0.75 --memory-report \
    -o "$OUT/zimage_cn.png" > "$OUT/zimage_cn.log" 2>&1
  echo "rc=$?" >> "$OUT/zimage_cn.log"
  for f in t2i cn; do echo "== zimage $f"; grep -E "^  (encode|vae-encode|denoise|decode|weights)|rc=|error" "$OUT/zimage_$f.log" | tail -8; done
  rm -f "$OUT"/zimage_t2i*.png "$OUT"/zimage_cn*.png
  rm -rf "$M"
  stamp "zimage controlnet done"
  run_bench_diffusers diffusers_cn.log 400 controlnet
  grep -E "RESULT|Error|error" "$OUT/diffusers_cn.log" | tail -6
  stamp "diffusers controlnet done"
fi

if [[ "$WHAT" == *" budget "* ]]; then  # (not in all) issue 13: --vram sweep at 1024², 8 steps (second image of --count 2: load excluded), beside diffusers' group offload
  M=/tmp/zrm
  need_random_model "$M"
  # Nfp8: --vram N with --transformer-dtype fp8; Nnp: --prefetch off; Nws: ZI_WARM_VAE_SMALL=1 (the
  # VAE's warm-up at a smaller size where the image's does not fit: read the first image's decode).
  for v in ${ZI_BUDGETS:-none 12 8 6 4 4fp8}; do
    n=${v%fp8}; n=${n%np}; n=${n%ws}; flag=""; [ "$v" != none ] && flag="--vram $n"
    [[ "$v" == *fp8 ]] && flag="$flag --transformer-dtype fp8"
    [[ "$v" == *np ]] && flag="$flag --prefetch off"
    ws=0; [[ "$v" == *ws ]] && ws=1
    ZI_WARM_VAE_SMALL=$ws z "$BIN/zimage" generate --model "$M" -p "$PROMPT" -W 1024 -H 1024 --steps 8 --seed 1 --count 2 --device cuda \
      $flag --memory-report "$OUT/budget_$v.json" -o "$OUT/budget_$v.png" > "$OUT/budget_$v.log" 2>&1
    echo "rc=$?" >> "$OUT/budget_$v.log"
    same="-"; [ "$v" != none ] && [[ "$v" != *fp8 ]] && { cmp -s "$OUT/budget_$v-0002.png" "$OUT/budget_none-0002.png" && same=identical || same=DIFFERENT; }
    echo "== --vram $v (PNG vs resident: $same)"
    grep -E "^  decode " "$OUT/budget_$v.log" | head -1 | sed 's/^/first image: /'
    grep -E "image 2/2|^  (encode|denoise|decode) |GPU peak|plan|text_encoder|transformer|vae |streamed|stream trace|rc=|error" "$OUT/budget_$v.log" | tail -15
    python3 - "$OUT/budget_$v.json" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
p = j.get("vram_plan", {})
d = p.get("transformer", {})
rate = p.get("h2d_bytes_per_second", 0)
den = [x for x in j["phases"] if x["name"] == "denoise" and x["device"] == "cuda"]
per_step = d.get("streamed_bytes_per_pass", 0)
floor = per_step / rate if rate else 0
print(f"ROW gpu_peak_GiB={j.get('gpu_peak_bytes', 0) / 2**30:.2f} streamed_GB_per_step={per_step / 1e9:.2f} "
      f"h2d_GBps={rate / 1e9:.1f} floor_s_per_step={floor:.3f} denoise_s={den[-1]['seconds'] if den else 0:.3f}")
PY
  done
  # ZI_BUDGET_PROFILE="8 …": one more run per budget with the GPU time of every op (is a slower
  # decode under a budget the GPU's work, or the host's around it?).
  for v in ${ZI_BUDGET_PROFILE:-}; do
    ZI_CUDA_PROFILE=1 z "$BIN/zimage" generate --model "$M" -p "$PROMPT" -W 1024 -H 1024 --steps 8 --seed 1 --count 2 \
      --device cuda --vram $v -o "$OUT/budget_prof.png" > "$OUT/budget_prof_$v.log" 2>&1
    echo "== --vram $v profiled: phases and the decode's ops (second image)"
    sed -n '/image 2\/2/,$p' "$OUT/budget_prof_$v.log" | grep -E "^  (denoise|decode) |^\[decode\]|total" | head -8
    awk '/image 2\/2/{f=1} f && /^\[decode\]/{g=1} g' "$OUT/budget_prof_$v.log" | head -14
  done
  rm -f "$OUT"/budget_*-000?.png
  stamp "zimage budget sweep done"
  # End to end with a new prompt per image (encode included, as diffusers' timed runs), in one
  # process: ZI_PROMPTS_BUDGETS (default "none 8 4"; "4fp8" for fp8 weights), 3 images each.
  PB=$BIN/bench_prompts; [ -x "$PB" ] || PB=$ROOT/build-gpu/bench/bench_prompts
  for v in ${ZI_PROMPTS_BUDGETS-none 8 4}; do
    n=${v%fp8}; dt=bf16; [[ "$v" == *fp8 ]] && dt=fp8
    z "$PB" "$M" 1024 8 3 "$n" $dt > "$OUT/prompts_$v.log" 2>&1
    echo "== new prompt per image, --vram $v"; grep -E "^PROMPTS|rror" "$OUT/prompts_$v.log" | tail -4
  done
  stamp "prompts done"
  # The GPU test of many budgets and sizes at the real size (issue 13; skipped without the model).
  if [ "${ZI_BUDGET_REAL_TEST:-1}" != 0 ]; then
    ZI_REAL_MODEL_DIR=$M z "$BIN/zimage_gpu_tests" --gtest_filter='CudaStream.RealSize*' > "$OUT/budget_real_test.log" 2>&1
    grep -E "^real size|OK|FAILED|Failure|Expected|Which is|PASSED" "$OUT/budget_real_test.log" | head -30
    stamp "real-size budget test done"
  fi
  if [ "${ZI_BUDGET_DIFFUSERS:-1}" != 0 ]; then  # 0: no diffusers group offload (short calls)
    run_bench_diffusers diffusers_group.log 300 group
    grep -E "RESULT|Error|error" "$OUT/diffusers_group.log" | tail -6
    stamp "diffusers group offload done"
  fi
fi

if [[ "$WHAT" == *" fused "* ]]; then  # (not in all) issue 19: fused q/k/v + w1/w3 and the recorded step (CUDA graph), off vs on, bf16 and fp8, 8 steps (2nd image) at ZI_FUSED_SIZE (1024; 512: where launches weigh more)
  M=/tmp/zrm
  need_random_model "$M"
  for rep in $(seq 1 ${ZI_FUSED_REPS:-2}); do
    for cfg in "bf16|" "fp8|--transformer-dtype fp8"; do
      IFS='|' read -r name flags <<< "$cfg"
      for fg in ${ZI_FUSED_CFGS:-0:0 1:0 0:1 1:1}; do  # fused:graphs
        IFS=: read -r f gr <<< "$fg"
        FS=${ZI_FUSED_SIZE:-1024}
        ZI_FUSED_PROJECTIONS=$f ZI_CUDA_GRAPHS=$gr z "$BIN/zimage" generate --model "$M" -p "$PROMPT" -W $FS -H $FS --steps 8 --seed 1 \
          --count 2 --device cuda $flags --memory-report -o "$OUT/zf_${name}_${f}${gr}.png" > "$OUT/fused_${name}_${f}${gr}_$rep.log" 2>&1
        echo "rc=$?" >> "$OUT/fused_${name}_${f}${gr}_$rep.log"
        echo "== $name fused=$f graphs=$gr rep $rep: $(sed -n '/image 2\/2/,$p' "$OUT/fused_${name}_${f}${gr}_$rep.log" | grep -E "^  denoise |total|GPU peak|rc=|rror|recorded" | tr -s ' ' | tr '\n' ';')"
      done
      for fg in 10 01 11; do
        [ -f "$OUT/zf_${name}_$fg-0002.png" ] || continue
        cmp -s "$OUT/zf_${name}_00-0002.png" "$OUT/zf_${name}_$fg-0002.png" && echo "$name: PNG $fg identical to 00" || echo "$name: PNG $fg DIFFERS from 00"
      done
    done
  done
  rm -f "$OUT"/zf_*.png
  stamp "fused done"
fi

if [[ "$WHAT" == *" trace "* ]]; then  # (not in all) issue 13: --vram 8/4 with the copy/compute trace (ZI_STREAM_TRACE)
  M=/tmp/zrm
  need_random_model "$M"
  # v[:chunk MiB[:copy streams[:huge[:async unpin]]]]: the copies whole or in pieces (ZI_STREAM_CHUNK_MB),
  # on one or two copy streams (ZI_STREAM_COPY_STREAMS), pinned blocks on huge pages or not
  # (ZI_PINNED_HUGE), pinned blocks freed on a thread of their own or not (ZI_ASYNC_UNPIN).
  echo "transparent huge pages: $(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null)"
  for vc in ${ZI_TRACE_BUDGETS:-8 4 4:16 4:0:2 4:0:1:1}; do
    IFS=: read -r v ch ns hp au <<< "$vc"
    ch=${ch:-0}; ns=${ns:-1}; hp=${hp:-0}; au=${au:-0}
    tag="${v}_${ch}_${ns}_${hp}"; [ "$au" = 0 ] || tag="${tag}_u"
    ZI_ASYNC_UNPIN=$au ZI_STREAM_CHUNK_MB=$ch ZI_STREAM_COPY_STREAMS=$ns ZI_PINNED_HUGE=$hp ZI_STREAM_TRACE=1 \
      ZI_STREAM_TRACE_CSV="$OUT/trace_$tag.csv" z "$BIN/zimage" generate \
      --model "$M" -p "$PROMPT" -W 1024 -H 1024 --steps 8 --seed 1 --count 2 --device cuda --vram $v --memory-report \
      -o "$OUT/zt_$tag.png" > "$OUT/trace_$tag.log" 2>&1
    echo "rc=$?" >> "$OUT/trace_$tag.log"
    echo "== --vram $v chunk $ch MiB, $ns copy stream(s), huge pages $hp, async unpin $au; AnonHugePages now: $(grep AnonHugePages /proc/meminfo | tr -s ' ')"
    grep -E "image 2/2|^  (denoise|decode) |loaded transformer|stream trace|plan|streamed|GPU peak|wall clock|rc=|rror" "$OUT/trace_$tag.log" | tail -16
    [ -f "$OUT/zt_${v}_0_1_0-0002.png" ] && [ "$tag" != "${v}_0_1_0" ] && { cmp -s "$OUT/zt_${v}_0_1_0-0002.png" "$OUT/zt_$tag-0002.png" && echo "PNG identical to chunk 0, 1 stream" || echo "PNG DIFFERS from chunk 0, 1 stream"; }
  done
  rm -f "$OUT"/zt_*.png
  stamp "trace done"
fi

if [[ "$WHAT" == *" quant "* ]]; then  # issue 14: weight formats at 1024², 8 steps (warm 2nd image), peaks, quality vs bf16
  M=/tmp/zrm
  need_random_model "$M"
  # name|environment|flags: fp8 on the tensor cores (plain, with the producers' e4m3 copies, with fused Q/K/V and w1/w3
  # projections, without fast accumulation, with the per-tensor scalar scaling, with e4m3-only producers, with
  # the attention kernel's other tiles: 176 keys, 3 stages, with the residual + pre-norm fused, all
  # three), bf16 and fp8 with the GEMM
  # algorithms timed (ZI_GEMM_TUNE=1), fp8 through the dequant path (ZI_FP8_GEMM=0), q8_0, q4_0, q4_0 + q8_0 encoder.
  QCFGS=("bf16||" "fp8||--transformer-dtype fp8" "fp8copy|ZI_E4M3_COPIES=1|--transformer-dtype fp8"
         "fp8fused|ZI_FUSED_PROJECTIONS=1|--transformer-dtype fp8"
         "fp8cf|ZI_E4M3_COPIES=1 ZI_FUSED_PROJECTIONS=1|--transformer-dtype fp8"
         "fp8tune|ZI_GEMM_TUNE=1|--transformer-dtype fp8" "bf16tune|ZI_GEMM_TUNE=1|"
         "fp8nofa|ZI_FP8_FAST_ACCUM=0|--transformer-dtype fp8"
         "fp8scalar|ZI_FP8_SCALING=scalar|--transformer-dtype fp8"
         "fp8only|ZI_E4M3_ONLY=1|--transformer-dtype fp8"
         "fp8w176|ZI_FLASH_W=176|--transformer-dtype fp8" "fp8w3|ZI_FLASH_W=128x3|--transformer-dtype fp8"
         "fp8ow176|ZI_E4M3_ONLY=1 ZI_FLASH_W=176|--transformer-dtype fp8"
         "bf16w176|ZI_FLASH_W=176|" "bf16w3|ZI_FLASH_W=128x3|"
         "bf16fan|ZI_FUSED_ADD_NORM=1|" "fp8fan|ZI_FUSED_ADD_NORM=1|--transformer-dtype fp8"
         "bf16all|ZI_FUSED_ADD_NORM=1 ZI_FLASH_W=176|"
         "fp8all|ZI_E4M3_ONLY=1 ZI_FUSED_ADD_NORM=1 ZI_FLASH_W=176|--transformer-dtype fp8"
         "fp8deq|ZI_FP8_GEMM=0|--transformer-dtype fp8"
         "q8_0||--transformer-dtype q8_0" "q4_0||--transformer-dtype q4_0"
         "q4_0te8||--transformer-dtype q4_0 --text-encoder-dtype q8_0")
  [ -n "${ZI_QUANT_FIRST:-}" ] && QCFGS=("${QCFGS[@]:0:$ZI_QUANT_FIRST}")  # only the first N (short calls)
  if [ -n "${ZI_QUANT_ONLY:-}" ]; then  # only these names, e.g. "bf16 fp8 fp8fa"
    SEL=(); for cfg in "${QCFGS[@]}"; do [[ " $ZI_QUANT_ONLY " == *" ${cfg%%|*} "* ]] && SEL+=("$cfg"); done; QCFGS=("${SEL[@]}")
  fi
  for cfg in "${QCFGS[@]}"; do
    IFS='|' read -r name envs flags <<< "$cfg"
    env $envs LD_LIBRARY_PATH="${ZLIB:+$ZLIB:}$LD_LIBRARY_PATH" "$BIN/zimage" generate --model "$M" -p "$PROMPT" \
      -W 1024 -H 1024 --steps 8 --seed 1 --count 2 --device cuda $flags --memory-report -o "$OUT/zq_$name.png" \
      > "$OUT/zimage_q_$name.log" 2>&1
    echo "rc=$?" >> "$OUT/zimage_q_$name.log"
    echo "== $name ($envs $flags)"; sed -n '/image 2\/2/,$p' "$OUT/zimage_q_$name.log" | grep -E "^  (denoise|decode) |GPU peak|rc=|rror" | head -5
  done
  # One profiled fp8 and q4_0 image each (the 2nd): the fp8 GEMMs, fp8_act_quant and dequant rows.
  for f in ${ZI_QUANT_PROFILES-fp8 q4_0}; do
    ZI_CUDA_PROFILE=1 z "$BIN/zimage" generate --model "$M" -p "$PROMPT" -W 1024 -H 1024 --steps 8 --seed 1 --count 2 \
      --device cuda --transformer-dtype $f -o "$OUT/zq_prof.png" > "$OUT/zimage_q_prof_$f.log" 2>&1
    echo "== profile $f"; sed -n '/image 2\/2/,$p' "$OUT/zimage_q_prof_$f.log" | grep -E "linear|dequant|fp8|gemm|total" | head -30
  done
  QB=$BIN/bench_quant; [ -x "$QB" ] || QB=$ROOT/build-gpu/bench/bench_quant
  # ZI_QUANT_QUALITY: the formats to compare (default all; empty: none).
  QQ=${ZI_QUANT_QUALITY-bf16=bf16 fp8=fp8 fp8-dequant=fp8:dequant q8_0=q8_0 q4_0=q4_0 q4_0+q8_0te=q4_0+q8_0}
  [ -n "$QQ" ] && z "$QB" "$M" "$PROMPT" 1024 8 1 $QQ 2>&1 | tee "$OUT/quant_quality.log"
  # fp8, fp8copy, fp8fused, fp8only and fp8fan: the same image expected, bf16 and bf16fan too
  # (w176/w3/all: other attention bits)
  (cd "$OUT" && md5sum zq_*.png | tee quant_png_md5.txt)
  rm -f "$OUT"/zq_*.png
  stamp "quant done"
fi

if [[ "$WHAT" == *" scaling "* ]]; then  # (not in all) issue 19: 2048² and batch 4 at 1024², beside compiled diffusers
  M=/tmp/zrm
  need_random_model "$M"
  z "$BIN/zimage" generate --model "$M" -p "$PROMPT" -W 2048 -H 2048 --steps 8 --seed 1 --count 2 --device cuda \
    --memory-report -o "$OUT/zs_2048.png" > "$OUT/scaling_2048.log" 2>&1
  echo "rc=$?" >> "$OUT/scaling_2048.log"
  echo "== zimage 2048², second image"; sed -n '/image 2\/2/,$p' "$OUT/scaling_2048.log" | grep -E "^  (denoise|decode) |step 8/8|GPU peak|rc=|rror" | head -6
  grep -E "^error|rc=" "$OUT/scaling_2048.log" | tail -2
  for w in ${ZI_SCALING_FLASH_W-176}; do  # the attention-bound size with W's other tiles (ZI_FLASH_W)
    ZI_FLASH_W=$w z "$BIN/zimage" generate --model "$M" -p "$PROMPT" -W 2048 -H 2048 --steps 8 --seed 1 --count 2 \
      --device cuda --memory-report -o "$OUT/zs_2048.png" > "$OUT/scaling_2048_w$w.log" 2>&1
    echo "rc=$?" >> "$OUT/scaling_2048_w$w.log"
    echo "== zimage 2048², ZI_FLASH_W=$w, second image"
    sed -n '/image 2\/2/,$p' "$OUT/scaling_2048_w$w.log" | grep -E "^  (denoise|decode) |GPU peak|rc=|rror" | head -5
  done
  # The DiT alone, batch 1 and 4 at 1024² (seconds per image-step; the CLI renders --count one at a time).
  z "$BIN/bench_dit_batch" "$M" 1024 1,4 > "$OUT/scaling_batch.log" 2>&1
  echo "== DiT batch at 1024²"; tail -6 "$OUT/scaling_batch.log"
  rm -f "$OUT"/zs_*.png
  stamp "zimage scaling done"
  run_bench_diffusers diffusers_scaling.log 420 compile scaling
  grep -E "RESULT|compile wall|Error|error" "$OUT/diffusers_scaling.log" | tail -6
  stamp "diffusers scaling done"
fi

if want diffusers; then
  run_bench_diffusers diffusers.log 300 resident compile
  grep -E "CEILINGS|RESULT|compile wall|Error|error" "$OUT/diffusers.log" | tail -12
  stamp "diffusers done"
fi

python3 bench/gpu/summarize.py "$OUT" | tee "$OUT/summary.md"
# The device call returns at most about eight files (2026-12-07: the rest were left out, the logs
# among them): everything but the summary travels as one archive.
(cd "$OUT" && shopt -s nullglob && f=(./*.log ./*.json ./*.csv ./build_deps.tx[t] ./ldd.tx[t]) &&
  tar -czf logs.tgz "${f[@]}" && rm -f "${f[@]}")
