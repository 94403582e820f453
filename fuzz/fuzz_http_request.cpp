// Fuzz target: the request parsing of `zimage serve` (server/api.cpp). Each input is a request
// body, parsed as JSON and then as an OpenAI and an A1111 image request against the default
// limits. The only allowed failure is ApiError (→ an HTTP 4xx with a JSON error naming the
// field); an accepted request must respect the limits it was checked against.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "server/api.h"

using namespace zi;
using namespace zi::server;

namespace {
void check_accepted(const ImageRequest& r, const Limits& lim) {
  const GenerateOptions& g = r.options;
  const bool ok = r.n >= 1 && r.n <= lim.max_n && g.steps >= 1 && g.steps <= lim.max_steps && g.width > 0 &&
                  g.height > 0 && int64_t(g.width) * g.height <= lim.max_pixels && g.width % 16 == 0 &&
                  g.height % 16 == 0 && g.prompt.size() <= size_t(lim.max_prompt_bytes);
  if (!ok) std::abort();  // a request outside the limits got through
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string body(reinterpret_cast<const char*>(data), size);
  const Limits lim;
  const GenerateOptions defaults;
  nlohmann::json j;
  try {
    j = parse_body(body);
  } catch (const ApiError&) {
    return 0;
  }
  try {
    check_accepted(parse_openai_request(j, defaults, lim), lim);
  } catch (const ApiError&) {
  }
  try {
    check_accepted(parse_a1111_request(j, defaults, lim), lim);
  } catch (const ApiError&) {
  }
  return 0;
}
