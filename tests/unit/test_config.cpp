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
