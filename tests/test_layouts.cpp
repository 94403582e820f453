// Key layouts, single files and convert (src/io/layouts.*, model_sources.*, convert.*):
// the name mapping against diffusers' converters (tests/data/layouts/tiny_all_in_one.json,
// made by tests/data/makers/make_layouts.py and checked there by diffusers' own converters and
// from_single_file), detection of components and prefixes, fused qkv rows read in place,
// lossless convert round trips, and every layout of the tiny model giving the same image
// (byte-identical PNG) as the diffusers folder. Malformed files give one-line errors.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/check.h"
#include "io/convert.h"
#include "io/layouts.h"
#include "io/model_sources.h"
#include "io/png.h"
#include "io/safetensors.h"
#include "pipeline/pipeline.h"
#include "fixture_cases.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace zi;
using test::error_of;
using test::TempDir;

namespace {

std::vector<KeyTarget> map_dit(const std::string& k) { return map_component_key(Component::Transformer, k); }
std::string map_vae(const std::string& k) {
  auto v = map_component_key(Component::Vae, k, 4);
  return v.size() == 1 ? v[0].target : "?";
}

uint64_t fnv1a64(const uint8_t* p, size_t n) {
  uint64_t h = 0xCBF29CE484222325ull;
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001B3ull;
  return h;
}

std::string hex(uint64_t v) {
  char b[17];
  std::snprintf(b, sizeof b, "%016llx", static_cast<unsigned long long>(v));
  return b;
}

// name → (dtype, shape, checksum) of every tensor of a file.
std::map<std::string, std::string> digest(const std::string& path) {
  SafetensorsFile f = SafetensorsFile::open(path);
  std::map<std::string, std::string> m;
  for (const TensorInfo& t : f.tensors())
    m[t.name] = str_cat(st_dtype_name(t.dtype), " ", shape_str(t.shape), " ", hex(fnv1a64(f.data(t), t.nbytes())));
  return m;
}

// The same for a component's store (diffusers names).
std::map<std::string, std::string> digest(const TensorStore& s) {
  std::map<std::string, std::string> m;
  for (const std::string& n : s.names()) {
    auto e = s.find(n);
    m[n] = str_cat(st_dtype_name(e.info->dtype), " ", shape_str(e.info->shape), " ",
                   hex(fnv1a64(e.file->data(*e.info), e.info->nbytes())));
  }
  return m;
}

// The message of the zi::Error or zi::UsageError that f throws ("" when none).
std::string any_error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  } catch (const UsageError& e) {
    return e.what();
  }
  return "";
}

ConvertOptions to(ConvertTo t, const std::string& component = "", const std::string& dtype = "keep") {
  ConvertOptions o;
  o.to = t;
  o.component = component;
  o.dtype = dtype;
  return o;
}

// The converted tiny model, made once per test run.
struct Converted {
  TempDir dir;
  std::string aio, dit, te, vae;
  Converted() {
    aio = dir / "aio.safetensors";
    convert_model(test::tiny_model(), aio, to(ConvertTo::SingleFile));
    dit = dir / "z_image_tiny.safetensors";  // ComfyUI's diffusion_models/ file
    convert_model(aio, dit, to(ConvertTo::SingleFile, "transformer"));
    te = dir / "qwen_3_tiny.safetensors";  // text_encoders/
    convert_model(aio, te, to(ConvertTo::SingleFile, "text_encoder"));
    vae = dir / "ae.safetensors";  // vae/
    convert_model(aio, vae, to(ConvertTo::SingleFile, "vae"));
  }
};

const Converted& converted() {
  static Converted c;
  return c;
}

GenerateOptions turbo_options() {
  GenerateOptions o = test::fixture_case_options(ZI_TEST_DATA, test::tiny_model(), "turbo");
  o.steps = 2;
  return o;
}

struct Image {
  std::vector<uint8_t> rgb;
  std::string png;  // the encoded file
  std::vector<std::string> notices;
};

Image draw(GenerateOptions o) {
  GenerateHooks h;
  Image img;
  h.on_notice = [&](const std::string& n) { img.notices.push_back(n); };
  GenerateResult r = generate(o, h);
  TempDir d;
  const std::string p = d / "x.png";
  write_png_atomic(p, r.rgb.data(), r.width, r.height, {{"Software", "zimage test"}});
  std::ifstream is(p, std::ios::binary);
  img.png.assign(std::istreambuf_iterator<char>(is), {});
  img.rgb = std::move(r.rgb);
  return img;
}

const Image& folder_image() {
  static Image img = draw(turbo_options());
  return img;
}

void expect_same_image(const Image& a, const char* what) {
  ASSERT_EQ(a.rgb.size(), folder_image().rgb.size()) << what;
  EXPECT_TRUE(a.rgb == folder_image().rgb) << what;
  EXPECT_TRUE(a.png == folder_image().png) << what << ": PNG bytes differ";
}

}  // namespace

// ---- the name mapping ------------------------------------------------------------------

TEST(Layouts, TransformerOriginalNamesMapLikeDiffusers) {
  EXPECT_EQ(map_dit("final_layer.linear.weight")[0].target, "all_final_layer.2-1.linear.weight");
  EXPECT_EQ(map_dit("x_embedder.bias")[0].target, "all_x_embedder.2-1.bias");
  EXPECT_EQ(map_dit("layers.3.attention.out.weight")[0].target, "layers.3.attention.to_out.0.weight");
  EXPECT_EQ(map_dit("noise_refiner.1.attention.q_norm.weight")[0].target, "noise_refiner.1.attention.norm_q.weight");
  EXPECT_EQ(map_dit("context_refiner.0.attention.k_norm.weight")[0].target,
            "context_refiner.0.attention.norm_k.weight");
  const auto qkv = map_dit("layers.0.attention.qkv.weight");
  ASSERT_EQ(qkv.size(), 3u);
  EXPECT_EQ(qkv[0].target, "layers.0.attention.to_q.weight");
  EXPECT_EQ(qkv[1].target, "layers.0.attention.to_k.weight");
  EXPECT_EQ(qkv[2].part, 2);
  EXPECT_EQ(qkv[2].parts, 3);
  EXPECT_TRUE(map_dit("norm_final.weight").empty());  // discarded, as diffusers does
  // Diffusers names map to themselves (no "all_all_x_embedder").
  EXPECT_EQ(map_dit("all_x_embedder.2-1.weight")[0].target, "all_x_embedder.2-1.weight");
  EXPECT_EQ(map_dit("layers.0.attention.to_out.0.weight")[0].target, "layers.0.attention.to_out.0.weight");
}

TEST(Layouts, FluxAeNamesMapLikeDiffusers) {
  EXPECT_EQ(map_vae("decoder.up.3.block.0.conv1.weight"), "decoder.up_blocks.0.resnets.0.conv1.weight");
  EXPECT_EQ(map_vae("decoder.up.1.block.0.nin_shortcut.bias"), "decoder.up_blocks.2.resnets.0.conv_shortcut.bias");
  EXPECT_EQ(map_vae("decoder.up.2.upsample.conv.weight"), "decoder.up_blocks.1.upsamplers.0.conv.weight");
  EXPECT_EQ(map_vae("decoder.mid.block_2.norm1.weight"), "decoder.mid_block.resnets.1.norm1.weight");
  EXPECT_EQ(map_vae("decoder.mid.attn_1.proj_out.weight"), "decoder.mid_block.attentions.0.to_out.0.weight");
  EXPECT_EQ(map_vae("decoder.mid.attn_1.norm.bias"), "decoder.mid_block.attentions.0.group_norm.bias");
  EXPECT_EQ(map_vae("decoder.norm_out.weight"), "decoder.conv_norm_out.weight");
  EXPECT_EQ(map_vae("encoder.down.1.downsample.conv.bias"), "encoder.down_blocks.1.downsamplers.0.conv.bias");
  EXPECT_EQ(map_vae("decoder.conv_in.weight"), "decoder.conv_in.weight");
  EXPECT_TRUE(map_component_key(Component::Vae, "decoder.mid.attn_1.q.weight")[0].squeeze_1x1);
}

TEST(Layouts, OriginalKeyInvertsTheMapping) {
  for (Component c : kAllComponents) {
    const std::string dir = test::tiny_model() + "/" + component_name(c);
    TensorStore s = TensorStore::open_dir(dir);
    for (const std::string& n : s.names()) {
      int part = -1;
      bool unsq = false;
      const std::string k = original_key(c, n, 4, &part, &unsq);
      const auto back = map_component_key(c, k, 4);
      ASSERT_FALSE(back.empty()) << n;
      const KeyTarget& t = back[size_t(std::max(part, 0))];
      EXPECT_EQ(t.target, n) << k;
      EXPECT_EQ(t.squeeze_1x1, unsq) << n;
    }
  }
}

TEST(Layouts, DetectsComponentsPrefixesAndStrays) {
  std::vector<SourceTensor> t = {
      {"model.diffusion_model.layers.0.attention.qkv.weight", {6, 2}},
      {"model.diffusion_model.x_pad_token", {1, 2}},
      {"model.diffusion_model.norm_final.weight", {2}},
      {"text_encoders.qwen3_4b.transformer.model.layers.0.self_attn.q_proj.weight", {2, 2}},
      {"text_encoders.qwen3_4b.transformer.model.embed_tokens.weight", {5, 2}},
      {"first_stage_model.decoder.mid.attn_1.q.weight", {2, 2, 1, 1}},
      {"first_stage_model.decoder.conv_in.weight", {2, 2, 3, 3}},
      {"cond_stage_model.something_else", {1}},
  };
  FileLayout l = analyze_layout(t, "f");
  ASSERT_EQ(l.components.size(), 3u);
  const ComponentMapping* d = l.find(Component::Transformer);
  ASSERT_TRUE(d);
  EXPECT_EQ(d->prefix, "model.diffusion_model.");
  EXPECT_EQ(d->layout, KeyLayout::Original);
  ASSERT_EQ(d->tensors.size(), 4u);  // q, k, v, x_pad_token
  EXPECT_EQ(d->tensors[1].row_begin, 2);
  EXPECT_EQ(d->tensors[1].shape, (Shape{2, 2}));
  EXPECT_EQ(d->dropped.size(), 1u);  // norm_final
  EXPECT_EQ(l.find(Component::TextEncoder)->prefix, "text_encoders.qwen3_4b.transformer.");
  const ComponentMapping* v = l.find(Component::Vae);
  EXPECT_EQ(v->layout, KeyLayout::Original);
  EXPECT_EQ(v->tensors[0].target, "decoder.mid_block.attentions.0.to_q.weight");
  EXPECT_EQ(v->tensors[0].shape, (Shape{2, 2}));
  ASSERT_EQ(l.unclaimed.size(), 1u);
  EXPECT_EQ(t[l.unclaimed[0]].key, "cond_stage_model.something_else");

  // Bare files: a ComfyUI transformer, a transformers text encoder, a diffusers VAE.
  FileLayout b = analyze_layout({{"layers.0.attention.to_q.weight", {2, 2}},
                                 {"layers.0.self_attn.q_proj.weight", {2, 2}},
                                 {"decoder.up_blocks.0.resnets.0.conv1.weight", {2, 2, 3, 3}}},
                                "g");
  ASSERT_EQ(b.components.size(), 3u);
  EXPECT_EQ(b.find(Component::Transformer)->layout, KeyLayout::Diffusers);
  EXPECT_EQ(b.find(Component::TextEncoder)->tensors.size(), 1u);
  EXPECT_EQ(b.find(Component::Vae)->layout, KeyLayout::Diffusers);
}

TEST(Layouts, MalformedMappingsAreOneLineErrors) {
  std::string e = error_of([] { analyze_layout({{"layers.0.attention.qkv.weight", {7, 2}}}, "bad.safetensors"); });
  EXPECT_NE(e.find("bad.safetensors"), std::string::npos) << e;
  EXPECT_NE(e.find("layers.0.attention.qkv.weight"), std::string::npos) << e;
  EXPECT_NE(e.find("multiple of 3"), std::string::npos) << e;
  e = error_of([] {
    analyze_layout({{"layers.0.attention.qkv.weight", {6, 2}}, {"layers.0.attention.to_k.weight", {2, 2}}}, "dup");
  });
  EXPECT_NE(e.find("both map to"), std::string::npos) << e;
  EXPECT_NE(e.find("layers.0.attention.to_k.weight"), std::string::npos) << e;
  EXPECT_EQ(e.find('\n'), std::string::npos);
}

TEST(Layouts, FusedQkvRowsAreReadInPlace) {
  TempDir d;
  const std::string p = d / "f.safetensors";
  std::vector<float> v(12);
  for (size_t i = 0; i < v.size(); ++i) v[i] = float(i);
  write_safetensors(p, {{"layers.0.attention.qkv.weight", Tensor::from_vector(v, {6, 2})}});
  auto lf = LayoutFile::open(p);
  TensorStore s = lf->store(Component::Transformer);
  auto whole = lf->file->find("layers.0.attention.qkv.weight");
  auto k = s.find("layers.0.attention.to_k.weight");
  ASSERT_TRUE(k.file);
  EXPECT_EQ(k.info->shape, (Shape{2, 2}));
  // A byte range of the same mapping: no copy.
  EXPECT_EQ(k.file->data(*k.info), lf->file->data(*whole) + 4 * sizeof(float));
  Tensor t = k.file->load(*k.info, DType::F32);
  EXPECT_EQ(t.f32()[0], 4.0f);
  EXPECT_EQ(t.f32()[3], 7.0f);
}

// ---- convert -------------------------------------------------------------------------

TEST(Convert, SingleFileMatchesTheReferenceConvertersLayout) {
  std::ifstream is(test::data_path("layouts/tiny_all_in_one.json"));
  nlohmann::json j = nlohmann::json::parse(is);
  std::map<std::string, std::string> want;
  for (const auto& e : j["tensors"])
    want[e[0].get<std::string>()] =
        str_cat(e[1].get<std::string>(), " ", shape_str(e[2].get<Shape>()), " ", e[3].get<std::string>());
  const auto got = digest(converted().aio);
  EXPECT_EQ(got.size(), want.size());
  for (const auto& [k, v] : want) {
    auto it = got.find(k);
    ASSERT_NE(it, got.end()) << "missing " << k;
    EXPECT_EQ(it->second, v) << k;
  }
}

TEST(Convert, RoundTripsAreLossless) {
  TempDir d;
  // single file → diffusers folder: every tensor byte-identical to the original folder's.
  const std::string back = d / "back";
  convert_model(converted().aio, back, to(ConvertTo::Diffusers));
  for (Component c : kAllComponents) {
    const std::string sub = std::string("/") + component_name(c);
    EXPECT_EQ(digest(TensorStore::open_dir(back + sub)), digest(TensorStore::open_dir(test::tiny_model() + sub)))
        << component_name(c);
  }
  EXPECT_TRUE(fs::exists(back + "/model_index.json"));
  ModelFolder mf = open_model_folder(back);
  EXPECT_EQ(mf.transformer.dim, 64);
  EXPECT_EQ(mf.vae.block_out_channels, (std::vector<int>{32, 32, 64, 64}));
  // bf16 → f32 → bf16 is exact.
  const std::string f32 = d / "f32.safetensors", bf16 = d / "bf16.safetensors";
  convert_model(converted().dit, f32, to(ConvertTo::SingleFile, "", "f32"));
  convert_model(f32, bf16, to(ConvertTo::SingleFile, "", "bf16"));
  EXPECT_EQ(digest(bf16), digest(converted().dit));
  // The output is refused when it exists; nothing is left behind on failure.
  EXPECT_NE(error_of([&] { convert_model(converted().dit, bf16, to(ConvertTo::SingleFile)); }).find("exists"),
            std::string::npos);
  EXPECT_NE(error_of([&] { convert_model(converted().dit, d / "x", to(ConvertTo::Diffusers, "vae")); })
                .find("holds no vae"),
            std::string::npos);
  EXPECT_FALSE(fs::exists(d / "x"));
  EXPECT_FALSE(fs::exists(d / "x.tmp"));
}

TEST(Convert, InferredConfigsEqualTheFolders) {
  ModelFolder mf = open_model_folder(test::tiny_model());
  auto lf = LayoutFile::open(converted().aio);
  const DitConfig dc = infer_dit_config(lf->store(Component::Transformer));
  EXPECT_EQ(dc.dim, mf.transformer.dim);
  EXPECT_EQ(dc.n_layers, mf.transformer.n_layers);
  EXPECT_EQ(dc.n_refiner_layers, mf.transformer.n_refiner_layers);
  EXPECT_EQ(dc.n_heads, mf.transformer.n_heads);
  EXPECT_EQ(dc.axes_dims, mf.transformer.axes_dims);
  EXPECT_EQ(dc.cap_feat_dim, mf.transformer.cap_feat_dim);
  const Qwen3Config tc = infer_qwen3_config(lf->store(Component::TextEncoder));
  EXPECT_EQ(tc.hidden_size, mf.text_encoder.hidden_size);
  EXPECT_EQ(tc.num_hidden_layers, mf.text_encoder.num_hidden_layers);
  EXPECT_EQ(tc.num_attention_heads, mf.text_encoder.num_attention_heads);
  EXPECT_EQ(tc.num_key_value_heads, mf.text_encoder.num_key_value_heads);
  EXPECT_EQ(tc.head_dim, mf.text_encoder.head_dim);
  EXPECT_EQ(tc.intermediate_size, mf.text_encoder.intermediate_size);
  const VaeConfig vc = infer_vae_config(lf->store(Component::Vae));
  EXPECT_EQ(vc.block_out_channels, mf.vae.block_out_channels);
  EXPECT_EQ(vc.layers_per_block, mf.vae.layers_per_block);
  EXPECT_EQ(vc.latent_channels, mf.vae.latent_channels);
}

// ---- every layout, the same image ---------------------------------------------------

TEST(LayoutImages, AllInOneFileAloneGivesTheFoldersImage) {
  GenerateOptions o = turbo_options();
  o.model_dir.clear();  // no folder: configs from shapes, bundled tokenizer, Turbo's scheduler
  o.diffusion_model_file = converted().aio;
  expect_same_image(draw(o), "all-in-one");
}

TEST(LayoutImages, ComfyUiSplitFilesGiveTheFoldersImage) {
  GenerateOptions o = turbo_options();
  o.model_dir.clear();
  o.diffusion_model_file = converted().dit;
  o.text_encoder_file = converted().te;
  o.vae_file = converted().vae;
  expect_same_image(draw(o), "ComfyUI split files");
}

TEST(LayoutImages, MixedWithTheFolder) {
  TempDir d;
  // A `model.diffusion_model.`-prefixed fine-tune file (civitai style) over the folder.
  const std::string prefixed = d / "finetune.safetensors";
  {
    SafetensorsFile f = SafetensorsFile::open(converted().dit);
    std::vector<std::pair<std::string, Tensor>> t;
    for (const TensorInfo& i : f.tensors()) t.emplace_back("model.diffusion_model." + i.name, f.load(i, DType::BF16));
    write_safetensors(prefixed, t);
  }
  GenerateOptions o = turbo_options();
  o.diffusion_model_file = prefixed;
  expect_same_image(draw(o), "prefixed transformer + folder");
  // The diffusers files themselves, given one by one, and a Flux AE VAE.
  o = turbo_options();
  o.diffusion_model_file = test::tiny_model() + "/transformer/diffusion_pytorch_model.safetensors";
  o.vae_file = converted().vae;
  expect_same_image(draw(o), "diffusers transformer file + Flux AE vae + folder");
}

// ---- fine-tunes with missing or extra tensors ------------------------------------------

namespace {

// The ComfyUI transformer file with tensors dropped or added.
std::string edited_transformer(const TempDir& d, const std::set<std::string>& drop,
                               const std::vector<std::pair<std::string, Tensor>>& add) {
  const std::string p = d / "edited.safetensors";
  SafetensorsFile f = SafetensorsFile::open(converted().dit);
  std::vector<std::pair<std::string, Tensor>> t;
  for (const TensorInfo& i : f.tensors())
    if (!drop.count(i.name)) t.emplace_back(i.name, f.load(i, DType::BF16));
  for (const auto& a : add) t.push_back(a);
  write_safetensors(p, t);
  return p;
}

}  // namespace

TEST(LayoutFineTunes, MissingPadTokensLoadAsZerosWithANotice) {
  TempDir d;
  GenerateOptions o = turbo_options();
  o.diffusion_model_file = edited_transformer(d, {"x_pad_token", "cap_pad_token"}, {});
  Image img = draw(o);
  ASSERT_EQ(img.notices.size(), 2u);
  EXPECT_NE(img.notices[0].find("x_pad_token is missing"), std::string::npos) << img.notices[0];
  EXPECT_NE(img.notices[1].find("cap_pad_token is missing"), std::string::npos) << img.notices[1];
  // Empty (0-element) pad tokens count as missing too.
  TempDir d2;
  o.diffusion_model_file = edited_transformer(d2, {"x_pad_token"}, {{"x_pad_token", Tensor::empty({0}, DType::BF16)}});
  EXPECT_EQ(draw(o).notices.size(), 1u);
}

TEST(LayoutFineTunes, StrayTensorsAreNamed) {
  TempDir d;
  GenerateOptions o = turbo_options();
  // Tensors of no component (a trainer's extras): loaded, with one notice naming them.
  o.diffusion_model_file = edited_transformer(d, {}, {{"ema_step", Tensor::from_vector({1.0f}, {1})}});
  Image img = draw(o);
  ASSERT_EQ(img.notices.size(), 1u);
  EXPECT_NE(img.notices[0].find("'ema_step'"), std::string::npos) << img.notices[0];
  EXPECT_TRUE(img.rgb == folder_image().rgb);
  // Transformer-looking tensors the model does not have: one error naming them.
  TempDir d2;
  o.diffusion_model_file =
      edited_transformer(d2, {}, {{"layers.0.attention.extra.weight", Tensor::from_vector({1.0f}, {1})}});
  const std::string e = error_of([&] { draw(o); });
  EXPECT_NE(e.find("unexpected tensors: layers.0.attention.extra.weight"), std::string::npos) << e;
  // A required tensor missing: one error naming it.
  TempDir d3;
  o.diffusion_model_file = edited_transformer(d3, {"layers.1.attention.qkv.weight"}, {});
  const std::string m = error_of([&] { draw(o); });
  EXPECT_NE(m.find("missing tensors: layers.1.attention.to_q.weight, layers.1.attention.to_k.weight"), std::string::npos) << m;
}

TEST(LayoutFineTunes, BadInputsAreOneLineErrorsBeforeWork) {
  GenerateOptions o = turbo_options();
  o.model_dir.clear();
  o.diffusion_model_file = converted().dit;
  std::string e = any_error_of([&] { validate_model_inputs(o); });
  EXPECT_NE(e.find("no text_encoder given"), std::string::npos) << e;
  o = turbo_options();
  o.vae_file = converted().te;
  e = error_of([&] { validate_model_inputs(o); });
  EXPECT_NE(e.find("--vae"), std::string::npos) << e;
  EXPECT_NE(e.find("holds no vae tensors"), std::string::npos) << e;
  o = turbo_options();
  o.text_encoder_file = "/nonexistent.safetensors";
  e = any_error_of([&] { validate_model_inputs(o); });
  EXPECT_NE(e.find("--text-encoder '/nonexistent.safetensors'"), std::string::npos) << e;
  // A text encoder that does not fit the transformer.
  TempDir d;
  const std::string small = d / "te.safetensors";
  write_safetensors(small, {{"model.embed_tokens.weight", Tensor::zeros({10, 8}, DType::F32)},
                            {"model.layers.0.self_attn.q_proj.weight", Tensor::zeros({8, 8}, DType::F32)},
                            {"model.layers.0.self_attn.k_proj.weight", Tensor::zeros({8, 8}, DType::F32)},
                            {"model.layers.0.self_attn.q_norm.weight", Tensor::zeros({4}, DType::F32)},
                            {"model.layers.0.mlp.gate_proj.weight", Tensor::zeros({16, 8}, DType::F32)},
                            {"model.layers.1.self_attn.q_norm.weight", Tensor::zeros({4}, DType::F32)}});
  o = turbo_options();
  o.text_encoder_file = small;
  e = error_of([&] { validate_model_inputs(o); });
  EXPECT_NE(e.find("do not belong together"), std::string::npos) << e;
  EXPECT_EQ(e.find('\n'), std::string::npos);
}

TEST(Layouts, BundledTokenizerIsFound) {
  const std::string t = bundled_tokenizer_dir();
  EXPECT_TRUE(fs::exists(fs::path(t) / "tokenizer.json") || fs::exists(fs::path(t) / "vocab.json")) << t;
}
