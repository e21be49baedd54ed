// Why: the decoder must match a naive, obviously-correct reference (forward and gradients), never look ahead,
// keep RoPE in fp32 with partial rotary respected, and produce GQA shapes; bf16-mixed must keep fp32 masters.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/model/llama.h"
#include "tests/unit/test_support.h"

using keel::ModelConfig;
using keel::model::Llama;

namespace {

ModelConfig small_config() { return keel::testing::small_model_config(12); }

torch::Tensor param(Llama& m, const std::string& name) {
  auto params = m->named_parameters();
  const torch::Tensor* p = params.find(name);
  TORCH_CHECK(p != nullptr, "no parameter ", name);
  return *p;
}

// Reference RMSNorm / LayerNorm written from the formulas, in double precision where it matters.
torch::Tensor ref_norm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b, const ModelConfig& c) {
  if (c.norm == keel::NormKind::kRmsNorm) return x / torch::sqrt((x * x).mean(-1, true) + c.norm_eps) * w;
  auto mean = x.mean(-1, true);
  auto var = ((x - mean) * (x - mean)).mean(-1, true);
  return (x - mean) / torch::sqrt(var + c.norm_eps) * w + b;
}

// Reference RoPE: explicit per-position, per-pair rotation (rotate-half pairing: i with i + R/2).
torch::Tensor ref_rope(const torch::Tensor& x, const ModelConfig& c) {  // [B, T, h, D]
  const int64_t D = x.size(-1);
  const int64_t R = static_cast<int64_t>(std::floor(D * c.rotary_fraction / 2.0)) * 2;
  torch::Tensor out = x.clone();
  for (int64_t t = 0; t < x.size(1); ++t) {
    for (int64_t i = 0; i < R / 2; ++i) {
      const double angle = t * std::pow(c.rope_theta, -2.0 * i / R);
      auto a = x.select(1, t).select(-1, i);
      auto b = x.select(1, t).select(-1, i + R / 2);
      out.select(1, t).select(-1, i).copy_(a * std::cos(angle) - b * std::sin(angle));
      out.select(1, t).select(-1, i + R / 2).copy_(b * std::cos(angle) + a * std::sin(angle));
    }
  }
  return out;
}

// Naive decoder using the model's own parameters: explicit loops over heads, explicit causal mask.
torch::Tensor ref_logits(Llama& m, const torch::Tensor& tokens, const ModelConfig& c) {
  const int64_t B = tokens.size(0), T = tokens.size(1), H = c.heads, K = c.kv_heads, D = c.head_dim();
  torch::Tensor none;
  torch::Tensor x = param(m, "embed.weight").index_select(0, tokens.reshape({-1})).view({B, T, c.d_model});
  for (int64_t l = 0; l < c.layers; ++l) {
    const std::string p = "blocks." + std::to_string(l) + ".";
    auto w = [&](const std::string& n) { return param(m, p + n); };
    torch::Tensor h =
        ref_norm(x, w("attn_norm.weight"), c.norm == keel::NormKind::kLayerNorm ? w("attn_norm.bias") : none, c);
    torch::Tensor q = torch::matmul(h, w("attn.wq.weight").t()).view({B, T, H, D});
    torch::Tensor k = torch::matmul(h, w("attn.wk.weight").t()).view({B, T, K, D});
    torch::Tensor v = torch::matmul(h, w("attn.wv.weight").t()).view({B, T, K, D});
    q = ref_rope(q, c);
    k = ref_rope(k, c);
    std::vector<torch::Tensor> heads;
    for (int64_t head = 0; head < H; ++head) {
      const int64_t kv = head / (H / K);
      torch::Tensor qh = q.select(2, head), kh = k.select(2, kv), vh = v.select(2, kv);  // [B, T, D]
      torch::Tensor scores = torch::matmul(qh, kh.transpose(1, 2)) / std::sqrt(static_cast<double>(D));
      torch::Tensor mask = torch::ones({T, T}, torch::kBool).triu(1);
      scores = scores.masked_fill(mask, -1e30);
      heads.push_back(torch::matmul(torch::softmax(scores, -1), vh));
    }
    x = x + torch::matmul(torch::cat(heads, -1), w("attn.wo.weight").t());
    torch::Tensor g =
        ref_norm(x, w("mlp_norm.weight"), c.norm == keel::NormKind::kLayerNorm ? w("mlp_norm.bias") : none, c);
    torch::Tensor gate = torch::matmul(g, w("mlp.w_gate.weight").t());
    torch::Tensor up = torch::matmul(g, w("mlp.w_up.weight").t());
    x = x + torch::matmul(gate * torch::sigmoid(gate) * up, w("mlp.w_down.weight").t());
  }
  x = ref_norm(x, param(m, "final_norm.weight"),
               c.norm == keel::NormKind::kLayerNorm ? param(m, "final_norm.bias") : none, c);
  return torch::matmul(x, (c.tie_embeddings ? param(m, "embed.weight") : param(m, "head.weight")).t());
}

void expect_matches_reference(const ModelConfig& c) {
  Llama model(c);
  model->init_weights(7);
  torch::manual_seed(3);
  torch::Tensor window = torch::randint(0, c.vocab, {2, c.seq_len + 1}, torch::kLong);
  torch::Tensor inputs = window.narrow(1, 0, c.seq_len), targets = window.narrow(1, 1, c.seq_len);

  torch::Tensor logits = model->forward(inputs, torch::kFloat);
  torch::Tensor expected = ref_logits(model, inputs, c);
  EXPECT_TRUE(torch::allclose(logits, expected, 1e-4, 1e-5)) << (logits - expected).abs().max().item<double>();

  // Gradients: model loss vs reference cross-entropy through the reference forward.
  auto parts = model->loss(window, torch::kFloat);
  parts.loss.backward();
  std::map<std::string, torch::Tensor> model_grads;
  for (const auto& item : model->named_parameters()) {
    model_grads[item.key()] = item.value().grad().clone();
    item.value().mutable_grad() = torch::Tensor();
  }
  torch::Tensor ref_loss =
      torch::nn::functional::cross_entropy(ref_logits(model, inputs, c).reshape({-1, c.vocab}), targets.reshape({-1}));
  EXPECT_NEAR(parts.nll.item<double>(), ref_loss.item<double>(), 1e-5);
  ref_loss.backward();
  for (const auto& item : model->named_parameters()) {
    const torch::Tensor& g = item.value().grad();
    EXPECT_TRUE(torch::allclose(model_grads[item.key()], g, 1e-3, 1e-6)) << item.key();
  }
}

}  // namespace

TEST(Model, MatchesNaiveReferenceForwardAndBackward) { expect_matches_reference(small_config()); }

TEST(Model, MatchesReferenceWithLayerNormPartialRotaryTiedEmbeddings) {
  ModelConfig c = small_config();
  c.norm = keel::NormKind::kLayerNorm;
  c.rotary_fraction = 0.25;
  c.tie_embeddings = true;
  c.kv_heads = 4;
  expect_matches_reference(c);
}

TEST(Model, CausalMaskNeverLooksAhead) {
  ModelConfig c = small_config();
  Llama model(c);
  model->init_weights(1);
  torch::Tensor tokens = torch::randint(0, c.vocab, {1, c.seq_len}, torch::kLong);
  torch::Tensor changed = tokens.clone();
  const int64_t t = 7;
  changed.index_put_({0, t}, (tokens.index({0, t}).item<int64_t>() + 1) % c.vocab);
  torch::Tensor a = model->forward(tokens, torch::kFloat), b = model->forward(changed, torch::kFloat);
  EXPECT_TRUE(torch::equal(a.narrow(1, 0, t), b.narrow(1, 0, t)));
  EXPECT_FALSE(torch::allclose(a.narrow(1, t, 1), b.narrow(1, t, 1)));
}

TEST(Model, RopeTablesAreFp32AndPartialRotaryLeavesTheRestAlone) {
  auto tables = keel::model::make_rotary_tables(/*head_dim=*/16, /*rotary_fraction=*/0.25, 10000.0, 32);
  EXPECT_EQ(tables.rotary_dims, 4);
  EXPECT_EQ(tables.cos.scalar_type(), torch::kFloat);
  // angle(t, i) = t * theta^(-2i/R), checked in double precision at a large position
  EXPECT_NEAR(tables.cos.index({31, 1}).item<double>(), std::cos(31.0 * std::pow(10000.0, -2.0 / 4)), 1e-6);
  torch::Tensor x = torch::randn({1, 32, 2, 16}).to(torch::kBFloat16);
  torch::Tensor y = keel::model::apply_rotary(x, tables);
  EXPECT_EQ(y.scalar_type(), torch::kBFloat16);
  EXPECT_TRUE(torch::equal(y.narrow(-1, 4, 12), x.narrow(-1, 4, 12)));
  // rotation preserves each pair's norm (position 0 is the identity)
  EXPECT_TRUE(torch::equal(y.select(1, 0), x.select(1, 0)));
}

TEST(Model, RopeDependsOnlyOnRelativePosition) {
  auto tables = keel::model::make_rotary_tables(8, 1.0, 10000.0, 16);
  torch::Tensor q = torch::randn({1, 1, 1, 8}), k = torch::randn({1, 1, 1, 8});
  auto at = [&](const torch::Tensor& v, int64_t pos) {
    torch::Tensor seq = torch::zeros({1, 16, 1, 8});
    seq.select(1, pos).copy_(v.select(1, 0));
    return keel::model::apply_rotary(seq, tables).select(1, pos);
  };
  const double d1 = (at(q, 5) * at(k, 2)).sum().item<double>();
  const double d2 = (at(q, 13) * at(k, 10)).sum().item<double>();
  EXPECT_NEAR(d1, d2, 1e-4);
}

TEST(Model, GroupedQueryAttentionShapes) {
  ModelConfig c = small_config();  // 4 heads, 2 kv heads, head dim 8
  Llama model(c);
  EXPECT_EQ(param(model, "blocks.0.attn.wq.weight").sizes(), (std::vector<int64_t>{32, 32}));
  EXPECT_EQ(param(model, "blocks.0.attn.wk.weight").sizes(), (std::vector<int64_t>{16, 32}));
  EXPECT_EQ(param(model, "blocks.0.attn.wv.weight").sizes(), (std::vector<int64_t>{16, 32}));
  model->init_weights(1);
  torch::Tensor logits = model->forward(torch::zeros({3, 5}, torch::kLong), torch::kFloat);
  EXPECT_EQ(logits.sizes(), (std::vector<int64_t>{3, 5, c.vocab}));
}

TEST(Model, Bf16MixedKeepsFp32MastersAndGradientsAndTracksFp32Loss) {
  ModelConfig c = small_config();
  Llama model(c);
  model->init_weights(2);
  torch::Tensor window = torch::randint(0, c.vocab, {4, c.seq_len + 1}, torch::kLong);
  auto parts = model->loss(window, torch::kBFloat16);
  EXPECT_EQ(parts.loss.scalar_type(), torch::kFloat);
  parts.loss.backward();
  for (const auto& p : model->parameters()) {
    EXPECT_EQ(p.scalar_type(), torch::kFloat);
    EXPECT_EQ(p.grad().scalar_type(), torch::kFloat);
  }
  const double fp32_loss = model->loss(window, torch::kFloat).nll.item<double>();
  EXPECT_NEAR(parts.nll.item<double>(), fp32_loss, 0.02 * fp32_loss);
}

TEST(Model, ZLossAddsLogZSquared) {
  ModelConfig c = small_config();
  c.z_loss = 1e-2;
  Llama model(c);
  model->init_weights(4);
  torch::Tensor window = torch::randint(0, c.vocab, {2, c.seq_len + 1}, torch::kLong);
  auto parts = model->loss(window, torch::kFloat);
  torch::Tensor logits = model->forward(window.narrow(1, 0, c.seq_len), torch::kFloat).reshape({-1, c.vocab});
  const double expected = 1e-2 * torch::logsumexp(logits, -1).pow(2).mean().item<double>();
  EXPECT_NEAR(parts.z_loss.item<double>(), expected, 1e-6);
  EXPECT_NEAR(parts.loss.item<double>(), parts.nll.item<double>() + expected, 1e-5);
}

TEST(Model, InitIsDeterministicPerSeed) {
  ModelConfig c = small_config();
  Llama a(c), b(c), d(c);
  a->init_weights(11);
  b->init_weights(11);
  d->init_weights(12);
  EXPECT_TRUE(torch::equal(param(a, "blocks.1.mlp.w_up.weight"), param(b, "blocks.1.mlp.w_up.weight")));
  EXPECT_FALSE(torch::equal(param(a, "blocks.1.mlp.w_up.weight"), param(d, "blocks.1.mlp.w_up.weight")));
}
