// Why: the RMSNorm launchers' shape decisions (threads per row, rows per block, whether the backward's
// grad_weight accumulators fit in shared memory) as plain host C++, free of CUDA headers, so that CPU unit tests
// check the boundaries that only fail at launch time on a GPU. The shared-memory limit is for static plus
// dynamic shared memory together: the backward kernel's own `scratch[32]` (128 B) counts against the 48 KiB a
// launch gets without opting in, so the accumulators may use 48 KiB - 128 B.
#pragma once

#include <algorithm>
#include <cstdint>

namespace keel::kernels::cuda {

constexpr int64_t kRmsNormWarp = 32;
constexpr int64_t kDefaultSharedLimitBytes = 48 * 1024;  // per block, without cudaFuncAttributeMaxDynamic...
constexpr int64_t kRmsNormBackwardStaticSharedBytes = 32 * static_cast<int64_t>(sizeof(float));  // scratch[32]

struct RowGeometry {
  int threads_per_row;  // blockDim.x: a multiple of 32, about C/4, in [32, 1024]
  int rows_per_block;   // blockDim.y: so that a block has >= 256 threads
};

inline RowGeometry rms_norm_row_geometry(int64_t C) {
  const int64_t quarter = (C + 3) / 4;
  const int64_t threads =
      std::clamp<int64_t>((quarter + kRmsNormWarp - 1) / kRmsNormWarp * kRmsNormWarp, kRmsNormWarp, 1024);
  return {static_cast<int>(threads), static_cast<int>(std::max<int64_t>(1, 256 / threads))};
}

struct RmsNormBackwardLaunch {
  RowGeometry geometry;       // rows_per_block is 1 when the accumulators live in the workspace
  bool accumulate_in_shared;  // grad_weight partials in shared memory ([rows_per_block, C] fp32)
  int64_t dynamic_shared_bytes;
};

// The backward's launch for rows of C values: accumulators in shared memory when they fit beside the kernel's
// static shared memory within the default limit, else in the global workspace.
inline RmsNormBackwardLaunch rms_norm_backward_launch(int64_t C) {
  RmsNormBackwardLaunch launch{rms_norm_row_geometry(C), true, 0};
  launch.dynamic_shared_bytes =
      static_cast<int64_t>(launch.geometry.rows_per_block) * C * static_cast<int64_t>(sizeof(float));
  if (launch.dynamic_shared_bytes + kRmsNormBackwardStaticSharedBytes > kDefaultSharedLimitBytes) {
    launch.accumulate_in_shared = false;
    launch.geometry.rows_per_block = 1;  // one accumulator row per block: workspace[b, :] itself
    launch.dynamic_shared_bytes = 0;
  }
  return launch;
}

}  // namespace keel::kernels::cuda
