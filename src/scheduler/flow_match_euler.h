// FlowMatch Euler scheduler (diffusers FlowMatchEulerDiscreteScheduler as driven by the
// Z-Image pipeline), CFG combination and the Euler update. Spec §4.3–4.7.
// All arithmetic is float32 in the same order as the PyTorch/NumPy reference, so schedules
// are bit-identical and steps match to the last bit for the same inputs.
#pragma once
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace zi {

struct SchedulerConfig {
  int num_train_timesteps = 1000;
  double shift = 1.0;  // class default; Z-Image-Turbo's config sets 3.0
  bool use_dynamic_shifting = false;
  double base_shift = 0.5;
  double max_shift = 1.15;
  int64_t base_image_seq_len = 256;
  int64_t max_image_seq_len = 4096;
  std::string time_shift_type = "exponential";  // or "linear"
  // Not supported: validate() rejects any non-default value.
  bool use_karras_sigmas = false;
  bool use_exponential_sigmas = false;
  bool use_beta_sigmas = false;
  bool invert_sigmas = false;
  bool stochastic_sampling = false;
  std::optional<double> shift_terminal;  // null by default

  // Throws zi::Error naming the offending field.
  void validate() const;
};

// Parses scheduler_config.json. Missing fields (and explicit nulls) take the class defaults
// above; unknown fields are ignored; a wrong type or an unsupported value throws zi::Error
// "<path>: ...". The result is validated.
SchedulerConfig parse_scheduler_config(const std::string& json_text, const std::string& path_for_errors);

struct Schedule {
  std::vector<float> sigmas;     // N+1 values, the last one 0
  std::vector<float> timesteps;  // N values, = 1000·σ_i (times num_train_timesteps)
  int steps() const { return int(timesteps.size()); }
};

// μ of the pipeline's calculate_shift (used only with dynamic shifting).
double calculate_shift(int64_t image_seq_len, const SchedulerConfig& cfg);

// The schedule for `steps` inference steps (spec §4.4): s = torch.linspace(1, 1/N, N) (float32,
// PyTorch CPU kernel), shifted (static or dynamic) in float32 like NumPy, timesteps =
// σ·num_train_timesteps in float32, terminal 0 appended.
Schedule make_schedule(const SchedulerConfig& cfg, int steps, int64_t image_seq_len);

// The time fed to the transformer at step i: (1000 − timesteps[i]) / 1000 in float32.
float model_time(const Schedule& s, int i);

// latents ← latents + (σ_next − σ)·(−pred), float32, element by element like PyTorch
// (dt = σ_next − σ rounded to float32 first; no FMA).
void euler_step(float* latents, const float* pred_velocity, size_t n, float sigma, float sigma_next);

// out = pos + g·(pos − neg) (float32, in this order). `out` may alias `pos` or `neg`.
void cfg_combine(float* out, const float* pos, const float* neg, size_t n, float g);

// CFG renormalisation of one sample (spec §4.6): if r > 0 and ‖pred‖ > r·‖pos‖, scale pred
// by r·‖pos‖/‖pred‖. Norms over all n elements.
void cfg_normalize(float* pred, const float* pos, size_t n, float r);

// Whether CFG runs at a step: guidance > 0, and not truncated (truncation applies when
// cfg_truncation <= 1 and t_norm > cfg_truncation). Compared in double like the Python
// reference (t_norm is the float32 model_time; the thresholds are Python floats), so pass
// the user's values as double.
bool cfg_active(double guidance, double cfg_truncation, float t_norm);

}  // namespace zi
