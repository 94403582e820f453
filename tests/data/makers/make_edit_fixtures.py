# Fixtures for img2img, inpainting and the Fun ControlNet Union (issue 17), produced by the
# reference pipelines of diffusers on the bundled tiny model, in float32 on the CPU from its bf16
# weights (as ../../shared/tools/make_fixtures.py made the text-to-image cases).
#
# Pinned versions (checked at start): diffusers 0.42.1, torch 2.15.0, transformers 5.25.0,
#   pillow 13.0.0, numpy 2.4.6.
# Usage (from the repository root):
#   /work/venv-ref/bin/python tests/data/makers/make_edit_fixtures.py models/tiny-zimage tests/data
# Writes:
#   tests/data/edit/inputs/{init.png, mask.png, control.png, init_odd.png}
#   tests/data/edit/controlnet-2.0.safetensors      single file, the published 2.0 layout (control_noise_refiner.* present, before_proj zero)
#   tests/data/edit/controlnet-2.1/{config.json, diffusion_pytorch_model.safetensors}   diffusers folder, 2.1 layout
#   tests/data/edit/expected/NAME.{json,safetensors,png} for the cases below
#   tests/data/edit/expected/components.safetensors  VAE encoder and ControlNet unit checks, Canny reference
import json, math, os, sys

import numpy as np
import torch

PINNED = {"diffusers": "0.42.1", "torch": "2.15.0", "transformers": "5.25.0"}

import diffusers
import transformers
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageControlNetInpaintPipeline, ZImageControlNetModel,
                       ZImageControlNetPipeline, ZImageImg2ImgPipeline, ZImageInpaintPipeline, ZImageTransformer2DModel)
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoTokenizer, Qwen3Model

for mod, want in [(diffusers, PINNED["diffusers"]), (torch, PINNED["torch"]), (transformers, PINNED["transformers"])]:
    have = mod.__version__.split("+")[0]
    if have != want:
        print(f"warning: {mod.__name__} {have}, fixtures were made with {want}", flush=True)
print("torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__, flush=True)
torch.set_num_threads(4)

MODEL, DATA = sys.argv[1], sys.argv[2]
ROOT = os.path.join(DATA, "edit")
INPUTS, EXP = os.path.join(ROOT, "inputs"), os.path.join(ROOT, "expected")
os.makedirs(INPUTS, exist_ok=True)
os.makedirs(EXP, exist_ok=True)


# ---- the tiny model: bf16 weights on disk, computed in f32 (buffers rounded like make_fixtures.py) ----
def load_components():
    tok = AutoTokenizer.from_pretrained(os.path.join(MODEL, "tokenizer"))
    te = Qwen3Model.from_pretrained(os.path.join(MODEL, "text_encoder"), torch_dtype=torch.float32)
    te.to(torch.bfloat16).to(torch.float32)  # make_fixtures.py cast the whole module, RoPE buffer included
    te.config._attn_implementation = "eager"
    tr = ZImageTransformer2DModel.from_pretrained(os.path.join(MODEL, "transformer"), torch_dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(os.path.join(MODEL, "vae"), torch_dtype=torch.float32)
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(os.path.join(MODEL, "scheduler"))
    return dict(tokenizer=tok, text_encoder=te, transformer=tr, vae=vae, scheduler=sched)


def reinit(model, seed):
    """make_fixtures.py's init: random everywhere (no zero modules), then rounded to bf16."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    model.to(torch.bfloat16)
    return model


def make_controlnet(layout, tr_cfg, seed, places):
    # The real 2.x configs: control_layers_places every other layer (15 of 30), refiner places [0, 1],
    # control_in_dim 33. The tiny transformer has 3 layers. The single file carries no config: zimage
    # infers places k·(n_layers // N) = [0, 1] for its 2 layers; the folder's config says [0, 2].
    mode = {"1.0": None, "2.0": "control_layers", "2.1": "control_noise_refiner"}[layout]
    cn = ZImageControlNetModel(control_layers_places=places, control_refiner_layers_places=None if layout == "1.0" else [0, 1],
                               control_in_dim=16 if layout == "1.0" else 33,
                               add_control_noise_refiner=mode, all_patch_size=(2,), all_f_patch_size=(1,), dim=tr_cfg.dim,
                               n_refiner_layers=tr_cfg.n_refiner_layers, n_heads=tr_cfg.n_heads, n_kv_heads=tr_cfg.n_kv_heads,
                               norm_eps=tr_cfg.norm_eps, qk_norm=tr_cfg.qk_norm)
    return reinit(cn, seed)


# ---- inputs ----
def make_inputs():
    rng = np.random.default_rng(17)
    H, W = 64, 64
    yy, xx = np.mgrid[0:H, 0:W]
    init = np.stack([(xx * 4) % 256, (yy * 4) % 256, ((xx + yy) * 2) % 256], -1).astype(np.float64)
    init[(yy - 30) ** 2 + (xx - 22) ** 2 < 150] = [230, 40, 60]
    init += rng.normal(0, 12, init.shape)
    init = np.clip(init, 0, 255).astype(np.uint8)
    Image.fromarray(init).save(os.path.join(INPUTS, "init.png"))
    mask = np.zeros((H, W), np.uint8)
    mask[16:48, 24:56] = 255  # white repaints
    Image.fromarray(mask).save(os.path.join(INPUTS, "mask.png"))
    ctrl = np.zeros((H, W, 3), np.uint8)
    ctrl[10:12, 5:60] = 255
    ctrl[10:55, 40:42] = 255
    ctrl[(np.abs(np.hypot(yy - 40, xx - 20) - 12) < 1.0)] = 255
    Image.fromarray(ctrl).save(os.path.join(INPUTS, "control.png"))
    # bad inputs for the error tests: a grey mask and a mask of another size
    grey = np.full((H, W), 128, np.uint8)
    Image.fromarray(grey).save(os.path.join(INPUTS, "mask_grey.png"))
    Image.fromarray(mask[:48]).save(os.path.join(INPUTS, "mask_small.png"))
    return [Image.open(os.path.join(INPUTS, n)).convert("RGB") for n in ("init.png", "mask.png", "control.png")]


# ---- recording ----
class Recorder:
    def __init__(self, pipe):
        self.t, self.step, self.enc = {}, 0, 0
        tf, dec, enc = pipe.transformer.forward, pipe.vae.decode, pipe.vae.encode
        sn = pipe.scheduler.scale_noise
        self.restore = []

        def tf_wrap(x, t, cap_feats, *a, **k):
            out = tf(x, t, cap_feats, *a, **k)
            i = self.step
            self.t[f"step{i}.timestep"] = t.detach().float().clone()
            for j, xx in enumerate(x):
                self.t[f"step{i}.x{j}"] = xx.detach().float().clone()
                self.t[f"step{i}.out{j}"] = out[0][j].detach().float().clone()
            self.step += 1
            return out

        def dec_wrap(z, *a, **k):
            self.t["vae_in"] = z.detach().float().clone()
            out = dec(z, *a, **k)
            self.t["vae_out"] = (out[0] if isinstance(out, tuple) else out.sample).detach().float().clone()
            return out

        def enc_wrap(x, *a, **k):
            out = enc(x, *a, **k)
            post = out[0] if isinstance(out, tuple) else out.latent_dist
            n = self.enc
            self.t[f"encode{n}.in"] = x.detach().float().clone()
            self.t[f"encode{n}.mean"] = post.mean.detach().float().clone()
            self.t[f"encode{n}.logvar"] = post.logvar.detach().float().clone()
            self.enc += 1
            return out

        def sn_wrap(sample, timestep, noise=None):
            out = sn(sample, timestep, noise)
            if "scale_noise.sample" not in self.t:
                self.t["scale_noise.sample"] = sample.detach().float().clone()
                self.t["scale_noise.noise"] = noise.detach().float().clone()
                self.t["latents_start"] = out.detach().float().clone()
            return out

        pipe.transformer.forward = tf_wrap
        pipe.vae.decode = dec_wrap
        pipe.vae.encode = enc_wrap
        pipe.scheduler.scale_noise = sn_wrap
        if getattr(pipe, "controlnet", None) is not None:
            cf = pipe.controlnet.forward

            def cn_wrap(x, t, cap_feats, control_context, *a, **k):
                out = cf(x, t, cap_feats, control_context, *a, **k)
                i = self.step
                if i == 0:
                    self.t["control_context"] = control_context[0].detach().float().clone()
                for idx, v in out.items():
                    self.t[f"step{i}.hint{idx}"] = v[0].detach().float().clone()
                return out

            pipe.controlnet.forward = cn_wrap
            self.restore.append(lambda: setattr(pipe.controlnet, "forward", cf))
        self.restore += [lambda: setattr(pipe.transformer, "forward", tf), lambda: setattr(pipe.vae, "decode", dec),
                         lambda: setattr(pipe.vae, "encode", enc), lambda: setattr(pipe.scheduler, "scale_noise", sn)]

    def done(self):
        for r in self.restore:
            r()


def run_case(pipe, name, kwargs, meta):
    rec = Recorder(pipe)
    steps_lat = []

    def cb(p, i, t, kw):
        steps_lat.append(kw["latents"].detach().float().clone())
        return {}

    g = torch.Generator("cpu").manual_seed(meta["seed"])
    with torch.no_grad():
        img = pipe(generator=g, output_type="np", callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["latents"],
                   **kwargs).images[0]
    rec.done()
    t = dict(rec.t)
    t["sigmas"] = pipe.scheduler.sigmas.float().clone()
    t["timesteps"] = pipe.scheduler.timesteps.float().clone()
    for i, l in enumerate(steps_lat):
        t[f"step{i}.latents_after"] = l
    t["image_float"] = torch.from_numpy(img.copy()).float()
    t["image_u8"] = torch.from_numpy((img * 255).round().clip(0, 255).astype("uint8").copy())
    # Keep the test data small: every tensor of step 0, then only each step's output and latents;
    # no copies of the encoder's input image.
    def keep(k):
        if (k.startswith("encode") and k.endswith(".in")) or k == "image_float":  # image_u8 and the PNG hold the image
            return False
        if k.startswith("step") and not k.startswith("step0."):
            return k.endswith(".latents_after") or k.endswith(".out0") or k.endswith(".timestep")
        return True
    save_file({k: v.contiguous() for k, v in t.items() if keep(k)}, os.path.join(EXP, f"{name}.safetensors"))
    meta = dict(meta, steps_run=len(steps_lat))
    json.dump(meta, open(os.path.join(EXP, f"{name}.json"), "w"), ensure_ascii=False, indent=1)
    Image.fromarray(t["image_u8"].numpy()).save(os.path.join(EXP, f"{name}.png"))
    print("case", name, "steps run", len(steps_lat), "img", tuple(img.shape), "mean", float(img.mean()), flush=True)


# ---- Canny reference (numpy, OpenCV's algorithm on a grey image; see src/preprocess/canny.h) ----
def canny_ref(gray_u8, low, high):
    g = gray_u8.astype(np.float64)
    k = np.array([1, 4, 6, 4, 1], np.float64) / 16.0  # 5x5 binomial blur, replicate border

    def conv1d(a, k, axis):
        r = len(k) // 2
        p = np.pad(a, [(r, r) if ax == axis else (0, 0) for ax in range(2)], mode="edge")
        out = np.zeros_like(a)
        for i, c in enumerate(k):
            sl = [slice(None)] * 2
            sl[axis] = slice(i, i + a.shape[axis])
            out += c * p[tuple(sl)]
        return out

    b = conv1d(conv1d(g, k, 0), k, 1)
    p = np.pad(b, 1, mode="edge")
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    mag = np.hypot(gx, gy)
    H, W = mag.shape
    ang = (np.degrees(np.arctan2(gy, gx)) + 180.0) % 180.0
    nms = np.zeros_like(mag)
    mp = np.pad(mag, 1)
    for y in range(H):
        for x in range(W):
            a = ang[y, x]
            if a < 22.5 or a >= 157.5:
                n1, n2 = mp[y + 1, x], mp[y + 1, x + 2]
            elif a < 67.5:
                n1, n2 = mp[y, x], mp[y + 2, x + 2]  # gradient down-right (y grows downwards): up-left and down-right
            elif a < 112.5:
                n1, n2 = mp[y, x + 1], mp[y + 2, x + 1]
            else:
                n1, n2 = mp[y, x + 2], mp[y + 2, x]  # gradient down-left: up-right and down-left
            m = mag[y, x]
            if m >= n1 and m > n2:  # ties: keep the first of a plateau
                nms[y, x] = m
    strong = nms >= high
    weak = (nms >= low) & ~strong
    out = strong.copy()
    stack = list(zip(*np.nonzero(strong)))
    while stack:
        y, x = stack.pop()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                yy, xx = y + dy, x + dx
                if 0 <= yy < H and 0 <= xx < W and weak[yy, xx] and not out[yy, xx]:
                    out[yy, xx] = True
                    stack.append((yy, xx))
    return (out * 255).astype(np.uint8)


def main():
    c = load_components()
    init, mask, control = make_inputs()
    tr_cfg = c["transformer"].config
    prompt = "A red fox standing in fresh snow, watercolor"

    comp = {}
    # VAE encoder unit check: an image [1,3,48,64] in [-1,1] → moments (mean, logvar)
    g = torch.Generator().manual_seed(3)
    x = torch.rand((1, 3, 48, 64), generator=g) * 2 - 1
    with torch.no_grad():
        post = c["vae"].encode(x).latent_dist
    comp["vae_enc.image"], comp["vae_enc.mean"], comp["vae_enc.logvar"] = x, post.mean.float(), post.logvar.float()

    # img2img at two strengths
    p = ZImageImg2ImgPipeline(**c)
    for name, strength, steps, seed in [("img2img_s60", 0.6, 4, 42), ("img2img_s35", 0.35, 5, 7)]:
        run_case(p, name, dict(prompt=prompt, image=init, strength=strength, num_inference_steps=steps, guidance_scale=0.0),
                 dict(mode="img2img", prompt=prompt, init_image="inputs/init.png", strength=strength, num_inference_steps=steps,
                      guidance_scale=0.0, seed=seed, height=64, width=64))
    # inpainting
    p = ZImageInpaintPipeline(**c)
    run_case(p, "inpaint", dict(prompt=prompt, image=init, mask_image=mask, strength=0.75, num_inference_steps=4, guidance_scale=0.0),
             dict(mode="inpaint", prompt=prompt, init_image="inputs/init.png", mask="inputs/mask.png", strength=0.75,
                  num_inference_steps=4, guidance_scale=0.0, seed=5, height=64, width=64))

    # ControlNets: 2.0 as the published single file (control_noise_refiner.* present, before_proj zero), 2.1 as a folder
    cn20 = make_controlnet("2.0", tr_cfg, 31, [0, 1])
    sd = {k: v.contiguous() for k, v in cn20.state_dict().items()}
    cn21_for_keys = make_controlnet("2.1", tr_cfg, 32, [0, 2])
    for k, v in cn21_for_keys.state_dict().items():  # the 2.0 file carries a (zero) control_noise_refiner too
        if k.startswith("control_noise_refiner."):
            sd[k] = torch.zeros_like(v) if "before_proj" in k else v.contiguous()
    save_file(sd, os.path.join(ROOT, "controlnet-2.0.safetensors"))
    cn21 = cn21_for_keys
    cn21.save_pretrained(os.path.join(ROOT, "controlnet-2.1"), safe_serialization=True)
    cn20.to(torch.float32)
    cn21.to(torch.float32)

    for name, cn, layout, scale, seed in [("controlnet20", cn20, "2.0", 0.75, 11), ("controlnet21", cn21, "2.1", 1.0, 12)]:
        p = ZImageControlNetPipeline(controlnet=cn, **c)
        run_case(p, name, dict(prompt=prompt, control_image=control, controlnet_conditioning_scale=scale, num_inference_steps=4,
                               guidance_scale=0.0, height=64, width=64),
                 dict(mode="controlnet", prompt=prompt, control_image="inputs/control.png",
                      controlnet="controlnet-2.0.safetensors" if layout == "2.0" else "controlnet-2.1", layout=layout,
                      control_scale=scale, num_inference_steps=4, guidance_scale=0.0, seed=seed, height=64, width=64))
    # The first Union release (1.0 layout: control_in_dim 16, plain control refiner blocks), as a single file.
    cn10 = make_controlnet("1.0", tr_cfg, 33, [0, 1])
    save_file({k: v.contiguous() for k, v in cn10.state_dict().items()}, os.path.join(ROOT, "controlnet-1.0.safetensors"))
    cn10.to(torch.float32)
    p = ZImageControlNetPipeline(controlnet=cn10, **c)
    run_case(p, "controlnet10", dict(prompt=prompt, control_image=control, controlnet_conditioning_scale=0.6, num_inference_steps=3,
                                     guidance_scale=0.0, height=64, width=64),
             dict(mode="controlnet", prompt=prompt, control_image="inputs/control.png", controlnet="controlnet-1.0.safetensors",
                  layout="1.0", control_scale=0.6, num_inference_steps=3, guidance_scale=0.0, seed=14, height=64, width=64))
    p = ZImageControlNetInpaintPipeline(controlnet=cn21, **c)
    run_case(p, "controlnet_inpaint", dict(prompt=prompt, image=init, mask_image=mask, control_image=control,
                                           controlnet_conditioning_scale=0.9, num_inference_steps=4, guidance_scale=0.0,
                                           height=64, width=64),
             dict(mode="controlnet_inpaint", prompt=prompt, init_image="inputs/init.png", mask="inputs/mask.png",
                  control_image="inputs/control.png", controlnet="controlnet-2.1", layout="2.1", control_scale=0.9,
                  num_inference_steps=4, guidance_scale=0.0, seed=13, height=64, width=64))

    # Canny reference on a synthetic grey image: shapes of several contrasts, a ramp and noise
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:48, 0:64]
    grey = 60.0 + 1.5 * xx
    grey[8:30, 6:26] = 210
    grey[np.hypot(yy - 28, xx - 44) < 11] = 140
    grey[38:44, 10:50] = 95
    grey = np.clip(grey + rng.normal(0, 6, grey.shape), 0, 255).astype(np.uint8)
    comp["canny.gray"] = torch.from_numpy(grey.copy())
    comp["canny.edges_100_200"] = torch.from_numpy(canny_ref(grey, 100, 200))
    comp["canny.edges_50_120"] = torch.from_numpy(canny_ref(grey, 50, 120))
    save_file({k: v.contiguous() for k, v in comp.items()}, os.path.join(EXP, "components.safetensors"))
    print("done", flush=True)


if __name__ == "__main__":
    main()
