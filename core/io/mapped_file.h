// Why: token shards (core/data/shard.*) and pre-tokenized corpora (core/data/pretokenized.*) are read in place,
// never copied: a 100 GB corpus costs page cache, not process memory. This is the one owner of such a read-only
// mapping — opened without blocking on a FIFO (regular_file.h), unmapped exactly once, movable, not copyable.
// Torch-free, so the data fuzzers link it alone.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace keel::io {

class MappedFile {
 public:
  MappedFile() = default;
  // Maps the whole regular file PATH read-only (an empty file maps to nothing: data() is nullptr, size() 0).
  // Throws FileError(PATH, reason) with reason "is a FIFO, not NOUN" (or a directory, ...), "cannot open NOUN:
  // ERRNO", "cannot stat NOUN: ERRNO" or "cannot mmap NOUN: ERRNO"; `noun` names what the caller expected.
  MappedFile(const std::string& path, const std::string& noun);
  ~MappedFile();
  MappedFile(MappedFile&& other) noexcept;
  MappedFile& operator=(MappedFile&& other) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const unsigned char* data() const { return data_; }
  int64_t size() const { return static_cast<int64_t>(size_); }
  // Unmaps now (also done by the destructor); data() is nullptr afterwards.
  void reset();

 private:
  const unsigned char* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace keel::io
