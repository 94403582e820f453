#!/usr/bin/env bash
# zimage serve on a GPU (issue 18): throughput and latency of batched vs one-at-a-time serving.
# One device call, about 6 minutes on an H100/H200 (model write ~1-2 min, two servers):
#   real-size random model (make-random-model --preset turbo --dtype bf16, ~20 GB, deleted after),
#   server A: --max-batch 0 (batch size from free memory), server B: --max-batch 1 (one at a time),
#   each: 1024², 8 steps with 1, 4 and 16 concurrent clients (4, 8, 32 requests), then 512², 8 steps
#   with 16 clients (48 requests); images/s, latency p50/p95, batch sizes, and the device memory
#   peak per batch size (server A's /metrics zimage_batch_peak_device_bytes).
# Here first: bench/gpu/pack_carry.sh (carry .carry). There: OUT=$OUT bash bench/gpu/serve_bench.sh [all|ditbatch]
#   (all: first bench_dit_batch, the DiT alone by batch size at 512² and 1024², then the servers)
# Soak with device memory (>= 10 minutes, longer than one device command): in one call
#   bash bench/gpu/serve_bench.sh soak-start     (leaves the model and a setsid'ed soak running)
# and 11+ minutes later, in another call on the same warm machine,
#   OUT=$OUT bash bench/gpu/serve_bench.sh soak-collect   (copies the CSV and the verdict to $OUT)
# The load generator is bench/serve_load.py (Python standard library only).
set -uo pipefail
source "$(dirname "$0")/lib.sh"
gpu_unpack_bin zimage
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
stamp "binaries ready"

M=${ZI_SERVE_MODEL:-/tmp/zrm}
if [ ! -f "$M/model_index.json" ]; then
  z "$BIN/zimage" make-random-model --preset turbo --dtype bf16 -q "$M" > "$OUT/make_model.log" 2>&1 || { cat "$OUT/make_model.log"; exit 1; }
  CLEAN_MODEL=1
fi
stamp "model ready"

if [ "${1:-}" = soak-start ]; then  # 512², 8 steps, 8 clients, 10 minutes; host RSS and GPU memory
  rm -rf /tmp/zi-soak && mkdir -p /tmp/zi-soak
  LD_LIBRARY_PATH="${ZLIB:+$ZLIB:}$LD_LIBRARY_PATH" setsid nohup python3 bench/serve_soak.py --bin "$BIN" --model "$M" \
    --threads 0 --size 512 --steps 8 --clients 8 --minutes 10 --interval 10 --server-args "--device cuda" \
    --out /tmp/zi-soak/serve_soak_gpu.csv > /tmp/zi-soak/serve_soak_gpu.json 2>&1 < /dev/null &
  stamp "soak started (collect after 11 minutes: serve_bench.sh soak-collect)"
  exit 0
fi
if [ "${1:-}" = soak-collect ]; then
  cp /tmp/zi-soak/* "$OUT/" && cat "$OUT/serve_soak_gpu.json"
  exit 0
fi

RESULTS="$OUT/serve_bench.jsonl"
: > "$RESULTS"
serve() {  # serve MODE MAXBATCH: starts a server, runs the load matrix, stops it
  local mode=$1 mb=$2 log="$OUT/serve_$1.log" port
  z "$BIN/zimage" serve --model "$M" --device cuda --port 0 -W 1024 -H 1024 --steps 8 --max-batch "$mb" \
    --max-queue 64 --max-pixels 1048576 > "$log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 600); do
    port=$(grep -o 'listening on http://127.0.0.1:[0-9]*' "$log" | grep -o '[0-9]*$')
    [ -n "$port" ] && break
    kill -0 $pid 2>/dev/null || break
    sleep 0.5
  done
  if [ -z "$port" ]; then echo "server $mode did not start"; cat "$log"; return 1; fi
  stamp "server $mode up on $port: $(grep -m1 'resident' "$log")"
  local url=http://127.0.0.1:$port
  python3 bench/serve_load.py --url $url --clients 1 --requests 2 --size 1024 --steps 8 --seed 1 > /dev/null  # warm-up
  python3 bench/serve_load.py --url $url --clients 1 --requests 2 --size 512 --steps 8 --seed 1 > /dev/null
  for spec in "1024 1 4" "1024 4 8" "1024 16 32" "512 16 48"; do
    set -- $spec
    python3 bench/serve_load.py --url $url --size $1 --clients $2 --requests $3 --steps 8 --seed 100 |
      python3 -c "import json,sys; r=json.loads(sys.stdin.read()); r.update(mode='$mode', size=$1); print(json.dumps(r))" |
      tee -a "$RESULTS"
  done
  curl -s $url/metrics > "$OUT/metrics_$mode.txt" 2>/dev/null ||
    python3 -c "import urllib.request;print(urllib.request.urlopen('$url/metrics').read().decode())" > "$OUT/metrics_$mode.txt"
  kill -TERM $pid; wait $pid; echo "server $mode exit $?"
  stamp "server $mode done"
}
if [ "${1:-}" = ditbatch ] || [ "${1:-}" = all ]; then  # the DiT alone: seconds per image-step by batch size
  for size in 512 1024; do z "$BIN/bench_dit_batch" "$M" $size 1,2,4,8,16 | tee -a "$OUT/dit_batch.txt" | grep DIT_BATCH; done
  ZI_CUDA_PROFILE=1 z "$BIN/bench_dit_batch" "$M" 512 1,8 > "$OUT/dit_batch_profile.txt" 2>&1
  stamp "dit batch done"
  [ "${1:-}" = ditbatch ] && exit 0
fi
serve batched 0
serve single 1
for mode in batched single; do echo "== $mode: last batches"; grep "zimage serve: batch" "$OUT/serve_$mode.log" | tail -4; done
[ "${CLEAN_MODEL:-0}" = 1 ] && rm -rf "$M"

python3 - "$OUT" <<'PY' | tee "$OUT/serve_bench.md"
import json, re, sys, os
out = sys.argv[1]
rows = [json.loads(l) for l in open(os.path.join(out, "serve_bench.jsonl")) if l.strip()]
gpu = open(os.path.join(out, "gpu.txt")).read().strip()
print(f"zimage serve, {gpu}; random real-size model, 8 steps, synchronous OpenAI requests\n")
print("| size | clients | mode | requests | failed | images/s | p50 s | p95 s | batch sizes |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['size']}² | {r['clients']} | {r['mode']} | {r['requests']} | {r['failed']} | {r['images_per_s']:.3f} | "
          f"{r['p50_s']:.3f} | {r['p95_s']:.3f} | {r['batch_sizes']} |")
def ips(mode, size, clients):
    for r in rows:
        if r["mode"] == mode and r["size"] == size and r["clients"] == clients:
            return r["images_per_s"]
for size in (1024, 512):
    b, s = ips("batched", size, 16), ips("single", size, 16)
    if b and s:
        print(f"\n{size}², 16 clients: batched / one-at-a-time throughput = {b / s:.2f}x")
m = open(os.path.join(out, "metrics_batched.txt")).read()
print("\n| batch size | device peak (GiB) | host accounted peak (GiB) |\n|---|---|---|")
dev = dict(re.findall(r'zimage_batch_peak_device_bytes\{size="(\d+)"\} (\S+)', m))
host = dict(re.findall(r'zimage_batch_peak_host_bytes\{size="(\d+)"\} (\S+)', m))
for k in sorted(host, key=int):
    print(f"| {k} | {float(dev.get(k, 0)) / 2**30:.2f} | {float(host[k]) / 2**30:.2f} |")
mb = re.search(r"^zimage_max_batch (\S+)", m, re.M)
print(f"\nmax batch chosen from free memory: {mb.group(1) if mb else '?'}")
PY
stamp "done"
