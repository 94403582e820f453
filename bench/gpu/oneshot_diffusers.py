# The peer of `zimage generate` as a one-shot process (issue 19): diffusers' ZImagePipeline
# loaded with from_pretrained from a model folder, moved to the GPU, one image, PNG written.
# The caller times the whole process (exec to PNG on disk); the phases are printed here.
# Usage: [DIFFUSERS_SRC=dir] python3 oneshot_diffusers.py MODEL_DIR OUT.png [SIZE] [STEPS]
import os, sys, time

t_start = time.perf_counter()
try:
    import diffusers  # noqa
except Exception:
    sys.path.insert(0, os.environ.get("DIFFUSERS_SRC", ""))
import torch
from diffusers import ZImagePipeline

model, out = sys.argv[1], sys.argv[2]
size = int(sys.argv[3]) if len(sys.argv) > 3 else 1024
steps = int(sys.argv[4]) if len(sys.argv) > 4 else 8
dev = "cuda" if torch.cuda.is_available() else "cpu"
t_import = time.perf_counter()
pipe = ZImagePipeline.from_pretrained(model, torch_dtype=torch.bfloat16)
t_load = time.perf_counter()
pipe.to(dev)
if dev == "cuda":
    torch.cuda.synchronize()
t_move = time.perf_counter()
image = pipe("A cinematic photo of a red fox standing in fresh snow at dawn", height=size, width=size,
             num_inference_steps=steps, guidance_scale=0.0,
             generator=torch.Generator(dev).manual_seed(1)).images[0]
t_gen = time.perf_counter()
image.save(out)
t_end = time.perf_counter()
print(f"ONESHOT_DIFFUSERS import_s={t_import - t_start:.3f} from_pretrained_s={t_load - t_import:.3f} "
      f"to_device_s={t_move - t_load:.3f} generate_s={t_gen - t_move:.3f} save_s={t_end - t_gen:.3f} "
      f"in_python_s={t_end - t_start:.3f}", flush=True)
