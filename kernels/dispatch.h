// Why: one place answers "may this tensor take a fused CUDA kernel?", so the model, the optimizers and the tests
// agree. The kernels exist only in CUDA builds; on CPU (and for any tensor not on a GPU) every op runs its
// LibTorch reference, which is also what the kernel tests compare against.
#pragma once

namespace at {
class Tensor;
}

namespace keel::kernels {

// True in a build where kernels/cuda was compiled and linked (KEEL_WITH_CUDA).
bool cuda_kernels_built();

// True when `t` lives on a CUDA device, the kernels are built, and KEEL_DISABLE_FUSED_KERNELS is unset or "0"
// (the switch a user flips to compare against the unfused path).
bool use_fused(const at::Tensor& t);

// What the model asks before it takes a fused op: use_fused(t), or, for tests, any tensor while
// set_fused_ops_on_cpu(true) is in force. On CPU the ops then run their autograd wrappers around the LibTorch
// references (explicit backward, chunked cross-entropy), so a CPU test covers the model's fused path everywhere
// but inside the kernels themselves.
bool model_uses_fused_ops(const at::Tensor& t);
void set_fused_ops_on_cpu(bool on);

// Makes CUDA device `device_index` the calling thread's current device (what torch.cuda.set_device does), so that
// streams, handles and kernel launches of this rank go to its own GPU instead of also creating a context on GPU 0.
// std::logic_error in a build without CUDA; std::out_of_range for an index outside [0, device count).
void set_current_cuda_device(int device_index);

// Peak bytes held by LibTorch's CUDA caching allocator on `device_index` since the process started (what
// torch.cuda.max_memory_allocated() reports); -1 in a build without CUDA.
long long cuda_peak_allocated_bytes(int device_index);

}  // namespace keel::kernels
