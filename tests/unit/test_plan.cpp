// Why: `keel plan` is only useful if its numbers are the ones Keel's code produces. These tests pin the mirror of
// the model's parameters to the real model (names, shapes, shards), the K2-65B count to the published 65.3B, and
// each per-rank term to a hand computation; bench/plan_memory.sh compares the totals with measured peak RSS.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <map>

#include "core/config/config.h"
#include "core/config/memory_estimate.h"
#include "core/model/llama.h"
#include "core/model/sharding.h"
#include "core/plan/plan.h"

namespace {

keel::ModelConfig gqa_layernorm_qk() {
  keel::ModelConfig m;
  m.layers = 3;
  m.d_model = 96;
  m.heads = 6;
  m.kv_heads = 2;
  m.ffn_hidden = 200;
  m.vocab = 500;
  m.qk_norm = true;
  m.norm = keel::NormKind::kLayerNorm;
  return m;
}

// The layout the by-hand tests share: L 4, C 64, H 4, K 2 (D 16), F 128, V 256, T 32, tp 2, pp 2, 2 micro-batches
// of 2 sequences per DP rank, bf16-mixed.
keel::Config small_tp2_pp2() {
  keel::Config c;
  c.model.layers = 4;
  c.model.d_model = 64;
  c.model.heads = 4;
  c.model.kv_heads = 2;
  c.model.ffn_hidden = 128;
  c.model.vocab = 256;
  c.model.seq_len = 32;
  c.train.micro_batch = 2;
  c.train.grad_accum = 2;
  c.parallel.tp = 2;
  c.parallel.pp = 2;
  return c;
}

TEST(Plan, ParameterTensorsAreTheRealModelsNamesShapesOrderAndShards) {
  keel::ModelConfig tied = gqa_layernorm_qk();
  tied.tie_embeddings = true;
  tied.norm = keel::NormKind::kRmsNorm;
  for (const keel::ModelConfig& m : {keel::ModelConfig{}, gqa_layernorm_qk(), tied}) {
    keel::model::Llama model(m);
    const auto specs = keel::model::shard_specs(*model);  // what each layer declares, in the model's order
    const auto params = model->named_parameters();
    const auto planned = keel::plan::parameter_tensors(m);
    ASSERT_EQ(planned.size(), params.size());
    double total = 0;
    for (size_t i = 0; i < planned.size(); ++i) {
      const auto& t = planned[i];
      EXPECT_EQ(t.name, params[i].key());
      EXPECT_EQ(t.global_shape, params[i].value().sizes().vec()) << t.name;
      EXPECT_EQ(t.shard_dim, specs[i].second.dim) << t.name;
      total += t.elements();
    }
    EXPECT_EQ(total, keel::count_parameters(m));
  }
}

TEST(Plan, ARanksShareIsItsShardsPlusTheReplicatedTensors) {
  keel::Config config;
  config.model = gqa_layernorm_qk();
  config.parallel.tp = 2;
  const keel::plan::Plan p = keel::plan::make_plan(config, keel::plan::KernelPath::kReference);
  double replicated = 0;
  for (const auto& t : keel::plan::parameter_tensors(config.model)) replicated += t.shard_dim < 0 ? t.elements() : 0.0;
  EXPECT_EQ(p.stages.at(0).parameters, (p.parameters - replicated) / 2 + replicated);
  EXPECT_EQ(p.stages.at(0).ranks, 2);
}

TEST(Plan, K2At65BWithTensor8Pipeline4) {
  keel::Config c =
      keel::load_config(std::string(KEEL_SOURCE_DIR) + "/experiments/configs/k2-65b.ini", {"parallel.dp=16"});
  const keel::plan::Plan p = keel::plan::make_plan(c, keel::plan::default_path(c));
  EXPECT_NEAR(p.parameters / 1e9, 65.29, 0.01);
  ASSERT_EQ(p.stages.size(), 4u);
  EXPECT_EQ(p.path, keel::plan::KernelPath::kFused);
  EXPECT_EQ(p.microbatches, 128);  // grad_accum 2048 / dp 16
  for (const auto& s : p.stages) {
    EXPECT_EQ(s.layers, 20);
    EXPECT_EQ(s.inflight_microbatches, 4 - s.pp_rank);    // 1F1B: stage s keeps pp - s micro-batches alive
    EXPECT_EQ(s.optimizer_bytes, 8 * s.parameters / 16);  // ZeRO-1 over dp 16
  }
  EXPECT_TRUE(p.stages.front().embedding);
  EXPECT_TRUE(p.stages.back().head);
}

// Hand-computed per-rank terms for small_tp2_pp2(), reference path.
TEST(Plan, PerRankTermsByHand) {
  keel::Config c = small_tp2_pp2();
  const keel::plan::Plan p = keel::plan::make_plan(c, keel::plan::KernelPath::kReference);
  EXPECT_EQ(p.microbatches, 2);
  EXPECT_EQ(p.microbatch_sequences, 2);
  // Local: h 2, k 1, D 16, R 16, f 64, V/tp 128, a 2. Per token and block:
  //   norms 2 (8 + 2) 64 = 1280; rotary copies 4 (2 + 1) 16 = 192; q, k, v 3 * 2 * 2 * 16 = 192;
  //   softmax fp32 + bf16 copy (4 + 2) * 2 * 32 = 384; wo input 2 * 2 * 16 = 64; MLP 4 * 2 * 64 = 512.
  const double block = 1280 + 192 + 192 + 384 + 64 + 512;  // 2624
  const double tokens = 2 * 32;
  const double masks = 2 * 32.0 * 32;  // one [T, T] bool mask per block and micro-batch
  const auto& first = p.stages.at(0);
  const auto& last = p.stages.at(1);
  EXPECT_EQ(first.activation_bytes, tokens * 2 * block + masks);
  // The head: final norm (8 + 2) 64 = 640 and the fp32 softmax 4 * 128 = 512 per token.
  EXPECT_EQ(last.activation_bytes, tokens * 2 * block + masks + tokens * (640 + 512));
  EXPECT_EQ(first.inflight_microbatches, 2);
  EXPECT_EQ(last.inflight_microbatches, 1);
  // Parameters of stage 0: embedding 256 * 64 / 2, two blocks of (wq 64*64 + wk, wv 2 * 32*64 + wo 64*64 + MLP
  // 3 * 128*64) / 2 + norms 2 * 64.
  const double block_params = (64.0 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 128 * 64) / 2 + 2 * 64;
  EXPECT_EQ(first.parameters, 256.0 * 64 / 2 + 2 * block_params);
  EXPECT_EQ(first.params_bytes, 4 * first.parameters);
  EXPECT_EQ(first.optimizer_bytes, 8 * first.parameters);
  EXPECT_EQ(first.weight_copy_bytes, 2 * (first.parameters - 256.0 * 64 / 2));  // the embedding is not cast
  // Workspace: the MLP backward's 3 * 4 * f = 768 per token beats the reference attention's (8 + 2) h T = 640.
  EXPECT_EQ(first.workspace_bytes, tokens * 768);
  EXPECT_EQ(first.total_bytes, first.params_bytes + first.grads_bytes + first.optimizer_bytes +
                                   2 * (first.weight_copy_bytes + first.activation_bytes) + first.workspace_bytes);
  // Traffic: TP all-reduces of a [2, 32, 64] bf16 tensor (8 KiB), ring over 2 ranks sends it once, 4 per block
  // + 1 for the embedding, 2 micro-batches; PP sends one activation per micro-batch (2 stages); DP none (dp 1).
  EXPECT_EQ(p.comm.tp_bytes, 2 * 8192.0 * (4 * 2 + 1));
  EXPECT_EQ(p.comm.pp_bytes, 2 * 8192.0);
  EXPECT_EQ(p.comm.dp_bytes, 0.0);
}

// The same layout as PerRankTermsByHand under model.recompute: what a recomputed block keeps per token, and one
// block's rebuilt activations as the backward's workspace when they are the largest transient.
TEST(Plan, RecomputeTermsByHand) {
  keel::Config c = small_tp2_pp2();
  const double tokens = 2 * 32, block = 2624, mask = 32.0 * 32, head = 640 + 512;
  c.model.recompute = keel::Recompute::kFull;
  const keel::plan::Plan full = keel::plan::make_plan(c, keel::plan::KernelPath::kReference);
  // Full: the block input, 2 * 64 = 128 bytes per token.
  EXPECT_EQ(full.stages.at(0).activation_bytes, 2 * tokens * 128);
  EXPECT_EQ(full.stages.at(1).activation_bytes, 2 * tokens * 128 + tokens * head);
  // The rebuilt block (less its kept input) outweighs the MLP backward's transient.
  EXPECT_EQ(full.stages.at(0).workspace_bytes, tokens * block + mask - tokens * 128);
  // The re-run forward repeats the two all-reduces of each block: 6 per block + 1.
  EXPECT_EQ(full.comm.tp_bytes, 2 * 8192.0 * (6 * 2 + 1));
  c.model.recompute = keel::Recompute::kSelective;
  const keel::plan::Plan selective = keel::plan::make_plan(c, keel::plan::KernelPath::kReference);
  // Selective: input 128 + q, k, v 2 (2 + 2) 16 = 128 + gate, up 2 * 2 * 64 = 256 + wo, w_down 2 * 2 * 64 = 256.
  EXPECT_EQ(selective.stages.at(0).activation_bytes, 2 * tokens * 768);
  EXPECT_EQ(selective.comm.tp_bytes, 2 * 8192.0 * (4 * 2 + 1));  // kept row-parallel outputs: no second all-reduce
  const keel::plan::Plan none = [&] {
    c.model.recompute = keel::Recompute::kNone;
    return keel::plan::make_plan(c, keel::plan::KernelPath::kReference);
  }();
  EXPECT_LT(full.stages.at(0).total_bytes, selective.stages.at(0).total_bytes);
  EXPECT_LT(selective.stages.at(0).total_bytes, none.stages.at(0).total_bytes);
}

// Sequence parallelism: the norms' own tensors and the stage-to-stage activations cover T/tp rows.
TEST(Plan, SequenceParallelTermsByHand) {
  keel::Config c = small_tp2_pp2();
  c.parallel.sp = true;
  const keel::plan::Plan p = keel::plan::make_plan(c, keel::plan::KernelPath::kReference);
  // Norms 2 (8 * 64 / 2 + 2 * 64) = 768 instead of 1280; the rest of the block as without SP.
  const double block = 768 + 192 + 192 + 384 + 64 + 512, tokens = 2 * 32, masks = 2 * 32.0 * 32;
  EXPECT_EQ(p.stages.at(0).activation_bytes, tokens * 2 * block + masks);
  // The head's norm 8 * 64 / 2 + 2 * 64 = 384 and the fp32 softmax 512 per token.
  EXPECT_EQ(p.stages.at(1).activation_bytes, tokens * 2 * block + masks + tokens * (384 + 512));
  EXPECT_EQ(p.comm.pp_bytes, 2 * 8192.0 / 2);
  EXPECT_EQ(p.comm.tp_bytes, 2 * 8192.0 * (4 * 2 + 1));
  // Full recomputation under SP keeps each block's input share: 2 * 64 / 2 bytes per token.
  c.model.recompute = keel::Recompute::kFull;
  EXPECT_EQ(keel::plan::make_plan(c, keel::plan::KernelPath::kReference).stages.at(0).activation_bytes,
            2 * tokens * 64);
}

TEST(Plan, FusedPathKeepsNoAttentionMatrix) {
  keel::Config c;
  c.model.seq_len = 64;
  const auto reference = keel::plan::make_plan(c, keel::plan::KernelPath::kReference);
  c.model.seq_len = 128;  // doubling T doubles the fused path's activations exactly (no T^2 term)
  const auto fused_128 = keel::plan::make_plan(c, keel::plan::KernelPath::kFused);
  c.model.seq_len = 64;
  const auto fused_64 = keel::plan::make_plan(c, keel::plan::KernelPath::kFused);
  EXPECT_LT(fused_64.stages[0].activation_bytes, reference.stages[0].activation_bytes);
  // The fused loss keeps per-micro-batch [V, C] buffers that do not grow with T: subtract them.
  const double fixed = 3 * 4.0 * c.model.vocab * c.model.d_model;
  EXPECT_DOUBLE_EQ(fused_128.stages[0].activation_bytes - fixed, 2 * (fused_64.stages[0].activation_bytes - fixed));
}

}  // namespace
