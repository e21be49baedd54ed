// Why: data parallelism's one communication: after the step's last backward every DP replica must hold the mean
// of all replicas' gradients. Reducing tensor by tensor would pay the collective's latency hundreds of times, so
// gradients are packed into flat fp32 buckets of ~parallel.bucket_mb (PyTorch DDP's and Megatron's design) and
// each bucket is all-reduced asynchronously as soon as it is packed.
//
// Bucket layout: parameters in reverse order (backward produces the last layers' gradients first), a new bucket
// whenever the next parameter would take the current one past the cap (or lives on another device). The layout
// depends only on the parameters' shapes, so every rank agrees on it; an undefined gradient packs as zeros.
//
// Overlap with backward (optional): prepare_overlap() before the step's last backward arms a hook on every
// parameter; when a bucket's last gradient arrives, its all-reduce starts while backward is still running.
// Buckets are always launched in index order (0, 1, ...), whatever order the hooks fire in, so every rank issues
// the same sequence of collectives (the rule DDP follows). The hooks use only the public
// `Tensor::register_hook` (the same in LibTorch 1.13 and 2.x): a leaf's hook sees the gradient of this backward
// before it is accumulated, so the hook packs `.grad (earlier micro-batches) + incoming` itself, and
// all_reduce_mean() overwrites .grad with the mean at the end. Our hook must be the last hook on a parameter
// (gradient transforms belong after the reduction, in the staged optimizer step).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "core/parallel/communicator.h"

namespace keel::parallel {

class GradReducer {
 public:
  // `params`: the trainable parameters in model order, the same shapes on every rank of `dp`. `bucket_mb`:
  // bucket cap in MiB of fp32 (parallel.bucket_mb); a parameter larger than the cap gets a bucket of its own.
  GradReducer(std::vector<at::Tensor> params, std::shared_ptr<Communicator> dp, double bucket_mb);
  ~GradReducer();
  GradReducer(const GradReducer&) = delete;
  GradReducer& operator=(const GradReducer&) = delete;

  // Averages every parameter's .grad over the DP group (an undefined .grad counts as zeros and ends defined).
  // DP size 1: nothing. After prepare_overlap(), finishes the buckets the hooks launched and launches the rest.
  void all_reduce_mean();

  // Arms the hooks for the next backward pass: call it just before the step's last backward (e.g. from
  // PipelineStage::before_backward for micro == microbatches - 1). Each parameter must receive at most one
  // gradient between this call and all_reduce_mean(). DP size 1: nothing.
  void prepare_overlap();

  int64_t bucket_count() const { return static_cast<int64_t>(buckets_.size()); }
  // Parameter indices of bucket `b`, in packing order (reverse model order).
  const std::vector<int64_t>& bucket_params(int64_t b) const { return buckets_.at(static_cast<size_t>(b)).params; }
  // How many buckets the last all_reduce_mean() found already launched from backward hooks (0 without overlap).
  int64_t overlapped_buckets() const { return overlapped_buckets_; }

 private:
  struct Bucket {
    std::vector<int64_t> params;   // parameter indices, reverse model order
    std::vector<int64_t> offsets;  // element offset of each parameter in `flat`
    int64_t numel = 0;
    at::Device device = at::Device(at::kCPU);
    at::Tensor flat;    // [numel] fp32 while a reduction is in flight
    int64_t ready = 0;  // parameters packed so far (overlap mode)
    bool launched = false;
    PendingWork work;
  };

  void pack(Bucket& bucket, size_t slot, const at::Tensor& grad);     // grad undefined = zeros
  void launch_ready_buckets_in_order();                               // caller holds mutex_
  void on_gradient(int64_t param_index, const at::Tensor& incoming);  // the autograd hook

  std::vector<at::Tensor> params_;
  std::shared_ptr<Communicator> dp_;
  std::vector<Bucket> buckets_;
  std::vector<std::pair<int64_t, int64_t>> location_;  // per parameter: (bucket, slot in bucket)
  std::vector<unsigned> hook_handles_;                 // per parameter (unused where no grad is required)
  std::vector<bool> hooked_;                           // per parameter
  std::vector<bool> seen_;                             // per parameter: packed by a hook since prepare_overlap()
  std::mutex mutex_;
  bool armed_ = false;
  size_t next_to_launch_ = 0;
  int64_t overlapped_buckets_ = 0;
};

}  // namespace keel::parallel
