// Why: see communicator.h. Each op: make a backend-friendly copy if needed (wire_plan: bf16 on Gloo -> fp32, a
// CPU tensor on NCCL -> the group's device), launch the c10d op, wait (wait_with_timeout), copy back. Failures become
// DistributedError with a diagnosis.
#include "core/parallel/communicator.h"

#include <torch/torch.h>

#include <sstream>

#include "core/parallel/c10d_compat.h"

namespace keel::parallel {

namespace {

// LibTorch's own messages carry a C++ backtrace; users get the first line of what went wrong.
std::string message_of(const std::exception& e) {
  if (const auto* torch_error = dynamic_cast<const c10::Error*>(&e)) return torch_error->what_without_backtrace();
  return e.what();
}

::c10d::ReduceOp to_c10d(ReduceOp op) {
  switch (op) {
    case ReduceOp::kMax:
      return ::c10d::ReduceOp::MAX;
    case ReduceOp::kMin:
      return ::c10d::ReduceOp::MIN;
    default:
      return ::c10d::ReduceOp::SUM;
  }
}

}  // namespace

std::shared_ptr<Communicator> Communicator::solo(std::string name) {
  return std::make_shared<Communicator>(std::move(name), std::vector<int64_t>{0}, 0, nullptr,
                                        std::chrono::milliseconds(0), nullptr);
}

Communicator::Communicator(std::string name, std::vector<int64_t> global_ranks, int64_t rank,
                           std::unique_ptr<Impl> impl, std::chrono::milliseconds timeout,
                           std::shared_ptr<FaultMonitor> monitor)
    : name_(std::move(name)),
      global_ranks_(std::move(global_ranks)),
      rank_(rank),
      impl_(std::move(impl)),
      timeout_(timeout),
      monitor_(std::move(monitor)) {
  TORCH_CHECK(single() || impl_, "communicator ", name_, " of size ", size(), " has no backend");
}

Communicator::~Communicator() = default;

void Communicator::fail(const std::string& op, const std::string& what) const {
  std::ostringstream timeout;
  timeout << static_cast<double>(timeout_.count()) / 1000.0;
  std::string message = op + " on the " + name_ + " group failed (parallel.timeout_s = " + timeout.str() + "): " + what;
  if (monitor_) {
    std::string diagnosis;
    try {
      diagnosis = monitor_->diagnose();
    } catch (const std::exception& e) {
      diagnosis = std::string("cannot tell which rank is missing: ") + e.what();
    }
    if (!diagnosis.empty()) message = diagnosis + "; " + message;
  }
  throw DistributedError(message);
}

WireKind wire_kind_of(const std::string& backend) {
  if (backend == "gloo") return WireKind::kGloo;
  if (backend == "nccl") return WireKind::kNccl;
  throw std::invalid_argument("parallel.backend must be gloo or nccl, got '" + backend + "'");
}

WirePlan wire_plan(const at::Tensor& t, WireKind kind, at::Device staging) {
  if (kind == WireKind::kNccl) {
    TORCH_CHECK(!t.device().is_cpu() || staging.is_cuda(),
                "an NCCL group needs a CUDA staging device for CPU tensors, got ", staging);
    return {t.device().is_cpu() ? staging : t.device(), t.scalar_type()};
  }
  return {at::Device(at::kCPU), t.scalar_type() == at::kBFloat16 ? at::kFloat : t.scalar_type()};
}

bool wait_with_timeout(WireKind kind) { return kind == WireKind::kGloo; }

namespace {
// The tensor actually handed to the backend (see wire_plan): contiguous, on the plan's device and dtype.
at::Tensor wire_tensor(const at::Tensor& t, const Communicator::Impl& impl) {
  const WirePlan plan = wire_plan(t, impl.kind, impl.staging);
  if (t.device() != plan.device || t.scalar_type() != plan.dtype) return t.to(plan.device, plan.dtype).contiguous();
  return t.is_contiguous() ? t : t.contiguous();
}

// Waits for `work`: with the group's timeout where the backend honours one without spinning (Gloo), else
// without (NCCL: stream-ordered, its creation timeout applies). False when the wait timed out.
bool wait_for(::c10d::Work& work, const Communicator::Impl& impl, std::chrono::milliseconds timeout) {
  return wait_with_timeout(impl.kind) ? work.wait(timeout) : work.wait();
}
}  // namespace

namespace {
// The shared shape of the in-place collectives: launch on the wire tensor, wait, copy back.
// `fail(message)` throws the communicator's DistributedError.
template <typename Launch, typename Fail>
PendingWork launch_in_place(at::Tensor& tensor, const Communicator::Impl& impl, std::chrono::milliseconds timeout,
                            Launch launch, Fail fail) {
  std::vector<at::Tensor> wire{wire_tensor(tensor, impl)};
  c10::intrusive_ptr<::c10d::Work> work;
  try {
    work = launch(wire);
  } catch (const std::exception& e) {
    fail(message_of(e));
  }
  at::Tensor target = tensor;
  const Communicator::Impl* backend = &impl;
  return PendingWork([work, wire, target, backend, timeout, fail]() mutable {
    try {
      if (!wait_for(*work, *backend, timeout)) fail("timed out");
    } catch (const DistributedError&) {
      throw;
    } catch (const std::exception& e) {
      fail(message_of(e));
    }
    if (!wire[0].is_same(target)) target.copy_(wire[0]);
  });
}
}  // namespace

PendingWork Communicator::all_reduce_async(at::Tensor& tensor, ReduceOp op) {
  if (single()) return {};
  return launch_in_place(
      tensor, *impl_, timeout_,
      [&](std::vector<at::Tensor>& wire) {
        ::c10d::AllreduceOptions options;
        options.reduceOp = to_c10d(op);
        options.timeout = timeout_;
        return impl_->backend->allreduce(wire, options);
      },
      [this](const std::string& message) { fail("all_reduce", message); });
}

void Communicator::all_reduce(at::Tensor& tensor, ReduceOp op) { all_reduce_async(tensor, op).wait(); }

PendingWork Communicator::broadcast_async(at::Tensor& tensor, int64_t root) {
  if (single()) return {};
  return launch_in_place(
      tensor, *impl_, timeout_,
      [&](std::vector<at::Tensor>& wire) {
        ::c10d::BroadcastOptions options;
        options.rootRank = root;
        options.timeout = timeout_;
        return impl_->backend->broadcast(wire, options);
      },
      [this](const std::string& message) { fail("broadcast", message); });
}

void Communicator::broadcast(at::Tensor& tensor, int64_t root) { broadcast_async(tensor, root).wait(); }

std::vector<at::Tensor> Communicator::all_gather(const at::Tensor& tensor) {
  if (single()) return {tensor.clone()};
  std::vector<at::Tensor> input{wire_tensor(tensor, *impl_)};
  std::vector<std::vector<at::Tensor>> outputs(1);
  for (int64_t i = 0; i < size(); ++i) outputs[0].push_back(at::empty_like(input[0]));
  try {
    ::c10d::AllgatherOptions options;
    options.timeout = timeout_;
    auto work = impl_->backend->allgather(outputs, input, options);
    if (!wait_for(*work, *impl_, timeout_)) fail("all_gather", "timed out");
  } catch (const DistributedError&) {
    throw;
  } catch (const std::exception& e) {
    fail("all_gather", message_of(e));
  }
  std::vector<at::Tensor> result;  // back on the caller's device and dtype (a staged CPU tensor comes home)
  for (auto& t : outputs[0]) result.push_back(t.to(tensor.device(), tensor.scalar_type()));
  return result;
}

PendingWork Communicator::send(const at::Tensor& tensor, int64_t dst, int64_t tag) {
  TORCH_CHECK(!single(), "send on the ", name_, " group of size 1");
  std::vector<at::Tensor> wire{wire_tensor(tensor, *impl_)};
  if (wire[0].is_same(tensor)) wire[0] = tensor.clone();  // the caller may change its tensor before wait()
  c10::intrusive_ptr<::c10d::Work> work;
  try {
    work = impl_->backend->send(wire, static_cast<int>(dst), static_cast<int>(tag));
  } catch (const std::exception& e) {
    fail("send to group rank " + std::to_string(dst), message_of(e));
  }
  return PendingWork([this, work, wire, dst]() {
    try {
      if (!wait_for(*work, *impl_, timeout_)) fail("send to group rank " + std::to_string(dst), "timed out");
    } catch (const DistributedError&) {
      throw;
    } catch (const std::exception& e) {
      fail("send to group rank " + std::to_string(dst), message_of(e));
    }
  });
}

void Communicator::recv(at::Tensor& tensor, int64_t src, int64_t tag) {
  TORCH_CHECK(!single(), "recv on the ", name_, " group of size 1");
  std::vector<at::Tensor> wire{wire_tensor(tensor, *impl_)};
  if (wire[0].is_same(tensor) && !tensor.is_contiguous()) wire[0] = tensor.contiguous();
  try {
    auto work = impl_->backend->recv(wire, static_cast<int>(src), static_cast<int>(tag));
    if (!wait_for(*work, *impl_, timeout_)) fail("recv from group rank " + std::to_string(src), "timed out");
  } catch (const DistributedError&) {
    throw;
  } catch (const std::exception& e) {
    fail("recv from group rank " + std::to_string(src), message_of(e));
  }
  if (!wire[0].is_same(tensor)) tensor.copy_(wire[0]);
}

void Communicator::barrier() {
  if (single()) return;
  // An all-reduce of one element: unlike c10d's barrier it honours our timeout on every backend.
  at::Tensor token = at::zeros({1}, at::kFloat);
  all_reduce(token);
}

std::string Communicator::broadcast_string(const std::string& value, int64_t root) {
  if (single()) return value;
  at::Tensor length = at::full({1}, static_cast<int64_t>(value.size()), at::kLong);
  broadcast(length, root);
  at::Tensor bytes = at::zeros({length.item<int64_t>()}, at::kByte);
  if (rank_ == root) std::memcpy(bytes.data_ptr<uint8_t>(), value.data(), value.size());
  if (bytes.numel() > 0) broadcast(bytes, root);
  return std::string(reinterpret_cast<const char*>(bytes.data_ptr<uint8_t>()), static_cast<size_t>(bytes.numel()));
}

std::vector<std::string> Communicator::all_gather_strings(const std::string& value) {
  if (single()) return {value};
  at::Tensor length = at::full({1}, static_cast<int64_t>(value.size()), at::kLong);
  std::vector<at::Tensor> lengths = all_gather(length);
  int64_t longest = 0;
  for (const auto& l : lengths) longest = std::max(longest, l.item<int64_t>());
  at::Tensor bytes = at::zeros({std::max<int64_t>(longest, 1)}, at::kByte);
  std::memcpy(bytes.data_ptr<uint8_t>(), value.data(), value.size());
  std::vector<at::Tensor> all = all_gather(bytes);
  std::vector<std::string> out;
  for (size_t i = 0; i < all.size(); ++i)
    out.emplace_back(reinterpret_cast<const char*>(all[i].data_ptr<uint8_t>()),
                     static_cast<size_t>(lengths[i].item<int64_t>()));
  return out;
}

}  // namespace keel::parallel
