// Why: one object owns the arithmetic of a DP x TP x PP layout (torchtitan's ParallelDims idea): which global
// rank sits at which (dp, tp, pp) coordinate, which ranks form each group, which layers a pipeline stage
// holds, and whether the layout fits the job. Everything else asks it instead of recomputing. Torch-free.
//
// Rank order (Megatron's default): tp varies fastest, then dp, then pp:
//   rank = (pp_rank * dp + dp_rank) * tp + tp_rank
// so a TP group is a run of consecutive ranks (one node's GPUs in production) and a pipeline spans nodes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace keel::parallel {

struct Coordinates {
  int64_t dp = 0;
  int64_t tp = 0;
  int64_t pp = 0;
};

class Layout {
 public:
  Layout() = default;
  Layout(int64_t dp, int64_t tp, int64_t pp);

  int64_t dp() const { return dp_; }
  int64_t tp() const { return tp_; }
  int64_t pp() const { return pp_; }
  int64_t world_size() const { return dp_ * tp_ * pp_; }
  bool single() const { return world_size() == 1; }

  int64_t rank_of(const Coordinates& c) const;
  Coordinates coordinates_of(int64_t rank) const;

  // Global ranks of the group `rank` belongs to, in group-rank order.
  std::vector<int64_t> dp_group(int64_t rank) const;  // same tp and pp
  std::vector<int64_t> tp_group(int64_t rank) const;  // same dp and pp
  std::vector<int64_t> pp_group(int64_t rank) const;  // same dp and tp

  // Throws std::invalid_argument naming parallel.dp/tp/pp and the world size when they do not match.
  void require_world_size(int64_t world_size, const std::string& where) const;

  // Layers [first, first + count) of `layers` held by pipeline stage `stage` (layers % pp == 0 is validated
  // by the config).
  struct StageLayers {
    int64_t first = 0;
    int64_t count = 0;
  };
  StageLayers stage_layers(int64_t layers, int64_t stage) const;

  // "dp=2 tp=1 pp=2"
  std::string describe() const;
  // "rank 3 (dp 1, tp 1, pp 0)"
  std::string describe_rank(int64_t rank) const;

  bool operator==(const Layout& o) const { return dp_ == o.dp_ && tp_ == o.tp_ && pp_ == o.pp_; }
  bool operator!=(const Layout& o) const { return !(*this == o); }

 private:
  int64_t dp_ = 1, tp_ = 1, pp_ = 1;
};

}  // namespace keel::parallel
