// Why: checkpoint files are hashed in full when written and verified when read, so SHA-256 speed bounds how fast
// a 100+ GB checkpoint can be saved and resumed. This hashes one buffer in memory and one file through
// keel::checkpoint's API and prints GiB/s; bench/sha256.sh builds it against the OpenSSL implementation and
// against the hand-written one Keel had before, side by side. A benchmark, not a test.
// usage: sha256_speed GIB FILE   (writes FILE of GIB GiB first, hashes the buffer, then the file)
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "core/checkpoint/sha256.h"

namespace {

template <typename F>
double seconds_of(F&& f) {
  const auto start = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: sha256_speed GIB FILE\n");
    return 1;
  }
  const double gib = std::atof(argv[1]);
  const std::string path = argv[2];
  if (gib <= 0) {
    std::fprintf(stderr, "sha256_speed: GIB must be a positive number, not '%s'\n", argv[1]);
    return 1;
  }
  std::vector<char> buffer(static_cast<size_t>(gib * (1 << 30)));  // [bytes], a fixed non-constant pattern
  for (size_t i = 0; i < buffer.size(); ++i) buffer[i] = static_cast<char>((i * 2654435761u) >> 13);
  {
    std::ofstream out(path, std::ios::binary);
    if (!out.write(buffer.data(), static_cast<std::streamsize>(buffer.size()))) {
      std::fprintf(stderr, "sha256_speed: cannot write %s\n", path.c_str());
      return 1;
    }
  }
  std::string memory_digest, file_digest;
  const double memory_s = seconds_of([&] {
    keel::checkpoint::Sha256 h;
    h.update(buffer.data(), buffer.size());
    memory_digest = h.hex_digest();
  });
  const double file_s = seconds_of([&] { file_digest = keel::checkpoint::sha256_file(path); });
  if (memory_digest != file_digest) {
    std::fprintf(stderr, "sha256_speed: memory and file digests differ\n");
    return 1;
  }
  std::printf("digest=%s\nmemory_gib_per_s=%.3f\nfile_gib_per_s=%.3f\n", memory_digest.c_str(), gib / memory_s,
              gib / file_s);
  return 0;
}
