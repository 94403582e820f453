// GGUF (versions 2 and 3): a validating parser of the header, metadata and tensor table, and
// the tensor-name mapping of llama.cpp's Qwen3 files to the transformers names.
//
// Layout (ggml docs/gguf.md): "GGUF", u32 version, u64 tensor_count, u64 kv_count, the
// key/value pairs (gguf string key, u32 type, value), the tensor infos (name, u32 n_dims ≤ 4,
// u64 ne[n_dims] innermost first, u32 ggml type, u64 offset), padding to general.alignment
// (default 32), then the data area; every tensor's offset is a multiple of the alignment.
//
// A GGUF file opens as a SafetensorsFile (SafetensorsFile::open detects the magic): float and
// integer tensors become their safetensors dtypes, block-quantized ones TensorInfo::format
// (Q8_0 … Q3_K), and shapes are written outermost first like PyTorch's ([N, K] for ne = {K, N}).
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "io/safetensors.h"

namespace zi {

// ggml type ids (ggml.h) with the block geometry of each; `dtype`/`st` say how zimage holds it.
struct GgmlType {
  uint32_t id;
  const char* name;
  int64_t block;
  uint64_t block_bytes;
};
const GgmlType* ggml_type_info(uint32_t id);  // nullptr when unknown

struct GgufParsed {
  uint32_t version = 0;
  uint64_t alignment = 32;
  uint64_t data_start = 0;                       // absolute offset of the data area
  std::map<std::string, std::string> metadata;   // scalars and strings as text; arrays summarised
  std::vector<TensorInfo> tensors;               // begin/end relative to the data area
  std::vector<std::string> ggml_types;           // the stored type name of each tensor
};

// Parses a whole GGUF image of `size` bytes. Every count, length, offset and size is checked
// against the bytes present; throws zi::Error "path: what is wrong" (naming the tensor or key).
GgufParsed parse_gguf(const uint8_t* data, uint64_t size, const std::string& path);
bool is_gguf(const uint8_t* data, uint64_t size);

// llama.cpp's Qwen3 names → the transformers Qwen3Model names (token_embd.weight → embed_tokens.weight,
// blk.N.attn_q.weight → layers.N.self_attn.q_proj.weight, …); "" for a name it does not know.
std::string qwen3_name_from_llama(std::string_view name);

}  // namespace zi
