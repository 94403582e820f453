#include "tools/random_model.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <future>
#include <nlohmann/json.hpp>

#include "core/check.h"
#include "core/parallel.h"
#include "io/checkpoint.h"
#include "io/weight_loader.h"
#include "models/qwen3_encoder.h"
#include "models/vae_decoder.h"
#include "models/zimage_dit.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace zi {

// ---- initialisation scales -------------------------------------------------------------
//
// The weights only have to keep a forward pass finite and input-dependent (benchmarks,
// memory tests, smoke runs); they are not meant to produce images. Chosen scales:
//  * Linear and conv weights: N(0, 1/fan_in), fan_in = in_features·kh·kw. Each projection
//    then roughly preserves the RMS of its input, so activations stay O(1) per layer and the
//    residual streams grow only like √(layers) — nothing overflows bf16 or saturates softmax.
//  * Biases (linear, conv, GroupNorm): 0.02·N(0, 1), small but never all zero.
//  * Norm gains (RMSNorm, q/k norms, GroupNorm weights): 1 + 0.1·N(0, 1); z is bounded by
//    ±2√3 (Irwin–Hall), so every gain lies in [0.65, 1.35]: positive, ≈ 1.
//  * Qwen3 token embeddings: N(0, 1) (torch's nn.Embedding default). The residual stream
//    starts at unit scale, so the token signal is not drowned by the first layer's output.
//  * DiT pad tokens (x_pad_token, cap_pad_token): N(0, 1), the scale of the embedded tokens
//    they stand in for (x_embedder with N(0, 1/64) weights maps unit latents to unit tokens).
//  * The adaLN projections get the plain 1/fan_in rule: with SiLU(t_emb) inputs of RMS ≈ 0.6
//    the scales 1 + s stay around 1 ± 0.6 and the gates tanh(g) are O(0.5).
namespace {

constexpr float kBiasStd = 0.02f;
constexpr float kNormStd = 0.1f;

struct TensorList {
  StDType dtype;
  std::vector<RandomTensor>* out;
  void add(std::string name, Shape shape, float mean, float stddev) {
    out->push_back(RandomTensor{std::move(name), std::move(shape), dtype, mean, stddev});
  }
  // nn.Linear(in, out[, bias]).
  void linear(const std::string& p, int64_t out_f, int64_t in_f, bool bias) {
    add(p + ".weight", {out_f, in_f}, 0.f, float(1.0 / std::sqrt(double(in_f))));
    if (bias) add(p + ".bias", {out_f}, 0.f, kBiasStd);
  }
  // nn.Conv2d(in, out, k) with bias.
  void conv(const std::string& p, int64_t out_c, int64_t in_c, int64_t k) {
    add(p + ".weight", {out_c, in_c, k, k}, 0.f, float(1.0 / std::sqrt(double(in_c * k * k))));
    add(p + ".bias", {out_c}, 0.f, kBiasStd);
  }
  void norm(const std::string& p, int64_t c, bool bias) {
    add(p + ".weight", {c}, 1.f, kNormStd);
    if (bias) add(p + ".bias", {c}, 0.f, kBiasStd);
  }
};

std::string dump(const json& j) { return j.dump(2) + "\n"; }

StDType st_of(DType d) {
  switch (d) {
    case DType::F32: return StDType::F32;
    case DType::BF16: return StDType::BF16;
    default: fail(str_cat("make-random-model: storage dtype ", dtype_name(d), " is not supported (f32 or bf16)"));
  }
}

const char* torch_dtype_name(StDType t) { return t == StDType::F32 ? "float32" : "bfloat16"; }

// ---- configs (spec §2.1, §3.1, §4.3, §5.1, §6.2) ----

json model_index_json(const char* diffusers_version) {
  return json{{"_class_name", "ZImagePipeline"},
              {"_diffusers_version", diffusers_version},
              {"scheduler", {"diffusers", "FlowMatchEulerDiscreteScheduler"}},
              {"text_encoder", {"transformers", "Qwen3Model"}},
              {"tokenizer", {"transformers", "Qwen2Tokenizer"}},
              {"transformer", {"diffusers", "ZImageTransformer2DModel"}},
              {"vae", {"diffusers", "AutoencoderKL"}}};
}

// Z-Image-Turbo's values plus FlowMatchEulerDiscreteScheduler's class defaults (§4.3).
json scheduler_json(const char* diffusers_version) {
  return json{{"_class_name", "FlowMatchEulerDiscreteScheduler"},
              {"_diffusers_version", diffusers_version},
              {"base_image_seq_len", 256},
              {"base_shift", 0.5},
              {"invert_sigmas", false},
              {"max_image_seq_len", 4096},
              {"max_shift", 1.15},
              {"num_train_timesteps", 1000},
              {"shift", 3.0},
              {"shift_terminal", nullptr},
              {"stochastic_sampling", false},
              {"time_shift_type", "exponential"},
              {"use_beta_sigmas", false},
              {"use_dynamic_shifting", false},
              {"use_exponential_sigmas", false},
              {"use_karras_sigmas", false}};
}

json turbo_text_encoder_json(StDType dt) {
  return json{{"architectures", {"Qwen3ForCausalLM"}},
              {"attention_bias", false},
              {"attention_dropout", 0.0},
              {"bos_token_id", 151643},
              {"eos_token_id", 151645},
              {"head_dim", 128},
              {"hidden_act", "silu"},
              {"hidden_size", 2560},
              {"initializer_range", 0.02},
              {"intermediate_size", 9728},
              {"max_position_embeddings", 40960},
              {"max_window_layers", 36},
              {"model_type", "qwen3"},
              {"num_attention_heads", 32},
              {"num_hidden_layers", 36},
              {"num_key_value_heads", 8},
              {"rms_norm_eps", 1e-6},
              {"rope_scaling", nullptr},
              {"rope_theta", 1000000.0},
              {"sliding_window", nullptr},
              {"tie_word_embeddings", true},
              {"torch_dtype", torch_dtype_name(dt)},
              {"transformers_version", "4.51.0"},
              {"use_cache", true},
              {"use_sliding_window", false},
              {"vocab_size", 151936}};
}

// The bundled models/tiny-zimage text_encoder/config.json (transformers 5 layout).
json tiny_text_encoder_json(StDType dt) {
  return json{{"architectures", {"Qwen3Model"}},
              {"attention_bias", false},
              {"attention_dropout", 0.0},
              {"bos_token_id", nullptr},
              {"dtype", torch_dtype_name(dt)},
              {"eos_token_id", nullptr},
              {"head_dim", 16},
              {"hidden_act", "silu"},
              {"hidden_size", 32},
              {"initializer_range", 0.02},
              {"intermediate_size", 64},
              {"layer_types", {"full_attention", "full_attention", "full_attention"}},
              {"max_position_embeddings", 2048},
              {"max_window_layers", 28},
              {"model_type", "qwen3"},
              {"num_attention_heads", 4},
              {"num_hidden_layers", 3},
              {"num_key_value_heads", 2},
              {"pad_token_id", nullptr},
              {"rms_norm_eps", 1e-6},
              {"rope_parameters", {{"rope_theta", 1000000.0}, {"rope_type", "default"}}},
              {"sliding_window", nullptr},
              {"tie_word_embeddings", false},
              {"transformers_version", "5.17.0"},
              {"use_cache", true},
              {"use_sliding_window", false},
              {"vocab_size", 151936}};
}

json transformer_json(bool turbo) {
  json j{{"_class_name", "ZImageTransformer2DModel"},
         {"_diffusers_version", turbo ? "0.36.0.dev0" : "0.40.0.dev0"},
         {"all_f_patch_size", {1}},
         {"all_patch_size", {2}},
         {"in_channels", 16},
         {"n_refiner_layers", 2},
         {"norm_eps", 1e-5},
         {"qk_norm", true},
         {"rope_theta", 256.0},
         {"t_scale", 1000.0}};
  if (turbo) {
    j["axes_dims"] = {32, 48, 48};
    j["axes_lens"] = {1536, 512, 512};
    j["cap_feat_dim"] = 2560;
    j["dim"] = 3840;
    j["n_heads"] = 30;
    j["n_kv_heads"] = 30;
    j["n_layers"] = 30;
  } else {
    j["axes_dims"] = {8, 12, 12};
    j["axes_lens"] = {1024, 512, 512};
    j["cap_feat_dim"] = 32;
    j["dim"] = 64;
    j["n_heads"] = 2;
    j["n_kv_heads"] = 2;
    j["n_layers"] = 3;
    j["siglip_feat_dim"] = nullptr;
  }
  return j;
}

json vae_json(bool turbo) {
  const std::vector<int> ch = turbo ? std::vector<int>{128, 256, 512, 512} : std::vector<int>{32, 32, 64, 64};
  return json{{"_class_name", "AutoencoderKL"},
              {"_diffusers_version", turbo ? "0.36.0.dev0" : "0.40.0.dev0"},
              {"act_fn", "silu"},
              {"block_out_channels", ch},
              {"down_block_types", std::vector<std::string>(4, "DownEncoderBlock2D")},
              {"force_upcast", true},
              {"in_channels", 3},
              {"latent_channels", 16},
              {"latents_mean", nullptr},
              {"latents_std", nullptr},
              {"layers_per_block", 2},
              {"mid_block_add_attention", true},
              {"norm_num_groups", 32},
              {"out_channels", 3},
              {"sample_size", 1024},
              {"scaling_factor", 0.3611},
              {"shift_factor", 0.1159},
              {"up_block_types", std::vector<std::string>(4, "UpDecoderBlock2D")},
              {"use_post_quant_conv", false},
              {"use_quant_conv", false}};
}

// ---- tensor tables: the loaders' own bindings, run through a recording WeightLoader ----

// The initialisation of a bound tensor, from its name and shape (the rules above): biases,
// 1-D norm gains, embeddings and pad tokens, else a Linear/conv weight with fan_in = numel / out.
RandomTensor init_for(const BoundTensor& b, StDType dt, const std::string& prefix = "") {
  RandomTensor t{prefix + b.name, b.shape, dt, 0.f, 1.f};
  if (b.name.ends_with(".bias")) t.stddev = kBiasStd;
  else if (b.shape.size() == 1) t.mean = 1.f, t.stddev = kNormStd;
  else if (b.name.ends_with("embed_tokens.weight") || b.name.ends_with("pad_token")) t.stddev = 1.f;
  else t.stddev = float(1.0 / std::sqrt(double(shape_numel(b.shape) / b.shape[0])));
  return t;
}

void add_bound(TensorList& L, const std::vector<BoundTensor>& bound, const std::string& prefix = "") {
  for (const BoundTensor& b : bound) L.out->push_back(init_for(b, L.dtype, prefix));
}

// Spec §2.2: Qwen3 as load_qwen3_encoder binds it, plus what the Hub's shards hold beyond it:
// the last layer (bound here with one layer more) and the final norm; no lm_head.
void qwen3_tensors(const Qwen3Config& c, const std::string& prefix, TensorList L) {
  std::vector<BoundTensor> bound;
  WeightLoader rec = WeightLoader::recorder(&bound, "text_encoder");
  Qwen3Config all = c;
  all.num_hidden_layers += 1;  // the loader binds layers 0 … num_hidden_layers − 2
  (void)load_qwen3_encoder(rec, all, DType::BF16);
  add_bound(L, bound, prefix);
  L.norm(prefix + "norm", c.hidden_size, false);
}

// Spec §3.2: exactly what load_zimage_dit binds.
void dit_tensors(const DitConfig& c, TensorList L) {
  std::vector<BoundTensor> bound;
  WeightLoader rec = WeightLoader::recorder(&bound, "transformer");
  (void)load_zimage_dit(rec, c, DType::BF16);
  add_bound(L, bound);
}

// diffusers ResnetBlock2D (no time embedding).
void resnet(TensorList& L, const std::string& p, int64_t in, int64_t out) {
  L.norm(p + ".norm1", in, true);
  L.conv(p + ".conv1", out, in, 3);
  L.norm(p + ".norm2", out, true);
  L.conv(p + ".conv2", out, out, 3);
  if (in != out) L.conv(p + ".conv_shortcut", out, in, 1);
}

void mid_block(TensorList& L, const std::string& p, int64_t c, bool attention) {
  resnet(L, p + ".resnets.0", c, c);
  if (attention) {
    const std::string a = p + ".attentions.0";
    L.norm(a + ".group_norm", c, true);
    L.linear(a + ".to_q", c, c, true);
    L.linear(a + ".to_k", c, c, true);
    L.linear(a + ".to_v", c, c, true);
    L.linear(a + ".to_out.0", c, c, true);
  }
  resnet(L, p + ".resnets.1", c, c);
}

// Spec §5.5 (encoder, which no loader binds yet: listed here, derived from block_out_channels
// like diffusers' Encoder) and §5.4 (decoder: what load_vae_decoder binds).
void vae_tensors(const VaeConfig& c, TensorList L) {
  const auto& ch = c.block_out_channels;
  const int n = int(ch.size());
  // Encoder.
  L.conv("encoder.conv_in", ch[0], c.in_channels, 3);
  for (int i = 0; i < n; ++i) {
    int64_t in = i == 0 ? ch[0] : ch[i - 1], out = ch[i];
    for (int j = 0; j < c.layers_per_block; ++j)
      resnet(L, str_cat("encoder.down_blocks.", i, ".resnets.", j), j == 0 ? in : out, out);
    if (i < n - 1) L.conv(str_cat("encoder.down_blocks.", i, ".downsamplers.0.conv"), out, out, 3);
  }
  mid_block(L, "encoder.mid_block", ch[n - 1], c.mid_block_add_attention);
  L.norm("encoder.conv_norm_out", ch[n - 1], true);
  L.conv("encoder.conv_out", 2 * int64_t(c.latent_channels), ch[n - 1], 3);
  if (c.use_quant_conv) L.conv("quant_conv", 2 * int64_t(c.latent_channels), 2 * int64_t(c.latent_channels), 1);
  // Decoder.
  std::vector<BoundTensor> bound;
  WeightLoader rec = WeightLoader::recorder(&bound, "vae");
  (void)load_vae_decoder(rec, c, DType::BF16);
  add_bound(L, bound);
}

// ---- file writing ----

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void write_all(int fd, const void* data, size_t n, const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      fail(str_cat("cannot write '", path, "': ", std::strerror(errno)));
    }
    p += w;
    n -= size_t(w);
  }
}

// An open NAME.tmp that becomes NAME on commit(), or disappears if never committed.
class TmpFile {
 public:
  explicit TmpFile(std::string path) : path_(std::move(path)), tmp_(path_ + ".tmp") {
    fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd_ < 0) fail(str_cat("cannot create '", tmp_, "': ", std::strerror(errno)));
  }
  TmpFile(const TmpFile&) = delete;
  TmpFile& operator=(const TmpFile&) = delete;
  ~TmpFile() {
    if (fd_ >= 0) ::close(fd_);
    if (!committed_) ::unlink(tmp_.c_str());
  }
  int fd() const { return fd_; }
  const std::string& path() const { return path_; }
  void commit(bool sync) {
    if (sync && ::fdatasync(fd_) != 0) fail(str_cat("cannot write '", tmp_, "': ", std::strerror(errno)));
    int rc = ::close(fd_);
    fd_ = -1;
    if (rc != 0) fail(str_cat("cannot write '", tmp_, "': ", std::strerror(errno)));
    if (::rename(tmp_.c_str(), path_.c_str()) != 0)
      fail(str_cat("cannot rename '", tmp_, "' to '", path_, "': ", std::strerror(errno)));
    committed_ = true;
  }

 private:
  std::string path_, tmp_;
  int fd_ = -1;
  bool committed_ = false;
};

void write_text(const std::string& path, const std::string& text) {
  TmpFile f(path);
  write_all(f.fd(), text.data(), text.size(), path);
  f.commit(false);
}

std::string safetensors_header(const std::vector<const RandomTensor*>& ts) {
  json h = json::object();
  h["__metadata__"] = {{"format", "pt"}};
  uint64_t off = 0;
  for (const RandomTensor* t : ts) {
    h[t->name] = {{"dtype", st_dtype_name(t->dtype)}, {"shape", t->shape}, {"data_offsets", {off, off + t->nbytes()}}};
    off += t->nbytes();
  }
  std::string text = h.dump();
  while ((8 + text.size()) % 8) text += ' ';
  return text;
}

std::string fmt(const char* f, double a, double b = 0, double c = 0) {
  char buf[128];
  std::snprintf(buf, sizeof buf, f, a, b, c);
  return buf;
}

// A 4096-aligned buffer (O_DIRECT needs aligned addresses, sizes and file offsets).
struct AlignedBuf {
  uint8_t* p = nullptr;
  explicit AlignedBuf(size_t n) : p(static_cast<uint8_t*>(std::aligned_alloc(4096, n))) {
    ZI_CHECK(p, "make-random-model: out of memory (", n, " bytes)");
  }
  ~AlignedBuf() { std::free(p); }
  AlignedBuf(const AlignedBuf&) = delete;
  AlignedBuf& operator=(const AlignedBuf&) = delete;
};

// Streams one safetensors file: the header, then every tensor generated chunk by chunk into
// two alternating buffers; one is written by a background task while the other is filled.
// Full buffers are written with O_DIRECT where the file system allows it: no page-cache
// copy, no reclaim of other processes' cache when 33 GB go through a smaller RAM.
uint64_t write_shard(const std::string& path, const std::string& component, const std::vector<const RandomTensor*>& ts,
                     const MakeRandomModelOptions& opt) {
  TmpFile f(path);
  const int fd = f.fd();
  bool direct = false;
#ifdef O_DIRECT
  if (const int fl = ::fcntl(fd, F_GETFL); fl >= 0 && ::fcntl(fd, F_SETFL, fl | O_DIRECT) == 0) direct = true;
#endif
  auto set_buffered = [&] {
#ifdef O_DIRECT
    if (direct) {
      const int fl = ::fcntl(fd, F_GETFL);
      if (fl >= 0) ::fcntl(fd, F_SETFL, fl & ~O_DIRECT);
      direct = false;
    }
#endif
  };
  // One write of a whole buffer; a file system that refuses O_DIRECT I/O (EINVAL) gets
  // buffered writes from then on.
  auto write_buf = [&, fd](const uint8_t* p, size_t len) {
    if (direct) {
      ssize_t w = ::write(fd, p, len);
      while (w < 0 && errno == EINTR) w = ::write(fd, p, len);
      if (w == ssize_t(len)) return;
      if (w < 0 && errno != EINVAL) fail(str_cat("cannot write '", path, "': ", std::strerror(errno)));
      // EINVAL or a short write: finish this buffer (and the file) with buffered I/O.
      const size_t done = w > 0 ? size_t(w) : 0;
      set_buffered();
      write_all(fd, p + done, len - done, path);
      return;
    }
    write_all(fd, p, len, path);
  };

  const std::string header = safetensors_header(ts);
  const uint64_t header_len = header.size();
  const size_t cap = std::max<size_t>((opt.chunk_bytes + 4095) / 4096 * 4096, 4096);
  AlignedBuf buf0(cap), buf1(cap);
  uint8_t* buf[2] = {buf0.p, buf1.p};
  int cur = 0;
  size_t fill = 0;
  uint64_t total = 0;
  std::future<void> pending;
  auto flush = [&] {  // hands the full current buffer to the writer task
    if (pending.valid()) pending.get();
    const uint8_t* p = buf[cur];
    pending = std::async(std::launch::async, [p, cap, &write_buf] { write_buf(p, cap); });
    total += cap;
    cur ^= 1;
    fill = 0;
    if (opt.check_cancel) opt.check_cancel();
  };
  auto append = [&](const void* src, size_t n) {
    const uint8_t* s = static_cast<const uint8_t*>(src);
    while (n > 0) {
      const size_t k = std::min(n, cap - fill);
      std::memcpy(buf[cur] + fill, s, k);
      fill += k;
      s += k;
      n -= k;
      if (fill == cap) flush();
    }
  };
  try {
    append(&header_len, 8);  // little-endian hosts only (x86-64, aarch64)
    append(header.data(), header.size());
    for (const RandomTensor* t : ts) {
      const uint64_t key = random_tensor_key(opt.seed, component, t->name);
      const size_t es = size_t(st_dtype_bits(t->dtype) / 8);
      const int64_t numel = t->numel();
      for (int64_t done = 0; done < numel;) {
        const int64_t room = int64_t((cap - fill) / es);
        if (room == 0) {  // a few bytes short of a full buffer: one element through a scratch copy
          uint8_t tmp[8];
          fill_random(*t, key, done, 1, tmp);
          append(tmp, es);
          ++done;
          continue;
        }
        const int64_t k = std::min(room, numel - done);
        fill_random(*t, key, done, k, buf[cur] + fill);
        fill += size_t(k) * es;
        done += k;
        if (fill == cap) flush();
      }
    }
    if (pending.valid()) pending.get();
    if (fill > 0) {  // the unaligned tail
      set_buffered();
      write_all(fd, buf[cur], fill, path);
      total += fill;
    }
  } catch (...) {
    if (pending.valid()) pending.wait();  // the task uses the buffers and the descriptor
    throw;
  }
  f.commit(true);
  return total;
}

uint64_t splitmix64_mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ull;

// The generator's inner loops (see random_normal_at), compiled for AVX-512/AVX2/baseline.
#if defined(__x86_64__) && defined(__GNUC__)
#define ZI_RM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ZI_RM_CLONES
#endif

inline uint32_t irwin_hall_sum(uint64_t key, uint64_t i) {
  const uint64_t r = splitmix64_mix(key + (i + 1) * kGolden);
  return uint32_t(r & 0xffff) + uint32_t((r >> 16) & 0xffff) + uint32_t((r >> 32) & 0xffff) + uint32_t(r >> 48);
}

ZI_RM_CLONES void fill_f32(float* __restrict out, int64_t n, uint64_t key, uint64_t first, float a, float b) {
  for (int64_t i = 0; i < n; ++i) out[i] = a + b * float(int32_t(irwin_hall_sum(key, first + uint64_t(i))));
}

ZI_RM_CLONES void fill_bf16(uint16_t* __restrict out, int64_t n, uint64_t key, uint64_t first, float a, float b) {
  for (int64_t i = 0; i < n; ++i)
    out[i] = f32_to_bf16(a + b * float(int32_t(irwin_hall_sum(key, first + uint64_t(i)))));
}

}  // namespace

// ---- public API ----

const char* random_preset_name(RandomPreset p) { return p == RandomPreset::Turbo ? "turbo" : "tiny"; }

bool parse_random_preset(std::string_view s, RandomPreset* out) {
  if (s == "turbo") *out = RandomPreset::Turbo;
  else if (s == "tiny") *out = RandomPreset::Tiny;
  else return false;
  return true;
}

int64_t RandomComponent::num_params() const {
  int64_t n = 0;
  for (const auto& t : tensors) n += t.numel();
  return n;
}

uint64_t RandomComponent::num_bytes() const {
  uint64_t n = 0;
  for (const auto& t : tensors) n += t.nbytes();
  return n;
}

const RandomComponent& RandomModelPlan::component(std::string_view name) const {
  for (const auto& c : components)
    if (c.name == name) return c;
  fail(str_cat("random model plan: no component '", name, "'"));
}

uint64_t RandomModelPlan::num_bytes() const {
  uint64_t n = 0;
  for (const auto& c : components) n += c.num_bytes();
  return n;
}

RandomModelPlan random_model_plan(RandomPreset preset, std::optional<DType> dtype) {
  const bool turbo = preset == RandomPreset::Turbo;
  const StDType dit_dt = dtype ? st_of(*dtype) : turbo ? StDType::F32 : StDType::BF16;
  const StDType te_dt = dtype ? st_of(*dtype) : StDType::BF16;
  const StDType vae_dt = dtype ? st_of(*dtype) : StDType::BF16;
  const char* dv = turbo ? "0.36.0.dev0" : "0.40.0.dev0";

  RandomModelPlan plan;
  plan.preset = preset;
  plan.model_index_json = dump(model_index_json(dv));
  plan.scheduler_config_json = dump(scheduler_json(dv));

  RandomComponent dit{"transformer", "diffusion_pytorch_model", turbo ? 3 : 1, dump(transformer_json(turbo)), {}};
  dit_tensors(parse_dit_config(dit.config_json, "transformer/config.json"), TensorList{dit_dt, &dit.tensors});

  RandomComponent te{"text_encoder", "model", turbo ? 3 : 2,
                     dump(turbo ? turbo_text_encoder_json(te_dt) : tiny_text_encoder_json(te_dt)), {}};
  // The Hub's Z-Image-Turbo shards carry the causal-LM wrapper's "model." prefix (§6.4); the
  // bundled tiny model was saved from Qwen3Model and has none.
  qwen3_tensors(parse_qwen3_config(te.config_json, "text_encoder/config.json"), turbo ? "model." : "",
                TensorList{te_dt, &te.tensors});

  RandomComponent vae{"vae", "diffusion_pytorch_model", 1, dump(vae_json(turbo)), {}};
  vae_tensors(parse_vae_config(vae.config_json, "vae/config.json"), TensorList{vae_dt, &vae.tensors});

  plan.components.push_back(std::move(dit));
  plan.components.push_back(std::move(te));
  plan.components.push_back(std::move(vae));
  return plan;
}

std::vector<int> assign_shards(const std::vector<uint64_t>& sizes, int shards) {
  const size_t n = sizes.size();
  ZI_CHECK(shards >= 1 && size_t(shards) <= n, "assign_shards: cannot split ", n, " tensors into ", shards, " shards");
  long double total = 0;
  for (uint64_t s : sizes) total += (long double)s;
  std::vector<int> out(n);
  long double before = 0;
  int cur = 0;
  for (size_t i = 0; i < n; ++i) {
    // The shard the tensor's midpoint falls into, at most one step past the previous
    // tensor's, and forced forward when every remaining tensor must open a new shard.
    const long double mid = before + (long double)sizes[i] / 2;
    int want = total > 0 ? int(mid * shards / total) : int(i * size_t(shards) / n);
    want = std::min(want, shards - 1);
    int s = i == 0 ? 0 : std::clamp(want, cur, std::min(cur + 1, shards - 1));
    if (i > 0 && n - i == size_t(shards - 1 - cur)) s = cur + 1;
    out[i] = cur = s;
    before += (long double)sizes[i];
  }
  ZI_CHECK(cur == shards - 1, "assign_shards: internal error");
  return out;
}

std::string shard_file_name(const std::string& stem, int k, int n) {
  if (n == 1) return stem + ".safetensors";
  char buf[64];
  std::snprintf(buf, sizeof buf, "-%05d-of-%05d.safetensors", k, n);
  return stem + buf;
}

uint64_t random_tensor_key(uint64_t seed, std::string_view component, std::string_view name) {
  uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a over "component/name"
  auto eat = [&](std::string_view s) {
    for (unsigned char ch : s) h = (h ^ ch) * 0x100000001b3ull;
  };
  eat(component);
  eat("/");
  eat(name);
  return splitmix64_mix(splitmix64_mix(seed + kGolden) ^ h);
}

float random_normal_at(uint64_t key, uint64_t i) {
  // Irwin–Hall with four uniforms u_j = (x_j + ½)/65536: Σu_j has mean 2 and variance 1/3.
  return (float(int32_t(irwin_hall_sum(key, i))) - 131070.f) * (1.7320508075688772f / 65536.f);
}

void fill_random(const RandomTensor& t, uint64_t key, int64_t begin, int64_t count, void* dst) {
  ZI_CHECK(t.dtype == StDType::F32 || t.dtype == StDType::BF16, "fill_random: ", t.name, ": dtype ",
           st_dtype_name(t.dtype), " is not supported");
  // z = (s − 131070)·√3/65536 folded into one multiply-add: value = a + b·s.
  const float b = t.stddev * (1.7320508075688772f / 65536.f);
  const float a = t.mean - 131070.f * b;
  const bool f32 = t.dtype == StDType::F32;
  parallel_for(count, int64_t(1) << 16, [&](int64_t lo, int64_t hi) {
    if (f32) fill_f32(static_cast<float*>(dst) + lo, hi - lo, key, uint64_t(begin + lo), a, b);
    else fill_bf16(static_cast<uint16_t*>(dst) + lo, hi - lo, key, uint64_t(begin + lo), a, b);
  });
}

MakeRandomModelResult make_random_model(const std::string& out_dir, const MakeRandomModelOptions& opt) {
  const double t0 = now_s();
  auto log = [&](const std::string& s) {
    if (opt.log) opt.log(s);
  };
  ZI_CHECK(!out_dir.empty(), "make-random-model: no output folder given");
  const RandomModelPlan plan = random_model_plan(opt.preset, opt.dtype);

  // The tokenizer files to copy (checked before anything is written).
  const fs::path tok_src(opt.tokenizer_src);
  std::vector<std::string> tok_files;
  for (const char* f : {"tokenizer.json", "tokenizer_config.json"}) {
    ZI_CHECK(fs::is_regular_file(tok_src / f), "make-random-model: tokenizer source '", opt.tokenizer_src,
             "' has no ", f);
    tok_files.push_back(f);
  }
  for (const char* f : {"chat_template.jinja", "vocab.json", "merges.txt", "special_tokens_map.json"})
    if (fs::is_regular_file(tok_src / f)) tok_files.push_back(f);

  // The output folder: new, or existing and empty.
  std::error_code ec;
  const fs::path root(out_dir);
  if (fs::exists(root, ec)) {
    ZI_CHECK(fs::is_directory(root, ec), "make-random-model: '", out_dir, "' exists and is not a folder");
    ZI_CHECK(fs::is_empty(root, ec) && !ec, "make-random-model: '", out_dir,
             "' exists and is not empty; give a new or empty folder");
  }
  fs::create_directories(root, ec);
  ZI_CHECK(!ec, "make-random-model: cannot create '", out_dir, "': ", ec.message());
  uint64_t tok_bytes = 0;
  for (const auto& f : tok_files) tok_bytes += fs::file_size(tok_src / f, ec);
  const uint64_t need = plan.num_bytes() + tok_bytes + (uint64_t(1) << 20);
  const fs::space_info sp = fs::space(root, ec);
  if (!ec)
    ZI_CHECK(sp.available >= need, "make-random-model: '", out_dir, "' needs ", fmt("%.2f", double(need) / 1e9),
             " GB but only ", fmt("%.2f", double(sp.available) / 1e9), " GB are free");
  log(str_cat("make-random-model: ", random_preset_name(opt.preset), " preset, seed ", opt.seed, ", ",
              fmt("%.2f", double(plan.num_bytes()) / 1e9), " GB of weights into ", out_dir));

  for (const char* d : {"scheduler", "text_encoder", "tokenizer", "transformer", "vae"}) {
    fs::create_directories(root / d, ec);
    ZI_CHECK(!ec, "make-random-model: cannot create '", (root / d).string(), "': ", ec.message());
  }
  write_text((root / "scheduler" / "scheduler_config.json").string(), plan.scheduler_config_json);
  for (const auto& f : tok_files) {
    const std::string src = (tok_src / f).string(), dst = (root / "tokenizer" / f).string();
    write_text(dst, read_text_file(src));
  }

  MakeRandomModelResult res;
  for (const RandomComponent& c : plan.components) {
    const fs::path dir = root / c.name;
    write_text((dir / "config.json").string(), c.config_json);
    std::vector<uint64_t> sizes;
    for (const auto& t : c.tensors) sizes.push_back(t.nbytes());
    const std::vector<int> shard_of = assign_shards(sizes, c.shards);
    json weight_map = json::object();
    for (int k = 0; k < c.shards; ++k) {
      const std::string file = shard_file_name(c.weights_stem, k + 1, c.shards);
      std::vector<const RandomTensor*> ts;
      for (size_t i = 0; i < c.tensors.size(); ++i)
        if (shard_of[i] == k) {
          ts.push_back(&c.tensors[i]);
          weight_map[c.tensors[i].name] = file;
        }
      const double s0 = now_s();
      const uint64_t bytes = write_shard((dir / file).string(), c.name, ts, opt);
      const double dt = std::max(now_s() - s0, 1e-9);
      res.bytes += bytes;
      log(str_cat("  ", c.name, "/", file, ": ", fmt("%.2f GB in %.1f s (%.0f MB/s)", double(bytes) / 1e9, dt,
                                                     double(bytes) / 1e6 / dt)));
    }
    if (c.shards > 1) {
      json meta{{"total_size", c.num_bytes()}};
      if (c.name == "text_encoder") meta["total_parameters"] = c.num_params();
      json index{{"metadata", meta}, {"weight_map", weight_map}};
      write_text((dir / (c.weights_stem + ".safetensors.index.json")).string(), dump(index));
    }
  }
  // Last: a folder with model_index.json is complete.
  write_text((root / "model_index.json").string(), plan.model_index_json);
  res.seconds = now_s() - t0;
  log(str_cat("wrote ", out_dir, ": ", fmt("%.2f GB in %.1f s (%.0f MB/s)", double(res.bytes) / 1e9, res.seconds,
                                          double(res.bytes) / 1e6 / std::max(res.seconds, 1e-9))));
  return res;
}

}  // namespace zi
