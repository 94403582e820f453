// Fuzz target: adapter files (models/lora.h): plain LoRA in every key style, LoHa, LoKr. Each
// input is a .safetensors file (memfd) read by load_lora; every delta it accepts is checked
// for consistent shapes and, when small, merged into a zero weight of its shape (LoHa/LoKr
// dense products included), which must not fail with anything but zi::Error.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "core/check.h"
#include "fuzz_util.h"
#include "models/lora.h"

using namespace zi;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static fuzz::MemFile mem;
  const std::string& path = mem.set(data, size);
  try {
    LoraFile f = load_lora({path, 0.5f});
    for (const LoraDelta& d : f.deltas) {
      if (d.target.empty()) std::abort();
      if (d.kind == AdapterKind::LoRA) {
        if (d.A.ndim() != 2 || d.B.ndim() != 2 || d.A.dim(0) != d.B.dim(1)) std::abort();
        if (d.A.numel() > (1 << 16) || d.B.numel() > (1 << 16)) continue;
      } else {
        int64_t n = 0;
        for (const Tensor* t : {&d.w1, &d.w1a, &d.w1b, &d.w2, &d.w2a, &d.w2b})
          if (t->defined()) n += t->numel();
        if (n > (1 << 12)) continue;
      }
      try {
        Tensor full = d.dense();
        if (full.ndim() != 2) std::abort();
        if (d.rows >= 0 && d.row_begin + d.rows > full.dim(0)) std::abort();
      } catch (const Error&) {
      }
    }
  } catch (const Error&) {
  } catch (const UsageError&) {
  }
  return 0;
}
