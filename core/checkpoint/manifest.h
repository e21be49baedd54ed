// Why: manifest.json is the commit record of a checkpoint. It is written last, lists every file with its size
// and SHA-256, and carries what a resume must check before touching a tensor (model shape, data fingerprint,
// layout). A directory whose manifest is missing, malformed or does not match its files is not a checkpoint.
// The parser treats the file as hostile input (it is fuzzed): every field is type- and range-checked and
// file names must be plain names inside the directory. Torch-free.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace keel::checkpoint {

constexpr int kCheckpointFormatVersion = 1;
constexpr const char* kManifestName = "manifest.json";

struct ManifestFile {
  std::string name;   // plain file name inside the checkpoint directory
  int64_t rank = -1;  // the rank that wrote it; -1 for files shared by all ranks (config.ini)
  int64_t bytes = 0;
  std::string sha256;  // lower-case hex
};

struct Layout {
  int64_t dp = 1, tp = 1, pp = 1;
  int64_t world_size() const { return dp * tp * pp; }
};

struct Manifest {
  int format_version = kCheckpointFormatVersion;
  std::string keel_version;
  int64_t step = 0;     // optimizer steps completed; training resumes at step index `step`
  std::string created;  // UTC ISO 8601
  std::string run_id;
  Layout layout;
  std::string config_hash;                   // SHA-256 of config.ini
  std::map<std::string, std::string> model;  // model.* keys of the resolved config (checked before loading)
  std::string data_fingerprint;              // the data loader's fingerprint (JSON text)
  std::string lineage;                       // the run's lineage (JSON text)
  std::vector<ManifestFile> files;
  // True when every rank file's model and optimizer tensors were checked finite before the commit; absent in
  // manifests of older Keel versions (unknown). Retention never prunes the newest checkpoint where it is true.
  std::optional<bool> tensors_finite;

  const ManifestFile* rank_file(int64_t rank) const;
};

// "rank-00003.h5"
std::string rank_file_name(int64_t rank);
std::string manifest_to_json(const Manifest& manifest);
// Throws CheckpointError("ORIGIN: manifest field 'FIELD': ...") for anything malformed.
Manifest parse_manifest(const std::string& text, const std::string& origin);

// The config of a checkpoint, shared by all ranks and required in every manifest.
constexpr const char* kConfigName = "config.ini";

// Reads DIR/manifest.json and checks the directory against it: every listed file's size and SHA-256, that
// config.ini and every rank file of the layout are listed, that nothing else is in the directory, that
// config_hash is the SHA-256 of config.ini, and that a directory named step-N holds step N. Throws
// CheckpointError naming the directory and the first file (or step) that does not match.
Manifest verify_checkpoint_dir(const std::string& dir);

}  // namespace keel::checkpoint
