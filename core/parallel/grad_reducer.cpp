// Why: see grad_reducer.h. Both paths (post-backward and overlapped) share one launch routine: pack whatever
// the hooks have not packed from .grad, start the bucket's all-reduce; all_reduce_mean() launches the rest in
// order, waits bucket by bucket, divides by the DP size and writes the mean back into every .grad.
#include "core/parallel/grad_reducer.h"

#include <torch/torch.h>

namespace keel::parallel {

GradReducer::GradReducer(std::vector<at::Tensor> params, std::shared_ptr<Communicator> dp, double bucket_mb)
    : params_(std::move(params)), dp_(std::move(dp)) {
  TORCH_CHECK(dp_, "GradReducer: no DP communicator");
  TORCH_CHECK(bucket_mb > 0.0, "parallel.bucket_mb must be > 0, got ", bucket_mb);
  const int64_t cap = std::max<int64_t>(1, static_cast<int64_t>(bucket_mb * 1024.0 * 1024.0 / sizeof(float)));
  const size_t n = params_.size();
  location_.assign(n, {0, 0});
  hook_handles_.assign(n, 0);
  hooked_.assign(n, false);
  seen_.assign(n, false);

  Bucket current;
  auto close = [&] {
    if (!current.params.empty()) buckets_.push_back(std::move(current));
    current = Bucket{};
  };
  for (size_t k = n; k-- > 0;) {  // reverse model order: the order backward produces gradients in
    const at::Tensor& p = params_[k];
    TORCH_CHECK(p.defined(), "GradReducer: parameter ", k, " is undefined");
    if (!current.params.empty() && (current.numel + p.numel() > cap || current.device != p.device())) close();
    if (current.params.empty()) current.device = p.device();
    location_[k] = {static_cast<int64_t>(buckets_.size()), static_cast<int64_t>(current.params.size())};
    current.params.push_back(static_cast<int64_t>(k));
    current.offsets.push_back(current.numel);
    current.numel += p.numel();
  }
  close();

  if (dp_->single()) return;
  for (size_t k = 0; k < n; ++k) {
    if (!params_[k].requires_grad()) continue;
    TORCH_CHECK(params_[k].is_leaf(), "GradReducer: parameter ", k, " is not a leaf tensor");
    const int64_t index = static_cast<int64_t>(k);
    // The lambda holds `this`, never the parameter: a parameter owning a hook that owns the parameter would leak.
    hook_handles_[k] =
        params_[k].register_hook([this, index](const at::Tensor& incoming) { on_gradient(index, incoming); });
    hooked_[k] = true;
  }
}

GradReducer::~GradReducer() {
  for (size_t k = 0; k < params_.size(); ++k)
    if (hooked_[k]) params_[k].remove_hook(hook_handles_[k]);
}

void GradReducer::pack(Bucket& bucket, size_t slot, const at::Tensor& grad) {
  const int64_t index = bucket.params[slot];
  at::Tensor target = bucket.flat.narrow(0, bucket.offsets[slot], params_[static_cast<size_t>(index)].numel());
  if (grad.defined()) {
    target.copy_(grad.reshape({-1}));  // [numel] fp32
  } else {
    target.zero_();
  }
}

void GradReducer::prepare_overlap() {
  if (dp_->single()) return;
  std::lock_guard<std::mutex> lock(mutex_);
  TORCH_CHECK(!armed_, "GradReducer::prepare_overlap() called twice without all_reduce_mean() in between");
  armed_ = true;
  next_to_launch_ = 0;
  for (auto& bucket : buckets_) {
    bucket.ready = 0;
    bucket.launched = false;
  }
  std::fill(seen_.begin(), seen_.end(), false);
}

void GradReducer::on_gradient(int64_t param_index, const at::Tensor& incoming) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!armed_) return;
  const size_t k = static_cast<size_t>(param_index);
  TORCH_CHECK(!seen_[k], "GradReducer: parameter ", param_index,
              " received a second gradient after prepare_overlap(); call it just before the step's last backward");
  seen_[k] = true;
  at::NoGradGuard no_grad;
  Bucket& bucket = buckets_[static_cast<size_t>(location_[k].first)];
  if (!bucket.flat.defined())
    bucket.flat = at::empty({bucket.numel}, at::TensorOptions().dtype(at::kFloat).device(bucket.device));
  // The hook runs before AccumulateGrad: .grad still holds the earlier micro-batches only.
  const size_t slot = static_cast<size_t>(location_[k].second);
  pack(bucket, slot, incoming);
  const at::Tensor& earlier = params_[k].grad();
  if (earlier.defined()) {
    bucket.flat.narrow(0, bucket.offsets[slot], params_[k].numel()).add_(earlier.reshape({-1}));
  }
  ++bucket.ready;
  launch_ready_buckets_in_order();
}

void GradReducer::launch_ready_buckets_in_order() {
  while (next_to_launch_ < buckets_.size()) {
    Bucket& bucket = buckets_[next_to_launch_];
    int64_t hooked = 0;
    for (int64_t index : bucket.params) hooked += hooked_[static_cast<size_t>(index)] ? 1 : 0;
    if (bucket.ready < hooked) return;  // a gradient of this bucket is still to come
    if (!bucket.flat.defined())
      bucket.flat = at::empty({bucket.numel}, at::TensorOptions().dtype(at::kFloat).device(bucket.device));
    for (size_t slot = 0; slot < bucket.params.size(); ++slot) {
      const size_t k = static_cast<size_t>(bucket.params[slot]);
      if (!seen_[k]) pack(bucket, slot, params_[k].grad());  // no gradient in this backward: .grad is final
    }
    bucket.work = dp_->all_reduce_async(bucket.flat);
    bucket.launched = true;
    ++next_to_launch_;
  }
}

void GradReducer::all_reduce_mean() {
  if (dp_->single()) return;
  std::lock_guard<std::mutex> lock(mutex_);
  at::NoGradGuard no_grad;
  overlapped_buckets_ = armed_ ? static_cast<int64_t>(next_to_launch_) : 0;
  if (!armed_) {
    next_to_launch_ = 0;
    for (auto& bucket : buckets_) bucket.ready = 0;
    std::fill(seen_.begin(), seen_.end(), false);
  }
  armed_ = false;
  // Everything not launched yet: the hooks no longer matter, every remaining .grad is final.
  for (auto& bucket : buckets_)
    if (!bucket.launched) bucket.ready = static_cast<int64_t>(bucket.params.size());
  launch_ready_buckets_in_order();

  for (auto& bucket : buckets_) {
    bucket.work.wait();
    bucket.flat.div_(static_cast<double>(dp_->size()));  // [numel] fp32 mean
    for (size_t slot = 0; slot < bucket.params.size(); ++slot) {
      at::Tensor& param = params_[static_cast<size_t>(bucket.params[slot])];
      at::Tensor mean = bucket.flat.narrow(0, bucket.offsets[slot], param.numel()).view(param.sizes());
      if (param.grad().defined()) {
        param.mutable_grad().copy_(mean);
      } else {
        param.mutable_grad() = mean.to(param.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
      }
    }
    bucket.flat = at::Tensor();
    bucket.launched = false;
    bucket.ready = 0;
  }
  next_to_launch_ = 0;
  std::fill(seen_.begin(), seen_.end(), false);
}

}  // namespace keel::parallel
