// img2img, inpainting and the Fun ControlNet Union against diffusers 0.42.1 (tests/data/edit,
// made by tests/data/makers/make_edit_fixtures.py from the bundled tiny model, f32 on the CPU
// from bf16 weights). Same bar as the text-to-image cases: every step's latents within relative
// L2 1e-4, the decoder output within 1e-4, the 8-bit image within max |diff| <= 1. Also the VAE
// encoder alone, the Canny preprocessor against the maker's numpy reference (exact), and the
// input checks (one-line errors before any phase, no output file).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <sys/wait.h>
#include <fstream>
#include <nlohmann/json.hpp>

#include "edit_cases.h"
#include "io/png.h"
#include "io/safetensors.h"
#include "io/weight_loader.h"
#include "models/controlnet.h"
#include "models/vae_encoder.h"
#include "pipeline/edit.h"
#include "pipeline/memory_plan.h"
#include "pipeline/pipeline.h"
#include "test_util.h"

using namespace zi;

namespace {

std::string edit_path(const std::string& rel) { return test::data_path("edit/" + rel); }

void run_case(const std::string& name) {
  GenerateOptions o = test::edit_case_options(ZI_TEST_DATA, test::tiny_model(), name);
  SafetensorsFile ref = SafetensorsFile::open(edit_path("expected/" + name + ".safetensors"));
  GenerateHooks hooks;
  int steps_seen = 0;
  double worst = 0;
  hooks.on_latents = [&](int i, const Tensor& lat) {
    Tensor want = ref.load(str_cat("step", i, ".latents_after"), DType::F32);
    double e = test::rel_l2(lat, want.reshape(lat.shape()));
    worst = std::max(worst, e);
    EXPECT_LT(e, 1e-4) << name << " step " << i;
    ++steps_seen;
  };
  GenerateResult r = generate(o, hooks);
  std::ifstream is(edit_path("expected/" + name + ".json"));
  EXPECT_EQ(steps_seen, nlohmann::json::parse(is)["steps_run"].get<int>()) << name;
  Tensor vae_out = ref.load("vae_out", DType::F32);
  const double ev = test::rel_l2(r.decoded, vae_out.reshape(r.decoded.shape()));
  EXPECT_LT(ev, 1e-4) << name;
  int w = 0, h = 0;
  std::vector<uint8_t> png = read_png_rgb(edit_path("expected/" + name + ".png"), &w, &h);
  ASSERT_EQ(w, r.width);
  ASSERT_EQ(h, r.height);
  int maxd = 0;
  for (size_t i = 0; i < png.size(); ++i) maxd = std::max(maxd, std::abs(int(png[i]) - int(r.rgb[i])));
  EXPECT_LE(maxd, 1) << name;
  std::printf("[%s] worst step rel L2 %.3g, vae_out rel L2 %.3g, image max |diff| %d\n", name.c_str(), worst, ev, maxd);
  // Phases: the VAE encoder has its own, between the text encoder and the denoiser.
  ASSERT_EQ(r.phases.size(), 4u);
  EXPECT_EQ(r.phases[1].name, "vae-encode");
  EXPECT_EQ(r.phases[2].name, "denoise");
  bool has_enc = false, has_cn = false;
  for (const auto& [n, b] : r.component_weights) {
    if (n == "vae_encoder") has_enc = b > 0;
    if (n == "controlnet") has_cn = b > 0;
  }
  EXPECT_TRUE(has_enc);
  EXPECT_EQ(has_cn, !o.controlnet.empty());
  // Nothing of the encoder or the ControlNet is left once the run is over.
  EXPECT_EQ(memory_stats(Device::CPU).tag(Tag::VaeEncoderWeights).current, 0);
  EXPECT_EQ(memory_stats(Device::CPU).tag(Tag::ControlNetWeights).current, 0);
}

}  // namespace

TEST(Edit, VaeEncoderMatchesReference) {
  SafetensorsFile ref = SafetensorsFile::open(edit_path("expected/components.safetensors"));
  ModelFolder mf = open_model_folder(test::tiny_model());
  TensorStore store = TensorStore::open_dir(mf.vae_dir);
  WeightLoader loader(store, Tag::VaeEncoderWeights, "vae encoder");
  VaeEncoder enc = load_vae_encoder(loader, mf.vae, DType::F32);
  loader.finish();
  Tensor img = ref.load("vae_enc.image", DType::F32);  // [1, 3, 48, 64]
  Tensor mom = vae_encode_moments(enc, img.reshape({3, img.dim(2), img.dim(3)}));
  const int64_t L = mf.vae.latent_channels, hw = mom.dim(1) * mom.dim(2);
  Tensor mean = mom.slice(0, 0, L).contiguous(), logvar = mom.slice(0, L, 2 * L).contiguous();
  Tensor wm = ref.load("vae_enc.mean", DType::F32), wl = ref.load("vae_enc.logvar", DType::F32);
  const double em = test::rel_l2(mean, wm.reshape(mean.shape())), el = test::rel_l2(logvar, wl.reshape(logvar.shape()));
  EXPECT_LT(em, 1e-5);
  EXPECT_LT(el, 1e-5);
  EXPECT_EQ(hw, 6 * 8);
  std::printf("encoder: mean rel L2 %.3g, logvar rel L2 %.3g\n", em, el);
}

// The encoder's peak estimate (the --vram plan's encode-image phase) bounds the accounted peak of
// vae_encode_moments on the CPU, at several sizes and both weight dtypes, and is not loose.
TEST(Edit, VaeEncoderPeakEstimateBoundsTheMeasuredPeak) {
  ModelFolder mf = open_model_folder(test::tiny_model());
  for (DType wdt : {DType::F32, DType::BF16}) {
    TensorStore store = TensorStore::open_dir(mf.vae_dir);
    WeightLoader loader(store, Tag::VaeEncoderWeights, "vae encoder");
    VaeEncoder enc = load_vae_encoder(loader, mf.vae, wdt);
    loader.finish();
    for (auto [h, w] : {std::pair{48, 64}, std::pair{128, 96}, std::pair{256, 256}}) {
      Tensor img = Tensor::empty({3, h, w}, DType::F32);
      for (int64_t i = 0; i < img.numel(); ++i) img.f32()[i] = float(std::sin(0.37 * double(i)));
      const int64_t measured = test::measured_peak([&] { vae_encode_moments(enc, img); });
      const int64_t est = vae_encode_peak_bytes(mf.vae, h, w);
      std::printf("encoder peak %s %dx%d: measured %.2f MB, estimate %.2f MB (%.2fx)\n", dtype_name(wdt), h, w,
                  measured / 1e6, est / 1e6, double(est) / double(measured));
      EXPECT_LE(measured, est) << h << "x" << w;
      EXPECT_LE(double(est), 1.5 * double(measured)) << "estimate too loose for " << h << "x" << w;
    }
  }
}

TEST(Edit, Img2ImgStrength60) { run_case("img2img_s60"); }
TEST(Edit, Img2ImgStrength35) { run_case("img2img_s35"); }
TEST(Edit, Inpaint) { run_case("inpaint"); }
TEST(Edit, ControlNet20SingleFile) { run_case("controlnet20"); }
TEST(Edit, ControlNet21Folder) { run_case("controlnet21"); }
TEST(Edit, ControlNetInpaint) { run_case("controlnet_inpaint"); }
TEST(Edit, ControlNet10SingleFile) { run_case("controlnet10"); }  // the first Union release's layout

TEST(Edit, StartStepLikeDiffusers) {
  EXPECT_EQ(img2img_start_step(4, 0.6), 1);
  EXPECT_EQ(img2img_start_step(5, 0.35), 3);
  EXPECT_EQ(img2img_start_step(10, 0.1), 9);  // in double, like Python (0.1f would give 8)
  EXPECT_EQ(img2img_start_step(8, 1.0), 0);
}

TEST(Edit, ControlNetLayoutsDetected) {
  ModelFolder mf = open_model_folder(test::tiny_model());
  ControlNetConfig a = inspect_controlnet(edit_path("controlnet-2.0.safetensors"), mf.transformer);
  EXPECT_EQ(a.layout, ControlNetLayout::V2_0);
  EXPECT_EQ(a.control_in_dim, 33);
  EXPECT_EQ(a.layers_places, (std::vector<int>{0, 1}));
  ControlNetConfig b = inspect_controlnet(edit_path("controlnet-2.1"), mf.transformer);
  EXPECT_EQ(b.layout, ControlNetLayout::V2_1);
  EXPECT_EQ(b.layers_places, (std::vector<int>{0, 2}));
  ControlNetConfig c = inspect_controlnet(edit_path("controlnet-1.0.safetensors"), mf.transformer);
  EXPECT_EQ(c.layout, ControlNetLayout::V1);
  EXPECT_EQ(c.control_in_dim, 16);
}

TEST(Edit, RandomControlNetFitsItsModel) {
  // make-random-model --controlnet writes a ControlNet with the published config for the preset's transformer.
  test::TempDir d;
  const std::string m = d / "m";
  ASSERT_EQ(std::system((std::string(ZI_BINARY) + " make-random-model --preset tiny --controlnet 2.0 -q " + m).c_str()), 0);
  ModelFolder mf = open_model_folder(m);
  ControlNetConfig c = inspect_controlnet(m + "/controlnet", mf.transformer);
  EXPECT_EQ(c.layout, ControlNetLayout::V2_0);
  EXPECT_EQ(c.layers_places, (std::vector<int>{0, 2}));
  EXPECT_EQ(c.control_in_dim, 33);
}

TEST(Edit, CannyMatchesNumpyReference) {
  SafetensorsFile ref = SafetensorsFile::open(edit_path("expected/components.safetensors"));
  Tensor gray = ref.load("canny.gray");
  const int h = int(gray.dim(0)), w = int(gray.dim(1));
  std::vector<uint8_t> g(gray.data<uint8_t>(), gray.data<uint8_t>() + gray.numel());
  for (auto [key, lo, hi] : {std::tuple{"canny.edges_100_200", 100.0, 200.0}, std::tuple{"canny.edges_50_120", 50.0, 120.0}}) {
    Tensor want = ref.load(key);
    std::vector<uint8_t> got = canny_edges(g.data(), w, h, lo, hi);
    int diff = 0, edges = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      diff += got[i] != want.data<uint8_t>()[i];
      edges += got[i] != 0;
    }
    EXPECT_EQ(diff, 0) << key;
    EXPECT_GT(edges, 50) << key;  // the image has edges: the test cannot pass on an empty map
  }
}

TEST(Edit, CannyFindsASquaresOutline) {
  const int n = 32;
  std::vector<uint8_t> img(size_t(n * n), 0);
  for (int y = 8; y < 24; ++y)
    for (int x = 8; x < 24; ++x) img[size_t(y * n + x)] = 255;
  std::vector<uint8_t> e = canny_edges(img.data(), n, n, 100, 200);
  int inside = 0, border = 0, far = 0;
  for (int y = 0; y < n; ++y)
    for (int x = 0; x < n; ++x) {
      if (!e[size_t(y * n + x)]) continue;
      const bool near_edge = (std::abs(y - 8) <= 1 || std::abs(y - 23) <= 1 || std::abs(x - 8) <= 1 || std::abs(x - 23) <= 1);
      if (near_edge) ++border;
      else if (y > 10 && y < 21 && x > 10 && x < 21) ++inside;
      else ++far;
    }
  EXPECT_GT(border, 40);
  EXPECT_EQ(inside, 0);
  EXPECT_EQ(far, 0);
}

// ---- bad inputs: one line on stderr, exit 1 (file) or 2 (usage), no output file, before any phase ----

namespace {

struct CliResult {
  int code = -1;
  std::string err;
};

CliResult run_cli(const std::string& args, const test::TempDir& d) {
  const std::string errf = d / "stderr.txt";
  std::string cmd = std::string(ZI_BINARY) + " generate --model " + test::tiny_model() + " -p 'x' --steps 2 --seed 1 " + args +
                    " -o " + (d / "out.png") + " 2>" + errf;
  int st = std::system(cmd.c_str());
  CliResult r;
  r.code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  std::ifstream is(errf);
  r.err.assign(std::istreambuf_iterator<char>(is), std::istreambuf_iterator<char>());
  return r;
}

void expect_refused(const std::string& args, int code, const std::string& needle) {
  test::TempDir d;
  CliResult r = run_cli(args, d);
  EXPECT_EQ(r.code, code) << args << "\n" << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;  // one line
  EXPECT_EQ(r.err.rfind("error:", 0), 0u) << r.err;
  EXPECT_NE(r.err.find(needle), std::string::npos) << "'" << needle << "' not in: " << r.err;
  EXPECT_EQ(r.err.find("encode..."), std::string::npos) << "a phase started: " << r.err;
  EXPECT_FALSE(std::filesystem::exists(d / "out.png")) << args;
}

}  // namespace

TEST(Edit, BadInputsAreRefusedBeforeAnyPhase) {
  const std::string in = edit_path("inputs/");
  const std::string init = " --init-image " + in + "init.png";
  const std::string cn = " --controlnet " + edit_path("controlnet-2.1");
  expect_refused("--init-image " + in + "missing.png", 1, "missing.png");
  expect_refused("--init-image " + edit_path("controlnet-2.1/config.json"), 1, "not a PNG, JPEG or WebP");
  expect_refused(init + " --mask " + in + "mask_small.png", 1, "the mask must have the image's size");
  expect_refused(init + " --mask " + in + "mask_grey.png", 1, "not black and white");
  expect_refused(init + " --strength 0", 2, "--strength must be in (0, 1]");
  expect_refused(init + " --strength 1.5", 2, "--strength must be in (0, 1]");
  expect_refused("--control-image " + in + "control.png", 2, "--control-image needs --controlnet");
  expect_refused(init + " -W 128 -H 128", 1, "input images must have the output size");
  expect_refused("--control-image " + in + "control.png" + cn + " --control-preprocess hed", 2, "canny");
}

TEST(Edit, GreyMaskAcceptedWithBinarize) {
  test::TempDir d;
  // --mask-binarize takes the grey mask (level 128 → repaint everywhere); a 1-step run succeeds.
  CliResult r = run_cli("--init-image " + edit_path("inputs/init.png") + " --mask " + edit_path("inputs/mask_grey.png") +
                            " --mask-binarize -q",
                        d);
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_TRUE(std::filesystem::exists(d / "out.png"));
}

TEST(Edit, ControlNetThatDoesNotFitIsRefused) {
  // The 2.0 file with one tensor of the wrong shape, and one whose width is not the transformer's.
  SafetensorsFile src = SafetensorsFile::open(edit_path("controlnet-2.0.safetensors"));
  test::TempDir d;
  std::vector<std::pair<std::string, Tensor>> bad_block, bad_dim;
  for (const TensorInfo& t : src.tensors()) {
    Tensor v = src.load(t, DType::F32);
    if (t.name == "control_layers.1.feed_forward.w1.weight") bad_block.emplace_back(t.name, Tensor::zeros({8, 64}, DType::F32));
    else bad_block.emplace_back(t.name, v);
    if (t.name == "control_all_x_embedder.2-1.weight") bad_dim.emplace_back(t.name, Tensor::zeros({32, 132}, DType::F32));
    else bad_dim.emplace_back(t.name, v);
  }
  write_safetensors(d / "bad_block.safetensors", bad_block);
  write_safetensors(d / "bad_dim.safetensors", bad_dim);
  const std::string ci = " --control-image " + edit_path("inputs/control.png");
  expect_refused(ci + " --controlnet " + (d / "bad_block.safetensors"), 1, "control_layers.1.feed_forward.w1.weight");
  expect_refused(ci + " --controlnet " + (d / "bad_dim.safetensors"), 1, "dim 32 does not fit the transformer's dim 64");
  expect_refused(ci + " --controlnet " + (d / "nothing.safetensors"), 1, "no such file");
}
