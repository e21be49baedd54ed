// Why: multi-rank unit tests without processes: each rank is a thread of the test binary with its own c10d
// Gloo groups over a TCPStore on a free local port, exactly as separate processes would have. `run_ranks`
// rethrows the first rank's failure so that a test sees it.
#pragma once

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "core/config/config.h"
#include "core/parallel/process_groups.h"

namespace keel::testing {

inline int free_tcp_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  ::close(fd);
  return ntohs(addr.sin_port);
}

// Runs `body(groups)` on dp x tp x pp ranks (threads); returns when all are done.
inline void run_ranks(int64_t dp, int64_t tp, int64_t pp, const std::function<void(parallel::ProcessGroups&)>& body,
                      double timeout_s = 60.0) {
  ParallelConfig config;
  config.dp = dp;
  config.tp = tp;
  config.pp = pp;
  config.timeout_s = timeout_s;
  const int64_t world = dp * tp * pp;
  const int port = free_tcp_port();
  std::mutex mutex;
  std::exception_ptr first_error;
  std::vector<std::thread> threads;
  for (int64_t rank = 0; rank < world; ++rank) {
    threads.emplace_back([&, rank] {
      try {
        parallel::WorldInfo info;
        info.rank = rank;
        info.world_size = world;
        info.port = port;
        info.source = "test";
        parallel::ProcessGroups groups = parallel::join_process_groups(info, config, "gloo");
        body(groups);
        groups.world->barrier();
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex);
        if (!first_error) first_error = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  if (first_error) std::rethrow_exception(first_error);
}

}  // namespace keel::testing
