#include "io/png.h"

#include <cmath>

#include "core/check.h"
#include "io/image_codec.h"

namespace zi {

// The PNG entry points of the tests and tools, on top of image_codec (one PNG writer and one
// reader for every caller).
void write_png_atomic(const std::string& path, const uint8_t* rgb, int width, int height,
                      const std::vector<std::pair<std::string, std::string>>& text_chunks) {
  write_image_atomic(path, ImageFormat::PNG, rgb, width, height, {}, text_chunks);
}

namespace {
DecodedImage read_png_file(const std::string& path) {
  DecodedImage d = read_image_file(path);
  if (d.format != ImageFormat::PNG)
    fail(str_cat("cannot read PNG '", path, "': the file is ", image_format_name(d.format), ", not PNG"));
  return d;
}
}  // namespace

std::vector<uint8_t> read_png_rgb(const std::string& path, int* width, int* height) {
  DecodedImage d = read_png_file(path);
  *width = d.width;
  *height = d.height;
  return std::move(d.rgb);
}

std::vector<std::pair<std::string, std::string>> read_png_text(const std::string& path) {
  return read_png_file(path).text;
}

void image_to_u8(const float* chw, int c, int h, int w, uint8_t* hwc) {
  ZI_CHECK(c == 3 || c == 1, "[image_to_u8] expected 1 or 3 channels, got ", c);
  ZI_CHECK(h > 0 && w > 0, "[image_to_u8] bad image size ", h, "x", w);
  const size_t plane = size_t(h) * size_t(w);
  for (int ch = 0; ch < c; ++ch) {
    const float* src = chw + size_t(ch) * plane;
    for (size_t p = 0; p < plane; ++p) {
      const float v = src[p];
      float x = v * 0.5f;
      x = x + 0.5f;
      x = x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x);
      if (std::isnan(x)) x = 0.0f;
      const float s = x * 255.0f;
      hwc[p * size_t(c) + size_t(ch)] = uint8_t(std::nearbyint(s));  // default mode: half to even
    }
  }
}

}  // namespace zi
