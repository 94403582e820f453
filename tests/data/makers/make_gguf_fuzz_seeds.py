#!/usr/bin/env python3
"""Seeds of the gguf fuzz target (fuzz/corpus/gguf/), small GGUF files made by the gguf package.
  /work/venv-ref/bin/python tests/data/makers/make_gguf_fuzz_seeds.py     (gguf 0.19.0, numpy 2.4.6)
"""
import os

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "fuzz", "corpus", "gguf")
rng = np.random.default_rng(1)


def write(name, arch, tensors, kv=None):
    w = gguf.GGUFWriter(os.path.join(OUT, name), arch)
    for k, (fn, v) in (kv or {}).items():
        getattr(w, fn)(k, v)
    for n, a, t in tensors:
        if t is None:
            w.add_tensor(n, a)
        else:
            w.add_tensor(n, quantize(a, t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


os.makedirs(OUT, exist_ok=True)
f = lambda *s: rng.standard_normal(s).astype(np.float32)
write("seed_f32_q8.gguf", "test", [("a", f(2, 4), None), ("b", f(2, 32), Q.Q8_0), ("c", f(1, 32), Q.Q4_0)])
write("seed_q5_bf16.gguf", "test", [("x", f(1, 32), Q.Q5_0), ("y", f(3, 8), Q.BF16), ("z", f(5).astype(np.float16), None)],
      kv={"t.strs": ("add_array", ["a", "bc", ""]), "t.ints": ("add_array", [1, 2, 3]), "t.f": ("add_float32", 0.5),
          "t.b": ("add_bool", True), "t.u64": ("add_uint64", 7)})
write("seed_qwen3.gguf", "qwen3", [("token_embd.weight", f(4, 32), Q.Q8_0), ("blk.0.attn_q.weight", f(2, 32), Q.Q4_0),
                                   ("blk.0.attn_norm.weight", f(32), None), ("output_norm.weight", f(32), None)])
write("seed_comfy_dit.gguf", "lumina2", [("layers.0.attention.qkv.weight", f(6, 32), Q.Q8_0),
                                         ("layers.0.attention.out.weight", f(2, 32), Q.Q8_0),
                                         ("layers.0.attention.q_norm.weight", f(16), None),
                                         ("x_embedder.weight", f(2, 4), None)])
kq = rng.integers(0, 256, size=(1, 144), dtype=np.uint8)
kq[:, 0:4] = np.array([0.01, 0.02], dtype=np.float16).view(np.uint8)
w = gguf.GGUFWriter(os.path.join(OUT, "seed_q4k.gguf"), "test")
w.add_tensor("k", kq, raw_dtype=Q.Q4_K)
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
print(sorted((n, os.path.getsize(os.path.join(OUT, n))) for n in os.listdir(OUT)))
