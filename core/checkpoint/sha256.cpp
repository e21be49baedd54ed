// Why: see sha256.h. A thin wrapper over libcrypto's EVP digest interface (OpenSSL 3), so that the rest of Keel
// sees neither OpenSSL's headers nor its error queue.
#include "core/checkpoint/sha256.h"

#include <openssl/evp.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <vector>

#include "core/checkpoint/checkpoint_error.h"

namespace keel::checkpoint {
namespace {

void check(int ok, const char* call) {
  if (ok != 1) throw CheckpointError(std::string("sha256: OpenSSL ") + call + " failed");
}

}  // namespace

void Sha256::FreeContext::operator()(evp_md_ctx_st* context) const { EVP_MD_CTX_free(context); }

Sha256::Sha256() : context_(EVP_MD_CTX_new()) {
  if (!context_) throw CheckpointError("sha256: OpenSSL EVP_MD_CTX_new failed (out of memory)");
  check(EVP_DigestInit_ex(context_.get(), EVP_sha256(), nullptr), "EVP_DigestInit_ex(sha256)");
}

void Sha256::update(const void* data, size_t size) {
  if (size > 0) check(EVP_DigestUpdate(context_.get(), data, size), "EVP_DigestUpdate");
}

std::string Sha256::hex_digest() {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  check(EVP_DigestFinal_ex(context_.get(), digest, &length), "EVP_DigestFinal_ex");
  static const char* hex = "0123456789abcdef";
  std::string out;
  out.reserve(2 * length);
  for (unsigned int i = 0; i < length; ++i) {
    out.push_back(hex[digest[i] >> 4]);
    out.push_back(hex[digest[i] & 0xf]);
  }
  return out;
}

std::string sha256_hex(std::string_view bytes) {
  Sha256 h;
  h.update(bytes);
  return h.hex_digest();
}

std::string sha256_file(const std::string& path) {
  std::unique_ptr<FILE, int (*)(FILE*)> f(std::fopen(path.c_str(), "rb"), &std::fclose);
  if (!f) throw CheckpointError(path + ": cannot open for checksum: " + std::strerror(errno));
  Sha256 h;
  std::vector<char> buffer(1 << 20);
  size_t n = 0;
  while ((n = std::fread(buffer.data(), 1, buffer.size(), f.get())) > 0) h.update(buffer.data(), n);
  if (std::ferror(f.get())) throw CheckpointError(path + ": read error while computing its checksum");
  return h.hex_digest();
}

}  // namespace keel::checkpoint
