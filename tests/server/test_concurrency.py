"""32 clients × 4 requests against one server: zero failed or lost requests, and every image
equal to `zimage generate`'s image for its prompt and seed (batched or not)."""
import json
import threading
import time

import requests

from conftest import b64_pixels, cli_images

CLIENTS, PER_CLIENT = 32, 4
PROMPTS = ["a red fox in snow", "a lighthouse at dawn", "a bowl of ramen", "a city street in rain"]
SEEDS = 8  # seeds 100..107 for every prompt: 32 distinct images, each requested 4 times


def test_32_clients_x_4_requests(server):
    before = server.metrics()
    results, errors = {}, []
    lock = threading.Lock()

    def client(c):
        s = requests.Session()
        for r in range(PER_CLIENT):
            k = c * PER_CLIENT + r
            prompt, seed = PROMPTS[k % len(PROMPTS)], 100 + (k // len(PROMPTS)) % SEEDS
            try:
                if k % 2 == 0:  # OpenAI shape
                    resp = s.post(server.url + "/v1/images/generations",
                                  json={"prompt": prompt, "seed": seed, "size": "32x32", "steps": 2}, timeout=300)
                    ok = resp.status_code == 200
                    b64 = resp.json()["data"][0]["b64_json"] if ok else None
                else:  # A1111 shape
                    resp = s.post(server.url + "/sdapi/v1/txt2img",
                                  json={"prompt": prompt, "seed": seed, "width": 32, "height": 32, "steps": 2},
                                  timeout=300)
                    ok = resp.status_code == 200
                    b64 = resp.json()["images"][0] if ok else None
                with lock:
                    if ok:
                        results[k] = (prompt, seed, b64)
                    else:
                        errors.append((k, resp.status_code, resp.text[:200]))
            except Exception as e:  # noqa: BLE001 - every failure counts
                with lock:
                    errors.append((k, "exception", repr(e)))

    t0 = time.time()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    elapsed = time.time() - t0
    assert not errors, errors[:5]
    assert len(results) == CLIENTS * PER_CLIENT, "lost requests"

    want = {p: cli_images(p, 100, count=SEEDS, size=32) for p in PROMPTS}
    for k, (prompt, seed, b64) in results.items():
        _, rgb, text = b64_pixels(b64)
        ref = want[prompt][seed - 100]
        assert rgb == ref[1], f"request {k}: {prompt!r} seed {seed} differs from the CLI's image"
        assert text["parameters"] == ref[2]["parameters"]

    after = server.metrics()
    images = after["zimage_images_total"] - before["zimage_images_total"]
    assert images == CLIENTS * PER_CLIENT
    batched = sum(v for name, v in after.items() if name.startswith("zimage_batch_size_total") and
                  name != 'zimage_batch_size_total{size="1"}') - \
        sum(v for name, v in before.items() if name.startswith("zimage_batch_size_total") and
            name != 'zimage_batch_size_total{size="1"}')
    print(json.dumps({"requests": len(results), "seconds": round(elapsed, 1),
                      "batches_larger_than_1": batched}))
    assert batched > 0, "concurrent requests of one size never shared a batch"
