// Why: every collective Keel runs goes through this one class, a thin layer over a c10d process-group backend
// (Gloo on CPU, NCCL on CUDA). It exists for three reasons:
//   1. no call ever waits forever: on Gloo each op waits at most the configured timeout (parallel.timeout_s),
//      then throws DistributedError naming the group, the op and — through the FaultMonitor — the missing rank;
//      on NCCL the same timeout is the process group's own (set at creation, enforced by its watchdog), and a
//      wait only orders the current CUDA stream after the op, so the host keeps running ahead;
//   2. a group of size 1 does no communication at all (single-process runs never touch c10d);
//   3. c10d's headers (and the 1.13 / 2.x API differences: ProcessGroup vs Backend) stay in communicator.cpp.
// Communicators are created by process_groups.cpp and passed explicitly to the model, the optimizer and the
// checkpoint code; there is no global "current group".
#pragma once

#include <ATen/core/Tensor.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace keel::parallel {

// A collective failed or timed out. The message names the group, the op, the step when known, and the ranks
// the fault monitor believes are missing. Callers let it propagate: the process must exit non-zero.
class DistributedError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Explains a failed collective: which ranks are gone or hung (heartbeat.h implements it over the store).
class FaultMonitor {
 public:
  virtual ~FaultMonitor() = default;
  // One sentence, e.g. "rank 3 (dp 1, tp 1, pp 0) has sent no heartbeat for 12.0 s (dead or hung)"; "" if
  // every rank looks alive.
  virtual std::string diagnose() = 0;
};

enum class ReduceOp { kSum, kMax, kMin };

// The backend a group of size > 1 talks through ("gloo" or "nccl"; anything else is std::invalid_argument).
enum class WireKind { kGloo, kNccl };
WireKind wire_kind_of(const std::string& backend);

// Where, and in which dtype, a tensor travels on `kind`. Gloo: CPU, bf16 as fp32 (Gloo has no bf16 reduction,
// and its send/recv of CUDA tensors fails). NCCL: CUDA tensors as they are; a CPU tensor (the trainer's flags,
// lengths and names) is staged through the group's device `staging` in its own dtype, as NCCL takes only CUDA
// tensors. The communicator copies there and back when the plan differs from the tensor.
struct WirePlan {
  at::Device device;
  at::ScalarType dtype;
};
WirePlan wire_plan(const at::Tensor& t, WireKind kind, at::Device staging);

// Whether a wait passes parallel.timeout_s to c10d. Not on NCCL: PyTorch 2.x's WorkNCCL::wait(timeout)
// busy-waits on the host, while wait() without one only makes the current stream wait; the group's creation
// timeout (watchdog) and the heartbeat still catch a hung or dead rank.
bool wait_with_timeout(WireKind kind);

// An asynchronous op in flight; wait() blocks (at most the timeout) and finishes any copy-back.
class PendingWork {
 public:
  PendingWork() = default;
  PendingWork(std::function<void()> wait_fn) : wait_fn_(std::move(wait_fn)) {}
  void wait() {
    if (wait_fn_) {
      auto fn = std::move(wait_fn_);
      wait_fn_ = nullptr;
      fn();
    }
  }
  bool pending() const { return static_cast<bool>(wait_fn_); }

 private:
  std::function<void()> wait_fn_;
};

class Communicator {
 public:
  struct Impl;
  // A group of one: every op returns at once (rank 0 of 1).
  static std::shared_ptr<Communicator> solo(std::string name);
  // Built by process_groups.cpp. `global_ranks[i]` is the world rank of group rank i.
  Communicator(std::string name, std::vector<int64_t> global_ranks, int64_t rank, std::unique_ptr<Impl> impl,
               std::chrono::milliseconds timeout, std::shared_ptr<FaultMonitor> monitor);
  ~Communicator();

  const std::string& name() const { return name_; }
  int64_t rank() const { return rank_; }
  int64_t size() const { return static_cast<int64_t>(global_ranks_.size()); }
  bool single() const { return size() == 1; }
  int64_t global_rank(int64_t group_rank) const { return global_ranks_.at(group_rank); }
  const std::vector<int64_t>& global_ranks() const { return global_ranks_; }
  std::chrono::milliseconds timeout() const { return timeout_; }

  // In place on every rank. bf16 tensors are reduced in fp32 on backends without bf16 (Gloo).
  void all_reduce(at::Tensor& tensor, ReduceOp op = ReduceOp::kSum);
  PendingWork all_reduce_async(at::Tensor& tensor, ReduceOp op = ReduceOp::kSum);
  void broadcast(at::Tensor& tensor, int64_t root);
  PendingWork broadcast_async(at::Tensor& tensor, int64_t root);
  // Every rank's `tensor` (same shape and dtype everywhere), in group-rank order.
  std::vector<at::Tensor> all_gather(const at::Tensor& tensor);
  // Point to point (pipeline stages). `tag` pairs a send with its recv.
  PendingWork send(const at::Tensor& tensor, int64_t dst, int64_t tag);
  void recv(at::Tensor& tensor, int64_t src, int64_t tag);
  void barrier();

  // Small host-side values (decisions, names, paths): the root's string on every rank / every rank's string.
  std::string broadcast_string(const std::string& value, int64_t root);
  std::vector<std::string> all_gather_strings(const std::string& value);

 private:
  // Runs `op`, turning any failure into DistributedError with the group, op and the monitor's diagnosis.
  [[noreturn]] void fail(const std::string& op, const std::string& what) const;
  std::string name_;
  std::vector<int64_t> global_ranks_;
  int64_t rank_ = 0;
  std::unique_ptr<Impl> impl_;
  std::chrono::milliseconds timeout_{0};
  std::shared_ptr<FaultMonitor> monitor_;
};

}  // namespace keel::parallel
