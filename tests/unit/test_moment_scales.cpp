// Why: Decision::moment_scales is applied by Keel to the optimizer's own state, so the parser must refuse every
// malformed text with a reason, the first matching glob must decide each tensor, and the application must change
// exactly the matched moments by exactly the factor (0 resets, NaN included) through save_state/load_state, for
// the real adamw, lion and muon plugins; an optimizer without the kind of moment asked for is an error naming it.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <limits>
#include <map>
#include <string>
#include <vector>

#include "core/plugin_host/plugin_host.h"
#include "core/plugin_host/plugin_library.h"
#include "core/train/moment_scales.h"

using keel::train::apply_moment_scales;
using keel::train::check_moment_scales;
using keel::train::moment_scale_for;
using keel::train::parse_moment_scales;

namespace {

const std::vector<std::string> kNames = {"embed.weight", "blocks.0.attn.wq.weight", "blocks.0.mlp.w_up.weight",
                                         "blocks.1.attn.wq.weight", "head.weight"};

std::shared_ptr<keel::sdk::Plugin> optimizer(const std::string& name) {
  using keel::plugin_host::PluginLibrary;
  return PluginLibrary::load(keel::plugin_host::resolve_plugin_path(name))->create({});
}

std::string parse_error(const std::string& text) {
  try {
    parse_moment_scales(text, kNames);
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "(parsed)";
}

// Params of kNames (shapes [4, 3]), bound to `opt`, after two steps with random gradients: non-zero moments.
std::vector<keel::sdk::Param> trained(keel::sdk::Plugin& opt) {
  torch::manual_seed(5);
  std::vector<keel::sdk::Param> params;
  for (const auto& name : kNames) {
    torch::Tensor p = torch::randn({4, 3}).set_requires_grad(true);
    params.push_back({name, p, true});
  }
  opt.bind(params);
  torch::NoGradGuard no_grad;
  for (int s = 0; s < 2; ++s) {
    for (auto& p : params) p.param.mutable_grad() = torch::randn({4, 3});
    keel::sdk::StepContext ctx;
    ctx.lr = 0.01;
    opt.step(ctx);
  }
  return params;
}

std::map<std::string, torch::Tensor> state_copy(const keel::sdk::Plugin& opt) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& [name, t] : opt.save_state().tensors) out[name] = t.clone();
  return out;
}

}  // namespace

TEST(MomentScales, ParsesEntriesInOrder) {
  const auto scales = parse_moment_scales("blocks.0.*:0:0.5;*:0.25:1", kNames);
  ASSERT_EQ(scales.size(), 2u);
  EXPECT_EQ(scales[0].glob, "blocks.0.*");
  EXPECT_EQ(scales[0].first, 0.0);
  EXPECT_EQ(scales[0].second, 0.5);
  EXPECT_EQ(scales[1].glob, "*");
  EXPECT_EQ(scales[1].first, 0.25);
  // The first matching entry decides a tensor.
  EXPECT_EQ(moment_scale_for(scales, "blocks.0.attn.wq.weight"), &scales[0]);
  EXPECT_EQ(moment_scale_for(scales, "blocks.1.attn.wq.weight"), &scales[1]);
  EXPECT_TRUE(parse_moment_scales("", kNames).empty());
  // '?' and classes, as fnmatch.
  EXPECT_EQ(parse_moment_scales("blocks.[01].attn.w?.weight:2:2", kNames).size(), 1u);
}

TEST(MomentScales, RefusesMalformedTextSayingWhy) {
  EXPECT_NE(parse_error("blocks.*").find("entry 'blocks.*' is not GLOB:FIRST:SECOND"), std::string::npos);
  EXPECT_NE(parse_error("blocks.*:1").find("is not GLOB:FIRST:SECOND"), std::string::npos);
  EXPECT_NE(parse_error(":1:1").find("is not GLOB:FIRST:SECOND"), std::string::npos);
  EXPECT_NE(parse_error("a:b:1:1").find("the glob holds a ':'"), std::string::npos);
  EXPECT_NE(parse_error("*:x:1").find("the first factor 'x' is not a finite number >= 0"), std::string::npos);
  EXPECT_NE(parse_error("*:1:-0.5").find("the second factor '-0.5'"), std::string::npos);
  EXPECT_NE(parse_error("*:1:inf").find("the second factor 'inf'"), std::string::npos);
  EXPECT_NE(parse_error("*:1:").find("the second factor ''"), std::string::npos);
  EXPECT_NE(parse_error("*:1:1;").find("entry '' is not"), std::string::npos);
  EXPECT_NE(parse_error("tok_embeddings.*:0:0").find("glob 'tok_embeddings.*' matches no tensor of the model"),
            std::string::npos);
}

TEST(MomentScales, ACheckedDecisionNamesThePluginStepAndText) {
  try {
    check_moment_scales("*:1", "my_handler", 12, kNames);
    FAIL() << "accepted";
  } catch (const keel::plugin_host::PluginError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("plugin my_handler returned moment_scales '*:1' from decide() at step 12"), std::string::npos)
        << what;
    EXPECT_NE(what.find("is not GLOB:FIRST:SECOND"), std::string::npos) << what;
  }
  EXPECT_NO_THROW(check_moment_scales("", "my_handler", 12, kNames));
}

TEST(MomentScales, ChangeExactlyTheMatchedMomentsOfAdamW) {
  auto adamw = optimizer("adamw");
  trained(*adamw);
  const auto before = state_copy(*adamw);
  const std::string json_before = adamw->save_state().json;
  const auto done = apply_moment_scales(*adamw, "adamw", parse_moment_scales("blocks.0.*:0.5:0;*.attn.*:0:3", kNames));
  EXPECT_EQ(done.first_tensors, 3);   // blocks.0.{wq,w_up} x0.5, blocks.1.wq x0
  EXPECT_EQ(done.second_tensors, 3);  // blocks.0.{wq,w_up} x0, blocks.1.wq x3
  const auto after = state_copy(*adamw);
  for (const auto& [name, t] : before) {
    const torch::Tensor& now = after.at(name);
    const bool first = name.size() > 8 && name.substr(name.size() - 8) == "/exp_avg";
    if (name.rfind("blocks.0.", 0) == 0) {
      EXPECT_TRUE(torch::equal(now, first ? t.mul(0.5) : torch::zeros_like(t))) << name;
    } else if (name.rfind("blocks.1.attn.", 0) == 0) {
      EXPECT_TRUE(torch::equal(now, first ? torch::zeros_like(t) : t.mul(3.0))) << name;
    } else {
      EXPECT_TRUE(torch::equal(now, t)) << name << " is matched by no glob";
    }
  }
  EXPECT_EQ(adamw->save_state().json, json_before) << "the bias-correction step count is not touched";
}

TEST(MomentScales, ZeroResetsEvenANonFiniteMoment) {
  auto adamw = optimizer("adamw");
  trained(*adamw);
  for (auto& [name, t] : adamw->save_state().tensors) {
    if (name == "head.weight/exp_avg") t.fill_(std::numeric_limits<float>::quiet_NaN());
  }
  apply_moment_scales(*adamw, "adamw", parse_moment_scales("head.*:0:1", kNames));
  const auto after = state_copy(*adamw);
  EXPECT_TRUE(torch::equal(after.at("head.weight/exp_avg"), torch::zeros({4, 3})));
}

TEST(MomentScales, LionHasFirstMomentsOnlyAndMuonBoth) {
  auto lion = optimizer("lion");
  trained(*lion);
  const auto before = state_copy(*lion);
  const auto done = apply_moment_scales(*lion, "lion", parse_moment_scales("*:0.5:1", kNames));
  EXPECT_EQ(done.first_tensors, 5);
  EXPECT_TRUE(torch::equal(state_copy(*lion).at("embed.weight/exp_avg"), before.at("embed.weight/exp_avg").mul(0.5)));
  try {
    apply_moment_scales(*lion, "lion", parse_moment_scales("blocks.*:1:0", kNames));
    FAIL() << "lion has no second moments";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("optimizer lion has no '<param>/exp_avg_sq' tensors in its state"),
              std::string::npos)
        << e.what();
  }
  // muon: its momentum (hidden matrices) is a first moment; the AdamW part (embed, head) has both.
  auto muon = optimizer("muon");
  trained(*muon);
  const auto muon_done = apply_moment_scales(*muon, "muon", parse_moment_scales("*:0:0", kNames));
  EXPECT_EQ(muon_done.first_tensors, 5);
  EXPECT_EQ(muon_done.second_tensors, 2);
  for (const auto& [name, t] : state_copy(*muon)) EXPECT_TRUE(torch::equal(t, torch::zeros_like(t))) << name;
}
