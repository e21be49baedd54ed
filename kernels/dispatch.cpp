// Why: see dispatch.h.
#include "kernels/dispatch.h"

#include <ATen/core/Tensor.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "keel/config.h"

#if KEEL_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

namespace keel::kernels {

bool cuda_kernels_built() {
#if KEEL_WITH_CUDA
  return true;
#else
  return false;
#endif
}

bool use_fused(const at::Tensor& t) {
  static const bool disabled = [] {
    const char* v = std::getenv("KEEL_DISABLE_FUSED_KERNELS");
    return v != nullptr && std::strcmp(v, "") != 0 && std::strcmp(v, "0") != 0;
  }();
  return cuda_kernels_built() && !disabled && t.defined() && t.is_cuda();
}

namespace {
std::atomic<bool> g_fused_ops_on_cpu{false};
}  // namespace

bool model_uses_fused_ops(const at::Tensor& t) {
  return use_fused(t) || (g_fused_ops_on_cpu.load() && t.defined() && !t.is_cuda());
}

void set_fused_ops_on_cpu(bool on) { g_fused_ops_on_cpu.store(on); }

void set_current_cuda_device(int device_index) {
#if KEEL_WITH_CUDA
  const int count = static_cast<int>(c10::cuda::device_count());
  if (device_index < 0 || device_index >= count) {
    throw std::out_of_range("set_current_cuda_device: device " + std::to_string(device_index) + " outside [0, " +
                            std::to_string(count) + ")");
  }
  c10::cuda::set_device(static_cast<c10::DeviceIndex>(device_index));
#else
  throw std::logic_error("set_current_cuda_device(" + std::to_string(device_index) +
                         "): this build of Keel has no CUDA");
#endif
}

long long cuda_peak_allocated_bytes(int device_index) {
#if KEEL_WITH_CUDA
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device_index));
  return static_cast<long long>(stats.allocated_bytes[0].peak);  // [0]: the aggregate over pool kinds
#else
  (void)device_index;
  return -1;
#endif
}

}  // namespace keel::kernels
