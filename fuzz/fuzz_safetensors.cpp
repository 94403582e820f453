// Fuzz target: the safetensors header parser and the file reader.
// Each input is (1) handed to SafetensorsFile::parse_header as a header text, and (2) mapped
// as a whole .safetensors file (memfd) and opened; every tensor the reader accepts is then
// viewed, loaded and released, and must lie inside the mapping.
#include <cstdint>
#include <cstdlib>
#include <map>
#include <string>

#include "core/check.h"
#include "fuzz_util.h"
#include "io/safetensors.h"

using namespace zi;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  for (uint64_t data_size : {uint64_t(0), uint64_t(1) << 20, ~uint64_t(0)}) {
    try {
      std::map<std::string, std::string> md;
      auto infos = SafetensorsFile::parse_header(text, data_size, "fuzz.safetensors", &md);
      for (const auto& t : infos)
        if (t.end > data_size || t.begin > t.end) std::abort();  // accepted a range outside the data
    } catch (const Error&) {
    }
  }

  static fuzz::MemFile mem;
  const std::string& path = mem.set(data, size);
  try {
    SafetensorsFile f = SafetensorsFile::open(path);
    const uint64_t file_size = f.file()->size();
    for (const TensorInfo& t : f.tensors()) {
      if (f.data_start() + t.end > file_size || t.begin > t.end) std::abort();
      try {
        Tensor v = f.view(t);
        if (v.nbytes() != t.nbytes()) std::abort();
        const auto* p = static_cast<const uint8_t*>(v.raw());
        unsigned sum = 0;
        for (size_t i = 0; i < v.nbytes(); ++i) sum += p[i];
        (void)sum;
      } catch (const Error&) {
      }
      for (DType dt : {DType::F32, DType::BF16, DType::I32, DType::U8}) {
        try {
          Tensor l = f.load(t, dt);
          if (l.numel() != t.numel()) std::abort();
        } catch (const Error&) {
        }
      }
      try {
        (void)f.load(t.name);
      } catch (const Error&) {
      }
      f.release(t);
    }
  } catch (const Error&) {
  }
  return 0;
}
