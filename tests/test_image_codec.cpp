// The image codec module (src/io/image_codec): PNG, JPEG and WebP written and read back, with
// the metadata (A1111 "parameters" and the zimage JSON) surviving in each format.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <string>
#include <vector>

#include "core/check.h"
#include "io/image_codec.h"
#include "test_util.h"

using namespace zi;

namespace {

// A smooth gradient with some detail: what a decoded image looks like to a lossy codec.
std::vector<uint8_t> test_image(int w, int h) {
  std::vector<uint8_t> rgb(size_t(w) * size_t(h) * 3);
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x) {
      uint8_t* p = &rgb[(size_t(y) * size_t(w) + size_t(x)) * 3];
      p[0] = uint8_t(x * 255 / (w - 1));
      p[1] = uint8_t(y * 255 / (h - 1));
      p[2] = uint8_t(128 + 100 * std::sin(x * 0.2) * std::cos(y * 0.15));
    }
  return rgb;
}

double psnr(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b) {
  double se = 0;
  for (size_t i = 0; i < a.size(); ++i) se += double(int(a[i]) - int(b[i])) * double(int(a[i]) - int(b[i]));
  const double mse = se / double(a.size());
  return mse == 0 ? 1e9 : 10 * std::log10(255.0 * 255.0 / mse);
}

const TextChunks kMeta = {{"parameters", "a fox \xE2\x80\x94 in snow \xF0\x9F\xA6\x8A\nSteps: 8, Seed: 42"},
                          {"zimage", R"({"prompt":"a fox \u2014","seed":42})"},
                          {"Software", "zimage test"}};

}  // namespace

TEST(ImageCodec, FormatFromExtension) {
  ImageFormat f;
  EXPECT_TRUE(image_format_from_path("a/b.PNG", &f));
  EXPECT_EQ(f, ImageFormat::PNG);
  EXPECT_TRUE(image_format_from_path("x.jpeg", &f));
  EXPECT_EQ(f, ImageFormat::JPEG);
  EXPECT_TRUE(image_format_from_path("x.JpG", &f));
  EXPECT_EQ(f, ImageFormat::JPEG);
  EXPECT_TRUE(image_format_from_path("x.webp", &f));
  EXPECT_EQ(f, ImageFormat::WebP);
  EXPECT_FALSE(image_format_from_path("x.gif", &f));
  EXPECT_FALSE(image_format_from_path("dir.png/x", &f));
  EXPECT_FALSE(image_format_from_path("-", &f));
}

TEST(ImageCodec, PngAndLosslessWebpAreExact) {
  const int w = 48, h = 32;
  const auto rgb = test_image(w, h);
  for (ImageFormat f : {ImageFormat::PNG, ImageFormat::WebP}) {
    ImageEncodeOptions o;
    o.lossless = true;
    auto bytes = encode_image(f, rgb.data(), w, h, o, kMeta);
    DecodedImage d = decode_image(bytes.data(), bytes.size(), "mem");
    EXPECT_EQ(d.format, f);
    ASSERT_EQ(d.width, w);
    ASSERT_EQ(d.height, h);
    EXPECT_EQ(d.rgb, rgb) << image_format_name(f);
    EXPECT_EQ(find_text(d.text, "parameters"), kMeta[0].second) << image_format_name(f);
    EXPECT_EQ(find_text(d.text, "zimage"), kMeta[1].second) << image_format_name(f);
    EXPECT_EQ(find_text(d.text, "Software"), "zimage test") << image_format_name(f);
  }
}

// Lossy formats: stated quality at the default quality 90 on a smooth image (measured: JPEG
// 4:4:4 about 44 dB, WebP about 40 dB); the bound leaves a margin for library versions.
TEST(ImageCodec, LossyFormatsStayWithinStatedQuality) {
  const int w = 64, h = 64;
  const auto rgb = test_image(w, h);
  for (ImageFormat f : {ImageFormat::JPEG, ImageFormat::WebP}) {
    ImageEncodeOptions o;  // quality 90
    auto bytes = encode_image(f, rgb.data(), w, h, o, kMeta);
    DecodedImage d = decode_image(bytes.data(), bytes.size(), "mem");
    EXPECT_EQ(d.format, f);
    ASSERT_EQ(d.rgb.size(), rgb.size());
    const double p = psnr(d.rgb, rgb);
    EXPECT_GT(p, 35.0) << image_format_name(f);
    EXPECT_LT(p, 1e8) << "a lossy codec that is exact is suspicious: " << image_format_name(f);
    EXPECT_EQ(find_text(d.text, "parameters"), kMeta[0].second) << image_format_name(f);
    EXPECT_EQ(find_text(d.text, "zimage"), kMeta[1].second) << image_format_name(f);
    // Lower quality: smaller file.
    o.quality = 30;
    auto small = encode_image(f, rgb.data(), w, h, o, {});
    EXPECT_LT(small.size(), bytes.size()) << image_format_name(f);
  }
}

TEST(ImageCodec, AsciiParametersInExifAndNoMetadata) {
  const auto rgb = test_image(16, 16);
  auto bytes = encode_image(ImageFormat::JPEG, rgb.data(), 16, 16, {}, {{"parameters", "plain ascii"}});
  DecodedImage d = decode_image(bytes.data(), bytes.size(), "mem");
  EXPECT_EQ(find_text(d.text, "parameters"), "plain ascii");
  for (ImageFormat f : {ImageFormat::PNG, ImageFormat::JPEG, ImageFormat::WebP}) {
    auto b = encode_image(f, rgb.data(), 16, 16, {}, {});
    EXPECT_TRUE(decode_image(b.data(), b.size(), "m").text.empty()) << image_format_name(f);
  }
}

TEST(ImageCodec, FilesAtomicAndErrorsNameTheFile) {
  test::TempDir dir;
  const auto rgb = test_image(16, 16);
  const std::string p = dir / "x.webp";
  write_image_atomic(p, ImageFormat::WebP, rgb.data(), 16, 16, {90, true}, kMeta);
  DecodedImage d = read_image_file(p);
  EXPECT_EQ(d.rgb, rgb);
  EXPECT_NE(test::error_of([&] { write_image_atomic(dir / "no/such/x.png", ImageFormat::PNG, rgb.data(), 16, 16, {}, {}); })
                .find("cannot write '"),
            std::string::npos);
  // Garbage and truncated files: one-line errors naming the file.
  std::ofstream(dir / "junk.png") << "not an image at all";
  EXPECT_NE(test::error_of([&] { read_image_file(dir / "junk.png"); }).find("junk.png': not a PNG, JPEG or WebP"),
            std::string::npos);
  for (ImageFormat f : {ImageFormat::PNG, ImageFormat::JPEG, ImageFormat::WebP}) {
    auto b = encode_image(f, rgb.data(), 16, 16, {}, {});
    b.resize(b.size() / 2);
    const std::string e = test::error_of([&] { decode_image(b.data(), b.size(), "half"); });
    // libjpeg pads a truncated stream with grey and warns; PNG and WebP refuse it.
    if (f != ImageFormat::JPEG) EXPECT_NE(e.find("cannot read image 'half'"), std::string::npos) << image_format_name(f);
  }
  EXPECT_NE(test::error_of([&] { read_image_file(dir / "missing.jpg"); }).find("missing.jpg"), std::string::npos);
}
