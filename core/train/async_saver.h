// Why: with checkpoint.async = true a periodic save must not stall training for the whole write (minutes for a
// 65B model). The state is copied to host memory at the step boundary (HostSnapshot: buffers kept from save to
// save, pinned on a GPU so that the device-to-host copies run non-blocking), and one background thread per rank
// writes that copy to its rank file, fsyncs it and hashes it (AsyncSaver). The background thread runs no
// collective: the ranks agree that every file is durable at a later step boundary, on the training thread,
// where rank 0 also commits (core/train/checkpointer.cpp, docs/checkpoints.md "Asynchronous saves").
#pragma once

#include <torch/torch.h>

#include <chrono>
#include <cstdint>
#include <future>
#include <map>
#include <string>

#include "core/checkpoint/checkpoint_store.h"
#include "core/checkpoint/training_state.h"
#include "core/config/config.h"

namespace keel::train {

// Host copies of every tensor a checkpoint writes, in buffers reused by the next save when the shape and dtype
// match (no page faults, no pinning per save). The previous save's write must be finished before take().
class HostSnapshot {
 public:
  // Replaces the model, optimizer, plugin and RNG tensors of `st` by host copies. `device` is where training
  // runs: on CUDA the copies go into pinned buffers, non-blocking, and the device is synchronized once at the end.
  void take(checkpoint::TrainingState& st, const torch::Device& device);
  int64_t bytes() const;  // held in the buffers

 private:
  torch::Tensor copy(const std::string& key, const torch::Tensor& tensor, bool pinned);
  std::map<std::string, torch::Tensor> buffers_;
};

// What the training thread keeps of a save in flight, to commit it once every rank's file is durable.
struct PendingSave {
  int64_t step = 0;
  std::string tmp;     // ROOT/step-N.tmp, created by rank 0
  std::string reason;  // for the event and the log line
  Config config;       // as it was at the snapshot (the manifest's model keys)
  std::string config_ini, lineage, data_fingerprint;
  std::chrono::steady_clock::time_point started;
  double stall_s = 0.0;  // training time the snapshot took
};

// At most one save in flight per rank. Not thread-safe: only the training thread calls it.
class AsyncSaver {
 public:
  enum class Status { kIdle = -1, kDone = 0, kWriting = 1, kFailed = 2 };  // ordered: the ranks take the max

  AsyncSaver() = default;
  AsyncSaver(const AsyncSaver&) = delete;
  AsyncSaver& operator=(const AsyncSaver&) = delete;
  // Waits for a write still running (no thread outlives the trainer); an uncommitted save stays a .tmp.
  ~AsyncSaver();

  HostSnapshot& snapshot() { return snapshot_; }
  // Starts writing `state` (host copies) to `path` on a background thread: the checks of write_rank_file, the
  // file, fsync, SHA-256. `fail` (a test's KEEL_TEST_FAULT save_fail) makes the write fail with that message.
  void start(PendingSave save, checkpoint::TrainingState state, const std::string& path, checkpoint::RankInfo rank,
             const std::string& fail);
  bool in_flight() const { return future_.valid() || status_ != Status::kIdle; }
  // Without blocking (or, with `wait`, after the write ends): kDone, kWriting or kFailed; kIdle with no save.
  Status poll(bool wait);
  const PendingSave& save() const { return save_; }
  const checkpoint::FileDigest& digest() const { return digest_; }  // kDone
  const std::string& error() const { return error_; }               // kFailed
  // Forgets the finished save (committed, or given up on); the buffers stay for the next one.
  void clear();

 private:
  HostSnapshot snapshot_;
  PendingSave save_;
  std::future<checkpoint::FileDigest> future_;
  Status status_ = Status::kIdle;
  checkpoint::FileDigest digest_;  // this rank's file, written, fsynced and hashed
  std::string error_;
};

}  // namespace keel::train
