// Why: see plan.h. Every term below names the code that keeps the bytes alive, so that a change to the model or
// the trainer that changes memory has one obvious place to be mirrored. Shapes: T seq_len, C d_model, and this
// rank's share under tensor parallelism: h = heads/tp, k = kv_heads/tp, f = ffn_hidden/tp, V/tp; D head dim,
// R rotary dims; a = bytes of the compute dtype (bf16-mixed: 2, fp32: 4).
#include "core/plan/plan.h"

#include <algorithm>
#include <cmath>

namespace keel::plan {
namespace {

// The local sizes one rank works with.
struct Local {
  double T, C, h, k, D, R, f, V, a;
  bool qk_norm;
  double seq_share;  // the share of the sequence the norms and the residual stream hold: 1, or 1/tp under parallel.sp
};

Local local_sizes(const Config& config) {
  const ModelConfig& m = config.model;
  const double tp = static_cast<double>(config.parallel.tp);
  Local l{};
  l.T = static_cast<double>(m.seq_len);
  l.C = static_cast<double>(m.d_model);
  l.h = static_cast<double>(m.heads) / tp;
  l.k = static_cast<double>(m.kv_heads) / tp;
  l.D = static_cast<double>(m.head_dim());
  l.R = std::floor(l.D * m.rotary_fraction / 2.0) * 2.0;
  l.f = static_cast<double>(m.ffn_hidden) / tp;
  l.V = static_cast<double>(m.vocab) / tp;
  l.a = config.train.precision == Precision::kBf16Mixed ? 2.0 : 4.0;
  l.qk_norm = m.qk_norm;
  l.seq_share = config.parallel.sp ? 1.0 / tp : 1.0;
  return l;
}

// Bytes autograd keeps per token of one block until its backward (core/model/llama.cpp, kernels/).
double block_bytes_per_token(const Local& l, KernelPath path) {
  const bool half = l.a < 4.0;
  // Under parallel.sp a norm's own saved tensors cover T/tp rows; its output reaches the linears gathered (full T).
  if (path == KernelPath::kFused) {
    // the norm kernel saves x and rstd [rows] fp32; output -> linears
    const double norms = 2 * ((l.a * l.C + 4) * l.seq_share + l.a * l.C);
    const double qk = l.qk_norm ? 2 * l.a * (l.h + l.k) * l.D + 4 * (l.h + l.k) : 0.0;
    const double attention = 4 * l.a * l.h * l.D + 4 * l.h;  // fused SDPA: q, k, v (GQA-expanded), out; logsumexp
    const double wo_input = l.a * l.h * l.D;                 // out transposed to [T, H*D] for wo
    const double mlp = 3 * l.a * l.f;                        // swiglu saves gate, up; its output -> w_down
    return norms + qk + attention + wo_input + mlp;
  }
  // Reference ops: the norm keeps its fp32 input (a copy under bf16), x * rstd in fp32 and its output.
  const double norms = 2 * (8 * l.C * l.seq_share + l.a * l.C);
  const double qk = l.qk_norm ? (8 + l.a) * (l.h + l.k) * l.D : 0.0;
  // RoPE rotates an fp32 copy of the rotated dims (bf16), or keeps the whole fp32 q/k it is a view of (fp32).
  const double rotary = half ? 4 * (l.h + l.k) * l.R : 4 * (l.h + l.k) * l.D;
  const double qkv = 3 * l.a * l.h * l.D;  // rotated q, GQA-expanded k and v, saved by the two matmuls
  // Math attention: the fp32 softmax [h, T, T], plus its compute-dtype copy for the second matmul under bf16.
  const double scores = (4 + (half ? l.a : 0.0)) * l.h * l.T;
  const double wo_input = l.a * l.h * l.D;
  const double mlp = 4 * l.a * l.f;  // gate, silu(gate), up, their product
  return norms + qk + rotary + qkv + scores + wo_input + mlp;
}

// Bytes a recomputed block keeps per token until its backward (core/model/recompute.h): full keeps its input,
// selective also the outputs of its seven GEMMs (the row-parallel ones, wo and w_down, reduce-scattered under SP).
double recompute_kept_bytes_per_token(const Local& l, Recompute policy) {
  const double input = l.a * l.C * l.seq_share;
  if (policy == Recompute::kFull) return input;
  const double column_outputs = l.a * ((l.h + 2 * l.k) * l.D + 2 * l.f);  // q, k, v, gate, up
  const double row_outputs = 2 * l.a * l.C * l.seq_share;                 // wo, w_down
  return input + column_outputs + row_outputs;
}

// Bytes the last stage keeps per token for the final norm and the loss.
double head_bytes_per_token(const Local& l, KernelPath path, int64_t tp) {
  const double norm = (path == KernelPath::kFused ? l.a * l.C + 4 : 8 * l.C) * l.seq_share + l.a * l.C;
  // Vocab-parallel cross-entropy keeps its fp32 softmax [N, V/tp]; the fused linear cross-entropy (tp = 1 on a
  // GPU) keeps grad_hidden [N, C] instead (its [V, C] fp32 gradient is per micro-batch: head_fixed_bytes).
  const double loss = (path == KernelPath::kFused && tp == 1) ? l.a * l.C : 4 * l.V;
  return norm + loss;
}

// Per micro-batch, not per token: the fused linear cross-entropy's grad_weight [V, C] fp32 and, under bf16, the
// two [V, C] buffers of its chunked accumulation (kernels/README.md).
double head_fixed_bytes(const Local& l, KernelPath path, int64_t tp) {
  if (!(path == KernelPath::kFused && tp == 1)) return 0.0;
  return 4 * l.V * l.C + (l.a < 4.0 ? 2 * 4 * l.V * l.C : 0.0);
}

// The largest transient of one block's forward or backward per token: reference attention holds the [h, T, T]
// scores in the compute dtype, their fp32 copy and the masked copy while the softmax runs, and the gradients of
// the softmax in backward; MLP backward holds the gradients of gate, up and their product.
double workspace_bytes_per_token(const Local& l, KernelPath path) {
  if (path == KernelPath::kFused) return std::max(3 * l.a * l.f, 4 * l.a * l.h * l.D);
  const double attention = (8 + (l.a < 4.0 ? l.a : 0.0)) * l.h * l.T;
  return std::max(attention, 3 * 4 * l.f);
}

// The loss's largest transient per micro-batch. Vocab-parallel cross-entropy: the logits, their fp32 copy, the
// shifted logits and their exp [N, V/tp] besides the saved softmax. The fused linear cross-entropy (tp = 1 on a
// GPU): one [chunk, V] chunk in the compute dtype, chunk = N / ceil(V / C) rounded up to a power of two
// (kernels::cross_entropy_chunk_rows).
double loss_workspace_bytes(const Local& l, KernelPath path, int64_t tp, double tokens) {
  if (!(path == KernelPath::kFused && tp == 1)) return tokens * (l.a + 8) * l.V;
  const double wanted = std::ceil(tokens / std::ceil(l.V / l.C));
  const double chunk = std::min(tokens, std::pow(2.0, std::ceil(std::log2(std::max(1.0, wanted)))));
  return chunk * l.V * l.a;
}

const char* optimizer_state(const Config& config, double& bytes_per_parameter) {
  if (config.plugins.optimizer == "lion") {
    bytes_per_parameter = 4;
    return "Lion: 1 fp32 moment";
  }
  bytes_per_parameter = 8;
  return config.plugins.optimizer == "adamw" ? "AdamW: 2 fp32 moments"
                                             : "2 fp32 moments per parameter (AdamW's; the plugin's own is unknown)";
}

}  // namespace

KernelPath default_path(const Config& config) {
  return config.train.device == Device::kCuda ? KernelPath::kFused : KernelPath::kReference;
}

const char* path_name(KernelPath path) { return path == KernelPath::kFused ? "fused" : "reference"; }

Plan make_plan(const Config& config, KernelPath path) {
  const ModelConfig& m = config.model;
  const ParallelConfig& par = config.parallel;
  const Local l = local_sizes(config);
  Plan plan;
  plan.path = path;
  plan.compute_bytes = l.a;
  double optimizer_per_parameter = 0;
  plan.optimizer_state = optimizer_state(config, optimizer_per_parameter);
  const int64_t batch = config.train.micro_batch * config.train.grad_accum;  // the global batch, in sequences
  plan.microbatches = par.microbatches > 0 ? par.microbatches : std::max<int64_t>(1, config.train.grad_accum / par.dp);
  plan.microbatch_sequences = batch / par.dp / plan.microbatches;

  const std::vector<ParameterTensor> tensors = parameter_tensors(m);
  for (const ParameterTensor& t : tensors) {
    plan.parameters += t.elements();
    if (t.elements() > plan.largest_parameter_elements) {
      plan.largest_parameter_elements = t.elements();
      plan.largest_parameter = t.name;
    }
  }

  const double tp = static_cast<double>(par.tp), dp = static_cast<double>(par.dp);
  const double tokens = static_cast<double>(plan.microbatch_sequences) * l.T;  // per micro-batch
  const int64_t per_stage = m.layers / par.pp;
  for (int64_t s = 0; s < par.pp; ++s) {
    StagePlan st;
    st.pp_rank = s;
    st.first_layer = s * per_stage;
    st.layers = per_stage;
    st.embedding = s == 0 || m.tie_embeddings;
    st.head = s == par.pp - 1;
    st.ranks = par.dp * par.tp;
    double largest_shard = 0;
    std::string largest_name;
    for (const ParameterTensor& t : tensors) {
      const bool here = t.layer >= 0 ? (t.layer >= st.first_layer && t.layer < st.first_layer + st.layers)
                                     : (t.name == "embed.weight" ? st.embedding : st.head);
      if (!here) continue;
      const double shard = t.shard_dim >= 0 ? t.elements() / tp : t.elements();
      st.parameters += shard;
      if (shard > largest_shard) largest_shard = shard, largest_name = t.name;
    }
    st.params_bytes = 4 * st.parameters;
    st.grads_bytes = 4 * st.parameters;
    st.optimizer_bytes = optimizer_per_parameter * st.parameters / (par.zero == 1 ? dp : 1.0);
    // Each linear layer casts its fp32 weight in forward and the matmul keeps the copy for backward (the
    // embedding gathers fp32 rows instead); fp32 runs cast nothing.
    const double embedding_only = st.embedding && !m.tie_embeddings ? static_cast<double>(m.vocab) * l.C / tp : 0.0;
    st.weight_copy_bytes = l.a < 4.0 ? l.a * (st.parameters - embedding_only) : 0.0;
    // What one block keeps (and the reference path's [T, T] bool mask per block), or under model.recompute what a
    // recomputed block keeps; its backward then rebuilds one block's activations at a time (workspace below).
    const double block_bytes =
        tokens * block_bytes_per_token(l, path) + (path == KernelPath::kReference ? l.T * l.T : 0.0);
    const bool recompute = m.recompute != Recompute::kNone;
    const double kept_per_block = recompute ? tokens * recompute_kept_bytes_per_token(l, m.recompute) : block_bytes;
    st.activation_bytes = static_cast<double>(st.layers) * kept_per_block;
    if (st.head)
      st.activation_bytes += tokens * head_bytes_per_token(l, path, par.tp) + head_fixed_bytes(l, path, par.tp);
    const bool one_f_one_b = par.schedule != PipelineSchedule::kGPipe;
    st.inflight_microbatches =
        par.pp == 1 ? 1 : (one_f_one_b ? std::min(par.pp - s, plan.microbatches) : plan.microbatches);
    st.workspace_bytes = tokens * workspace_bytes_per_token(l, path);
    // A recomputed block's rebuilt activations are freed as its backward consumes them: the larger transient
    // counts, not their sum (bench/recompute_memory.sh: within 0.94-1.14 of measured per-sequence peak RSS).
    if (recompute && st.layers > 0) st.workspace_bytes = std::max(st.workspace_bytes, block_bytes - kept_per_block);
    if (st.head) st.workspace_bytes = std::max(st.workspace_bytes, loss_workspace_bytes(l, path, par.tp, tokens));
    const double inflight = static_cast<double>(st.inflight_microbatches);
    st.total_bytes = st.params_bytes + st.grads_bytes + st.optimizer_bytes +
                     inflight * (st.weight_copy_bytes + st.activation_bytes) + st.workspace_bytes;
    // The largest single tensor: a parameter shard (fp32), or an activation of one micro-batch.
    st.largest_tensor = largest_name + " (fp32 shard)";
    st.largest_tensor_bytes = 4 * largest_shard;
    const double mb = static_cast<double>(plan.microbatch_sequences);
    auto consider = [&](double bytes, const std::string& what) {
      if (bytes > st.largest_tensor_bytes) st.largest_tensor_bytes = bytes, st.largest_tensor = what;
    };
    if (path == KernelPath::kReference && st.layers > 0)
      consider(4 * mb * l.h * l.T * l.T, "attention softmax [B, H/tp, T, T] fp32");
    const bool fused_loss = path == KernelPath::kFused && par.tp == 1;
    if (st.head && !fused_loss) consider(4 * tokens * l.V, "logits [B*T, V/tp] fp32");
    if (st.head && fused_loss) consider(4 * l.V * l.C, "loss grad_weight [V, C] fp32");
    plan.stages.push_back(st);
  }

  // Traffic per step of the busiest rank: the largest stage for DP; every stage alike for TP; a middle stage for PP.
  double most_parameters = 0;
  for (const StagePlan& st : plan.stages) most_parameters = std::max(most_parameters, st.parameters);
  const double M = static_cast<double>(plan.microbatches);
  const double activation = l.a * tokens * l.C;  // one [B, T, C] tensor in the compute dtype
  const auto ring = [](double bytes, double group) { return group > 1 ? 2 * (group - 1) / group * bytes : 0.0; };
  plan.comm.dp_bytes = ring(4 * most_parameters, dp);
  // Per block: forward all-reduces after wo and w_down, backward ones for the inputs of wq/wk/wv and w_gate/w_up;
  // plus the embedding's forward all-reduce on the first stage. Under SP each all-reduce is an all-gather and a
  // reduce-scatter in the ring count (the same bytes). Full recomputation re-runs the two forward ones per block.
  const double per_block = m.recompute == Recompute::kFull ? 6.0 : 4.0;
  plan.comm.tp_bytes = M * ring(activation, tp) * (per_block * static_cast<double>(per_stage) + 1.0);
  // Under SP the stages exchange this rank's share of the sequence.
  plan.comm.pp_bytes = par.pp == 1 ? 0.0 : M * activation * l.seq_share * (par.pp > 2 ? 2.0 : 1.0);
  return plan;
}

}  // namespace keel::plan
