// Image files in and out: PNG (read by libpng; written here with zlib, deflating in parallel), JPEG
// (libjpeg-turbo) and WebP (libwebp), 8-bit RGB.
//
// Writing: the format comes from the file name's extension (.png, .jpg/.jpeg, .webp); the
// bytes are produced in memory, then written atomically (temp file + fsync + rename) or to
// stdout for the path "-". Text metadata (keyword, text) pairs are stored as:
//   PNG   one tEXt chunk per pair (iTXt, UTF-8, when the text is not ASCII);
//   JPEG  an EXIF APP1 segment; WebP an EXIF chunk. In both, the pair keyed "parameters" (the
//         A1111 string) is the Exif UserComment (ASCII, or UNICODE = UTF-16BE, as A1111 and
//         piexif write it) and the pair keyed "zimage" (the reproduction JSON) is the
//         MakerNote, as the bytes "zimage\0" + UTF-8 JSON; other pairs are dropped (the
//         "Software" pair becomes the IFD0 Software tag).
// Reading: any of the three formats, detected from the bytes (not the name), decoded to RGB8
// (alpha dropped, grey expanded, 16-bit PNG reduced), with the metadata above read back.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace zi {

enum class ImageFormat { PNG, JPEG, WebP };

using TextChunks = std::vector<std::pair<std::string, std::string>>;

const char* image_format_name(ImageFormat f);  // "PNG", "JPEG", "WebP"

// The format a path's extension asks for (case-insensitive). Returns false for an unknown or
// missing extension (the caller decides; the CLI refuses it with the list of extensions).
bool image_format_from_path(const std::string& path, ImageFormat* f);

struct ImageEncodeOptions {
  int quality = 90;       // JPEG and lossy WebP, 1..100
  bool lossless = false;  // WebP: lossless (the pixels decode exactly)
  int png_level = -1;     // PNG: zlib level 0..9 (-1: zlib's default, 6); the pixels are the same at every level
};

// Encodes 8-bit RGB (height·width·3 bytes, HWC) in memory. Throws zi::Error on failure.
std::vector<uint8_t> encode_image(ImageFormat f, const uint8_t* rgb, int width, int height,
                                  const ImageEncodeOptions& opt, const TextChunks& text);

// Writes bytes to `path` atomically (path + ".tmp.XXXXXX" in the same folder, fsync, rename);
// "-" writes them to stdout. On failure nothing is left behind and zi::Error
// "cannot write '<path>': <reason>" is thrown.
void write_bytes_atomic(const std::string& path, const std::vector<uint8_t>& bytes);

// encode_image + write_bytes_atomic (the caller picks the format, e.g. with
// image_format_from_path). Encoding errors are reported as "cannot write '<path>': ...".
void write_image_atomic(const std::string& path, ImageFormat f, const uint8_t* rgb, int width, int height,
                        const ImageEncodeOptions& opt, const TextChunks& text);

struct DecodedImage {
  ImageFormat format = ImageFormat::PNG;
  int width = 0, height = 0;
  std::vector<uint8_t> rgb;  // height·width·3, HWC
  TextChunks text;           // the metadata as described above
};

// Decodes PNG, JPEG or WebP bytes (detected from the signature) to RGB8. `name` is used in
// error messages ("cannot read image '<name>': ..."). Refuses images over 2^28 pixels.
DecodedImage decode_image(const uint8_t* data, size_t size, const std::string& name);
// Reads and decodes a file ("-": stdin).
DecodedImage read_image_file(const std::string& path);

// The value of the first text pair with this key, or "" when absent.
std::string find_text(const TextChunks& text, const std::string& key);

}  // namespace zi

namespace zi {
// "PNG (libpng 1.6.39, zlib 1.2.13), JPEG (libjpeg-turbo 2.1.5), WebP (libwebp 1.2.4)": what --version lists.
std::string image_codec_versions();
}  // namespace zi
