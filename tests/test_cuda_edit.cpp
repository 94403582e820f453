// The image-conditioned fixture cases (tests/data/edit: img2img, inpaint, ControlNet 2.0/2.1,
// ControlNet inpaint) with every phase on the GPU, VAE encoder included. Tolerances as the
// text-to-image GPU cases (test_cuda.cpp): --precision f32: image max |diff| <= 1 and every
// step's latents within relative L2 1e-3; bf16: steps within 3e-2, mean |diff| <= 2 of 255.
// Label gpu; skipped without a GPU.
#include <gtest/gtest.h>

#include <cstdlib>

#include "backends/cuda/cuda_ops.h"
#include "edit_cases.h"
#include "io/png.h"
#include "io/safetensors.h"
#include "pipeline/pipeline.h"
#include "test_util.h"

using namespace zi;

namespace {

std::string data_dir() {
  const char* e = std::getenv("ZI_TEST_DATA_DIR");
  return e ? e : ZI_TEST_DATA;
}

std::string tiny_model_dir() {
  const char* e = std::getenv("ZI_TINY_MODEL_DIR");
  return e ? e : test::tiny_model();
}

void run_gpu_edit_case(const std::string& name, DType precision) {
  if (!cuda::available()) GTEST_SKIP() << "no CUDA GPU";
  GenerateOptions o = test::edit_case_options(data_dir(), tiny_model_dir(), name);
  o.text_encoder_device = o.transformer_device = o.vae_device = Device::CUDA;
  o.precision = precision;
  SafetensorsFile ref = SafetensorsFile::open(data_dir() + "/edit/expected/" + name + ".safetensors");
  GenerateHooks hooks;
  double worst = 0;
  hooks.on_latents = [&](int i, const Tensor& lat) {
    Tensor want = ref.load(str_cat("step", i, ".latents_after"), DType::F32);
    worst = std::max(worst, test::rel_l2(lat, want.reshape(lat.shape())));
  };
  const int64_t gpu_before = memory_stats(Device::CUDA).total().current;
  GenerateResult r = generate(o, hooks);
  int w = 0, h = 0;
  std::vector<uint8_t> png = read_png_rgb(data_dir() + "/edit/expected/" + name + ".png", &w, &h);
  ASSERT_EQ(w, r.width);
  ASSERT_EQ(h, r.height);
  const test::PixelDiff pd = test::pixel_diff(png, r.rgb);
  const int maxd = pd.max;
  const double meand = pd.mean;
  std::printf("%s %s: worst step rel_l2 %.3g, image max |diff| %d, mean |diff| %.3f; gpu peak %.2f MiB\n", name.c_str(),
              dtype_name(precision), worst, maxd, meand, double(r.gpu_peak_bytes) / (1 << 20));
  if (precision == DType::F32) {
    EXPECT_LE(maxd, 1) << name;
    EXPECT_LT(worst, 1e-3) << name;
  } else {
    EXPECT_LT(worst, 3e-2) << name;
    EXPECT_LE(meand, 2.0) << name;
  }
  ASSERT_EQ(r.gpu_phases.size(), 4u);  // encode, vae-encode, denoise, decode
  EXPECT_EQ(r.gpu_phases[1].name, "vae-encode");
  EXPECT_EQ(memory_stats(Device::CUDA).total().current, gpu_before);
}

}  // namespace

TEST(CudaEdit, Img2ImgF32) { run_gpu_edit_case("img2img_s60", DType::F32); }
TEST(CudaEdit, InpaintF32) { run_gpu_edit_case("inpaint", DType::F32); }
TEST(CudaEdit, ControlNet20F32) { run_gpu_edit_case("controlnet20", DType::F32); }
TEST(CudaEdit, ControlNet21F32) { run_gpu_edit_case("controlnet21", DType::F32); }
TEST(CudaEdit, ControlNetInpaintF32) { run_gpu_edit_case("controlnet_inpaint", DType::F32); }
TEST(CudaEdit, Img2ImgBf16) { run_gpu_edit_case("img2img_s35", DType::BF16); }
TEST(CudaEdit, InpaintBf16) { run_gpu_edit_case("inpaint", DType::BF16); }
TEST(CudaEdit, ControlNet21Bf16) { run_gpu_edit_case("controlnet21", DType::BF16); }
TEST(CudaEdit, ControlNetInpaintBf16) { run_gpu_edit_case("controlnet_inpaint", DType::BF16); }
