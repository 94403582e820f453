#include "server/api.h"

#include <cmath>
#include <limits>
#include <mutex>
#include <random>

#include "core/check.h"
#include "text/bpe_tokenizer.h"

namespace zi::server {

using nlohmann::json;

namespace {

[[noreturn]] void bad(const std::string& field, const std::string& msg, int status = 422) {
  throw ApiError(status, field, msg);
}

// An integer field (JSON number without fraction, or absent → dflt).
int64_t get_int(const json& j, const char* f, int64_t dflt, int64_t lo, int64_t hi) {
  auto it = j.find(f);
  if (it == j.end() || it->is_null()) return dflt;
  int64_t v = 0;
  if (it->is_number_integer()) {
    if (it->is_number_unsigned() && it->get<uint64_t>() > uint64_t(std::numeric_limits<int64_t>::max()))
      bad(f, str_cat(f, " must be at most ", hi));
    v = it->get<int64_t>();
  } else if (it->is_number_float() && std::isfinite(it->get<double>()) && it->get<double>() == std::floor(it->get<double>()) &&
             std::abs(it->get<double>()) < 9e15) {
    v = int64_t(it->get<double>());
  } else {
    bad(f, str_cat(f, " must be a whole number"));
  }
  if (v < lo || v > hi) bad(f, str_cat(f, " must be from ", lo, " to ", hi, ", got ", v));
  return v;
}

double get_num(const json& j, const char* f, double dflt, double lo, double hi) {
  auto it = j.find(f);
  if (it == j.end() || it->is_null()) return dflt;
  if (!it->is_number()) bad(f, str_cat(f, " must be a number"));
  const double v = it->get<double>();
  if (!std::isfinite(v) || v < lo || v > hi) bad(f, str_cat(f, " must be a number from ", lo, " to ", hi));
  return v;
}

std::string get_text(const json& j, const char* f, const std::string& dflt, const Limits& lim, bool required) {
  auto it = j.find(f);
  if (it == j.end() || it->is_null()) {
    if (required) bad(f, str_cat(f, " is required"));
    return dflt;
  }
  if (!it->is_string()) bad(f, str_cat(f, " must be a string"));
  const std::string& s = it->get_ref<const std::string&>();
  if (s.size() > lim.max_prompt_bytes)
    bad(f, str_cat(f, " is ", s.size(), " bytes long; the limit is ", lim.max_prompt_bytes), 413);
  if (size_t at = first_invalid_utf8(s); at != std::string::npos)
    bad(f, str_cat(f, " is not valid UTF-8 (byte ", at, ")"));
  return s;
}

// A seed: absent/null (or −1 when allow_minus_one) → random.
uint64_t get_seed(const json& j, bool allow_minus_one) {
  auto it = j.find("seed");
  if (it == j.end() || it->is_null()) return fresh_seed();
  if (it->is_number_unsigned()) return it->get<uint64_t>();
  if (it->is_number_integer()) {
    if (allow_minus_one && it->get<int64_t>() == -1) return fresh_seed();
  } else if (it->is_number_float()) {
    const double v = it->get<double>();
    if (allow_minus_one && v == -1) return fresh_seed();
    if (v >= 0 && v < 9007199254740992.0 && v == std::floor(v)) return uint64_t(v);
  }
  bad("seed", allow_minus_one ? "seed must be a whole number from 0 to 2^64-1, or -1 for a random seed"
                              : "seed must be a whole number from 0 to 2^64-1");
}

void check_size(int64_t w, int64_t h, const char* field, const Limits& lim) {
  if (w <= 0 || h <= 0 || w % 16 || h % 16)
    bad(field, str_cat(field, ": width and height must be positive multiples of 16, got ", w, "x", h));
  if (w > 8192 || h > 8192) bad(field, str_cat(field, ": at most 8192 pixels per side, got ", w, "x", h));
  if (w * h > lim.max_pixels)
    bad(field, str_cat(field, ": ", w, "x", h, " is ", w * h, " pixels; this server allows at most ", lim.max_pixels));
}

void check_steps_and_n(ImageRequest& r, const Limits& lim) {
  if (r.options.steps < 1 || r.options.steps > lim.max_steps)
    bad("steps", str_cat("steps must be from 1 to ", lim.max_steps, ", got ", r.options.steps));
  if (r.n < 1 || r.n > lim.max_n) bad("n", str_cat("n must be from 1 to ", lim.max_n, ", got ", r.n));
}

int64_t int_in_range(const json& j, const char* f, int64_t dflt) {
  return get_int(j, f, dflt, std::numeric_limits<int32_t>::min(), std::numeric_limits<int32_t>::max());
}

}  // namespace

uint64_t fresh_seed() {
  static std::mutex m;
  static std::random_device rd;
  std::lock_guard<std::mutex> lock(m);
  return (uint64_t(rd()) << 32 | rd()) & ((uint64_t(1) << 53) - 1);  // exact in JavaScript numbers
}

json parse_body(const std::string& body) {
  json j;
  try {
    j = json::parse(body);
  } catch (const json::exception& e) {
    throw ApiError(400, "body", str_cat("the body is not valid JSON: ", e.what()));
  }
  if (!j.is_object()) throw ApiError(400, "body", "the body must be a JSON object");
  return j;
}

ImageRequest parse_openai_request(const json& j, const GenerateOptions& defaults, const Limits& lim) {
  ImageRequest r;
  r.options = defaults;
  GenerateOptions& o = r.options;
  o.prompt = get_text(j, "prompt", "", lim, true);
  o.negative_prompt = get_text(j, "negative_prompt", defaults.negative_prompt, lim, false);
  r.n = int(int_in_range(j, "n", 1));
  if (auto it = j.find("response_format"); it != j.end() && !it->is_null()) {
    if (!it->is_string()) bad("response_format", "response_format must be a string");
    const std::string f = it->get<std::string>();
    if (f == "url")
      bad("response_format", "response_format 'url' is not supported: this server returns images inline; use b64_json");
    if (f != "b64_json") bad("response_format", "response_format must be b64_json, got '" + f + "'");
  }
  int64_t w = defaults.width, h = defaults.height;
  if (auto it = j.find("size"); it != j.end() && !it->is_null()) {
    if (!it->is_string()) bad("size", "size must be a string \"WIDTHxHEIGHT\"");
    const std::string s = it->get<std::string>();
    if (s != "auto") {
      const size_t x = s.find('x');
      auto num = [&](const std::string& t) -> int64_t {
        if (t.empty() || t.size() > 6 || t.find_first_not_of("0123456789") != std::string::npos)
          bad("size", "size must be \"WIDTHxHEIGHT\" (e.g. \"1024x1024\"), got '" + s + "'");
        return std::stoll(t);
      };
      if (x == std::string::npos) bad("size", "size must be \"WIDTHxHEIGHT\" (e.g. \"1024x1024\"), got '" + s + "'");
      w = num(s.substr(0, x));
      h = num(s.substr(x + 1));
    }
    check_size(w, h, "size", lim);
  } else {
    w = int_in_range(j, "width", w);
    h = int_in_range(j, "height", h);
    check_size(w, h, j.contains("width") || j.contains("height") ? "width" : "size", lim);
  }
  o.width = int(w), o.height = int(h);
  o.steps = int(int_in_range(j, "steps", defaults.steps));
  o.guidance = float(get_num(j, "guidance", defaults.guidance, 0, 100));
  o.seed = get_seed(j, false);
  check_steps_and_n(r, lim);
  return r;
}

ImageRequest parse_a1111_request(const json& j, const GenerateOptions& defaults, const Limits& lim) {
  ImageRequest r;
  r.options = defaults;
  GenerateOptions& o = r.options;
  o.prompt = get_text(j, "prompt", "", lim, true);
  o.negative_prompt = get_text(j, "negative_prompt", defaults.negative_prompt, lim, false);
  const int64_t w = int_in_range(j, "width", defaults.width), h = int_in_range(j, "height", defaults.height);
  check_size(w, h, "width", lim);
  o.width = int(w), o.height = int(h);
  o.steps = int(int_in_range(j, "steps", defaults.steps));
  if (j.contains("cfg_scale") && !j["cfg_scale"].is_null())
    o.guidance = float(std::max(0.0, get_num(j, "cfg_scale", 1, 0, 101) - 1.0));
  o.seed = get_seed(j, true);
  const int64_t bs = get_int(j, "batch_size", 1, 1, lim.max_n), it = get_int(j, "n_iter", 1, 1, lim.max_n);
  if (bs * it > lim.max_n)
    bad("batch_size", str_cat("batch_size × n_iter must be at most ", lim.max_n, ", got ", bs * it));
  r.n = int(bs * it);
  check_steps_and_n(r, lim);
  return r;
}

}  // namespace zi::server
