// Streams a component's weights from its TensorStore into their final dtype, one tensor at
// a time: mapping → (optional f32 staging for patches) → final buffer → pages released.
// Shapes are checked; missing, wrong-shape and unexpected tensors are all reported at once.
#pragma once
#include <functional>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/tensor.h"
#include "io/safetensors.h"

namespace zi {

// The dtype of the float (non-matrix) weights of a component whose matrices are `wdt`:
// bf16 when wdt is a weight format (embeddings, the embedders and final layers stay float).
DType storage_dtype(DType wdt);

// A tensor a binding asked for (WeightLoader::recorder).
struct BoundTensor {
  std::string name;
  Shape shape;
  DType dtype;
};

class WeightLoader {
 public:
  // A loader in dry-run mode: every load() appends (name, shape, dtype) to `out` and returns an
  // undefined tensor; has() is false. Running a load_* function through it lists exactly the
  // tensors that binding reads, in its order: the one table of tensor names (make-random-model
  // writes its files from it).
  static WeightLoader recorder(std::vector<BoundTensor>* out, std::string component);

  // `component` names the component in messages ("transformer", "vae", ...). Tensors are
  // loaded onto the device of `ctx`, the phase's context, which the load_* functions keep in
  // the model they bind. On a GPU: streamed from the mapping through a pinned staging ring
  // and converted on the device (device::upload_convert); never whole in host memory.
  WeightLoader(const TensorStore& store, Tag tag, std::string component, PhaseContext ctx = {});
  const PhaseContext& context() const { return ctx_; }
  void set_device(Device d) { ctx_.device = d; }
  // set_device(d) for the guard's lifetime; the previous device is back after it, also on a throw
  // (the host loads of a GPU phase: streamed blocks, the embedding table).
  class DeviceScope {
   public:
    DeviceScope(WeightLoader& ld, Device d) : ld_(ld), prev_(ld.device()) { ld.set_device(d); }
    ~DeviceScope() { ld_.set_device(prev_); }
    DeviceScope(const DeviceScope&) = delete;
    DeviceScope& operator=(const DeviceScope&) = delete;

   private:
    WeightLoader& ld_;
    Device prev_;
  };
  Device device() const { return ctx_.device; }

  // Loads `name`, checked against `shape`, converted to `dt`. A missing or wrong-shape
  // tensor is recorded (see finish()) and an undefined Tensor returned.
  Tensor load(const std::string& name, const Shape& shape, DType dt);
  // A linear weight [N, K] of a block (core/quant.h): a weight format stored in the file (GGUF
  // blocks, fp8) is kept as it is; a weight format `dt` is made from the float data one tensor
  // at a time (rows that are not whole blocks stay bf16); a float `dt` works like load().
  Tensor load_matrix(const std::string& name, const Shape& shape, DType dt);
  // Several matrices [N_i, K] bound as one [ΣN_i, K], rows in the order of `names` (a block's
  // fused projections: to_q/to_k/to_v, w1/w3). Each part loads exactly as load_matrix(names[i])
  // would (its own overrides, patches, fp8 scale, weight format) and is written into its rows of
  // the fused tensor, which is allocated once on the loader's device (an fp8 weight's row scales
  // are concatenated the same way): no part is held twice, and on the GPU a float part is
  // converted straight into its rows. When the parts would not come out in one dtype (a GGUF
  // file mixing block formats, a patch on one part of a stored block format), or in check-only
  // and recorder modes, nothing is fused: the result is undefined and `*parts` holds each part
  // as load_matrix returns it. Otherwise `*parts` is cleared.
  Tensor load_matrix_rows(const std::vector<std::string>& names, const std::vector<Shape>& shapes, DType dt,
                          std::vector<Tensor>* parts);
  // A table read a few rows at a time (the text encoder's token embedding), on the host whatever
  // the loader's device: where the file stores it exactly as `dt` (a float dtype) with no
  // override or patch, a zero-copy view of the mapping (only the pages of the rows read are ever
  // read; nothing is allocated); otherwise what load(name, shape, dt) gives on the host.
  Tensor load_table(const std::string& name, const Shape& shape, DType dt);
  // Like load(), but a missing (or empty, 0-element) tensor is not an error.
  Tensor load_optional(const std::string& name, const Shape& shape, DType dt);
  bool has(const std::string& name) const;

  // Tensors starting with `prefix` are known to be unused (e.g. "encoder.", "lm_head.").
  void ignore_prefix(const std::string& prefix) { ignored_.push_back(prefix); }
  // Throws one zi::Error naming the component and every missing, wrong-shape or (when
  // `reject_unexpected`) unused tensor not covered by ignore_prefix().
  void finish(bool reject_unexpected = true);

  // A replacement source, consulted first (--transformer-override). Its tensors must all be
  // used and match shapes; finish() reports those that matched nothing.
  void add_override(const TensorStore* store, std::function<std::string(const std::string&)> rename = {});
  // Patches see a weight in f32 before it is converted to its final dtype (LoRA merges).
  // `wants(name)` says whether the patch applies, so untouched tensors skip the staging copy.
  struct Patch {
    std::function<bool(const std::string&)> wants;
    std::function<void(const std::string&, Tensor& f32)> apply;
    // Check-only mode: the patch's checks against the weight's shape, no arithmetic.
    std::function<void(const std::string&, const Shape&)> check;
  };
  void add_patch(Patch p) { patches_.push_back(std::move(p)); }

  // One-line notices of the load (an optional tensor replaced by its default, ...).
  void note(std::string line) { notes_.push_back(std::move(line)); }
  const std::vector<std::string>& notes() const { return notes_; }

  // Check-only mode (the pre-flight check before any phase): load() checks that each tensor
  // exists (override first), has the expected shape and a dtype that converts to the requested
  // one, runs the patches' checks, and returns an undefined Tensor; nothing is read or
  // allocated. finish() then reports exactly what a real load would.
  void set_check_only(bool on) { check_only_ = on; }
  bool check_only() const { return check_only_; }
  // Block streaming (--vram, io/weight_stream.h): the blocks i with streamed[i] load on the
  // host in their compute dtype, and the model's load_* hands them to a WeightStreamer of
  // `slots` ring slots on the phase's device.
  void set_streamed_blocks(std::vector<bool> streamed, int slots) {
    streamed_ = std::move(streamed);
    stream_slots_ = slots;
  }
  bool streams_blocks() const {
    for (bool b : streamed_)
      if (b) return true;
    return false;
  }
  bool block_streamed(size_t i) const { return i < streamed_.size() && streamed_[i]; }
  int stream_slots() const { return stream_slots_; }
  Tag tag() const { return tag_; }

  // Called after each tensor with the bytes read so far and the total of the store (progress
  // display); set for the current thread by LoadProgressScope.
  using ProgressFn = std::function<void(const std::string& component, int64_t done, int64_t total)>;

  int64_t bytes_loaded() const { return bytes_; }
  const std::string& component() const { return component_; }
  const TensorStore& store() const { return store_; }

 private:
  // `dst` (load_matrix_rows): a row slice of the fused tensor, of the dtype planned_dtype gave; the
  // result is written there (row scales included) and *dst returned.
  Tensor load_impl(const std::string& name, const Shape& shape, DType dt, bool required, bool matrix,
                   const Tensor* dst = nullptr);
  // The tensor `name` resolves to (an override's first), without marking anything read.
  TensorStore::Entry resolve(const std::string& name) const;
  // The dtype load_matrix(name, shape, dt) would return; false when the tensor is missing or of
  // another shape.
  bool planned_dtype(const std::string& name, const Shape& shape, DType dt, DType* out) const;
  const TensorStore& store_;
  Tag tag_;
  PhaseContext ctx_;
  std::vector<BoundTensor>* record_ = nullptr;
  std::string component_;
  std::vector<std::string> ignored_;
  std::vector<std::string> missing_, wrong_;
  std::vector<std::string> used_;
  struct Override {
    const TensorStore* store;
    std::unordered_map<std::string, std::string> by_target;  // weight name -> override tensor name
    std::vector<std::string> used;
  };
  std::vector<Override> overrides_;
  std::vector<Patch> patches_;
  std::vector<std::string> notes_;
  int64_t bytes_ = 0;
  int64_t read_ = 0, total_ = 0;
  bool check_only_ = false;
  std::vector<bool> streamed_;
  int stream_slots_ = 0;
};

// Routes every WeightLoader's progress on this thread to `fn` while alive.
class LoadProgressScope {
 public:
  explicit LoadProgressScope(WeightLoader::ProgressFn fn);
  ~LoadProgressScope();
  static WeightLoader::ProgressFn current();  // this thread's (to chain a scope inside another)
  LoadProgressScope(const LoadProgressScope&) = delete;
  LoadProgressScope& operator=(const LoadProgressScope&) = delete;

 private:
  WeightLoader::ProgressFn prev_;
};

}  // namespace zi
