// Image-conditioned modes (issue 17): img2img, inpainting, Fun ControlNet Union, and
// ControlNet + inpainting, as diffusers' ZImageImg2ImgPipeline, ZImageInpaintPipeline,
// ZImageControlNetPipeline and ZImageControlNetInpaintPipeline compute them.
//
// Everything a mode reads from disk (images, mask, the ControlNet's config and tensor shapes)
// is read and checked by prepare_edit_inputs before any phase runs, so a bad input fails in
// milliseconds with nothing written.
//
// Input rules (the reference's VaeImageProcessor, with zimage's restrictions):
//  * PNG, JPEG or WebP files, decoded to RGB8 by io/image_codec (give opaque images: how alpha
//    is removed may differ from PIL's convert("RGB"), which drops it).
//  * No resizing: every input image must be exactly the output size (-W × -H, multiples of
//    16). diffusers resizes mismatched images with PIL's Lanczos filter; zimage refuses them.
//  * RGB → [0, 1] as v / 255 in f32, then 2x − 1.
//  * Mask: PIL's "L" conversion (ITU-R 601 luma, integer rounding), then binarized at 0.5 like
//    the reference (white = repaint). A pixel with luma in 32..223 is "grey" and an error, unless
//    mask_binarize is set, which accepts any mask and thresholds it like diffusers.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "io/checkpoint.h"
#include "models/controlnet.h"

namespace zi {

struct GenerateOptions;

enum class EditMode { Text, Img2Img, Inpaint, ControlNet, ControlNetInpaint };
const char* edit_mode_name(EditMode m);
EditMode edit_mode(const GenerateOptions& o);

// An image file as float RGB [3, H, W] in [-1, 1]; w/h receive the size. `flag` names the option in errors.
Tensor read_image_normalized(const std::string& path, const char* flag, int* w, int* h);
// The size of an input image (reads it): for the CLI's default output size.
void input_image_size(const std::string& path, const char* flag, int* w, int* h);

struct EditInputs {
  EditMode mode = EditMode::Text;
  Tensor init_image;     // [3, H, W] in [-1, 1] (img2img, inpaint, controlnet-inpaint)
  Tensor mask;           // [H, W] 0/1, 1 = repaint
  Tensor control_image;  // [3, H, W] in [-1, 1] (after the preprocessor, if any)
  ControlNetConfig controlnet;
  double strength = 1.0;
  bool needs_encoder() const { return mode != EditMode::Text; }
};

// Reads and checks every input of the mode (before any phase). Throws zi::Error (exit 1) for
// unreadable files, wrong sizes, grey masks and ControlNets that do not fit the transformer.
EditInputs prepare_edit_inputs(const GenerateOptions& o, const ModelFolder& mf);

// Latents of the image-conditioned modes, computed in the vae-encode phase.
struct EditLatents {
  Tensor image_moments;   // [2L, h, w]: posterior of the init image (img2img, inpaint)
  Tensor control;         // [control_in_dim, 1, h, w] control context (ControlNet modes)
  Tensor mask_latent;     // [h, w] nearest-downsampled mask, 1 = repaint (inpaint)
  int64_t encoder_weight_bytes = 0;
};

// Runs the VAE encoder (loaded and freed here) on what the mode needs.
EditLatents encode_edit_inputs(const PhaseContext& ctx, const EditInputs& in, const ModelFolder& mf, DType vae_dtype);

// img2img / inpaint: first denoising step index for `strength` (diffusers get_timesteps:
// t_start = int(max(N − min(N·strength, N), 0))).
int img2img_start_step(int steps, double strength);

// σ·noise + (1 − σ)·sample in f32 (FlowMatchEulerDiscreteScheduler.scale_noise).
void scale_noise(float* out, const float* sample, const float* noise, size_t n, float sigma);

// The inpainting blend after a step: latents = (1 − m)·proper + m·latents, in place.
void inpaint_blend(float* latents, const float* proper, const float* mask_hw, int64_t channels, int64_t hw);

// Canny edges of a grey image (H×W bytes) as 0/255 bytes: 5×5 binomial blur [1 4 6 4 1]/16
// (replicated border), 3×3 Sobel, gradient magnitude sqrt(gx² + gy²), non-maximum suppression
// in four directions, double threshold (magnitude >= high: strong, >= low: weak) and hysteresis
// (weak pixels 8-connected to strong ones are kept). In double precision; the fixture maker's
// numpy implementation is the reference.
std::vector<uint8_t> canny_edges(const uint8_t* gray, int w, int h, double low, double high);

// PIL's RGB → "L": (R·19595 + G·38470 + B·7471 + 0x8000) >> 16.
std::vector<uint8_t> rgb_to_luma(const uint8_t* rgb, int w, int h);

}  // namespace zi
