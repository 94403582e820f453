// zimage convert --to diffusers|single-file [--dtype ...] SRC OUT: rewrite a model in any
// readable layout, streaming tensor by tensor (io/convert.h).
#include <CLI/CLI.hpp>
#include <cstdio>
#include <memory>

#include "cli/common.h"
#include "core/check.h"
#include "io/convert.h"

namespace zi::cli {

void add_convert(CLI::App& app) {
  struct Args {
    std::string to, dtype = "keep", component, src, out;
    bool quiet = false;
  };
  auto a = std::make_shared<Args>();
  CLI::App* c = app.add_subcommand(
      "convert",
      "Rewrite a model (a diffusers folder, a ComfyUI/original single file, an all-in-one checkpoint) as a "
      "diffusers folder or one safetensors file in the original (ComfyUI) layout, tensor by tensor.\n"
      "  zimage convert --to single-file ~/models/Z-Image-Turbo z_image_aio.safetensors\n"
      "  zimage convert --to diffusers --dtype bf16 z_image_turbo_bf16.safetensors out-folder");
  c->add_option("--to", a->to, "diffusers (a folder) or single-file (one .safetensors, original layout)")->required();
  c->add_option("--dtype", a->dtype, "storage dtype of the output: keep, bf16, f16 or f32")->capture_default_str();
  c->add_option("--component", a->component, "write only this component: transformer, text_encoder or vae");
  c->add_option("SRC", a->src, "model folder or .safetensors file")->required();
  c->add_option("OUT", a->out, "folder or file to create (must not exist)")->required();
  c->add_flag("-q,--quiet", a->quiet, "print nothing but errors");
  c->callback([a] {
    ConvertOptions o;
    if (a->to == "diffusers") o.to = ConvertTo::Diffusers;
    else if (a->to == "single-file") o.to = ConvertTo::SingleFile;
    else throw UsageError(str_cat("--to must be diffusers or single-file, got '", a->to, "'"));
    check_convert_dtype(a->dtype);
    check_convert_component(a->component);
    o.dtype = a->dtype;
    o.component = a->component;
    if (!a->quiet) o.log = [](const std::string& s) { std::fprintf(stderr, "%s\n", s.c_str()); };
    const ConvertResult r = convert_model(a->src, a->out, o);
    if (!a->quiet)
      std::fprintf(stderr, "%s\nwrote %s: %lld tensors, %.3f GB in %.1f s\n", r.layout.c_str(), a->out.c_str(),
                   static_cast<long long>(r.tensors), double(r.bytes) / 1e9, r.seconds);
  });
}

}  // namespace zi::cli
