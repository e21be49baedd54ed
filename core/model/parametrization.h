// Why: μP (maximal update parametrization, Yang et al., "Tensor Programs V") lets hyperparameters tuned on a narrow
// proxy model carry over to a wide one — how CrystalCoder was trained. Under model.parametrization = mup, with the
// width ratio m = d_model / model.mup_base_d_model, Keel scales (for Adam-like optimizers):
//   - hidden matrices (every 2-D weight inside a block): init std / sqrt(m) and LR / m (sdk::Param::lr_scale);
//   - the output logits by 1 / m (the readout multiplier; applied to the final normed activations, which is the
//     same product and works for the fused cross-entropy too);
//   - attention logits by sqrt(D0 / D) on top of 1 / sqrt(D), i.e. sqrt(D0) / D: μP's 1/D rule, anchored so that
//     the base model (D = D0 = mup_base_d_model / heads) is unchanged;
//   - embeddings, norms and the (untied) head keep the configured init and LR.
// Every factor is exactly 1 at m = 1, and the model then computes exactly what model.parametrization = standard
// computes (tested bit for bit). One place answers "which factor applies to this tensor" for the model, the trainer
// and `keel plan`.
#pragma once

#include <cstdint>
#include <string>

#include "core/config/config.h"

namespace keel::model {

// d_model / mup_base_d_model under mup (1 when the base is 0 or the parametrization is standard).
double mup_width_ratio(const ModelConfig& config);
// Whether `name` (a model parameter name, "blocks.3.attn.wq.weight") of `dim` dimensions is a hidden matrix.
bool is_hidden_matrix(const std::string& name, int64_t dim);
// The LR multiplier of one parameter (1 / m for hidden matrices under mup, else 1).
double mup_lr_scale(const ModelConfig& config, const std::string& name, int64_t dim);
// The init-std multiplier of one parameter (1 / sqrt(m) for hidden matrices under mup, else 1).
double mup_init_scale(const ModelConfig& config, const std::string& name, int64_t dim);
// The factor on the output logits (1 / m under mup, else 1).
double mup_output_multiplier(const ModelConfig& config);
// The extra factor on the queries (sqrt(D0 / D) under mup, else 1).
double mup_query_multiplier(const ModelConfig& config);

}  // namespace keel::model
