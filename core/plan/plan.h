// Why: before a large run is started (a 65B model on hundreds of GPUs), a user needs to know which layout fits:
// what each rank holds, what each step sends over each process group, and which tensor is the largest. All of it
// follows from the config alone, so `keel plan` computes it without allocating a tensor (torch-free, like
// core/config). The inventory mirrors what Keel's code keeps alive, not a generic transformer formula: fp32
// master weights and gradients, the optimizer plugin's fp32 state (ZeRO-1 shards it over DP), the compute-dtype
// weight copies each in-flight micro-batch holds for its backward, the tensors autograd saves per block on the
// fused path (CUDA kernels + fused attention) or the reference path (LibTorch ops, math attention), and the
// largest transient of a backward. docs/parallel.md ("keel plan") lists each term and what it was checked against.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/config/config.h"
#include "core/config/memory_estimate.h"

namespace keel::plan {

// Which implementation the activations are counted for. kFused: train.device = cuda (the fused kernels of
// kernels/ and at::scaled_dot_product_attention's flash/cuDNN backends: no [T, T] tensor is kept). kReference:
// train.device = cpu (LibTorch ops with fp32 statistics; attention by the math path with a [H, T, T] softmax).
enum class KernelPath { kFused, kReference };

// The model's parameter tensors (core/config/memory_estimate.h), under this namespace too.
using keel::parameter_tensors;
using keel::ParameterTensor;

// Bytes one rank of a pipeline stage holds or moves. Every dp x tp rank of a stage has the same numbers.
struct StagePlan {
  int64_t pp_rank = 0;
  int64_t first_layer = 0, layers = 0;
  bool embedding = false, head = false;
  int64_t ranks = 1;                  // dp x tp ranks with these numbers
  double parameters = 0;              // this rank's share (TP shards of the stage's tensors)
  double params_bytes = 0;            // fp32 master weights
  double grads_bytes = 0;             // fp32 gradients
  double optimizer_bytes = 0;         // the optimizer's fp32 state, / dp under ZeRO-1
  double weight_copy_bytes = 0;       // compute-dtype weight copies: one per in-flight micro-batch (bf16-mixed only)
  double activation_bytes = 0;        // saved for backward by one micro-batch
  int64_t inflight_microbatches = 1;  // micro-batches whose activations are alive at once (1F1B: min(pp - s, M))
  double workspace_bytes = 0;         // the largest transient of one block's backward (gradients of its activations)
  double total_bytes =
      0;  // all of the above: params + grads + optimizer + in-flight (copies + activations) + workspace
  std::string largest_tensor;  // the largest single tensor this rank allocates (a parameter shard or an activation)
  double largest_tensor_bytes = 0;
};

// Bytes one rank sends per optimizer step over each of its groups (ring algorithms: an all-reduce of n bytes over
// g ranks sends 2 (g - 1) / g n).
struct CommPlan {
  double dp_bytes = 0;  // gradient all-reduce (or ZeRO-1's reduce-scatter + all-gather: the same volume)
  double tp_bytes = 0;  // activation all-reduces of the TP layers, forward and backward, every micro-batch
  double pp_bytes = 0;  // activations forward and their gradients backward, to the neighbouring stages
};

struct Plan {
  double parameters = 0;  // the whole model
  std::string largest_parameter;
  double largest_parameter_elements = 0;
  KernelPath path = KernelPath::kReference;
  double compute_bytes = 4;          // bytes of one element in the compute dtype (bf16-mixed: 2)
  int64_t microbatches = 1;          // per DP rank and step
  int64_t microbatch_sequences = 1;  // sequences per micro-batch
  std::string optimizer_state;       // what was counted, e.g. "AdamW: 2 fp32 moments"
  std::vector<StagePlan> stages;     // one per pipeline stage, pp_rank order
  CommPlan comm;                     // of the stage with the most traffic
};

// The plan of `config` (already validated: load_config refuses a layout that does not divide the model).
Plan make_plan(const Config& config, KernelPath path);
// kFused for train.device = cuda, else kReference.
KernelPath default_path(const Config& config);
const char* path_name(KernelPath path);

}  // namespace keel::plan
