// PNG output (io/image_codec): atomic writes with text metadata, a reader for tests, and the
// float image → 8-bit conversion of the reference post-processing (spec §4.8).
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace zi {

// Writes an 8-bit RGB PNG (rgb: height·width·3 bytes, row-major HWC) atomically: the data
// goes to `path + ".tmp.XXXXXX"` in the same directory, is fsync'ed, then renamed over
// `path`. Each (keyword, text) pair becomes a tEXt chunk when the text is plain ASCII, an
// uncompressed iTXt chunk (UTF-8) otherwise. Keywords must be 1–79 printable Latin-1
// characters without leading/trailing spaces. On any failure the temporary file is removed
// and zi::Error "cannot write '<path>': <reason>" is thrown.
void write_png_atomic(const std::string& path, const uint8_t* rgb, int width, int height,
                      const std::vector<std::pair<std::string, std::string>>& text_chunks);

// Reads any PNG as 8-bit RGB (HWC). Throws zi::Error naming the path on failure.
std::vector<uint8_t> read_png_rgb(const std::string& path, int* width, int* height);

// The tEXt/zTXt/iTXt chunks of a PNG as (keyword, text) pairs (iTXt text is UTF-8; tEXt is
// returned as stored). For tests and `inspect`.
std::vector<std::pair<std::string, std::string>> read_png_text(const std::string& path);

// CHW float image in ≈[-1, 1] → HWC uint8: x = clamp(v·0.5 + 0.5, 0, 1) in float32,
// u8 = round-half-even(x·255) (NumPy's rint). c must be 3 (RGB) or 1 (grey, written as is).
void image_to_u8(const float* chw, int c, int h, int w, uint8_t* hwc);

}  // namespace zi
