// Why: every multi-rank job starts with detect_world(); a misread variable would make ranks wait for each other
// until parallel.timeout_s, far from the cause. These pin what it reads from torchrun/keel launch and Slurm, the
// Slurm defaults for the store address, and that bad values fail at once naming the variable.
#include <gtest/gtest.h>

#include <map>
#include <stdexcept>
#include <string>

#include "core/parallel/rendezvous.h"

namespace keel::parallel {
namespace {

// An environment made of exactly these variables.
EnvLookup environment(std::map<std::string, std::string> vars) {
  auto shared = std::make_shared<std::map<std::string, std::string>>(std::move(vars));
  return [shared](const char* name) -> const char* {
    const auto it = shared->find(name);
    return it == shared->end() ? nullptr : it->second.c_str();
  };
}

// The message of the std::invalid_argument detect_world throws ("" if it does not throw).
std::string rejection(std::map<std::string, std::string> vars) {
  try {
    detect_world(environment(std::move(vars)));
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "";
}

TEST(Rendezvous, NothingSetIsASingleProcess) {
  const WorldInfo w = detect_world(environment({}));
  EXPECT_EQ(w.source, "single");
  EXPECT_EQ(w.rank, 0);
  EXPECT_EQ(w.world_size, 1);
  EXPECT_FALSE(w.distributed());
  // Empty values count as unset (a script that exports RANK= for everyone).
  EXPECT_EQ(detect_world(environment({{"RANK", ""}, {"WORLD_SIZE", ""}})).source, "single");
}

TEST(Rendezvous, TorchrunVariables) {
  const WorldInfo w = detect_world(environment({{"RANK", "3"},
                                                {"WORLD_SIZE", "4"},
                                                {"LOCAL_RANK", "1"},
                                                {"MASTER_ADDR", "10.0.0.7"},
                                                {"MASTER_PORT", "29612"}}));
  EXPECT_EQ(w.source, "torchrun");
  EXPECT_EQ(w.rank, 3);
  EXPECT_EQ(w.world_size, 4);
  EXPECT_EQ(w.local_rank, 1);
  EXPECT_EQ(w.master_addr, "10.0.0.7");
  EXPECT_EQ(w.port, 29612);
  EXPECT_TRUE(w.distributed());
}

TEST(Rendezvous, TorchrunDefaultsAndPrecedenceOverSlurm) {
  // An `srun keel launch ...` or torchrun inside an allocation: the torchrun variables win.
  const WorldInfo w = detect_world(environment(
      {{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "8"}, {"SLURM_JOB_ID", "77"}}));
  EXPECT_EQ(w.source, "torchrun");
  EXPECT_EQ(w.rank, 1);
  EXPECT_EQ(w.world_size, 2);
  EXPECT_EQ(w.local_rank, 0);
  EXPECT_EQ(w.master_addr, "127.0.0.1");
  EXPECT_EQ(w.port, 29500);
}

TEST(Rendezvous, SlurmVariablesWithDefaultsFromTheJob) {
  const WorldInfo w = detect_world(environment({{"SLURM_PROCID", "5"},
                                                {"SLURM_NTASKS", "8"},
                                                {"SLURM_LOCALID", "1"},
                                                {"SLURM_JOB_NODELIST", "node[03-05,9],gpu1"},
                                                {"SLURM_JOB_ID", "123456"}}));
  EXPECT_EQ(w.source, "slurm");
  EXPECT_EQ(w.rank, 5);
  EXPECT_EQ(w.world_size, 8);
  EXPECT_EQ(w.local_rank, 1);
  EXPECT_EQ(w.master_addr, "node03");
  EXPECT_EQ(w.port, 29500 + 456);  // 29500 + SLURM_JOB_ID % 1000: the same on every node, different per job
}

TEST(Rendezvous, SlurmWithExportedMasterAddrAndPort) {
  const WorldInfo w = detect_world(environment({{"SLURM_PROCID", "0"},
                                                {"SLURM_NTASKS", "2"},
                                                {"SLURM_JOB_NODELIST", "gpu1,gpu2"},
                                                {"SLURM_JOB_ID", "99"},
                                                {"MASTER_ADDR", "head.cluster"},
                                                {"MASTER_PORT", "40000"}}));
  EXPECT_EQ(w.source, "slurm");
  EXPECT_EQ(w.master_addr, "head.cluster");
  EXPECT_EQ(w.port, 40000);
  // Older Slurm: SLURM_NODELIST only; no job id: the default port.
  const WorldInfo old =
      detect_world(environment({{"SLURM_PROCID", "1"}, {"SLURM_NTASKS", "2"}, {"SLURM_NODELIST", "gpu1,gpu2"}}));
  EXPECT_EQ(old.master_addr, "gpu1");
  EXPECT_EQ(old.port, 29500);
}

TEST(Rendezvous, FirstSlurmHostOfAHostlist) {
  EXPECT_EQ(first_slurm_host("node[03-05,9],gpu1"), "node03");
  EXPECT_EQ(first_slurm_host("gpu1,gpu2"), "gpu1");
  EXPECT_EQ(first_slurm_host("gpu7"), "gpu7");
  EXPECT_EQ(first_slurm_host("a[9,11-12]"), "a9");
  EXPECT_EQ(first_slurm_host("rack1-node[001-004]"), "rack1-node001");
  EXPECT_THROW(first_slurm_host("node[03"), std::invalid_argument);
}

TEST(Rendezvous, BadValuesNameTheVariable) {
  std::string what = rejection({{"RANK", "4"}, {"WORLD_SIZE", "4"}});
  EXPECT_NE(what.find("rank 4 is not below the world size 4"), std::string::npos) << what;
  what = rejection({{"RANK", "one"}, {"WORLD_SIZE", "4"}});
  EXPECT_NE(what.find("RANK='one'"), std::string::npos) << what;
  what = rejection({{"RANK", "1"}, {"WORLD_SIZE", "4x"}});
  EXPECT_NE(what.find("WORLD_SIZE='4x'"), std::string::npos) << what;
  what = rejection({{"RANK", "0"}, {"WORLD_SIZE", "0"}});
  EXPECT_NE(what.find("WORLD_SIZE='0' is not an integer >= 1"), std::string::npos) << what;
  what = rejection({{"RANK", "-1"}, {"WORLD_SIZE", "2"}});
  EXPECT_NE(what.find("RANK='-1'"), std::string::npos) << what;
  what = rejection({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "x"}});
  EXPECT_NE(what.find("LOCAL_RANK='x'"), std::string::npos) << what;
  what = rejection({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_PORT", "70000"}});
  EXPECT_NE(what.find("MASTER_PORT=70000"), std::string::npos) << what;
  what = rejection({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_PORT", "http"}});
  EXPECT_NE(what.find("MASTER_PORT='http'"), std::string::npos) << what;
  what = rejection({{"RANK", "0"}});
  EXPECT_NE(what.find("RANK and WORLD_SIZE must be set together"), std::string::npos) << what;
  what = rejection({{"WORLD_SIZE", "2"}});
  EXPECT_NE(what.find("RANK and WORLD_SIZE must be set together"), std::string::npos) << what;
  what = rejection({{"SLURM_PROCID", "2"}, {"SLURM_NTASKS", "2"}});
  EXPECT_NE(what.find("rank 2 is not below the world size 2 (slurm variables)"), std::string::npos) << what;
  what = rejection({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "2"}, {"SLURM_JOB_ID", "abc"}});
  EXPECT_NE(what.find("SLURM_JOB_ID='abc'"), std::string::npos) << what;
}

}  // namespace
}  // namespace keel::parallel
