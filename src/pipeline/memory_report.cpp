#include "pipeline/memory_report.h"

#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/allocator.h"

namespace zi {

std::string memory_report_json(const GenerateResult& r) {
  nlohmann::json j;
  j["phases"] = nlohmann::json::array();
  // CPU phases first, then those of the GPU (when a phase ran there), each with its device.
  std::vector<PhaseRecord> all = r.phases;
  all.insert(all.end(), r.gpu_phases.begin(), r.gpu_phases.end());
  for (const auto& p : all)
    j["phases"].push_back({{"name", p.name},
                           {"device", device_name(p.device)},
                           {"weights_bytes", p.weights_bytes},
                           {"peak_bytes", p.peak_bytes},
                           {"end_bytes", p.end_bytes},
                           {"seconds", p.seconds}});
  // Components loaded during the run with their own weight bytes (the transformer, and in the
  // image-conditioned modes the VAE encoder and the ControlNet).
  if (!r.component_weights.empty()) {
    j["components"] = nlohmann::json::object();
    for (const auto& [n, b] : r.component_weights) j["components"][n] = b;
  }
  // The GPU phases' loading, in the order of `phases` (issue 19's load report).
  bool any_upload = false;
  for (const LoadDetail& d : r.load_detail) any_upload = any_upload || d.upload_bytes > 0 || d.alloc_seconds > 0;
  if (any_upload) {
    j["load"] = nlohmann::json::array();
    for (size_t i = 0; i < r.load_detail.size(); ++i) {
      const LoadDetail& d = r.load_detail[i];
      j["load"].push_back({{"phase", i < r.phases.size() ? r.phases[i].name : std::string()},
                           {"seconds", i < r.load_seconds.size() ? r.load_seconds[i] : 0.0},
                           {"upload_bytes", d.upload_bytes},
                           {"upload_seconds", d.upload_seconds},
                           {"copy_seconds", d.copy_seconds},
                           {"wait_seconds", d.wait_seconds},
                           {"alloc_seconds", d.alloc_seconds},
                           {"unmap_seconds", d.unmap_seconds},
                           {"helper_wait_seconds", d.helper_wait_seconds}});
    }
    j["gpu_init_seconds"] = r.gpu_init_seconds;
  }
  if (!r.prefetched.empty()) {
    j["prefetched"] = nlohmann::json::array();
    for (const PrefetchRecord& p : r.prefetched)
      j["prefetched"].push_back({{"component", p.component},
                                 {"during", p.during},
                                 {"load_seconds", p.load_seconds},
                                 {"waited_seconds", p.waited_seconds},
                                 {"overlapped_seconds", std::max(0.0, p.load_seconds - p.waited_seconds)}});
  }
  j["peak_bytes"] = r.peak_bytes;
  if (!r.gpu_phases.empty()) j["gpu_peak_bytes"] = r.gpu_peak_bytes;
  j["peak_rss_bytes"] = r.peak_rss_bytes;
  // Pinned host blocks kept for the next image's streamed weights (device::free_pinned), now.
  j["pinned_cache_bytes"] = memory_stats(Device::CPU).tag(Tag::PinnedCache).current;
  if (r.vram_plan) {
    const VramPlan& p = *r.vram_plan;
    nlohmann::json v;
    v["budget_bytes"] = p.budget_bytes;
    v["minimum_bytes"] = p.minimum_bytes;
    v["clamped"] = p.clamped;
    v["automatic"] = p.automatic;
    v["h2d_bytes_per_second"] = p.h2d_bytes_per_second;
    for (const ComponentPlan* c : {&p.text, &p.dit}) {
      if (c->resident.empty()) continue;
      v[c->name] = {{"resident_bytes", c->resident_bytes},
                    {"streamed_blocks", c->streamed_blocks()},
                    {"blocks", c->resident.size()},
                    {"ring_slots", c->ring_slots},
                    {"slot_bytes", c->slot_bytes},
                    {"streamed_bytes_per_pass", c->streamed_bytes_per_pass},
                    {"host_pinned_bytes", c->host_pinned_bytes},
                    {"predicted_peak_bytes", c->predicted_peak_bytes},
                    {"predicted_copy_seconds_per_pass", c->predicted_copy_seconds_per_pass}};
    }
    v["vae_tile"] = p.vae_tile * 8;
    v["vae_predicted_peak_bytes"] = p.vae_peak_bytes;
    v["vae_warm_up"] = p.vae_warm_up();
    j["vram_plan"] = v;
    j["streamed_bytes"] = r.streamed_bytes;
  }
  return j.dump(1);
}

void print_memory_report(const GenerateResult& r, const std::string& json_path) {
  auto mib = [](int64_t b) { return double(b) / (1 << 20); };
  std::fprintf(stderr, "memory      device   weights MiB    peak MiB     end MiB   seconds\n");
  std::vector<PhaseRecord> all = r.phases;
  all.insert(all.end(), r.gpu_phases.begin(), r.gpu_phases.end());
  for (const auto& p : all)
    std::fprintf(stderr, "  %-9s %-6s %12.1f %11.1f %11.1f %9.2f\n", p.name.c_str(), device_name(p.device),
                 mib(p.weights_bytes), mib(p.peak_bytes), mib(p.end_bytes), p.seconds);
  if (!r.component_weights.empty()) {
    std::fprintf(stderr, "  weights:");
    for (const auto& [n, b] : r.component_weights) std::fprintf(stderr, " %s %.1f MiB", n.c_str(), mib(b));
    std::fprintf(stderr, "\n");
  }
  std::fprintf(stderr, "  peak (max over phases) %.1f MiB; process peak RSS %.1f MiB\n", mib(r.peak_bytes),
               mib(r.peak_rss_bytes));
  if (!r.gpu_phases.empty()) std::fprintf(stderr, "  GPU peak (max over phases) %.1f MiB\n", mib(r.gpu_peak_bytes));
  if (const int64_t kept = memory_stats(Device::CPU).tag(Tag::PinnedCache).current; kept > 0)
    std::fprintf(stderr, "  pinned host memory kept for the next image's streamed blocks: %.1f MiB\n", mib(kept));
  if (r.vram_plan) {
    std::fprintf(stderr, "%s", format_vram_plan(*r.vram_plan).c_str());
    if (r.streamed_bytes > 0) std::fprintf(stderr, "  streamed host -> device: %.1f MiB in all\n", mib(r.streamed_bytes));
  }
  if (!json_path.empty()) {
    std::string tmp = json_path + ".tmp";
    std::ofstream os(tmp);
    os << memory_report_json(r) << "\n";
    os.close();
    if (!os.good() || std::rename(tmp.c_str(), json_path.c_str()) != 0) {
      std::remove(tmp.c_str());
      throw Error(str_cat("cannot write memory report '", json_path, "'"));
    }
  }
}

}  // namespace zi
