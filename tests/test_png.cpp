// PNG writing/reading and the float → uint8 post-processing (spec §4.8).
#include <gtest/gtest.h>

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <zlib.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/check.h"
#include "core/parallel.h"
#include "io/image_codec.h"
#include "io/png.h"
#include "io/safetensors.h"
#include "test_util.h"

using namespace zi;

namespace {

// A fresh empty directory under the build's temp area, removed with its files at the end.
struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/zi_png_test.XXXXXX";
    const char* p = mkdtemp(tmpl);
    if (!p) throw Error("mkdtemp failed");
    path = p;
  }
  ~TempDir() {
    for (const std::string& f : files()) ::unlink((path + "/" + f).c_str());
    ::chmod(path.c_str(), 0700);
    ::rmdir(path.c_str());
  }
  std::vector<std::string> files() const {
    std::vector<std::string> out;
    if (DIR* d = opendir(path.c_str())) {
      while (dirent* e = readdir(d))
        if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0) out.push_back(e->d_name);
      closedir(d);
    }
    return out;
  }
};

std::vector<uint8_t> gradient(int w, int h) {
  std::vector<uint8_t> px(size_t(w) * size_t(h) * 3);
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x) {
      uint8_t* p = &px[(size_t(y) * size_t(w) + size_t(x)) * 3];
      p[0] = uint8_t(x * 255 / (w - 1));
      p[1] = uint8_t(y * 255 / (h - 1));
      p[2] = uint8_t((x * 7 + y * 13) & 0xff);
    }
  return px;
}

}  // namespace

TEST(Png, RoundTripWithTextChunks) {
  TempDir dir;
  const std::string path = dir.path + "/out.png";
  const int w = 37, h = 21;
  const std::vector<uint8_t> px = gradient(w, h);
  const std::string params = "一只猫 sitting on a chair 🐱, studio light\nSteps: 8, Seed: 42";
  write_png_atomic(path, px.data(), w, h, {{"parameters", params}, {"Software", "zimage test"}});

  int rw = 0, rh = 0;
  const std::vector<uint8_t> back = read_png_rgb(path, &rw, &rh);
  EXPECT_EQ(rw, w);
  EXPECT_EQ(rh, h);
  EXPECT_EQ(back, px);

  const auto texts = read_png_text(path);
  EXPECT_EQ(find_text(texts, "parameters"), params);  // UTF-8 preserved (iTXt)
  EXPECT_EQ(find_text(texts, "Software"), "zimage test");
  // Only the final file remains: no temporary left behind.
  EXPECT_EQ(dir.files(), std::vector<std::string>{"out.png"});

  // The file really has an iTXt chunk for the UTF-8 text and a tEXt chunk for the ASCII one.
  FILE* f = std::fopen(path.c_str(), "rb");
  ASSERT_NE(f, nullptr);
  std::string bytes;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) bytes.append(buf, n);
  std::fclose(f);
  EXPECT_NE(bytes.find("iTXtparameters"), std::string::npos);
  EXPECT_NE(bytes.find("tEXtSoftware"), std::string::npos);

  // Overwrite in place (atomic replace) with a different size.
  const std::vector<uint8_t> px2 = gradient(8, 9);
  write_png_atomic(path, px2.data(), 8, 9, {});
  EXPECT_EQ(read_png_rgb(path, &rw, &rh), px2);
  EXPECT_EQ(rw, 8);
  EXPECT_EQ(rh, 9);
  EXPECT_TRUE(read_png_text(path).empty());
  EXPECT_EQ(dir.files(), std::vector<std::string>{"out.png"});

  struct stat st {};
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_NE(st.st_mode & S_IRUSR, 0u);
}

// The writer deflates the filtered rows in 128 KiB pieces in parallel (image_codec.cpp): images
// of one piece and of many (a 1024² one: 24), every level, decode to their pixels through
// libpng; the bytes do not depend on the thread count; and the file is within 1 % of what one
// zlib pass over the same filtered rows gives (the pieces' cost).
TEST(Png, ParallelDeflateIsExactAndThreadIndependent) {
  std::mt19937 g(7);
  auto image = [&](int w, int h) {  // smooth with noise, like a decoded image
    std::vector<uint8_t> px = gradient(w, h);
    for (uint8_t& v : px) v = uint8_t(std::min(255, std::max(0, int(v) + int(g() % 7) - 3)));
    return px;
  };
  const int threads = num_threads();
  for (auto [w, h] : {std::pair{2, 2}, std::pair{37, 21}, std::pair{300, 200}, std::pair{1024, 1024}, std::pair{1280, 720}}) {
    const std::vector<uint8_t> px = image(w, h);
    for (int level : {-1, 0, 1, 6, 9}) {
      SCOPED_TRACE(str_cat(w, "x", h, " level ", level));
      ImageEncodeOptions o;
      o.png_level = level;
      set_num_threads(1);
      const std::vector<uint8_t> one = encode_image(ImageFormat::PNG, px.data(), w, h, o, {{"k", "v"}});
      set_num_threads(threads > 1 ? threads : 2);
      const std::vector<uint8_t> many = encode_image(ImageFormat::PNG, px.data(), w, h, o, {{"k", "v"}});
      set_num_threads(threads);
      EXPECT_EQ(one, many) << "the bytes depend on the thread count";
      const DecodedImage d = decode_image(many.data(), many.size(), "test.png");
      EXPECT_EQ(d.width, w);
      EXPECT_EQ(d.height, h);
      EXPECT_EQ(d.rgb, px);
    }
  }
  // Against one deflate pass at level 6: filtered rows are what both compress, so re-deflate the
  // decoded stream's input (zlib's uncompress of the IDAT data) in one go.
  const int w = 1024, h = 1024;
  const std::vector<uint8_t> px = image(w, h);
  const std::vector<uint8_t> png = encode_image(ImageFormat::PNG, px.data(), w, h, {}, {});
  std::vector<uint8_t> idat;
  for (size_t i = 8; i + 12 <= png.size();) {
    const uint32_t n = uint32_t(png[i]) << 24 | uint32_t(png[i + 1]) << 16 | uint32_t(png[i + 2]) << 8 | png[i + 3];
    if (std::memcmp(&png[i + 4], "IDAT", 4) == 0) idat.insert(idat.end(), png.begin() + long(i) + 8, png.begin() + long(i) + 8 + n);
    i += 12 + n;
  }
  std::vector<uint8_t> raw(size_t(h) * (1 + size_t(w) * 3));
  uLongf rn = raw.size();
  ASSERT_EQ(uncompress(raw.data(), &rn, idat.data(), uLong(idat.size())), Z_OK);
  ASSERT_EQ(rn, raw.size());
  std::vector<uint8_t> single(compressBound(uLong(raw.size())));
  uLongf sn = single.size();
  ASSERT_EQ(compress2(single.data(), &sn, raw.data(), uLong(raw.size()), 6), Z_OK);
  EXPECT_LE(double(idat.size()), 1.01 * double(sn)) << "pieces " << idat.size() << " B, one pass " << sn << " B";
}

TEST(Png, UnwritablePathThrowsAndLeavesNoFile) {
  TempDir dir;
  const std::vector<uint8_t> px = gradient(4, 4);
  // Missing directory.
  const std::string missing = dir.path + "/no/such/dir/x.png";
  try {
    write_png_atomic(missing, px.data(), 4, 4, {});
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("cannot write '" + missing + "'"), std::string::npos) << msg;
    EXPECT_NE(msg.find("No such file or directory"), std::string::npos) << msg;
  }
  // Target is a directory: the temp file is created, the rename fails, the temp is removed.
  const std::string sub = dir.path + "/adir";
  ASSERT_EQ(::mkdir(sub.c_str(), 0755), 0);
  try {
    write_png_atomic(sub, px.data(), 4, 4, {});
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cannot write '" + sub + "'"), std::string::npos) << e.what();
  }
  EXPECT_EQ(dir.files(), std::vector<std::string>{"adir"});
  ::rmdir(sub.c_str());
  // Read-only directory (not meaningful as root, who may write anyway).
  if (::geteuid() != 0) {
    ASSERT_EQ(::chmod(dir.path.c_str(), 0500), 0);
    EXPECT_THROW(write_png_atomic(dir.path + "/x.png", px.data(), 4, 4, {}), Error);
    ::chmod(dir.path.c_str(), 0700);
  }
  EXPECT_TRUE(dir.files().empty());
  // Bad arguments.
  EXPECT_THROW(write_png_atomic(dir.path + "/x.png", px.data(), 0, 4, {}), Error);
  EXPECT_THROW(write_png_atomic(dir.path + "/x.png", px.data(), 4, 4, {{"", "v"}}), Error);
  EXPECT_THROW(write_png_atomic(dir.path + "/x.png", px.data(), 4, 4, {{std::string(80, 'k'), "v"}}), Error);
  EXPECT_TRUE(dir.files().empty());
  // Reading a missing or non-PNG file.
  EXPECT_THROW(read_png_rgb(dir.path + "/none.png", nullptr, nullptr), Error);
  EXPECT_THROW(read_png_text(dir.path + "/none.png"), Error);
}

TEST(Png, ImageToU8Rounding) {
  // v → clamp(v/2 + 1/2) · 255, rounded half to even.
  const float v[] = {-2.0f, -1.0f, 0.0f, 1.0f, 3.0f, NAN};
  uint8_t out[6];
  image_to_u8(v, 1, 1, 6, out);
  EXPECT_EQ(out[0], 0);
  EXPECT_EQ(out[1], 0);
  EXPECT_EQ(out[2], 128);  // 127.5 → 128 (even)
  EXPECT_EQ(out[3], 255);
  EXPECT_EQ(out[4], 255);
  EXPECT_EQ(out[5], 0);
  // x·255 = 0.5 → 0 and 2.5 → 2 (ties to even): x = 0.5/255 → v = 2x − 1.
  const float ties[] = {2.0f * (0.5f / 255.0f) - 1.0f};
  image_to_u8(ties, 1, 1, 1, out);
  EXPECT_LE(out[0], 1);
  // CHW → HWC ordering.
  const float chw[] = {-1.0f, 1.0f, 1.0f, -1.0f, -1.0f, -1.0f};  // c=3, h=1, w=2
  uint8_t hwc[6];
  image_to_u8(chw, 3, 1, 2, hwc);
  const uint8_t want[] = {0, 255, 0, 255, 0, 0};
  EXPECT_EQ(std::memcmp(hwc, want, 6), 0);
  EXPECT_THROW(image_to_u8(chw, 2, 1, 2, hwc), Error);
}

TEST(Png, ImageToU8MatchesFixturesExactly) {
  for (const char* name : {"turbo", "cfg", "truncated", "lora", "override"}) {
    SCOPED_TRACE(name);
    SafetensorsFile f = SafetensorsFile::open(test::data_path(std::string("expected/") + name + ".safetensors"));
    const TensorInfo* vae = f.find("vae_out");
    const TensorInfo* img = f.find("image_u8");
    ASSERT_NE(vae, nullptr);
    ASSERT_NE(img, nullptr);
    ASSERT_EQ(vae->dtype, StDType::F32);
    ASSERT_EQ(img->dtype, StDType::U8);
    const int c = int(vae->shape[1]), h = int(vae->shape[2]), w = int(vae->shape[3]);
    ASSERT_EQ(img->shape, (Shape{h, w, c}));
    std::vector<uint8_t> got(size_t(c) * size_t(h) * size_t(w));
    image_to_u8(reinterpret_cast<const float*>(f.data(*vae)), c, h, w, got.data());
    const uint8_t* want = f.data(*img);
    int max_diff = 0;
    for (size_t i = 0; i < got.size(); ++i) max_diff = std::max(max_diff, std::abs(int(got[i]) - int(want[i])));
    EXPECT_EQ(max_diff, 0);

    // The reference PNG holds the same pixels, and our writer/reader round-trips them.
    int pw = 0, ph = 0;
    const std::vector<uint8_t> png = read_png_rgb(test::data_path(std::string("expected/") + name + ".png"), &pw, &ph);
    ASSERT_EQ(pw, w);
    ASSERT_EQ(ph, h);
    EXPECT_EQ(std::memcmp(png.data(), want, got.size()), 0);
  }
}
