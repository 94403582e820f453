#!/usr/bin/env python3
"""A bounded soak of `zimage serve` over loopback (Python standard library only): for --minutes
it keeps --clients clients busy with a mix of every request kind (OpenAI and A1111 synchronous
requests, async jobs followed through their event stream, jobs cancelled mid-run, clients that
disconnect, bad requests), samples the server's host RSS (and device memory when /metrics has
it) every --interval seconds into a CSV, and judges whether memory stayed flat: the median of
the last tenth of the run against the median just after warm-up (the first 20 %).

  nice bench/serve_soak.py --minutes 10 --out soak.csv                  # tiny model, CPU, 64x64
  bench/serve_soak.py --url http://127.0.0.1:8188 --size 1024 --steps 8  # a running server

Exit status 0 when no request failed unexpectedly and memory stayed flat (growth at most
max(5 %, 32 MiB)), 1 otherwise."""
import argparse
import csv
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def request(method, url, body=None, timeout=600):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def metrics(base):
    out = {}
    _, text = request("GET", base + "/metrics")
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def rss_of(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (default: start build/zimage serve with the tiny model)")
    ap.add_argument("--bin", default=os.path.join(ROOT, "build", "zimage"))
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "tiny-zimage"))
    ap.add_argument("--threads", default="1")
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--interval", type=float, default=5)
    ap.add_argument("--out", default="serve_soak.csv")
    ap.add_argument("--server-args", default="", help="more `zimage serve` flags, e.g. '--device cuda'")
    a = ap.parse_args()

    proc = None
    if a.url:
        base = a.url.rstrip("/")
    else:
        proc = subprocess.Popen([a.bin, "serve", "--port", "0", "--model", a.model, "--threads", a.threads, "-W",
                                 str(a.size), "-H", str(a.size), "--steps", str(a.steps), "--max-queue", "64", "-q",
                                 *a.server_args.split()],
                                stderr=subprocess.PIPE)
        line = ""
        while proc.poll() is None:  # model loading can take a while
            line = proc.stderr.readline().decode()
            if "listening on" in line or not line:
                break
        m = re.search(r"listening on http://[^:]+:(\d+)", line)
        if not m:
            print("server did not start: " + line, file=sys.stderr)
            return 1
        base = "http://127.0.0.1:%s" % m.group(1)
        threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()

    stop_at = time.time() + a.minutes * 60
    counts = {"ok": 0, "expected_error": 0, "unexpected": 0}
    unexpected = []
    lock = threading.Lock()
    size = "%dx%d" % (a.size, a.size)

    def count(kind, what=None):
        with lock:
            counts[kind] += 1
            if kind == "unexpected" and len(unexpected) < 20:
                unexpected.append(what)

    def client(cid):
        rnd = random.Random(cid)
        while time.time() < stop_at:
            kind = rnd.choice(["openai", "openai", "a1111", "job", "cancel", "disconnect", "bad"])
            seed = rnd.randrange(1 << 30)
            try:
                if kind == "openai":
                    st, _ = request("POST", base + "/v1/images/generations",
                                    {"prompt": "soak %d" % seed, "seed": seed, "size": size, "steps": a.steps})
                    count("ok" if st == 200 else "unexpected", (kind, st))
                elif kind == "a1111":
                    st, _ = request("POST", base + "/sdapi/v1/txt2img",
                                    {"prompt": "soak", "seed": seed, "width": a.size, "height": a.size,
                                     "steps": a.steps, "batch_size": 2})
                    count("ok" if st == 200 else "unexpected", (kind, st))
                elif kind in ("job", "cancel"):
                    st, body = request("POST", base + "/v1/jobs",
                                       {"prompt": "job", "seed": seed, "size": size,
                                        "steps": a.steps * (20 if kind == "cancel" else 1)})
                    if st != 202:
                        count("unexpected", (kind, st))
                        continue
                    jid = json.loads(body)["id"]
                    if kind == "cancel":
                        time.sleep(rnd.random() * 0.2)
                        st, _ = request("DELETE", base + "/v1/jobs/" + jid)
                        count("ok" if st in (200, 409) else "unexpected", (kind, st))
                        continue
                    with urllib.request.urlopen(base + "/v1/jobs/%s/events" % jid, timeout=600) as ev:
                        done = False
                        for raw in ev:
                            if raw.startswith(b"event: done"):
                                done = True
                            if done and raw.startswith(b"data: "):
                                state = json.loads(raw[6:])["state"]
                                count("ok" if state == "succeeded" else "unexpected", (kind, state))
                                break
                elif kind == "disconnect":
                    body = json.dumps({"prompt": "gone", "size": size, "steps": a.steps * 20}).encode()
                    s = socket.create_connection((base.split("//")[1].split(":")[0], int(base.rsplit(":", 1)[1])))
                    s.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                              b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                    time.sleep(rnd.random() * 0.3)
                    s.close()
                    count("ok")
                else:
                    st, _ = request("POST", base + "/v1/images/generations", {"prompt": "x", "steps": 0})
                    count("expected_error" if st == 422 else "unexpected", (kind, st))
            except Exception as e:  # noqa: BLE001
                count("unexpected", (kind, repr(e)))

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(a.clients)]
    t0 = time.time()
    for t in threads:
        t.start()
    rows = []
    with open(a.out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seconds", "rss_bytes", "metrics_rss_bytes", "device_accounted_bytes", "device_reserved_bytes",
                    "images_total", "queue_depth"])
        while time.time() < stop_at:
            time.sleep(a.interval)
            try:
                m = metrics(base)
            except Exception:  # noqa: BLE001
                continue
            rss = rss_of(proc.pid) if proc else None
            row = [round(time.time() - t0, 1), rss if rss is not None else int(m["zimage_host_rss_bytes"]),
                   int(m["zimage_host_rss_bytes"]), int(m.get("zimage_device_accounted_bytes", 0)),
                   int(m.get("zimage_device_reserved_bytes", 0)), int(m["zimage_images_total"]),
                   int(m["zimage_queue_depth"])]
            rows.append(row)
            w.writerow(row)
            f.flush()
    for t in threads:
        t.join(900)
    final = metrics(base)
    rc = None
    if proc:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(120)

    n = len(rows)
    warm = rows[max(1, n // 5): max(2, n // 5 + max(1, n // 10))]
    last = rows[-max(1, n // 10):]
    summary = {"minutes": a.minutes, "samples": n, "counts": counts, "unexpected": unexpected,
               "images": int(final["zimage_images_total"]), "server_exit": rc}
    flat = True
    for col, name in ((1, "host_rss"), (3, "device_accounted"), (4, "device_reserved")):
        if not warm or not any(r[col] for r in rows):
            continue
        w0 = statistics.median(r[col] for r in warm)
        w1 = statistics.median(r[col] for r in last)
        growth = w1 - w0
        ok = growth <= max(0.05 * w0, 32 << 20)
        flat &= ok
        summary[name] = {"after_warmup_mib": round(w0 / 2**20, 1), "end_mib": round(w1 / 2**20, 1),
                         "growth_mib": round(growth / 2**20, 1), "max_mib": round(max(r[col] for r in rows) / 2**20, 1),
                         "flat": ok}
    summary["flat"] = flat
    print(json.dumps(summary, indent=1))
    return 0 if flat and counts["unexpected"] == 0 and rc in (None, 0) else 1


if __name__ == "__main__":
    sys.exit(main())
