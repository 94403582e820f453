#!/usr/bin/env python3
"""Tiny adapters in every flavour zimage reads, with merged weights computed by the reference.

One LoRA (rank 4, on attention.to_q/to_k/to_v/to_out.0 and feed_forward.w1 of layers.0,
layers.2 and noise_refiner.0, plus adaLN_modulation.0 of layers.0; to_q/to_k/to_v of a block
share their A, so the LoRA can also be written against ComfyUI's fused attention.qkv) is
written in four key styles that must all give the same merged weights:
  tiny_lora4_peft.safetensors      diffusers/PEFT: transformer.<m>.lora_A/B.weight
  tiny_lora4_kohya.safetensors     kohya: lora_unet_<m_>.lora_down/lora_up.weight + alpha
                                   (f16; up scaled by 2, alpha = rank/2: the same product)
  tiny_lora4_comfy.safetensors     ComfyUI, original layout: diffusion_model.<m>.lora_A/B with a
                                   fused attention.qkv (B rows q, k, v; shared A), attention.out,
                                   alpha = rank
  tiny_lora4_aitoolkit.safetensors ai-toolkit: diffusion_model.<m>.lora_A/B.weight (diffusers names)
and two LyCORIS adapters:
  tiny_loha.safetensors            LoHa (hada_w1_a/b, hada_w2_a/b, alpha) on layers.0 to_q,
                                   layers.1 feed_forward.w1 and the fused layers.2 attention.qkv
  tiny_lokr.safetensors            LoKr on layers.0 to_out.0 (w1 full, w2 = w2_a·w2_b, alpha),
                                   layers.1 feed_forward.w3 (both factors full: scale 1 whatever
                                   alpha says) and the fused noise_refiner.1 attention.qkv

tiny_adapters_expected.safetensors holds, at scale 0.75 and in f32 from the model's bf16
weights: `lora.<target>` = the merged weight diffusers computes (ZImagePipeline.load_lora_weights
of the PEFT file + fuse_lora(lora_scale=0.75)); the maker checks that diffusers gives exactly
the same for the kohya and ai-toolkit files and that the comfy file's fused rows equal the
PEFT factors. diffusers cannot load the LyCORIS files (it fails on LoKr), so `loha.<target>`
and `lokr.<target>` are computed here in numpy from the papers' formulas:
  LoHa  W + s·(alpha/r)·(w1a·w1b) ⊙ (w2a·w2b),   r = rows of w1b
  LoKr  W + s·scale·kron(W1, W2),  scale = alpha / r (r = rank of the low-rank factor) or 1
(LyCORIS' own scalings, which ComfyUI's merge applies too.) Fused-qkv targets are the rows of
the fused ΔW. Values are rounded to bf16 before use, so every file holds the same numbers.

Pinned: diffusers 0.42.1 (PyPI), torch 2.15.0 (CPU), peft (installed in /work/venv-ref), numpy.
Run: /work/venv-ref/bin/python tests/data/makers/make_loras.py
"""
import os

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from diffusers import ZImagePipeline

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
TINY = os.path.join(ROOT, "models", "tiny-zimage")
OUT = os.path.join(ROOT, "tests", "data", "loras")
SCALE = 0.75
R = 4
g = torch.Generator().manual_seed(1234)


def rnd(*shape, std=0.2):
    return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16).to(torch.float32)


def kohya(m):
    return "lora_unet_" + m.replace(".", "_")


def to_original(m):
    return m.replace(".attention.to_out.0", ".attention.out")


base = {k: v.float() for k, v in load_file(os.path.join(TINY, "transformer", "diffusion_pytorch_model.safetensors")).items()}

# ---- the LoRA ---------------------------------------------------------------------------
blocks = ["layers.0", "layers.2", "noise_refiner.0"]
lora = {}  # module -> (A [r, in], B [out, r])
for b in blocks:
    a_qkv = rnd(R, 64)
    for p in "qkv":
        lora[f"{b}.attention.to_{p}"] = (a_qkv, rnd(64, R))
    lora[f"{b}.attention.to_out.0"] = (rnd(R, 64), rnd(64, R))
    lora[f"{b}.feed_forward.w1"] = (rnd(R, 64), rnd(170, R))
lora["layers.0.adaLN_modulation.0"] = (rnd(R, 64), rnd(256, R))  # [4·dim, adaLN 64]

peft = {}
for m, (a, b) in lora.items():
    peft[f"transformer.{m}.lora_A.weight"] = a.to(torch.bfloat16)
    peft[f"transformer.{m}.lora_B.weight"] = b.to(torch.bfloat16)
save_file(peft, os.path.join(OUT, "tiny_lora4_peft.safetensors"))

ko = {}
for m, (a, b) in lora.items():
    k = kohya(m)
    ko[f"{k}.lora_down.weight"] = a.to(torch.float16)
    ko[f"{k}.lora_up.weight"] = (2 * b).to(torch.float16)
    ko[f"{k}.alpha"] = torch.tensor(R / 2, dtype=torch.float32)
    assert torch.equal(ko[f"{k}.lora_down.weight"].float(), a) and torch.equal(ko[f"{k}.lora_up.weight"].float(), 2 * b)
save_file(ko, os.path.join(OUT, "tiny_lora4_kohya.safetensors"))

co = {}
for b in blocks:
    aq = lora[f"{b}.attention.to_q"][0]
    co[f"diffusion_model.{b}.attention.qkv.lora_A.weight"] = aq.to(torch.bfloat16)
    co[f"diffusion_model.{b}.attention.qkv.lora_B.weight"] = torch.cat(
        [lora[f"{b}.attention.to_{p}"][1] for p in "qkv"], 0).to(torch.bfloat16)
    co[f"diffusion_model.{b}.attention.qkv.alpha"] = torch.tensor(float(R))
for m, (a, bb) in lora.items():
    if ".attention.to_" in m and not m.endswith("to_out.0"):
        continue
    o = to_original(m)
    co[f"diffusion_model.{o}.lora_A.weight"] = a.to(torch.bfloat16)
    co[f"diffusion_model.{o}.lora_B.weight"] = bb.to(torch.bfloat16)
    co[f"diffusion_model.{o}.alpha"] = torch.tensor(float(R))
save_file(co, os.path.join(OUT, "tiny_lora4_comfy.safetensors"))

ai = {f"diffusion_model.{m}.lora_A.weight": a.to(torch.bfloat16) for m, (a, b) in lora.items()}
ai.update({f"diffusion_model.{m}.lora_B.weight": b.to(torch.bfloat16) for m, (a, b) in lora.items()})
save_file(ai, os.path.join(OUT, "tiny_lora4_aitoolkit.safetensors"))


def diffusers_merged(path):
    pipe = ZImagePipeline.from_pretrained(TINY, torch_dtype=torch.float32)
    pipe.load_lora_weights(path, adapter_name="a")
    pipe.fuse_lora(lora_scale=SCALE, components=["transformer"])
    pipe.unload_lora_weights()  # the fused weights stay, under their own names
    sd = pipe.transformer.state_dict()
    return {m + ".weight": sd[m + ".weight"].detach().clone() for m in lora}


ref = diffusers_merged(os.path.join(OUT, "tiny_lora4_peft.safetensors"))
for f in ("tiny_lora4_kohya.safetensors", "tiny_lora4_aitoolkit.safetensors"):
    other = diffusers_merged(os.path.join(OUT, f))
    for k in ref:
        assert torch.equal(ref[k], other[k]), (f, k, (ref[k] - other[k]).abs().max())
# The formula diffusers applies, in numpy: W + s·B·A (scale 1: no alpha).
for m, (a, b) in lora.items():
    want = base[m + ".weight"].numpy().astype(np.float64) + SCALE * (b.numpy().astype(np.float64) @ a.numpy())
    assert np.abs(ref[m + ".weight"].numpy() - want).max() < 1e-5, m

expected = {f"lora.{k}": v.contiguous() for k, v in ref.items()}

# ---- LoHa -------------------------------------------------------------------------------
loha_mods = {"layers.0.attention.to_q": (64, 64, 2), "layers.1.feed_forward.w1": (170, 64, 2),
             "layers.2.attention.qkv": (192, 64, 3)}
loha = {}
for m, (out, inn, r) in loha_mods.items():
    w = dict(w1a=rnd(out, r, std=0.5), w1b=rnd(r, inn, std=0.5), w2a=rnd(out, r, std=0.5), w2b=rnd(r, inn, std=0.5))
    alpha = 1.5
    k = kohya(m)
    for n, t in (("hada_w1_a", w["w1a"]), ("hada_w1_b", w["w1b"]), ("hada_w2_a", w["w2a"]), ("hada_w2_b", w["w2b"])):
        loha[f"{k}.{n}"] = t.to(torch.bfloat16)
    loha[f"{k}.alpha"] = torch.tensor(alpha)
    d = (w["w1a"].numpy().astype(np.float64) @ w["w1b"].numpy()) * (w["w2a"].numpy().astype(np.float64) @ w["w2b"].numpy())
    d *= alpha / r
    if m.endswith(".qkv"):
        b = m[: -len(".attention.qkv")]
        for i, p in enumerate("qkv"):
            t = f"{b}.attention.to_{p}.weight"
            expected[f"loha.{t}"] = torch.from_numpy((base[t].numpy() + SCALE * d[i * 64:(i + 1) * 64]).astype(np.float32))
    else:
        expected[f"loha.{m}.weight"] = torch.from_numpy((base[m + ".weight"].numpy() + SCALE * d).astype(np.float32))
save_file(loha, os.path.join(OUT, "tiny_loha.safetensors"))

# ---- LoKr -------------------------------------------------------------------------------
lokr = {}
# to_out.0 [64, 64] = kron(w1 [4, 8], w2 [16, 8]), w2 = w2_a [16, 2] · w2_b [2, 8], alpha 3 → scale 3/2.
# feed_forward.w3 [170, 64] = kron(w1 [10, 4], w2 [17, 16]), both full → scale 1 (alpha ignored).
# noise_refiner.1 qkv [192, 64] = kron(w1_a·w1_b [3, 8], w2 [64, 8]), rank 2, alpha 1 → scale 1/2.
def put(m, name, t):
    lokr[f"lycoris_{m.replace('.', '_')}.{name}"] = t.to(torch.bfloat16)


specs = []
w1 = rnd(4, 8, std=0.5); w2a = rnd(16, 2, std=0.5); w2b = rnd(2, 8, std=0.5)
put("layers.0.attention.to_out.0", "lokr_w1", w1); put("layers.0.attention.to_out.0", "lokr_w2_a", w2a)
put("layers.0.attention.to_out.0", "lokr_w2_b", w2b)
lokr["lycoris_layers_0_attention_to_out_0.alpha"] = torch.tensor(3.0)
specs.append(("layers.0.attention.to_out.0", w1.numpy(), (w2a.numpy().astype(np.float64) @ w2b.numpy()), 3.0 / 2))
w1 = rnd(10, 4, std=0.5); w2 = rnd(17, 16, std=0.5)
put("layers.1.feed_forward.w3", "lokr_w1", w1); put("layers.1.feed_forward.w3", "lokr_w2", w2)
lokr["lycoris_layers_1_feed_forward_w3.alpha"] = torch.tensor(7.0)
specs.append(("layers.1.feed_forward.w3", w1.numpy(), w2.numpy(), 1.0))
w1a = rnd(3, 2, std=0.5); w1b = rnd(2, 8, std=0.5); w2 = rnd(64, 8, std=0.5)
put("noise_refiner.1.attention.qkv", "lokr_w1_a", w1a); put("noise_refiner.1.attention.qkv", "lokr_w1_b", w1b)
put("noise_refiner.1.attention.qkv", "lokr_w2", w2)
lokr["lycoris_noise_refiner_1_attention_qkv.alpha"] = torch.tensor(1.0)
specs.append(("noise_refiner.1.attention.qkv", w1a.numpy().astype(np.float64) @ w1b.numpy(), w2.numpy(), 1.0 / 2))
for m, a, b, scale in specs:
    d = np.kron(a.astype(np.float64), b.astype(np.float64)) * scale
    if m.endswith(".qkv"):
        blk = m[: -len(".attention.qkv")]
        for i, p in enumerate("qkv"):
            t = f"{blk}.attention.to_{p}.weight"
            expected[f"lokr.{t}"] = torch.from_numpy((base[t].numpy() + SCALE * d[i * 64:(i + 1) * 64]).astype(np.float32))
    else:
        expected[f"lokr.{m}.weight"] = torch.from_numpy((base[m + ".weight"].numpy() + SCALE * d).astype(np.float32))
save_file(lokr, os.path.join(OUT, "tiny_lokr.safetensors"))

save_file(expected, os.path.join(OUT, "tiny_adapters_expected.safetensors"))
print("wrote", len(expected), "expected tensors")
