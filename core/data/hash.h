// Why: the data order must be bit-identical on every machine, compiler and standard library, forever (a run
// resumed in two years must see the same batches). std:: distributions and std::hash are not portable, so the
// few primitives the data pipeline needs (a 64-bit mixer, a seeded generator, an unbiased bounded integer, a
// unit double, a string hash) are written out here. All are header-only and constexpr-friendly.
#pragma once

#include <cstdint>
#include <string_view>

namespace keel::data {

// The splitmix64 finalizer: a bijective 64-bit mixer (Steele, Lea & Flood 2014).
inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Combine two 64-bit values into one well-mixed value (order matters).
inline uint64_t hash_combine(uint64_t a, uint64_t b) {
  return mix64(a ^ (mix64(b) + 0x9e3779b97f4a7c15ULL + (a << 6) + (a >> 2)));
}

// FNV-1a over bytes: names of sources, fingerprints of settings.
inline uint64_t fnv1a64(std::string_view bytes, uint64_t h = 0xcbf29ce484222325ULL) {
  for (unsigned char c : bytes) {
    h ^= c;
    h *= 0x100000001b3ULL;
  }
  return h;
}

// Sequential splitmix64 generator.
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  uint64_t next() {
    state_ += 0x9e3779b97f4a7c15ULL;
    return mix64(state_);
  }

 private:
  uint64_t state_;
};

// Map a 64-bit random value to [0, n) (Lemire's multiply-shift; bias < n / 2^64, negligible).
inline uint64_t bounded(uint64_t r, uint64_t n) {
  return static_cast<uint64_t>((static_cast<unsigned __int128>(r) * n) >> 64);
}

// Map a 64-bit random value to a double in [0, 1) with 53 random bits.
inline double unit_double(uint64_t r) { return static_cast<double>(r >> 11) * 0x1.0p-53; }

}  // namespace keel::data
