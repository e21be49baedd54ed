// Why: activation recomputation (model.recompute) must be invisible in the numbers and visible in the memory.
// These tests hold full and selective recomputation to the bits of model.recompute = none in fp32 on CPU (loss and
// every gradient, over two accumulated micro-batches): in one process, and in a tp = 2 x pp = 2 layout run through
// the real pipeline schedule (ranks as threads over Gloo, tests/unit/parallel_ranks.h), where the re-run blocks
// re-issue their TP collectives in backward. They also measure, with the allocator's own count, that the
// activations kept between forward and backward shrink: full < selective < none. And the config key's spelling,
// its refusal of a bad value, and that config.ini names it only when it is not the default.
#include <gtest/gtest.h>
#include <malloc.h>
#include <torch/torch.h>

#include <map>
#include <mutex>

#include "core/config/config.h"
#include "core/model/llama.h"
#include "core/model/recompute.h"
#include "core/parallel/pipeline.h"
#include "tests/unit/parallel_ranks.h"
#include "tests/unit/test_support.h"

namespace keel::model {
namespace {

using parallel::ProcessGroups;
using parallel::TensorParallel;

const Recompute kPolicies[] = {Recompute::kNone, Recompute::kFull, Recompute::kSelective};

// GQA, QK-norm, partial rotary and z-loss: every op of the block is on the path.
ModelConfig small_model(NormKind norm) {
  ModelConfig c = keel::testing::small_model_config(/*seq_len=*/8);
  c.vocab = 64;
  c.norm = norm;
  c.qk_norm = true;
  c.rotary_fraction = 0.5;
  c.z_loss = 1e-3;
  return c;
}

// Two micro-batches of 2 windows [2, T+1], the same on every rank.
std::vector<torch::Tensor> windows(const ModelConfig& c) {
  auto generator = at::detail::createCPUGenerator(5);
  std::vector<torch::Tensor> out;
  for (int i = 0; i < 2; ++i) out.push_back(at::randint(0, c.vocab, {2, c.seq_len + 1}, generator));
  return out;
}

struct Outcome {
  std::vector<torch::Tensor> losses;           // per micro-batch, scalar fp32 (last stage only)
  std::map<std::string, torch::Tensor> grads;  // every parameter's accumulated gradient
};

void expect_bit_identical(const Outcome& got, const Outcome& want, const std::string& what) {
  ASSERT_EQ(got.losses.size(), want.losses.size()) << what;
  for (size_t i = 0; i < want.losses.size(); ++i)
    EXPECT_TRUE(torch::equal(got.losses[i], want.losses[i])) << what << ": loss of micro-batch " << i;
  ASSERT_EQ(got.grads.size(), want.grads.size()) << what;
  for (const auto& [name, grad] : want.grads) {
    ASSERT_TRUE(got.grads.count(name)) << what << ": " << name;
    EXPECT_TRUE(torch::equal(got.grads.at(name), grad))
        << what << ": gradient of " << name << " differs by " << (got.grads.at(name) - grad).abs().max().item<double>();
  }
}

Outcome single_process(ModelConfig c, Recompute policy, torch::ScalarType dtype) {
  c.recompute = policy;
  Llama model(c);
  model->init_weights(7);
  Outcome out;
  for (const torch::Tensor& window : windows(c)) {
    CrossEntropyParts parts = model->loss(window, dtype);
    parts.loss.backward();
    out.losses.push_back(parts.loss.detach());
  }
  for (const auto& item : model->named_parameters()) out.grads[item.key()] = item.value().grad().clone();
  return out;
}

TEST(Recompute, FullAndSelectiveAreBitIdenticalToNoneInOneProcess) {
  for (NormKind norm : {NormKind::kRmsNorm, NormKind::kLayerNorm}) {
    for (torch::ScalarType dtype : {torch::kFloat, torch::kBFloat16}) {
      const std::string what = std::string(norm == NormKind::kRmsNorm ? "rmsnorm" : "layernorm") +
                               (dtype == torch::kFloat ? " fp32" : " bf16");
      const Outcome none = single_process(small_model(norm), Recompute::kNone, dtype);
      expect_bit_identical(single_process(small_model(norm), Recompute::kFull, dtype), none, what + " full");
      expect_bit_identical(single_process(small_model(norm), Recompute::kSelective, dtype), none, what + " selective");
    }
  }
}

TEST(Recompute, EvaluationWithoutGradientsRunsThePlainBlocks) {
  ModelConfig c = small_model(NormKind::kRmsNorm);
  c.recompute = Recompute::kFull;
  Llama model(c);
  model->init_weights(7);
  torch::NoGradGuard no_grad;
  const torch::Tensor window = windows(c).front();
  const CrossEntropyParts parts = model->loss(window, torch::kFloat);
  EXPECT_FALSE(parts.loss.requires_grad());
  c.recompute = Recompute::kNone;
  Llama plain(c);
  plain->init_weights(7);
  EXPECT_TRUE(torch::equal(plain->loss(window, torch::kFloat).loss, parts.loss));
}

TEST(Recompute, KeptGemmOutsideARecomputedBlockIsTheComputation) {
  const torch::Tensor x = torch::randn({2, 3, 4}), w = torch::randn({5, 4});
  int calls = 0;
  const torch::Tensor y = kept_gemm(x, w, [&](const torch::Tensor& in, const torch::Tensor& weight) {
    ++calls;
    return torch::nn::functional::linear(in, weight);
  });
  EXPECT_EQ(calls, 1);
  EXPECT_TRUE(torch::equal(y, torch::nn::functional::linear(x, w)));
}

// One rank of a tp x pp layout: its stage of the model, run through the pipeline schedule on 2 micro-batches;
// with `sp`, under sequence parallelism (the stages exchange [2, T/tp, C]).
Outcome pipeline_rank(ProcessGroups& g, ModelConfig c, Recompute policy, bool sp) {
  c.recompute = policy;
  TensorParallel tp{g.coords.tp, g.tp->size(), g.tp->size() > 1 ? g.tp : nullptr};
  tp.sequence_parallel = sp;
  const int64_t per_stage = c.layers / g.pp->size();
  const bool first = g.coords.pp == 0, last = g.coords.pp == g.pp->size() - 1;
  Llama model(c, tp, StageSpec{g.coords.pp * per_stage, per_stage, first, last});
  model->init_weights(7);
  const std::vector<torch::Tensor> micro = windows(c);
  const int64_t T = c.seq_len;
  Outcome out;
  parallel::PipelineStage stage;
  stage.activation_shape = {2, sp ? T / tp.size : T, c.d_model};
  stage.forward = [&](int64_t m, const torch::Tensor& input) -> torch::Tensor {
    torch::Tensor x = first ? model->embed(micro[m].narrow(1, 0, T), torch::kFloat) : input;  // [2, T, C]
    x = model->run_blocks(x);
    if (!last) return x;
    CrossEntropyParts parts = model->head_loss(x, micro[m].narrow(1, 1, T));
    out.losses.push_back(parts.loss.detach());
    return parts.loss / 2.0;
  };
  parallel::run_pipeline(stage, 2, *g.pp, PipelineSchedule::kOneFOneB);
  for (const auto& item : model->named_parameters()) out.grads[item.key()] = item.value().grad().clone();
  return out;
}

void check_tensor2_pipeline2(bool sp) {
  ModelConfig c = small_model(NormKind::kRmsNorm);
  c.layers = 4;
  std::mutex mutex;
  std::map<std::pair<int64_t, Recompute>, Outcome> outcomes;  // by (rank, policy)
  testing::run_ranks(1, 2, 2, [&](ProcessGroups& g) {
    for (Recompute policy : kPolicies) {
      Outcome outcome = pipeline_rank(g, c, policy, sp);
      std::lock_guard<std::mutex> lock(mutex);
      outcomes[{g.rank, policy}] = std::move(outcome);
    }
  });
  for (int64_t rank = 0; rank < 4; ++rank) {
    const Outcome& none = outcomes.at({rank, Recompute::kNone});
    EXPECT_EQ(none.losses.size(), rank >= 2 ? 2u : 0u) << "the last stage (ranks 2, 3) computes the losses";
    for (Recompute policy : {Recompute::kFull, Recompute::kSelective}) {
      expect_bit_identical(outcomes.at({rank, policy}), none,
                           "rank " + std::to_string(rank) + " " + name_of(policy) + (sp ? " sp" : ""));
    }
  }
}

TEST(Recompute, BitIdenticalToNoneInATensor2Pipeline2Layout) { check_tensor2_pipeline2(/*sp=*/false); }

// Under SP the kept row-parallel outputs are reduce-scattered: their replayed backward gathers the gradient first.
TEST(Recompute, BitIdenticalToNoneUnderSequenceParallelism) { check_tensor2_pipeline2(/*sp=*/true); }

// Bytes malloc has handed out and not taken back (heap and mmapped chunks, every arena).
double allocated_bytes() {
  const struct mallinfo2 info = mallinfo2();
  return static_cast<double>(info.uordblks) + static_cast<double>(info.hblkhd);
}

// What autograd keeps between the forward and the backward of a 4-block model on 4 x 128 tokens, fp32: the bytes
// still allocated after the forward (graph alive) less those before it.
double kept_activation_bytes(Recompute policy) {
  ModelConfig c = small_model(NormKind::kRmsNorm);
  c.layers = 4;
  c.d_model = 64;
  c.ffn_hidden = 176;
  c.seq_len = 128;
  c.recompute = policy;
  Llama model(c);
  model->init_weights(7);
  auto generator = at::detail::createCPUGenerator(6);
  const torch::Tensor window = at::randint(0, c.vocab, {4, c.seq_len + 1}, generator);  // [4, T+1]
  const double before = allocated_bytes();
  CrossEntropyParts parts = model->loss(window, torch::kFloat);
  const double kept = allocated_bytes() - before;
  parts.loss.backward();
  return kept;
}

TEST(Recompute, KeepsLessBetweenForwardAndBackward) {
  const double none = kept_activation_bytes(Recompute::kNone);
  const double full = kept_activation_bytes(Recompute::kFull);
  const double selective = kept_activation_bytes(Recompute::kSelective);
  std::printf("kept between forward and backward: none %.0f KiB, selective %.0f KiB, full %.0f KiB\n", none / 1024,
              selective / 1024, full / 1024);
  // Per block, none keeps ~270 KiB per sequence ([H, T, T] softmax and mask, norms, MLP); selective ~150 KiB (the
  // GEMM outputs); full 32 KiB (the block input). The loss head's softmax is kept by all three.
  EXPECT_LT(selective, 0.8 * none);
  EXPECT_LT(full, 0.6 * selective);
}

TEST(Recompute, ConfigKeyIsParsedRefusedAndWrittenOnlyWhenSet) {
  const Config plain = parse_config_text("", "test.ini", {});
  EXPECT_EQ(plain.model.recompute, Recompute::kNone);
  EXPECT_EQ(to_ini(plain).find("recompute"), std::string::npos) << "the default leaves config.ini (and its hash) as is";
  for (Recompute policy : {Recompute::kFull, Recompute::kSelective}) {
    const Config set = parse_config_text("[model]\nrecompute = " + name_of(policy) + "\n", "test.ini", {});
    EXPECT_EQ(set.model.recompute, policy);
    const Config again = parse_config_text(to_ini(set), "config.ini", {});
    EXPECT_EQ(again.model.recompute, policy);
    EXPECT_EQ(to_ini(again), to_ini(set));
  }
  try {
    parse_config_text("", "test.ini", {"model.recompute=sometimes"});
    FAIL() << "no error";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("model.recompute: expected one of none | full | selective, got 'sometimes'"),
              std::string::npos)
        << e.what();
  }
  bool listed = false;
  for (const auto& [key, doc] : documented_keys()) listed |= key == "model.recompute";
  EXPECT_TRUE(listed) << "`keel config keys` lists model.recompute";
}

}  // namespace
}  // namespace keel::model
