// LyCORIS adapters (LoHa, LoKr) and module-name resolution shared by every adapter style.
//
// LoHa (FedPara, Hyeon-Woo et al. 2022): ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha / r, r = rows of w1b.
// LoKr (Yeh et al. 2023): ΔW = kron(W1, W2) · scale, W1 = lokr_w1 or lokr_w1_a·lokr_w1_b, W2 =
// lokr_w2 or lokr_w2_a·lokr_w2_b; scale = alpha / r where r is the rank of the low-rank factor
// (W2's when both are factored), and 1 when both factors are full matrices or alpha is absent.
// These are LyCORIS' own scalings (lycoris/modules/{loha,lokr}.py: scale = alpha / lora_dim, and
// alpha = lora_dim for full LoKr factors), as ComfyUI applies them when merging.
#include <algorithm>
#include <cmath>
#include <map>
#include <set>

#include "core/check.h"
#include "models/lora.h"
#include "ops/ops.h"

namespace zi {

namespace {

bool contains(const std::string& s, std::string_view part) { return s.find(part) != std::string::npos; }

std::string replace_all(std::string s, std::string_view from, std::string_view to) {
  for (size_t at = s.find(from); at != std::string::npos; at = s.find(from, at + to.size()))
    s.replace(at, from.size(), to);
  return s;
}

// kohya: split on '_' into dotted components, keeping to_q/k/v/out and feed_forward whole.
std::string underscores_to_dots(const std::string& m) {
  std::string out = kohya_underscores_to_dots(m);
  static const std::pair<const char*, const char*> fixups[] = {
      {"context.refiner.", "context_refiner."},  {"noise.refiner.", "noise_refiner."},
      {"adaLN.modulation.", "adaLN_modulation."}, {"all.final.layer.", "all_final_layer."},
      {"all.x.embedder.", "all_x_embedder."},     {"cap.embedder.", "cap_embedder."},
      {"t.embedder.", "t_embedder."},             {"final.layer.", "final_layer."},
      {"x.embedder.", "x_embedder."}};
  out += ".";
  for (const auto& [from, to] : fixups) out = replace_all(std::move(out), from, to);
  return out.substr(0, out.size() - 1);
}

const float* scalar_of(const SafetensorsFile& f, const TensorInfo& t, float* store) {
  ZI_CHECK(t.numel() == 1, "LoRA '", f.path(), "': key '", t.name, "' is an alpha of shape ", shape_str(t.shape),
           ", not a scalar");
  *store = f.load(t, DType::F32).f32()[0];
  ZI_CHECK(std::isfinite(*store), "LoRA '", f.path(), "': key '", t.name, "' is an alpha of ", *store,
           " (not a finite number)");
  return store;
}

// C[m, n] = A[m, k] · B[k, n], f32: linear(A, Bᵀ) through the ops (the CPU backend's fixed
// tiling, so the merged weights do not depend on --threads, as in lora.cpp).
Tensor matmul(const Tensor& a, const Tensor& b) {
  return ops::linear(a, b.permute({1, 0}).contiguous(Tag::Workspace));
}

}  // namespace

const char* adapter_kind_name(AdapterKind k) {
  switch (k) {
    case AdapterKind::LoRA: return "LoRA";
    case AdapterKind::LoHa: return "LoHa";
    case AdapterKind::LoKr: return "LoKr";
  }
  return "?";
}

std::string lora_module_name(const std::string& module) {
  std::string m = module;
  bool kohya = false;
  for (std::string_view p : {"lora_unet_", "lycoris_", "lora_transformer_"})
    if (m.starts_with(p)) {
      m = m.substr(p.size());
      kohya = true;
      break;
    }
  if (kohya) m = underscores_to_dots(m);
  for (std::string_view p : {"base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer."})
    if (m.starts_with(p)) {
      m = m.substr(p.size());
      break;
    }
  // Original-layout names (ComfyUI, kohya of the original model).
  if (m.starts_with("final_layer.")) m = "all_final_layer.2-1." + m.substr(12);
  if (m.starts_with("x_embedder")) m = "all_x_embedder.2-1" + m.substr(10);
  if (m.ends_with(".attention.out")) m = m.substr(0, m.size() - 4) + ".to_out.0";
  return m;
}

Tensor LoraDelta::dense() const {
  Tensor d;
  if (kind == AdapterKind::LoHa) {
    d = matmul(w1a, w1b);
    Tensor e = matmul(w2a, w2b);
    float* p = d.f32();
    const float* q = e.f32();
    for (int64_t i = 0; i < d.numel(); ++i) p[i] *= q[i];
  } else if (kind == AdapterKind::LoKr) {
    const Tensor a = w1.defined() ? w1 : matmul(w1a, w1b);
    const Tensor b = w2.defined() ? w2 : matmul(w2a, w2b);
    const int64_t ar = a.dim(0), ac = a.dim(1), br = b.dim(0), bc = b.dim(1);
    d = Tensor::empty({ar * br, ac * bc}, DType::F32, Tag::Workspace);
    float* o = d.f32();
    for (int64_t i = 0; i < ar; ++i)
      for (int64_t k = 0; k < br; ++k)
        for (int64_t j = 0; j < ac; ++j) {
          const float s = a.f32()[i * ac + j];
          const float* src = b.f32() + k * bc;
          float* dst = o + (i * br + k) * (ac * bc) + j * bc;
          for (int64_t l = 0; l < bc; ++l) dst[l] = s * src[l];
        }
  } else {
    d = matmul(B, A);
  }
  return d;
}

void split_fused_qkv(LoraFile& f) {
  std::vector<LoraDelta> out;
  for (LoraDelta& d : f.deltas) {
    static const std::string fused = ".attention.qkv.weight";
    if (!d.target.ends_with(fused)) {
      out.push_back(std::move(d));
      continue;
    }
    const std::string base = d.target.substr(0, d.target.size() - fused.size()) + ".attention.to_";
    int64_t rows = 0;
    if (d.kind == AdapterKind::LoRA) rows = d.B.dim(0);
    else if (d.kind == AdapterKind::LoHa) rows = d.w1a.dim(0);
    else rows = (d.w1.defined() ? d.w1.dim(0) : d.w1a.dim(0)) * (d.w2.defined() ? d.w2.dim(0) : d.w2a.dim(0));
    ZI_CHECK(rows % 3 == 0, "LoRA '", f.path, "': key '", d.key, "' updates a fused qkv of ", rows,
             " rows, not a multiple of 3");
    const int64_t n = rows / 3;
    for (int i = 0; i < 3; ++i) {
      LoraDelta p = d;
      p.target = base + "qkv"[i] + ".weight";
      if (d.kind == AdapterKind::LoRA) {
        const int64_t r = d.B.dim(1);
        p.B = Tensor::empty({n, r}, DType::F32, Tag::Workspace);
        std::copy_n(d.B.f32() + i * n * r, n * r, p.B.f32());
        p.bias = Tensor();
        if (d.bias.defined()) {
          p.bias = Tensor::empty({n}, DType::F32, Tag::Workspace);
          std::copy_n(d.bias.f32() + i * n, n, p.bias.f32());
        }
      } else {
        p.row_begin = i * n;
        p.rows = n;
      }
      out.push_back(std::move(p));
    }
  }
  // A fused qkv beside a separate to_q/k/v of the same block: two keys for one weight.
  std::map<std::string, const std::string*> seen;
  for (const LoraDelta& d : out) {
    auto [it, fresh] = seen.emplace(d.target, &d.key);
    if (!fresh) fail(str_cat("LoRA '", f.path, "': keys '", *it->second, "' and '", d.key, "' both target ", d.target));
  }
  f.deltas = std::move(out);
}

bool is_lycoris_file(const SafetensorsFile& f) {
  for (const TensorInfo& t : f.tensors())
    if (contains(t.name, ".hada_") || contains(t.name, ".lokr_")) return true;
  return false;
}

LoraFile load_lycoris(const SafetensorsFile& f, const LoraSpec& spec) {
  auto error = [&](const std::string& key, const std::string& what) {
    fail(str_cat("LoRA '", f.path(), "': key '", key, "' ", what));
  };
  // module → suffix → tensor
  std::map<std::string, std::map<std::string, const TensorInfo*>> modules;
  LoraFile out{spec.path, spec.scale, {}, {}};
  for (const TensorInfo& t : f.tensors()) {
    const size_t dot = t.name.rfind('.');
    if (dot == std::string::npos) error(t.name, "is not a LyCORIS tensor (<module>.<name>)");
    std::string module = t.name.substr(0, dot), suffix = t.name.substr(dot + 1);
    if (suffix == "weight") {  // lora_down.weight / lora_up.weight of plain LoRA modules
      const size_t d2 = module.rfind('.');
      if (d2 != std::string::npos) suffix = module.substr(d2 + 1) + "." + suffix, module = module.substr(0, d2);
    }
    if (module.starts_with("lora_te") || module.starts_with("text_encoder")) {
      out.ignored.push_back(t.name);  // another component's
      continue;
    }
    if (suffix == "hada_t1" || suffix == "hada_t2" || suffix == "lokr_t2" || suffix == "lora_mid.weight")
      error(t.name, "is a Tucker (convolution) factor, which Z-Image's linear layers cannot use");
    if (suffix == "dora_scale") error(t.name, "belongs to a DoRA adapter, which is not supported");
    static const std::set<std::string> known = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b",
                                                "lokr_w1",   "lokr_w1_a", "lokr_w1_b", "lokr_w2",
                                                "lokr_w2_a", "lokr_w2_b", "alpha",     "lora_down.weight",
                                                "lora_up.weight"};
    if (!known.count(suffix)) error(t.name, "is not a LoHa, LoKr or LoRA tensor");
    auto [it, fresh] = modules[module].emplace(suffix, &t);
    if (!fresh) error(t.name, "appears twice");
  }
  std::map<std::string, std::string> seen;  // target → key
  for (auto& kv : modules) {  // (not a structured binding: lambdas below capture these)
    const std::string& module = kv.first;
    const std::map<std::string, const TensorInfo*>& parts = kv.second;
    auto get = [&](const char* s) -> const TensorInfo* {
      auto it = parts.find(s);
      return it == parts.end() ? nullptr : it->second;
    };
    auto load2d = [&](const TensorInfo* t) {
      if (t->shape.size() != 2) error(t->name, str_cat("has shape ", shape_str(t->shape), "; expected a matrix"));
      return f.load(*t, DType::F32, Tag::Workspace);
    };
    float alpha_v = 0;
    const float* alpha = get("alpha") ? scalar_of(f, *get("alpha"), &alpha_v) : nullptr;
    LoraDelta d;
    d.target = lora_module_name(module) + ".weight";
    if (get("hada_w1_a") || get("hada_w1_b") || get("hada_w2_a") || get("hada_w2_b")) {
      for (const char* s : {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"})
        if (!get(s)) error(module, str_cat("has no ", s, " (a LoHa module needs w1_a, w1_b, w2_a, w2_b)"));
      d.kind = AdapterKind::LoHa;
      d.key = get("hada_w1_a")->name;
      d.w1a = load2d(get("hada_w1_a")), d.w1b = load2d(get("hada_w1_b"));
      d.w2a = load2d(get("hada_w2_a")), d.w2b = load2d(get("hada_w2_b"));
      if (d.w1a.dim(1) != d.w1b.dim(0) || d.w2a.dim(1) != d.w2b.dim(0))
        error(d.key, str_cat("and its partners have ranks that do not pair: w1_a ", shape_str(d.w1a.shape()),
                             " · w1_b ", shape_str(d.w1b.shape()), ", w2_a ", shape_str(d.w2a.shape()), " · w2_b ",
                             shape_str(d.w2b.shape())));
      if (d.w1a.dim(0) != d.w2a.dim(0) || d.w1b.dim(1) != d.w2b.dim(1))
        error(d.key, "and hada_w2_*: the two products differ in shape");
      d.factor = alpha ? *alpha / float(d.w1b.dim(0)) : 1.0f;
    } else if (get("lokr_w1") || get("lokr_w1_a") || get("lokr_w1_b") || get("lokr_w2") || get("lokr_w2_a") ||
               get("lokr_w2_b")) {
      d.kind = AdapterKind::LoKr;
      int64_t rank = 0;
      for (int w = 1; w <= 2; ++w) {
        const std::string full = str_cat("lokr_w", w), fa = full + "_a", fb = full + "_b";
        Tensor& whole = w == 1 ? d.w1 : d.w2;
        Tensor& a = w == 1 ? d.w1a : d.w2a;
        Tensor& b = w == 1 ? d.w1b : d.w2b;
        if (get(full.c_str())) {
          if (get(fa.c_str()) || get(fb.c_str())) error(get(full.c_str())->name, str_cat("comes with ", fa, "/", fb, " too"));
          whole = load2d(get(full.c_str()));
        } else {
          if (!get(fa.c_str()) || !get(fb.c_str())) error(module, str_cat("has neither ", full, " nor both ", fa, " and ", fb));
          a = load2d(get(fa.c_str())), b = load2d(get(fb.c_str()));
          if (a.dim(1) != b.dim(0))
            error(get(fa.c_str())->name, str_cat("has shape ", shape_str(a.shape()), " but ", fb, " has ",
                                                 shape_str(b.shape()), ": ranks do not pair"));
          rank = b.dim(0);
        }
      }
      d.key = module + (d.w1.defined() ? ".lokr_w1" : ".lokr_w1_a");
      d.factor = alpha && rank > 0 ? *alpha / float(rank) : 1.0f;
    } else if (get("lora_down.weight") || get("lora_up.weight")) {
      if (!get("lora_down.weight") || !get("lora_up.weight"))
        error(module, "has only one half of a lora_down/lora_up pair");
      d.key = get("lora_down.weight")->name;
      d.A = load2d(get("lora_down.weight")), d.B = load2d(get("lora_up.weight"));
      if (d.B.dim(1) != d.A.dim(0))
        error(d.key, str_cat("has shape ", shape_str(d.A.shape()), " but lora_up has ", shape_str(d.B.shape()),
                             ": ranks differ"));
      d.factor = alpha ? *alpha / float(d.A.dim(0)) : 1.0f;
    } else {  // only an alpha (the loop above admits nothing else)
      error(parts.begin()->second->name, "is an alpha with no adapter tensors it belongs to");
    }
    auto [it, fresh] = seen.emplace(d.target, d.key);
    if (!fresh) fail(str_cat("LoRA '", f.path(), "': keys '", it->second, "' and '", d.key, "' both target ", d.target));
    out.deltas.push_back(std::move(d));
  }
  if (out.deltas.empty()) fail(str_cat("LoRA '", f.path(), "': no transformer adapter weights found"));
  split_fused_qkv(out);
  return out;
}

}  // namespace zi
