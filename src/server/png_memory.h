// PNG bytes in memory (for HTTP responses) and base64. The chunk rules are those of
// io/png.h's write_png_atomic: tEXt for ASCII text, uncompressed iTXt (UTF-8) otherwise.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace zi::server {

std::string encode_png(const uint8_t* rgb, int width, int height,
                       const std::vector<std::pair<std::string, std::string>>& text_chunks);

std::string base64_encode(const std::string& bytes);

}  // namespace zi::server
