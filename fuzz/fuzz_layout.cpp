// Fuzz target: single-file checkpoints (io/layouts.h, io/model_sources.h). Each input is a
// .safetensors file (memfd): LayoutFile::open analyses its keys; every component found is
// turned into a store whose tensors (renamed, fused qkv rows as byte ranges) must lie inside
// the mapping and load; the configs are inferred from its shapes. Also analyze_layout on the
// header's names alone, as a GGUF reader would call it.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "core/check.h"
#include "fuzz_util.h"
#include "io/layouts.h"

using namespace zi;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static fuzz::MemFile mem;
  const std::string& path = mem.set(data, size);
  try {
    auto lf = LayoutFile::open(path);
    const uint64_t file_size = lf->file->file()->size();
    for (const ComponentMapping& m : lf->layout.components) {
      for (const MappedTensor& t : m.tensors)
        if (t.source >= lf->file->tensors().size()) std::abort();
      TensorStore s = lf->store(m.component);
      for (const std::string& n : s.names()) {
        auto e = s.find(n);
        if (lf->file->data_start() + e.info->end > file_size || e.info->begin > e.info->end) std::abort();
        if (uint64_t(e.info->numel()) * uint64_t(st_dtype_bits(e.info->dtype)) / 8 != e.info->nbytes()) std::abort();
        try {
          Tensor l = e.file->load(*e.info, DType::F32);
          if (l.numel() != e.info->numel()) std::abort();
        } catch (const Error&) {
        }
      }
      try {
        if (m.component == Component::Transformer) (void)infer_dit_config(s);
        if (m.component == Component::TextEncoder) (void)infer_qwen3_config(s);
        if (m.component == Component::Vae) (void)infer_vae_config(s);
      } catch (const Error&) {
      }
    }
    for (Component c : kAllComponents) (void)lf->layout.describe(c);
  } catch (const Error&) {
  }
  return 0;
}
