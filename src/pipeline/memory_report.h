// The memory report: a human table and a JSON document of each phase's figures.
#pragma once
#include <string>

#include "pipeline/pipeline.h"

namespace zi {

// JSON: {"phases":[{"name","device","weights_bytes","peak_bytes","end_bytes","seconds"}...],
//        "components":{"transformer":N,"vae_encoder":N,"controlnet":N} (those loaded),
//        "peak_bytes":N,"peak_rss_bytes":N}
std::string memory_report_json(const GenerateResult& r);
// Prints the table on stderr and, when `json_path` is not empty, writes the JSON there.
void print_memory_report(const GenerateResult& r, const std::string& json_path);

}  // namespace zi
