// Block streaming (weight_stream.h).
#include "io/weight_stream.h"

#include <atomic>
#include <cstring>

#include "core/check.h"
#include "core/parallel.h"

namespace zi {

namespace {
constexpr size_t kAlign = 256;  // each tensor's offset in a slot (cuBLASLt's preferred alignment)
size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }
std::atomic<int64_t> g_copied{0};
}  // namespace

int64_t WeightStreamer::total_bytes_copied() { return g_copied.load(); }

WeightStreamer::WeightStreamer(Device dev, int slots, Tag tag) : dev_(dev), slots_(slots), tag_(tag) {
  ZI_CHECK(slots >= 2, "[WeightStreamer] needs at least 2 slots, got ", slots);
}

WeightStreamer::~WeightStreamer() {
  ring_.reset();  // drains the copies and waits for the readers
  for (Block& b : blocks_) device::free_pinned(dev_, b.host, b.bytes, tag_);
}

void WeightStreamer::add_block(size_t index, const std::vector<Tensor*>& tensors) {
  ZI_CHECK(!ring_, "[WeightStreamer] add_block after the first use");
  ZI_CHECK(!streams(index), "[WeightStreamer] block ", index, " added twice");
  Block b;
  size_t bytes = 0;
  for (const Tensor* t : tensors)
    if (t->defined()) {
      ZI_CHECK(t->device() == Device::CPU && t->is_contiguous(), "[WeightStreamer] block ", index,
               ": a streamed tensor must be a contiguous host tensor, got ", t->desc());
      bytes = align_up(bytes) + t->nbytes();
    }
  b.bytes = std::max<size_t>(bytes, 1);
  b.host = device::alloc_pinned(dev_, b.bytes, tag_);
  size_t off = 0;
  for (Tensor* t : tensors) {
    if (!t->defined()) continue;
    off = align_up(off);
    parallel_copy(static_cast<char*>(b.host) + off, t->raw(), t->nbytes());  // 10 GB at a 4 GiB budget
    Tensor v = Tensor::unbound(t->shape(), t->dtype(), dev_, tag_);
    if (const Tensor* rs = t->row_scale()) v.set_row_scale(rs->to_device(dev_, tag_));
    b.views.push_back({v, off});
    off += t->nbytes();
    *t = v;  // the host copy is freed here (the model held the only reference)
  }
  pinned_bytes_ += int64_t(b.bytes);
  slot_bytes_ = std::max(slot_bytes_, int64_t(b.bytes));
  if (pos_.size() <= index) pos_.resize(index + 1, -1);
  pos_[index] = int(blocks_.size());
  blocks_.push_back(std::move(b));
}

void WeightStreamer::fill_next() {
  const size_t n = blocks_.size();
  const Block& b = blocks_[(base_ + issued_) % n];
  ring_->fill(int(issued_ % uint64_t(slots_)), b.host, b.bytes);
  g_copied += int64_t(b.bytes);
  ++issued_;
}

void WeightStreamer::ensure_resident(size_t index) {
  if (!streams(index)) return;
  ZI_CHECK(released_ == used_, "[WeightStreamer] block ", index, " used while another streamed block is in use");
  if (!ring_) ring_ = std::make_unique<device::SlotRing>(dev_, slots_, size_t(slot_bytes_), tag_);
  const size_t n = blocks_.size(), p = size_t(pos_[index]);
  if ((base_ + used_) % n != p) {
    // Out of the registered order: start a new sequence here. The slots' release events keep
    // every new fill behind the readers of the old ones.
    ring_->drain();
    base_ = p;
    issued_ = used_ = released_ = 0;
  }
  while (issued_ < used_ + uint64_t(slots_)) fill_next();
  const int slot = int(used_ % uint64_t(slots_));
  ring_->acquire(slot);
  char* base = static_cast<char*>(ring_->slot(slot));
  for (const auto& [v, off] : blocks_[p].views) v.rebind(base + off);
  ++used_;
}

void WeightStreamer::release(size_t index) {
  if (!streams(index)) return;
  ZI_CHECK(used_ == released_ + 1 && (base_ + released_) % blocks_.size() == size_t(pos_[index]),
           "[WeightStreamer] release of block ", index, " that is not in use");
  ring_->release(int(released_ % uint64_t(slots_)));
  ++released_;
  while (issued_ < released_ + uint64_t(slots_)) fill_next();
}

}  // namespace zi
