#!/usr/bin/env python3
"""Reference key layouts of the bundled tiny model, checked by diffusers' own converters.

Writes tests/data/layouts/tiny_all_in_one.json: every tensor of the tiny model
(models/tiny-zimage) as a ComfyUI-style all-in-one checkpoint would hold it --
`model.diffusion_model.` + the original Z-Image layout (fused attention.qkv, attention.out,
q_norm/k_norm, x_embedder., final_layer.), `text_encoders.qwen3_4b.transformer.model.` + the
transformers Qwen3 names, `first_stage_model.` + the Flux AE / LDM VAE names (1x1-conv
attention) -- with dtype, shape and an FNV-1a 64 checksum of the raw little-endian bytes.

The original layouts are made here by inverting diffusers' conversion, and the inversion is
proved by running diffusers' own converters forward on the result:
  convert_z_image_transformer_checkpoint_to_diffusers(original) == the diffusers state dict,
  convert_ldm_vae_checkpoint(original, config)                   == the diffusers state dict,
exactly (every key, every byte), and by loading the written files with
ZImageTransformer2DModel.from_single_file / AutoencoderKL.from_single_file.
zimage's test (tests/test_layouts.cpp) converts the same model with `zimage convert` and must
produce this list exactly.

Pinned: diffusers 0.42.1 (PyPI), torch 2.15.0 (CPU), safetensors 0.8.0. Run:
  /work/venv-ref/bin/python tests/data/makers/make_layouts.py
"""
import copy, json, os, sys, tempfile

import torch
from safetensors.torch import load_file, save_file
from diffusers import AutoencoderKL, ZImageTransformer2DModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_vae_checkpoint,
    convert_z_image_transformer_checkpoint_to_diffusers,
)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
TINY = os.path.join(ROOT, "models", "tiny-zimage")
OUT = os.path.join(ROOT, "tests", "data", "layouts", "tiny_all_in_one.json")


def load_dir(d):
    sd = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            sd.update(load_file(os.path.join(d, f)))
    return sd


def fnv1a64(t):
    h = 0xCBF29CE484222325
    data = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
    # FNV-1a over bytes, vectorised in chunks for speed
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return "%016x" % h


def transformer_to_original(sd):
    out = {}
    qkv = {}
    for k, v in sd.items():
        n = k
        if n.startswith("all_final_layer.2-1."):
            n = "final_layer." + n[len("all_final_layer.2-1."):]
        elif n.startswith("all_x_embedder.2-1."):
            n = "x_embedder." + n[len("all_x_embedder.2-1."):]
        n = n.replace(".attention.to_out.0.", ".attention.out.")
        n = n.replace(".attention.norm_q.", ".attention.q_norm.").replace(".attention.norm_k.", ".attention.k_norm.")
        for i, p in enumerate("qkv"):
            if n.endswith(".attention.to_%s.weight" % p):
                qkv.setdefault(n[: -len(".attention.to_q.weight")], [None] * 3)[i] = v
                n = None
                break
        if n is not None:
            out[n] = v
    for base, parts in qkv.items():
        out[base + ".attention.qkv.weight"] = torch.cat(parts, 0)
    return out


def vae_to_original(sd, n_up):
    out = {}
    for k, v in sd.items():
        side, rest = k.split(".", 1)
        n = None
        if side not in ("encoder", "decoder"):
            out[k] = v
            continue
        p = rest.split(".")
        if rest.startswith("conv_norm_out."):
            n = "norm_out." + rest[len("conv_norm_out."):]
        elif rest.startswith("mid_block.resnets."):
            n = "mid.block_%d.%s" % (int(p[2]) + 1, ".".join(p[3:]).replace("conv_shortcut", "nin_shortcut"))
        elif rest.startswith("mid_block.attentions.0."):
            a = ".".join(p[3:])
            for f, t in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")):
                if a.startswith(f):
                    n = "mid.attn_1." + t + a[len(f):]
                    if f != "group_norm." and a.endswith("weight"):
                        v = v[:, :, None, None]
        elif rest.startswith("down_blocks."):
            i = int(p[1])
            if p[2] == "resnets":
                n = "down.%d.block.%s.%s" % (i, p[3], ".".join(p[4:]).replace("conv_shortcut", "nin_shortcut"))
            else:
                n = "down.%d.downsample.conv.%s" % (i, p[-1])
        elif rest.startswith("up_blocks."):
            b = n_up - 1 - int(p[1])
            if p[2] == "resnets":
                n = "up.%d.block.%s.%s" % (b, p[3], ".".join(p[4:]).replace("conv_shortcut", "nin_shortcut"))
            else:
                n = "up.%d.upsample.conv.%s" % (b, p[-1])
        else:
            n = rest
        out[side + "." + n] = v
    return out


def same(a, b, what):
    assert set(a) == set(b), (what, sorted(set(a) ^ set(b))[:10])
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), (what, k)


def main():
    dit = load_dir(os.path.join(TINY, "transformer"))
    vae = load_dir(os.path.join(TINY, "vae"))
    te = load_dir(os.path.join(TINY, "text_encoder"))
    vae_cfg = json.load(open(os.path.join(TINY, "vae", "config.json")))

    dit_orig = transformer_to_original(dit)
    # diffusers' converter, forward, with the all-in-one prefix it strips itself.
    back = convert_z_image_transformer_checkpoint_to_diffusers({"model.diffusion_model." + k: v for k, v in dit_orig.items()})
    same(back, dit, "transformer round trip")

    vae_orig = vae_to_original(vae, len(vae_cfg["up_block_types"]))
    back = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in vae_orig.items()}, vae_cfg)
    same(back, vae, "vae round trip")

    aio = {}
    aio.update({"model.diffusion_model." + k: v for k, v in dit_orig.items()})
    aio.update({"text_encoders.qwen3_4b.transformer.model." + k: v for k, v in te.items()})
    aio.update({"first_stage_model." + k: v for k, v in vae_orig.items()})

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "aio.safetensors")
        save_file({k: v.contiguous() for k, v in aio.items()}, path)
        m = ZImageTransformer2DModel.from_single_file(path, config=TINY, subfolder="transformer", torch_dtype=torch.bfloat16)
        same({k: v for k, v in m.state_dict().items()}, dit, "from_single_file transformer")
        v = AutoencoderKL.from_single_file(path, config=TINY, subfolder="vae", torch_dtype=torch.bfloat16)
        same({k: x for k, x in v.state_dict().items()}, vae, "from_single_file vae")

    dt = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
    entries = [[k, dt[v.dtype], list(v.shape), fnv1a64(v)] for k, v in sorted(aio.items())]
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump({"source": "models/tiny-zimage", "maker": "tests/data/makers/make_layouts.py",
                   "checked_by": "convert_z_image_transformer_checkpoint_to_diffusers, convert_ldm_vae_checkpoint, from_single_file",
                   "tensors": entries}, f, indent=0)
    print("wrote", OUT, len(entries), "tensors")


if __name__ == "__main__":
    main()
