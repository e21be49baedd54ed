// Why: every plugin test does the same three things — load a built-in plugin's .so through the real loader,
// make small fp32 params with gradients, and fill a StepContext — so they are written once here.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/plugin_host/plugin_library.h"
#include "keel/plugin.h"

namespace keel::testing {

inline std::string plugin_path(const std::string& name) {
  return std::string(KEEL_PLUGIN_DIR) + "/keel_plugin_" + name + ".so";
}

inline std::shared_ptr<plugin_host::PluginLibrary> load_plugin_library(const std::string& name) {
  return plugin_host::PluginLibrary::load(plugin_path(name));
}

// A plugin object from the built-in library `name` (the object keeps its library loaded).
inline std::shared_ptr<sdk::Plugin> make_plugin(const std::string& name, const sdk::Args& args = {}) {
  return load_plugin_library(name)->create(args);
}

// The message with which make_plugin(name, args) is refused, or "(accepted)".
inline std::string refusal_of(const std::string& name, const sdk::Args& args) {
  try {
    make_plugin(name, args);
  } catch (const plugin_host::PluginError& e) {
    return e.what();
  }
  return "(accepted)";
}

// The what() of what `fn` throws, or "(no exception)".
inline std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no exception)";
}

// A master weight as Keel binds it: an fp32 leaf that requires grad, with `grad` set as its gradient.
inline sdk::Param make_param(const std::string& name, const at::Tensor& values, const at::Tensor& grad,
                             bool decay = true) {
  at::Tensor p = values.to(at::kFloat).clone().set_requires_grad(true);  // [any shape], fp32
  p.mutable_grad() = grad.to(at::kFloat).clone();
  return sdk::Param{name, p, decay};
}

inline at::Tensor floats(std::vector<float> values) {
  return at::tensor(at::ArrayRef<float>(values), at::TensorOptions().dtype(at::kFloat));
}

// A context whose metric() calls land in `metrics` (the last value per name).
inline sdk::StepContext context_recording(std::map<std::string, double>& metrics) {
  sdk::StepContext ctx;
  ctx.metric = [&metrics](const std::string& name, double value) { metrics[name] = value; };
  return ctx;
}

}  // namespace keel::testing
