// Why: see run_log.h. Lines go to the file with write(2) on an O_APPEND descriptor, one call per line, so the
// OS error of a full disk (or a vanished file system) is known at that line; spdlog's flush_on() then has
// nothing left to flush.
#include "core/metrics/run_log.h"

#include <fcntl.h>
#include <spdlog/details/log_msg.h>
#include <spdlog/sinks/base_sink.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <mutex>

namespace keel::metrics {

namespace {

class RunLogSink final : public spdlog::sinks::base_sink<std::mutex> {
 public:
  explicit RunLogSink(std::string path) : path_(std::move(path)) {
    fd_ = ::open(path_.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd_ < 0) throw RunLogError("run log: cannot open " + path_ + ": " + std::strerror(errno));
  }
  ~RunLogSink() override {
    if (fd_ >= 0) ::close(fd_);
  }
  RunLogSink(const RunLogSink&) = delete;
  RunLogSink& operator=(const RunLogSink&) = delete;

  // The first failure, as the whole error message; "" while every write succeeded.
  std::string failure() {
    std::lock_guard<std::mutex> lock(failure_mutex_);
    return failure_;
  }

 protected:
  void sink_it_(const spdlog::details::log_msg& msg) override {
    spdlog::memory_buf_t formatted;
    formatter_->format(msg, formatted);
    const char* data = formatted.data();
    size_t left = formatted.size();
    while (left > 0) {
      const ssize_t n = ::write(fd_, data, left);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        record(n < 0 ? errno : ENOSPC);  // write() returning 0 for a non-empty buffer: the disk took nothing
        return;
      }
      data += n;
      left -= static_cast<size_t>(n);
    }
  }
  void flush_() override {}

 private:
  void record(int error) {
    std::lock_guard<std::mutex> lock(failure_mutex_);
    if (failure_.empty()) failure_ = "run log: cannot write " + path_ + ": " + std::strerror(error);
  }

  std::string path_;
  int fd_ = -1;
  std::mutex failure_mutex_;
  std::string failure_;
};

std::mutex current_mutex;
std::shared_ptr<RunLogSink> current;  // the process's run log, if any

}  // namespace

std::shared_ptr<spdlog::sinks::sink> open_run_log(const std::string& path) {
  std::shared_ptr<RunLogSink> sink = path.empty() ? nullptr : std::make_shared<RunLogSink>(path);
  std::lock_guard<std::mutex> lock(current_mutex);
  current = sink;
  return sink;
}

void throw_if_run_log_failed() {
  std::shared_ptr<RunLogSink> sink;
  {
    std::lock_guard<std::mutex> lock(current_mutex);
    sink = current;
  }
  if (sink == nullptr) return;
  const std::string failure = sink->failure();
  if (!failure.empty()) throw RunLogError(failure);
}

void log_error_handler(const std::string& message) {
  static std::atomic<bool> reported{false};
  if (reported.exchange(true)) return;
  std::string line = message;
  for (char& c : line) {
    if (static_cast<unsigned char>(c) < 0x20) c = ' ';
  }
  std::fprintf(stderr, "keel: logging error: %s\n", line.c_str());
}

}  // namespace keel::metrics
