// Why: see heartbeat.h. Three things make the diagnosis trustworthy when the job is already in trouble:
//   1. the monitor talks to the store over a connection of its own: the job's shared client is locked while a
//      Gloo/NCCL rendezvous waits on it, which would stall the beats of healthy ranks and get them named;
//   2. every read diagnose() makes runs on a helper thread it waits for at most kStoreAnswerDeadline, so a
//      dead or stopped store host turns into a sentence instead of a hang;
//   3. the beating thread never throws and never holds up the monitor's destructor for long: if it is stuck
//      in a store call it is left to finish on its own (it owns what it uses).
#include "core/parallel/heartbeat.h"

#include <spdlog/spdlog.h>

#include <condition_variable>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "core/parallel/c10d_compat.h"

namespace keel::parallel {
namespace {

// The longest diagnose() waits for one round of reads from the store.
constexpr auto kStoreAnswerDeadline = std::chrono::seconds(3);
// The longest the monitor's destructor waits for the beating thread to notice it should stop.
constexpr auto kBeaterStopDeadline = std::chrono::seconds(2);
// Connecting the monitor's own client to a store that is known to be up.
constexpr auto kConnectTimeout = std::chrono::seconds(10);

std::string heartbeat_key(int64_t rank) { return "keel/heartbeat/" + std::to_string(rank); }

// A second client of the job's TCPStore (same host and port); any other store (tests) is used as it is.
c10::intrusive_ptr<::c10d::Store> connect_own_client(const c10::intrusive_ptr<::c10d::Store>& job_store) {
  const auto* tcp = dynamic_cast<const ::c10d::TCPStore*>(job_store.get());
  if (tcp == nullptr) return job_store;
  try {
    ::c10d::TCPStoreOptions options;
    options.port = tcp->getPort();
    options.isServer = false;
    options.waitWorkers = false;
    options.timeout = std::chrono::duration_cast<std::chrono::milliseconds>(kConnectTimeout);
    return c10::make_intrusive<::c10d::TCPStore>(tcp->getHost(), options);
  } catch (const std::exception& e) {
    spdlog::warn("heartbeat: could not open a second connection to the job's store ({}); sharing the job's", e.what());
    return job_store;
  }
}

// What the beating thread shares with its monitor. The thread holds a reference, so it may outlive the monitor.
struct BeatState {
  std::mutex mutex;
  std::condition_variable wake;
  bool stop_requested = false;
  bool finished = false;
};

void beat_until_stopped(const std::shared_ptr<BeatState>& state, const c10::intrusive_ptr<::c10d::Store>& store,
                        const std::string& key, std::chrono::milliseconds period) {
  std::unique_lock<std::mutex> lock(state->mutex);
  while (!state->stop_requested) {
    lock.unlock();
    bool store_failed = false;
    try {
      store->add(key, 1);
    } catch (...) {  // a TCPStore connection that failed once stays broken: stop beating, say nothing here
      store_failed = true;
    }
    lock.lock();
    if (store_failed) break;
    state->wake.wait_for(lock, period, [&] { return state->stop_requested; });
  }
  state->finished = true;
  state->wake.notify_all();
}

// One round of reads of every rank's counter, made on a helper thread. add(key, 0) reads a counter without
// waiting for the key to exist (a rank that never beat reads 0). nullopt: the store failed or did not answer
// within the deadline (the helper is then left to finish or fail on its own).
std::optional<std::vector<int64_t>> read_counters(const c10::intrusive_ptr<::c10d::Store>& store, int64_t world_size) {
  struct Round {
    std::mutex mutex;
    std::condition_variable done_cv;
    bool done = false;
    bool ok = false;
    std::vector<int64_t> counters;
  };
  auto round = std::make_shared<Round>();
  std::thread([round, store, world_size] {
    std::vector<int64_t> counters;
    bool ok = true;
    try {
      for (int64_t rank = 0; rank < world_size; ++rank) counters.push_back(store->add(heartbeat_key(rank), 0));
    } catch (...) {
      ok = false;
    }
    std::lock_guard<std::mutex> lock(round->mutex);
    round->counters = std::move(counters);
    round->ok = ok;
    round->done = true;
    round->done_cv.notify_all();
  }).detach();
  std::unique_lock<std::mutex> lock(round->mutex);
  if (!round->done_cv.wait_for(lock, kStoreAnswerDeadline, [&] { return round->done; }) || !round->ok)
    return std::nullopt;
  return round->counters;
}

// "rank 1 (...)", "rank 1 (...) and rank 3 (...)", "rank 1 (...), rank 2 (...) and rank 3 (...)".
std::string list_ranks(const Layout& layout, const std::vector<int64_t>& ranks) {
  std::string text;
  for (size_t i = 0; i < ranks.size(); ++i) {
    if (i > 0) text += (i + 1 == ranks.size()) ? " and " : ", ";
    text += layout.describe_rank(ranks[i]);
  }
  return text;
}

class HeartbeatMonitor final : public FaultMonitor {
 public:
  HeartbeatMonitor(const c10::intrusive_ptr<::c10d::Store>& job_store, int64_t rank, const Layout& layout,
                   std::chrono::milliseconds period)
      : store_(connect_own_client(job_store)),
        rank_(rank),
        layout_(layout),
        period_(period),
        state_(std::make_shared<BeatState>()) {
    beater_ = std::thread([state = state_, store = store_, key = heartbeat_key(rank_), period = period_] {
      beat_until_stopped(state, store, key, period);
    });
  }

  ~HeartbeatMonitor() override {
    std::unique_lock<std::mutex> lock(state_->mutex);
    state_->stop_requested = true;
    state_->wake.notify_all();
    const bool finished = state_->wake.wait_for(lock, kBeaterStopDeadline, [&] { return state_->finished; });
    lock.unlock();
    if (finished) {
      beater_.join();
    } else {
      beater_.detach();  // stuck in a store call; it owns its state and store and ends when the call does
    }
  }

  HeartbeatMonitor(const HeartbeatMonitor&) = delete;
  HeartbeatMonitor& operator=(const HeartbeatMonitor&) = delete;

  std::string diagnose() override {
    const int64_t world_size = layout_.world_size();
    const auto before = read_counters(store_, world_size);
    if (!before) return store_unreachable();
    std::this_thread::sleep_for(period_ * 5 / 2);  // a live rank beats at least twice in 2.5 periods
    const auto after = read_counters(store_, world_size);
    if (!after) return store_unreachable();
    std::vector<int64_t> stopped, never_beat;
    for (int64_t rank = 0; rank < world_size; ++rank) {
      if (rank == rank_ || (*after)[rank] != (*before)[rank]) continue;  // the rank asking is alive
      ((*after)[rank] == 0 ? never_beat : stopped).push_back(rank);
    }
    std::string sentence;
    if (!stopped.empty())
      sentence = list_ranks(layout_, stopped) +
                 (stopped.size() == 1 ? " has stopped its heartbeat" : " have stopped their heartbeats") +
                 " (dead or hung)";
    if (!never_beat.empty())
      sentence += (sentence.empty() ? "" : "; ") + list_ranks(layout_, never_beat) +
                  (never_beat.size() == 1 ? " has" : " have") + " sent no heartbeat at all (not started, dead or hung)";
    return sentence;
  }

 private:
  // Rank 0 hosts the store (process_groups.cpp).
  std::string store_unreachable() const {
    if (rank_ == 0) return "the job's store, hosted by this rank (" + layout_.describe_rank(0) + "), does not answer";
    return layout_.describe_rank(0) + ", which hosts the job's store, is unreachable (dead or hung)";
  }

  c10::intrusive_ptr<::c10d::Store> store_;
  int64_t rank_ = 0;
  Layout layout_;
  std::chrono::milliseconds period_;
  std::shared_ptr<BeatState> state_;
  std::thread beater_;
};

}  // namespace

std::shared_ptr<FaultMonitor> start_heartbeat_monitor(const c10::intrusive_ptr<::c10d::Store>& store, int64_t rank,
                                                      const Layout& layout, std::chrono::milliseconds period) {
  return std::make_shared<HeartbeatMonitor>(store, rank, layout, period);
}

}  // namespace keel::parallel
