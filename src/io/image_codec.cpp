#include "io/image_codec.h"

#include <fcntl.h>
#include <jpeglib.h>
#include <png.h>
#include <sys/stat.h>
#include <unistd.h>
#include <webp/decode.h>
#include <webp/demux.h>
#include <webp/encode.h>
#include <webp/mux.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <csetjmp>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>

#include "core/check.h"
#include "core/parallel.h"

namespace zi {

namespace {

constexpr int64_t kMaxPixels = int64_t(1) << 28;

bool is_ascii(const std::string& s) {
  for (unsigned char ch : s)
    if (ch >= 0x80) return false;
  return true;
}

std::string lower(std::string s) {
  for (char& c : s) c = char(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// ---- UTF-8 <-> UTF-16BE (Exif UserComment "UNICODE") ----------------------------------------

std::vector<uint8_t> utf8_to_utf16be(const std::string& s) {
  std::vector<uint8_t> out;
  auto put = [&](uint32_t u) {
    out.push_back(uint8_t(u >> 8));
    out.push_back(uint8_t(u & 0xff));
  };
  for (size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    uint32_t cp = 0xFFFD;
    int n = 1;
    if (c < 0x80) cp = c;
    else if ((c >> 5) == 6 && i + 1 < s.size()) cp = ((c & 0x1Fu) << 6) | (s[i + 1] & 0x3Fu), n = 2;
    else if ((c >> 4) == 14 && i + 2 < s.size())
      cp = ((c & 0x0Fu) << 12) | ((s[i + 1] & 0x3Fu) << 6) | (s[i + 2] & 0x3Fu), n = 3;
    else if ((c >> 3) == 30 && i + 3 < s.size())
      cp = ((c & 0x07u) << 18) | ((s[i + 1] & 0x3Fu) << 12) | ((s[i + 2] & 0x3Fu) << 6) | (s[i + 3] & 0x3Fu), n = 4;
    i += size_t(n);
    if (cp >= 0x10000) {
      cp -= 0x10000;
      put(0xD800 + (cp >> 10));
      put(0xDC00 + (cp & 0x3FF));
    } else {
      put(cp);
    }
  }
  return out;
}

void append_utf8(std::string& s, uint32_t cp) {
  if (cp < 0x80) s += char(cp);
  else if (cp < 0x800) s += char(0xC0 | (cp >> 6)), s += char(0x80 | (cp & 0x3F));
  else if (cp < 0x10000)
    s += char(0xE0 | (cp >> 12)), s += char(0x80 | ((cp >> 6) & 0x3F)), s += char(0x80 | (cp & 0x3F));
  else
    s += char(0xF0 | (cp >> 18)), s += char(0x80 | ((cp >> 12) & 0x3F)), s += char(0x80 | ((cp >> 6) & 0x3F)),
        s += char(0x80 | (cp & 0x3F));
}

std::string utf16_to_utf8(const uint8_t* p, size_t n, bool big_endian) {
  std::string s;
  auto at = [&](size_t i) -> uint32_t { return big_endian ? (p[i] << 8 | p[i + 1]) : (p[i + 1] << 8 | p[i]); };
  for (size_t i = 0; i + 1 < n; i += 2) {
    uint32_t u = at(i);
    if (u >= 0xD800 && u < 0xDC00 && i + 3 < n) {
      const uint32_t lo = at(i + 2);
      if (lo >= 0xDC00 && lo < 0xE000) {
        u = 0x10000 + ((u - 0xD800) << 10) + (lo - 0xDC00);
        i += 2;
      }
    }
    append_utf8(s, u);
  }
  return s;
}

// ---- Exif (TIFF) builder and reader ---------------------------------------------------------

struct ExifEntry {
  uint16_t tag, type;  // type 2: ASCII, 7: UNDEFINED, 4: LONG
  std::vector<uint8_t> data;
};

void put16(std::vector<uint8_t>& b, size_t at, uint32_t v) {
  b[at] = uint8_t(v >> 8);
  b[at + 1] = uint8_t(v);
}
void put32(std::vector<uint8_t>& b, size_t at, uint32_t v) {
  b[at] = uint8_t(v >> 24);
  b[at + 1] = uint8_t(v >> 16);
  b[at + 2] = uint8_t(v >> 8);
  b[at + 3] = uint8_t(v);
}

// Appends one IFD (entries sorted by tag) and its out-of-line data at the end of `b` (offsets
// are relative to the TIFF header at b[0]). Returns the offsets of each entry's value field.
std::vector<size_t> append_ifd(std::vector<uint8_t>& b, std::vector<ExifEntry>& entries) {
  std::sort(entries.begin(), entries.end(), [](const ExifEntry& a, const ExifEntry& c) { return a.tag < c.tag; });
  const size_t ifd = b.size();
  b.resize(ifd + 2 + 12 * entries.size() + 4, 0);
  put16(b, ifd, uint32_t(entries.size()));
  std::vector<size_t> value_at;
  for (size_t i = 0; i < entries.size(); ++i) {
    const size_t e = ifd + 2 + 12 * i;
    const ExifEntry& en = entries[i];
    put16(b, e, en.tag);
    put16(b, e + 2, en.type);
    const uint32_t count = en.type == 4 ? uint32_t(en.data.size() / 4) : uint32_t(en.data.size());
    put32(b, e + 4, count);
    value_at.push_back(e + 8);
    if (en.data.size() <= 4) {
      std::copy(en.data.begin(), en.data.end(), b.begin() + std::ptrdiff_t(e + 8));
    } else {
      if (b.size() % 2) b.push_back(0);  // word alignment
      put32(b, e + 8, uint32_t(b.size()));
      b.insert(b.end(), en.data.begin(), en.data.end());
    }
  }
  return value_at;
}

// TIFF-structured Exif (big-endian) carrying "parameters" as UserComment, "zimage" as
// MakerNote and "Software" in IFD0. Empty when there is nothing to store.
std::vector<uint8_t> build_exif(const TextChunks& text) {
  const std::string params = find_text(text, "parameters"), json = find_text(text, "zimage"),
                    software = find_text(text, "Software");
  if (params.empty() && json.empty() && software.empty()) return {};
  std::vector<uint8_t> b = {'M', 'M', 0, 42, 0, 0, 0, 8};
  std::vector<ExifEntry> ifd0;
  if (!software.empty()) {
    ExifEntry e{0x0131, 2, std::vector<uint8_t>(software.begin(), software.end())};
    e.data.push_back(0);
    ifd0.push_back(std::move(e));
  }
  ifd0.push_back({0x8769, 4, {0, 0, 0, 0}});  // Exif IFD pointer, patched below
  std::vector<size_t> at0 = append_ifd(b, ifd0);
  size_t exif_ptr_at = 0;
  for (size_t i = 0; i < ifd0.size(); ++i)
    if (ifd0[i].tag == 0x8769) exif_ptr_at = at0[i];
  if (b.size() % 2) b.push_back(0);
  put32(b, exif_ptr_at, uint32_t(b.size()));
  std::vector<ExifEntry> exif;
  if (!params.empty()) {
    ExifEntry e{0x9286, 7, {}};
    if (is_ascii(params)) {
      const char id[8] = {'A', 'S', 'C', 'I', 'I', 0, 0, 0};
      e.data.assign(id, id + 8);
      e.data.insert(e.data.end(), params.begin(), params.end());
    } else {
      const char id[8] = {'U', 'N', 'I', 'C', 'O', 'D', 'E', 0};
      e.data.assign(id, id + 8);
      std::vector<uint8_t> u = utf8_to_utf16be(params);
      e.data.insert(e.data.end(), u.begin(), u.end());
    }
    exif.push_back(std::move(e));
  }
  if (!json.empty()) {
    ExifEntry e{0x927C, 7, {'z', 'i', 'm', 'a', 'g', 'e', 0}};
    e.data.insert(e.data.end(), json.begin(), json.end());
    exif.push_back(std::move(e));
  }
  append_ifd(b, exif);
  return b;
}

// Reads the pairs build_exif stores (tolerates "Exif\0\0" in front and either byte order).
// Malformed data yields what could be read, never an out-of-bounds access.
void parse_exif(const uint8_t* p, size_t n, TextChunks* out) {
  if (n >= 6 && std::memcmp(p, "Exif\0\0", 6) == 0) p += 6, n -= 6;
  if (n < 8) return;
  const bool be = p[0] == 'M';
  if (!((p[0] == 'M' && p[1] == 'M') || (p[0] == 'I' && p[1] == 'I'))) return;
  auto r16 = [&](size_t o) -> uint32_t { return be ? (p[o] << 8 | p[o + 1]) : (p[o + 1] << 8 | p[o]); };
  auto r32 = [&](size_t o) -> uint32_t {
    return be ? (uint32_t(p[o]) << 24 | p[o + 1] << 16 | p[o + 2] << 8 | p[o + 3])
              : (uint32_t(p[o + 3]) << 24 | p[o + 2] << 16 | p[o + 1] << 8 | p[o]);
  };
  auto walk = [&](size_t ifd, auto&& on_entry) {
    if (ifd + 2 > n) return;
    const uint32_t count = r16(ifd);
    for (uint32_t i = 0; i < count; ++i) {
      const size_t e = ifd + 2 + 12 * size_t(i);
      if (e + 12 > n) return;
      const uint32_t tag = r16(e), type = r16(e + 2), cnt = r32(e + 4);
      size_t size = cnt;
      if (type == 4) size = size_t(cnt) * 4;
      else if (type == 3) size = size_t(cnt) * 2;
      else if (type != 2 && type != 7) continue;
      const size_t off = size <= 4 ? e + 8 : r32(e + 8);
      if (off > n || size > n - off) continue;
      on_entry(tag, p + off, size);
    }
  };
  uint32_t exif_ifd = 0;
  walk(r32(4), [&](uint32_t tag, const uint8_t* v, size_t size) {
    if (tag == 0x8769 && size >= 4) exif_ifd = be ? (uint32_t(v[0]) << 24 | v[1] << 16 | v[2] << 8 | v[3])
                                                  : (uint32_t(v[3]) << 24 | v[2] << 16 | v[1] << 8 | v[0]);
    if (tag == 0x0131) {
      std::string s(reinterpret_cast<const char*>(v), size);
      while (!s.empty() && s.back() == '\0') s.pop_back();
      out->emplace_back("Software", s);
    }
  });
  if (!exif_ifd) return;
  walk(exif_ifd, [&](uint32_t tag, const uint8_t* v, size_t size) {
    if (tag == 0x9286 && size >= 8) {
      std::string s;
      if (std::memcmp(v, "UNICODE\0", 8) == 0) s = utf16_to_utf8(v + 8, size - 8, be);
      else s.assign(reinterpret_cast<const char*>(v + 8), size - 8);
      while (!s.empty() && s.back() == '\0') s.pop_back();
      out->emplace_back("parameters", s);
    }
    if (tag == 0x927C && size >= 7 && std::memcmp(v, "zimage\0", 7) == 0)
      out->emplace_back("zimage", std::string(reinterpret_cast<const char*>(v + 7), size - 7));
  });
}

// ---- PNG --------------------------------------------------------------------------------------

struct PngErr {
  char msg[256] = {0};
};
void png_error_cb(png_structp png, png_const_charp msg) {
  auto* e = static_cast<PngErr*>(png_get_error_ptr(png));
  if (e) std::snprintf(e->msg, sizeof e->msg, "%s", msg ? msg : "libpng error");
  png_longjmp(png, 1);
}
void png_warning_cb(png_structp, png_const_charp) {}

// The writer is our own (the chunks are simple) so that the image data deflates in parallel:
// a 1024² PNG at zlib's default level takes 0.14–0.4 s on one core, a visible part of a one-shot
// run. PNG (ISO/IEC 15948): the signature, IHDR, the text chunks (tEXt for ASCII values, iTXt
// for UTF-8 ones), the image data as one zlib stream in IDAT chunks, IEND. Each row gets the
// filter libpng's default heuristic would pick for 8-bit RGB (the least sum of the filtered bytes
// taken as signed), and the filtered bytes are deflated in fixed pieces of kPngPiece bytes in
// parallel, each with the 32 KiB before it as its preset dictionary and ended by a sync flush
// but the last (pigz's method): one valid stream, within a fraction of a percent of a single
// pass's size, and the same bytes whatever the thread count.
constexpr size_t kPngPiece = size_t(128) << 10;
constexpr size_t kPngWindow = size_t(32) << 10;
constexpr size_t kPngIdat = size_t(1) << 20;  // bytes of image data per IDAT chunk

void put_u32be(std::vector<uint8_t>& o, uint32_t v) {
  for (int s = 24; s >= 0; s -= 8) o.push_back(uint8_t(v >> s));
}

void put_chunk(std::vector<uint8_t>& o, const char type[4], const uint8_t* data, size_t n) {
  put_u32be(o, uint32_t(n));
  const size_t at = o.size();
  o.insert(o.end(), type, type + 4);
  if (n) o.insert(o.end(), data, data + n);
  put_u32be(o, uint32_t(crc32(0L, o.data() + at, uInt(n + 4))));
}

int paeth(int a, int b, int c) {
  const int p = a + b - c, pa = std::abs(p - a), pb = std::abs(p - b), pc = std::abs(p - c);
  return pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
}

// Row y of the RGB image, filtered into out (1 + 3·width bytes: the filter type, then the bytes);
// tmp: 4 · 3·width bytes of scratch.
void filter_row(const uint8_t* rgb, int width, int y, bool adaptive, uint8_t* out, uint8_t* tmp) {
  const size_t n = size_t(width) * 3;
  const uint8_t* x = rgb + size_t(y) * n;
  if (!adaptive) {
    out[0] = 0;
    std::memcpy(out + 1, x, n);
    return;
  }
  static const uint8_t zeros[3 * 8192] = {};  // the row above the first (width ≤ 8192 here, else a vector)
  std::vector<uint8_t> zrow;
  const uint8_t* up = x - n;
  if (y == 0) {
    if (n <= sizeof zeros) up = zeros;
    else zrow.assign(n, 0), up = zrow.data();
  }
  uint8_t* sub = tmp;
  uint8_t* upf = tmp + n;
  uint8_t* avg = tmp + 2 * n;
  uint8_t* pae = tmp + 3 * n;
  for (size_t i = 0; i < 3; ++i) {  // the first pixel: no left neighbour
    sub[i] = x[i];
    upf[i] = uint8_t(x[i] - up[i]);
    avg[i] = uint8_t(x[i] - (up[i] >> 1));
    pae[i] = uint8_t(x[i] - up[i]);  // paeth(0, b, 0) = b
  }
  for (size_t i = 3; i < n; ++i) {
    const int a = x[i - 3], b = up[i], c = up[i - 3];
    sub[i] = uint8_t(x[i] - a);
    upf[i] = uint8_t(x[i] - b);
    avg[i] = uint8_t(x[i] - ((a + b) >> 1));
    pae[i] = uint8_t(x[i] - paeth(a, b, c));
  }
  auto cost = [n](const uint8_t* r) {
    uint64_t s = 0;
    for (size_t i = 0; i < n; ++i) s += r[i] < 128 ? r[i] : 256 - r[i];
    return s;
  };
  const uint8_t* rows[5] = {x, sub, upf, avg, pae};
  int best = 0;
  uint64_t best_sum = cost(x);
  for (int f = 1; f < 5; ++f)
    if (const uint64_t c = cost(rows[f]); c < best_sum) best_sum = c, best = f;
  out[0] = uint8_t(best);
  std::memcpy(out + 1, rows[best], n);
}

// Piece [b, e) of the filtered bytes f, deflated (raw) with the window before it as dictionary.
bool deflate_piece(const uint8_t* f, size_t b, size_t e, bool last, int level, int strategy, std::vector<uint8_t>* out) {
  z_stream z{};
  if (deflateInit2(&z, level, Z_DEFLATED, -15, 8, strategy) != Z_OK) return false;
  bool ok = true;
  if (b > 0) {
    const size_t d = std::min(b, kPngWindow);
    ok = deflateSetDictionary(&z, f + b - d, uInt(d)) == Z_OK;
  }
  out->resize(deflateBound(&z, uLong(e - b)) + 64);
  z.next_in = const_cast<Bytef*>(f + b);
  z.avail_in = uInt(e - b);
  z.next_out = out->data();
  z.avail_out = uInt(out->size());
  const int flush = last ? Z_FINISH : Z_SYNC_FLUSH;
  while (ok) {
    const int r = deflate(&z, flush);
    if (r == Z_STREAM_END || (r == Z_OK && !last && z.avail_in == 0 && z.avail_out > 0)) break;
    if ((r != Z_OK && r != Z_BUF_ERROR) || z.avail_out > 0) {
      ok = false;
      break;
    }
    const size_t used = out->size();  // full: grow and go on
    out->resize(used * 2);
    z.next_out = out->data() + used;
    z.avail_out = uInt(out->size() - used);
  }
  out->resize(z.total_out);
  deflateEnd(&z);
  return ok;
}

std::vector<uint8_t> encode_png(const uint8_t* rgb, int width, int height, const TextChunks& text, int level) {
  ZI_CHECK(width > 0 && height > 0 && int64_t(width) * height <= kMaxPixels, "PNG encoding: bad image size ", width,
           "x", height);
  ZI_CHECK(level <= 9, "PNG encoding: the zlib level must be 0..9 (or -1, the default), got ", level);
  if (level < 0) level = 6;  // zlib's default
  std::vector<uint8_t> o = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  std::vector<uint8_t> ihdr;
  put_u32be(ihdr, uint32_t(width));
  put_u32be(ihdr, uint32_t(height));
  ihdr.insert(ihdr.end(), {8, 2, 0, 0, 0});  // 8 bits, RGB, deflate, adaptive filters, no interlace
  put_chunk(o, "IHDR", ihdr.data(), ihdr.size());
  for (const auto& [key, val] : text) {
    bool ok = !key.empty() && key.size() <= 79 && key.front() != ' ' && key.back() != ' ';
    for (unsigned char ch : key)
      if (ch < 0x20 || (ch > 0x7e && ch < 0xa1)) ok = false;
    if (!ok) fail(str_cat("invalid PNG text keyword '", key, "'"));
    std::vector<uint8_t> d(key.begin(), key.end());
    d.push_back(0);
    const bool ascii = is_ascii(val);
    if (!ascii) d.insert(d.end(), {0, 0, 0, 0});  // iTXt: not compressed, method 0, no language, no translation
    d.insert(d.end(), val.begin(), val.end());
    put_chunk(o, ascii ? "tEXt" : "iTXt", d.data(), d.size());
  }
  // The filtered rows, then the pieces deflated in parallel.
  const size_t row = 1 + size_t(width) * 3, total = row * size_t(height);
  std::vector<uint8_t> f(total);
  const bool adaptive = level > 0;
  parallel_for(height, 16, [&](int64_t b, int64_t e) {
    std::vector<uint8_t> tmp(adaptive ? 4 * (row - 1) : 0);
    for (int64_t y = b; y < e; ++y) filter_row(rgb, width, int(y), adaptive, f.data() + size_t(y) * row, tmp.data());
  });
  const size_t npieces = (total + kPngPiece - 1) / kPngPiece;
  std::vector<std::vector<uint8_t>> pieces(npieces);
  std::vector<uLong> adler(npieces);
  std::vector<char> ok(npieces, 0);
  const int strategy = adaptive ? Z_FILTERED : Z_DEFAULT_STRATEGY;
  parallel_for(int64_t(npieces), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const size_t lo = size_t(i) * kPngPiece, hi = std::min(total, lo + kPngPiece);
      try {
        ok[size_t(i)] = deflate_piece(f.data(), lo, hi, size_t(i) + 1 == npieces, level, strategy, &pieces[size_t(i)]);
      } catch (const std::bad_alloc&) {
        ok[size_t(i)] = 0;
      }
      adler[size_t(i)] = adler32(adler32(0L, Z_NULL, 0), f.data() + lo, uInt(hi - lo));
    }
  });
  for (char k : ok)
    if (!k) fail("PNG encoding failed: zlib's deflate failed (out of memory?)");
  // zlib header (deflate, 32 KiB window; FLEVEL as zlib would set it), the pieces, the Adler-32.
  std::vector<uint8_t> z = {0x78, uint8_t((level < 2 ? 0 : level < 6 ? 1 : level == 6 ? 2 : 3) << 6)};
  z[1] = uint8_t(z[1] + (31 - (z[0] * 256 + z[1]) % 31) % 31);
  uLong a = adler[0];
  for (size_t i = 0; i < npieces; ++i) {
    z.insert(z.end(), pieces[i].begin(), pieces[i].end());
    if (i > 0) {
      const size_t lo = i * kPngPiece, hi = std::min(total, lo + kPngPiece);
      a = adler32_combine(a, adler[i], z_off_t(hi - lo));
    }
  }
  put_u32be(z, uint32_t(a));
  for (size_t at = 0; at < z.size(); at += kPngIdat) put_chunk(o, "IDAT", z.data() + at, std::min(kPngIdat, z.size() - at));
  put_chunk(o, "IEND", nullptr, 0);
  return o;
}

struct MemSource {
  const uint8_t* data;
  size_t size, pos;
};
void mem_source_read(png_structp png, png_bytep d, png_size_t n) {
  auto* s = static_cast<MemSource*>(png_get_io_ptr(png));
  if (n > s->size - s->pos) png_error(png, "truncated PNG data");
  std::memcpy(d, s->data + s->pos, n);
  s->pos += n;
}

// Decoded pixels and text, in malloc'ed C storage (no destructors across setjmp).
struct PngOut {
  uint8_t* rgb = nullptr;
  png_uint_32 w = 0, h = 0;
  char** keys = nullptr;
  char** vals = nullptr;
  size_t* lens = nullptr;
  int n = 0;
  png_bytep* rows = nullptr;
};
void free_png_out(PngOut* o) {
  for (int i = 0; i < o->n; ++i) std::free(o->keys[i]), std::free(o->vals[i]);
  std::free(o->keys);
  std::free(o->vals);
  std::free(o->lens);
  std::free(o->rgb);
  std::free(o->rows);
  *o = PngOut{};
}

void collect_text(png_structp png, png_infop inf, PngOut* out) {
  png_textp t = nullptr;
  int n = 0;
  png_get_text(png, inf, &t, &n);
  if (n <= 0) return;
  const int total = out->n + n;
  out->keys = static_cast<char**>(std::realloc(out->keys, sizeof(char*) * size_t(total)));
  out->vals = static_cast<char**>(std::realloc(out->vals, sizeof(char*) * size_t(total)));
  out->lens = static_cast<size_t*>(std::realloc(out->lens, sizeof(size_t) * size_t(total)));
  if (!out->keys || !out->vals || !out->lens) png_error(png, "out of memory");
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

bool png_decode_mem(MemSource* src, PngOut* out, PngErr* err) {
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, err, png_error_cb, png_warning_cb);
  if (!png) return false;
  png_infop info = png_create_info_struct(png);
  png_infop end_info = info ? png_create_info_struct(png) : nullptr;
  if (!end_info) {
    png_destroy_read_struct(&png, info ? &info : nullptr, nullptr);
    return false;
  }
  if (setjmp(png_jmpbuf(png))) {
    png_destroy_read_struct(&png, &info, &end_info);
    return false;
  }
  png_set_read_fn(png, src, mem_source_read);
  png_read_info(png, info);
  const png_uint_32 w = png_get_image_width(png, info), h = png_get_image_height(png, info);
  if (int64_t(w) * int64_t(h) > kMaxPixels) png_error(png, "image too large");
  const int ct = png_get_color_type(png, info);
  png_set_strip_16(png);
  png_set_expand(png);  // palette → RGB, grey < 8 bits → 8, tRNS → alpha
  png_set_strip_alpha(png);
  if (ct == PNG_COLOR_TYPE_GRAY || ct == PNG_COLOR_TYPE_GRAY_ALPHA) png_set_gray_to_rgb(png);
  png_set_interlace_handling(png);
  png_read_update_info(png, info);
  if (png_get_rowbytes(png, info) != size_t(w) * 3) png_error(png, "unsupported PNG layout");
  out->w = w;
  out->h = h;
  out->rgb = static_cast<uint8_t*>(std::malloc(size_t(w) * size_t(h) * 3 + 1));
  out->rows = static_cast<png_bytep*>(std::malloc(sizeof(png_bytep) * (size_t(h) + 1)));
  if (!out->rgb || !out->rows) png_error(png, "out of memory");
  for (png_uint_32 y = 0; y < h; ++y) out->rows[y] = out->rgb + size_t(y) * size_t(w) * 3;
  png_read_image(png, out->rows);
  png_read_end(png, end_info);
  collect_text(png, info, out);
  collect_text(png, end_info, out);
  png_destroy_read_struct(&png, &info, &end_info);
  return true;
}

DecodedImage decode_png(const uint8_t* data, size_t size, const std::string& name) {
  MemSource src{data, size, 0};
  PngOut o;
  PngErr err;
  if (!png_decode_mem(&src, &o, &err)) {
    free_png_out(&o);
    fail(str_cat("cannot read image '", name, "': ", err.msg[0] ? err.msg : "libpng error"));
  }
  DecodedImage d;
  d.format = ImageFormat::PNG;
  d.width = int(o.w);
  d.height = int(o.h);
  d.rgb.assign(o.rgb, o.rgb + size_t(o.w) * size_t(o.h) * 3);
  for (int i = 0; i < o.n; ++i) d.text.emplace_back(o.keys[i], std::string(o.vals[i], o.lens[i]));
  free_png_out(&o);
  return d;
}

// ---- JPEG -------------------------------------------------------------------------------------

struct JpegErr {
  jpeg_error_mgr pub;
  jmp_buf jb;
  char msg[JMSG_LENGTH_MAX];
};
void jpeg_error_exit_cb(j_common_ptr cinfo) {
  auto* e = reinterpret_cast<JpegErr*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, e->msg);
  longjmp(e->jb, 1);
}
void jpeg_silent_cb(j_common_ptr, int) {}

bool jpeg_encode_mem(const uint8_t* rgb, int width, int height, int quality, const uint8_t* app1, size_t app1_n,
                     unsigned char** out, unsigned long* out_n, JpegErr* err) {
  jpeg_compress_struct c;
  c.err = jpeg_std_error(&err->pub);
  err->pub.error_exit = jpeg_error_exit_cb;
  err->pub.emit_message = jpeg_silent_cb;
  if (setjmp(err->jb)) {
    jpeg_destroy_compress(&c);
    return false;
  }
  jpeg_create_compress(&c);
  jpeg_mem_dest(&c, out, out_n);
  c.image_width = JDIMENSION(width);
  c.image_height = JDIMENSION(height);
  c.input_components = 3;
  c.in_color_space = JCS_RGB;
  jpeg_set_defaults(&c);
  jpeg_set_quality(&c, quality, TRUE);
  if (quality >= 90) {  // no chroma subsampling at high quality (4:4:4)
    for (int i = 0; i < c.num_components; ++i) c.comp_info[i].h_samp_factor = c.comp_info[i].v_samp_factor = 1;
  }
  c.optimize_coding = TRUE;
  jpeg_start_compress(&c, TRUE);
  if (app1_n) jpeg_write_marker(&c, JPEG_APP0 + 1, app1, unsigned(app1_n));
  while (c.next_scanline < c.image_height) {
    JSAMPROW row = const_cast<JSAMPROW>(rgb + size_t(c.next_scanline) * size_t(width) * 3);
    jpeg_write_scanlines(&c, &row, 1);
  }
  jpeg_finish_compress(&c);
  jpeg_destroy_compress(&c);
  return true;
}

std::vector<uint8_t> encode_jpeg(const uint8_t* rgb, int width, int height, int quality, const TextChunks& text) {
  if (width > 65500 || height > 65500) fail(str_cat("JPEG images are at most 65500 pixels a side, got ", width, "x", height));
  std::vector<uint8_t> app1;
  std::vector<uint8_t> exif = build_exif(text);
  if (!exif.empty()) {
    const char hdr[6] = {'E', 'x', 'i', 'f', 0, 0};
    app1.assign(hdr, hdr + 6);
    app1.insert(app1.end(), exif.begin(), exif.end());
    if (app1.size() > 65533) fail(str_cat("the metadata (", app1.size(), " bytes) does not fit a JPEG EXIF segment (64 KiB); use PNG or --no-metadata"));
  }
  unsigned char* buf = nullptr;
  unsigned long n = 0;
  JpegErr err{};
  const bool ok = jpeg_encode_mem(rgb, width, height, quality, app1.data(), app1.size(), &buf, &n, &err);
  std::vector<uint8_t> out;
  if (ok) out.assign(buf, buf + n);
  std::free(buf);
  if (!ok) fail(str_cat("JPEG encoding failed: ", err.msg));
  return out;
}

struct JpegOut {
  uint8_t* rgb = nullptr;
  unsigned w = 0, h = 0;
  uint8_t* app1 = nullptr;  // the first Exif APP1 payload
  size_t app1_n = 0;
};

bool jpeg_decode_mem(const uint8_t* data, size_t size, JpegOut* out, JpegErr* err) {
  jpeg_decompress_struct d;
  d.err = jpeg_std_error(&err->pub);
  err->pub.error_exit = jpeg_error_exit_cb;
  err->pub.emit_message = jpeg_silent_cb;
  if (setjmp(err->jb)) {
    jpeg_destroy_decompress(&d);
    return false;
  }
  jpeg_create_decompress(&d);
  jpeg_mem_src(&d, data, static_cast<unsigned long>(size));
  jpeg_save_markers(&d, JPEG_APP0 + 1, 0xFFFF);
  jpeg_read_header(&d, TRUE);
  for (jpeg_saved_marker_ptr m = d.marker_list; m; m = m->next) {
    if (m->marker == JPEG_APP0 + 1 && m->data_length >= 6 && std::memcmp(m->data, "Exif\0\0", 6) == 0 && !out->app1) {
      out->app1 = static_cast<uint8_t*>(std::malloc(m->data_length));
      if (out->app1) std::memcpy(out->app1, m->data, m->data_length), out->app1_n = m->data_length;
    }
  }
  if (int64_t(d.image_width) * int64_t(d.image_height) > kMaxPixels) {
    std::snprintf(err->msg, sizeof err->msg, "image too large");
    jpeg_destroy_decompress(&d);
    return false;
  }
  d.out_color_space = JCS_RGB;
  jpeg_start_decompress(&d);
  out->w = d.output_width;
  out->h = d.output_height;
  out->rgb = static_cast<uint8_t*>(std::malloc(size_t(out->w) * size_t(out->h) * 3 + 1));
  if (!out->rgb) {
    std::snprintf(err->msg, sizeof err->msg, "out of memory");
    jpeg_destroy_decompress(&d);
    return false;
  }
  while (d.output_scanline < d.output_height) {
    JSAMPROW row = out->rgb + size_t(d.output_scanline) * size_t(out->w) * 3;
    jpeg_read_scanlines(&d, &row, 1);
  }
  jpeg_finish_decompress(&d);
  jpeg_destroy_decompress(&d);
  return true;
}

DecodedImage decode_jpeg(const uint8_t* data, size_t size, const std::string& name) {
  JpegOut o;
  JpegErr err{};
  const bool ok = jpeg_decode_mem(data, size, &o, &err);
  DecodedImage d;
  if (ok) {
    d.format = ImageFormat::JPEG;
    d.width = int(o.w);
    d.height = int(o.h);
    d.rgb.assign(o.rgb, o.rgb + size_t(o.w) * size_t(o.h) * 3);
    if (o.app1) parse_exif(o.app1, o.app1_n, &d.text);
  }
  std::free(o.rgb);
  std::free(o.app1);
  if (!ok) fail(str_cat("cannot read image '", name, "': ", err.msg[0] ? err.msg : "bad JPEG data"));
  return d;
}

// ---- WebP -------------------------------------------------------------------------------------

std::vector<uint8_t> encode_webp(const uint8_t* rgb, int width, int height, const ImageEncodeOptions& opt,
                                 const TextChunks& text) {
  if (width > WEBP_MAX_DIMENSION || height > WEBP_MAX_DIMENSION)
    fail(str_cat("WebP images are at most ", WEBP_MAX_DIMENSION, " pixels a side, got ", width, "x", height));
  WebPConfig config;
  if (!WebPConfigInit(&config)) fail("WebP: library version mismatch");
  config.lossless = opt.lossless ? 1 : 0;
  config.quality = float(opt.quality);
  config.exact = 1;  // lossless: keep every pixel exactly
  if (opt.lossless) config.method = 4;
  WebPPicture pic;
  if (!WebPPictureInit(&pic)) fail("WebP: library version mismatch");
  pic.use_argb = opt.lossless ? 1 : 0;
  pic.width = width;
  pic.height = height;
  WebPMemoryWriter wr;
  WebPMemoryWriterInit(&wr);
  pic.writer = WebPMemoryWrite;
  pic.custom_ptr = &wr;
  bool ok = WebPPictureImportRGB(&pic, rgb, width * 3) && WebPEncode(&config, &pic);
  const int code = pic.error_code;
  WebPPictureFree(&pic);
  if (!ok) {
    WebPMemoryWriterClear(&wr);
    fail(str_cat("WebP encoding failed (error ", code, ")"));
  }
  std::vector<uint8_t> bitstream(wr.mem, wr.mem + wr.size);
  WebPMemoryWriterClear(&wr);
  const std::vector<uint8_t> exif = build_exif(text);
  if (exif.empty()) return bitstream;
  WebPMux* mux = WebPMuxNew();
  if (!mux) fail("WebP: out of memory");
  WebPData img{bitstream.data(), bitstream.size()};
  WebPData ex{exif.data(), exif.size()};
  WebPData assembled{nullptr, 0};
  const bool mok = WebPMuxSetImage(mux, &img, 1) == WEBP_MUX_OK && WebPMuxSetChunk(mux, "EXIF", &ex, 1) == WEBP_MUX_OK &&
                   WebPMuxAssemble(mux, &assembled) == WEBP_MUX_OK;
  WebPMuxDelete(mux);
  if (!mok) {
    WebPDataClear(&assembled);
    fail("WebP: cannot add the EXIF metadata chunk");
  }
  std::vector<uint8_t> out(assembled.bytes, assembled.bytes + assembled.size);
  WebPDataClear(&assembled);
  return out;
}

DecodedImage decode_webp(const uint8_t* data, size_t size, const std::string& name) {
  int w = 0, h = 0;
  if (!WebPGetInfo(data, size, &w, &h)) fail(str_cat("cannot read image '", name, "': not a valid WebP file"));
  if (int64_t(w) * int64_t(h) > kMaxPixels) fail(str_cat("cannot read image '", name, "': image too large"));
  DecodedImage d;
  d.format = ImageFormat::WebP;
  d.width = w;
  d.height = h;
  d.rgb.resize(size_t(w) * size_t(h) * 3);
  if (!WebPDecodeRGBInto(data, size, d.rgb.data(), d.rgb.size(), w * 3))
    fail(str_cat("cannot read image '", name, "': WebP decoding failed (truncated or corrupt, or animated)"));
  WebPData wd{data, size};
  if (WebPDemuxer* dmx = WebPDemux(&wd)) {
    WebPChunkIterator it;
    if (WebPDemuxGetChunk(dmx, "EXIF", 1, &it)) {
      parse_exif(it.chunk.bytes, it.chunk.size, &d.text);
      WebPDemuxReleaseChunkIterator(&it);
    }
    WebPDemuxDelete(dmx);
  }
  return d;
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

const char* image_format_name(ImageFormat f) {
  switch (f) {
    case ImageFormat::PNG: return "PNG";
    case ImageFormat::JPEG: return "JPEG";
    case ImageFormat::WebP: return "WebP";
  }
  return "?";
}

bool image_format_from_path(const std::string& path, ImageFormat* f) {
  const size_t slash = path.find_last_of('/');
  const size_t dot = path.find_last_of('.');
  if (dot == std::string::npos || (slash != std::string::npos && dot < slash)) return false;
  const std::string ext = lower(path.substr(dot + 1));
  if (ext == "png") *f = ImageFormat::PNG;
  else if (ext == "jpg" || ext == "jpeg") *f = ImageFormat::JPEG;
  else if (ext == "webp") *f = ImageFormat::WebP;
  else return false;
  return true;
}

std::string find_text(const TextChunks& text, const std::string& key) {
  for (const auto& [k, v] : text)
    if (k == key) return v;
  return {};
}

std::vector<uint8_t> encode_image(ImageFormat f, const uint8_t* rgb, int width, int height,
                                  const ImageEncodeOptions& opt, const TextChunks& text) {
  if (width <= 0 || height <= 0 || int64_t(width) * int64_t(height) > kMaxPixels)
    fail(str_cat("bad image size ", width, "x", height));
  if (!rgb) fail("no pixel data");
  if (opt.quality < 1 || opt.quality > 100) fail(str_cat("quality must be 1..100, got ", opt.quality));
  switch (f) {
    case ImageFormat::PNG: return encode_png(rgb, width, height, text, opt.png_level);
    case ImageFormat::JPEG: return encode_jpeg(rgb, width, height, opt.quality, text);
    case ImageFormat::WebP: return encode_webp(rgb, width, height, opt, text);
  }
  fail("unknown image format");
}

void write_bytes_atomic(const std::string& path, const std::vector<uint8_t>& bytes) {
  auto fail_w = [&](const std::string& why) -> void { fail(str_cat("cannot write '", path, "': ", why)); };
  if (path.empty()) fail("cannot write '': empty path");
  if (path == "-") {
    size_t done = 0;
    while (done < bytes.size()) {
      const ssize_t n = ::write(STDOUT_FILENO, bytes.data() + done, bytes.size() - done);
      if (n < 0) {
        if (errno == EINTR) continue;
        fail(str_cat("cannot write to stdout: ", std::strerror(errno)));
      }
      done += size_t(n);
    }
    return;
  }
  std::string tmpl = path + ".tmp.XXXXXX";
  std::vector<char> tmp_path(tmpl.begin(), tmpl.end());
  tmp_path.push_back('\0');
  const int fd = mkstemp(tmp_path.data());
  if (fd < 0) fail_w(std::strerror(errno));
  const std::string tmp(tmp_path.data());
  std::string error;
  size_t done = 0;
  while (done < bytes.size() && error.empty()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0) {
      if (errno != EINTR) error = std::strerror(errno);
    } else {
      done += size_t(n);
    }
  }
  if (error.empty() && fchmod(fd, file_mode_from_umask()) != 0) error = std::strerror(errno);
  if (error.empty() && fsync(fd) != 0) error = std::strerror(errno);
  if (::close(fd) != 0 && error.empty()) error = std::strerror(errno);
  if (error.empty() && std::rename(tmp.c_str(), path.c_str()) != 0) error = std::strerror(errno);
  if (!error.empty()) {
    ::unlink(tmp.c_str());
    fail_w(error);
  }
  const int dfd = ::open(dir_of(path).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    (void)fsync(dfd);
    ::close(dfd);
  }
}

void write_image_atomic(const std::string& path, ImageFormat f, const uint8_t* rgb, int width, int height,
                        const ImageEncodeOptions& opt, const TextChunks& text) {
  std::vector<uint8_t> bytes;
  try {
    bytes = encode_image(f, rgb, width, height, opt, text);
  } catch (const Error& e) {
    fail(str_cat("cannot write '", path, "': ", e.what()));
  }
  write_bytes_atomic(path, bytes);
}

DecodedImage decode_image(const uint8_t* data, size_t size, const std::string& name) {
  if (size >= 8 && std::memcmp(data, "\x89PNG\r\n\x1a\n", 8) == 0) return decode_png(data, size, name);
  if (size >= 3 && data[0] == 0xFF && data[1] == 0xD8 && data[2] == 0xFF) return decode_jpeg(data, size, name);
  if (size >= 12 && std::memcmp(data, "RIFF", 4) == 0 && std::memcmp(data + 8, "WEBP", 4) == 0)
    return decode_webp(data, size, name);
  fail(str_cat("cannot read image '", name, "': not a PNG, JPEG or WebP file"));
}

DecodedImage read_image_file(const std::string& path) {
  std::vector<uint8_t> bytes;
  if (path == "-") {
    bytes.assign(std::istreambuf_iterator<char>(std::cin.rdbuf()), std::istreambuf_iterator<char>());
  } else {
    std::ifstream is(path, std::ios::binary);
    if (!is) fail(str_cat("cannot read image '", path, "': ", std::strerror(errno)));
    bytes.assign(std::istreambuf_iterator<char>(is), std::istreambuf_iterator<char>());
    if (is.bad()) fail(str_cat("cannot read image '", path, "': read error"));
  }
  return decode_image(bytes.data(), bytes.size(), path);
}

}  // namespace zi

namespace zi {
std::string image_codec_versions() {
  const int wv = WebPGetEncoderVersion();
  std::string jpeg = "libjpeg";
#ifdef LIBJPEG_TURBO_VERSION
#define ZI_STR2(x) #x
#define ZI_STR(x) ZI_STR2(x)
  jpeg = "libjpeg-turbo " ZI_STR(LIBJPEG_TURBO_VERSION);
#endif
  return str_cat("PNG (libpng ", png_get_libpng_ver(nullptr), ", zlib ", zlibVersion(), "), JPEG (", jpeg, "), WebP (libwebp ", (wv >> 16) & 0xff,
                 ".", (wv >> 8) & 0xff, ".", wv & 0xff, ")");
}
}  // namespace zi
