# Reads run_all.sh's logs in OUT and prints the comparison table (markdown).
# Use: python3 bench/gpu/summarize.py OUT
import os, re, sys

out = sys.argv[1]
def read(name):
    p = os.path.join(out, name)
    return open(p, errors="replace").read() if os.path.exists(p) else ""

D, F, LAYERS, REFINERS = 3840, 10240, 30, 2
def dit_flops(px, caption_tokens=36):
    n = (px // 16) ** 2
    lc = (caption_tokens + 31) // 32 * 32
    per = lambda s: 2 * s * (4 * D * D + 3 * D * F) + 4 * s * s * D
    return LAYERS * per(n + lc) + REFINERS * (per(n) + per(lc))

kern = {m.group(1): (float(m.group(2)), float(m.group(3)), m.group(4))
        for m in re.finditer(r"KERNEL (\S+)\s+([\d.]+) ms\s+([\d.]+) (\S+)", read("kernels.log"))}
gemm = kern.get("gemm_bf16_8192^3", (0, 0, ""))[1]
d2d = kern.get("d2d_copy_2GiB", (0, 0, ""))[1]
card = read("gpu.txt").strip().splitlines()[0] if read("gpu.txt").strip() else "?"

def zimage(px, name=None):
    log = read(name or f"zimage_{px}.log")
    ph = {}
    for m in re.finditer(r"^\s+(encode|denoise|decode)\s+([\d.]+) s\s+\(load ([\d.]+) s, compute ([\d.]+) s(?:, release [\d.]+ s)?\)", log, re.M):
        ph[m.group(1)] = float(m.group(4))  # the last image's (warm) value wins
    g = re.findall(r"accounted peak ([\d.]+) MiB, pool reserved high ([\d.]+) MiB; uploaded ([\d.]+) GB at ([\d.]+) GB/s", log)
    if len(ph) < 3:
        return None
    r = dict(ph, total=sum(ph.values()))
    if g:
        r["peak_gib"], r["reserved_gib"] = float(g[-1][0]) / 1024, float(g[-1][1]) / 1024
        r["load_gbps"] = float(g[-1][3])
    return r

def diffusers(label, px):
    for m in re.finditer(r"RESULT (\S+) (\d+)x\d+ steps=\d+ (.*)", read("diffusers.log")):
        if m.group(1) == label and int(m.group(2)) == px:
            kv = dict(x.split("=") for x in m.group(3).split())
            f = {k: float(v) for k, v in kv.items()}
            return dict(total=f["total"], encode=f.get("encode", 0), denoise=f.get("dit", 0), decode=f.get("vae", 0),
                        peak_gib=f.get("peak_gib", 0), reserved_gib=f.get("reserved_gib", 0))
    return None

print(f"## {card}\n")
print(f"ceilings: bf16 GEMM 8192³ {gemm:.0f} TFLOP/s, d2d copy {d2d:.0f} GB/s")
for k, (ms, rate, unit) in kern.items():
    print(f"- {k}: {ms:.3f} ms, {rate:.1f} {unit}")
print()
print("| run | size | total s | encode s | denoise s | decode s | DiT ms/step | DiT TFLOP/s | peak GiB (alloc / reserved) |")
print("|---|---|---|---|---|---|---|---|---|")
for px in (1024, 512):
    rows = [("zimage", zimage(px)), ("zimage --keep-models", zimage(px, "zimage_keep.log") if px == 1024 else None),
            ("diffusers eager", diffusers("resident", px)), ("diffusers compile", diffusers("compile_blocks", px))]
    for name, r in rows:
        if not r:
            continue
        steps = 8
        ms = r["denoise"] / steps * 1e3
        tf = dit_flops(px) / (ms / 1e3) / 1e12 if ms > 0 else 0
        print(f"| {name} | {px}² | {r['total']:.3f} | {r['encode']:.3f} | {r['denoise']:.3f} | {r['decode']:.3f} | "
              f"{ms:.1f} | {tf:.0f} | {r.get('peak_gib', 0):.2f} / {r.get('reserved_gib', 0):.2f} |")
if gemm:
    for px in (1024, 512):
        fl = dit_flops(px)
        print(f"\nfloor {px}²: DiT {fl / 1e12:.1f} TFLOP per step / {gemm:.0f} TFLOP/s = {fl / gemm / 1e9:.1f} ms per step")
z = zimage(1024)
if z and "load_gbps" in z:
    print(f"\nzimage weight upload: {z['load_gbps']:.2f} GB/s (host→device pinned ceiling: "
          f"{kern.get('h2d_pinned_1GiB', (0, 0, ''))[1]:.1f} GB/s)")

prof = read("zimage_prof.log")
if "PROF" in prof:
    print("\nper-op GPU time, one 1024² image (all phases), from ZI_CUDA_PROFILE=1:")
    for line in prof.splitlines():
        if "PROF" in line or "op profile" in line or re.match(r"\s+(encode|denoise|decode)\s", line):
            print("    " + line.strip())
