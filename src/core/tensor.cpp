#include "core/tensor.h"

#include <cstring>

#include "backends/device.h"
#include "core/check.h"

namespace zi {

std::string shape_str(const Shape& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) {
    if (i) r += ", ";
    r += std::to_string(s[i]);
  }
  return r + "]";
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

Shape contiguous_strides(const Shape& shape) {
  Shape st(shape.size());
  int64_t acc = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    st[i] = acc;
    acc *= shape[i];
  }
  return st;
}

Storage::~Storage() {
  if (owned && data) device::free(device, data, bytes, tag);
}

Tensor Tensor::unbound(const Shape& shape, DType dt, Device dev, Tag tag) {
  Tensor t;
  t.storage_ = std::make_shared<Storage>();
  t.storage_->bytes = dtype_bytes(dt, shape_numel(shape));
  t.storage_->device = dev;
  t.storage_->tag = tag;
  t.storage_->owned = false;
  t.dtype_ = dt;
  t.shape_ = shape;
  t.strides_ = contiguous_strides(shape);
  return t;
}

void Tensor::rebind(void* data) const {
  ZI_CHECK(storage_ && !storage_->owned && offset_ == 0, "[tensor] rebind needs an unbound() tensor");
  storage_->data = data;
}

Tensor Tensor::empty(const Shape& shape, DType dt, Tag tag, Device dev) {
  for (int64_t d : shape) ZI_CHECK(d >= 0, "[tensor] negative dimension in ", shape_str(shape));
  if (dtype_block(dt) > 1)
    ZI_CHECK(!shape.empty() && shape.back() % dtype_block(dt) == 0, "[tensor] a ", dtype_name(dt),
             " tensor's last dimension must be a multiple of ", dtype_block(dt), ", got ", shape_str(shape));
  Tensor t;
  t.storage_ = std::make_shared<Storage>();
  t.storage_->bytes = dtype_bytes(dt, shape_numel(shape));
  t.storage_->device = dev;
  t.storage_->tag = tag;
  t.storage_->owned = true;
  t.storage_->data = device::alloc(dev, t.storage_->bytes, tag);
  t.dtype_ = dt;
  t.shape_ = shape;
  t.strides_ = contiguous_strides(shape);
  return t;
}

Tensor Tensor::zeros(const Shape& shape, DType dt, Tag tag, Device dev) {
  Tensor t = empty(shape, dt, tag, dev);
  device::zero(dev, t.raw(), t.nbytes());
  return t;
}

Tensor Tensor::from_vector(const std::vector<float>& values, const Shape& shape, Tag tag) {
  ZI_CHECK(int64_t(values.size()) == shape_numel(shape), "[tensor] from_vector: ", values.size(),
           " values for shape ", shape_str(shape));
  Tensor t = empty(shape, DType::F32, tag);
  std::memcpy(t.raw(), values.data(), values.size() * 4);
  return t;
}

Tensor Tensor::view_of(const void* data, const Shape& shape, DType dt, std::shared_ptr<const void> keepalive) {
  Tensor t;
  t.storage_ = std::make_shared<Storage>();
  if (dtype_block(dt) > 1)
    ZI_CHECK(!shape.empty() && shape.back() % dtype_block(dt) == 0, "[tensor] a ", dtype_name(dt),
             " tensor's last dimension must be a multiple of ", dtype_block(dt), ", got ", shape_str(shape));
  t.storage_->data = const_cast<void*>(data);
  t.storage_->bytes = dtype_bytes(dt, shape_numel(shape));
  t.storage_->owned = false;
  t.storage_->keepalive = std::move(keepalive);
  t.dtype_ = dt;
  t.shape_ = shape;
  t.strides_ = contiguous_strides(shape);
  return t;
}

bool Tensor::is_contiguous() const { return strides_ == contiguous_strides(shape_); }

float* Tensor::f32() const {
  ZI_CHECK(defined(), "[tensor] undefined tensor");
  ZI_CHECK(dtype_ == DType::F32, "[tensor] expected f32, got ", desc());
  ZI_CHECK(is_contiguous(), "[tensor] expected a contiguous tensor, got ", desc());
  return data<float>();
}

Tensor Tensor::reshape(const Shape& s) const {
  ZI_CHECK(is_contiguous(), "[reshape] needs a contiguous tensor, got ", desc());
  Shape ns = s;
  int neg = -1;
  int64_t known = 1;
  for (size_t i = 0; i < ns.size(); ++i) {
    if (ns[i] == -1) {
      ZI_CHECK(neg < 0, "[reshape] more than one -1 in ", shape_str(s));
      neg = int(i);
    } else {
      known *= ns[i];
    }
  }
  if (neg >= 0) ns[size_t(neg)] = known ? numel() / known : 0;
  ZI_CHECK(shape_numel(ns) == numel(), "[reshape] cannot view ", desc(), " as ", shape_str(s));
  Tensor t = *this;
  t.shape_ = ns;
  t.strides_ = contiguous_strides(ns);
  return t;
}

Tensor Tensor::slice(int d, int64_t begin, int64_t end) const {
  if (d < 0) d += ndim();
  ZI_CHECK(d >= 0 && d < ndim(), "[slice] bad dimension ", d, " for ", desc());
  ZI_CHECK(0 <= begin && begin <= end && end <= shape_[size_t(d)], "[slice] range ", begin, ":", end,
           " outside dimension ", d, " of ", desc());
  Tensor t = *this;
  t.e4m3_.reset();
  if (is_quantized(dtype_)) {  // weight formats: whole rows only
    ZI_CHECK(d == 0 && is_contiguous(), "[slice] a ", dtype_name(dtype_), " tensor can only be sliced by rows, got ",
             desc());
    t.offset_ += dtype_bytes(dtype_, begin * strides_[0]);
    if (row_scale_) t.row_scale_ = std::make_shared<Tensor>(row_scale_->slice(0, begin, end));
  } else {
    t.offset_ += size_t(begin * strides_[size_t(d)]) * dtype_size(dtype_);
  }
  t.shape_[size_t(d)] = end - begin;
  return t;
}

Tensor Tensor::permute(const std::vector<int>& order) const {
  ZI_CHECK(int(order.size()) == ndim(), "[permute] order has ", order.size(), " entries for ", desc());
  Tensor t = *this;
  t.e4m3_.reset();
  for (size_t i = 0; i < order.size(); ++i) {
    t.shape_[i] = shape_[size_t(order[i])];
    t.strides_[i] = strides_[size_t(order[i])];
  }
  return t;
}

Tensor Tensor::contiguous(Tag tag) const {
  if (is_contiguous()) return *this;
  ZI_CHECK(!is_quantized(dtype_), "[contiguous] cannot rearrange a ", dtype_name(dtype_), " tensor ", desc());
  if (device() != Device::CPU) {
    Tensor out = empty(shape_, dtype_, tag, device());
    device::copy_strided_gpu(*this, out);
    return out;
  }
  Tensor out = empty(shape_, dtype_, tag);
  const size_t es = dtype_size(dtype_);
  const int nd = ndim();
  const int64_t n = numel();
  std::vector<int64_t> idx(size_t(nd), 0);
  const char* src = static_cast<const char*>(raw());
  char* dst = static_cast<char*>(out.raw());
  // Copy the innermost dimension row by row.
  const int64_t inner = nd ? shape_[size_t(nd - 1)] : 1;
  const int64_t istride = nd ? strides_[size_t(nd - 1)] : 1;
  for (int64_t row = 0; row < (inner ? n / inner : 0); ++row) {
    int64_t off = 0;
    for (int i = 0; i < nd - 1; ++i) off += idx[size_t(i)] * strides_[size_t(i)];
    if (istride == 1) {  // a contiguous row (a column slice of a matrix): one copy
      std::memcpy(dst + size_t(row * inner) * es, src + size_t(off) * es, size_t(inner) * es);
    } else {
      for (int64_t j = 0; j < inner; ++j)
        std::memcpy(dst + size_t(row * inner + j) * es, src + size_t(off + j * istride) * es, es);
    }
    for (int i = nd - 2; i >= 0; --i) {
      if (++idx[size_t(i)] < shape_[size_t(i)]) break;
      idx[size_t(i)] = 0;
    }
  }
  return out;
}

Tensor Tensor::clone(Tag tag) const {
  if (!is_contiguous()) return contiguous(tag);
  Tensor out = empty(shape_, dtype_, tag, device());
  device::copy(out.raw(), device(), raw(), device(), nbytes());
  if (row_scale_) out.row_scale_ = std::make_shared<Tensor>(row_scale_->clone(tag));
  return out;
}

Tensor Tensor::to(DType dt, Tag tag) const {
  ZI_CHECK(!is_quantized(dtype_) && !is_quantized(dt), "[tensor] to(): ", desc(), " -> ", dtype_name(dt),
           " is a weight-format conversion (core/quant.h)");
  Tensor src = contiguous(tag);
  if (dt == dtype_) return src.storage_ == storage_ ? clone(tag) : src;
  Tensor out = empty(shape_, dt, tag, device());
  device::convert(device(), src.raw(), dtype_, out.raw(), dt, size_t(numel()));
  return out;
}

Tensor Tensor::to_device(Device d, Tag tag) const {
  ZI_CHECK(defined(), "[to_device] undefined tensor");
  if (device() == d && is_contiguous()) return *this;
  Tensor src = contiguous(tag);
  if (d == device()) return src;
  Tensor out = empty(shape_, dtype_, tag, d);
  device::copy(out.raw(), d, src.raw(), src.device(), nbytes());
  if (row_scale_) out.row_scale_ = std::make_shared<Tensor>(row_scale_->to_device(d, tag));
  return out;
}

void Tensor::set_row_scale(Tensor s) {
  ZI_CHECK(dtype_ == DType::F8_E4M3 && ndim() == 2, "[tensor] row scales belong to 2-D fp8 weights, not ", desc());
  ZI_CHECK(s.dtype() == DType::F32 && s.ndim() == 1 && s.dim(0) == dim(0) && s.is_contiguous(),
           "[tensor] row scales of ", desc(), " must be f32[", dim(0), "], got ", s.desc());
  row_scale_ = std::make_shared<Tensor>(std::move(s));
}

void Tensor::set_e4m3_copy(Tensor q) {
  ZI_CHECK(dtype_ == DType::BF16 && ndim() >= 1 && is_contiguous(), "[tensor] an e4m3 copy belongs to contiguous bf16 activations, not ",
           desc());
  ZI_CHECK(q.dtype() == DType::F8_E4M3 && q.ndim() == 2 && q.dim(1) == dim(-1) && q.numel() == numel() && q.row_scale() &&
               q.device() == device(),
           "[tensor] the e4m3 copy of ", desc(), " must be f8_e4m3[rows, ", dim(-1), "] with row scales, got ", q.desc());
  e4m3_ = std::make_shared<const Tensor>(std::move(q));
}

void Tensor::copy_from(const Tensor& src) const {
  ZI_CHECK(defined() && src.defined() && src.dtype_ == dtype_ && src.shape_ == shape_ && is_contiguous() &&
               src.is_contiguous(),
           "[tensor] copy_from: ", defined() ? desc() : std::string("undefined"), " <- ",
           src.defined() ? src.desc() : std::string("undefined"), " (same shape and dtype, contiguous)");
  device::copy(raw(), device(), src.raw(), src.device(), nbytes());
}

std::string Tensor::desc() const { return str_cat(dtype_name(dtype_), shape_str(shape_)); }

}  // namespace zi
