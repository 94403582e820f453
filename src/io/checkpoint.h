// A diffusers-format Z-Image folder: model_index.json and each component's config, read
// into typed, validated structs. Spec §2.1, §3.1, §5.1, §6.
#pragma once
#include <string>
#include <vector>

namespace zi {

struct Qwen3Config {
  int hidden_size = 2560;
  int num_hidden_layers = 36;
  int num_attention_heads = 32;
  int num_key_value_heads = 8;
  int head_dim = 128;
  int intermediate_size = 9728;
  int vocab_size = 151936;
  double rope_theta = 1000000.0;  // top level, or rope_parameters.rope_theta (transformers 5)
  double rms_norm_eps = 1e-6;
  std::string hidden_act = "silu";
  bool attention_bias = false;
  void validate(const std::string& path) const;
};

struct DitConfig {
  int in_channels = 16;
  int dim = 3840;
  int n_layers = 30;
  int n_refiner_layers = 2;
  int n_heads = 30;
  int n_kv_heads = 30;
  double norm_eps = 1e-5;
  bool qk_norm = true;
  int cap_feat_dim = 2560;
  double rope_theta = 256.0;
  double t_scale = 1000.0;
  std::vector<int> axes_dims = {32, 48, 48};
  std::vector<int> axes_lens = {1536, 512, 512};
  int patch_size = 2;    // all_patch_size[0]
  int f_patch_size = 1;  // all_f_patch_size[0]
  int head_dim() const { return dim / n_heads; }
  int ffn_hidden() const { return int(double(dim) / 3 * 8); }  // int(dim / 3 * 8) in floating point, as the reference
  void validate(const std::string& path) const;
};

struct VaeConfig {
  int in_channels = 3;
  int out_channels = 3;
  int latent_channels = 16;
  std::vector<int> block_out_channels = {128, 256, 512, 512};
  int layers_per_block = 2;
  int norm_num_groups = 32;
  double scaling_factor = 0.3611;
  double shift_factor = 0.1159;
  bool use_quant_conv = false;
  bool use_post_quant_conv = false;
  bool mid_block_add_attention = true;
  std::string act_fn = "silu";
  int scale_factor() const { return 1 << (int(block_out_channels.size()) - 1); }
  void validate(const std::string& path) const;
};

Qwen3Config parse_qwen3_config(const std::string& json_text, const std::string& path);
DitConfig parse_dit_config(const std::string& json_text, const std::string& path);
VaeConfig parse_vae_config(const std::string& json_text, const std::string& path);

// Reads a whole (small) text file; throws zi::Error "cannot read 'path': reason".
std::string read_text_file(const std::string& path);

struct ModelFolder {
  std::string root;
  std::string text_encoder_dir, tokenizer_dir, transformer_dir, vae_dir, scheduler_dir;
  Qwen3Config text_encoder;
  DitConfig transformer;
  VaeConfig vae;
  std::string scheduler_config_path;  // parsed by the scheduler
};

// Checks model_index.json and the component folders, and parses every config.
// Throws zi::Error naming the missing file or the bad value.
ModelFolder open_model_folder(const std::string& dir);

}  // namespace zi
