// Why: see child_process.h.
#include "core/forensics/child_process.h"

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <stdexcept>

namespace keel::forensics {

pid_t start_child(const std::vector<std::string>& argv, const std::string& log, const std::string& what) {
  const pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error("cannot start " + what + ": fork failed");
  if (pid == 0) {
    const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd >= 0) {
      ::dup2(fd, 1);
      ::dup2(fd, 2);
    }
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    ::execv(args[0], args.data());
    ::_exit(127);
  }
  return pid;
}

int exit_status_of(int wait_status) {
  return WIFEXITED(wait_status) ? WEXITSTATUS(wait_status) : 128 + WTERMSIG(wait_status);
}

int run_child(const std::vector<std::string>& argv, const std::string& log, const std::string& what) {
  const pid_t pid = start_child(argv, log, what);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
  }
  return exit_status_of(status);
}

std::string last_lines(const std::string& path, size_t n, const std::string& indent) {
  std::ifstream in(path);
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  std::string out;
  for (size_t i = lines.size() > n ? lines.size() - n : 0; i < lines.size(); ++i) out += "\n" + indent + lines[i];
  return out;
}

}  // namespace keel::forensics
