// Why: see test_support.h.
#include "test_support.h"

#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <filesystem>
#include <vector>

#include "core/checkpoint/checkpoint_error.h"
#include "core/data/data_error.h"

namespace keel::testing {
namespace {

namespace fs = std::filesystem;

class RemoveTempDirs : public ::testing::Environment {
 public:
  static std::vector<std::string>& dirs() {
    static std::vector<std::string> d;
    return d;
  }
  void TearDown() override {
    if (!::testing::UnitTest::GetInstance()->Passed()) return;
    for (const auto& d : dirs()) fs::remove_all(d);
  }
};
[[maybe_unused]] ::testing::Environment* const kRemoveTempDirs =
    ::testing::AddGlobalTestEnvironment(new RemoveTempDirs);

}  // namespace

std::string test_dir() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  const fs::path dir = fs::temp_directory_path() / ("keel-" + std::string(info->test_suite_name()) + "-" +
                                                    info->name() + "-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  RemoveTempDirs::dirs().push_back(dir.string());
  return dir.string();
}

std::string data_error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const keel::data::DataError& e) {
    return e.what();
  }
  return "(no DataError)";
}

std::string checkpoint_error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const keel::checkpoint::CheckpointError& e) {
    return e.what();
  }
  return "(no CheckpointError)";
}

ModelConfig small_model_config(int64_t seq_len) {
  ModelConfig c;
  c.layers = 2;
  c.d_model = 32;
  c.heads = 4;
  c.kv_heads = 2;
  c.ffn_hidden = 48;
  c.vocab = 50;
  c.seq_len = seq_len;
  return c;
}

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no exception)";
}

double relative_error(const at::Tensor& actual, const at::Tensor& expected) {
  const at::Tensor a = actual.to(torch::kCPU).to(torch::kDouble);
  const at::Tensor e = expected.to(torch::kCPU).to(torch::kDouble);
  const double scale = std::max(e.abs().max().item<double>(), 1e-30);
  return (a - e).abs().max().item<double>() / scale;
}

}  // namespace keel::testing
