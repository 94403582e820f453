#!/usr/bin/env python3
"""Makes tests/data/gguf/ with the gguf Python package (an implementation independent of zimage).

  /work/venv-ref/bin/python tests/data/makers/make_gguf_fixtures.py

Pinned: gguf 0.19.0, numpy 2.4.6, torch (any 2.x with float8_e4m3fn), safetensors.

quant_types.gguf       one [4, 512] tensor per block type: Q8_0/Q4_0/Q5_0 quantized from
                       normal values by gguf.quants.quantize, Q4_K/Q5_K/Q6_K/Q3_K random block
                       bytes (with finite f16 scales; the package has no quantizer for them), plus
                       F32/F16/BF16 tensors
quant_expected.safetensors
                       "<name>": gguf.quants.dequantize of each tensor (f32), "src.<name>": the f32
                       values Q8_0/Q4_0/Q5_0 were made from, "fp8.src"/"fp8.bytes": values and
                       torch's float8_e4m3fn bytes of them
tiny_dit_q8_0.gguf     the bundled tiny transformer under its published (ComfyUI/original) names:
                       fused attention.qkv, attention.out, q_norm/k_norm, x_embedder, final_layer;
                       the blocks' matrices whose rows are whole 32-blocks in Q8_0, other matrices
                       BF16, vectors F32 (the rule of zimage's --transformer-dtype q8_0)
tiny_te_q4_0.gguf      the bundled tiny Qwen3 text encoder under llama.cpp's names (arch qwen3):
                       token_embd and the layers' matrices in Q4_0, norms F32
"""
import json
import os
import sys

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from safetensors.numpy import save_file
from safetensors.torch import load_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..")
OUT = os.path.join(ROOT, "tests", "data", "gguf")
TINY = os.path.join(ROOT, "models", "tiny-zimage")


def quant_types():
    rng = np.random.default_rng(14)
    w = gguf.GGUFWriter(os.path.join(OUT, "quant_types.gguf"), "zimage-test")
    expected = {}
    for qt in (Q.Q8_0, Q.Q4_0, Q.Q5_0):
        src = rng.standard_normal((4, 512)).astype(np.float32)
        src[0, :32] = 0  # an all-zero block
        src[1, :32] = 0.75  # equal values
        src[2, 32:64] *= 1e-3
        q = quantize(src, qt)
        w.add_tensor(qt.name, q, raw_dtype=qt)
        expected[qt.name] = dequantize(q, qt).astype(np.float32)
        expected["src." + qt.name] = src
    for qt in (Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q3_K):
        bs, ts = gguf.GGML_QUANT_SIZES[qt]
        nb = 4 * 512 // bs
        raw = rng.integers(0, 256, size=(nb, ts), dtype=np.uint8)
        d = (rng.uniform(0.001, 0.05, size=(nb, 2))).astype(np.float16).view(np.uint8)
        if qt in (Q.Q4_K, Q.Q5_K):
            raw[:, 0:4] = d
        elif qt == Q.Q6_K:
            raw[:, 208:210] = d[:, 0:2]
        else:
            raw[:, 108:110] = d[:, 0:2]
        q = raw.reshape(4, -1)
        w.add_tensor(qt.name, q, raw_dtype=qt)
        expected[qt.name] = dequantize(q, qt).astype(np.float32)
    f = rng.standard_normal((3, 64)).astype(np.float32)
    w.add_tensor("F32", f)
    expected["F32"] = f
    h = f.astype(np.float16)
    w.add_tensor("F16", h)
    expected["F16"] = h.astype(np.float32)
    b = quantize(f, Q.BF16)
    w.add_tensor("BF16", b, raw_dtype=Q.BF16)
    expected["BF16"] = dequantize(b, Q.BF16).astype(np.float32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    vals = np.concatenate([rng.standard_normal(200) * 100, rng.standard_normal(200) * 1e-2,
                           rng.uniform(-448, 448, 100), [0.0, -0.0, 448.0, -448.0, 2.0**-9, 2.0**-10, 3 * 2.0**-10]])
    vals = vals.astype(np.float32)
    vals = vals[np.abs(vals) <= 448]
    expected["fp8.src"] = vals
    expected["fp8.bytes"] = torch.from_numpy(vals).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    save_file(expected, os.path.join(OUT, "quant_expected.safetensors"))


BLOCK_MATRICES = (".attention.to_q.weight", ".attention.to_k.weight", ".attention.to_v.weight",
                  ".attention.to_out.0.weight", ".feed_forward.w1.weight", ".feed_forward.w2.weight",
                  ".feed_forward.w3.weight", ".adaLN_modulation.0.weight")


def original_name(n):
    if n.startswith("all_final_layer.2-1."):
        return "final_layer." + n[len("all_final_layer.2-1."):]
    if n.startswith("all_x_embedder.2-1."):
        return "x_embedder." + n[len("all_x_embedder.2-1."):]
    for a, b in ((".attention.to_out.0.", ".attention.out."), (".attention.norm_q.", ".attention.q_norm."),
                 (".attention.norm_k.", ".attention.k_norm.")):
        if a in n:
            return n.replace(a, b)
    return n


def add(w, name, t, qtype):
    a = t.float().numpy()
    if qtype is not None and a.ndim == 2 and a.shape[-1] % 32 == 0:
        w.add_tensor(name, quantize(a, qtype), raw_dtype=qtype)
    elif a.ndim >= 2:
        w.add_tensor(name, quantize(a, Q.BF16), raw_dtype=Q.BF16)
    else:
        w.add_tensor(name, a.astype(np.float32))


def tiny_dit():
    sd = load_file(os.path.join(TINY, "transformer", "diffusion_pytorch_model.safetensors"))
    w = gguf.GGUFWriter(os.path.join(OUT, "tiny_dit_q8_0.gguf"), "lumina2")
    done = set()
    for n in sorted(sd):
        if n in done:
            continue
        if ".attention.to_q." in n or ".attention.to_k." in n or ".attention.to_v." in n:
            base = n.rsplit(".attention.", 1)[0]
            kind = n.rsplit(".", 1)[1]
            parts = [f"{base}.attention.to_{c}.{kind}" for c in "qkv"]
            fused = torch.cat([sd[p] for p in parts], 0)
            done.update(parts)
            add(w, f"{base}.attention.qkv.{kind}", fused, Q.Q8_0 if kind == "weight" else None)
            continue
        block = n.startswith(("layers.", "noise_refiner.", "context_refiner.")) and n.endswith(BLOCK_MATRICES)
        add(w, original_name(n), sd[n], Q.Q8_0 if block else None)
        done.add(n)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


LLAMA = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
         "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
         "self_attn.o_proj.weight": "attn_output.weight", "self_attn.q_norm.weight": "attn_q_norm.weight",
         "self_attn.k_norm.weight": "attn_k_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
         "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
         "mlp.down_proj.weight": "ffn_down.weight"}


def tiny_te():
    d = os.path.join(TINY, "text_encoder")
    index = json.load(open(os.path.join(d, "model.safetensors.index.json")))
    sd = {}
    for shard in sorted(set(index["weight_map"].values())):
        sd.update(load_file(os.path.join(d, shard)))
    cfg = json.load(open(os.path.join(d, "config.json")))
    w = gguf.GGUFWriter(os.path.join(OUT, "tiny_te_q4_0.gguf"), "qwen3")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_embedding_length(cfg["hidden_size"])
    sd = {n[len("model."):] if n.startswith("model.") else n: t for n, t in sd.items()}
    for n in sorted(sd):
        if n == "embed_tokens.weight":
            add(w, "token_embd.weight", sd[n], Q.Q4_0)
        elif n == "norm.weight":
            add(w, "output_norm.weight", sd[n], None)
        elif n.startswith("layers."):
            i, rest = n[len("layers."):].split(".", 1)
            add(w, f"blk.{i}.{LLAMA[rest]}", sd[n], Q.Q4_0)
        else:
            sys.exit(f"unexpected tensor {n}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    quant_types()
    tiny_dit()
    tiny_te()
    print("wrote", OUT)
