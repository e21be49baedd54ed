// Why: see run_dir.h.
#include "core/train/run_dir.h"

#include <filesystem>
#include <stdexcept>

namespace keel::train {

RunPaths create_run_dir(const std::string& dir, bool force) {
  namespace fs = std::filesystem;
  RunPaths paths{dir};
  if (fs::exists(dir)) {
    if (!fs::is_directory(dir)) throw std::runtime_error("run dir " + dir + " exists and is not a directory");
    if (!fs::is_empty(dir)) {
      if (!force)
        throw std::runtime_error("run dir " + dir + " already holds a run; choose a new --run-dir or pass --force to replace it");
      for (const auto& path : {paths.config_ini(), paths.metrics_h5(), paths.log_file(), paths.lineage_json(), paths.checkpoints()})
        fs::remove_all(path);
    }
  }
  fs::create_directories(dir);
  return paths;
}

}  // namespace keel::train
