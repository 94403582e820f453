// Fuzz target: the sharded checkpoint index (*.safetensors.index.json) reader.
// A temporary folder holds two valid shards (a.safetensors: x, y; b.safetensors: z) and a
// text file; each input becomes the folder's model.safetensors.index.json and is opened with
// TensorStore::open_index (and open_dir). Every tensor the store accepts is then looked up.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "core/check.h"
#include "fuzz_util.h"
#include "io/safetensors.h"

using namespace zi;

namespace {

const std::string& folder() {
  static const std::string dir = [] {
    std::string d = fuzz::temp_dir();
    write_safetensors(d + "/a.safetensors",
                      {{"x", Tensor::from_vector({1, 2, 3, 4}, {2, 2})}, {"y", Tensor::from_vector({5}, {1})}});
    write_safetensors(d + "/b.safetensors", {{"z", Tensor::from_vector({6, 7}, {2}).to(DType::BF16)}});
    fuzz::write_file(d + "/notes.txt", "not a safetensors file");
    return d;
  }();
  return dir;
}

void use(const TensorStore& s) {
  for (const std::string& n : s.names()) {
    TensorStore::Entry e = s.find(n);
    if (!e.file || !e.info) std::abort();
    Tensor t = e.file->load(*e.info, DType::F32);
    if (t.numel() != e.info->numel()) std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  folder();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string index = folder() + "/model.safetensors.index.json";
  fuzz::write_file(index, std::string_view(reinterpret_cast<const char*>(data), size));
  try {
    use(TensorStore::open_index(index));
  } catch (const Error&) {
  }
  try {
    use(TensorStore::open_dir(folder()));
  } catch (const Error&) {
  }
  return 0;
}
