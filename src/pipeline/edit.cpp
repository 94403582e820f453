// Image-conditioned modes: input reading and checks, the VAE-encode phase's work, and the
// small pieces of arithmetic the denoising loop needs (pipeline.cpp drives them).
// Ref: diffusers pipelines/z_image/pipeline_z_image_{img2img,inpaint,controlnet,controlnet_inpaint}.py,
// image_processor.py (VaeImageProcessor), schedulers/scheduling_flow_match_euler_discrete.py (scale_noise).
#include "pipeline/edit.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>

#include "core/check.h"
#include "io/image_codec.h"
#include "io/safetensors.h"
#include "io/weight_loader.h"
#include "models/vae_encoder.h"
#include "pipeline/pipeline.h"

namespace zi {

const char* edit_mode_name(EditMode m) {
  switch (m) {
    case EditMode::Text: return "text-to-image";
    case EditMode::Img2Img: return "img2img";
    case EditMode::Inpaint: return "inpaint";
    case EditMode::ControlNet: return "controlnet";
    case EditMode::ControlNetInpaint: return "controlnet-inpaint";
  }
  return "?";
}

EditMode edit_mode(const GenerateOptions& o) {
  if (!o.control_image.empty()) return o.mask_image.empty() ? EditMode::ControlNet : EditMode::ControlNetInpaint;
  if (!o.init_image.empty()) return o.mask_image.empty() ? EditMode::Img2Img : EditMode::Inpaint;
  return EditMode::Text;
}

namespace {

// PNG, JPEG or WebP through the image codecs (io/image_codec.h), as RGB8.
std::vector<uint8_t> read_rgb(const std::string& path, const char* flag, int* w, int* h) {
  if (!std::filesystem::exists(path)) throw Error(str_cat(flag, " '", path, "': no such file"));
  DecodedImage img;
  try {
    img = read_image_file(path);
  } catch (const Error& e) {
    throw Error(str_cat(flag, ": ", e.what()));
  }
  *w = img.width;
  *h = img.height;
  return std::move(img.rgb);
}

void check_size(const char* flag, const std::string& path, int w, int h, const GenerateOptions& o) {
  if (w != o.width || h != o.height)
    throw Error(str_cat(flag, " '", path, "' is ", w, "x", h, " but the output is ", o.width, "x", o.height,
                        ": input images must have the output size (zimage does not resize them; without -W/-H the "
                        "output takes the image's size)"));
}

Tensor to_normalized(const std::vector<uint8_t>& rgb, int w, int h) {
  Tensor t = Tensor::empty({3, h, w}, DType::F32);
  float* d = t.f32();
  const int64_t n = int64_t(w) * h;
  for (int64_t i = 0; i < n; ++i)
    for (int c = 0; c < 3; ++c) {
      const float v = float(rgb[size_t(i * 3 + c)]) / 255.0f;  // pil_to_numpy
      d[c * n + i] = 2.0f * v - 1.0f;                          // normalize
    }
  return t;
}

}  // namespace

std::vector<uint8_t> rgb_to_luma(const uint8_t* rgb, int w, int h) {
  std::vector<uint8_t> l(size_t(w) * size_t(h));
  for (size_t i = 0; i < l.size(); ++i)
    l[i] = uint8_t((uint32_t(rgb[3 * i]) * 19595u + uint32_t(rgb[3 * i + 1]) * 38470u + uint32_t(rgb[3 * i + 2]) * 7471u +
                    0x8000u) >> 16);
  return l;
}

Tensor read_image_normalized(const std::string& path, const char* flag, int* w, int* h) {
  std::vector<uint8_t> rgb = read_rgb(path, flag, w, h);
  return to_normalized(rgb, *w, *h);
}

void input_image_size(const std::string& path, const char* flag, int* w, int* h) { (void)read_rgb(path, flag, w, h); }

EditInputs prepare_edit_inputs(const GenerateOptions& o, const ModelFolder& mf) {
  EditInputs in;
  in.mode = edit_mode(o);
  if (in.mode == EditMode::Text) return in;
  int w = 0, h = 0;
  if (!o.init_image.empty()) {
    in.init_image = read_image_normalized(o.init_image, "--init-image", &w, &h);
    check_size("--init-image", o.init_image, w, h, o);
  }
  if (!o.mask_image.empty()) {
    std::vector<uint8_t> rgb = read_rgb(o.mask_image, "--mask", &w, &h);
    if (w != o.width || h != o.height)
      throw Error(str_cat("--mask '", o.mask_image, "' is ", w, "x", h, " but the image is ", o.width, "x", o.height,
                          ": the mask must have the image's size"));
    std::vector<uint8_t> l = rgb_to_luma(rgb.data(), w, h);
    in.mask = Tensor::empty({h, w}, DType::F32);
    for (size_t i = 0; i < l.size(); ++i) {
      if (!o.mask_binarize && l[i] > 31 && l[i] < 224)
        throw Error(str_cat("--mask '", o.mask_image, "' is not black and white: pixel (", i % size_t(w), ", ", i / size_t(w),
                            ") has grey level ", int(l[i]), " (allowed: 0-31 keep, 224-255 repaint; --mask-binarize "
                            "thresholds any mask at 128 like diffusers)"));
      in.mask.f32()[i] = float(l[i]) / 255.0f < 0.5f ? 0.0f : 1.0f;  // VaeImageProcessor.binarize
    }
  }
  if (!o.control_image.empty()) {
    std::vector<uint8_t> rgb = read_rgb(o.control_image, "--control-image", &w, &h);
    check_size("--control-image", o.control_image, w, h, o);
    if (o.control_preprocess == "canny") {
      std::vector<uint8_t> e = canny_edges(rgb_to_luma(rgb.data(), w, h).data(), w, h, o.canny_low, o.canny_high);
      for (size_t i = 0; i < e.size(); ++i) rgb[3 * i] = rgb[3 * i + 1] = rgb[3 * i + 2] = e[i];
    }
    in.control_image = to_normalized(rgb, w, h);
    in.controlnet = inspect_controlnet(o.controlnet, mf.transformer);
    if (in.mode == EditMode::ControlNetInpaint)
      ZI_CHECK(in.controlnet.control_in_dim == 2 * mf.transformer.in_channels + 1, "--controlnet '", o.controlnet,
               "': inpainting needs a ControlNet with control_in_dim ", 2 * mf.transformer.in_channels + 1,
               " (Union 2.0 or 2.1), this one has ", in.controlnet.control_in_dim);
  }
  if (in.mode == EditMode::Img2Img) in.strength = o.strength < 0 ? 0.6 : o.strength;
  if (in.mode == EditMode::Inpaint) in.strength = o.strength < 0 ? 1.0 : o.strength;
  return in;
}

int img2img_start_step(int steps, double strength) {
  const double init = std::min(double(steps) * strength, double(steps));
  return int(std::max(double(steps) - init, 0.0));
}

void scale_noise(float* out, const float* sample, const float* noise, size_t n, float sigma) {
  const float keep = 1.0f - sigma;
  for (size_t i = 0; i < n; ++i) {
    const float a = sigma * noise[i];
    const float b = keep * sample[i];
    out[i] = a + b;
  }
}

void inpaint_blend(float* latents, const float* proper, const float* mask_hw, int64_t channels, int64_t hw) {
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t i = 0; i < hw; ++i) {
      const float m = mask_hw[i];
      const float a = (1.0f - m) * proper[c * hw + i];
      const float b = m * latents[c * hw + i];
      latents[c * hw + i] = a + b;
    }
}

namespace {

// F.interpolate(mode="nearest") from [H, W] to [H/f, W/f]: source index floor(i · f).
Tensor nearest_down(const Tensor& m, int f) {
  const int64_t H = m.dim(0), W = m.dim(1), h = H / f, w = W / f;
  Tensor o = Tensor::empty({h, w}, DType::F32);
  for (int64_t y = 0; y < h; ++y)
    for (int64_t x = 0; x < w; ++x) o.f32()[y * w + x] = m.f32()[(y * f) * W + x * f];
  return o;
}

// image · (mask < 0.5): the pixels to repaint become 0.
Tensor masked(const Tensor& image, const Tensor& mask) {
  Tensor o = image.clone();
  const int64_t n = mask.numel();
  for (int64_t c = 0; c < 3; ++c)
    for (int64_t i = 0; i < n; ++i) o.f32()[c * n + i] = o.f32()[c * n + i] * (mask.f32()[i] < 0.5f ? 1.0f : 0.0f);
  return o;
}

}  // namespace

EditLatents encode_edit_inputs(const PhaseContext& ctx, const EditInputs& in, const ModelFolder& mf, DType vae_dtype) {
  EditLatents out;
  TensorStore store = TensorStore::open_dir(mf.vae_dir);
  WeightLoader loader(store, Tag::VaeEncoderWeights, "vae encoder", ctx);
  VaeEncoder enc = load_vae_encoder(loader, mf.vae, vae_dtype);
  loader.finish();
  out.encoder_weight_bytes = loader.bytes_loaded();
  const int sf = mf.vae.scale_factor();
  if (in.mode == EditMode::Img2Img || in.mode == EditMode::Inpaint) {
    out.image_moments = vae_encode_moments(enc, in.init_image);
    // The inpaint pipeline also encodes the masked image, but never uses those latents (its third
    // generator draw comes after the noise): skipped.
    if (in.mode == EditMode::Inpaint) out.mask_latent = nearest_down(in.mask, sf);
  }
  if (in.mode == EditMode::ControlNet || in.mode == EditMode::ControlNetInpaint) {
    const int64_t L = mf.vae.latent_channels;
    Tensor cl = vae_latents_from_moments(vae_encode_moments(enc, in.control_image), mf.vae, nullptr);  // argmax
    const int64_t h = cl.dim(1), w = cl.dim(2), hw = h * w, C = in.controlnet.control_in_dim;
    out.control = Tensor::zeros({C, 1, h, w}, DType::F32);
    float* d = out.control.f32();
    std::copy(cl.f32(), cl.f32() + L * hw, d);
    if (in.mode == EditMode::ControlNetInpaint) {
      Tensor ml = nearest_down(in.mask, sf);
      for (int64_t i = 0; i < hw; ++i) d[L * hw + i] = 1.0f - ml.f32()[i];
      Tensor il = vae_latents_from_moments(vae_encode_moments(enc, masked(in.init_image, in.mask)), mf.vae, nullptr);
      std::copy(il.f32(), il.f32() + L * hw, d + (L + 1) * hw);
    }
  }
  return out;
}

// ---- Canny ----------------------------------------------------------------------------------

std::vector<uint8_t> canny_edges(const uint8_t* gray, int w, int h, double low, double high) {
  const int64_t W = w, H = h, n = W * H;
  auto clampi = [](int64_t v, int64_t lo, int64_t hi) { return std::max(lo, std::min(hi, v)); };
  static const double k[5] = {1 / 16.0, 4 / 16.0, 6 / 16.0, 4 / 16.0, 1 / 16.0};
  std::vector<double> a(static_cast<size_t>(n)), b(static_cast<size_t>(n));
  // Vertical pass then horizontal, replicated border (the reference's order).
  for (int64_t y = 0; y < H; ++y)
    for (int64_t x = 0; x < W; ++x) {
      double s = 0;
      for (int i = 0; i < 5; ++i) s += k[i] * double(gray[clampi(y + i - 2, 0, H - 1) * W + x]);
      a[size_t(y * W + x)] = s;
    }
  for (int64_t y = 0; y < H; ++y)
    for (int64_t x = 0; x < W; ++x) {
      double s = 0;
      for (int i = 0; i < 5; ++i) s += k[i] * a[size_t(y * W + clampi(x + i - 2, 0, W - 1))];
      b[size_t(y * W + x)] = s;
    }
  auto at = [&](int64_t y, int64_t x) { return b[size_t(clampi(y, 0, H - 1) * W + clampi(x, 0, W - 1))]; };
  std::vector<double> mag(static_cast<size_t>(n)), ang(static_cast<size_t>(n));
  for (int64_t y = 0; y < H; ++y)
    for (int64_t x = 0; x < W; ++x) {
      const double gx = (at(y - 1, x + 1) + 2 * at(y, x + 1) + at(y + 1, x + 1)) - (at(y - 1, x - 1) + 2 * at(y, x - 1) + at(y + 1, x - 1));
      const double gy = (at(y + 1, x - 1) + 2 * at(y + 1, x) + at(y + 1, x + 1)) - (at(y - 1, x - 1) + 2 * at(y - 1, x) + at(y - 1, x + 1));
      mag[size_t(y * W + x)] = std::hypot(gx, gy);
      ang[size_t(y * W + x)] = std::fmod(std::atan2(gy, gx) * (180.0 / M_PI) + 180.0, 180.0);
    }
  auto m0 = [&](int64_t y, int64_t x) { return (y < 0 || y >= H || x < 0 || x >= W) ? 0.0 : mag[size_t(y * W + x)]; };
  std::vector<uint8_t> strong(static_cast<size_t>(n), 0), weak(static_cast<size_t>(n), 0), out(static_cast<size_t>(n), 0);
  for (int64_t y = 0; y < H; ++y)
    for (int64_t x = 0; x < W; ++x) {
      const double a2 = ang[size_t(y * W + x)], m = mag[size_t(y * W + x)];
      double n1, n2;
      if (a2 < 22.5 || a2 >= 157.5) n1 = m0(y, x - 1), n2 = m0(y, x + 1);
      else if (a2 < 67.5) n1 = m0(y - 1, x - 1), n2 = m0(y + 1, x + 1);
      else if (a2 < 112.5) n1 = m0(y - 1, x), n2 = m0(y + 1, x);
      else n1 = m0(y - 1, x + 1), n2 = m0(y + 1, x - 1);
      const double v = (m >= n1 && m > n2) ? m : 0.0;
      if (v >= high) strong[size_t(y * W + x)] = 1;
      else if (v >= low) weak[size_t(y * W + x)] = 1;
    }
  std::vector<int64_t> stack;
  for (int64_t i = 0; i < n; ++i)
    if (strong[size_t(i)]) {
      out[size_t(i)] = 255;
      stack.push_back(i);
    }
  while (!stack.empty()) {
    const int64_t i = stack.back();
    stack.pop_back();
    const int64_t y = i / W, x = i % W;
    for (int64_t dy = -1; dy <= 1; ++dy)
      for (int64_t dx = -1; dx <= 1; ++dx) {
        const int64_t yy = y + dy, xx = x + dx;
        if (yy < 0 || yy >= H || xx < 0 || xx >= W) continue;
        const size_t j = size_t(yy * W + xx);
        if (weak[j] && !out[j]) {
          out[j] = 255;
          stack.push_back(int64_t(j));
        }
      }
  }
  return out;
}

}  // namespace zi
