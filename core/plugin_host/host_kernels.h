// Why: optimizer plugins are built against the SDK alone and do not link keel_core, yet on a GPU they should update
// all their tensors in one fused launch. The SDK declares the table they are lent (sdk::HostKernels, passed as
// StepContext::kernels); this is the host side that fills it with kernels/optimizer_step.h's functions. It lives
// here, on the host's side of the plugin boundary, so that kernels/ depends on nothing of the SDK (the dependency
// rule: plugins -> sdk <- core).
#pragma once

#include "keel/plugin.h"

namespace keel::plugin_host {

// {adamw_step, lion_step} of kernels/optimizer_step.h behind the SDK's signatures: what the trainer puts in
// StepContext::kernels. The same table for the program's life.
const sdk::HostKernels* host_kernels();

}  // namespace keel::plugin_host
