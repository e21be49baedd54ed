// Why: the fused RMSNorm backward keeps its grad_weight accumulators in shared memory when they fit; a launch
// that asks for more than the 48 KiB default (its dynamic bytes plus the kernel's 128 B of static scratch)
// fails only on a GPU, at d_model 12257..12288. The decision is host code (kernels/cuda/rms_norm_geometry.h),
// checked here at that boundary and at the sizes the configs use.
#include <gtest/gtest.h>

#include "kernels/cuda/rms_norm_geometry.h"

namespace keel::kernels::cuda {
namespace {

TEST(KernelRmsNormGeometry, SharedAccumulatorsStopWhereStaticPlusDynamicPassesTheDefaultLimit) {
  const RmsNormBackwardLaunch last_fit = rms_norm_backward_launch(12256);  // 49024 + 128 = 49152
  EXPECT_TRUE(last_fit.accumulate_in_shared);
  EXPECT_EQ(last_fit.dynamic_shared_bytes, 12256 * 4);
  EXPECT_EQ(last_fit.dynamic_shared_bytes + kRmsNormBackwardStaticSharedBytes, kDefaultSharedLimitBytes);
  for (const int64_t C : {12257, 12288}) {  // 12288: exactly 48 KiB dynamic, which left no room for scratch
    const RmsNormBackwardLaunch launch = rms_norm_backward_launch(C);
    EXPECT_FALSE(launch.accumulate_in_shared) << C;
    EXPECT_EQ(launch.dynamic_shared_bytes, 0) << C;
    EXPECT_EQ(launch.geometry.rows_per_block, 1) << C;
  }
}

TEST(KernelRmsNormGeometry, EveryLaunchFitsTheDefaultLimitAndSmallRowsShareABlock) {
  for (int64_t C = 1; C <= 20000; C += 37) {
    const RmsNormBackwardLaunch launch = rms_norm_backward_launch(C);
    EXPECT_LE(launch.dynamic_shared_bytes + kRmsNormBackwardStaticSharedBytes, kDefaultSharedLimitBytes) << C;
    EXPECT_EQ(launch.geometry.threads_per_row % 32, 0) << C;
    EXPECT_LE(launch.geometry.threads_per_row * launch.geometry.rows_per_block, 1024) << C;
  }
  const RowGeometry small = rms_norm_row_geometry(64);  // C/4 = 16, up to a warp: 32 threads, 8 rows
  EXPECT_EQ(small.threads_per_row, 32);
  EXPECT_EQ(small.rows_per_block, 8);
  const RowGeometry wide = rms_norm_row_geometry(2048);  // the 953M config's d_model
  EXPECT_EQ(wide.threads_per_row, 512);
  EXPECT_EQ(wide.rows_per_block, 1);
  EXPECT_TRUE(rms_norm_backward_launch(2048).accumulate_in_shared);
}

}  // namespace
}  // namespace keel::kernels::cuda
