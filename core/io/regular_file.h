// Why: every file Keel reads from a place a user controls (shards, prepared.json, a tokenizer model, raw corpus
// inputs, an HF directory's config.json and safetensors) may turn out to be a FIFO, a directory or a device. A
// plain open() of a FIFO blocks until a writer appears (forever), and a directory only fails later with a
// puzzling errno ("cannot mmap shard: No such device"). These helpers open without blocking and look at what the
// path is before a byte is read, so the user gets one line naming the path and what it is instead.
// Header-only and torch-free: the data fuzzers and the safetensors reader use it without linking keel_core.
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace keel::io {

// "a FIFO", "a directory", ... for a mode that is not a regular file; "" for a regular file.
inline std::string non_regular_kind(mode_t mode) {
  if (S_ISREG(mode)) return "";
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISSOCK(mode)) return "a socket";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  return "not a plain file";
}

// "PATH: is a FIFO, not a regular file" when PATH (symlinks followed) exists and is not a regular file; "" when it
// is one or does not exist (the caller's own open reports a missing file). `noun` names what was expected.
inline std::string non_regular_error(const std::string& path, const std::string& noun = "a regular file") {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return "";
  const std::string kind = non_regular_kind(st.st_mode);
  return kind.empty() ? "" : path + ": is " + kind + ", not " + noun;
}

// Throws Error(non_regular_error(...)) when PATH exists and is not a regular file.
template <typename Error>
void require_regular_file(const std::string& path, const std::string& noun = "a regular file") {
  const std::string message = non_regular_error(path, noun);
  if (!message.empty()) throw Error(message);
}

// Opens PATH read-only without ever blocking (O_NONBLOCK, cleared again for a regular file) and returns the fd of a
// regular file. Throws Error "PATH: cannot open: ERRNO" or "PATH: is a FIFO, not NOUN". `st` receives fstat's result.
template <typename Error>
int open_regular_file(const std::string& path, struct stat& st, const std::string& noun = "a regular file") {
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    require_regular_file<Error>(path, noun);  // a socket cannot be opened at all (ENXIO): say what it is
    throw Error(path + ": cannot open: " + std::strerror(err));
  }
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    throw Error(path + ": cannot stat: " + std::strerror(err));
  }
  const std::string kind = non_regular_kind(st.st_mode);
  if (!kind.empty()) {
    ::close(fd);
    throw Error(path + ": is " + kind + ", not " + noun);
  }
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags >= 0) ::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
  return fd;
}

// The whole content of the regular file PATH (at most max_bytes; larger is an error). Throws Error.
template <typename Error>
std::string read_regular_file(const std::string& path, const std::string& noun = "a regular file",
                              size_t max_bytes = size_t(1) << 40) {
  struct stat st {};
  const int fd = open_regular_file<Error>(path, st, noun);
  if (static_cast<uint64_t>(st.st_size) > max_bytes) {
    ::close(fd);
    throw Error(path + ": " + std::to_string(st.st_size) + " bytes, more than the limit of " +
                std::to_string(max_bytes));
  }
  std::string out;
  out.reserve(static_cast<size_t>(st.st_size));
  char buf[1 << 16];
  while (true) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      ::close(fd);
      throw Error(path + ": read failed: " + std::strerror(err));
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
    if (out.size() > max_bytes) {
      ::close(fd);
      throw Error(path + ": more than the limit of " + std::to_string(max_bytes) + " bytes");
    }
  }
  ::close(fd);
  return out;
}

}  // namespace keel::io
