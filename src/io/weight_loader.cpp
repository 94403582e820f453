#include "io/weight_loader.h"

#include <cstdlib>

#include <algorithm>
#include <set>

#include "backends/device.h"
#include "core/check.h"
#include "core/quant.h"

#include <span>

namespace zi {

namespace {
thread_local WeightLoader::ProgressFn t_progress;

// ZI_UPLOAD_READ=1: GPU uploads read the file with pread into the pinned ring instead of copying
// from the mapping (page faults, then MADV_DONTNEED); an experiment until measured on a GPU.
bool upload_by_read() {
  const char* e = std::getenv("ZI_UPLOAD_READ");
  return e && *e == '1';
}
}

LoadProgressScope::LoadProgressScope(WeightLoader::ProgressFn fn) : prev_(std::move(t_progress)) {
  t_progress = std::move(fn);
}
LoadProgressScope::~LoadProgressScope() { t_progress = std::move(prev_); }
WeightLoader::ProgressFn LoadProgressScope::current() { return t_progress; }

WeightLoader::WeightLoader(const TensorStore& store, Tag tag, std::string component, PhaseContext ctx)
    : store_(store), tag_(tag), ctx_(ctx), component_(std::move(component)) {
  for (const auto& f : store_.files())
    for (const TensorInfo& t : f->tensors()) total_ += int64_t(t.nbytes());
}

WeightLoader WeightLoader::recorder(std::vector<BoundTensor>* out, std::string component) {
  static const TensorStore empty;
  WeightLoader l(empty, Tag::Workspace, std::move(component));
  l.record_ = out;
  return l;
}

bool WeightLoader::has(const std::string& name) const { return store_.contains(name); }

void WeightLoader::add_override(const TensorStore* store, std::function<std::string(const std::string&)> rename) {
  Override o{store, {}, {}};
  for (const std::string& n : store->names()) o.by_target[rename ? rename(n) : n] = n;
  overrides_.push_back(std::move(o));
}

Tensor WeightLoader::load(const std::string& name, const Shape& shape, DType dt) {
  ZI_CHECK(!is_quantized(dt), "[WeightLoader] ", name, ": weight formats are for load_matrix");
  return load_impl(name, shape, dt, true, false);
}

Tensor WeightLoader::load_optional(const std::string& name, const Shape& shape, DType dt) {
  ZI_CHECK(!is_quantized(dt), "[WeightLoader] ", name, ": weight formats are for load_matrix");
  return load_impl(name, shape, dt, false, false);
}

Tensor WeightLoader::load_matrix(const std::string& name, const Shape& shape, DType dt) {
  return load_impl(name, shape, dt, true, true);
}

Tensor WeightLoader::load_table(const std::string& name, const Shape& shape, DType dt) {
  ZI_CHECK(dt == DType::F32 || dt == DType::BF16 || dt == DType::F16, "[WeightLoader] ", name,
           ": a table is viewed or loaded in a float dtype, not ", dtype_name(dt));
  bool plain = !record_ && !check_only_;
  for (const auto& o : overrides_) plain = plain && !o.by_target.count(name);
  for (const auto& p : patches_) plain = plain && !p.wants(name);
  const TensorStore::Entry e = plain ? store_.find(name) : TensorStore::Entry{nullptr, nullptr};
  DType sdt;
  if (e.file && e.info->shape == shape && !e.info->quantized() && st_to_dtype(e.info->dtype, &sdt) && sdt == dt &&
      reinterpret_cast<uintptr_t>(e.file->data(*e.info)) % dtype_size(dt) == 0) {
    used_.push_back(name);
    store_.note_read(name);
    read_ += int64_t(e.info->nbytes());  // counted as read for the progress; nothing is copied
    if (t_progress) t_progress(component_, read_, total_);
    return e.file->view(*e.info);
  }
  const DeviceScope host(*this, Device::CPU);
  return load(name, shape, dt);
}

namespace {
bool is_float_st(StDType t) { return t == StDType::F32 || t == StDType::BF16 || t == StDType::F16; }

// The weight format a tensor is stored in (GGUF blocks, fp8), else F32 (a plain float tensor).
DType stored_format(const TensorInfo& t) {
  return t.quantized() ? t.format : t.dtype == StDType::F8_E4M3 ? DType::F8_E4M3 : DType::F32;
}

// The weight format a matrix is held in: the stored one kept (unless a patch must change its
// values), else `dt` made at load when `dt` is a format and the rows are whole blocks (the tiny
// model's FFN is not); F32 when neither: it loads as a float tensor in storage_dtype(dt).
DType matrix_format(DType stored, bool patched, DType dt, const Shape& shape) {
  if (shape.size() != 2) return DType::F32;
  if (is_quantized(stored) && !patched) return stored;
  if (is_quantized(dt) && shape[1] % dtype_block(dt) == 0) return dt;
  return DType::F32;
}
}  // namespace

DType storage_dtype(DType wdt) { return is_quantized(wdt) ? DType::BF16 : wdt; }

TensorStore::Entry WeightLoader::resolve(const std::string& name) const {
  TensorStore::Entry e{nullptr, nullptr};
  for (const auto& o : overrides_) {  // the last matching override wins, as in load_impl
    auto it = o.by_target.find(name);
    if (it != o.by_target.end()) e = o.store->find(it->second);
  }
  return e.file ? e : store_.find(name);
}

bool WeightLoader::planned_dtype(const std::string& name, const Shape& shape, DType dt, DType* out) const {
  const TensorStore::Entry e = resolve(name);
  if (!e.file || e.info->shape != shape) return false;
  bool patched = false;
  for (const auto& p : patches_) patched = patched || p.wants(name);
  const DType fmt = matrix_format(stored_format(*e.info), patched, dt, shape);  // as load_impl decides
  *out = is_quantized(fmt) ? fmt : storage_dtype(dt);
  return true;
}

Tensor WeightLoader::load_matrix_rows(const std::vector<std::string>& names, const std::vector<Shape>& shapes, DType dt,
                                      std::vector<Tensor>* parts) {
  ZI_CHECK(!names.empty() && names.size() == shapes.size() && parts, "[WeightLoader] load_matrix_rows: bad arguments");
  parts->clear();
  // One dtype for every part, and matrices of one width: fused. Else (or when nothing is read:
  // recorder, check-only) each part as load_matrix gives it.
  DType fdt = DType::F32;
  bool fuse = !record_ && !check_only_;
  int64_t rows = 0;
  for (size_t i = 0; fuse && i < names.size(); ++i) {
    DType pdt;
    fuse = shapes[i].size() == 2 && shapes[i][1] == shapes[0][1] && planned_dtype(names[i], shapes[i], dt, &pdt) &&
           (i == 0 || pdt == fdt);
    fdt = pdt;
    if (fuse) rows += shapes[i][0];
  }
  if (!fuse) {
    for (size_t i = 0; i < names.size(); ++i) parts->push_back(load_impl(names[i], shapes[i], dt, true, true));
    return {};
  }
  Tensor fused = Tensor::empty({rows, shapes[0][1]}, fdt, tag_, ctx_.device);
  if (fdt == DType::F8_E4M3) fused.set_row_scale(Tensor::empty({rows}, DType::F32, tag_, ctx_.device));
  int64_t r0 = 0;
  for (size_t i = 0; i < names.size(); ++i) {
    const Tensor dst = fused.slice(0, r0, r0 + shapes[i][0]);
    load_impl(names[i], shapes[i], dt, true, true, &dst);
    r0 += shapes[i][0];
  }
  return fused;
}

Tensor WeightLoader::load_impl(const std::string& name, const Shape& shape, DType dt, bool required, bool matrix,
                               const Tensor* dst) {
  used_.push_back(name);
  if (record_) {
    record_->push_back({name, shape, dt});
    return {};
  }
  TensorStore::Entry e{nullptr, nullptr};
  // An override's tensor replaces the base one.
  for (auto& o : overrides_) {
    auto it = o.by_target.find(name);
    if (it == o.by_target.end()) continue;
    e = o.store->find(it->second);
    o.used.push_back(it->second);
    o.store->note_read(it->second);
  }
  if (!e.file) e = store_.find(name);
  if (!e.file || (!required && e.info->numel() == 0)) {
    if (required) missing_.push_back(name);
    return {};
  }
  if (e.info->shape != shape) {
    wrong_.push_back(str_cat(name, " is ", shape_str(e.info->shape), ", expected ", shape_str(shape)));
    return {};
  }
  if (check_only_) {
    e.file->check_loadable(*e.info, dt);  // the error the load would give
    for (const auto& p : patches_)
      if (p.check && p.wants(name)) p.check(name, shape);
    return {};
  }
  store_.note_read(name);
  bool patched = false;
  for (const auto& p : patches_) patched = patched || p.wants(name);
  // Weight formats. A stored one (GGUF blocks, fp8) is kept for a matrix; one asked for is made
  // here from the f32 staging copy of this one tensor; rows that are not whole blocks (the tiny
  // model's FFN) stay bf16. ComfyUI fp8: `<module>.scale_weight` multiplies the weight.
  const DType stored_fmt = stored_format(*e.info);
  Tensor fp8_scale;
  if (e.info->dtype == StDType::F8_E4M3 || e.info->dtype == StDType::F8_E5M2) {
    const std::string base = name.ends_with(".weight") ? name.substr(0, name.size() - 7) : name;
    TensorStore::Entry se = store_.find(base + ".scale_weight");
    if (se.file) {
      fp8_scale = se.file->load(*se.info, DType::F32, Tag::Workspace);
      ZI_CHECK(fp8_scale.numel() == 1, component_, ": ", base, ".scale_weight must hold one value, got ",
               fp8_scale.desc());
      used_.push_back(base + ".scale_weight");
      store_.note_read(base + ".scale_weight");
    }
  }
  const float fp8_s = fp8_scale.defined() ? fp8_scale.data<float>()[0] : 1.0f;
  // The f32 staging copy of this one tensor: ComfyUI's scale applied, then the patches (LoRA).
  auto staged_f32 = [&] {
    Tensor staging = e.file->load(*e.info, DType::F32, Tag::Workspace);
    if (fp8_s != 1.0f)
      for (float& v : std::span<float>(staging.data<float>(), size_t(staging.numel()))) v *= fp8_s;
    for (const auto& p : patches_)
      if (p.wants(name)) p.apply(name, staging);
    return staging;
  };
  // A part of a fused matrix (load_matrix_rows): host copies are workspace, and the result is
  // written into its rows.
  const Tag host_tag = dst ? Tag::Workspace : tag_;
  auto into_dst = [&](const Tensor& t) {
    ZI_CHECK(t.dtype() == dst->dtype() && t.shape() == dst->shape() && t.is_contiguous() &&
                 bool(t.row_scale()) == bool(dst->row_scale()),
             "[WeightLoader] ", name, " loaded as ", t.desc(), ", not as planned for its fused rows ", dst->desc());
    device::copy(dst->raw(), dst->device(), t.raw(), t.device(), t.nbytes());
    if (const Tensor* rs = t.row_scale()) {
      const Tensor* drs = dst->row_scale();
      device::copy(drs->raw(), drs->device(), rs->raw(), rs->device(), rs->nbytes());
    }
    return *dst;
  };
  if (matrix && is_quantized(matrix_format(stored_fmt, patched, dt, shape))) {
    const bool keep = is_quantized(stored_fmt) && !patched;  // else dt is made here
    Tensor q;
    if (keep) {
      q = e.file->load(*e.info, stored_fmt, host_tag);
      if (stored_fmt == DType::F8_E4M3) {
        Tensor sc = Tensor::empty({shape[0]}, DType::F32, host_tag);
        std::fill_n(sc.data<float>(), shape[0], fp8_s);
        q.set_row_scale(std::move(sc));
      }
    } else if (!patched && !e.info->quantized() && is_float_st(e.info->dtype) &&
               reinterpret_cast<uintptr_t>(e.file->data(*e.info)) % 4 == 0) {
      // Straight from the mapping, row by row: no f32 copy of the tensor at all (the Qwen3
      // embedding would be 1.6 GB in f32).
      q = quant::quantize(e.file->view(*e.info), dt, host_tag);
    } else {
      Tensor staging = staged_f32();
      q = quant::quantize(staging, dt, host_tag);
    }
    if (dst) q = into_dst(q);
    else if (ctx_.device != q.device()) q = q.to_device(ctx_.device, tag_);
    e.file->release(*e.info);
    bytes_ += int64_t(q.nbytes()) + (q.row_scale() ? int64_t(q.row_scale()->nbytes()) : 0);
    read_ += int64_t(e.info->nbytes());  // quantized or kept as stored: its file bytes were read too
    if (t_progress) t_progress(component_, read_, total_);
    return q;
  }
  dt = storage_dtype(dt);
  if (fp8_s != 1.0f || (is_quantized(stored_fmt) && patched)) patched = true;  // via the f32 staging copy
  Tensor out;
  DType sdt;
  const bool float_src = st_to_dtype(e.info->dtype, &sdt) &&
                         (sdt == DType::F32 || sdt == DType::BF16 || sdt == DType::F16);
  const bool float_dst = dt == DType::F32 || dt == DType::BF16 || dt == DType::F16;
  if (!patched && ctx_.device == Device::CUDA && float_src && float_dst) {
    out = dst ? *dst : Tensor::empty(shape, dt, tag_, Device::CUDA);  // straight into the fused rows
    if (upload_by_read()) {
      // pread into the pinned ring: no page of the mapping is touched (nothing to release).
      const SafetensorsFile& f = *e.file;
      const TensorInfo& info = *e.info;
      device::upload_convert_read([&f, &info](void* d, size_t off, size_t len) { f.read(info, off, d, len); }, sdt,
                                  out.numel(), out);
    } else {
      device::upload_convert(e.file->data(*e.info), sdt, out.numel(), out);
    }
  } else if (!patched) {
    out = e.file->load(*e.info, dt, host_tag);
  } else {
    // One tensor in f32 in flight, patched, then converted to its final dtype.
    Tensor staging = staged_f32();
    if (dt == DType::F32) {
      out = Tensor::empty(shape, dt, host_tag);
      std::copy_n(staging.f32(), staging.numel(), out.f32());
    } else {
      out = staging.to(dt, host_tag);
    }
  }
  if (dst) {
    if (out.raw() != dst->raw()) out = into_dst(out);
  } else if (ctx_.device != out.device()) {
    out = out.to_device(ctx_.device, tag_);
  }
  e.file->release(*e.info);
  bytes_ += int64_t(out.nbytes());
  read_ += int64_t(e.info->nbytes());
  if (t_progress) t_progress(component_, read_, total_);
  return out;
}

void WeightLoader::finish(bool reject_unexpected) {
  std::vector<std::string> problems;
  auto list = [](const std::vector<std::string>& v, size_t most = 5) {
    std::string s;
    for (size_t i = 0; i < v.size() && i < most; ++i) s += (i ? ", " : "") + v[i];
    if (v.size() > most) s += str_cat(", ... (", v.size(), " in all)");
    return s;
  };
  if (!missing_.empty()) problems.push_back("missing tensors: " + list(missing_));
  if (!wrong_.empty()) problems.push_back("wrong shapes: " + list(wrong_));
  if (reject_unexpected) {
    std::set<std::string> used(used_.begin(), used_.end());
    std::vector<std::string> extra;
    for (const std::string& n : store_.names()) {
      if (used.count(n)) continue;
      bool ign = false;
      for (const auto& p : ignored_) ign = ign || n.starts_with(p);
      if (!ign) extra.push_back(n);
    }
    if (!extra.empty()) problems.push_back("unexpected tensors: " + list(extra));
  }
  for (const auto& o : overrides_) {
    std::set<std::string> used(o.used.begin(), o.used.end());
    std::vector<std::string> extra;
    for (const std::string& n : o.store->names())
      if (!used.count(n)) extra.push_back(n);
    if (!extra.empty())
      problems.push_back(str_cat("override ", o.store->where(), " has tensors matching no ", component_,
                                 " weight: ", list(extra)));
  }
  if (problems.empty()) return;
  std::string msg = str_cat(component_, " (", store_.where(), "): ");
  for (size_t i = 0; i < problems.size(); ++i) msg += (i ? "; " : "") + problems[i];
  fail(msg);
}

}  // namespace zi
