// Block streaming (--vram, issue 13): the weights of the blocks that do not fit the budget live
// once in pinned host memory in their compute dtype and are copied block by block into a ring
// of device slots (device::SlotRing) on a copy stream, `slots − 1` blocks ahead of the one
// computing. A block is a list of tensors, whatever their dtype (float, fp8, block formats,
// fused matrices): a slot holds their bytes back to back. The models call ensure_resident(i)
// before block i's forward and release(i) after it (BlockUse does both); resident blocks are
// untouched and never re-uploaded.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "backends/device.h"
#include "core/allocator.h"
#include "core/tensor.h"
#include "io/weight_loader.h"

namespace zi {

class WeightStreamer {
 public:
  WeightStreamer(Device dev, int slots, Tag tag);
  ~WeightStreamer();
  WeightStreamer(const WeightStreamer&) = delete;
  WeightStreamer& operator=(const WeightStreamer&) = delete;

  // Block `index` streams: its defined tensors (host tensors in their compute dtype, contiguous)
  // are packed into one pinned host buffer and freed, and each is replaced by an unbound view on
  // the device (an fp8 weight's row scales are uploaded and stay resident). Call in forward order.
  void add_block(size_t index, const std::vector<Tensor*>& tensors);
  // Before block `index` computes: its copy is queued (with the next slots − 1 streamed blocks in
  // forward order) and the compute stream waits for it. A block used out of the registered order
  // restarts the sequence there (correct, only the prefetch of that call is lost).
  void ensure_resident(size_t index);
  // After block `index`'s kernels are queued: its slot may be refilled once they have run.
  void release(size_t index);

  bool streams(size_t index) const { return index < pos_.size() && pos_[index] >= 0; }
  int streamed_blocks() const { return int(blocks_.size()); }
  int64_t pinned_bytes() const { return pinned_bytes_; }
  int64_t slot_bytes() const { return slot_bytes_; }
  int slots() const { return slots_; }
  int64_t bytes_copied() const { return ring_ ? ring_->bytes_copied() : 0; }
  // Bytes every streamer of the process has queued host → device so far.
  static int64_t total_bytes_copied();

 private:
  struct Block {
    void* host = nullptr;  // pinned
    size_t bytes = 0;
    std::vector<std::pair<Tensor, size_t>> views;  // unbound device views and their offsets
  };
  void fill_next();
  Device dev_;
  int slots_;
  Tag tag_;
  std::vector<Block> blocks_;
  std::vector<int> pos_;  // block index → position among the streamed blocks (-1: resident)
  std::unique_ptr<device::SlotRing> ring_;
  int64_t pinned_bytes_ = 0, slot_bytes_ = 0;
  // Uses in the current sequence: use k is the block at position (base_ + k) % n, in slot k % slots.
  uint64_t issued_ = 0, used_ = 0, released_ = 0;
  size_t base_ = 0;
};

// The loading side of block streaming, for a model's loop over its blocks: where the loader's
// plan streams blocks, a WeightStreamer for them, and a HostReuseScope for the loop (each
// streamed block's host tensors reuse the previous one's freed buffers: no fresh pages to fault
// in per block). load(i, fn, tensors) runs fn() — the model's loading of block i — on the host
// and hands tensors(block) to the streamer where the plan streams block i, on the loader's
// device otherwise. Destroy it (or call done()) after the loop.
class StreamedBlockLoader {
 public:
  explicit StreamedBlockLoader(WeightLoader& ld) : ld_(ld) {
    if (!ld.streams_blocks()) return;
    streamer_ = std::make_shared<WeightStreamer>(ld.device(), ld.stream_slots(), ld.tag());
    reuse_.emplace();
  }
  template <class Load, class Tensors>
  auto load(size_t i, Load&& fn, Tensors&& tensors) {
    if (!ld_.block_streamed(i)) return fn();
    const WeightLoader::DeviceScope host(ld_, Device::CPU);
    auto block = fn();
    if (!ld_.check_only()) streamer_->add_block(i, tensors(block));
    return block;
  }
  // The streamer (null where the plan streams nothing), for the model to keep.
  const std::shared_ptr<WeightStreamer>& streamer() const { return streamer_; }
  void done() { reuse_.reset(); }

 private:
  WeightLoader& ld_;
  std::shared_ptr<WeightStreamer> streamer_;
  std::optional<HostReuseScope> reuse_;
};

// ensure_resident(i) for the guard's lifetime (nothing without a streamer).
class BlockUse {
 public:
  BlockUse(WeightStreamer* s, size_t i) : s_(s), i_(i) {
    if (s_) s_->ensure_resident(i_);
  }
  ~BlockUse() {
    if (s_) s_->release(i_);
  }
  BlockUse(const BlockUse&) = delete;
  BlockUse& operator=(const BlockUse&) = delete;

 private:
  WeightStreamer* s_;
  size_t i_;
};

}  // namespace zi
