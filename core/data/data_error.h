// Why: every problem with prepared data (a corrupt shard, data not prepared, a bad skip list, a ledger that does
// not match the shards) is reported as one exception type, so that the CLI can print it as a user error (no
// stack trace) and tests can assert on it. Messages always name the file, and the byte offset where relevant.
#pragma once

#include <stdexcept>
#include <string>

namespace keel::data {

class DataError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace keel::data
