// Why: see rendezvous.h.
#include "core/parallel/rendezvous.h"

#include <cstdlib>
#include <stdexcept>

namespace keel::parallel {
namespace {

int64_t parse_count(const char* name, const char* text, int64_t min) {
  std::string s = text;
  size_t used = 0;
  int64_t value = 0;
  try {
    value = std::stoll(s, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (s.empty() || used != s.size() || value < min)
    throw std::invalid_argument(std::string("environment variable ") + name + "='" + s +
                                "' is not an integer >= " + std::to_string(min));
  return value;
}

}  // namespace

std::string first_slurm_host(const std::string& nodelist) {
  const size_t end = nodelist.find_first_of(",[");
  if (end == std::string::npos || nodelist[end] == ',') return nodelist.substr(0, end);
  // prefix[range,...]: the first number of the first range, zero padding kept.
  const std::string prefix = nodelist.substr(0, end);
  const size_t stop = nodelist.find_first_of("-,]", end + 1);
  if (stop == std::string::npos) throw std::invalid_argument("malformed SLURM_JOB_NODELIST '" + nodelist + "'");
  return prefix + nodelist.substr(end + 1, stop - end - 1);
}

WorldInfo detect_world(const EnvLookup& env_in) {
  const EnvLookup env = env_in ? env_in : EnvLookup([](const char* name) { return std::getenv(name); });
  auto get = [&](const char* name) -> const char* {
    const char* v = env(name);
    return (v && *v) ? v : nullptr;
  };
  WorldInfo w;
  if (get("WORLD_SIZE") || get("RANK")) {
    if (!get("WORLD_SIZE") || !get("RANK"))
      throw std::invalid_argument("RANK and WORLD_SIZE must be set together (torchrun-style launch)");
    w.source = "torchrun";
    w.world_size = parse_count("WORLD_SIZE", get("WORLD_SIZE"), 1);
    w.rank = parse_count("RANK", get("RANK"), 0);
    w.local_rank = get("LOCAL_RANK") ? parse_count("LOCAL_RANK", get("LOCAL_RANK"), 0) : 0;
  } else if (get("SLURM_PROCID") && get("SLURM_NTASKS")) {
    w.source = "slurm";
    w.world_size = parse_count("SLURM_NTASKS", get("SLURM_NTASKS"), 1);
    w.rank = parse_count("SLURM_PROCID", get("SLURM_PROCID"), 0);
    w.local_rank = get("SLURM_LOCALID") ? parse_count("SLURM_LOCALID", get("SLURM_LOCALID"), 0) : 0;
    if (!get("MASTER_ADDR")) {
      const char* nodes = get("SLURM_JOB_NODELIST") ? get("SLURM_JOB_NODELIST") : get("SLURM_NODELIST");
      if (nodes) w.master_addr = first_slurm_host(nodes);
    }
    if (!get("MASTER_PORT") && get("SLURM_JOB_ID"))
      w.port = 29500 + static_cast<int>(parse_count("SLURM_JOB_ID", get("SLURM_JOB_ID"), 0) % 1000);
  } else {
    return w;
  }
  if (w.rank >= w.world_size)
    throw std::invalid_argument("rank " + std::to_string(w.rank) + " is not below the world size " +
                                std::to_string(w.world_size) + " (" + w.source + " variables)");
  if (get("MASTER_ADDR")) w.master_addr = get("MASTER_ADDR");
  if (get("MASTER_PORT")) {
    const int64_t port = parse_count("MASTER_PORT", get("MASTER_PORT"), 1);
    if (port > 65535) throw std::invalid_argument("MASTER_PORT=" + std::to_string(port) + " is not a TCP port");
    w.port = static_cast<int>(port);
  }
  return w;
}

}  // namespace keel::parallel
