#!/usr/bin/env python3
"""A bounded load generator for `zimage serve`, Python standard library only (urllib + threads),
so that it runs on machines without pip packages (the GPU machines).

  bench/serve_load.py --url http://127.0.0.1:8188 --clients 16 --requests 32 --size 1024 --steps 8

Each of --clients threads sends synchronous OpenAI-shape requests (POST /v1/images/generations,
one image each, seeds seed0, seed0+1, ...) until --requests have been sent in total. Prints one
JSON line: clients, requests, ok, failed, seconds, images_per_s, latency p50/p95/max (s), and the
server's batch-size counts from /metrics."""
import argparse
import json
import sys
import threading
import time
import urllib.error
import urllib.request


def post(url, body, key, timeout):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    if key:
        req.add_header("Authorization", "Bearer " + key)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read()


def metrics(base, key):
    req = urllib.request.Request(base + "/metrics")
    if key:
        req.add_header("Authorization", "Bearer " + key)
    out = {}
    with urllib.request.urlopen(req, timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
    return out


def percentile(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(p / 100.0 * (len(xs) - 1)))))
    return xs[k]


def run(base, clients, total, size, steps, key="", seed0=1000, prompt=None, timeout=900):
    prompt = prompt or "A cinematic photo of a red fox standing in fresh snow at dawn, soft light, 85mm lens"
    lock = threading.Lock()
    state = {"next": 0}
    lat, errors = [], []
    before = metrics(base, key)

    def client():
        while True:
            with lock:
                k = state["next"]
                if k >= total:
                    return
                state["next"] += 1
            body = {"prompt": prompt, "size": "%dx%d" % (size, size), "steps": steps, "seed": seed0 + k,
                    "response_format": "b64_json"}
            t0 = time.time()
            try:
                status, data = post(base + "/v1/images/generations", body, key, timeout)
                ok = status == 200 and b"b64_json" in data
            except urllib.error.HTTPError as e:
                ok, status = False, e.code
            except Exception as e:  # noqa: BLE001
                ok, status = False, repr(e)
            with lock:
                if ok:
                    lat.append(time.time() - t0)
                else:
                    errors.append(status)

    t0 = time.time()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    secs = time.time() - t0
    after = metrics(base, key)
    sizes = {}
    for name, v in after.items():
        if name.startswith("zimage_batch_size_total{"):
            d = v - before.get(name, 0)
            if d:
                sizes[name.split('"')[1]] = int(d)
    return {"clients": clients, "requests": total, "ok": len(lat), "failed": len(errors),
            "errors": [str(e) for e in errors[:5]], "seconds": round(secs, 3),
            "images_per_s": round(len(lat) / secs, 4) if secs > 0 else None,
            "p50_s": percentile(lat, 50), "p95_s": percentile(lat, 95), "max_s": max(lat) if lat else None,
            "batch_sizes": sizes}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8188")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--api-key", default="")
    a = ap.parse_args()
    r = run(a.url.rstrip("/"), a.clients, a.requests, a.size, a.steps, a.api_key, a.seed)
    print(json.dumps(r))
    return 0 if r["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
