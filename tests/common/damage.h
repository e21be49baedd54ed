// Why: several tests damage checkpoint files on purpose (bit rot, a byte flipped in transit) and check that it
// is caught and named. One helper, shared by the unit and integration tests.
#pragma once

#include <fstream>
#include <string>

namespace keel::testing {

// XORs the byte at `offset` of `path` with `mask` (in place).
inline void flip_byte(const std::string& path, std::streamoff offset, char mask = 0x40) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(offset);
  char c = 0;
  f.get(c);
  f.seekp(offset);
  f.put(static_cast<char>(c ^ mask));
}

}  // namespace keel::testing
