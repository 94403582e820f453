// Fuzz target: the GGUF parser (io/gguf.h) and GGUF files opened as tensor files.
// Each input is (1) parsed in memory by parse_gguf, whose accepted tensors must lie inside the
// data area, and (2) mapped as a file (memfd) and opened with SafetensorsFile::open (which
// detects the magic) and TensorStore::open_file (the layout mapping); every tensor the reader
// accepts is then loaded as f32 and, for weight formats, in its own format and dequantized.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "core/check.h"
#include "core/quant.h"
#include "fuzz_util.h"
#include "io/gguf.h"
#include "io/safetensors.h"

using namespace zi;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    GgufParsed g = parse_gguf(data, size, "fuzz.gguf");
    if (g.data_start > size) std::abort();
    for (const TensorInfo& t : g.tensors)
      if (t.begin > t.end || g.data_start + t.end > size) std::abort();  // accepted a range outside the file
  } catch (const Error&) {
  }
  static fuzz::MemFile mem;
  const std::string& path = mem.set(data, size);
  try {
    SafetensorsFile f = SafetensorsFile::open(path);
    for (const TensorInfo& t : f.tensors()) {
      if (f.data_start() + t.end > f.file()->size()) std::abort();
      if (t.numel() > (int64_t(1) << 22)) continue;  // bounded work per input
      try {
        Tensor l = f.load(t, DType::F32);
        if (l.numel() != t.numel()) std::abort();
      } catch (const Error&) {
      }
      if (t.quantized()) {
        try {
          Tensor q = f.load(t, t.format);
          if (q.nbytes() != t.nbytes()) std::abort();
          (void)quant::dequantize(q);
        } catch (const Error&) {
        }
      }
      f.release(t);
    }
  } catch (const Error&) {
  }
  try {
    TensorStore s = TensorStore::open_file(path);
    (void)s.names();
  } catch (const Error&) {
  }
  return 0;
}
