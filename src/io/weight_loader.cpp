#include "io/weight_loader.h"

#include <algorithm>
#include <set>

#include "backends/device.h"
#include "core/check.h"

namespace zi {

namespace {
thread_local WeightLoader::ProgressFn t_progress;
}

LoadProgressScope::LoadProgressScope(WeightLoader::ProgressFn fn) : prev_(std::move(t_progress)) {
  t_progress = std::move(fn);
}
LoadProgressScope::~LoadProgressScope() { t_progress = std::move(prev_); }

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
  return load_impl(name, shape, dt, true);
}

Tensor WeightLoader::load_optional(const std::string& name, const Shape& shape, DType dt) {
  return load_impl(name, shape, dt, false);
}

Tensor WeightLoader::load_impl(const std::string& name, const Shape& shape, DType dt, bool required) {
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
  if (!e.file) {
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
  Tensor out;
  DType sdt;
  const bool float_src = st_to_dtype(e.info->dtype, &sdt) &&
                         (sdt == DType::F32 || sdt == DType::BF16 || sdt == DType::F16);
  const bool float_dst = dt == DType::F32 || dt == DType::BF16 || dt == DType::F16;
  if (!patched && ctx_.device == Device::CUDA && float_src && float_dst) {
    out = Tensor::empty(shape, dt, tag_, Device::CUDA);
    device::upload_convert(e.file->data(*e.info), sdt, out.numel(), out);
  } else if (!patched) {
    out = e.file->load(*e.info, dt, tag_);
  } else {
    // One tensor in f32 in flight, patched, then converted to its final dtype.
    Tensor staging = e.file->load(*e.info, DType::F32, Tag::Workspace);
    for (const auto& p : patches_)
      if (p.wants(name)) p.apply(name, staging);
    if (dt == DType::F32) {
      out = Tensor::empty(shape, dt, tag_);
      std::copy_n(staging.f32(), staging.numel(), out.f32());
    } else {
      out = staging.to(dt, tag_);
    }
  }
  if (ctx_.device != out.device()) out = out.to_device(ctx_.device, tag_);
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
