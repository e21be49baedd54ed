// Why: see file.h.
#include "core/io/file.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace keel::io {
namespace fs = std::filesystem;
namespace {

std::string errno_text(int error) { return std::strerror(error); }

// Writes all of `contents` to the new file `tmp`; throws FileError(tmp, ...).
void write_whole(const std::string& tmp, std::string_view contents) {
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw FileError(tmp, errno_text(errno));
  const char* data = contents.data();
  size_t left = contents.size();
  while (left > 0) {
    const ssize_t n = ::write(fd, data, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int error = n < 0 ? errno : ENOSPC;
      ::close(fd);
      throw FileError(tmp, errno_text(error));
    }
    data += n;
    left -= static_cast<size_t>(n);
  }
  if (::close(fd) != 0) throw FileError(tmp, errno_text(errno));
}

// Links (kKeep) or renames (kReplace) tmp to path; throws a bare reason.
void publish(const std::string& tmp, const std::string& path, IfExists if_exists) {
  if (if_exists == IfExists::kKeep) {
    if (::link(tmp.c_str(), path.c_str()) == 0) {
      ::unlink(tmp.c_str());
      return;
    }
    const int error = errno;
    if (error == EEXIST) throw std::runtime_error("it appeared meanwhile (not replaced)");
    if (error != EPERM && error != EOPNOTSUPP && error != ENOSYS) throw std::runtime_error(errno_text(error));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) throw std::runtime_error(errno_text(errno));  // no links here
}

std::string with_path_for_tmp(std::string text, const std::string& tmp, const std::string& path) {
  for (size_t at = text.find(tmp); at != std::string::npos; at = text.find(tmp, at + path.size())) {
    text.replace(at, tmp.size(), path);
  }
  return text;
}

}  // namespace

void write_atomically(const std::string& path, const std::function<void(const std::string& tmp)>& write_tmp,
                      IfExists if_exists) {
  const std::string tmp = path + ".tmp-" + std::to_string(::getpid());
  std::string reason;
  try {
    std::error_code ec;
    fs::remove(tmp, ec);  // debris of an earlier process with this pid
    write_tmp(tmp);
    fsync_path(tmp);
    publish(tmp, path, if_exists);
    const std::string parent = fs::path(path).parent_path().string();
    fsync_path(parent.empty() ? "." : parent);
    return;
  } catch (const FileError& e) {
    reason = e.path() == tmp ? e.reason() : with_path_for_tmp(e.what(), tmp, path);
  } catch (const std::exception& e) {
    reason = with_path_for_tmp(e.what(), tmp, path);
  }
  std::error_code ignored;
  fs::remove(tmp, ignored);
  throw FileError(path, reason);
}

void write_file_atomically(const std::string& path, std::string_view contents, IfExists if_exists) {
  write_atomically(
      path, [&](const std::string& tmp) { write_whole(tmp, contents); }, if_exists);
}

void fsync_path(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw FileError(path, "cannot open to fsync: " + errno_text(errno));
  const int rc = ::fsync(fd);
  const int saved = errno;
  ::close(fd);
  if (rc != 0) throw FileError(path, "fsync failed: " + errno_text(saved));
}

void rename_durably(const std::string& from, const std::string& to) {
  if (std::rename(from.c_str(), to.c_str()) != 0) {
    const int error = errno;
    throw FileError(from, "cannot rename to " + to + ": " + errno_text(error));
  }
  const std::string parent = fs::path(to).parent_path().string();
  fsync_path(parent.empty() ? "." : parent);
}

std::string read_small_file(const std::string& path, size_t max_bytes) {
  std::error_code ec;
  const auto size = fs::file_size(path, ec);
  if (ec) throw FileError(path, "cannot read: " + ec.message());
  if (size > max_bytes) throw FileError(path, std::to_string(size) + " bytes, larger than expected");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw FileError(path, "cannot open: " + errno_text(errno));
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

}  // namespace keel::io
