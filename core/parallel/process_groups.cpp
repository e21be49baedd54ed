// Why: see process_groups.h. Group creation order is the same on every rank (world, dp, tp, pp); each rank
// creates only the groups it belongs to, each over its own store prefix, so subgroups rendezvous independently.
#include "core/parallel/process_groups.h"

#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "core/config/config.h"
#include "core/parallel/c10d_compat.h"
#include "core/parallel/heartbeat.h"

#if KEEL_WITH_NCCL
#include <c10/cuda/CUDAFunctions.h>
#endif

namespace keel::parallel {
namespace {

#if defined(KEEL_HAVE_GLOO)
std::shared_ptr<::gloo::transport::Device> gloo_device(const WorldInfo& world) {
  if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME"); ifname && *ifname)
    return ::c10d::ProcessGroupGloo::createDeviceForInterface(ifname);
  const std::string& addr = world.master_addr;
  if (addr == "localhost" || addr.rfind("127.", 0) == 0)
    return ::c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1");
  return ::c10d::ProcessGroupGloo::createDefaultDevice();
}
#endif

struct Connection {
  c10::intrusive_ptr<::c10d::Store> store;
  std::shared_ptr<FaultMonitor> monitor;
  at::Device device{at::kCPU};  // NCCL: this rank's GPU (local rank mod the GPUs it sees), already current
};

// NCCL: makes GPU local_rank % count this process's current device before any communicator exists, so that no
// rank also creates a context on GPU 0, and returns it (the device CPU tensors are staged through).
at::Device nccl_device(const WorldInfo& world) {
#if KEEL_WITH_NCCL
  const int count = static_cast<int>(c10::cuda::device_count());
  if (count == 0) {
    throw std::invalid_argument("parallel.backend = nccl, but rank " + std::to_string(world.rank) +
                                " sees no CUDA device (CUDA_VISIBLE_DEVICES?)");
  }
  const auto index = static_cast<c10::DeviceIndex>(world.local_rank % count);
  c10::cuda::set_device(index);
  return at::Device(at::kCUDA, index);
#else
  throw std::invalid_argument(
      "parallel.backend = nccl, but this build of Keel has no NCCL (build with CUDA and "
      "KEEL_NCCL=ON; see docs/parallel.md)");
#endif
}

std::shared_ptr<Communicator> make_group(const std::string& name, const std::vector<int64_t>& members, int64_t rank,
                                         const WorldInfo& world, const std::string& backend, const Connection& conn,
                                         std::chrono::milliseconds timeout) {
  if (members.size() == 1) return Communicator::solo(name);
  int64_t group_rank = -1;
  std::string key = name;
  for (size_t i = 0; i < members.size(); ++i) {
    if (members[i] == rank) group_rank = static_cast<int64_t>(i);
    key += "-" + std::to_string(members[i]);
  }
  TORCH_CHECK(group_rank >= 0, "rank ", rank, " is not a member of its own ", name, " group");
  auto store = c10::make_intrusive<::c10d::PrefixStore>("keel/pg/" + key, conn.store);
  auto impl = std::make_unique<Communicator::Impl>();
  try {
    if (backend == "nccl") {
#if KEEL_WITH_NCCL
      auto options = ::c10d::ProcessGroupNCCL::Options::create();
      options->timeout = timeout;
      impl->backend = c10::make_intrusive<::c10d::ProcessGroupNCCL>(store, static_cast<int>(group_rank),
                                                                    static_cast<int>(members.size()), options);
      impl->kind = WireKind::kNccl;
      impl->staging = conn.device;
#else
      throw std::invalid_argument("parallel.backend = nccl, but this build of Keel has no NCCL");
#endif
    } else {
#if defined(KEEL_HAVE_GLOO)
      auto options = ::c10d::ProcessGroupGloo::Options::create(timeout);
      options->devices.push_back(gloo_device(world));
      impl->backend = c10::make_intrusive<::c10d::ProcessGroupGloo>(store, static_cast<int>(group_rank),
                                                                    static_cast<int>(members.size()), options);
#else
      throw std::invalid_argument(
          "parallel.backend = gloo, but this build of Keel has no Gloo (its headers were not "
          "found at build time; install libgloo-dev): use parallel.backend = nccl");
#endif
    }
  } catch (const std::invalid_argument&) {
    throw;
  } catch (const std::exception& e) {
    std::string diagnosis = conn.monitor ? conn.monitor->diagnose() : "";
    throw DistributedError((diagnosis.empty() ? "" : diagnosis + "; ") + "creating the " + name + " group (" + backend +
                           ") failed: " + e.what());
  }
  return std::make_shared<Communicator>(name, members, group_rank, std::move(impl), timeout, conn.monitor);
}

}  // namespace

ProcessGroups ProcessGroups::single() {
  ProcessGroups g;
  g.world = Communicator::solo("world");
  g.dp = Communicator::solo("dp");
  g.tp = Communicator::solo("tp");
  g.pp = Communicator::solo("pp");
  return g;
}

ProcessGroups join_process_groups(const WorldInfo& world, const ParallelConfig& config, const std::string& backend) {
  ProcessGroups g;
  g.layout = Layout(config.dp, config.tp, config.pp);
  g.layout.require_world_size(world.world_size,
                              world.source == "single"
                                  ? "one process; start N ranks with keel launch --nproc N, torchrun or srun"
                                  : "from the " + world.source + " environment variables");
  g.world_info = world;
  g.rank = world.rank;
  g.coords = g.layout.coordinates_of(world.rank);
  if (!world.distributed()) {
    ProcessGroups s = ProcessGroups::single();
    s.layout = g.layout;
    s.world_info = world;
    return s;
  }
  const auto timeout = std::chrono::milliseconds(static_cast<int64_t>(config.timeout_s * 1000.0));
  auto conn = std::make_shared<Connection>();
  try {
    ::c10d::TCPStoreOptions options;
    options.port = static_cast<std::uint16_t>(world.port);
    // Recent torchrun hosts the store in its agent and says so; then every rank is a client.
    const char* agent_store = std::getenv("TORCHELASTIC_USE_AGENT_STORE");
    const bool agent_hosts_store = agent_store && std::string(agent_store) == "True";
    options.isServer = world.rank == 0 && !agent_hosts_store;
    options.numWorkers = static_cast<size_t>(world.world_size);
    options.waitWorkers = true;
    options.timeout = timeout;
    conn->store = c10::make_intrusive<::c10d::TCPStore>(world.master_addr, options);
  } catch (const std::exception& e) {
    throw DistributedError(
        "rank " + std::to_string(world.rank) + " could not join the job's store at " + world.master_addr + ":" +
        std::to_string(world.port) + " within parallel.timeout_s = " + std::to_string(config.timeout_s) +
        " s (is rank 0 running? are all " + std::to_string(world.world_size) + " ranks started?): " + e.what());
  }
  if (wire_kind_of(backend) == WireKind::kNccl) conn->device = nccl_device(world);
  conn->monitor = start_heartbeat_monitor(conn->store, world.rank, g.layout, std::chrono::milliseconds(1000));
  g.world = make_group(
      "world",
      [&] {
        std::vector<int64_t> all;
        for (int64_t r = 0; r < world.world_size; ++r) all.push_back(r);
        return all;
      }(),
      world.rank, world, backend, *conn, timeout);
  g.dp = make_group("dp", g.layout.dp_group(world.rank), world.rank, world, backend, *conn, timeout);
  g.tp = make_group("tp", g.layout.tp_group(world.rank), world.rank, world, backend, *conn, timeout);
  g.pp = make_group("pp", g.layout.pp_group(world.rank), world.rank, world, backend, *conn, timeout);
  g.keep_alive = conn;
  spdlog::info("joined the job as {} of {} ({}, {} backend, store {}:{})", g.describe(), world.world_size,
               g.layout.describe(), backend, world.master_addr, world.port);
  return g;
}

}  // namespace keel::parallel
