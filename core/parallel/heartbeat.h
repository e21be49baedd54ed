// Why: when a collective fails or times out, the surviving ranks must say *which* rank is gone. Every rank
// runs a small thread that bumps its counter in the job's c10d store (keel/heartbeat/<rank>) every period;
// diagnose() names the ranks whose counter stopped moving (dead or hung), or says the store host (rank 0) is
// unreachable. Included only by process_groups.cpp (it needs the c10d Store type).
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
