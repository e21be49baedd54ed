// Why: helpers shared by the unit tests: one fresh temp directory per test (kept when a test fails, so it can be
// looked at) and the message of the DataError a call throws.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <string>

#include "core/config/config.h"

namespace keel::testing {

// A fresh, empty directory for the current test; removed after the run if every test passed.
std::string test_dir();
// The what() of the keel::data::DataError that `fn` throws, or "(no DataError)".
std::string data_error_of(const std::function<void()>& fn);
// The what() of the keel::checkpoint::CheckpointError that `fn` throws, or "(no CheckpointError)".
std::string checkpoint_error_of(const std::function<void()>& fn);
// The message of the exception `fn` throws (a c10::Error without its backtrace), or "(no exception)".
std::string error_of(const std::function<void()>& fn);
// max |actual - expected| / max |expected|, in fp64 on the CPU (the kernel tests' error measure).
double relative_error(const at::Tensor& actual, const at::Tensor& expected);
// A model small enough for exact unit tests: 2 layers, d_model 32, 4 heads (2 kv), SwiGLU 48, vocab 50.
ModelConfig small_model_config(int64_t seq_len);

}  // namespace keel::testing
