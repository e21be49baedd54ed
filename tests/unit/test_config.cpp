// Why: a typo in an experiment config must stop the run before it starts, naming the file, line and key; so must a
// key written twice, and a model too large for the machine (whose parameter count must match the real model's).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <filesystem>
#include <fstream>

#include "core/config/config.h"
#include "core/config/memory_estimate.h"
#include "core/model/llama.h"

namespace {

std::string write_ini(const std::string& name, const std::string& text) {
  const auto dir = std::filesystem::temp_directory_path() / "keel-config-test";
  std::filesystem::create_directories(dir);
  const std::string path = (dir / name).string();
  std::ofstream(path) << text;
  return path;
}

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const keel::ConfigError& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(Config, ParsesSectionsSourcesAndOverrides) {
  const std::string path = write_ini("ok.ini",
                                     "# comment\n[model]\nlayers = 3  # trailing comment\nnorm = layernorm\n"
                                     "[data]\nschedule = 0:a=1,b=0;10:a=0.5,b=0.5\n"
                                     "[source.a]\ninputs = /x, /y\nsplit = fortune\n[source.b]\ninputs = /z\n");
  keel::Config c = keel::load_config(path, {"train.steps=7", "model.layers=4"});
  EXPECT_EQ(c.model.layers, 4);
  EXPECT_EQ(c.model.norm, keel::NormKind::kLayerNorm);
  EXPECT_EQ(c.train.steps, 7);
  EXPECT_EQ(c.data.schedule, "0:a=1,b=0;10:a=0.5,b=0.5");
  ASSERT_EQ(c.data.sources.size(), 2u);
  EXPECT_EQ(c.data.sources[0].inputs, (std::vector<std::string>{"/x", "/y"}));
  EXPECT_EQ(c.data.sources[0].split, "fortune");
}

TEST(Config, ResolvedIniRoundTrips) {
  const std::string path = write_ini("rt.ini", "[model]\nlayers = 5\n[source.p]\ninputs = /a,/b\nmax_mb = 1.5\n");
  keel::Config c = keel::load_config(path, {"optim.lr=0.00123"});
  const std::string again = write_ini("rt2.ini", keel::to_ini(c));
  keel::Config d = keel::load_config(again);
  EXPECT_EQ(keel::flatten(c), keel::flatten(d));
}

TEST(Config, UnknownKeyNamesFileLineAndKey) {
  const std::string path = write_ini("unknown.ini", "[model]\nlayers = 2\nlayerz = 3\n");
  const std::string message = error_of([&] { keel::load_config(path); });
  EXPECT_NE(message.find("unknown.ini:3"), std::string::npos) << message;
  EXPECT_NE(message.find("model.layerz"), std::string::npos) << message;
}

TEST(Config, BadValuesNameTheKey) {
  const std::string path = write_ini("bad.ini", "[model]\nlayers = two\n");
  std::string message = error_of([&] { keel::load_config(path); });
  EXPECT_NE(message.find("bad.ini:2"), std::string::npos) << message;
  EXPECT_NE(message.find("model.layers"), std::string::npos) << message;
  EXPECT_NE(message.find("'two'"), std::string::npos) << message;

  const std::string ok = write_ini("ok2.ini", "");
  message = error_of([&] { keel::load_config(ok, {"train.precision=fp16"}); });
  EXPECT_NE(message.find("train.precision"), std::string::npos) << message;
  message = error_of([&] { keel::load_config(ok, {"optim.lr=abc"}); });
  EXPECT_NE(message.find("optim.lr"), std::string::npos) << message;
  message = error_of([&] { keel::load_config(ok, {"no-equals-sign"}); });
  EXPECT_NE(message.find("key=value"), std::string::npos) << message;
  message = error_of([&] { keel::load_config(ok, {"model.heads=3"}); });  // 64 % 3 != 0
  EXPECT_NE(message.find("model.heads"), std::string::npos) << message;
  message = error_of([&] { keel::load_config(ok, {"source.x.colour=red"}); });
  EXPECT_NE(message.find("source.x.colour"), std::string::npos) << message;
}

// Device, precision, norm and pipeline schedule are enums once parsed, but every config file, `--set` and
// config.ini Keel writes keeps the strings: each spelling reads to its enum and writes back unchanged.
TEST(Config, EnumKeysReadAndWriteTheirStrings) {
  const std::vector<std::pair<std::string, std::vector<std::string>>> keys = {
      {"train.device", {"cpu", "cuda"}},
      {"train.precision", {"fp32", "bf16-mixed"}},
      {"model.norm", {"rmsnorm", "layernorm"}},
      {"parallel.schedule", {"1f1b", "gpipe"}}};
  for (const auto& [key, spellings] : keys) {
    for (const auto& spelling : spellings) {
      keel::Config c;
      keel::apply_override(c, key + "=" + spelling);
      const auto flat = keel::flatten(c);
      const auto it = std::find_if(flat.begin(), flat.end(), [&](const auto& kv) { return kv.first == key; });
      ASSERT_NE(it, flat.end()) << key;
      EXPECT_EQ(it->second, spelling) << key;
      // Written into a config.ini and read back: the same value.
      const auto back = keel::flatten(keel::parse_config_text(keel::to_ini(c), "back.ini"));
      const auto again = std::find_if(back.begin(), back.end(), [&](const auto& kv) { return kv.first == key; });
      ASSERT_NE(again, back.end()) << key;
      EXPECT_EQ(again->second, spelling) << key;
    }
  }
  keel::Config c;
  keel::apply_override(c, "train.device=cuda");
  keel::apply_override(c, "train.precision=fp32");
  keel::apply_override(c, "model.norm=layernorm");
  keel::apply_override(c, "parallel.schedule=gpipe");
  EXPECT_EQ(c.train.device, keel::Device::kCuda);
  EXPECT_EQ(c.train.precision, keel::Precision::kFp32);
  EXPECT_EQ(c.model.norm, keel::NormKind::kLayerNorm);
  EXPECT_EQ(c.parallel.schedule, keel::PipelineSchedule::kGPipe);
  EXPECT_EQ(keel::name_of(keel::Device::kCpu), "cpu");
  EXPECT_EQ(keel::name_of(keel::Precision::kBf16Mixed), "bf16-mixed");
  EXPECT_EQ(keel::name_of(keel::NormKind::kRmsNorm), "rmsnorm");
  EXPECT_EQ(keel::name_of(keel::PipelineSchedule::kOneFOneB), "1f1b");
  // A bad spelling is refused with the same message the string keys gave.
  EXPECT_EQ(error_of([&] { keel::apply_override(c, "train.device=tpu"); }),
            "--set train.device: train.device: expected one of cpu | cuda, got 'tpu'");
  EXPECT_EQ(error_of([&] { keel::apply_override(c, "parallel.schedule=interleaved"); }),
            "--set parallel.schedule: parallel.schedule: expected one of 1f1b | gpipe, got 'interleaved'");
}

TEST(Config, MissingFileIsNamed) {
  const std::string message = error_of([] { keel::load_config("/nonexistent/keel.ini"); });
  EXPECT_NE(message.find("/nonexistent/keel.ini"), std::string::npos) << message;
}

TEST(Config, BundledExperimentConfigsLoad) {
  for (const char* name : {"tiny.ini", "small.ini"}) {
    keel::Config c = keel::load_config(std::string(KEEL_SOURCE_DIR) + "/experiments/" + name);
    EXPECT_EQ(c.data.sources.size(), 2u) << name;
  }
}

TEST(Config, ParsesTextInMemoryLikeAFile) {
  keel::Config c = keel::parse_config_text("[model]\nlayers = 3\n", "inline.ini", {"train.steps=9"});
  EXPECT_EQ(c.model.layers, 3);
  EXPECT_EQ(c.train.steps, 9);
  EXPECT_EQ(c.source_file, "inline.ini");
  const std::string message = error_of([] { keel::parse_config_text("[model]\n\nlayerz = 3\n", "inline.ini"); });
  EXPECT_NE(message.find("inline.ini:3"), std::string::npos) << message;
}

TEST(Config, DirectoryIsNotAnEmptyConfig) {
  const auto dir = std::filesystem::temp_directory_path() / "keel-config-test";
  std::filesystem::create_directories(dir);
  const std::string message = error_of([&] { keel::load_config(dir.string()); });
  EXPECT_NE(message.find("is a directory"), std::string::npos) << message;
}

// Found by tests/fuzz/fuzz_config: values the resolved INI (to_ini) could not carry back unchanged.
TEST(Config, RefusesValuesThatCannotRoundTrip) {
  for (const char* bad : {"data.dir=runs#3", "data.dir=a\nb", "data.mixture=a=1\rb=2", "model.norm=rms\x7f"}) {
    const std::string message = error_of([&] { keel::parse_config_text("", "t.ini", {bad}); });
    EXPECT_NE(message.find("cannot contain '#' or control characters"), std::string::npos) << message;
  }
  keel::Config tab = keel::parse_config_text("[data]\ndir = a\tb\n", "t.ini");
  EXPECT_EQ(tab.data.dir, (std::filesystem::current_path() / "a\tb").string());
}

TEST(Config, SeedsAreUnsigned64BitAndRoundTrip) {
  std::string message = error_of([] { keel::parse_config_text("[data]\nseed = -2\n", "t.ini"); });
  EXPECT_NE(message.find("data.seed"), std::string::npos) << message;
  message = error_of([] { keel::parse_config_text("", "t.ini", {"train.seed=18446744073709551616"}); });
  EXPECT_NE(message.find("train.seed"), std::string::npos) << message;
  keel::Config c = keel::parse_config_text("[data]\nseed = 18446744073709551615\n", "t.ini");
  EXPECT_EQ(c.data.seed, 18446744073709551615ull);
  EXPECT_EQ(keel::flatten(keel::parse_config_text(keel::to_ini(c), "again.ini")), keel::flatten(c));
}

TEST(Config, TokensPerStepMustFitIn64Bits) {
  const std::string message = error_of([] {
    keel::parse_config_text("", "t.ini", {"train.micro_batch=4611686018427387904", "train.grad_accum=4"});
  });
  EXPECT_NE(message.find("tokens per step"), std::string::npos) << message;
}

// A subnormal value (1e-310) is what format_double writes for it, and it must read back (std::stod threw on it).
TEST(Config, SubnormalAndHugeValuesRoundTripOrAreRefused) {
  keel::Config c = keel::parse_config_text("[model]\nz_loss = 1e-310\n", "t.ini");
  EXPECT_EQ(c.model.z_loss, 1e-310);
  c.optim.eps = 4.9406564584124654e-324;  // the smallest subnormal, set in code rather than parsed
  EXPECT_EQ(keel::flatten(keel::parse_config_text(keel::to_ini(c), "again.ini")), keel::flatten(c));
  const std::string message = error_of([] { keel::parse_config_text("[optim]\nlr = 1e999\n", "t.ini"); });
  EXPECT_NE(message.find("optim.lr: expected a finite number"), std::string::npos) << message;
}

TEST(Config, RepeatedKeyOrSectionNamesBothLines) {
  std::string message =
      error_of([] { keel::parse_config_text("[optim]\nlr = 1e-3\n\nwarmup_steps = 5\nlr = 2e-3\n", "x.ini"); });
  EXPECT_EQ(message, "x.ini:5: key optim.lr is already set on line 2");
  message = error_of(
      [] { keel::parse_config_text("[optim]\nlr = 1e-3\n[model]\nlayers = 2\n[optim]\neps = 1e-6\n", "x.ini"); });
  EXPECT_EQ(message, "x.ini:5: section [optim] already appears on line 1");
  // The same key spelled through another section header is the same key.
  message = error_of([] { keel::parse_config_text("[source.a]\ninputs = /x\n[source]\na.inputs = /y\n", "x.ini"); });
  EXPECT_EQ(message, "x.ini:4: key source.a.inputs is already set on line 2");
  message = error_of(
      [] { keel::parse_config_text("[source.a]\ninputs = /x\n[source.b]\ninputs = /y\n[source.a]\n", "x.ini"); });
  EXPECT_EQ(message, "x.ini:5: section [source.a] already appears on line 1");
  // Different sources and plugins are different sections; overrides may repeat a file's key, the last one wins.
  const keel::Config c = keel::parse_config_text(
      "[source.a]\ninputs = /x\n[source.b]\ninputs = /y\n[plugin.p]\nk = 1\n[plugin.q]\nk = 2\n[optim]\nlr = 1e-3\n",
      "x.ini", {"optim.lr=2e-3", "optim.lr=3e-3"});
  EXPECT_EQ(c.data.sources.size(), 2u);
  EXPECT_EQ(c.plugin_args.size(), 2u);
  EXPECT_EQ(c.optim.lr, 3e-3);
}

TEST(Config, RelativePathsResolveAgainstTheConfigFileOrTheCurrentDirectory) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / "keel-config-test" / "nested";
  fs::create_directories(dir);
  const std::string path = (dir / "rel.ini").string();
  std::ofstream(path) << "[data]\ndir = ./corpus/../data/\n[source.a]\ninputs = raw/*.txt, /abs/b.txt\n";
  keel::Config c = keel::load_config(path);
  EXPECT_EQ(c.data.dir, (fs::weakly_canonical(dir) / "data").string());
  EXPECT_EQ(c.data.sources[0].inputs,
            (std::vector<std::string>{(fs::weakly_canonical(dir) / "raw/*.txt").string(), "/abs/b.txt"}));
  // --set is typed in the current directory.
  c = keel::load_config(path, {"data.dir=mine", "source.a.inputs=in.txt"});
  EXPECT_EQ(c.data.dir, (fs::current_path() / "mine").string());
  EXPECT_EQ(c.data.sources[0].inputs, (std::vector<std::string>{(fs::current_path() / "in.txt").string()}));
  // A config without data.dir: the default, next to the file.
  std::ofstream(dir / "default.ini") << "[model]\nlayers = 2\n";
  EXPECT_EQ(keel::load_config((dir / "default.ini").string()).data.dir,
            (fs::weakly_canonical(dir) / "data/bundled").string());
  // The resolved config.ini of a run keeps absolute paths; an old one (relative paths, written when they meant
  // the current directory) still resolves against the current directory.
  const std::string resolved = (dir / "config.ini").string();
  std::ofstream(resolved) << keel::to_ini(keel::load_config(path));
  EXPECT_EQ(keel::load_config(resolved).data.dir, (fs::weakly_canonical(dir) / "data").string());
  std::string old_text = keel::to_ini(keel::parse_config_text("", "t.ini"));
  old_text.replace(old_text.find((fs::current_path() / "data/bundled").string()),
                   (fs::current_path() / "data/bundled").string().size(), "data/bundled");
  std::ofstream(resolved) << old_text;
  EXPECT_EQ(keel::load_config(resolved).data.dir, (fs::current_path() / "data/bundled").string());
  EXPECT_NE(error_of([] { keel::parse_config_text("[data]\ndir =\n", "t.ini"); }).find("data.dir must not be empty"),
            std::string::npos);
  // A directory whose name holds '#' cannot be written back into config.ini: refused, naming the key.
  const fs::path hashed = dir / "a#b";
  fs::create_directories(hashed);
  std::ofstream(hashed / "h.ini") << "[data]\ndir = d\n";
  EXPECT_NE(error_of([&] { keel::load_config((hashed / "h.ini").string()); }).find("data.dir: 'd' resolves to "),
            std::string::npos);
}

TEST(Config, NonsensicalSizesAreRefusedAtLoad) {
  for (const char* bad :
       {"model.layers=0", "model.layers=-3", "model.d_model=0", "model.heads=0", "model.heads=3", "model.kv_heads=3",
        "model.ffn_hidden=0", "model.vocab=8", "model.seq_len=1", "data.tokenizer_sample_mb=0"}) {
    const std::string message = error_of([&] { keel::parse_config_text("", "t.ini", {bad}); });
    const std::string key = std::string(bad).substr(0, std::string(bad).find('='));
    EXPECT_NE(message.find(key), std::string::npos) << bad << ": " << message;
  }
}

// Hand-counted: the default model (L 2, C 64, H 4, K 4, F 176, V 2048, rmsnorm, untied).
//   embedding 2048*64 = 131072, head 131072, final norm 64;
//   per block: wq 64*64 + wk 64*64 + wv 64*64 + wo 64*64 = 16384, SwiGLU 3*64*176 = 33792, norms 2*64 = 128.
TEST(MemoryEstimate, CountsParametersByHand) {
  keel::ModelConfig m;
  EXPECT_EQ(keel::count_parameters(m), 131072.0 + 131072.0 + 64.0 + 2 * (16384.0 + 33792.0 + 128.0));
  m.kv_heads = 1;  // GQA: wk, wv [16, 64]
  m.tie_embeddings = true;
  m.qk_norm = true;                     // q_norm, k_norm [16] per block
  m.norm = keel::NormKind::kLayerNorm;  // weight and bias
  EXPECT_EQ(keel::count_parameters(m), 131072.0 + 128.0 + 2 * (64.0 * 64 * 2 + 2 * 64.0 * 16 + 33792.0 + 256.0 + 32.0));
}

TEST(MemoryEstimate, CountMatchesTheRealModel) {
  keel::ModelConfig a;
  keel::ModelConfig b;
  b.layers = 3;
  b.d_model = 96;
  b.heads = 6;
  b.kv_heads = 2;
  b.ffn_hidden = 200;
  b.vocab = 500;
  b.qk_norm = true;
  b.norm = keel::NormKind::kLayerNorm;
  keel::ModelConfig c = b;
  c.tie_embeddings = true;
  c.norm = keel::NormKind::kRmsNorm;
  for (const auto& m : {a, b, c}) {
    keel::model::Llama model(m);
    EXPECT_EQ(keel::count_parameters(m), static_cast<double>(model->num_parameters())) << m.layers << " " << m.d_model;
  }
  // Two pipeline stages: a rank holds the larger one.
  keel::Config config;
  config.model = b;
  config.model.layers = 4;
  config.parallel.pp = 2;
  keel::model::Llama first(config.model, keel::parallel::TensorParallel{}, keel::model::StageSpec{0, 2, true, false});
  keel::model::Llama last(config.model, keel::parallel::TensorParallel{}, keel::model::StageSpec{2, 2, false, true});
  EXPECT_EQ(keel::estimate_memory(config).rank_parameters,
            static_cast<double>(std::max(first->num_parameters(), last->num_parameters())));
}

TEST(MemoryEstimate, BytesPerRankAndRefusal) {
  keel::Config c;  // bf16-mixed, AdamW
  const double p = keel::count_parameters(c.model);
  const double rope = 2.0 * 64 * 8 * 4;  // cos and sin, [seq_len, head_dim / 2] fp32
  EXPECT_EQ(keel::estimate_memory(c).rank_bytes, p * 18 + rope);
  c.train.precision = keel::Precision::kFp32;
  EXPECT_EQ(keel::estimate_memory(c).rank_bytes, p * 16 + rope);
  c.plugins.optimizer = "lion";
  EXPECT_EQ(keel::estimate_memory(c).rank_bytes, p * 12 + rope);
  c.plugins.optimizer = "adamw";
  c.parallel.dp = 4;
  c.train.grad_accum = 4;
  c.parallel.zero = 1;  // the two moments split over 4 DP ranks
  EXPECT_EQ(keel::estimate_memory(c).rank_bytes, p * 10 + rope);

  keel::Config big = keel::parse_config_text("", "big.ini", {"model.layers=100000"});
  const keel::MemoryBudget ram{24.0 * 1024 * 1024 * 1024, "RAM (MemTotal in /proc/meminfo)", 1};
  const std::string message = error_of([&] { keel::check_memory_fits(big, ram); });
  EXPECT_EQ(message.rfind("big.ini: model.layers=100000 model.d_model=64", 0), 0u) << message;
  EXPECT_NE(message.find("5.03B parameters, an estimated 84.3 GiB"), std::string::npos) << message;
  EXPECT_NE(message.find("more than the 24.0 GiB of RAM"), std::string::npos) << message;
  EXPECT_EQ(message.find('\n'), std::string::npos) << message;
  // Ranks on one machine add up: the tiny model fits once, not 10^6 times.
  keel::Config tiny;
  EXPECT_EQ(error_of([&] { keel::check_memory_fits(tiny, ram); }), "");
  const keel::MemoryBudget crowded{ram.bytes, ram.what, 1000000};
  EXPECT_NE(error_of([&] { keel::check_memory_fits(tiny, crowded); }).find("1000000 ranks x"), std::string::npos);
}

// Every shipped config fits the machine it is meant for: CPU configs in this 24 GiB development machine's RAM,
// the bench/gpu configs in one 139 GiB GPU.
TEST(MemoryEstimate, ShippedConfigsFit) {
  const keel::MemoryBudget ram{24.0 * 1024 * 1024 * 1024, "RAM", 1}, gpu{139.0 * 1024 * 1024 * 1024, "GPU", 1};
  for (const char* name : {"experiments/tiny.ini", "experiments/small.ini", "experiments/datamix-ab/datamix.ini",
                           "experiments/datamix-ab/datamix-tiny.ini", "experiments/k2-spike-resume/k2.ini",
                           "experiments/k2-spike-resume/k2-tiny.ini"}) {
    const keel::Config c = keel::load_config(std::string(KEEL_SOURCE_DIR) + "/" + name);
    EXPECT_EQ(error_of([&] { keel::check_memory_fits(c, ram); }), "") << name;
  }
  for (const char* name : {"bench/gpu/llama-134m.ini", "bench/gpu/llama-953m.ini"}) {
    const keel::Config c = keel::load_config(std::string(KEEL_SOURCE_DIR) + "/" + name);
    EXPECT_EQ(error_of([&] { keel::check_memory_fits(c, gpu); }), "") << name;
  }
}
