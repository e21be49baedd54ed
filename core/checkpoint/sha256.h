// Why: every checkpoint file is listed in manifest.json with its SHA-256, so a flipped byte or a truncated file
// is caught (and named) before a single tensor is read, and anyone can check a checkpoint with `sha256sum`.
// A small FIPS 180-4 implementation keeps Keel free of an OpenSSL dependency. Torch-free.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace keel::checkpoint {

class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t size);
  void update(std::string_view bytes) { update(bytes.data(), bytes.size()); }
  // Lower-case hex digest (64 characters). The object must not be updated afterwards.
  std::string hex_digest();

 private:
  void compress(const uint8_t* block);
  std::array<uint32_t, 8> state_;
  std::array<uint8_t, 64> buffer_{};
  size_t buffered_ = 0;
  uint64_t total_bytes_ = 0;
};

std::string sha256_hex(std::string_view bytes);
// Streams the file; throws CheckpointError naming it if it cannot be read.
std::string sha256_file(const std::string& path);

}  // namespace keel::checkpoint
