// Why: a checkpoint written in the background (checkpoint.async = true) fails where no rank can see it at once: on
// one rank of a job, or when the disk fills up while training goes on. Either way the job must stop at a step
// boundary, with a non-zero exit and a message naming the checkpoint and the rank, and leave the previous
// checkpoint as the newest valid one (docs/checkpoints.md, "Asynchronous saves"). Driven through the binary.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <string>
#include <thread>

#include "core/checkpoint/checkpoint_store.h"
#include "faults/fault_support.h"

namespace fs = std::filesystem;
using keel::checkpoint::CheckpointStore;
using keel::checkpoint::resolve_checkpoint;
using keel::testing::expect_only_checkpoint;
using keel::testing::fresh_dir;
using keel::testing::read_text_file;
using keel::testing::run_keel_with_env;
using keel::testing::SmallDisk;
using keel::testing::test_data_override;
using keel::testing::tiny_config;

TEST(AsyncSaveFaults, WriteFailingOnOneRankIsCommittedByNoneAndStopsEveryRank) {
  const std::string run = fresh_dir("async-savefail-2");
  const auto r = run_keel_with_env("KEEL_TEST_FAULT=save_fail:1:4",
                                   "launch --nproc 2 -- " + std::string(KEEL_BINARY) + " train --config " +
                                       tiny_config() + " " + test_data_override() + " --run-dir " + run +
                                       " --set train.steps=8 --set checkpoint.every=2 --set parallel.dp=2"
                                       " --set checkpoint.async=true");
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("checkpoint step 4 was not committed by any rank: rank 1 (dp 1, tp 0, pp 0) could not "
                          "write its file: " +
                          run + "/checkpoints/step-00000004.tmp/rank-00001.h5: injected failure (KEEL_TEST_FAULT)"),
            std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("the latest checkpoint is still " + run + "/checkpoints/step-00000002"), std::string::npos)
      << r.output;
  expect_only_checkpoint(run, /*kept_step=*/2, /*failed_step=*/4);
  fs::remove_all(run);
}

TEST(AsyncSaveFaults, DiskFullDuringABackgroundWriteStopsTheRunAndKeepsTheLastCheckpoint) {
  SmallDisk disk("async-disk-full", 64 << 20);
  if (!disk.mounted()) GTEST_SKIP() << disk.why_not();
  const std::string run = disk.dir() + "/run", log = fresh_dir("async-disk-full-log") + ".log";
  const std::string command = "exec " + std::string(KEEL_BINARY) + " train --config " + tiny_config() + " " +
                              test_data_override() + " --run-dir " + run +
                              " --set train.steps=100000 --set checkpoint.every=1 --set checkpoint.async=true"
                              " --set checkpoint.keep_last=2 --set train.log_every=100000"
                              " --set metrics.flush_every=100000 > " +
                              log + " 2>&1";
  const pid_t pid = fork();
  if (pid == 0) {
    execl("/bin/sh", "sh", "-c", command.c_str(), nullptr);
    _exit(127);
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (!fs::exists(run + "/checkpoints/latest") && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  ASSERT_TRUE(fs::exists(run + "/checkpoints/latest")) << read_text_file(log);
  {  // Fill the rest of the disk: the next background write runs out of space.
    std::FILE* f = std::fopen((disk.dir() + "/filler").c_str(), "wb");
    ASSERT_NE(f, nullptr);
    const std::string block(4096, 'x');
    while (std::fwrite(block.data(), 1, block.size(), f) == block.size() && std::fflush(f) == 0) {
    }
    std::fclose(f);
  }
  int status = 0;
  while (waitpid(pid, &status, WNOHANG) == 0 && std::chrono::steady_clock::now() < deadline + std::chrono::seconds(60))
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  if (!WIFEXITED(status) && !WIFSIGNALED(status)) {
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    FAIL() << "the run did not stop on a full disk: " << read_text_file(log);
  }
  const std::string output = read_text_file(log);
  ASSERT_TRUE(WIFEXITED(status)) << output;
  EXPECT_NE(WEXITSTATUS(status), 0) << output;
  EXPECT_NE(output.find("checkpoint step "), std::string::npos) << output;
  EXPECT_NE(output.find("No space left on device"), std::string::npos) << output;
  // The newest committed checkpoint is intact; the one being written never became valid.
  const auto ckpt = resolve_checkpoint(run);
  EXPECT_EQ(ckpt.dir.find(".tmp"), std::string::npos);
  EXPECT_GE(ckpt.manifest.step, 1);
  fs::remove(log);
}
