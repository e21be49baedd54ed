// Why: a typo in an experiment config must stop the run before it starts, naming the file, line and key.
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>

#include "core/config/config.h"

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
  EXPECT_EQ(c.model.norm, "layernorm");
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
  EXPECT_EQ(tab.data.dir, "a\tb");
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
  const std::string message = error_of(
      [] { keel::parse_config_text("", "t.ini", {"train.micro_batch=4611686018427387904", "train.grad_accum=4"}); });
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
