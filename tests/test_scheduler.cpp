// FlowMatch Euler schedule, Euler step and CFG against the pipeline fixtures (spec §4.3–4.7).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

#include "core/check.h"
#include "io/safetensors.h"
#include "scheduler/flow_match_euler.h"
#include "test_util.h"

using namespace zi;

namespace {

const char* kCases[] = {"turbo", "cfg", "truncated", "lora", "override"};

struct Fixture {
  nlohmann::json meta;
  SafetensorsFile st;
};

Fixture load_case(const std::string& name) {
  std::ifstream f(test::data_path("expected/" + name + ".json"));
  EXPECT_TRUE(f.good()) << name;
  nlohmann::json meta = nlohmann::json::parse(f);
  return Fixture{std::move(meta), SafetensorsFile::open(test::data_path("expected/" + name + ".safetensors"))};
}

std::vector<float> floats(const SafetensorsFile& st, const std::string& name) {
  const TensorInfo* t = st.find(name);
  EXPECT_NE(t, nullptr) << name;
  if (!t) return {};
  EXPECT_EQ(t->dtype, StDType::F32) << name;
  std::vector<float> v(size_t(t->numel()));
  std::memcpy(v.data(), st.data(*t), v.size() * 4);
  return v;
}

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

double rel_l2(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    const double d = double(a[i]) - double(b[i]);
    num += d * d;
    den += double(b[i]) * double(b[i]);
  }
  return std::isnan(num) ? INFINITY : std::sqrt(num / (den > 0 ? den : 1e-30));
}

// Z-Image-Turbo's scheduler_config.json.
SchedulerConfig turbo_config() {
  return parse_scheduler_config(
      R"({"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.36.0",
          "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": false})",
      "scheduler_config.json");
}

int64_t image_seq_len(const nlohmann::json& meta) {
  const int64_t hl = 2 * (meta.at("height").get<int64_t>() / 16), wl = 2 * (meta.at("width").get<int64_t>() / 16);
  return (hl / 2) * (wl / 2);
}

}  // namespace

TEST(Scheduler, ConfigDefaultsAndParsing) {
  SchedulerConfig c = turbo_config();
  EXPECT_EQ(c.num_train_timesteps, 1000);
  EXPECT_EQ(c.shift, 3.0);
  EXPECT_FALSE(c.use_dynamic_shifting);
  EXPECT_EQ(c.base_shift, 0.5);
  EXPECT_EQ(c.max_shift, 1.15);
  EXPECT_EQ(c.base_image_seq_len, 256);
  EXPECT_EQ(c.max_image_seq_len, 4096);
  EXPECT_EQ(c.time_shift_type, "exponential");
  EXPECT_FALSE(c.shift_terminal.has_value());

  SchedulerConfig d = parse_scheduler_config("{}", "x.json");
  EXPECT_EQ(d.shift, 1.0);
  EXPECT_EQ(d.num_train_timesteps, 1000);
  // Explicit nulls and false flags are fine.
  EXPECT_NO_THROW(parse_scheduler_config(
      R"({"shift_terminal": null, "use_karras_sigmas": false, "invert_sigmas": false, "stochastic_sampling": false,
          "use_exponential_sigmas": false, "use_beta_sigmas": false, "time_shift_type": "linear"})",
      "x.json"));
}

TEST(Scheduler, ConfigErrorsNameTheField) {
  auto expect_error = [](const std::string& json, const std::string& needle) {
    try {
      parse_scheduler_config(json, "sched/scheduler_config.json");
      ADD_FAILURE() << "no error for " << json;
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(needle), std::string::npos) << msg;
      EXPECT_NE(msg.find("sched/scheduler_config.json"), std::string::npos) << msg;
    }
  };
  expect_error(R"({"use_karras_sigmas": true})", "use_karras_sigmas");
  expect_error(R"({"use_exponential_sigmas": true})", "use_exponential_sigmas");
  expect_error(R"({"use_beta_sigmas": true})", "use_beta_sigmas");
  expect_error(R"({"invert_sigmas": true})", "invert_sigmas");
  expect_error(R"({"stochastic_sampling": true})", "stochastic_sampling");
  expect_error(R"({"shift_terminal": 0.02})", "shift_terminal");
  expect_error(R"({"time_shift_type": "cosine"})", "time_shift_type");
  expect_error(R"({"shift": "3"})", "shift");
  expect_error(R"({"shift": -1})", "shift");
  expect_error(R"({"num_train_timesteps": 0})", "num_train_timesteps");
  expect_error(R"({"num_train_timesteps": 1.5})", "num_train_timesteps");
  expect_error(R"({"use_dynamic_shifting": 1})", "use_dynamic_shifting");
  expect_error(R"({"_class_name": "EulerDiscreteScheduler"})", "_class_name");
  expect_error(R"([1, 2])", "object");
  expect_error(R"({"shift": )", "JSON");

  SchedulerConfig c;
  c.use_karras_sigmas = true;
  try {
    c.validate();
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("use_karras_sigmas"), std::string::npos);
  }
}

TEST(Scheduler, SigmasAndTimestepsMatchFixturesExactly) {
  const SchedulerConfig cfg = turbo_config();
  for (const char* name : kCases) {
    SCOPED_TRACE(name);
    Fixture fx = load_case(name);
    const int steps = fx.meta.at("num_inference_steps").get<int>();
    const Schedule s = make_schedule(cfg, steps, image_seq_len(fx.meta));
    const std::vector<float> sig = floats(fx.st, "sigmas"), ts = floats(fx.st, "timesteps");
    ASSERT_EQ(s.sigmas.size(), sig.size());
    ASSERT_EQ(s.timesteps.size(), ts.size());
    ASSERT_EQ(s.steps(), steps);
    for (size_t i = 0; i < sig.size(); ++i) EXPECT_EQ(bits(s.sigmas[i]), bits(sig[i])) << "sigma " << i;
    for (size_t i = 0; i < ts.size(); ++i) EXPECT_EQ(bits(s.timesteps[i]), bits(ts[i])) << "timestep " << i;
    EXPECT_EQ(s.sigmas.back(), 0.0f);
    // The transformer's time input per step (batch of 1 or 2 identical values).
    for (int i = 0; i < steps; ++i) {
      const std::vector<float> t = floats(fx.st, "step" + std::to_string(i) + ".timestep");
      ASSERT_FALSE(t.empty());
      for (float v : t) EXPECT_EQ(bits(model_time(s, i)), bits(v)) << "step " << i;
    }
  }
}

TEST(Scheduler, SpecTableForEightSteps) {
  // Spec §4.4 table (N = 8, shift 3).
  const Schedule s = make_schedule(turbo_config(), 8, 4096);
  const double want[] = {1.0, 0.954545, 0.9, 0.833333, 0.75, 0.642857, 0.5, 0.3, 0.0};
  ASSERT_EQ(s.sigmas.size(), 9u);
  for (int i = 0; i < 9; ++i) EXPECT_NEAR(s.sigmas[size_t(i)], want[i], 1e-6) << i;
  EXPECT_EQ(s.timesteps[0], 1000.0f);
  EXPECT_EQ(model_time(s, 0), 0.0f);
  EXPECT_NEAR(model_time(s, 7), 0.7, 1e-6);
  EXPECT_THROW(model_time(s, 8), Error);
  EXPECT_THROW(make_schedule(turbo_config(), 0, 4096), Error);
  // One step: sigmas [1, 0].
  const Schedule one = make_schedule(turbo_config(), 1, 4096);
  ASSERT_EQ(one.sigmas.size(), 2u);
  EXPECT_EQ(one.sigmas[0], 1.0f);
  EXPECT_EQ(one.sigmas[1], 0.0f);
}

TEST(Scheduler, BitExactAgainstPyTorchNumPyForOtherStepCounts) {
  // σ bit patterns from the diffusers code path run with torch 2.15 (x86-64) and NumPy 2.4:
  // torch.linspace(1, 1/N, N).tolist() → np.float32 → shift → torch float32.
  struct Case {
    const char* mode;
    int steps;
    int64_t seq;
    std::vector<uint32_t> sig;
  };
  const std::vector<Case> cases = {
      {"static", 9, 4096, {0x3f800000, 0x3f75c290, 0x3f69bd39, 0x3f5b6db6, 0x3f4a1af3, 0x3f34b4b5, 0x3f199999, 0x3eec4ec6, 0x3e8ba2e9}},
      {"static", 28, 4096, {0x3f800000, 0x3f7ce0c7, 0x3f799998, 0x3f762763, 0x3f7286bc, 0x3f6eb3e4, 0x3f6aaaab,
                            0x3f666666, 0x3f61e1e1, 0x3f5d1744, 0x3f580001, 0x3f5294a4, 0x3f4ccccc, 0x3f469ee5,
                            0x3f400000, 0x3f38e38e, 0x3f313b14, 0x3f28f5c2, 0x3f200000, 0x3f1642c9, 0x3f0ba2ea,
                            0x3f000000, 0x3ee66667, 0x3eca1af1, 0x3eaaaaac, 0x3e878788, 0x3e400000, 0x3dccccce}},
      {"exp", 13, 1024, {0x3f800000, 0x3f751ef2, 0x3f69661c, 0x3f5cbb65, 0x3f4f0053, 0x3f401117, 0x3f2fc350,
                         0x3f1de476, 0x3f0a37cd, 0x3ee8e767, 0x3eb87bf2, 0x3e824dfb, 0x3e0a8b84}},
      {"linear", 7, 6000, {0x3f800000, 0x3f65f79b, 0x3f494ec3, 0x3f299a4c, 0x3f0656f3, 0x3ebdc494, 0x3e49c327}},
  };
  for (const Case& c : cases) {
    SchedulerConfig cfg = turbo_config();
    if (std::string(c.mode) != "static") {
      cfg.use_dynamic_shifting = true;
      cfg.time_shift_type = std::string(c.mode) == "exp" ? "exponential" : "linear";
    }
    const Schedule s = make_schedule(cfg, c.steps, c.seq);
    ASSERT_EQ(s.sigmas.size(), c.sig.size() + 1);
    for (size_t i = 0; i < c.sig.size(); ++i) {
      EXPECT_EQ(bits(s.sigmas[i]), c.sig[i]) << c.mode << " N=" << c.steps << " i=" << i;
      EXPECT_EQ(bits(s.timesteps[i]), bits(s.sigmas[i] * 1000.0f));
    }
  }
}

TEST(Scheduler, DynamicShifting) {
  SchedulerConfig c = turbo_config();
  c.use_dynamic_shifting = true;
  // calculate_shift: 0.5 at 256 tokens, 1.15 at 4096.
  EXPECT_NEAR(calculate_shift(256, c), 0.5, 1e-12);
  EXPECT_NEAR(calculate_shift(4096, c), 1.15, 1e-12);
  const Schedule s = make_schedule(c, 4, 4096);
  // σ' = e^μ / (e^μ + (1/s − 1)), s = 1, 0.75, 0.5, 0.25.
  const double e = std::exp(1.15);
  const double base[] = {1.0, 0.75, 0.5, 0.25};
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(s.sigmas[size_t(i)], e / (e + (1.0 / base[i] - 1.0)), 1e-6) << i;
  c.time_shift_type = "linear";
  const Schedule l = make_schedule(c, 4, 4096);
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(l.sigmas[size_t(i)], 1.15 / (1.15 + (1.0 / base[i] - 1.0)), 1e-6) << i;
}

TEST(Scheduler, CfgActive) {
  EXPECT_FALSE(cfg_active(0.0, 1.0, 0.0f));  // guidance 0: off
  EXPECT_TRUE(cfg_active(4.0, 1.0, 0.9f));
  EXPECT_TRUE(cfg_active(4.0, 0.3, 0.3f - 0.0001f));
  EXPECT_FALSE(cfg_active(4.0, 0.3, 0.33333f));  // truncated
  EXPECT_TRUE(cfg_active(4.0, 1.5, 0.99f));      // truncation > 1 disables the check
  // Compared in double: float(0.3) = 0.30000001 > 0.3 truncates, as in Python.
  EXPECT_FALSE(cfg_active(4.0, 0.3, 0.3f));
  EXPECT_TRUE(cfg_active(0.5, 1.0, 1.0f));  // diffusers: any g > 0 (not g > 1)
}

TEST(Scheduler, CombineAndNormalizeUnit) {
  const float pos[] = {1.0f, 2.0f, -1.0f}, neg[] = {0.5f, 2.5f, -1.0f};
  float out[3];
  cfg_combine(out, pos, neg, 3, 2.0f);
  EXPECT_EQ(out[0], 2.0f);   // 1 + 2·0.5
  EXPECT_EQ(out[1], 1.0f);   // 2 + 2·(−0.5)
  EXPECT_EQ(out[2], -1.0f);  // unchanged
  // Norm capped at r·‖pos‖.
  float pred[] = {3.0f, 4.0f};
  const float p[] = {0.6f, 0.8f};  // ‖p‖ = 1
  cfg_normalize(pred, p, 2, 2.0f);  // ‖pred‖ 5 > 2 → scaled to 2
  EXPECT_NEAR(std::hypot(pred[0], pred[1]), 2.0, 1e-6);
  EXPECT_NEAR(pred[0] / pred[1], 0.75, 1e-6);
  float keep[] = {0.3f, 0.4f};
  cfg_normalize(keep, p, 2, 1.0f);  // 0.5 < 1: unchanged
  EXPECT_EQ(keep[0], 0.3f);
  cfg_normalize(pred, p, 2, 0.0f);  // r = 0: off
  // In-place combine (out aliases pos).
  float a[] = {1.0f, 2.0f};
  const float b[] = {0.0f, 0.0f};
  cfg_combine(a, a, b, 2, 1.0f);
  EXPECT_EQ(a[0], 2.0f);
  EXPECT_EQ(a[1], 4.0f);
}

// Integrates each fixture with its recorded transformer outputs: every step's latents must
// be reproduced from the previous ones (bit-exact where no CFG norm is involved).
TEST(Scheduler, EulerIntegrationReproducesFixtures) {
  const SchedulerConfig cfg = turbo_config();
  for (const char* name : kCases) {
    SCOPED_TRACE(name);
    Fixture fx = load_case(name);
    const int steps = fx.meta.at("num_inference_steps").get<int>();
    const double g = fx.meta.at("guidance_scale").get<double>();
    const double trunc = fx.meta.at("cfg_truncation").get<double>();
    const auto& norm_j = fx.meta.at("cfg_normalization");
    const float r = norm_j.is_boolean() ? (norm_j.get<bool>() ? 1.0f : 0.0f) : norm_j.get<float>();
    const Schedule s = make_schedule(cfg, steps, image_seq_len(fx.meta));
    std::vector<float> lat = floats(fx.st, "init_latents");
    int cfg_steps = 0;
    for (int i = 0; i < steps; ++i) {
      const std::string p = "step" + std::to_string(i) + ".";
      // The transformer saw exactly the current latents.
      const std::vector<float> x0 = floats(fx.st, p + "x0");
      ASSERT_EQ(x0.size(), lat.size());
      EXPECT_EQ(std::memcmp(x0.data(), lat.data(), lat.size() * 4), 0) << "x0 at step " << i;

      const bool active = cfg_active(g, trunc, model_time(s, i));
      const bool has_neg = fx.st.find(p + "out1") != nullptr;
      EXPECT_EQ(active, has_neg) << "step " << i;
      std::vector<float> pred = floats(fx.st, p + "out0");
      ASSERT_EQ(pred.size(), lat.size());
      if (active) {
        ++cfg_steps;
        const std::vector<float> pos = pred, neg = floats(fx.st, p + "out1");
        cfg_combine(pred.data(), pos.data(), neg.data(), pred.size(), float(g));
        cfg_normalize(pred.data(), pos.data(), pred.size(), r);
      }
      euler_step(lat.data(), pred.data(), lat.size(), s.sigmas[size_t(i)], s.sigmas[size_t(i) + 1]);
      const std::vector<float> want = floats(fx.st, p + "latents_after");
      ASSERT_EQ(want.size(), lat.size());
      const double err = rel_l2(lat, want);
      EXPECT_LE(err, 1e-6) << "step " << i;
      if (!active) {
        EXPECT_EQ(std::memcmp(lat.data(), want.data(), lat.size() * 4), 0) << "step " << i << " not bit-exact";
      }
      lat = want;  // continue from the reference, so errors do not accumulate
    }
    // cfg: steps 3 and 4 are truncated (t > 0.3); the other cases have guidance 0.
    EXPECT_EQ(cfg_steps, std::string(name) == "cfg" ? 3 : 0);
  }
}
