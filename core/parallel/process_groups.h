// Why: the layout turned into live communicators, built once per process and passed explicitly to the model
// (TP), the pipeline schedule (PP), the gradient reducer and optimizer (DP), and checkpointing (world). A
// single-process run gets groups of size 1 that never communicate.
#pragma once

#include <memory>
#include <string>

#include "core/parallel/communicator.h"
#include "core/parallel/layout.h"
#include "core/parallel/rendezvous.h"

namespace keel {
struct ParallelConfig;
}

namespace keel::parallel {

struct ProcessGroups {
  Layout layout;
  WorldInfo world_info;
  int64_t rank = 0;  // global rank
  Coordinates coords;
  std::shared_ptr<Communicator> world, dp, tp, pp;
  std::shared_ptr<void> keep_alive;  // the store and heartbeat thread

  int64_t world_size() const { return layout.world_size(); }
  bool first_stage() const { return coords.pp == 0; }
  bool last_stage() const { return coords.pp == layout.pp() - 1; }
  bool is_rank0() const { return rank == 0; }
  // "rank 3 (dp 1, tp 1, pp 0)"
  std::string describe() const { return layout.describe_rank(rank); }

  static ProcessGroups single();
};

// Joins the job `world` describes with the layout of `config` (dp x tp x pp must equal world.world_size, else
// std::invalid_argument naming the keys): connects to the TCPStore on MASTER_ADDR:MASTER_PORT (rank 0 hosts it),
// starts the heartbeat, creates the world, DP, TP and PP groups on `backend` ("gloo" or "nccl"), each op timing
// out after parallel.timeout_s. Rendezvous waits at most that long for every rank, then names the missing ones.
ProcessGroups join_process_groups(const WorldInfo& world, const ParallelConfig& config, const std::string& backend);

}  // namespace keel::parallel
