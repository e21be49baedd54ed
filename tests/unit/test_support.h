// Why: helpers shared by the unit tests: one fresh temp directory per test (kept when a test fails, so it can be
// looked at) and the message of the DataError a call throws.
#pragma once

#include <functional>
#include <string>

namespace keel::testing {

// A fresh, empty directory for the current test; removed after the run if every test passed.
std::string test_dir();
// The what() of the keel::data::DataError that `fn` throws, or "(no DataError)".
std::string data_error_of(const std::function<void()>& fn);
// The what() of the keel::checkpoint::CheckpointError that `fn` throws, or "(no CheckpointError)".
std::string checkpoint_error_of(const std::function<void()>& fn);

}  // namespace keel::testing
