// The JSON request shapes zimage serve accepts (OpenAI images, A1111 txt2img, zimage jobs),
// parsed and checked against the server's limits. Every rejection is an ApiError carrying the
// HTTP status and the offending field, which the HTTP layer turns into
// {"error": {"message", "type", "param"}}.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

#include <nlohmann/json.hpp>

#include "pipeline/pipeline.h"

namespace zi::server {

struct ApiError : std::runtime_error {
  ApiError(int status, std::string field, const std::string& message)
      : std::runtime_error(message), status(status), field(std::move(field)) {}
  int status;
  std::string field;  // the request field at fault ("" when none)
};

// Bounds on what one request may ask for (zimage serve flags).
struct Limits {
  size_t max_body_bytes = 1 << 20;   // --max-body-bytes: larger bodies → 413
  size_t max_prompt_bytes = 8192;    // --max-prompt-bytes (prompt and negative prompt, UTF-8 bytes)
  int max_n = 8;                     // --max-n: images per request
  int64_t max_pixels = 1024 * 1024;  // --max-pixels: width × height
  int max_steps = 100;               // --max-steps
};

// One validated request: the options of its first image (seed included) and the image count.
// Image k uses seed + k, like `zimage generate --count`.
struct ImageRequest {
  GenerateOptions options;  // model, dtypes, devices and defaults from the server
  int n = 1;
};

// Parses a body into JSON: malformed → ApiError 400; not an object → 400.
nlohmann::json parse_body(const std::string& body);

// OpenAI POST /v1/images/generations (and POST /v1/jobs): prompt, n, size "WxH" (or width and
// height), response_format "b64_json", seed, steps, guidance, negative_prompt.
ImageRequest parse_openai_request(const nlohmann::json& j, const GenerateOptions& defaults, const Limits& lim);

// A1111 POST /sdapi/v1/txt2img: prompt, negative_prompt, steps, cfg_scale (guidance =
// cfg_scale − 1: A1111's 1 means no guidance), width, height, seed (−1: random),
// batch_size × n_iter images.
ImageRequest parse_a1111_request(const nlohmann::json& j, const GenerateOptions& defaults, const Limits& lim);

// A random seed (std::random_device), for requests that give none.
uint64_t fresh_seed();

}  // namespace zi::server
