// safetensors: a validating mmap reader, a writer, and sharded checkpoints
// (*.safetensors.index.json). Spec §6.5–6.7.
#pragma once
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "core/tensor.h"
#include "io/mapped_file.h"

namespace zi {

// Every dtype the safetensors format defines; only some can be loaded into a Tensor.
enum class StDType : uint8_t {
  BOOL, U8, I8, I16, U16, F16, BF16, I32, U32, F32, C64, F64, I64, U64,
  F8_E5M2, F8_E4M3, F8_E8M0, F8_E4M3FNUZ, F8_E5M2FNUZ, F4, F6_E2M3, F6_E3M2
};
const char* st_dtype_name(StDType t);
bool parse_st_dtype(std::string_view s, StDType* out);
int st_dtype_bits(StDType t);
// The Tensor dtype a stored dtype loads as without loss (F32/BF16/F16/I32/U8), or false.
bool st_to_dtype(StDType t, DType* out);

struct TensorInfo {
  std::string name;
  StDType dtype = StDType::F32;
  Shape shape;
  uint64_t begin = 0, end = 0;  // byte range relative to the data area
  // GGUF tensors (io/gguf.h): a block-quantized weight format (dtype is then U8 and the bytes
  // are format blocks), and the stored ggml type id (UINT32_MAX for safetensors).
  DType format = DType::F32;
  uint32_t ggml_type = UINT32_MAX;
  bool quantized() const { return is_quantized(format); }
  // "bf16", "q4_K", "F8_E4M3": what the tensor is stored as (inspect).
  std::string format_name() const;
  int64_t numel() const { return shape_numel(shape); }
  uint64_t nbytes() const { return end - begin; }
};

class SafetensorsFile {
 public:
  // Maps and validates `path`: header length within the file, well-formed JSON object,
  // known dtypes, shapes of non-negative sizes, byte ranges equal to numel × size, inside
  // the data area and not overlapping, no duplicate names. Throws zi::Error
  // "path: tensor 'name': what is wrong" (or "path: what is wrong").
  static SafetensorsFile open(const std::string& path);
  // Parses a header from memory (fuzzing, tests). `data_size` is the size of the data area.
  static std::vector<TensorInfo> parse_header(std::string_view json, uint64_t data_size, const std::string& path,
                                              std::map<std::string, std::string>* metadata);

  const std::string& path() const { return file_->path(); }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* find(std::string_view name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const uint8_t* data(const TensorInfo& t) const { return file_->data() + data_start_ + t.begin; }
  const std::shared_ptr<MappedFile>& file() const { return file_; }
  bool is_gguf() const { return gguf_; }
  uint64_t data_start() const { return data_start_; }

  // A zero-copy view of a tensor (stored dtype must be loadable).
  Tensor view(const TensorInfo& t) const;
  // A copy converted to `dt` (floats among themselves; I64 → I32 when values fit; BOOL → U8;
  // F8_E4M3/F8_E5M2 and GGUF block formats dequantized to a float dt, or kept as they are when
  // dt is their own format).
  Tensor load(const TensorInfo& t, DType dt, Tag tag = Tag::Activations) const;
  // Throws what load(t, dt) would throw for the dtype pair, reading nothing.
  void check_loadable(const TensorInfo& t, DType dt) const;
  // Convenience: load by name in its natural dtype (I64 → I32). Throws if absent.
  Tensor load(std::string_view name) const;
  Tensor load(std::string_view name, DType dt) const;
  // Bytes [offset, offset+len) of a tensor's data read into dst (MappedFile::read).
  void read(const TensorInfo& t, size_t offset, void* dst, size_t len) const {
    file_->read(dst, size_t(data_start_ + t.begin) + offset, len);
  }
  // Drops the pages of a tensor from the resident set after it was copied out.
  void release(const TensorInfo& t) const { file_->release(size_t(data_start_ + t.begin), size_t(t.nbytes())); }

 private:
  std::shared_ptr<MappedFile> file_;
  uint64_t data_start_ = 0;
  bool gguf_ = false;
  std::vector<TensorInfo> tensors_;
  std::unordered_map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// Writes tensors (any of our dtypes, contiguous host tensors) in file order as given.
void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// Writes a safetensors file tensor by tensor with bounded memory: the header first (every
// name, dtype and shape, in order), then each tensor's bytes in the same order. Atomic: the
// data goes to PATH.tmp, renamed to PATH by finish(); destroying an unfinished writer removes it.
class SafetensorsWriter {
 public:
  struct Entry {
    std::string name;
    StDType dtype = StDType::F32;
    Shape shape;
    uint64_t nbytes() const;
  };
  SafetensorsWriter(std::string path, std::vector<Entry> entries, const std::map<std::string, std::string>& metadata = {});
  ~SafetensorsWriter();
  SafetensorsWriter(const SafetensorsWriter&) = delete;
  SafetensorsWriter& operator=(const SafetensorsWriter&) = delete;
  // The next tensor's bytes (in pieces if wanted: `bytes` may be less than the tensor).
  void write(const void* data, size_t bytes);
  const Entry& next() const;  // the tensor being written
  void finish();

 private:
  std::string path_, tmp_;
  std::vector<Entry> entries_;
  size_t at_ = 0;
  uint64_t written_ = 0;  // of entries_[at_]
  std::FILE* f_ = nullptr;
};

// The tensors of one component: a single .safetensors file or shards named by an index.
// Records which tensor names were read, so tests can prove what was never touched.
class TensorStore {
 public:
  // `dir` holds either `*.safetensors.index.json` (sharded) or exactly one `*.safetensors`.
  static TensorStore open_dir(const std::string& dir);
  static TensorStore open_index(const std::string& index_path);
  static TensorStore open_file(const std::string& path);
  // Tensors of an already opened file under other names or as row ranges (io/layouts.h):
  // each TensorInfo's byte range lies inside one of `file`'s tensors.
  static TensorStore from_infos(std::string where, std::shared_ptr<SafetensorsFile> file,
                                std::vector<TensorInfo> infos);

  struct Entry {
    const SafetensorsFile* file;
    const TensorInfo* info;
  };
  // nullptr-file Entry when absent.
  Entry find(std::string_view name) const;
  bool contains(std::string_view name) const { return find(name).file != nullptr; }
  std::vector<std::string> names() const;  // sorted
  const std::vector<std::shared_ptr<SafetensorsFile>>& files() const { return files_; }
  std::string where() const { return where_; }  // the directory or file, for messages

  void note_read(const std::string& name) const { reads_.insert(name); }
  const std::set<std::string>& reads() const { return reads_; }

 private:
  std::string where_;
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::vector<std::unique_ptr<TensorInfo>> owned_;  // from_infos()
  std::unordered_map<std::string, Entry> map_;
  mutable std::set<std::string> reads_;
};

}  // namespace zi
