#include "io/safetensors.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/check.h"
#include "core/quant.h"
#include "io/gguf.h"
#include "io/layouts.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace zi {

namespace {

struct StDTypeRow {
  StDType t;
  const char* name;
  int bits;
};
constexpr StDTypeRow kStTypes[] = {
    {StDType::BOOL, "BOOL", 8},        {StDType::U8, "U8", 8},           {StDType::I8, "I8", 8},
    {StDType::I16, "I16", 16},         {StDType::U16, "U16", 16},        {StDType::F16, "F16", 16},
    {StDType::BF16, "BF16", 16},       {StDType::I32, "I32", 32},        {StDType::U32, "U32", 32},
    {StDType::F32, "F32", 32},         {StDType::C64, "C64", 64},        {StDType::F64, "F64", 64},
    {StDType::I64, "I64", 64},         {StDType::U64, "U64", 64},        {StDType::F8_E5M2, "F8_E5M2", 8},
    {StDType::F8_E4M3, "F8_E4M3", 8},  {StDType::F8_E8M0, "F8_E8M0", 8}, {StDType::F8_E4M3FNUZ, "F8_E4M3FNUZ", 8},
    {StDType::F8_E5M2FNUZ, "F8_E5M2FNUZ", 8}, {StDType::F4, "F4", 4},   {StDType::F6_E2M3, "F6_E2M3", 6},
    {StDType::F6_E3M2, "F6_E3M2", 6},
};

constexpr uint64_t kMaxHeader = 100'000'000;  // the reference reader's limit

const char* st_name_of_dtype(DType d) {
  switch (d) {
    case DType::F32: return "F32";
    case DType::BF16: return "BF16";
    case DType::F16: return "F16";
    case DType::I32: return "I32";
    case DType::U8: return "U8";
    case DType::F8_E4M3: return "F8_E4M3";
    default: return "?";
  }
}

// Byte size of `numel` elements of `t`, overflow-checked; false on overflow or a
// sub-byte total that is not a whole number of bytes. The product of the non-zero sizes must
// fit in int64 too: a tensor's numel and strides are int64 products of any subset of them, so
// a shape like [0, 2^40, 2^40] (zero bytes) would still overflow them.
bool st_bytes(StDType t, const Shape& shape, uint64_t* out) {
  uint64_t n = 1, nonzero = 1;
  for (int64_t d : shape) {
    if (d != 0 && (__builtin_mul_overflow(nonzero, uint64_t(d), &nonzero) || nonzero > uint64_t(INT64_MAX)))
      return false;
    n *= uint64_t(d);  // nonzero, or 0 once a size is 0: cannot overflow
  }
  uint64_t bits;
  if (__builtin_mul_overflow(n, uint64_t(st_dtype_bits(t)), &bits)) return false;
  if (bits % 8) return false;
  *out = bits / 8;
  return true;
}

std::string tensor_ctx(const std::string& path, const std::string& name) {
  return str_cat(path, ": tensor '", name, "': ");
}

}  // namespace

const char* st_dtype_name(StDType t) {
  for (const auto& r : kStTypes)
    if (r.t == t) return r.name;
  return "?";
}

bool parse_st_dtype(std::string_view s, StDType* out) {
  for (const auto& r : kStTypes)
    if (s == r.name) {
      *out = r.t;
      return true;
    }
  return false;
}

int st_dtype_bits(StDType t) {
  for (const auto& r : kStTypes)
    if (r.t == t) return r.bits;
  return 0;
}

bool st_to_dtype(StDType t, DType* out) {
  switch (t) {
    case StDType::F32: *out = DType::F32; return true;
    case StDType::BF16: *out = DType::BF16; return true;
    case StDType::F16: *out = DType::F16; return true;
    case StDType::I32: *out = DType::I32; return true;
    case StDType::U8: *out = DType::U8; return true;
    default: return false;
  }
}

std::vector<TensorInfo> SafetensorsFile::parse_header(std::string_view text, uint64_t data_size,
                                                      const std::string& path,
                                                      std::map<std::string, std::string>* metadata) {
  // Duplicate keys at the top level are an error; nlohmann would silently keep the last.
  std::set<std::string> seen;
  std::string dup;
  json::parser_callback_t cb = [&](int depth, json::parse_event_t ev, json& parsed) {
    if (ev == json::parse_event_t::key && depth == 1) {
      std::string k = parsed.get<std::string>();
      if (!seen.insert(k).second && dup.empty()) dup = k;
    }
    return true;
  };
  json h;
  try {
    h = json::parse(text.begin(), text.end(), cb);
  } catch (const json::exception& e) {
    fail(str_cat(path, ": header is not valid JSON (", e.what(), ")"));
  }
  if (!dup.empty()) fail(str_cat(tensor_ctx(path, dup), "appears twice in the header"));
  ZI_CHECK(h.is_object(), path, ": header is not a JSON object");

  std::vector<TensorInfo> out;
  for (auto it = h.begin(); it != h.end(); ++it) {
    const std::string& name = it.key();
    const json& v = it.value();
    if (name == "__metadata__") {
      ZI_CHECK(v.is_object(), path, ": __metadata__ is not an object");
      for (auto m = v.begin(); m != v.end(); ++m) {
        ZI_CHECK(m.value().is_string(), path, ": __metadata__ '", m.key(), "' is not a string");
        if (metadata) (*metadata)[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    std::string ctx = tensor_ctx(path, name);
    ZI_CHECK(v.is_object(), ctx, "entry is not an object");
    ZI_CHECK(v.contains("dtype") && v["dtype"].is_string(), ctx, "missing dtype");
    ZI_CHECK(v.contains("shape") && v["shape"].is_array(), ctx, "missing shape");
    ZI_CHECK(v.contains("data_offsets") && v["data_offsets"].is_array() && v["data_offsets"].size() == 2, ctx,
             "data_offsets must be [begin, end]");
    TensorInfo ti;
    ti.name = name;
    std::string dt = v["dtype"].get<std::string>();
    ZI_CHECK(parse_st_dtype(dt, &ti.dtype), ctx, "unknown dtype '", dt, "'");
    for (const json& d : v["shape"]) {
      ZI_CHECK(d.is_number_unsigned() || (d.is_number_integer() && d.get<int64_t>() >= 0), ctx,
               "shape entries must be non-negative integers");
      uint64_t u = d.get<uint64_t>();
      ZI_CHECK(u <= uint64_t(INT64_MAX), ctx, "shape entry too large");
      ti.shape.push_back(int64_t(u));
    }
    for (int k = 0; k < 2; ++k)
      ZI_CHECK(v["data_offsets"][size_t(k)].is_number_unsigned() || (v["data_offsets"][size_t(k)].is_number_integer() &&
                                                                      v["data_offsets"][size_t(k)].get<int64_t>() >= 0),
               ctx, "data_offsets must be non-negative integers");
    ti.begin = v["data_offsets"][0].get<uint64_t>();
    ti.end = v["data_offsets"][1].get<uint64_t>();
    ZI_CHECK(ti.begin <= ti.end, ctx, "data_offsets [", ti.begin, ", ", ti.end, "] run backwards");
    uint64_t want = 0;
    ZI_CHECK(st_bytes(ti.dtype, ti.shape, &want), ctx, "shape ", shape_str(ti.shape), " overflows");
    ZI_CHECK(ti.end - ti.begin == want, ctx, "shape ", shape_str(ti.shape), " x ", dt, " needs ", want,
             " bytes but data_offsets span ", ti.end - ti.begin);
    ZI_CHECK(ti.end <= data_size, ctx, "data_offsets [", ti.begin, ", ", ti.end, "] run past the end of the data (",
             data_size, " bytes; file truncated?)");
    out.push_back(std::move(ti));
  }
  // Ranges must not overlap.
  std::vector<const TensorInfo*> by_off;
  for (const auto& t : out) by_off.push_back(&t);
  std::sort(by_off.begin(), by_off.end(), [](auto a, auto b) { return a->begin < b->begin; });
  for (size_t i = 1; i < by_off.size(); ++i)
    ZI_CHECK(by_off[i]->begin >= by_off[i - 1]->end || by_off[i - 1]->begin == by_off[i - 1]->end,
             tensor_ctx(path, by_off[i]->name), "data overlaps tensor '", by_off[i - 1]->name, "'");
  return out;
}

std::string TensorInfo::format_name() const {
  if (ggml_type != UINT32_MAX) {
    const GgmlType* g = ggml_type_info(ggml_type);
    return g ? g->name : "?";
  }
  return st_dtype_name(dtype);
}

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  SafetensorsFile f;
  f.file_ = MappedFile::open(path);
  const uint64_t size = f.file_->size();
  if (zi::is_gguf(f.file_->data(), size)) {
    GgufParsed g = parse_gguf(f.file_->data(), size, path);
    f.gguf_ = true;
    f.data_start_ = g.data_start;
    f.metadata_ = std::move(g.metadata);
    f.tensors_ = std::move(g.tensors);
    // llama.cpp's Qwen3 files name tensors its own way: give them the transformers names.
    auto arch = f.metadata_.find("general.architecture");
    if (arch != f.metadata_.end() && arch->second == "qwen3") {
      std::set<std::string> seen;
      for (TensorInfo& t : f.tensors_) {
        std::string n = qwen3_name_from_llama(t.name);
        if (!n.empty()) t.name = n;
        ZI_CHECK(seen.insert(t.name).second, path, ": tensor '", t.name, "' appears twice after renaming");
      }
    }
    std::sort(f.tensors_.begin(), f.tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) {
      return a.begin < b.begin;
    });
    for (size_t i = 0; i < f.tensors_.size(); ++i) f.index_[f.tensors_[i].name] = i;
    return f;
  }
  ZI_CHECK(size >= 8, path, ": too small to be a safetensors file (", size, " bytes)");
  uint64_t n = 0;
  std::memcpy(&n, f.file_->data(), 8);  // little-endian (x86, ARM)
  ZI_CHECK(n <= kMaxHeader, path, ": header length ", n, " exceeds the 100 MB limit (not a safetensors file?)");
  ZI_CHECK(n <= size - 8, path, ": header length ", n, " runs past the end of the file (", size,
           " bytes; truncated?)");
  ZI_CHECK(n >= 2 && f.file_->data()[8] == '{', path, ": header does not start with '{'");
  std::string_view text(reinterpret_cast<const char*>(f.file_->data()) + 8, size_t(n));
  f.data_start_ = 8 + n;
  f.tensors_ = parse_header(text, size - 8 - n, path, &f.metadata_);
  std::sort(f.tensors_.begin(), f.tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin < b.begin;
  });
  for (size_t i = 0; i < f.tensors_.size(); ++i) f.index_[f.tensors_[i].name] = i;
  return f;
}

const TensorInfo* SafetensorsFile::find(std::string_view name) const {
  auto it = index_.find(std::string(name));
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

Tensor SafetensorsFile::view(const TensorInfo& t) const {
  ZI_CHECK(!t.quantized(), tensor_ctx(path(), t.name), t.format_name(), " data cannot be viewed as a plain tensor");
  DType dt;
  ZI_CHECK(st_to_dtype(t.dtype, &dt), tensor_ctx(path(), t.name), "dtype ", st_dtype_name(t.dtype),
           " cannot be used here");
  ZI_CHECK(reinterpret_cast<uintptr_t>(data(t)) % dtype_size(dt) == 0, tensor_ctx(path(), t.name),
           "data is not aligned to ", dtype_size(dt), " bytes (header length ", data_start_ - 8,
           "), so it cannot be viewed in place");
  return Tensor::view_of(data(t), t.shape, dt, file_);
}

void SafetensorsFile::check_loadable(const TensorInfo& t, DType dt) const {
  const bool df = dt == DType::F32 || dt == DType::BF16 || dt == DType::F16;
  // Weight formats: a stored one loads as itself or dequantized to a float type; one made at
  // load time (dt a format) needs a float source with whole blocks per row.
  if (t.quantized() || t.dtype == StDType::F8_E4M3 || t.dtype == StDType::F8_E5M2) {
    const DType fmt = t.quantized() ? t.format : DType::F8_E4M3;
    ZI_CHECK(!t.shape.empty() && t.shape.back() > 0 && t.shape.back() % dtype_block(fmt) == 0,
             tensor_ctx(path(), t.name), "shape ", shape_str(t.shape), " does not hold whole ", t.format_name(),
             " blocks");
    if (df || (dt == fmt && t.dtype != StDType::F8_E5M2) || is_quantized(dt)) return;
    fail(str_cat(tensor_ctx(path(), t.name), "cannot convert ", t.format_name(), " to ", dtype_name(dt)));
  }
  if (is_quantized(dt)) dt = DType::F32;  // made from the f32 values
  DType sd;
  if (st_to_dtype(t.dtype, &sd)) {
    const bool sf = sd == DType::F32 || sd == DType::BF16 || sd == DType::F16;
    if (sd == dt || (sf && (dt == DType::F32 || dt == DType::BF16 || dt == DType::F16))) return;
  } else if ((t.dtype == StDType::I64 && dt == DType::I32) || (t.dtype == StDType::BOOL && dt == DType::U8) ||
             (t.dtype == StDType::F64 && dt == DType::F32)) {
    return;
  }
  fail(str_cat(tensor_ctx(path(), t.name), "cannot convert ", st_dtype_name(t.dtype), " to ", dtype_name(dt)));
}

Tensor SafetensorsFile::load(const TensorInfo& t, DType dt, Tag tag) const {
  std::string ctx = tensor_ctx(path(), t.name);
  const uint8_t* src = data(t);
  const size_t n = size_t(t.numel());
  const bool df = dt == DType::F32 || dt == DType::BF16 || dt == DType::F16;
  if (t.quantized() || t.dtype == StDType::F8_E4M3 || t.dtype == StDType::F8_E5M2) {
    const DType fmt = t.quantized() ? t.format : DType::F8_E4M3;
    ZI_CHECK(t.shape.size() >= 1 && t.shape.back() > 0 && t.shape.back() % dtype_block(fmt) == 0, ctx, "shape ",
             shape_str(t.shape), " does not hold whole ", t.format_name(), " blocks");
    if (dt == fmt && t.dtype != StDType::F8_E5M2) {  // kept as stored: rows of blocks, [N, K]
      const int64_t K = t.shape.back(), N = int64_t(n) / K;
      Tensor out = Tensor::empty({N, K}, fmt, tag);
      std::memcpy(out.raw(), src, out.nbytes());
      return out;
    }
    ZI_CHECK(df, ctx, "cannot convert ", t.format_name(), " to ", dtype_name(dt));
    Tensor f = Tensor::empty(t.shape, DType::F32, dt == DType::F32 ? tag : Tag::Workspace);
    float* d = f.data<float>();
    if (t.dtype == StDType::F8_E4M3)
      for (size_t i = 0; i < n; ++i) d[i] = quant::e4m3_to_f32(src[i]);
    else if (t.dtype == StDType::F8_E5M2)
      for (size_t i = 0; i < n; ++i) d[i] = quant::e5m2_to_f32(src[i]);
    else
      quant::dequantize_row(fmt, src, d, int64_t(n));
    return dt == DType::F32 ? f : f.to(dt, tag);
  }
  Tensor out = Tensor::empty(t.shape, dt, tag);
  DType sd;
  if (st_to_dtype(t.dtype, &sd)) {
    bool sf = sd == DType::F32 || sd == DType::BF16 || sd == DType::F16;
    if (sd == dt) {
      std::memcpy(out.raw(), src, out.nbytes());
    } else if (sf && df && reinterpret_cast<uintptr_t>(src) % dtype_size(sd) != 0) {
      // Nothing makes the data area aligned (the header length may be odd): convert from an
      // aligned copy rather than read misaligned elements.
      Tensor aligned = Tensor::empty(t.shape, sd, Tag::Workspace);
      std::memcpy(aligned.raw(), src, aligned.nbytes());
      convert(aligned.raw(), sd, out.raw(), dt, n);
    } else if (sf && df) {
      convert(src, sd, out.raw(), dt, n);
    } else fail(str_cat(ctx, "cannot convert ", st_dtype_name(t.dtype), " to ", dtype_name(dt)));
    return out;
  }
  if (t.dtype == StDType::I64 && dt == DType::I32) {
    int32_t* d = out.data<int32_t>();
    for (size_t i = 0; i < n; ++i) {
      int64_t v;
      std::memcpy(&v, src + 8 * i, 8);
      ZI_CHECK(v >= INT32_MIN && v <= INT32_MAX, ctx, "value ", v, " does not fit in i32");
      d[i] = int32_t(v);
    }
    return out;
  }
  if (t.dtype == StDType::BOOL && dt == DType::U8) {
    std::memcpy(out.raw(), src, n);
    return out;
  }
  if (t.dtype == StDType::F64 && dt == DType::F32) {
    float* d = out.data<float>();
    for (size_t i = 0; i < n; ++i) {
      double v;
      std::memcpy(&v, src + 8 * i, 8);
      d[i] = float(v);
    }
    return out;
  }
  fail(str_cat(ctx, "cannot convert ", st_dtype_name(t.dtype), " to ", dtype_name(dt)));
}

Tensor SafetensorsFile::load(std::string_view name) const {
  const TensorInfo* t = find(name);
  ZI_CHECK(t, tensor_ctx(path(), std::string(name)), "not found");
  DType dt;
  if (!st_to_dtype(t->dtype, &dt)) {
    if (t->dtype == StDType::I64) dt = DType::I32;
    else if (t->dtype == StDType::BOOL) dt = DType::U8;
    else dt = DType::F32;
  }
  return load(*t, dt);
}

Tensor SafetensorsFile::load(std::string_view name, DType dt) const {
  const TensorInfo* t = find(name);
  ZI_CHECK(t, tensor_ctx(path(), std::string(name)), "not found");
  return load(*t, dt);
}

void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  json h = json::object();
  if (!metadata.empty()) h["__metadata__"] = metadata;
  uint64_t off = 0;
  for (const auto& [name, t] : tensors) {
    ZI_CHECK(t.device() == Device::CPU, "[write_safetensors] ", name, " is not a host tensor");
    json e;
    e["dtype"] = st_name_of_dtype(t.dtype());
    e["shape"] = t.shape();
    e["data_offsets"] = {off, off + t.nbytes()};
    off += t.nbytes();
    h[name] = e;
  }
  std::string text = h.dump();
  while ((8 + text.size()) % 8) text += ' ';
  std::string tmp = path + ".tmp";
  std::ofstream os(tmp, std::ios::binary);
  ZI_CHECK(os.good(), "cannot write '", path, "'");
  uint64_t n = text.size();
  os.write(reinterpret_cast<const char*>(&n), 8);
  os.write(text.data(), std::streamsize(text.size()));
  for (const auto& [name, t] : tensors) {
    Tensor c = t.contiguous();
    os.write(static_cast<const char*>(c.raw()), std::streamsize(c.nbytes()));
  }
  os.close();
  if (!os.good()) {
    std::remove(tmp.c_str());
    fail(str_cat("cannot write '", path, "'"));
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) {
    std::remove(tmp.c_str());
    fail(str_cat("cannot write '", path, "': ", ec.message()));
  }
}

uint64_t SafetensorsWriter::Entry::nbytes() const {
  return uint64_t(shape_numel(shape)) * uint64_t(st_dtype_bits(dtype)) / 8;
}

SafetensorsWriter::SafetensorsWriter(std::string path, std::vector<Entry> entries,
                                     const std::map<std::string, std::string>& metadata)
    : path_(std::move(path)), tmp_(path_ + ".tmp"), entries_(std::move(entries)) {
  json h = json::object();
  if (!metadata.empty()) h["__metadata__"] = metadata;
  uint64_t off = 0;
  for (const Entry& e : entries_) {
    ZI_CHECK(!h.contains(e.name), "[SafetensorsWriter] ", path_, ": tensor '", e.name, "' twice");
    json j;
    j["dtype"] = st_dtype_name(e.dtype);
    j["shape"] = e.shape;
    j["data_offsets"] = {off, off + e.nbytes()};
    off += e.nbytes();
    h[e.name] = j;
  }
  std::string text = h.dump();
  while ((8 + text.size()) % 8) text += ' ';
  f_ = std::fopen(tmp_.c_str(), "wb");
  ZI_CHECK(f_, "cannot write '", tmp_, "': ", std::strerror(errno));
  const uint64_t n = text.size();
  if (std::fwrite(&n, 8, 1, f_) != 1 || std::fwrite(text.data(), 1, text.size(), f_) != text.size()) {
    std::fclose(f_);
    f_ = nullptr;
    std::remove(tmp_.c_str());
    fail(str_cat("cannot write '", tmp_, "': ", std::strerror(errno)));
  }
  while (at_ < entries_.size() && entries_[at_].nbytes() == 0) ++at_;
}

SafetensorsWriter::~SafetensorsWriter() {
  if (f_) {
    std::fclose(f_);
    std::remove(tmp_.c_str());
  }
}

const SafetensorsWriter::Entry& SafetensorsWriter::next() const {
  ZI_CHECK(at_ < entries_.size(), "[SafetensorsWriter] ", path_, ": every tensor is written");
  return entries_[at_];
}

void SafetensorsWriter::write(const void* data, size_t bytes) {
  ZI_CHECK(f_, "[SafetensorsWriter] ", path_, ": already finished");
  const Entry& e = next();
  ZI_CHECK(written_ + bytes <= e.nbytes(), "[SafetensorsWriter] ", path_, ": tensor '", e.name, "' is ", e.nbytes(),
           " bytes, got more");
  if (bytes && std::fwrite(data, 1, bytes, f_) != bytes) fail(str_cat("cannot write '", tmp_, "': ", std::strerror(errno)));
  written_ += bytes;
  if (written_ == e.nbytes()) {
    written_ = 0;
    ++at_;
    while (at_ < entries_.size() && entries_[at_].nbytes() == 0) ++at_;
  }
}

void SafetensorsWriter::finish() {
  ZI_CHECK(f_, "[SafetensorsWriter] ", path_, ": already finished");
  ZI_CHECK(at_ == entries_.size(), "[SafetensorsWriter] ", path_, ": tensor '", entries_[at_].name,
           "' was not written");
  const bool ok = std::fflush(f_) == 0;
  const bool closed = std::fclose(f_) == 0;
  f_ = nullptr;
  std::error_code ec;
  if (!ok || !closed) {
    std::remove(tmp_.c_str());
    fail(str_cat("cannot write '", path_, "': ", std::strerror(errno)));
  }
  fs::rename(tmp_, path_, ec);
  if (ec) {
    std::remove(tmp_.c_str());
    fail(str_cat("cannot write '", path_, "': ", ec.message()));
  }
}

// ---- TensorStore ----------------------------------------------------------------------

TensorStore TensorStore::open_file(const std::string& path) {
  TensorStore s;
  s.where_ = path;
  s.files_.push_back(std::make_shared<SafetensorsFile>(SafetensorsFile::open(path)));
  if (s.files_.back()->is_gguf()) {
    // GGUF files carry the original (ComfyUI) transformer names or llama.cpp's (renamed on
    // open): map them to the loaders' names with the layout rules of safetensors single files.
    std::vector<SourceTensor> src;
    for (const TensorInfo& t : s.files_.back()->tensors()) src.push_back({t.name, t.shape});
    FileLayout layout = analyze_layout(src, path);
    if (layout.components.size() == 1 && layout.unclaimed.empty()) {
      LayoutFile lf;
      lf.file = s.files_.back();
      lf.layout = std::move(layout);
      return lf.store(lf.layout.components[0].component);
    }
  }
  for (const auto& t : s.files_.back()->tensors()) s.map_[t.name] = Entry{s.files_.back().get(), &t};
  return s;
}

TensorStore TensorStore::from_infos(std::string where, std::shared_ptr<SafetensorsFile> file,
                                    std::vector<TensorInfo> infos) {
  TensorStore s;
  s.where_ = std::move(where);
  s.files_.push_back(std::move(file));
  for (TensorInfo& t : infos) {
    s.owned_.push_back(std::make_unique<TensorInfo>(std::move(t)));
    const TensorInfo* ti = s.owned_.back().get();
    ZI_CHECK(s.map_.emplace(ti->name, Entry{s.files_.back().get(), ti}).second, s.where_, ": two tensors named '",
             ti->name, "'");
  }
  return s;
}

TensorStore TensorStore::open_index(const std::string& index_path) {
  std::ifstream is(index_path);
  ZI_CHECK(is.good(), "cannot open '", index_path, "'");
  json j;
  try {
    j = json::parse(is);
  } catch (const json::exception& e) {
    fail(str_cat(index_path, ": not valid JSON (", e.what(), ")"));
  }
  ZI_CHECK(j.is_object() && j.contains("weight_map") && j["weight_map"].is_object(), index_path,
           ": no weight_map object");
  const fs::path dir = fs::path(index_path).parent_path();
  TensorStore s;
  s.where_ = index_path;
  std::map<std::string, size_t> shard_ix;
  for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
    ZI_CHECK(it.value().is_string(), index_path, ": weight_map entry '", it.key(), "' is not a file name");
    std::string shard = it.value().get<std::string>();
    ZI_CHECK(!shard.empty() && shard.find('/') == std::string::npos && shard.find('\0') == std::string::npos &&
                 shard != "." && shard != "..",
             index_path, ": weight_map entry '", it.key(), "' names an invalid shard '", shard, "'");
    if (!shard_ix.count(shard)) {
      fs::path p = dir / shard;
      ZI_CHECK(fs::exists(p), index_path, ": shard '", shard, "' (for tensor '", it.key(), "') is missing");
      shard_ix[shard] = s.files_.size();
      s.files_.push_back(std::make_shared<SafetensorsFile>(SafetensorsFile::open(p.string())));
    }
  }
  // Every tensor of every shard, with duplicates across shards refused.
  for (const auto& f : s.files_)
    for (const auto& t : f->tensors()) {
      auto [it, inserted] = s.map_.emplace(t.name, Entry{f.get(), &t});
      ZI_CHECK(inserted, index_path, ": tensor '", t.name, "' is in both '", it->second.file->path(), "' and '",
               f->path(), "'");
    }
  for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
    auto m = s.map_.find(it.key());
    std::string shard = it.value().get<std::string>();
    ZI_CHECK(m != s.map_.end(), index_path, ": tensor '", it.key(), "' is listed in shard '", shard,
             "' but not stored there");
    ZI_CHECK(m->second.file == s.files_[shard_ix[shard]].get(), index_path, ": tensor '", it.key(),
             "' is listed in shard '", shard, "' but stored in '", m->second.file->path(), "'");
  }
  return s;
}

TensorStore TensorStore::open_dir(const std::string& dir) {
  ZI_CHECK(fs::is_directory(dir), "'", dir, "' is not a directory");
  std::vector<fs::path> indexes, singles;
  for (const auto& e : fs::directory_iterator(dir)) {
    std::string n = e.path().filename().string();
    if (n.size() > 23 && n.ends_with(".safetensors.index.json")) indexes.push_back(e.path());
    else if (n.ends_with(".safetensors") || n.ends_with(".gguf")) singles.push_back(e.path());
  }
  ZI_CHECK(indexes.size() <= 1, dir, ": more than one *.safetensors.index.json");
  if (indexes.size() == 1) return open_index(indexes[0].string());
  ZI_CHECK(!singles.empty(), dir, ": no *.safetensors or *.gguf file");
  ZI_CHECK(singles.size() == 1, dir, ": several .safetensors/.gguf files but no *.safetensors.index.json");
  TensorStore s = open_file(singles[0].string());
  s.where_ = dir;
  return s;
}

TensorStore::Entry TensorStore::find(std::string_view name) const {
  auto it = map_.find(std::string(name));
  return it == map_.end() ? Entry{nullptr, nullptr} : it->second;
}

std::vector<std::string> TensorStore::names() const {
  std::vector<std::string> v;
  for (const auto& [k, e] : map_) v.push_back(k);
  std::sort(v.begin(), v.end());
  return v;
}

}  // namespace zi
