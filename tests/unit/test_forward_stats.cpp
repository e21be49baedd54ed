// Why: the instability precursors are only worth logging if they are the quantities they claim to be. Each is
// checked against a reference recomputed here from the model's own weights (the attention logit max as the max of
// q.k/sqrt(D) over visible keys, a block's output RMS, the logits' mean/max and log Z), model.recompute must not
// count a re-run block twice, and recording must leave the loss and the gradients bit-identical.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>

#include "core/model/forward_stats.h"
#include "core/model/llama.h"
#include "core/model/ops.h"
#include "tests/unit/test_support.h"

using keel::ModelConfig;
using keel::model::ForwardStats;
using keel::model::ForwardStatsScope;
using keel::model::Llama;

namespace {

constexpr int64_t kT = 8;

ModelConfig config() {
  ModelConfig c = keel::testing::small_model_config(kT);
  c.z_loss = 1e-4;
  return c;
}

torch::Tensor param(Llama& m, const std::string& name) {
  auto params = m->named_parameters();
  const torch::Tensor* p = params.find(name);
  TORCH_CHECK(p != nullptr, "no parameter ", name);
  return *p;
}

torch::Tensor window(const ModelConfig& c) {  // [2, T+1]
  torch::manual_seed(7);
  return torch::randint(0, c.vocab, {2, kT + 1}, torch::kLong);
}

Llama model(const ModelConfig& c, keel::model::StageSpec stage = {}) {
  Llama m(c, keel::parallel::TensorParallel{}, stage);
  m->init_weights(99);
  return m;
}

// Records one loss (forward, and backward when asked) into a fresh accumulator.
ForwardStats record(Llama& m, const torch::Tensor& w, bool backward) {
  ForwardStats stats = keel::model::make_forward_stats(m->stage().layers, m->config().heads, torch::kCPU);
  ForwardStatsScope scope(&stats);
  keel::model::CrossEntropyParts parts = m->loss(w, torch::kFloat);
  if (backward) parts.loss.backward();
  return stats;
}

TEST(ForwardStats, AttentionLogitMaxIsTheMaxOfScaledQKOverVisibleKeys) {
  const ModelConfig c = config();
  Llama m = model(c);
  const torch::Tensor w = window(c);
  const ForwardStats stats = record(m, w, false);
  // Layer 0 by hand: embedding -> attention norm -> q, k projections -> RoPE -> GQA -> q.k/sqrt(D), causal.
  const int64_t B = w.size(0), H = c.heads, K = c.kv_heads, D = c.head_dim();
  const torch::Tensor tokens = w.narrow(1, 0, kT);
  const torch::Tensor x = param(m, "embed.weight").index_select(0, tokens.reshape({-1})).view({B, kT, c.d_model});
  const torch::Tensor h = keel::model::rms_norm(x, param(m, "blocks.0.attn_norm.weight"), c.norm_eps);
  const auto rope = keel::model::make_rotary_tables(D, c.rotary_fraction, c.rope_theta, c.seq_len);
  torch::Tensor q = torch::matmul(h, param(m, "blocks.0.attn.wq.weight").t()).view({B, kT, H, D});
  torch::Tensor k = torch::matmul(h, param(m, "blocks.0.attn.wk.weight").t()).view({B, kT, K, D});
  q = keel::model::apply_rotary(q, rope).transpose(1, 2);                                      // [B, H, T, D]
  k = keel::model::apply_rotary(k, rope).transpose(1, 2).repeat_interleave(H / K, /*dim=*/1);  // [B, H, T, D]
  for (int64_t head = 0; head < H; ++head) {
    double want = -std::numeric_limits<double>::infinity();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < kT; ++i)
        for (int64_t j = 0; j <= i; ++j)  // visible keys only
          want = std::max(want, (q[b][head][i] * k[b][head][j]).sum().item<double>() / std::sqrt(double(D)));
    EXPECT_NEAR(stats.attn_logit_max[0][head].item<double>(), want, 1e-5 * std::abs(want)) << "head " << head;
  }
  // The unmasked max over all keys is an upper bound (the mask only removes candidates).
  const torch::Tensor all = torch::matmul(q, k.transpose(-2, -1)).amax({0, 2, 3}) / std::sqrt(double(D));  // [H]
  EXPECT_TRUE((all >= stats.attn_logit_max[0] - 1e-6).all().item<bool>());
}

TEST(ForwardStats, BlockRmsAndLogitStatisticsMatchTheModelsOutputs) {
  const ModelConfig c = config();
  Llama m = model(c);
  const torch::Tensor w = window(c);
  const ForwardStats stats = record(m, w, false);
  const torch::Tensor tokens = w.narrow(1, 0, kT);
  // Block 0's output: a one-block stage of the same weights (parameters are drawn per name).
  Llama first = model(c, keel::model::StageSpec{0, 1, true, false});
  const torch::Tensor out0 = first->run_blocks(first->embed(tokens, torch::kFloat));  // [B, T, C]
  const torch::Tensor out_last = m->run_blocks(m->embed(tokens, torch::kFloat));      // [B, T, C]
  EXPECT_NEAR(stats.block_sumsq[0].item<double>(), out0.pow(2).sum().item<double>(),
              1e-4 * out0.pow(2).sum().item<double>());
  EXPECT_NEAR(stats.block_sumsq[c.layers - 1].item<double>(), out_last.pow(2).sum().item<double>(),
              1e-4 * out_last.pow(2).sum().item<double>());
  const torch::Tensor logits = m->forward(tokens, torch::kFloat).reshape({-1, c.vocab});  // [N, V]
  const torch::Tensor log_z = torch::logsumexp(logits.to(torch::kDouble), -1);            // [N]
  EXPECT_NEAR(stats.logit_sum.item<double>(), logits.sum().item<double>(), 1e-3);
  EXPECT_NEAR(stats.logit_max.item<double>(), logits.max().item<double>(), 1e-6);
  EXPECT_NEAR(stats.z_sum.item<double>(), log_z.sum().item<double>(), 1e-4 * log_z.sum().item<double>());
  EXPECT_NEAR(stats.z_max.item<double>(), log_z.max().item<double>(), 1e-5 * log_z.max().item<double>());
  EXPECT_TRUE(stats.recorded_head);
}

TEST(ForwardStats, RecomputedBlocksAreCountedOnceAndRecordingChangesNoBit) {
  ModelConfig c = config();
  Llama plain = model(c);
  const torch::Tensor w = window(c);
  const torch::Tensor want_loss = plain->loss(w, torch::kFloat).loss;
  want_loss.backward();
  const torch::Tensor want_grad = param(plain, "blocks.0.attn.wq.weight").grad().clone();
  const ForwardStats reference = record(plain, w, false);
  for (keel::Recompute policy : {keel::Recompute::kNone, keel::Recompute::kFull, keel::Recompute::kSelective}) {
    c.recompute = policy;
    Llama m = model(c);
    ForwardStats stats = keel::model::make_forward_stats(m->stage().layers, c.heads, torch::kCPU);
    torch::Tensor loss;
    {
      ForwardStatsScope scope(&stats);
      loss = m->loss(w, torch::kFloat).loss;
      loss.backward();  // a recomputing backward re-runs every block: nothing more may be recorded
    }
    EXPECT_TRUE(torch::equal(loss, want_loss)) << "recording changed the loss";
    EXPECT_TRUE(torch::equal(param(m, "blocks.0.attn.wq.weight").grad(), want_grad)) << "recording changed a grad";
    EXPECT_TRUE(torch::equal(stats.block_sumsq, reference.block_sumsq)) << static_cast<int>(policy);
    EXPECT_TRUE(torch::equal(stats.attn_logit_max, reference.attn_logit_max)) << static_cast<int>(policy);
  }
}

TEST(ForwardStats, NothingIsRecordedOutsideAScope) {
  const ModelConfig c = config();
  Llama m = model(c);
  EXPECT_EQ(keel::model::active_forward_stats(), nullptr);
  ForwardStats stats = keel::model::make_forward_stats(m->stage().layers, c.heads, torch::kCPU);
  {
    ForwardStatsScope scope(&stats);
    EXPECT_EQ(keel::model::active_forward_stats(), &stats);
  }
  EXPECT_EQ(keel::model::active_forward_stats(), nullptr);
  m->loss(window(c), torch::kFloat);
  EXPECT_TRUE(torch::isinf(stats.attn_logit_max).all().item<bool>());  // still "unseen"
  EXPECT_EQ(stats.block_sumsq.sum().item<double>(), 0.0);
  EXPECT_FALSE(stats.recorded_head);
}

TEST(ForwardStats, ABlockIndexOutsideTheStageIsRefusedNamingIt) {
  ForwardStats stats = keel::model::make_forward_stats(2, 4, torch::kCPU);
  stats.layer = 5;
  try {
    keel::model::record_block_output(stats, torch::ones({1, 2, 3}));
    FAIL() << "expected an error";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("block index 5 outside this stage's 2 blocks"), std::string::npos) << e.what();
  }
}

}  // namespace
