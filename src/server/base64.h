// Base64 for the JSON responses (b64_json, A1111 images). The PNG bytes themselves come from
// io/image_codec's encode_image with pipeline/metadata's chunks, like the CLI's files.
#pragma once
#include <string>

namespace zi::server {

std::string base64_encode(const std::string& bytes);

}  // namespace zi::server
