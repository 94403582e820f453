"""Fixtures for the zimage serve tests: the real server binary on a loopback port (tiny
model, CPU, small sizes), the CLI for reference images, and helpers to decode PNGs.

The binary is $ZIMAGE_BIN, else build/zimage of this checkout; the model is the bundled
tiny random-weight model (models/tiny-zimage)."""
import base64
import io
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time

import pytest
import requests
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("ZIMAGE_BIN", os.path.join(ROOT, "build", "zimage"))
TINY = os.path.join(ROOT, "models", "tiny-zimage")
# Small sizes and few steps keep the suite fast; one thread each, because on a shared two-core
# machine OpenMP teams of two thrash (a step measured 56x slower than with one thread).
BASE_ARGS = ["--threads", "1", "-W", "64", "-H", "64", "--steps", "2", "-q"]


class Server:
    def __init__(self, extra=(), model=TINY, env=None):
        self.model = model
        self.log = tempfile.TemporaryFile()
        cmd = [BIN, "serve", "--port", "0", "--model", model, *BASE_ARGS, *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env=env or os.environ.copy())
        self.port = None
        deadline = time.time() + 60
        lines = []
        while time.time() < deadline:
            line = self.proc.stderr.readline().decode()
            if not line:
                break
            lines.append(line)
            m = re.search(r"listening on http://[^:]+:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                break
        if self.port is None:
            self.proc.kill()
            raise RuntimeError("zimage serve did not start: " + "".join(lines))
        self.url = f"http://127.0.0.1:{self.port}"
        # Keep draining stderr so the server never blocks on a full pipe.
        self.stderr_lines = lines
        self._drain = threading.Thread(target=self._pump, daemon=True)
        self._drain.start()

    def _pump(self):
        for line in self.proc.stderr:
            self.stderr_lines.append(line.decode(errors="replace"))

    def metrics(self, headers=None):
        text = requests.get(self.url + "/metrics", headers=headers or {}, timeout=30).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self, timeout=60):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("zimage serve did not stop within %d s of SIGTERM" % timeout)
        return self.proc.returncode


@pytest.fixture(scope="session")
def server():
    s = Server()
    yield s
    assert s.stop() == 0, "".join(s.stderr_lines)


@pytest.fixture
def make_server():
    made = []

    def make(extra=(), **kw):
        s = Server(extra, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


def png_pixels(png_bytes):
    im = Image.open(io.BytesIO(png_bytes))
    return im.size, im.convert("RGB").tobytes(), dict(im.text)


def b64_pixels(b64):
    return png_pixels(base64.b64decode(b64))


_cli_cache = {}
_cli_lock = threading.Lock()


def cli_images(prompt, seed, count=1, size=64, steps=2, model=TINY, negative=None, guidance=None):
    """`zimage generate --count N` images for seeds seed..seed+N-1: [(size, rgb, text)]."""
    key = (prompt, seed, count, size, steps, model, negative, guidance)
    with _cli_lock:
        if key in _cli_cache:
            return _cli_cache[key]
    d = tempfile.mkdtemp()
    try:
        out = os.path.join(d, "cli.png")
        cmd = [BIN, "generate", "--model", model, "-p", prompt, "--seed", str(seed), "-W", str(size), "-H",
               str(size), "--steps", str(steps), "--threads", "1", "-q", "-o", out]
        if count > 1:
            cmd += ["--count", str(count), "--keep-models"]
        if negative is not None:
            cmd += ["--negative-prompt", negative]
        if guidance is not None:
            cmd += ["--guidance", str(guidance)]
        subprocess.run(cmd, check=True, timeout=300)
        paths = [out] if count == 1 else [os.path.join(d, "cli-%04d.png" % (k + 1)) for k in range(count)]
        res = []
        for p in paths:
            with open(p, "rb") as f:
                res.append(png_pixels(f.read()))
    finally:
        shutil.rmtree(d)
    with _cli_lock:
        _cli_cache[key] = res
    return res
