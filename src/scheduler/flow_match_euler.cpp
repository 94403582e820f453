#include "scheduler/flow_match_euler.h"

#include <cmath>
#include <nlohmann/json.hpp>
#include <type_traits>

#include "core/check.h"

// The reference rounds after every operation (separate NumPy/PyTorch ops): never contract
// a*b+c into an FMA, even with -march=native.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace zi {

void SchedulerConfig::validate() const {
  auto bad = [](const char* field, const std::string& what) {
    fail(str_cat("scheduler config: '", field, "' ", what));
  };
  if (num_train_timesteps <= 0) bad("num_train_timesteps", str_cat("must be positive (got ", num_train_timesteps, ")"));
  if (!std::isfinite(shift) || shift <= 0) bad("shift", str_cat("must be a positive number (got ", shift, ")"));
  if (time_shift_type != "exponential" && time_shift_type != "linear")
    bad("time_shift_type", str_cat("must be \"exponential\" or \"linear\" (got \"", time_shift_type, "\")"));
  if (use_dynamic_shifting) {
    if (!std::isfinite(base_shift)) bad("base_shift", "must be a finite number");
    if (!std::isfinite(max_shift)) bad("max_shift", "must be a finite number");
    if (max_image_seq_len == base_image_seq_len)
      bad("max_image_seq_len", str_cat("must differ from base_image_seq_len (both ", base_image_seq_len, ")"));
    [[maybe_unused]] int64_t span;  // calculate_shift divides by it, exactly like Python's integers
    if (__builtin_sub_overflow(max_image_seq_len, base_image_seq_len, &span))
      bad("max_image_seq_len", str_cat("minus base_image_seq_len overflows (", max_image_seq_len, " - ",
                                       base_image_seq_len, ")"));
  }
  if (use_karras_sigmas) bad("use_karras_sigmas", "= true is not supported");
  if (use_exponential_sigmas) bad("use_exponential_sigmas", "= true is not supported");
  if (use_beta_sigmas) bad("use_beta_sigmas", "= true is not supported");
  if (invert_sigmas) bad("invert_sigmas", "= true is not supported");
  if (stochastic_sampling) bad("stochastic_sampling", "= true is not supported");
  // diffusers tests `if self.config.shift_terminal:`, so 0 behaves like null.
  if (shift_terminal && *shift_terminal != 0.0) bad("shift_terminal", "is not supported (must be null)");
}

SchedulerConfig parse_scheduler_config(const std::string& json_text, const std::string& path) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(json_text);
  } catch (const nlohmann::json::exception& e) {
    fail(str_cat(path, ": invalid JSON: ", e.what()));
  }
  if (!j.is_object()) fail(str_cat(path, ": expected a JSON object"));

  SchedulerConfig c;
  auto present = [&](const char* k) { return j.contains(k) && !j[k].is_null(); };
  auto type_err = [&](const char* k, const char* want) {
    fail(str_cat(path, ": field '", k, "' must be ", want, " (got ", j[k].dump(), ")"));
  };
  auto get_num = [&](const char* k, double* out) {
    if (!present(k)) return;
    if (!j[k].is_number()) type_err(k, "a number");
    *out = j[k].get<double>();
  };
  auto get_int = [&](const char* k, auto* out) {
    if (!present(k)) return;
    const auto& v = j[k];
    if (v.is_number_integer()) {
      *out = static_cast<std::remove_pointer_t<decltype(out)>>(v.get<int64_t>());
    } else if (v.is_number_float() && std::floor(v.get<double>()) == v.get<double>() && std::fabs(v.get<double>()) < 1e15) {
      *out = static_cast<std::remove_pointer_t<decltype(out)>>(v.get<double>());
    } else {
      type_err(k, "an integer");
    }
  };
  auto get_bool = [&](const char* k, bool* out) {
    if (!present(k)) return;
    if (!j[k].is_boolean()) type_err(k, "true or false");
    *out = j[k].get<bool>();
  };

  if (present("_class_name")) {
    if (!j["_class_name"].is_string()) type_err("_class_name", "a string");
    const std::string cls = j["_class_name"].get<std::string>();
    if (cls != "FlowMatchEulerDiscreteScheduler")
      fail(str_cat(path, ": field '_class_name' is \"", cls, "\"; only FlowMatchEulerDiscreteScheduler is supported"));
  }
  int64_t ntt = c.num_train_timesteps;
  get_int("num_train_timesteps", &ntt);
  if (ntt <= 0 || ntt > 1000000000) fail(str_cat(path, ": field 'num_train_timesteps' out of range (", ntt, ")"));
  c.num_train_timesteps = int(ntt);
  get_num("shift", &c.shift);
  get_bool("use_dynamic_shifting", &c.use_dynamic_shifting);
  get_num("base_shift", &c.base_shift);
  get_num("max_shift", &c.max_shift);
  get_int("base_image_seq_len", &c.base_image_seq_len);
  get_int("max_image_seq_len", &c.max_image_seq_len);
  if (present("time_shift_type")) {
    if (!j["time_shift_type"].is_string()) type_err("time_shift_type", "a string");
    c.time_shift_type = j["time_shift_type"].get<std::string>();
  }
  get_bool("use_karras_sigmas", &c.use_karras_sigmas);
  get_bool("use_exponential_sigmas", &c.use_exponential_sigmas);
  get_bool("use_beta_sigmas", &c.use_beta_sigmas);
  get_bool("invert_sigmas", &c.invert_sigmas);
  get_bool("stochastic_sampling", &c.stochastic_sampling);
  if (present("shift_terminal")) {
    double st = 0;
    get_num("shift_terminal", &st);
    c.shift_terminal = st;
  }
  try {
    c.validate();
  } catch (const Error& e) {
    fail(str_cat(path, ": ", e.what()));
  }
  return c;
}

double calculate_shift(int64_t image_seq_len, const SchedulerConfig& cfg) {
  // Python float arithmetic, evaluated as written in diffusers.
  const double m = (cfg.max_shift - cfg.base_shift) / double(cfg.max_image_seq_len - cfg.base_image_seq_len);
  const double b = cfg.base_shift - m * double(cfg.base_image_seq_len);
  return double(image_seq_len) * m + b;
}

Schedule make_schedule(const SchedulerConfig& cfg, int steps, int64_t image_seq_len) {
  cfg.validate();
  ZI_CHECK(steps >= 1, "[make_schedule] the number of steps must be at least 1 (got ", steps, ")");
  ZI_CHECK(image_seq_len >= 1, "[make_schedule] image_seq_len must be positive (got ", image_seq_len, ")");
  const int n = steps;

  // get_default_z_image_sigmas: torch.linspace(1.0, 1 / n, n) in float32, as PyTorch's CPU
  // kernel computes it (x86-64 builds with AVX2/AVX-512, whose compiled loop fuses the
  // multiply-add): step = (end − start)/(n − 1); the first half counts up from start, the
  // second half down from end. Verified bit-exact against torch 2.15 for n = 1…300.
  std::vector<float> s(static_cast<size_t>(n));
  {
    const float start = 1.0f, end = float(1.0 / double(n));
    if (n == 1) {
      s[0] = start;
    } else {
      const float step = (end - start) / float(n - 1);
      const int half = n / 2;
      for (int i = 0; i < n; ++i)
        s[size_t(i)] = i < half ? std::fma(step, float(i), start) : std::fma(-step, float(n - 1 - i), end);
    }
  }

  std::vector<float> sig(static_cast<size_t>(n));
  if (cfg.use_dynamic_shifting) {
    // time_shift(mu, 1.0, s) on a float32 array; Python scalars are cast to float32.
    const double mu = calculate_shift(image_seq_len, cfg);
    const float a = cfg.time_shift_type == "exponential" ? float(std::exp(mu)) : float(mu);
    for (int i = 0; i < n; ++i) {
      const float t = s[size_t(i)];
      const float q = 1.0f / t - 1.0f;  // (1/t - 1) ** 1.0 is exact
      sig[size_t(i)] = a / (a + q);
    }
  } else {
    const float sh = float(cfg.shift);
    const float shm1 = float(cfg.shift - 1.0);
    for (int i = 0; i < n; ++i) {
      const float t = s[size_t(i)];
      const float num = sh * t;
      const float den = 1.0f + shm1 * t;
      sig[size_t(i)] = num / den;
    }
  }

  Schedule out;
  out.timesteps.resize(size_t(n));
  const float ntt = float(cfg.num_train_timesteps);
  for (int i = 0; i < n; ++i) out.timesteps[size_t(i)] = sig[size_t(i)] * ntt;
  out.sigmas = std::move(sig);
  out.sigmas.push_back(0.0f);
  return out;
}

float model_time(const Schedule& s, int i) {
  ZI_CHECK(i >= 0 && i < s.steps(), "[model_time] step ", i, " out of range (", s.steps(), " steps)");
  const float d = 1000.0f - s.timesteps[size_t(i)];
  return d / 1000.0f;
}

void euler_step(float* latents, const float* pred_velocity, size_t n, float sigma, float sigma_next) {
  const float dt = sigma_next - sigma;
  for (size_t k = 0; k < n; ++k) {
    const float model_output = -pred_velocity[k];
    const float delta = dt * model_output;
    latents[k] = latents[k] + delta;
  }
}

void cfg_combine(float* out, const float* pos, const float* neg, size_t n, float g) {
  for (size_t k = 0; k < n; ++k) {
    const float p = pos[k];
    const float diff = p - neg[k];
    const float scaled = g * diff;
    out[k] = p + scaled;
  }
}

void cfg_normalize(float* pred, const float* pos, size_t n, float r) {
  if (!(r > 0.0f)) return;
  // torch.linalg.vector_norm in float32; accumulated here in double and rounded once, which
  // is at least as accurate (PyTorch's own result depends on its reduction order).
  double sp = 0.0, sq = 0.0;
  for (size_t k = 0; k < n; ++k) {
    sp += double(pos[k]) * double(pos[k]);
    sq += double(pred[k]) * double(pred[k]);
  }
  const float pos_norm = float(std::sqrt(sp));
  const float pred_norm = float(std::sqrt(sq));
  const float max_norm = pos_norm * r;
  if (pred_norm > max_norm) {
    const float scale = max_norm / pred_norm;
    for (size_t k = 0; k < n; ++k) pred[k] = pred[k] * scale;
  }
}

bool cfg_active(double guidance, double cfg_truncation, float t_norm) {
  if (!(guidance > 0.0)) return false;
  if (cfg_truncation <= 1.0 && double(t_norm) > cfg_truncation) return false;
  return true;
}

}  // namespace zi
