// Why: NCCL takes only CUDA tensors, yet the trainer sends CPU flags, lengths and names through the world group;
// and PyTorch 2.x's NCCL wait with a timeout spins the host. Both decisions are pure functions of the backend
// (wire_plan, wait_with_timeout), tested here on the CPU; the real NCCL path runs only in bench/gpu's device check.
// The Gloo half is also run over real groups (ranks as threads): bf16 and strings come back in the caller's dtype.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <thread>

#include "core/parallel/communicator.h"
#include "kernels/dispatch.h"
#include "tests/unit/parallel_ranks.h"
#include "tests/unit/test_support.h"

namespace keel::parallel {
namespace {

using keel::testing::error_of;

const at::Device kGpu1(at::kCUDA, 1);

TEST(CommunicatorWire, BackendNamesParseAndUnknownOnesAreRefused) {
  EXPECT_EQ(wire_kind_of("gloo"), WireKind::kGloo);
  EXPECT_EQ(wire_kind_of("nccl"), WireKind::kNccl);
  EXPECT_NE(error_of([] { wire_kind_of("mpi"); }).find("parallel.backend must be gloo or nccl, got 'mpi'"),
            std::string::npos);
}

TEST(CommunicatorWire, NcclStagesCpuTensorsThroughTheGroupsDeviceInTheirOwnDtype) {
  for (const auto dtype : {at::kLong, at::kByte, at::kFloat, at::kBFloat16}) {
    const WirePlan plan = wire_plan(at::zeros({3}, dtype), WireKind::kNccl, kGpu1);
    EXPECT_EQ(plan.device, kGpu1) << dtype;
    EXPECT_EQ(plan.dtype, dtype) << dtype;  // NCCL reduces bf16 itself: no fp32 copy
  }
}

TEST(CommunicatorWire, NcclWithoutACudaStagingDeviceRefusesCpuTensors) {
  const std::string message =
      error_of([] { wire_plan(at::zeros({1}, at::kLong), WireKind::kNccl, at::Device(at::kCPU)); });
  EXPECT_NE(message.find("needs a CUDA staging device"), std::string::npos) << message;
}

TEST(CommunicatorWire, GlooGetsCpuTensorsWithBf16AsFp32) {
  EXPECT_EQ(wire_plan(at::zeros({2}, at::kBFloat16), WireKind::kGloo, kGpu1).dtype, at::kFloat);
  EXPECT_EQ(wire_plan(at::zeros({2}, at::kBFloat16), WireKind::kGloo, kGpu1).device, at::Device(at::kCPU));
  EXPECT_EQ(wire_plan(at::zeros({2}, at::kLong), WireKind::kGloo, kGpu1).dtype, at::kLong);
  EXPECT_EQ(wire_plan(at::zeros({2}, at::kFloat), WireKind::kGloo, kGpu1).device, at::Device(at::kCPU));
}

TEST(CommunicatorWire, OnlyGlooWaitsWithTheTimeoutNcclKeepsTheHostFree) {
  EXPECT_TRUE(wait_with_timeout(WireKind::kGloo));
  EXPECT_FALSE(wait_with_timeout(WireKind::kNccl));
}

TEST(CommunicatorWire, GatheredTensorsComeBackInTheCallersDtypeOverGloo) {
  testing::run_ranks(2, 1, 1, [](ProcessGroups& g) {
    const at::Tensor mine = at::full({2}, static_cast<double>(g.rank) + 0.5, at::kBFloat16);
    const std::vector<at::Tensor> all = g.world->all_gather(mine);
    ASSERT_EQ(all.size(), 2u);
    for (int64_t r = 0; r < 2; ++r) {
      EXPECT_EQ(all[r].scalar_type(), at::kBFloat16);
      EXPECT_TRUE(all[r].device().is_cpu());
      EXPECT_EQ(all[r][1].item<float>(), static_cast<float>(r) + 0.5f);
    }
    const std::vector<std::string> names = g.world->all_gather_strings(std::string(g.rank == 0 ? "a" : "bcd"));
    EXPECT_EQ(names, (std::vector<std::string>{"a", "bcd"}));
    EXPECT_EQ(g.world->broadcast_string(g.rank == 1 ? "from one" : "", 1), "from one");
  });
}

// Two ranks (threads) join with `backend`; returns each rank's error message ("" when it joined).
std::vector<std::string> join_errors(const std::string& backend) {
  ParallelConfig config;
  config.dp = 2;
  config.timeout_s = 30.0;
  const int port = testing::free_tcp_port();
  std::vector<std::string> errors(2);
  std::vector<std::thread> ranks;
  for (int64_t rank = 0; rank < 2; ++rank) {
    ranks.emplace_back([&, rank] {
      WorldInfo info;
      info.rank = rank;
      info.world_size = 2;
      info.port = port;
      info.source = "test";
      errors[rank] = error_of([&] { join_process_groups(info, config, backend); });
      if (errors[rank] == "(no exception)") errors[rank] = "";
    });
  }
  for (auto& t : ranks) t.join();
  return errors;
}

TEST(CommunicatorWire, NcclInABuildWithoutItIsRefusedOnEveryRankBeforeAnyGroupExists) {
  if (keel::kernels::cuda_kernels_built()) GTEST_SKIP() << "a CUDA build may have NCCL";
  for (const std::string& error : join_errors("nccl")) {
    EXPECT_NE(error.find("parallel.backend = nccl, but this build of Keel has no NCCL"), std::string::npos) << error;
  }
}

TEST(CommunicatorWire, SettingTheCurrentCudaDeviceIsRefusedWithoutCuda) {
  if (keel::kernels::cuda_kernels_built()) GTEST_SKIP() << "a CUDA build: the device check covers it";
  const std::string message = error_of([] { keel::kernels::set_current_cuda_device(0); });
  EXPECT_NE(message.find("this build of Keel has no CUDA"), std::string::npos) << message;
}

}  // namespace
}  // namespace keel::parallel
