// Why: the host's fused optimizer kernels take one LR per call, while sdk::Param::lr_scale gives a param its own
// multiple of the step's LR (μP: hidden matrices get base width / width). A built-in optimizer's fused path makes
// one call per group of params sharing an lr_scale; without μP that is one call, as before. Header-only (this
// folder is not a plugin).
#pragma once

#include <cstddef>
#include <vector>

#include "keel/plugin.h"

namespace keel::plugins {

struct LrGroup {
  double lr_scale = 1.0;
  std::vector<size_t> indices;  // into the params, in their order
};

// The `candidates` (indices into `params`) grouped by lr_scale, groups in the order their scale first appears.
inline std::vector<LrGroup> lr_groups(const std::vector<keel::sdk::Param>& params,
                                      const std::vector<size_t>& candidates) {
  std::vector<LrGroup> groups;
  for (const size_t i : candidates) {
    LrGroup* group = nullptr;
    for (auto& g : groups)
      if (g.lr_scale == params[i].lr_scale) group = &g;
    if (group == nullptr) group = &groups.emplace_back(LrGroup{params[i].lr_scale, {}});
    group->indices.push_back(i);
  }
  return groups;
}

// The indices of the params that have a gradient this step.
inline std::vector<size_t> with_grad(const std::vector<keel::sdk::Param>& params) {
  std::vector<size_t> out;
  for (size_t i = 0; i < params.size(); ++i)
    if (params[i].param.grad().defined()) out.push_back(i);
  return out;
}

}  // namespace keel::plugins
