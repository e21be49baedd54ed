// Why: two faults cannot be provoked from outside a process (a NaN in one rank's gradients, one rank's
// checkpoint write failing), so tests ask for them through this explicit seam of the Trainer. Nothing in the
// step reads the environment: the CLI turns the test-only variable KEEL_TEST_FAULT into a TestFault.
#pragma once

#include <cstdint>
#include <string>

namespace keel::train {

// A fault a test asks for (docs/testing.md), given to the Trainer explicitly; the CLI reads it from the
// test-only variable KEEL_TEST_FAULT="KIND:RANK:STEP". Kinds: "nan_grad" puts a NaN into that rank's gradients
// before the per-rank check; "save_fail" makes that rank's checkpoint write fail at that step.
struct TestFault {
  std::string kind;
  int64_t rank = -1, step = -1;
  bool at(const std::string& k, int64_t r, int64_t st) const { return kind == k && rank == r && step == st; }
};
// Parses "KIND:RANK:STEP"; an empty or malformed text gives no fault.
TestFault parse_test_fault(const char* spec);

}  // namespace keel::train
