// Why: a run directory is a record of an experiment; Keel never overwrites one by accident. This is the one
// place that decides whether a directory may be (re)used.
#pragma once

#include <string>

namespace keel::train {

struct RunPaths {
  std::string root;
  std::string config_ini() const { return root + "/config.ini"; }
  std::string metrics_h5() const { return root + "/metrics.h5"; }
  std::string log_file() const { return root + "/train.log"; }
  std::string checkpoints() const { return root + "/checkpoints"; }
  std::string lineage_json() const { return root + "/lineage.json"; }
};

// Creates `dir` for a new run. An existing non-empty directory is refused (std::runtime_error naming it)
// unless `force`, in which case only the files a run writes (config.ini, metrics.h5, train.log, checkpoints/)
// are removed first.
RunPaths create_run_dir(const std::string& dir, bool force);

}  // namespace keel::train
