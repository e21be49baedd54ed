// Why: one exception type for every checkpoint problem (missing, corrupted, incompatible), so the CLI can report
// it as a user error with the file or field named, never as a crash. Torch-free.
#pragma once

#include <stdexcept>

namespace keel::checkpoint {

class CheckpointError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace keel::checkpoint
