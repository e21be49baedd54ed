// Why: see async_saver.h.
#include "core/train/async_saver.h"

#include <filesystem>

#include "core/checkpoint/checkpoint_error.h"
#include "core/checkpoint/durable_fs.h"
#include "core/checkpoint/sha256.h"

namespace keel::train {

torch::Tensor HostSnapshot::copy(const std::string& key, const torch::Tensor& tensor, bool pinned) {
  if (!tensor.defined()) return tensor;
  auto it = buffers_.find(key);
  if (it == buffers_.end() || it->second.sizes() != tensor.sizes() ||
      it->second.scalar_type() != tensor.scalar_type()) {
    const auto options = torch::TensorOptions().dtype(tensor.scalar_type()).device(torch::kCPU).pinned_memory(pinned);
    it = buffers_.insert_or_assign(key, torch::empty(tensor.sizes(), options)).first;
  }
  it->second.copy_(tensor.detach(), /*non_blocking=*/pinned);
  return it->second;
}

void HostSnapshot::take(checkpoint::TrainingState& st, const torch::Device& device) {
  torch::NoGradGuard no_grad;
  const bool pinned = device.is_cuda();
  for (auto& [name, tensor] : st.model) tensor = copy("model/" + name, tensor, pinned);
  for (auto& [name, tensor] : st.optimizer) tensor = copy("optimizer/" + name, tensor, pinned);
  for (auto& plugin : st.plugins) {
    for (auto& [name, tensor] : plugin.tensors)
      tensor = copy("plugins/" + plugin.slot + "/" + plugin.name + "/" + name, tensor, pinned);
  }
  // The generator states are fresh CPU tensors already (Generator::get_state copies).
  if (pinned) torch::cuda::synchronize(device.index());  // every non-blocking copy has landed
}

int64_t HostSnapshot::bytes() const {
  int64_t total = 0;
  for (const auto& [key, buffer] : buffers_) total += buffer.numel() * static_cast<int64_t>(buffer.element_size());
  return total;
}

AsyncSaver::~AsyncSaver() {
  if (future_.valid()) future_.wait();
}

void AsyncSaver::start(PendingSave save, checkpoint::TrainingState state, const std::string& path,
                       checkpoint::RankInfo rank, const std::string& fail) {
  TORCH_CHECK(!in_flight(), "a checkpoint save is already in flight (step ", save_.step, ")");
  save_ = std::move(save);
  status_ = Status::kWriting;
  // The thread owns its copy of the state; it touches nothing of the trainer and runs no collective.
  future_ = std::async(std::launch::async, [state = std::move(state), path, rank, fail]() {
    if (!fail.empty()) throw checkpoint::CheckpointError(fail);
    checkpoint::write_rank_file(path, state, rank);
    checkpoint::fsync_path(path);
    checkpoint::FileDigest digest;
    digest.bytes = static_cast<int64_t>(std::filesystem::file_size(path));
    digest.sha256 = checkpoint::sha256_file(path);
    return digest;
  });
}

AsyncSaver::Status AsyncSaver::poll(bool wait) {
  if (future_.valid()) {
    if (!wait && future_.wait_for(std::chrono::seconds(0)) != std::future_status::ready) return Status::kWriting;
    try {
      digest_ = future_.get();
      status_ = Status::kDone;
    } catch (const std::exception& e) {
      error_ = e.what();
      status_ = Status::kFailed;
    }
  }
  return status_;
}

void AsyncSaver::clear() {
  if (future_.valid()) future_.wait();
  future_ = {};
  status_ = Status::kIdle;
  save_ = PendingSave();
  digest_ = checkpoint::FileDigest();
  error_.clear();
}

}  // namespace keel::train
