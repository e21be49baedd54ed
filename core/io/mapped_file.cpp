// Why: see mapped_file.h.
#include "core/io/mapped_file.h"

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "core/io/file.h"
#include "core/io/regular_file.h"

namespace keel::io {
namespace {

// open_regular_file's errors are "PATH: REASON"; FileError keeps the two apart.
struct OpenError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace

MappedFile::MappedFile(const std::string& path, const std::string& noun) {
  struct stat st {};
  int fd = -1;
  try {
    fd = open_regular_file<OpenError>(path, st, noun);
  } catch (const OpenError& e) {
    std::string reason = e.what();
    if (reason.rfind(path + ": ", 0) == 0) reason = reason.substr(path.size() + 2);
    // open_regular_file says "cannot open: ERRNO"; name what could not be opened.
    if (reason.rfind("cannot open: ", 0) == 0) reason = "cannot open " + noun + reason.substr(11);
    if (reason.rfind("cannot stat: ", 0) == 0) reason = "cannot stat " + noun + reason.substr(11);
    throw FileError(path, reason);
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ > 0) {
    void* map = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    const int map_error = errno;
    ::close(fd);
    if (map == MAP_FAILED) {
      size_ = 0;
      throw FileError(path, "cannot mmap " + noun + ": " + std::strerror(map_error));
    }
    data_ = static_cast<const unsigned char*>(map);
  } else {
    ::close(fd);
  }
}

MappedFile::~MappedFile() { reset(); }

MappedFile::MappedFile(MappedFile&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}

MappedFile& MappedFile::operator=(MappedFile&& other) noexcept {
  if (this != &other) {
    reset();
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

void MappedFile::reset() {
  if (data_ != nullptr) ::munmap(const_cast<unsigned char*>(data_), size_);
  data_ = nullptr;
  size_ = 0;
}

}  // namespace keel::io
