#include "server/png_memory.h"

#include <png.h>

#include <csetjmp>

#include "core/check.h"

namespace zi::server {

namespace {

void write_cb(png_structp p, png_bytep data, png_size_t n) {
  auto* out = static_cast<std::string*>(png_get_io_ptr(p));
  out->append(reinterpret_cast<const char*>(data), n);
}
void flush_cb(png_structp) {}
void error_cb(png_structp p, png_const_charp msg) {
  auto* err = static_cast<std::string*>(png_get_error_ptr(p));
  *err = msg;
  png_longjmp(p, 1);
}
void warn_cb(png_structp, png_const_charp) {}

bool is_ascii(const std::string& s) {
  for (unsigned char c : s)
    if (c >= 0x80) return false;
  return true;
}

// Only C objects live between setjmp and the libpng calls (no C++ destructors are skipped).
bool write_png(std::string* out, const uint8_t* rgb, int width, int height, png_text* texts, int ntexts,
               std::string* err) {
  png_structp p = png_create_write_struct(PNG_LIBPNG_VER_STRING, err, error_cb, warn_cb);
  if (!p) return false;
  png_infop info = png_create_info_struct(p);
  if (!info || setjmp(png_jmpbuf(p))) {
    png_destroy_write_struct(&p, info ? &info : nullptr);
    return false;
  }
  png_set_write_fn(p, out, write_cb, flush_cb);
  png_set_IHDR(p, info, png_uint_32(width), png_uint_32(height), 8, PNG_COLOR_TYPE_RGB, PNG_INTERLACE_NONE,
               PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  if (ntexts > 0) png_set_text(p, info, texts, ntexts);
  png_write_info(p, info);
  for (int y = 0; y < height; ++y) png_write_row(p, const_cast<png_bytep>(rgb + size_t(y) * size_t(width) * 3));
  png_write_end(p, info);
  png_destroy_write_struct(&p, &info);
  return true;
}

}  // namespace

std::string encode_png(const uint8_t* rgb, int width, int height,
                       const std::vector<std::pair<std::string, std::string>>& text_chunks) {
  std::vector<png_text> texts(text_chunks.size());
  for (size_t i = 0; i < text_chunks.size(); ++i) {
    png_text& t = texts[i];
    t.key = const_cast<char*>(text_chunks[i].first.c_str());
    t.text = const_cast<char*>(text_chunks[i].second.c_str());
    if (is_ascii(text_chunks[i].second)) {
      t.compression = PNG_TEXT_COMPRESSION_NONE;
      t.text_length = text_chunks[i].second.size();
    } else {
      t.compression = PNG_ITXT_COMPRESSION_NONE;
      t.itxt_length = text_chunks[i].second.size();
    }
  }
  std::string out, err = "out of memory";
  if (!write_png(&out, rgb, width, height, texts.data(), int(texts.size()), &err)) fail("encode_png: " + err);
  return out;
}

std::string base64_encode(const std::string& in) {
  static const char* tbl = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((in.size() + 2) / 3 * 4);
  size_t i = 0;
  for (; i + 2 < in.size(); i += 3) {
    const uint32_t v = uint32_t(uint8_t(in[i])) << 16 | uint32_t(uint8_t(in[i + 1])) << 8 | uint8_t(in[i + 2]);
    out += tbl[v >> 18], out += tbl[(v >> 12) & 63], out += tbl[(v >> 6) & 63], out += tbl[v & 63];
  }
  if (i + 1 == in.size()) {
    const uint32_t v = uint32_t(uint8_t(in[i])) << 16;
    out += tbl[v >> 18], out += tbl[(v >> 12) & 63], out += "==";
  } else if (i + 2 == in.size()) {
    const uint32_t v = uint32_t(uint8_t(in[i])) << 16 | uint32_t(uint8_t(in[i + 1])) << 8;
    out += tbl[v >> 18], out += tbl[(v >> 12) & 63], out += tbl[(v >> 6) & 63], out += '=';
  }
  return out;
}

}  // namespace zi::server
