// Why: when a collective times out, the heartbeat's diagnosis is the one line that tells the user which rank to
// look at. These run several ranks' monitors on one real TCPStore (ranks as monitors in this process), stop some,
// and check that the others name exactly those ranks, or the store host when the store itself is gone, within a
// few seconds. c10d_compat.h: the test builds the job's store itself, as process_groups.cpp does.
#include <gtest/gtest.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "core/parallel/c10d_compat.h"
#include "core/parallel/heartbeat.h"
#include "tests/unit/parallel_ranks.h"

namespace keel::parallel {
namespace {

constexpr auto kPeriod = std::chrono::milliseconds(100);

// The job's store as rank 0 hosts it, and one client of it per other rank, like process_groups.cpp.
struct Job {
  explicit Job(int64_t world_size) {
    const int port = testing::free_tcp_port();
    ::c10d::TCPStoreOptions options;
    options.port = static_cast<std::uint16_t>(port);
    options.isServer = true;
    options.waitWorkers = false;
    options.timeout = std::chrono::seconds(10);
    stores.push_back(c10::make_intrusive<::c10d::TCPStore>("127.0.0.1", options));
    options.isServer = false;
    for (int64_t rank = 1; rank < world_size; ++rank)
      stores.push_back(c10::make_intrusive<::c10d::TCPStore>("127.0.0.1", options));
  }
  std::vector<c10::intrusive_ptr<::c10d::Store>> stores;  // [rank]
};

// Monitors of `ranks` on `job` (others stay null), after every one of them has had time to beat.
std::vector<std::shared_ptr<FaultMonitor>> start_monitors(const Job& job, const Layout& layout,
                                                          const std::vector<int64_t>& ranks) {
  std::vector<std::shared_ptr<FaultMonitor>> monitors(static_cast<size_t>(layout.world_size()));
  for (int64_t rank : ranks) monitors[rank] = start_heartbeat_monitor(job.stores[rank], rank, layout, kPeriod);
  std::this_thread::sleep_for(kPeriod * 2);
  return monitors;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

TEST(Heartbeat, EveryRankBeatingGivesNoDiagnosis) {
  const Layout layout(1, 3, 1);
  const Job job(3);
  auto monitors = start_monitors(job, layout, {0, 1, 2});
  for (int64_t rank = 0; rank < 3; ++rank) EXPECT_EQ(monitors[rank]->diagnose(), "") << "asked rank " << rank;
}

TEST(Heartbeat, NamesTheRankThatStoppedWithinSeconds) {
  const Layout layout(2, 2, 1);
  const Job job(4);
  auto monitors = start_monitors(job, layout, {0, 1, 2, 3});
  monitors[3].reset();  // rank 3 dies
  for (int64_t rank : {0, 1, 2}) {
    const auto start = std::chrono::steady_clock::now();
    EXPECT_EQ(monitors[rank]->diagnose(), "rank 3 (dp 1, tp 1, pp 0) has stopped its heartbeat (dead or hung)")
        << "asked rank " << rank;
    EXPECT_LT(seconds_since(start), 3.0);
  }
}

TEST(Heartbeat, NamesEveryStoppedRankInOneSentence) {
  const Layout layout(2, 2, 1);
  const Job job(4);
  auto monitors = start_monitors(job, layout, {0, 1, 2, 3});
  monitors[1].reset();
  monitors[3].reset();
  EXPECT_EQ(monitors[2]->diagnose(),
            "rank 1 (dp 0, tp 1, pp 0) and rank 3 (dp 1, tp 1, pp 0) have stopped their heartbeats (dead or hung)");
}

TEST(Heartbeat, NamesARankThatNeverStarted) {
  const Layout layout(1, 1, 3);
  const Job job(3);
  auto monitors = start_monitors(job, layout, {0, 1});  // rank 2 never joined
  EXPECT_EQ(monitors[1]->diagnose(),
            "rank 2 (dp 0, tp 0, pp 2) has sent no heartbeat at all (not started, dead or hung)");
}

TEST(Heartbeat, StoreGoneNamesRankZeroAsItsHost) {
  const Layout layout(2, 1, 1);
  auto job = std::make_unique<Job>(2);
  auto monitors = start_monitors(*job, layout, {0, 1});
  // Rank 0 dies: its monitor and the store it hosts go away; rank 1 only has its (now dead) connections.
  monitors[0].reset();
  job->stores[0] = c10::intrusive_ptr<::c10d::Store>();
  const auto start = std::chrono::steady_clock::now();
  EXPECT_EQ(monitors[1]->diagnose(),
            "rank 0 (dp 0, tp 0, pp 0), which hosts the job's store, is unreachable (dead or hung)");
  EXPECT_LT(seconds_since(start), 8.0);
  // Its beating thread has stopped on the broken connection; the monitor still goes away at once.
  const auto destroy_start = std::chrono::steady_clock::now();
  monitors[1].reset();
  EXPECT_LT(seconds_since(destroy_start), 3.0);
}

}  // namespace
}  // namespace keel::parallel
