// Why: the host's fused optimizer kernels take one LR per call, while sdk::Param::lr_scale gives a param its own
// multiple of the step's LR (μP: hidden matrices get base width / width). A built-in optimizer's fused path makes
// one call per distinct lr_scale, in first-seen order; without μP that is one call, as before. Header-only (this
// folder is not a plugin).
#pragma once

#include <algorithm>
#include <vector>

#include "keel/plugin.h"

namespace keel::plugins {

// The distinct lr_scale values of `params`, in the order they first appear.
inline std::vector<double> distinct_lr_scales(const std::vector<keel::sdk::Param>& params) {
  std::vector<double> scales;
  for (const auto& p : params)
    if (std::find(scales.begin(), scales.end(), p.lr_scale) == scales.end()) scales.push_back(p.lr_scale);
  return scales;
}

}  // namespace keel::plugins
