#include "io/png.h"

#include <fcntl.h>
#include <png.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <csetjmp>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "core/check.h"

namespace zi {

namespace {

struct PngErr {
  char msg[256] = {0};
};

void png_error_cb(png_structp png, png_const_charp msg) {
  auto* e = static_cast<PngErr*>(png_get_error_ptr(png));
  if (e) std::snprintf(e->msg, sizeof e->msg, "%s", msg ? msg : "libpng error");
  png_longjmp(png, 1);
}
void png_warning_cb(png_structp, png_const_charp) {}

bool is_ascii(const std::string& s) {
  for (unsigned char ch : s)
    if (ch >= 0x80) return false;
  return true;
}

// Encodes the image into an open FILE. No C++ object with a destructor lives in this frame
// across setjmp/longjmp. Returns false with `err` filled on failure.
bool encode_png(FILE* fp, const uint8_t* rgb, int width, int height, png_text* texts, int ntexts, PngErr* err) {
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, err, png_error_cb, png_warning_cb);
  if (!png) {
    std::snprintf(err->msg, sizeof err->msg, "out of memory");
    return false;
  }
  png_infop info = png_create_info_struct(png);
  if (!info) {
    png_destroy_write_struct(&png, nullptr);
    std::snprintf(err->msg, sizeof err->msg, "out of memory");
    return false;
  }
  if (setjmp(png_jmpbuf(png))) {
    png_destroy_write_struct(&png, &info);
    return false;
  }
  png_init_io(png, fp);
  png_set_IHDR(png, info, png_uint_32(width), png_uint_32(height), 8, PNG_COLOR_TYPE_RGB, PNG_INTERLACE_NONE,
               PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  if (ntexts > 0) png_set_text(png, info, texts, ntexts);
  png_write_info(png, info);
  const size_t stride = size_t(width) * 3;
  for (int y = 0; y < height; ++y) png_write_row(png, rgb + size_t(y) * stride);
  png_write_end(png, info);
  png_destroy_write_struct(&png, &info);
  return true;
}

mode_t file_mode_from_umask() {
  static const mode_t mode = [] {
    mode_t m = umask(022);
    umask(m);
    return mode_t(0666 & ~m);
  }();
  return mode;
}

std::string dir_of(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

}  // namespace

void write_png_atomic(const std::string& path, const uint8_t* rgb, int width, int height,
                      const std::vector<std::pair<std::string, std::string>>& text_chunks) {
  auto fail_w = [&](const std::string& why) -> void { fail(str_cat("cannot write '", path, "': ", why)); };
  if (width <= 0 || height <= 0 || width > 1000000 || height > 1000000)
    fail_w(str_cat("bad image size ", width, "x", height));
  if (!rgb) fail_w("no pixel data");
  if (path.empty()) fail(str_cat("cannot write '': empty path"));

  // Validate keywords and build the text table before touching the file system.
  std::vector<png_text> texts(text_chunks.size());
  for (size_t i = 0; i < text_chunks.size(); ++i) {
    const std::string& key = text_chunks[i].first;
    const std::string& val = text_chunks[i].second;
    bool ok = !key.empty() && key.size() <= 79 && key.front() != ' ' && key.back() != ' ';
    for (unsigned char ch : key)
      if (ch < 0x20 || (ch > 0x7e && ch < 0xa1)) ok = false;
    if (!ok) fail_w(str_cat("invalid PNG text keyword '", key, "'"));
    std::memset(&texts[i], 0, sizeof(png_text));
    texts[i].key = const_cast<char*>(key.c_str());
    texts[i].text = const_cast<char*>(val.c_str());
    if (is_ascii(val)) {
      texts[i].compression = PNG_TEXT_COMPRESSION_NONE;
      texts[i].text_length = val.size();
    } else {
      texts[i].compression = PNG_ITXT_COMPRESSION_NONE;
      texts[i].itxt_length = val.size();
      texts[i].lang = const_cast<char*>("");
      texts[i].lang_key = const_cast<char*>("");
    }
  }

  std::string tmpl = path + ".tmp.XXXXXX";
  std::vector<char> tmp_path(tmpl.begin(), tmpl.end());
  tmp_path.push_back('\0');
  const int fd = mkstemp(tmp_path.data());
  if (fd < 0) fail_w(std::strerror(errno));
  const std::string tmp(tmp_path.data());

  std::string error;
  FILE* fp = fdopen(fd, "wb");
  if (!fp) {
    error = std::strerror(errno);
    ::close(fd);
  } else {
    PngErr perr;
    errno = 0;
    if (!encode_png(fp, rgb, width, height, texts.data(), int(texts.size()), &perr)) {
      const int e = errno;
      error = perr.msg;
      if (e != 0) error += str_cat(" (", std::strerror(e), ")");
      std::fclose(fp);
    } else if (std::fflush(fp) != 0) {
      error = std::strerror(errno);
      std::fclose(fp);
    } else if (fchmod(fd, file_mode_from_umask()) != 0) {
      error = std::strerror(errno);
      std::fclose(fp);
    } else if (fsync(fd) != 0) {
      error = std::strerror(errno);
      std::fclose(fp);
    } else if (std::fclose(fp) != 0) {
      error = std::strerror(errno);
    } else if (std::rename(tmp.c_str(), path.c_str()) != 0) {
      error = std::strerror(errno);
    }
  }
  if (!error.empty()) {
    ::unlink(tmp.c_str());
    fail_w(error);
  }
  // Make the rename itself durable (best effort).
  const int dfd = ::open(dir_of(path).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    (void)fsync(dfd);
    ::close(dfd);
  }
}

std::vector<uint8_t> read_png_rgb(const std::string& path, int* width, int* height) {
  png_image img;
  std::memset(&img, 0, sizeof img);
  img.version = PNG_IMAGE_VERSION;
  if (!png_image_begin_read_from_file(&img, path.c_str()))
    fail(str_cat("cannot read PNG '", path, "': ", img.message));
  img.format = PNG_FORMAT_RGB;
  std::vector<uint8_t> out(PNG_IMAGE_SIZE(img));
  if (!png_image_finish_read(&img, nullptr, out.data(), 0, nullptr)) {
    std::string msg = img.message;
    png_image_free(&img);
    fail(str_cat("cannot read PNG '", path, "': ", msg));
  }
  if (width) *width = int(img.width);
  if (height) *height = int(img.height);
  return out;
}

namespace {

// Reads the text chunks into a caller-owned array of C strings; no C++ objects with
// destructors in this frame across setjmp.
struct TextOut {
  char** keys = nullptr;
  char** vals = nullptr;
  size_t* lens = nullptr;
  int n = 0;
  unsigned char* row = nullptr;  // scratch row
};

void free_text_out(TextOut* t) {
  for (int i = 0; i < t->n; ++i) {
    std::free(t->keys[i]);
    std::free(t->vals[i]);
  }
  std::free(t->keys);
  std::free(t->vals);
  std::free(t->lens);
  std::free(t->row);
  *t = TextOut{};
}

bool decode_text(FILE* fp, TextOut* out, PngErr* err) {
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, err, png_error_cb, png_warning_cb);
  if (!png) return false;
  png_infop info = png_create_info_struct(png);
  if (!info) {
    png_destroy_read_struct(&png, nullptr, nullptr);
    return false;
  }
  png_infop end_info = png_create_info_struct(png);
  if (!end_info) {
    png_destroy_read_struct(&png, &info, nullptr);
    return false;
  }
  if (setjmp(png_jmpbuf(png))) {
    png_destroy_read_struct(&png, &info, &end_info);
    return false;
  }
  png_init_io(png, fp);
  png_read_info(png, info);
  // Skip the image data, then read the chunks after it.
  png_set_strip_16(png);
  png_set_expand(png);
  png_read_update_info(png, info);
  const size_t rowbytes = png_get_rowbytes(png, info);
  const png_uint_32 h = png_get_image_height(png, info);
  const int passes = png_set_interlace_handling(png);
  out->row = static_cast<unsigned char*>(std::malloc(rowbytes ? rowbytes : 1));
  if (!out->row) png_error(png, "out of memory");
  for (int p = 0; p < passes; ++p)
    for (png_uint_32 y = 0; y < h; ++y) png_read_row(png, out->row, nullptr);
  png_read_end(png, end_info);
  for (png_infop inf : {info, end_info}) {
    png_textp t = nullptr;
    int n = 0;
    png_get_text(png, inf, &t, &n);
    if (n <= 0) continue;
    const int total = out->n + n;
    out->keys = static_cast<char**>(std::realloc(out->keys, sizeof(char*) * size_t(total)));
    out->vals = static_cast<char**>(std::realloc(out->vals, sizeof(char*) * size_t(total)));
    out->lens = static_cast<size_t*>(std::realloc(out->lens, sizeof(size_t) * size_t(total)));
    for (int i = 0; i < n; ++i) {
      const size_t len = t[i].compression >= PNG_ITXT_COMPRESSION_NONE ? t[i].itxt_length : t[i].text_length;
      out->keys[out->n] = strdup(t[i].key);
      out->vals[out->n] = static_cast<char*>(std::malloc(len + 1));
      std::memcpy(out->vals[out->n], t[i].text, len);
      out->vals[out->n][len] = '\0';
      out->lens[out->n] = len;
      ++out->n;
    }
  }
  png_destroy_read_struct(&png, &info, &end_info);
  return true;
}

}  // namespace

std::vector<std::pair<std::string, std::string>> read_png_text(const std::string& path) {
  FILE* fp = std::fopen(path.c_str(), "rb");
  if (!fp) fail(str_cat("cannot read PNG '", path, "': ", std::strerror(errno)));
  TextOut t;
  PngErr perr;
  const bool ok = decode_text(fp, &t, &perr);
  std::fclose(fp);
  if (!ok) {
    free_text_out(&t);
    fail(str_cat("cannot read PNG '", path, "': ", perr.msg[0] ? perr.msg : "libpng error"));
  }
  std::vector<std::pair<std::string, std::string>> res;
  for (int i = 0; i < t.n; ++i) res.emplace_back(t.keys[i], std::string(t.vals[i], t.lens[i]));
  free_text_out(&t);
  return res;
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
