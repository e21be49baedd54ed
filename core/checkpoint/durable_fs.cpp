// Why: see durable_fs.h.
#include "core/checkpoint/durable_fs.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/checkpoint/checkpoint_error.h"

namespace keel::checkpoint {
namespace fs = std::filesystem;

void fsync_path(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw CheckpointError(path + ": cannot open to fsync: " + std::strerror(errno));
  const int rc = ::fsync(fd);
  const int saved = errno;
  ::close(fd);
  if (rc != 0) throw CheckpointError(path + ": fsync failed: " + std::strerror(saved));
}

void write_file_atomically(const std::string& path, const std::string& contents) {
  const std::string tmp = path + ".tmp-" + std::to_string(::getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw CheckpointError(tmp + ": cannot create: " + std::strerror(errno));
    out.write(contents.data(), static_cast<std::streamsize>(contents.size()));
    out.flush();
    if (!out) throw CheckpointError(tmp + ": write failed: " + std::strerror(errno));
  }
  fsync_path(tmp);
  rename_durably(tmp, path);
}

std::string read_small_file(const std::string& path, size_t max_bytes) {
  std::error_code ec;
  const auto size = fs::file_size(path, ec);
  if (ec) throw CheckpointError(path + ": cannot read: " + ec.message());
  if (size > max_bytes) throw CheckpointError(path + ": " + std::to_string(size) + " bytes, larger than expected");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw CheckpointError(path + ": cannot open: " + std::strerror(errno));
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

void rename_durably(const std::string& from, const std::string& to) {
  if (std::rename(from.c_str(), to.c_str()) != 0)
    throw CheckpointError("cannot rename " + from + " to " + to + ": " + std::strerror(errno));
  const std::string parent = fs::path(to).parent_path().string();
  fsync_path(parent.empty() ? "." : parent);
}

}  // namespace keel::checkpoint
