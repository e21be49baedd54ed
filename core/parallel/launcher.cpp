// Why: see launcher.h. One thread does it all: a poll() loop over the children's pipes and a self-pipe that the
// signal handlers write to, so that output, signals and exits are handled in one order, and no lock is needed. It
// is the main thread: PR_SET_PDEATHSIG fires when the thread that forked a rank ends, not when the process does.
#include "core/parallel/launcher.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstring>
#include <iostream>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

extern char** environ;

namespace keel::parallel {
namespace {

// How long the launcher keeps reading output after the last rank exited (a background process a rank left
// behind may hold its pipe open forever).
constexpr auto kDrainAfterExit = std::chrono::seconds(1);
// The longest a poll() sleeps, so that a lost wake-up costs at most this much.
constexpr int kPollMs = 200;
// A line longer than this is passed on in pieces, each with its prefix.
constexpr size_t kMaxLine = 64 * 1024;

using Clock = std::chrono::steady_clock;

// A port nobody listens on right now (rank 0 binds it moments later; the same race torchrun accepts).
int free_tcp_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    throw std::runtime_error(std::string("cannot open a socket to find a free port: ") + std::strerror(errno));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_ANY);
  socklen_t len = sizeof(addr);
  const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
                  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0;
  ::close(fd);
  if (!ok) throw std::runtime_error(std::string("cannot find a free TCP port: ") + std::strerror(errno));
  return ntohs(addr.sin_port);
}

// The file to exec: `keel` is this very binary (so `keel launch -- keel train ...` needs no PATH); a name
// without '/' is looked up on PATH here, so that a typo is one clear error before anything starts.
std::string resolve_program(const std::string& name) {
  if (name.find('/') != std::string::npos) return name;
  if (name == "keel") {
    char self[PATH_MAX];
    const ssize_t n = ::readlink("/proc/self/exe", self, sizeof(self) - 1);
    if (n > 0) return std::string(self, static_cast<size_t>(n));
  }
  const char* path = std::getenv("PATH");
  std::string dirs = path ? path : "/usr/local/bin:/usr/bin:/bin";
  size_t start = 0;
  while (start <= dirs.size()) {
    const size_t end = std::min(dirs.find(':', start), dirs.size());
    const std::string dir = end > start ? dirs.substr(start, end - start) : ".";
    const std::string candidate = dir + "/" + name;
    struct stat info {};
    if (::stat(candidate.c_str(), &info) == 0 && S_ISREG(info.st_mode) && ::access(candidate.c_str(), X_OK) == 0)
      return candidate;
    start = end + 1;
  }
  throw std::runtime_error("cannot run '" + name + "': not found on PATH");
}

// The launcher's environment with the rendezvous variables of `rank` replacing any inherited ones.
std::vector<std::string> rank_environment(int rank, const LaunchOptions& o) {
  const std::vector<std::pair<std::string, std::string>> own = {
      {"RANK", std::to_string(rank)},          {"LOCAL_RANK", std::to_string(rank)},
      {"WORLD_SIZE", std::to_string(o.nproc)}, {"LOCAL_WORLD_SIZE", std::to_string(o.nproc)},
      {"MASTER_ADDR", o.master_addr},          {"MASTER_PORT", std::to_string(o.master_port)},
      {kLauncherPrefixesOutputEnv, "1"}};  // the ranks' logs need no "[rank R]" of their own
  std::set<std::string> replaced;
  for (const auto& [name, value] : own) replaced.insert(name);
  std::vector<std::string> env;
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    const std::string entry = *e;
    if (!replaced.count(entry.substr(0, entry.find('=')))) env.push_back(entry);
  }
  for (const auto& [name, value] : own) env.push_back(name + "=" + value);
  return env;
}

// Writes all of `text` to `fd` (one write() in the common case, so a line is never split by another).
void write_all(int fd, const std::string& text) {
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // our own stdout/stderr is gone (EPIPE): nothing better to do
    done += static_cast<size_t>(n);
  }
}

void say(const std::string& line) { write_all(STDERR_FILENO, "keel launch: " + line + "\n"); }

// One child stream (stdout or stderr) turned into prefixed whole lines on the launcher's own stream.
class PrefixedLines {
 public:
  PrefixedLines(int read_fd, int target_fd, std::string prefix)
      : fd_(read_fd), target_fd_(target_fd), prefix_(std::move(prefix)) {}

  int fd() const { return fd_; }
  bool open() const { return fd_ >= 0; }

  // Reads what is there; at end of file (or an error) passes on an unfinished last line and closes.
  void read_available() {
    char buffer[65536];
    const ssize_t n = ::read(fd_, buffer, sizeof(buffer));
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) return;
    if (n <= 0) {
      close();
      return;
    }
    pending_.append(buffer, static_cast<size_t>(n));
    std::string out;
    size_t start = 0;
    for (size_t newline; (newline = pending_.find('\n', start)) != std::string::npos; start = newline + 1)
      out += prefix_ + pending_.substr(start, newline + 1 - start);
    pending_.erase(0, start);
    if (pending_.size() >= kMaxLine) {
      out += prefix_ + pending_ + "\n";
      pending_.clear();
    }
    write_all(target_fd_, out);
  }

  void close() {
    if (fd_ < 0) return;
    if (!pending_.empty()) write_all(target_fd_, prefix_ + pending_ + "\n");
    pending_.clear();
    ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_;
  int target_fd_;
  std::string prefix_;
  std::string pending_;  // an unfinished line
};

// Signals arrive as bytes on a pipe the poll loop watches (the self-pipe trick): a handler only write()s.
int g_signal_pipe_write = -1;

void on_launcher_signal(int signo) {
  const int saved_errno = errno;
  const unsigned char byte = static_cast<unsigned char>(signo);
  if (g_signal_pipe_write >= 0) (void)!::write(g_signal_pipe_write, &byte, 1);
  errno = saved_errno;
}

class SignalPipe {
 public:
  SignalPipe() {
    if (::pipe2(fds_, O_CLOEXEC | O_NONBLOCK) != 0)
      throw std::runtime_error(std::string("cannot create a pipe: ") + std::strerror(errno));
    g_signal_pipe_write = fds_[1];
    struct sigaction action {};
    action.sa_handler = on_launcher_signal;
    sigemptyset(&action.sa_mask);
    action.sa_flags = SA_RESTART;
    for (int signo : {SIGINT, SIGTERM, SIGCHLD}) ::sigaction(signo, &action, &saved_[signo]);
    struct sigaction ignore {};
    ignore.sa_handler = SIG_IGN;
    ::sigaction(SIGPIPE, &ignore, &saved_[SIGPIPE]);  // a closed stdout must not kill the launcher
  }
  ~SignalPipe() {
    for (int signo : {SIGINT, SIGTERM, SIGCHLD, SIGPIPE}) ::sigaction(signo, &saved_[signo], nullptr);
    g_signal_pipe_write = -1;
    ::close(fds_[0]);
    ::close(fds_[1]);
  }
  SignalPipe(const SignalPipe&) = delete;
  SignalPipe& operator=(const SignalPipe&) = delete;

  int read_fd() const { return fds_[0]; }
  std::vector<int> take_signals() {
    std::vector<int> signals;
    unsigned char buffer[64];
    ssize_t n;
    while ((n = ::read(fds_[0], buffer, sizeof(buffer))) > 0)
      for (ssize_t i = 0; i < n; ++i) signals.push_back(buffer[i]);
    return signals;
  }

 private:
  int fds_[2] = {-1, -1};
  struct sigaction saved_[NSIG] {};
};

struct RankProcess {
  int rank = 0;
  pid_t pid = -1;
  bool running = false;
  std::optional<PrefixedLines> out, err;
};

// Starts one rank: its own process group, stdin from /dev/null, stdout/stderr into pipes, SIGTERM when the
// launcher dies. Only async-signal-safe calls between fork() and exec (keel may already run threads).
RankProcess start_rank(int rank, const std::string& program, const LaunchOptions& o, int dev_null) {
  // The death signal is tied to the forking thread: from any other thread the ranks would get SIGTERM when that
  // thread ends, while the launcher is still running.
  if (::syscall(SYS_gettid) != ::getpid())
    throw std::logic_error("keel launch must start the ranks from its main thread");
  const std::vector<std::string> env_strings = rank_environment(rank, o);
  std::vector<char*> env, argv;
  for (const auto& e : env_strings) env.push_back(const_cast<char*>(e.c_str()));
  env.push_back(nullptr);
  for (size_t i = 0; i < o.command.size(); ++i) argv.push_back(const_cast<char*>(o.command[i].c_str()));
  argv.push_back(nullptr);
  const std::string exec_failed = "keel launch: cannot run " + program + ": ";

  int out_pipe[2], err_pipe[2];
  if (::pipe2(out_pipe, O_CLOEXEC) != 0 || ::pipe2(err_pipe, O_CLOEXEC) != 0)
    throw std::runtime_error(std::string("cannot create a pipe: ") + std::strerror(errno));
  const pid_t launcher = ::getpid();
  // Signals stay blocked across fork so that no launcher handler runs in the child before exec.
  sigset_t all, previous;
  sigfillset(&all);
  ::pthread_sigmask(SIG_SETMASK, &all, &previous);
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::setpgid(0, 0);
    // The launcher killed outright: the rank is told to stop as by Ctrl-C (a pending SIGTERM is delivered at the
    // unblocking below, before exec, while its action is the default). If the launcher died before prctl(), no
    // signal will come: leave now, as that SIGTERM would have made us.
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (::getppid() != launcher) ::_exit(128 + SIGTERM);
    struct sigaction default_action {};
    default_action.sa_handler = SIG_DFL;
    for (int signo : {SIGINT, SIGTERM, SIGCHLD, SIGPIPE}) ::sigaction(signo, &default_action, nullptr);
    ::dup2(dev_null, STDIN_FILENO);
    ::dup2(out_pipe[1], STDOUT_FILENO);
    ::dup2(err_pipe[1], STDERR_FILENO);
    ::pthread_sigmask(SIG_SETMASK, &previous, nullptr);
    ::execve(program.c_str(), argv.data(), env.data());
    const char* reason = std::strerror(errno);
    (void)!::write(STDERR_FILENO, exec_failed.data(), exec_failed.size());
    (void)!::write(STDERR_FILENO, reason, std::strlen(reason));
    (void)!::write(STDERR_FILENO, "\n", 1);
    ::_exit(127);
  }
  const int fork_errno = errno;
  if (pid > 0) ::setpgid(pid, pid);  // also here, so that kill(-pid) works at once
  ::pthread_sigmask(SIG_SETMASK, &previous, nullptr);
  ::close(out_pipe[1]);
  ::close(err_pipe[1]);
  if (pid < 0) {
    ::close(out_pipe[0]);
    ::close(err_pipe[0]);
    throw std::runtime_error(std::string("cannot start rank ") + std::to_string(rank) + ": " +
                             std::strerror(fork_errno));
  }
  RankProcess p;
  p.rank = rank;
  p.pid = pid;
  p.running = true;
  const std::string prefix = "[rank " + std::to_string(rank) + "] ";
  p.out.emplace(out_pipe[0], STDOUT_FILENO, prefix);
  p.err.emplace(err_pipe[0], STDERR_FILENO, prefix);
  return p;
}

// The signal to the rank's whole process group (a shell's children too).
void signal_rank(const RankProcess& p, int signo) {
  if (p.running && ::kill(-p.pid, signo) != 0) ::kill(p.pid, signo);
}

std::string describe_exit(int status) {
  if (WIFSIGNALED(status)) {
    const int signo = WTERMSIG(status);
    const char* name = ::strsignal(signo);
    return "was killed by signal " + std::to_string(signo) + (name ? std::string(" (") + name + ")" : "");
  }
  return "exited with status " + std::to_string(WEXITSTATUS(status));
}

int launcher_status(int status) { return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status); }

bool is_failure(int status) { return WIFSIGNALED(status) || (WIFEXITED(status) && WEXITSTATUS(status) != 0); }

int run_job(const LaunchOptions& o, const std::string& program) {
  const int dev_null = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  if (dev_null < 0) throw std::runtime_error(std::string("cannot open /dev/null: ") + std::strerror(errno));
  SignalPipe signals;
  std::vector<RankProcess> ranks;
  try {
    for (int rank = 0; rank < o.nproc; ++rank) ranks.push_back(start_rank(rank, program, o, dev_null));
  } catch (...) {
    for (auto& p : ranks) signal_rank(p, SIGKILL);
    for (auto& p : ranks) ::waitpid(p.pid, nullptr, 0);
    ::close(dev_null);
    throw;
  }
  ::close(dev_null);

  int exit_status = 0;
  bool job_failed = false;
  std::optional<Clock::time_point> kill_at;      // SIGKILL the ranks still running at this time
  std::optional<Clock::time_point> drain_until;  // every rank has exited: stop reading output at this time
  auto running_count = [&] {
    int n = 0;
    for (const auto& p : ranks) n += p.running ? 1 : 0;
    return n;
  };
  while (true) {
    std::vector<pollfd> fds = {{signals.read_fd(), POLLIN, 0}};
    std::vector<PrefixedLines*> streams;
    for (auto& p : ranks) {
      for (auto* s : {&*p.out, &*p.err}) {
        if (!s->open()) continue;
        fds.push_back({s->fd(), POLLIN, 0});
        streams.push_back(s);
      }
    }
    if (running_count() == 0 && (streams.empty() || (drain_until && Clock::now() >= *drain_until))) break;
    ::poll(fds.data(), fds.size(), kPollMs);
    for (size_t i = 1; i < fds.size(); ++i)
      if (fds[i].revents & (POLLIN | POLLHUP | POLLERR)) streams[i - 1]->read_available();

    for (int signo : signals.take_signals()) {
      if (signo != SIGINT && signo != SIGTERM) continue;  // SIGCHLD only wakes the loop
      if (running_count() == 0) continue;
      say(std::string("got ") + (signo == SIGINT ? "SIGINT" : "SIGTERM") + "; passing it on to the " +
          std::to_string(running_count()) + " running ranks");
      for (const auto& p : ranks) signal_rank(p, signo);
    }

    for (auto& p : ranks) {
      int status = 0;
      if (!p.running || ::waitpid(p.pid, &status, WNOHANG) != p.pid) continue;
      p.running = false;
      if (!is_failure(status) || job_failed) continue;
      job_failed = true;
      exit_status = launcher_status(status);
      const int others = running_count();
      say("rank " + std::to_string(p.rank) + " " + describe_exit(status) +
          (others > 0 ? "; stopping the other ranks" : ""));
      for (const auto& other : ranks) {
        signal_rank(other, SIGTERM);
        signal_rank(other, SIGCONT);  // a stopped rank (SIGSTOP, a debugger) gets the SIGTERM only when it runs
      }
      kill_at = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(o.grace_s));
    }

    if (kill_at && Clock::now() >= *kill_at) {
      for (const auto& p : ranks) {
        if (!p.running) continue;
        std::ostringstream line;
        line << "rank " << p.rank << " did not stop within --grace-s " << o.grace_s << " s; sending SIGKILL";
        say(line.str());
        signal_rank(p, SIGKILL);
      }
      kill_at.reset();
    }
    if (running_count() == 0 && !drain_until) drain_until = Clock::now() + kDrainAfterExit;
  }
  for (auto& p : ranks) {
    p.out->close();
    p.err->close();
  }
  return exit_status;
}

}  // namespace

std::string launch_options_error(const LaunchOptions& o) {
  if (o.nproc < 1) return "--nproc must be >= 1, got " + std::to_string(o.nproc);
  if (o.command.empty()) return "no command after '--'";
  if (o.master_port < 0 || o.master_port > 65535)
    return "--master-port must be a TCP port (1-65535; 0: a free one), got " + std::to_string(o.master_port);
  if (!(o.grace_s >= 0.0)) return "--grace-s must be >= 0";
  if (o.master_addr.empty()) return "--master-addr must not be empty";
  return "";
}

int run_local_ranks(LaunchOptions options) {
  const std::string error = launch_options_error(options);
  if (!error.empty()) throw std::invalid_argument(error);
  const std::string program = resolve_program(options.command[0]);
  if (options.master_port == 0) options.master_port = free_tcp_port();
  std::cout.flush();
  return run_job(options, program);
}

}  // namespace keel::parallel
