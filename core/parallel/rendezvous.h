// Why: a Keel rank learns who it is from its environment, so that the same `keel train` command runs alone,
// under `keel launch --nproc N`, under torchrun, or as one task of an `srun` job:
//   torchrun / keel launch: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
//   Slurm:                  SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR (else the first host of
//                           SLURM_JOB_NODELIST), MASTER_PORT (else 29500 + SLURM_JOB_ID % 1000)
// Nothing set: a single process (rank 0 of 1). Torch-free.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

namespace keel::parallel {

struct WorldInfo {
  int64_t rank = 0;
  int64_t world_size = 1;
  int64_t local_rank = 0;
  std::string master_addr = "127.0.0.1";
  int port = 29500;
  std::string source = "single";  // single | torchrun | slurm

  bool distributed() const { return world_size > 1; }
};

using EnvLookup = std::function<const char*(const char*)>;

// Reads the variables above (through `env`, the process environment by default). Throws std::invalid_argument
// naming the variable for a malformed or inconsistent value (RANK >= WORLD_SIZE, a port out of range, ...).
WorldInfo detect_world(const EnvLookup& env = {});

// The first host of a Slurm hostlist: "node[03-05,9],gpu1" -> "node03".
std::string first_slurm_host(const std::string& nodelist);

}  // namespace keel::parallel
