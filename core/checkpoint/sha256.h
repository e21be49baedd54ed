// Why: every checkpoint file is listed in manifest.json with its SHA-256, so a flipped byte or a truncated file
// is caught (and named) before a single tensor is read, and anyone can check a checkpoint with `sha256sum`.
// The digest comes from OpenSSL's libcrypto (EVP), which uses the CPU's SHA instructions where there are any:
// hashing speed matters for 100+ GB checkpoints (measured in docs/performance.md). Torch-free.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>

struct evp_md_ctx_st;  // OpenSSL's EVP_MD_CTX; <openssl/evp.h> stays out of Keel's headers

namespace keel::checkpoint {

class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t size);
  void update(std::string_view bytes) { update(bytes.data(), bytes.size()); }
  // Lower-case hex digest (64 characters). The object must not be updated afterwards.
  std::string hex_digest();

 private:
  struct FreeContext {
    void operator()(evp_md_ctx_st* context) const;
  };
  std::unique_ptr<evp_md_ctx_st, FreeContext> context_;
};

std::string sha256_hex(std::string_view bytes);
// Streams the file; throws CheckpointError naming it if it cannot be read.
std::string sha256_file(const std::string& path);

}  // namespace keel::checkpoint
