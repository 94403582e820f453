"""zimage serve driven by real HTTP clients: the OpenAI Python client, requests, raw sockets."""
import base64
import json
import socket
import time

import openai
import pytest
import requests

from conftest import b64_pixels, cli_images, TINY


def sse_events(resp):
    """Parses a text/event-stream response into (event, data) pairs."""
    event, data = "message", []
    for raw in resp.iter_lines(decode_unicode=True):
        if raw is None:
            continue
        if raw == "":
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif raw.startswith("event: "):
            event = raw[7:]
        elif raw.startswith("data: "):
            data.append(raw[6:])


def test_openai_client_images_equal_cli(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    r = client.images.generate(prompt="a lighthouse on a cliff", n=2, size="64x64", response_format="b64_json",
                               extra_body={"seed": 7, "steps": 2})
    assert len(r.data) == 2
    want = cli_images("a lighthouse on a cliff", 7, count=2)
    for k, d in enumerate(r.data):
        size, rgb, text = b64_pixels(d.b64_json)
        assert size == (64, 64)
        assert rgb == want[k][1], f"image {k} (seed {7 + k}) differs from the CLI's"
        assert text["parameters"] == want[k][2]["parameters"]
        assert "Seed: %d" % (7 + k) in text["parameters"]


def test_openai_shape_fields(server):
    r = requests.post(server.url + "/v1/images/generations",
                      json={"prompt": "a cat", "size": "64x64", "seed": 3, "steps": 1, "guidance": 0,
                            "negative_prompt": "", "model": "anything", "response_format": "b64_json"})
    assert r.status_code == 200, r.text
    j = r.json()
    assert isinstance(j["created"], int) and len(j["data"]) == 1 and j["data"][0]["seed"] == 3
    assert b64_pixels(j["data"][0]["b64_json"])[1] == cli_images("a cat", 3, steps=1)[0][1]


def test_guidance_and_negative_prompt_equal_cli(server):
    r = requests.post(server.url + "/v1/images/generations",
                      json={"prompt": "a red boat", "size": "64x64", "seed": 11, "steps": 2, "guidance": 3.5,
                            "negative_prompt": "blurry"})
    assert r.status_code == 200, r.text
    size, rgb, text = b64_pixels(r.json()["data"][0]["b64_json"])
    want = cli_images("a red boat", 11, negative="blurry", guidance=3.5)[0]
    assert rgb == want[1]
    assert text["parameters"] == want[2]["parameters"]


def test_a1111_txt2img(server):
    body = {"prompt": "a mountain lake", "negative_prompt": "", "steps": 2, "cfg_scale": 1, "width": 64,
            "height": 64, "seed": 21, "batch_size": 2, "n_iter": 1, "sampler_name": "Euler"}
    r = requests.post(server.url + "/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    j = r.json()
    assert len(j["images"]) == 2
    info = json.loads(j["info"])
    assert info["all_seeds"] == [21, 22] and info["seed"] == 21
    assert j["parameters"]["prompt"] == "a mountain lake"
    want = cli_images("a mountain lake", 21, count=2)
    for k, b64 in enumerate(j["images"]):
        _, rgb, text = b64_pixels(b64)
        assert rgb == want[k][1]
        assert info["infotexts"][k] == text["parameters"] == want[k][2]["parameters"]


def test_a1111_random_seed_is_reported(server):
    r = requests.post(server.url + "/sdapi/v1/txt2img", json={"prompt": "x", "seed": -1, "steps": 1})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert isinstance(info["seed"], int) and info["seed"] >= 0
    _, _, text = b64_pixels(r.json()["images"][0])
    assert "Seed: %d," % info["seed"] in text["parameters"]


def test_a1111_get_endpoints(server):
    opts = requests.get(server.url + "/sdapi/v1/options").json()
    assert opts["sd_model_checkpoint"] == "tiny-zimage"
    models = requests.get(server.url + "/sdapi/v1/sd-models").json()
    assert models[0]["model_name"] == "tiny-zimage" and models[0]["title"]
    samplers = requests.get(server.url + "/sdapi/v1/samplers").json()
    assert samplers[0]["name"] == "Euler"


def test_health_and_metrics(server):
    h = requests.get(server.url + "/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    assert requests.post(server.url + "/v1/images/generations", json={"prompt": "m", "seed": 1}).status_code == 200
    m = server.metrics()
    for name in ("zimage_queue_depth", "zimage_images_total", "zimage_step_seconds_sum", "zimage_host_rss_bytes",
                 'zimage_phase_seconds_sum{phase="denoise"}', "zimage_max_batch"):
        assert name in m, name
    assert m["zimage_host_rss_bytes"] > 0 and m["zimage_images_total"] >= 1
    assert m['zimage_batch_peak_host_bytes{size="1"}'] > 0


def test_job_events_and_result(server):
    r = requests.post(server.url + "/v1/jobs", json={"prompt": "a tree", "size": "64x64", "steps": 5, "seed": 99})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["state"] in ("queued", "running") and job["seed"] == 99
    steps_seen, done = [], None
    with requests.get(server.url + "/v1/jobs/%s/events" % job["id"], stream=True, timeout=60) as ev:
        assert ev.headers["Content-Type"].startswith("text/event-stream")
        for name, data in sse_events(ev):
            if name == "progress" and data["state"] == "running" and data["step"] > 0:
                steps_seen.append(data["step"])
            if name == "done":
                done = data
                break
    assert done and done["state"] == "succeeded", done
    assert steps_seen == sorted(steps_seen) and steps_seen[-1] <= 5
    assert len(set(steps_seen)) >= 2, steps_seen  # progress arrives step by step
    g = requests.get(server.url + "/v1/jobs/" + job["id"]).json()
    assert g["state"] == "succeeded" and g["step"] == 5 and g["progress"] == 1.0
    _, rgb, _ = b64_pixels(g["result"]["data"][0]["b64_json"])
    assert rgb == cli_images("a tree", 99, steps=5)[0][1]
    assert done["result"]["data"][0]["b64_json"] == g["result"]["data"][0]["b64_json"]


def wait_state(server, jid, states, timeout=60):
    t0 = time.time()
    while time.time() - t0 < timeout:
        j = requests.get(server.url + "/v1/jobs/" + jid).json()
        if j["state"] in states:
            return j
        time.sleep(0.02)
    raise AssertionError("job %s never reached %s" % (jid, states))


def test_cancel_running_and_queued(make_server):
    s = make_server(["--max-batch", "1", "--max-steps", "1000"])
    long = {"prompt": "slow", "size": "256x256", "steps": 1000, "seed": 1}
    a = requests.post(s.url + "/v1/jobs", json=long).json()
    b = requests.post(s.url + "/v1/jobs", json=dict(long, size="128x128")).json()
    ja = wait_state(s, a["id"], ("running",))
    # Wait for a step or two, then cancel between steps.
    while requests.get(s.url + "/v1/jobs/" + a["id"]).json()["step"] < 1:
        time.sleep(0.01)
    assert requests.get(s.url + "/v1/jobs/" + b["id"]).json()["state"] == "queued"
    rb = requests.delete(s.url + "/v1/jobs/" + b["id"])
    assert rb.status_code == 200 and rb.json()["state"] == "cancelled"
    ra = requests.delete(s.url + "/v1/jobs/" + a["id"])
    assert ra.status_code == 200
    ja = wait_state(s, a["id"], ("cancelled",), timeout=30)
    assert 1 <= ja["step"] < 1000
    # Cancelling again: 409; unknown: 404.
    assert requests.delete(s.url + "/v1/jobs/" + a["id"]).status_code == 409
    assert requests.delete(s.url + "/v1/jobs/job-999999").status_code == 404
    assert requests.get(s.url + "/v1/jobs/job-999999").status_code == 404
    m = s.metrics()
    assert m['zimage_jobs_total{result="cancelled"}'] == 2
    # The server still serves.
    r = requests.post(s.url + "/v1/images/generations", json={"prompt": "after", "seed": 2})
    assert r.status_code == 200


def test_disconnect_cancels_sync_job(make_server):
    s = make_server(["--max-steps", "1000"])
    body = json.dumps({"prompt": "gone", "size": "256x256", "steps": 1000}).encode()
    sock = socket.create_connection(("127.0.0.1", s.port))
    sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    t0 = time.time()
    while s.metrics()["zimage_running_jobs"] < 1:
        assert time.time() - t0 < 30
        time.sleep(0.02)
    sock.close()
    t0 = time.time()
    while s.metrics()['zimage_jobs_total{result="cancelled"}'] < 1:
        assert time.time() - t0 < 30, "the disconnected client's job was not cancelled"
        time.sleep(0.05)
    m = s.metrics()
    assert m["zimage_running_jobs"] == 0 and m["zimage_images_total"] == 0
    assert requests.post(s.url + "/v1/images/generations", json={"prompt": "next", "seed": 1}).status_code == 200


def test_queue_full_gives_429_with_retry_after(make_server):
    s = make_server(["--max-queue", "2", "--max-batch", "1", "--max-steps", "1000"])
    long = {"prompt": "slow", "size": "256x256", "steps": 1000}
    first = requests.post(s.url + "/v1/jobs", json=long).json()
    wait_state(s, first["id"], ("running",))
    ids, statuses = [first["id"]], []
    for _ in range(4):
        r = requests.post(s.url + "/v1/jobs", json=long)
        statuses.append(r.status_code)
        if r.status_code == 202:
            ids.append(r.json()["id"])
        else:
            assert r.status_code == 429
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_error"
    # One running + two queued are accepted; the rest are told to come back later.
    assert statuses == [202, 202, 429, 429], statuses
    r = requests.post(s.url + "/v1/images/generations", json={"prompt": "x"})
    assert r.status_code == 429 and "Retry-After" in r.headers
    for jid in ids:
        requests.delete(s.url + "/v1/jobs/" + jid)
    assert s.metrics()["zimage_jobs_rejected_total"] == 3


def test_api_key(make_server):
    s = make_server(["--api-key", "s3cret"])
    assert requests.get(s.url + "/health").status_code == 200  # no key needed
    for path in ("/", "/metrics", "/sdapi/v1/options", "/v1/jobs/job-1", "/v1/models"):
        r = requests.get(s.url + path)
        assert r.status_code == 401, path
        assert r.json()["error"]["type"] == "authentication_error"
        assert "Basic" in r.headers["WWW-Authenticate"]
    assert requests.post(s.url + "/v1/images/generations", json={"prompt": "x"}).status_code == 401
    assert requests.post(s.url + "/v1/images/generations", json={"prompt": "x"},
                         headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert requests.post(s.url + "/sdapi/v1/txt2img", json={"prompt": "x"}, auth=("user", "wrong")).status_code == 401
    # Bearer (OpenAI clients) and Basic with the key as password (A1111 clients, browsers).
    ok = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret").images.generate(prompt="x", size="64x64",
                                                                                 extra_body={"seed": 1})
    assert len(ok.data) == 1
    bad = openai.OpenAI(base_url=s.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.images.generate(prompt="x", size="64x64")
    assert requests.post(s.url + "/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1},
                         auth=("anyone", "s3cret")).status_code == 200
    assert requests.get(s.url + "/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_api_key_off_by_default(server):
    assert requests.get(server.url + "/metrics").status_code == 200


def test_web_page_served(server):
    r = requests.get(server.url + "/")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    assert "<progress" in r.text and "/v1/jobs" in r.text


def test_failed_job_gives_500_and_server_keeps_serving(make_server, tmp_path):
    # A real failure: the VAE is loaded per batch (--resident text-encoder,transformer) and its
    # file is truncated while the server runs.
    import shutil
    model = tmp_path / "model"
    shutil.copytree(TINY, model)
    s = make_server(["--resident", "text-encoder,transformer"], model=str(model))
    vae = model / "vae" / "diffusion_pytorch_model.safetensors"
    good = vae.read_bytes()
    assert requests.post(s.url + "/v1/images/generations", json={"prompt": "a", "seed": 1}).status_code == 200
    vae.write_bytes(good[:1000])
    r = requests.post(s.url + "/v1/images/generations", json={"prompt": "a", "seed": 1})
    assert r.status_code == 500, r.text
    assert r.json()["error"]["type"] == "server_error" and "vae" in r.json()["error"]["message"].lower()
    j = requests.post(s.url + "/v1/jobs", json={"prompt": "a", "seed": 1}).json()
    jf = wait_state(s, j["id"], ("failed",))
    assert jf["error"]["status"] == 500
    vae.write_bytes(good)
    r = requests.post(s.url + "/v1/images/generations", json={"prompt": "a", "seed": 1})
    assert r.status_code == 200
    assert s.metrics()['zimage_jobs_total{result="failed"}'] == 2


def test_sigterm_finishes_running_work_and_exits_0(make_server):
    s = make_server(["--max-steps", "1000"])
    # Long enough (seconds on any machine) that the job is still running when SIGTERM comes.
    j = requests.post(s.url + "/v1/jobs", json={"prompt": "last", "size": "128x128", "steps": 600, "seed": 5}).json()
    wait_state(s, j["id"], ("running",))
    with requests.get(s.url + "/v1/jobs/%s/events" % j["id"], stream=True, timeout=60) as ev:
        s.proc.send_signal(15)
        time.sleep(0.3)
        # No new work is accepted: 503 while the running job finishes.
        r = requests.post(s.url + "/v1/jobs", json={"prompt": "late"}, timeout=5)
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
        assert requests.get(s.url + "/health", timeout=5).status_code == 503
        done = None
        for name, data in sse_events(ev):
            if name == "done":
                done = data
                break
    assert done and done["state"] == "succeeded", done
    assert s.proc.wait(60) == 0


def test_sigterm_deadline_cancels(make_server):
    s = make_server(["--max-steps", "1000", "--shutdown-timeout", "1"])
    j = requests.post(s.url + "/v1/jobs", json={"prompt": "long", "size": "512x512", "steps": 1000}).json()
    wait_state(s, j["id"], ("running",))
    t0 = time.time()
    s.proc.send_signal(15)
    assert s.proc.wait(60) == 0
    assert time.time() - t0 < 20


def test_port_in_use_is_an_error(server):
    import subprocess
    from conftest import BIN
    r = subprocess.run([BIN, "serve", "--port", str(server.port), "--model", TINY, "-q"], capture_output=True,
                       timeout=120)
    assert r.returncode == 1
    assert b"cannot listen on 127.0.0.1:%d" % server.port in r.stderr
