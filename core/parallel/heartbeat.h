// Why: when a collective fails or times out, the surviving ranks must say *which* rank is gone. Every rank
// runs a small thread that bumps its counter in the job's c10d store (keel/heartbeat/<rank>) every period;
// diagnose() names the ranks whose counter stopped moving (dead or hung), or says the store host (rank 0) is
// unreachable. Included only by process_groups.cpp (it needs the c10d Store type) and its tests.
//
// diagnose() takes about 2.5 periods (two reads of every counter, 2.5 periods apart; each read waits at most a
// few seconds for the store) and returns one of:
//   "rank 3 (dp 1, tp 1, pp 0) has stopped its heartbeat (dead or hung)"    (several ranks: "... have stopped
//                                                                            their heartbeats ...")
//   "rank 2 (...) has sent no heartbeat at all (not started, dead or hung)"
//   "rank 0 (dp 0, tp 0, pp 0), which hosts the job's store, is unreachable (dead or hung)"
//   ""                                                                       (every other rank is beating)
#pragma once

#include <chrono>
#include <memory>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include "core/parallel/communicator.h"
#include "core/parallel/layout.h"

namespace keel::parallel {

// Starts the heartbeat thread of `rank` (stopped when the returned monitor is destroyed).
std::shared_ptr<FaultMonitor> start_heartbeat_monitor(const c10::intrusive_ptr<::c10d::Store>& store, int64_t rank,
                                                      const Layout& layout, std::chrono::milliseconds period);

}  // namespace keel::parallel
