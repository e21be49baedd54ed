// Why: the pipeline schedule must be invisible in the numbers: a toy model split into 2 or 4 stages (ranks as
// threads over real Gloo groups) gives the same summed loss and the same gradients as the single-process
// gradient-accumulation loop over the same micro-batches, for both schedules, for micro-batch counts below,
// at and above the stage count, with fp32 and bf16 activations between stages; 1F1B keeps at most P - s
// micro-batches alive on stage s.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <map>
#include <numeric>

#include "core/parallel/pipeline.h"
#include "tests/unit/parallel_ranks.h"

namespace keel::parallel {
namespace {

constexpr int64_t kLayers = 8;
constexpr int64_t kBatch = 2;     // b
constexpr int64_t kSeq = 3;       // T
constexpr int64_t kChannels = 6;  // C

// Deterministic values without the global generator (ranks are threads): sin of a scaled index.
torch::Tensor fixed_tensor(const std::vector<int64_t>& shape, double seed, double scale) {
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  return (torch::sin(torch::arange(numel, torch::kDouble) * 0.731 + seed) * scale).to(torch::kFloat).reshape(shape);
}

torch::Tensor micro_input(int64_t micro) { return fixed_tensor({kBatch, kSeq, kChannels}, 100.0 + micro, 1.0); }
torch::Tensor micro_target(int64_t micro) { return fixed_tensor({kBatch, kSeq, kChannels}, 200.0 + micro, 0.8); }

// Layers [first, first + count) of the toy model: h = tanh(h W^T + b), fixed weights.
struct ToyStage {
  std::vector<torch::Tensor> weights;  // each [C, C], leaf
  std::vector<torch::Tensor> biases;   // each [C], leaf
  int64_t first = 0;

  ToyStage(int64_t first_layer, int64_t count) : first(first_layer) {
    for (int64_t l = first_layer; l < first_layer + count; ++l) {
      weights.push_back(fixed_tensor({kChannels, kChannels}, 1.0 + l, 0.6).requires_grad_(true));
      biases.push_back(fixed_tensor({kChannels}, 50.0 + l, 0.1).requires_grad_(true));
    }
  }
  torch::Tensor forward(torch::Tensor h) const {  // [b, T, C] -> [b, T, C] fp32
    if (h.scalar_type() != torch::kFloat) h = h.to(torch::kFloat);
    for (size_t l = 0; l < weights.size(); ++l)
      h = torch::tanh(torch::nn::functional::linear(h, weights[l], biases[l]));
    return h;
  }
};

torch::Tensor micro_loss(const torch::Tensor& h, int64_t micro, int64_t microbatches) {  // [] scaled by 1/M
  return (h - micro_target(micro)).pow(2).mean() / static_cast<double>(microbatches);
}

struct Reference {
  double loss_sum = 0.0;
  std::vector<torch::Tensor> weight_grads, bias_grads;  // per layer [C, C], [C]
};

// The single-process loop: forward and backward per micro-batch, gradients accumulating. `stages` only decides
// where activations are cast to `activation_dtype`, exactly where the pipeline sends them.
Reference single_process_reference(int64_t stages, int64_t microbatches, torch::ScalarType activation_dtype) {
  std::vector<ToyStage> parts;
  for (int64_t s = 0; s < stages; ++s) parts.emplace_back(s * kLayers / stages, kLayers / stages);
  Reference ref;
  for (int64_t m = 0; m < microbatches; ++m) {
    torch::Tensor h = micro_input(m);  // [b, T, C]
    for (int64_t s = 0; s < stages; ++s) {
      h = parts[static_cast<size_t>(s)].forward(h);
      if (s + 1 < stages) h = h.to(activation_dtype);
    }
    torch::Tensor loss = micro_loss(h, m, microbatches);
    ref.loss_sum += loss.item<double>();
    loss.backward();
  }
  for (const auto& part : parts) {
    for (const auto& w : part.weights) ref.weight_grads.push_back(w.grad().clone());
    for (const auto& b : part.biases) ref.bias_grads.push_back(b.grad().clone());
  }
  return ref;
}

double relative_error(const torch::Tensor& got, const torch::Tensor& want) {
  return (got.to(torch::kDouble) - want.to(torch::kDouble)).norm().item<double>() /
         std::max(want.to(torch::kDouble).norm().item<double>(), 1e-30);
}

// Runs one pipelined step on this rank's stage and checks it against `ref`.
void run_and_check_stage(Communicator& pp, int64_t microbatches, PipelineSchedule schedule,
                         torch::ScalarType activation_dtype, const Reference& ref) {
  const int64_t stages = pp.size();
  const int64_t s = pp.rank();
  const bool last = s == stages - 1;
  SCOPED_TRACE("stage " + std::to_string(s) + " of " + std::to_string(stages) + ", " + keel::name_of(schedule) +
               ", M = " + std::to_string(microbatches));
  ToyStage model(s * kLayers / stages, kLayers / stages);
  double loss_sum = 0.0;
  std::vector<int64_t> forward_order;

  PipelineStage stage;
  stage.activation_shape = {kBatch, kSeq, kChannels};
  stage.activation_dtype = activation_dtype;
  stage.device = torch::kCPU;
  stage.forward = [&](int64_t micro, const torch::Tensor& input) {
    forward_order.push_back(micro);
    EXPECT_EQ(input.defined(), s > 0);
    if (input.defined()) {
      EXPECT_TRUE(input.requires_grad() && input.is_leaf());
      EXPECT_EQ(input.scalar_type(), activation_dtype);
    }
    torch::Tensor h = model.forward(s == 0 ? micro_input(micro) : input);  // [b, T, C]
    if (!last) return h.to(activation_dtype);
    torch::Tensor loss = micro_loss(h, micro, microbatches);
    loss_sum += loss.item<double>();
    return loss;
  };
  const PipelineRunStats stats = run_pipeline(stage, microbatches, pp, schedule);

  std::vector<int64_t> expected_order(static_cast<size_t>(microbatches));
  std::iota(expected_order.begin(), expected_order.end(), 0);
  EXPECT_EQ(forward_order, expected_order);
  if (stages > 1) {
    if (schedule == PipelineSchedule::kOneFOneB) {
      EXPECT_EQ(stats.warmup_forwards, std::min(stages - s - 1, microbatches));
      EXPECT_LE(stats.peak_in_flight, stages - s);  // 1F1B's memory bound
    } else {
      EXPECT_EQ(stats.peak_in_flight, microbatches);
    }
  } else {
    EXPECT_EQ(stats.peak_in_flight, 1);
  }

  torch::Tensor loss = torch::full({1}, loss_sum, torch::kDouble);  // [1]
  if (stages > 1) pp.broadcast(loss, stages - 1);
  EXPECT_NEAR(loss.item<double>(), ref.loss_sum, 1e-6 * std::abs(ref.loss_sum));
  for (size_t l = 0; l < model.weights.size(); ++l) {
    const size_t layer = static_cast<size_t>(model.first) + l;
    ASSERT_TRUE(model.weights[l].grad().defined());
    EXPECT_LE(relative_error(model.weights[l].grad(), ref.weight_grads[layer]), 1e-6) << "layer " << layer;
    EXPECT_LE(relative_error(model.biases[l].grad(), ref.bias_grads[layer]), 1e-6) << "layer " << layer;
  }
}

// The schedule is parsed once, by the config, into the enum run_pipeline takes (nothing re-parses it per step).
TEST(Pipeline, ScheduleComesParsedFromTheConfig) {
  keel::Config c;
  EXPECT_EQ(c.parallel.schedule, PipelineSchedule::kOneFOneB);
  keel::apply_override(c, "parallel.schedule=gpipe");
  EXPECT_EQ(c.parallel.schedule, PipelineSchedule::kGPipe);
  try {
    keel::apply_override(c, "parallel.schedule=interleaved");
    FAIL() << "no error";
  } catch (const keel::ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("parallel.schedule"), std::string::npos) << e.what();
  }
}

TEST(Pipeline, SingleStageIsTheGradientAccumulationLoop) {
  auto pp = Communicator::solo("pp");
  for (PipelineSchedule schedule : {PipelineSchedule::kOneFOneB, PipelineSchedule::kGPipe}) {
    const Reference ref = single_process_reference(1, 3, torch::kFloat);
    run_and_check_stage(*pp, 3, schedule, torch::kFloat, ref);
  }
}

// Every micro-batch count (below, at and above the stage count) and both schedules, on one set of ranks.
void check_all_schedules(int64_t stages) {
  const std::vector<int64_t> micro_counts{1, 2, 4, 8};
  std::map<int64_t, Reference> refs;
  for (int64_t m : micro_counts) refs[m] = single_process_reference(stages, m, torch::kFloat);
  testing::run_ranks(1, 1, stages, [&](ProcessGroups& g) {
    for (PipelineSchedule schedule : {PipelineSchedule::kOneFOneB, PipelineSchedule::kGPipe})
      for (int64_t m : micro_counts) run_and_check_stage(*g.pp, m, schedule, torch::kFloat, refs.at(m));
  });
}

TEST(Pipeline, TwoStagesMatchSingleProcess) { check_all_schedules(2); }

TEST(Pipeline, FourStagesMatchSingleProcess) { check_all_schedules(4); }

TEST(Pipeline, Bf16ActivationsBetweenStages) {
  const Reference ref = single_process_reference(2, 4, torch::kBFloat16);
  testing::run_ranks(1, 1, 2, [&](ProcessGroups& g) {
    for (PipelineSchedule schedule : {PipelineSchedule::kOneFOneB, PipelineSchedule::kGPipe})
      run_and_check_stage(*g.pp, 4, schedule, torch::kBFloat16, ref);
  });
}

TEST(Pipeline, WrongActivationShapeIsNamed) {
  auto pp = Communicator::solo("pp");
  PipelineStage stage;
  stage.activation_shape = {kBatch, kSeq, kChannels};
  stage.forward = [](int64_t, const torch::Tensor&) { return torch::ones({2, 2}, torch::requires_grad()); };
  try {
    run_pipeline(stage, 1, *pp, PipelineSchedule::kOneFOneB);  // a single stage is the last: wants a scalar
    FAIL() << "no error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("scalar loss"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace keel::parallel
