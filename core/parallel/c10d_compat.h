// Why: the c10d differences between LibTorch 1.13 (Debian, CPU) and 2.x (GPU machine) in one place, like
// core/torch_compat.h for ATen. Include only from core/parallel/*.cpp: it pulls in c10d and Gloo headers.
#pragma once

#include <torch/version.h>

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#if TORCH_VERSION_MAJOR >= 2
#include <torch/csrc/distributed/c10d/Backend.hpp>
#endif

#include "core/parallel/communicator.h"
#include "keel/config.h"

// The backends themselves: Gloo when its headers exist (Debian's libgloo-dev; PyTorch's wheels ship the Gloo
// library but not its headers), NCCL in CUDA builds (KEEL_WITH_NCCL, keel/config.h).
#if __has_include(<gloo/algorithm.h>)
#define KEEL_HAVE_GLOO 1
#ifndef USE_C10D_GLOO
#define USE_C10D_GLOO
#endif
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#if KEEL_WITH_NCCL
#ifndef USE_C10D_NCCL
#define USE_C10D_NCCL
#endif
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

namespace keel::parallel::compat {

// 1.13: backends derive from ProcessGroup; 2.x: from Backend (ProcessGroup became a dispatching wrapper).
#if TORCH_VERSION_MAJOR >= 2
using BackendBase = ::c10d::Backend;
#else
using BackendBase = ::c10d::ProcessGroup;
#endif

}  // namespace keel::parallel::compat

namespace keel::parallel {
// What a Communicator of size > 1 talks through.
struct Communicator::Impl {
  c10::intrusive_ptr<compat::BackendBase> backend;
  WireKind kind = WireKind::kGloo;
  at::Device staging{at::kCPU};  // NCCL: this rank's CUDA device, through which CPU tensors travel
};
}  // namespace keel::parallel
