// Why: GLM-130B (Zeng et al. 2022, section 3) found most of its loss spikes start from abnormal gradients of
// the input embedding and tamed them by shrinking that gradient: word_embedding = alpha * word_embedding +
// (1 - alpha) * word_embedding.detach(), i.e. the embedding's gradient is multiplied by alpha (0.1). As a
// grad_transform this is exactly: grad(param) *= alpha for the one tensor named `param`; every other gradient is
// left untouched. With tied embeddings (no separate head) "embed.weight" is also the output head, and its whole
// gradient is shrunk. Under pipeline parallelism only the stage that holds the tensor finds it; a missing tensor
// is an error (naming it, with the names there are) unless ctx.pp_size > 1. Emits the metric "shrunk_tensors"
// (1 or 0).
// Arguments: alpha (0.1, in [0, 1]), param ("embed.weight").
#include <ATen/ATen.h>

#include <stdexcept>
#include <string>

#include "keel/plugin.h"

namespace {

class EmbeddingGradShrink : public keel::sdk::Plugin {
 public:
  explicit EmbeddingGradShrink(const keel::sdk::Args& args) : options_(parse_options(args)) {}

  void transform_grads(const keel::sdk::StepContext& ctx, std::vector<keel::sdk::Param>& params) override {
    for (auto& p : params) {
      if (p.name != options_.param) continue;
      at::Tensor& grad = p.param.mutable_grad();
      if (grad.defined()) grad.mul_(options_.alpha);
      ctx.metric("shrunk_tensors", grad.defined() ? 1.0 : 0.0);
      return;
    }
    if (ctx.pp_size > 1) {  // another pipeline stage holds it
      ctx.metric("shrunk_tensors", 0.0);
      return;
    }
    std::string names;
    for (const auto& p : params) names += (names.empty() ? "" : ", ") + p.name;
    if (names.size() > 300) names = names.substr(0, 300) + "...";
    throw std::invalid_argument("embedding_grad_shrink: no parameter named '" + options_.param +
                                "' (argument 'param'); parameters: " + names);
  }

 private:
  struct Options {
    double alpha;
    std::string param;
  };
  static Options parse_options(const keel::sdk::Args& args) {
    keel::sdk::require_known_args(args, {"alpha", "param"});
    Options o{keel::sdk::arg_double(args, "alpha", 0.1), keel::sdk::arg_string(args, "param", "embed.weight")};
    if (!(o.alpha >= 0 && o.alpha <= 1)) {
      throw std::invalid_argument("embedding_grad_shrink: argument 'alpha' must be in [0, 1], got " + args.at("alpha"));
    }
    if (o.param.empty()) throw std::invalid_argument("embedding_grad_shrink: argument 'param' is empty");
    return o;
  }

  Options options_;
};

}  // namespace

KEEL_PLUGIN(EmbeddingGradShrink, "embedding_grad_shrink", "1.0", keel::sdk::kGradTransform,
            "GLM-130B embedding gradient shrink: multiplies the input embedding's gradient by alpha")
