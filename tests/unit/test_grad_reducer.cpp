// Why: data parallelism is only correct if every replica ends the backward with the same, averaged gradient.
// These tests give ranks (threads over real Gloo groups) different gradients, one of them undefined, and a
// bucket cap small enough to need several buckets; check the mean everywhere; check that DP size 1 touches
// nothing; and check the overlapped path (hooks during the last backward, alone and under a 2-stage pipeline)
// against replicas computed in one process.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/parallel/grad_reducer.h"
#include "core/parallel/pipeline.h"
#include "tests/unit/parallel_ranks.h"

namespace keel::parallel {
namespace {

// Deterministic values without the global generator (ranks are threads): sin of a scaled index.
torch::Tensor fixed_tensor(const std::vector<int64_t>& shape, double seed, double scale) {
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  return (torch::sin(torch::arange(numel, torch::kDouble) * 0.731 + seed) * scale).to(torch::kFloat).reshape(shape);
}

// A cap of `floats` fp32 elements, in parallel.bucket_mb's unit (MiB).
double bucket_mb_for(int64_t floats) { return static_cast<double>(floats) * sizeof(float) / (1024.0 * 1024.0); }

const std::vector<std::vector<int64_t>> kShapes{{5, 3}, {7}, {4, 4}, {2}, {3, 3, 2}};

// Rank `rank`'s gradient of parameter `index`; rank 1's gradient of parameter 2 is undefined (counts as zeros).
torch::Tensor rank_gradient(int64_t rank, size_t index) {
  if (rank == 1 && index == 2) return {};
  return fixed_tensor(kShapes[index], 10.0 * static_cast<double>(rank) + static_cast<double>(index), 1.0);
}

void check_mean_over_ranks(int64_t dp) {
  testing::run_ranks(dp, 1, 1, [&](ProcessGroups& g) {
    std::vector<torch::Tensor> params;
    for (size_t i = 0; i < kShapes.size(); ++i) {
      params.push_back(torch::zeros(kShapes[i], torch::requires_grad()));
      torch::Tensor grad = rank_gradient(g.coords.dp, i);
      if (grad.defined()) params.back().mutable_grad() = grad;
    }
    GradReducer reducer(params, g.dp, bucket_mb_for(20));
    EXPECT_GE(reducer.bucket_count(), 3);
    EXPECT_EQ(reducer.bucket_params(0).front(), static_cast<int64_t>(kShapes.size()) - 1);  // reverse order
    reducer.all_reduce_mean();
    for (size_t i = 0; i < kShapes.size(); ++i) {
      torch::Tensor expected = torch::zeros(kShapes[i]);
      for (int64_t r = 0; r < dp; ++r) {
        torch::Tensor grad = rank_gradient(r, i);
        if (grad.defined()) expected += grad;
      }
      expected /= static_cast<double>(dp);
      ASSERT_TRUE(params[i].grad().defined()) << "param " << i << " on dp rank " << g.coords.dp;
      EXPECT_TRUE(torch::allclose(params[i].grad(), expected, 1e-6, 1e-7))
          << "param " << i << " on dp rank " << g.coords.dp;
    }
  });
}

TEST(GradReducer, MeanOverTwoRanksInSeveralBuckets) { check_mean_over_ranks(2); }

TEST(GradReducer, MeanOverFourRanksInSeveralBuckets) { check_mean_over_ranks(4); }

TEST(GradReducer, SingleRankLeavesGradientsAlone) {
  std::vector<torch::Tensor> params;
  for (size_t i = 0; i < kShapes.size(); ++i) {
    params.push_back(torch::zeros(kShapes[i], torch::requires_grad()));
    torch::Tensor grad = rank_gradient(1, i);
    if (grad.defined()) params.back().mutable_grad() = grad.clone();
  }
  GradReducer reducer(params, Communicator::solo("dp"), bucket_mb_for(20));
  reducer.prepare_overlap();
  reducer.all_reduce_mean();
  for (size_t i = 0; i < kShapes.size(); ++i) {
    torch::Tensor grad = rank_gradient(1, i);
    EXPECT_EQ(params[i].grad().defined(), grad.defined()) << "param " << i;
    if (grad.defined()) {
      EXPECT_TRUE(torch::equal(params[i].grad(), grad)) << "param " << i;
    }
  }
}

// A 4-layer tanh MLP whose layers [first, first + count) one rank holds; parameters in model order
// (weight [C, C], bias [C] per layer), plus on the first layer's holder an `extra` [C] used only by micro-batch 0
// (a parameter that gets no gradient in the last backward).
constexpr int64_t kChannels = 4;
constexpr int64_t kNetLayers = 4;

struct TinyNet {
  std::vector<torch::Tensor> params;  // leaves, model order
  int64_t first = 0, count = 0;
  bool has_extra = false;

  TinyNet(int64_t first_layer, int64_t layer_count)
      : first(first_layer), count(layer_count), has_extra(first_layer == 0) {
    if (has_extra) params.push_back(fixed_tensor({kChannels}, 77.0, 0.3).requires_grad_(true));
    for (int64_t l = first; l < first + count; ++l) {
      params.push_back(fixed_tensor({kChannels, kChannels}, 1.0 + l, 0.7).requires_grad_(true));
      params.push_back(fixed_tensor({kChannels}, 30.0 + l, 0.1).requires_grad_(true));
    }
  }
  torch::Tensor forward(torch::Tensor h, int64_t micro) const {  // [b, C] -> [b, C]
    const size_t base = has_extra ? 1 : 0;
    if (has_extra && micro == 0) h = h + params[0];
    for (int64_t l = 0; l < count; ++l)
      h = torch::tanh(torch::nn::functional::linear(h, params[base + 2 * l], params[base + 2 * l + 1]));
    return h;
  }
};

torch::Tensor replica_input(int64_t replica, int64_t micro) {
  return fixed_tensor({3, kChannels}, 100.0 * replica + micro, 1.0);
}

torch::Tensor replica_loss(const torch::Tensor& h, int64_t replica, int64_t micro, int64_t microbatches) {
  return (h - fixed_tensor({3, kChannels}, 500.0 + 100.0 * replica + micro, 0.5)).pow(2).mean() /
         static_cast<double>(microbatches);
}

// Mean over `replicas` of the single-process gradients of the whole net: [param] in model order.
std::vector<torch::Tensor> replicated_mean_gradients(int64_t replicas, int64_t microbatches) {
  std::vector<torch::Tensor> mean;
  for (int64_t d = 0; d < replicas; ++d) {
    TinyNet net(0, kNetLayers);
    for (int64_t m = 0; m < microbatches; ++m)
      replica_loss(net.forward(replica_input(d, m), m), d, m, microbatches).backward();
    for (size_t i = 0; i < net.params.size(); ++i) {
      torch::Tensor g = net.params[i].grad() / static_cast<double>(replicas);
      if (d == 0) {
        mean.push_back(g);
      } else {
        mean[i] += g;
      }
    }
  }
  return mean;
}

TEST(GradReducer, OverlapLaunchesBucketsDuringTheLastBackward) {
  const int64_t microbatches = 3;
  const std::vector<torch::Tensor> expected = replicated_mean_gradients(2, microbatches);
  testing::run_ranks(2, 1, 1, [&](ProcessGroups& g) {
    TinyNet net(0, kNetLayers);
    GradReducer reducer(net.params, g.dp, bucket_mb_for(kChannels * kChannels + kChannels));
    EXPECT_GE(reducer.bucket_count(), 4);
    for (int step = 0; step < 2; ++step) {  // the second step proves the state resets
      for (auto& p : net.params) p.mutable_grad() = torch::Tensor();
      for (int64_t m = 0; m < microbatches; ++m) {
        if (m == microbatches - 1) reducer.prepare_overlap();
        replica_loss(net.forward(replica_input(g.coords.dp, m), m), g.coords.dp, m, microbatches).backward();
      }
      reducer.all_reduce_mean();
      // The last layers' buckets are complete early; the one holding `extra` (no gradient in the last backward)
      // and those after it in launch order wait for all_reduce_mean().
      EXPECT_GT(reducer.overlapped_buckets(), 0);
      EXPECT_LT(reducer.overlapped_buckets(), reducer.bucket_count());
      for (size_t i = 0; i < net.params.size(); ++i)
        EXPECT_TRUE(torch::allclose(net.params[i].grad(), expected[i], 1e-6, 1e-7))
            << "param " << i << ", step " << step;
    }
    // Without prepare_overlap() the hooks stay quiet and the post-backward path gives the same mean.
    for (auto& p : net.params) p.mutable_grad() = torch::Tensor();
    for (int64_t m = 0; m < microbatches; ++m)
      replica_loss(net.forward(replica_input(g.coords.dp, m), m), g.coords.dp, m, microbatches).backward();
    reducer.all_reduce_mean();
    EXPECT_EQ(reducer.overlapped_buckets(), 0);
    for (size_t i = 0; i < net.params.size(); ++i)
      EXPECT_TRUE(torch::allclose(net.params[i].grad(), expected[i], 1e-6, 1e-7)) << "param " << i;
  });
}

TEST(GradReducer, OverlapsWithPipelineBackward) {
  const int64_t microbatches = 4;
  const std::vector<torch::Tensor> expected = replicated_mean_gradients(2, microbatches);  // whole net, model order
  testing::run_ranks(2, 1, 2, [&](ProcessGroups& g) {
    const int64_t s = g.coords.pp;
    const int64_t replica = g.coords.dp;
    TinyNet net(s * 2, 2);
    GradReducer reducer(net.params, g.dp, bucket_mb_for(kChannels));
    PipelineStage stage;
    stage.activation_shape = {3, kChannels};
    stage.forward = [&](int64_t micro, const torch::Tensor& input) {
      torch::Tensor h = net.forward(s == 0 ? replica_input(replica, micro) : input, micro);  // [3, C]
      return g.last_stage() ? replica_loss(h, replica, micro, microbatches) : h;
    };
    stage.before_backward = [&](int64_t micro) {
      if (micro == microbatches - 1) reducer.prepare_overlap();
    };
    run_pipeline(stage, microbatches, *g.pp, PipelineSchedule::kOneFOneB);
    reducer.all_reduce_mean();
    EXPECT_GT(reducer.overlapped_buckets(), 0);
    const size_t offset = s == 0 ? 0 : 1 + 2 * 2;  // stage 1's parameters follow extra + 2 layers in model order
    for (size_t i = 0; i < net.params.size(); ++i)
      EXPECT_TRUE(torch::allclose(net.params[i].grad(), expected[offset + i], 1e-6, 1e-7))
          << "stage " << s << " param " << i;
  });
}

}  // namespace
}  // namespace keel::parallel
