// Why: see layout.h.
#include "core/parallel/layout.h"

#include <stdexcept>

namespace keel::parallel {

Layout::Layout(int64_t dp, int64_t tp, int64_t pp) : dp_(dp), tp_(tp), pp_(pp) {
  if (dp < 1 || tp < 1 || pp < 1)
    throw std::invalid_argument("parallel.dp, parallel.tp and parallel.pp must be >= 1 (got " + describe() + ")");
}

int64_t Layout::rank_of(const Coordinates& c) const { return (c.pp * dp_ + c.dp) * tp_ + c.tp; }

Coordinates Layout::coordinates_of(int64_t rank) const {
  if (rank < 0 || rank >= world_size())
    throw std::out_of_range("rank " + std::to_string(rank) + " is outside the layout " + describe());
  Coordinates c;
  c.tp = rank % tp_;
  c.dp = (rank / tp_) % dp_;
  c.pp = rank / (tp_ * dp_);
  return c;
}

namespace {
// Ranks that share `rank`'s coordinates except along `axis` (which runs over 0..size-1).
std::vector<int64_t> group_along(const Layout& layout, int64_t rank, int64_t Coordinates::*axis, int64_t size) {
  Coordinates c = layout.coordinates_of(rank);
  std::vector<int64_t> ranks;
  for (c.*axis = 0; c.*axis < size; ++(c.*axis)) ranks.push_back(layout.rank_of(c));
  return ranks;
}
}  // namespace

std::vector<int64_t> Layout::dp_group(int64_t rank) const { return group_along(*this, rank, &Coordinates::dp, dp_); }
std::vector<int64_t> Layout::tp_group(int64_t rank) const { return group_along(*this, rank, &Coordinates::tp, tp_); }
std::vector<int64_t> Layout::pp_group(int64_t rank) const { return group_along(*this, rank, &Coordinates::pp, pp_); }

void Layout::require_world_size(int64_t world_size, const std::string& where) const {
  if (world_size != this->world_size()) {
    throw std::invalid_argument("parallel.dp x parallel.tp x parallel.pp = " + std::to_string(dp_) + " x " +
                                std::to_string(tp_) + " x " + std::to_string(pp_) + " = " +
                                std::to_string(this->world_size()) + ", but the job has " + std::to_string(world_size) +
                                " rank" + (world_size == 1 ? "" : "s") + " (" + where + "): they must be equal");
  }
}

Layout::StageLayers Layout::stage_layers(int64_t layers, int64_t stage) const {
  if (layers % pp_ != 0)
    throw std::invalid_argument("model.layers (" + std::to_string(layers) + ") must be divisible by parallel.pp (" +
                                std::to_string(pp_) + ")");
  const int64_t per_stage = layers / pp_;
  return {stage * per_stage, per_stage};
}

std::string Layout::describe() const {
  return "dp=" + std::to_string(dp_) + " tp=" + std::to_string(tp_) + " pp=" + std::to_string(pp_);
}

std::string Layout::describe_rank(int64_t rank) const {
  const Coordinates c = coordinates_of(rank);
  return "rank " + std::to_string(rank) + " (dp " + std::to_string(c.dp) + ", tp " + std::to_string(c.tp) + ", pp " +
         std::to_string(c.pp) + ")";
}

}  // namespace keel::parallel
