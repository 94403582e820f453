// Tensor: dtype, shape, strides, device, and a shared Storage. No graph, no autograd.
// Storage is either owned (allocated through the accounted allocator of its device) or a
// zero-copy view into a memory-mapped file kept alive by `keepalive`.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "core/allocator.h"
#include "core/dtype.h"

namespace zi {

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& s);  // "[2, 3]"
int64_t shape_numel(const Shape& s);

struct Storage {
  void* data = nullptr;
  size_t bytes = 0;
  Device device = Device::CPU;
  Tag tag = Tag::Activations;
  bool owned = false;                    // false: a view (mapping), not accounted
  std::shared_ptr<const void> keepalive;  // keeps a mapping alive for views
  Storage() = default;
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
  ~Storage();
};

// Where and how a phase computes, passed explicitly: the pipeline makes one per phase and hands
// it to the WeightLoader (weights load onto its device), the load_* functions keep it in the
// model, and the *_forward functions compute with it (ops::to_compute puts host data there).
struct PhaseContext {
  Device device = Device::CPU;
  DType act = DType::F32;      // activation dtype: F32 on the CPU; F32 or BF16 on CUDA
  int64_t ffn_chunk_rows = 0;  // DiT feed-forward rows per chunk; 0: the device's default
  int fused_projections = -1;  // DiT q/k/v and w1/w3 as one matrix each: 1 on, 0 off, -1 the default
  int fused_add_norm = -1;     // DiT attention residual + FFN pre-norm as one op: 1 on, 0 off, -1 the default
  int cuda_graphs = -1;        // DiT step recorded once and replayed (GPU): 1 on, 0 off, -1 the default
  // The context of a phase on `d` with activations in `precision` (the CPU computes in f32).
  static PhaseContext on(Device d, DType precision = DType::F32) {
    PhaseContext c;
    c.device = d;
    c.act = d == Device::CPU ? DType::F32 : precision;
    return c;
  }
};

class Tensor {
 public:
  Tensor() = default;

  // Uninitialised tensor from the accounted allocator.
  static Tensor empty(const Shape& shape, DType dt, Tag tag = Tag::Activations, Device dev = Device::CPU);
  static Tensor zeros(const Shape& shape, DType dt, Tag tag = Tag::Activations, Device dev = Device::CPU);
  // f32 tensor holding a copy of `values`.
  static Tensor from_vector(const std::vector<float>& values, const Shape& shape, Tag tag = Tag::Activations);
  // Zero-copy, read-only view of host memory owned by someone else (e.g. an mmap).
  static Tensor view_of(const void* data, const Shape& shape, DType dt, std::shared_ptr<const void> keepalive);
  // Streamed weights (io/weight_stream.h): a tensor on `dev` whose storage nobody owns and
  // which points where rebind() says (a ring slot while its block computes; null before).
  static Tensor unbound(const Shape& shape, DType dt, Device dev, Tag tag);
  // Points the storage of an unbound() tensor, shared by every copy of it, at `data`.
  void rebind(void* data) const;

  bool defined() const { return storage_ != nullptr; }
  DType dtype() const { return dtype_; }
  Device device() const { return storage_ ? storage_->device : Device::CPU; }
  Tag tag() const { return storage_ ? storage_->tag : Tag::Activations; }
  const Shape& shape() const { return shape_; }
  const Shape& strides() const { return strides_; }  // in elements
  int ndim() const { return int(shape_.size()); }
  int64_t dim(int i) const { return shape_[size_t(i < 0 ? i + ndim() : i)]; }
  int64_t numel() const { return shape_numel(shape_); }
  size_t nbytes() const { return dtype_bytes(dtype_, numel()); }
  // F8_E4M3 weights: the per-row (output channel) f32 scales, value = e4m3 · scale[row].
  const Tensor* row_scale() const { return row_scale_.get(); }
  void set_row_scale(Tensor s);
  // bf16 activations [.., K]: an e4m3 copy of exactly these values, F8_E4M3 [rows, K] with per-row
  // scales (row_scale), written by the op that produced them for the fp8 GEMMs that read them
  // (ops::rms_norm / silu_mul with `e4m3_for`). reshape keeps it, every other view, copy or
  // conversion drops it, and an op writing into the tensor in place drops it from that handle.
  const Tensor* e4m3_copy() const { return e4m3_.get(); }
  // A producer told that fp8 GEMMs reading the copy are its only readers (ops::rms_norm and
  // others with e4m3_only) writes the copy alone: its bf16 result is then bound to no memory,
  // and only such a GEMM may read it (ops::linear refuses anything else with an error).
  bool values_in_e4m3_copy_only() const { return e4m3_ && storage_ && !storage_->owned && !storage_->data; }
  void set_e4m3_copy(Tensor q);
  void drop_e4m3_copy() { e4m3_.reset(); }
  bool is_contiguous() const;

  void* raw() const { return static_cast<char*>(storage_->data) + offset_; }
  template <class T>
  T* data() const { return static_cast<T*>(raw()); }
  float* f32() const;  // checks dtype F32 and contiguity

  // Views sharing storage.
  Tensor reshape(const Shape& s) const;              // contiguous only; one -1 allowed
  Tensor slice(int d, int64_t begin, int64_t end) const;  // along dimension d
  Tensor permute(const std::vector<int>& order) const;
  // A contiguous copy (or this tensor if already contiguous).
  Tensor contiguous(Tag tag = Tag::Activations) const;
  Tensor clone(Tag tag = Tag::Activations) const;
  // A copy converted to `dt` (f32/bf16/f16), contiguous, on the same device.
  Tensor to(DType dt, Tag tag = Tag::Activations) const;
  // A contiguous copy on device `d` (this tensor itself if it is already there and contiguous).
  Tensor to_device(Device d, Tag tag = Tag::Activations) const;

  // Copies src's elements into this tensor's storage (same shape and dtype, both contiguous,
  // any devices): a fixed buffer that recorded work reads (ops::record) gets new inputs.
  void copy_from(const Tensor& src) const;

  std::string desc() const;  // "f32[2, 3]"

 private:
  std::shared_ptr<Storage> storage_;
  size_t offset_ = 0;  // bytes
  DType dtype_ = DType::F32;
  Shape shape_;
  Shape strides_;
  std::shared_ptr<Tensor> row_scale_;  // F8_E4M3 only
  std::shared_ptr<const Tensor> e4m3_;  // BF16 activations only
};

Shape contiguous_strides(const Shape& shape);

}  // namespace zi
