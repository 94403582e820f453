#include "io/gguf.h"

#include <algorithm>
#include <cstring>
#include <set>

#include "core/check.h"

namespace zi {
namespace {

constexpr GgmlType kTypes[] = {
    {0, "F32", 1, 4},      {1, "F16", 1, 2},       {2, "Q4_0", 32, 18},    {3, "Q4_1", 32, 20},
    {6, "Q5_0", 32, 22},   {7, "Q5_1", 32, 24},    {8, "Q8_0", 32, 34},    {9, "Q8_1", 32, 36},
    {10, "Q2_K", 256, 84}, {11, "Q3_K", 256, 110}, {12, "Q4_K", 256, 144}, {13, "Q5_K", 256, 176},
    {14, "Q6_K", 256, 210}, {15, "Q8_K", 256, 292}, {16, "IQ2_XXS", 256, 66}, {17, "IQ2_XS", 256, 74},
    {18, "IQ3_XXS", 256, 98}, {19, "IQ1_S", 256, 50}, {20, "IQ4_NL", 32, 18}, {21, "IQ3_S", 256, 110},
    {22, "IQ2_S", 256, 82}, {23, "IQ4_XS", 256, 136}, {24, "I8", 1, 1},      {25, "I16", 1, 2},
    {26, "I32", 1, 4},     {27, "I64", 1, 8},      {28, "F64", 1, 8},      {29, "IQ1_M", 256, 56},
    {30, "BF16", 1, 2},    {34, "TQ1_0", 256, 54}, {35, "TQ2_0", 256, 66},
};

// How zimage holds a stored type: a safetensors dtype or a weight format; false if neither.
bool holding(uint32_t id, StDType* st, DType* fmt) {
  *fmt = DType::F32;
  switch (id) {
    case 0: *st = StDType::F32; return true;
    case 1: *st = StDType::F16; return true;
    case 30: *st = StDType::BF16; return true;
    case 24: *st = StDType::I8; return true;
    case 25: *st = StDType::I16; return true;
    case 26: *st = StDType::I32; return true;
    case 27: *st = StDType::I64; return true;
    case 28: *st = StDType::F64; return true;
    default: break;
  }
  *st = StDType::U8;
  switch (id) {
    case 2: *fmt = DType::Q4_0; return true;
    case 6: *fmt = DType::Q5_0; return true;
    case 8: *fmt = DType::Q8_0; return true;
    case 11: *fmt = DType::Q3_K; return true;
    case 12: *fmt = DType::Q4_K; return true;
    case 13: *fmt = DType::Q5_K; return true;
    case 14: *fmt = DType::Q6_K; return true;
    default: return false;
  }
}

// A bounds-checked cursor over the file image.
struct Reader {
  const uint8_t* p;
  uint64_t size, pos = 0;
  const std::string& path;
  const char* what = "header";

  [[noreturn]] void truncated(uint64_t need) const {
    fail(str_cat(path, ": truncated ", what, " (needs ", need, " more bytes at offset ", pos, ", file is ", size,
                 " bytes)"));
  }
  void need(uint64_t n) const {
    if (n > size - pos) truncated(n);
  }
  template <class T>
  T get() {
    need(sizeof(T));
    T v;
    std::memcpy(&v, p + pos, sizeof(T));
    pos += sizeof(T);
    return v;
  }
  std::string str() {
    const uint64_t n = get<uint64_t>();
    ZI_CHECK(n <= (uint64_t(1) << 24), path, ": ", what, ": string of ", n, " bytes at offset ", pos - 8,
             " (over the 16 MiB limit; corrupt file?)");
    need(n);
    std::string s(reinterpret_cast<const char*>(p + pos), size_t(n));
    pos += n;
    return s;
  }
};

const char* kv_type_name(uint32_t t) {
  static const char* names[] = {"u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64", "f64"};
  return t < 13 ? names[t] : "?";
}
uint64_t kv_scalar_size(uint32_t t) {
  switch (t) {
    case 0: case 1: case 7: return 1;
    case 2: case 3: return 2;
    case 4: case 5: case 6: return 4;
    case 10: case 11: case 12: return 8;
    default: return 0;
  }
}

// Reads one value of type t as text (arrays summarised); `depth` bounds nested arrays.
std::string read_value(Reader& r, uint32_t t, const std::string& key, int depth, uint64_t* as_u64) {
  auto ctx = [&] { return str_cat(r.path, ": metadata '", key, "': "); };
  switch (t) {
    case 0: { auto v = r.get<uint8_t>(); if (as_u64) *as_u64 = v; return std::to_string(v); }
    case 1: return std::to_string(r.get<int8_t>());
    case 2: { auto v = r.get<uint16_t>(); if (as_u64) *as_u64 = v; return std::to_string(v); }
    case 3: return std::to_string(r.get<int16_t>());
    case 4: { auto v = r.get<uint32_t>(); if (as_u64) *as_u64 = v; return std::to_string(v); }
    case 5: return std::to_string(r.get<int32_t>());
    case 6: return str_cat(r.get<float>());
    case 7: {
      const uint8_t b = r.get<uint8_t>();
      ZI_CHECK(b <= 1, ctx(), "bool value ", int(b), " is neither 0 nor 1");
      return b ? "true" : "false";
    }
    case 8: return r.str();
    case 10: { auto v = r.get<uint64_t>(); if (as_u64) *as_u64 = v; return std::to_string(v); }
    case 11: return std::to_string(r.get<int64_t>());
    case 12: return str_cat(r.get<double>());
    case 9: {
      ZI_CHECK(depth < 4, ctx(), "arrays nested more than 4 deep");
      const uint32_t et = r.get<uint32_t>();
      const uint64_t n = r.get<uint64_t>();
      ZI_CHECK(et <= 12, ctx(), "unknown array element type ", et);
      if (const uint64_t es = kv_scalar_size(et)) {
        ZI_CHECK(n <= (r.size - r.pos) / es, ctx(), "array of ", n, " ", kv_type_name(et), " runs past the end of the file");
        r.pos += n * es;
      } else {
        // strings (8 bytes at least each) or nested arrays (12 bytes at least each)
        ZI_CHECK(n <= (r.size - r.pos) / 8, ctx(), "array of ", n, " ", kv_type_name(et), " runs past the end of the file");
        for (uint64_t i = 0; i < n; ++i) (void)read_value(r, et, key, depth + 1, nullptr);
      }
      return str_cat("[", n, " × ", kv_type_name(et), "]");
    }
    default: fail(str_cat(ctx(), "unknown value type ", t));
  }
}

}  // namespace

const GgmlType* ggml_type_info(uint32_t id) {
  for (const auto& t : kTypes)
    if (t.id == id) return &t;
  return nullptr;
}

bool is_gguf(const uint8_t* data, uint64_t size) { return size >= 4 && std::memcmp(data, "GGUF", 4) == 0; }

GgufParsed parse_gguf(const uint8_t* data, uint64_t size, const std::string& path) {
  Reader r{data, size, 0, path};
  ZI_CHECK(size >= 4 && std::memcmp(data, "GGUF", 4) == 0, path, ": not a GGUF file (bad magic)");
  r.pos = 4;
  GgufParsed g;
  g.version = r.get<uint32_t>();
  ZI_CHECK(g.version == 2 || g.version == 3, path, ": GGUF version ", g.version, " is not supported (2 or 3)");
  const uint64_t n_tensors = r.get<uint64_t>();
  const uint64_t n_kv = r.get<uint64_t>();
  // Each key/value takes at least 8 + 4 + 1 bytes, each tensor info at least 8 + 4 + 8 + 4 + 8.
  ZI_CHECK(n_kv <= (size - r.pos) / 13, path, ": metadata count ", n_kv, " cannot fit in the file (", size, " bytes)");
  ZI_CHECK(n_tensors <= (size - r.pos) / 32, path, ": tensor count ", n_tensors, " cannot fit in the file (", size,
           " bytes)");
  std::set<std::string> keys;
  r.what = "metadata";
  for (uint64_t i = 0; i < n_kv; ++i) {
    std::string key = r.str();
    ZI_CHECK(keys.insert(key).second, path, ": metadata key '", key, "' appears twice");
    const uint32_t t = r.get<uint32_t>();
    ZI_CHECK(t <= 12, path, ": metadata '", key, "': unknown value type ", t);
    uint64_t u = ~uint64_t(0);
    std::string v = read_value(r, t, key, 0, &u);
    if (key == "general.alignment") {
      ZI_CHECK(t == 4 || t == 10 || t == 2 || t == 0, path, ": general.alignment must be an unsigned integer, got ",
               kv_type_name(t));
      ZI_CHECK(u != 0 && (u & (u - 1)) == 0 && u <= 65536, path, ": general.alignment ", u,
               " is not a power of two up to 65536");
      g.alignment = u;
    }
    g.metadata[key] = std::move(v);
  }
  r.what = "tensor table";
  std::set<std::string> names;
  for (uint64_t i = 0; i < n_tensors; ++i) {
    TensorInfo ti;
    ti.name = r.str();
    const std::string ctx = str_cat(path, ": tensor '", ti.name, "': ");
    ZI_CHECK(names.insert(ti.name).second, ctx, "appears twice");
    const uint32_t nd = r.get<uint32_t>();
    ZI_CHECK(nd >= 1 && nd <= 4, ctx, nd, " dimensions (1 to 4 allowed)");
    std::vector<uint64_t> ne(nd);
    for (uint32_t d = 0; d < nd; ++d) ne[d] = r.get<uint64_t>();
    const uint32_t type = r.get<uint32_t>();
    const uint64_t off = r.get<uint64_t>();
    const GgmlType* gt = ggml_type_info(type);
    ZI_CHECK(gt, ctx, "unknown ggml type id ", type);
    uint64_t numel = 1;
    for (uint64_t d : ne) {
      ZI_CHECK(d <= uint64_t(INT64_MAX) && (d == 0 || numel <= uint64_t(INT64_MAX) / d), ctx, "shape overflows");
      numel *= d;
    }
    ZI_CHECK(ne[0] % uint64_t(gt->block) == 0, ctx, "innermost size ", ne[0], " is not a multiple of ", gt->name,
             "'s block of ", gt->block);
    const uint64_t bytes = numel / uint64_t(gt->block) * gt->block_bytes;  // no overflow: block_bytes ≤ 8·block
    for (uint32_t d = nd; d-- > 0;) ti.shape.push_back(int64_t(ne[d]));
    DType fmt;
    if (!holding(type, &ti.dtype, &fmt)) ti.dtype = StDType::U8;
    ti.format = fmt;
    ti.ggml_type = type;
    ZI_CHECK(off % g.alignment == 0, ctx, "data offset ", off, " is not a multiple of the alignment ", g.alignment);
    ti.begin = off;
    ti.end = off + bytes;
    ZI_CHECK(ti.end >= off, ctx, "data range overflows");
    g.ggml_types.push_back(gt->name);
    g.tensors.push_back(std::move(ti));
  }
  const uint64_t start = (r.pos + g.alignment - 1) / g.alignment * g.alignment;
  ZI_CHECK(start <= size || n_tensors == 0, path, ": data area (offset ", start, ") starts past the end of the file (",
           size, " bytes; truncated?)");
  g.data_start = std::min(start, size);
  const uint64_t data_size = size - g.data_start;
  for (const TensorInfo& t : g.tensors)
    ZI_CHECK(t.end <= data_size, path, ": tensor '", t.name, "': data [", t.begin, ", ", t.end,
             ") runs past the end of the data (", data_size, " bytes; file truncated?)");
  std::vector<const TensorInfo*> by_off;
  for (const auto& t : g.tensors) by_off.push_back(&t);
  std::sort(by_off.begin(), by_off.end(), [](auto a, auto b) { return a->begin < b->begin; });
  for (size_t i = 1; i < by_off.size(); ++i)
    ZI_CHECK(by_off[i]->begin >= by_off[i - 1]->end || by_off[i - 1]->begin == by_off[i - 1]->end, path,
             ": tensor '", by_off[i]->name, "': data overlaps tensor '", by_off[i - 1]->name, "'");
  return g;
}

std::string qwen3_name_from_llama(std::string_view n) {
  if (n == "token_embd.weight") return "embed_tokens.weight";
  if (n == "output_norm.weight") return "norm.weight";
  if (n == "output.weight") return "lm_head.weight";
  if (!n.starts_with("blk.")) return "";
  size_t i = 4;
  std::string num;
  while (i < n.size() && n[i] >= '0' && n[i] <= '9' && num.size() < 6) num += n[i++];
  if (num.empty() || i >= n.size() || n[i] != '.') return "";
  const std::string_view rest = n.substr(i + 1);
  static const std::pair<const char*, const char*> kMap[] = {
      {"attn_norm.weight", "input_layernorm.weight"},
      {"attn_q.weight", "self_attn.q_proj.weight"},
      {"attn_k.weight", "self_attn.k_proj.weight"},
      {"attn_v.weight", "self_attn.v_proj.weight"},
      {"attn_output.weight", "self_attn.o_proj.weight"},
      {"attn_q_norm.weight", "self_attn.q_norm.weight"},
      {"attn_k_norm.weight", "self_attn.k_norm.weight"},
      {"ffn_norm.weight", "post_attention_layernorm.weight"},
      {"ffn_gate.weight", "mlp.gate_proj.weight"},
      {"ffn_up.weight", "mlp.up_proj.weight"},
      {"ffn_down.weight", "mlp.down_proj.weight"},
  };
  for (const auto& [from, to] : kMap)
    if (rest == from) return str_cat("layers.", std::stoi(num), ".", to);
  return "";
}

}  // namespace zi
