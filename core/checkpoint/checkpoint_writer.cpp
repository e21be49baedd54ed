// Why: see checkpoint_writer.h.
#include "core/checkpoint/checkpoint_writer.h"

#include <nlohmann/json.hpp>

#include "core/checkpoint/checkpoint_error.h"
#include "core/checkpoint/durable_fs.h"
#include "core/checkpoint/sha256.h"
#include "keel/version.h"

namespace keel::checkpoint {

std::string lr_schedule_json(const Config& config, int64_t next_step, double lr_factor, int64_t lr_factor_until) {
  return nlohmann::json{{"kind", "warmup_cosine"},
                        {"lr", config.optim.lr},
                        {"min_lr", config.optim.min_lr},
                        {"warmup_steps", config.optim.warmup_steps},
                        {"decay_steps", config.lr_decay_steps()},
                        {"next_step", next_step},
                        {"lr_factor", lr_factor},
                        {"lr_factor_until", lr_factor_until},
                        {"lr_schedule_plugin", config.plugins.lr_schedule}}
      .dump();
}

Manifest run_manifest(const Config& config, const std::string& config_ini, const std::string& run_id,
                      const std::string& created, const Layout& layout, const std::string& data_fingerprint,
                      const std::string& lineage) {
  Manifest manifest;
  manifest.keel_version = KEEL_VERSION;
  manifest.created = created;
  manifest.run_id = run_id;
  manifest.layout = layout;
  manifest.config_hash = sha256_hex(config_ini);
  for (const auto& [key, value] : flatten(config)) {
    if (key.rfind("model.", 0) == 0) manifest.model[key] = value;
  }
  manifest.data_fingerprint = data_fingerprint;
  manifest.lineage = lineage;
  return manifest;
}

namespace {

// The one-rank checkpoint protocol of both writers: begin, the rank file (`write`), config.ini, commit.
std::string write_one_rank(CheckpointStore& store, int64_t step, const TrainingState& state, const Manifest& manifest,
                           const char* writer, const std::function<void(const std::string&)>& write) {
  if (manifest.layout.world_size() != 1) {
    throw CheckpointError(store.root() + ": " + writer + " writes a 1 x 1 x 1 layout, the manifest says " +
                          std::to_string(manifest.layout.world_size()) + " ranks");
  }
  const std::string tmp = store.begin(step);
  write(tmp + "/" + rank_file_name(0));
  write_file_atomically(tmp + "/" + kConfigName, state.config_ini);
  return store.commit(step, manifest, {{rank_file_name(0), 0}, {kConfigName, -1}});
}

}  // namespace

std::string write_whole_checkpoint(CheckpointStore& store, int64_t step, const TrainingState& state,
                                   const Manifest& manifest) {
  return write_one_rank(store, step, state, manifest, "write_whole_checkpoint", [&](const std::string& path) {
    write_rank_file(path, state, {0, 1});
  });
}

std::string write_streamed_checkpoint(CheckpointStore& store, int64_t step, const TrainingState& state,
                                      const Manifest& manifest, const TensorSource& model,
                                      const TensorSource& optimizer) {
  return write_one_rank(store, step, state, manifest, "write_streamed_checkpoint", [&](const std::string& path) {
    write_rank_file_streaming(path, state, {0, 1}, model, optimizer);
  });
}

}  // namespace keel::checkpoint
