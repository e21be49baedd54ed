// Why: streaming checkpoint I/O keeps a 65B-class resume, eval and export from holding the whole
// model and optimizer state in one process. What it must never do is change a bit: a part read from the rank
// files (HDF5 hyperslabs of the overlapping pieces) must equal the whole tensor reassembled and then cut, for
// every tensor and every TP rank, from a checkpoint saved at 1 rank and one saved at tp=2, pp=2; a resume across
// those layouts continues the same training; a sharded export (model-0000i-of-0000n.safetensors + index) holds
// every tensor and imports back bit for bit, and a missing or truncated shard is refused naming the file.
// Tiny shapes: two 2-step runs (one of them 4 ranks) shared by the whole file.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "core/checkpoint/checkpoint_error.h"
#include "core/checkpoint/checkpoint_store.h"
#include "core/checkpoint/manifest.h"
#include "core/checkpoint/resharding.h"
#include "core/config/config.h"
#include "core/config/memory_estimate.h"
#include "core/interop/hf_llama.h"
#include "core/interop/safetensors.h"
#include "core/metrics/metrics_reader.h"
#include "core/model/sharding.h"
#include "keel_process.h"

namespace keel::testing {
namespace {

namespace fs = std::filesystem;

const std::string kCommon =
    " --set train.precision=fp32 --set optim.decay_steps=4 --set metrics.per_tensor=false --set checkpoint.at_end=true";

std::string layout(int dp, int tp, int pp) {
  return " --set parallel.dp=" + std::to_string(dp) + " --set parallel.tp=" + std::to_string(tp) +
         " --set parallel.pp=" + std::to_string(pp);
}

// A tiny fp32 run of `steps` steps in layout dp x tp x pp, trained once per test binary; returns its run dir.
const std::string& run_once(int steps, int dp, int tp, int pp) {
  static std::map<std::string, std::string> runs;
  const std::string key = std::to_string(steps) + layout(dp, tp, pp);
  const auto it = runs.find(key);
  if (it != runs.end()) return it->second;
  const std::string dir = fresh_dir("stream-" + std::to_string(steps) + "-" + std::to_string(dp * 100 + tp * 10 + pp));
  const int nproc = dp * tp * pp;
  const std::string train = "train --config " + tiny_config() + " " + test_data_override() + " --run-dir " + dir +
                            " --set train.steps=" + std::to_string(steps) + kCommon + layout(dp, tp, pp);
  const ProcessResult r =
      nproc == 1 ? run_keel(train)
                 : run_keel("launch --nproc " + std::to_string(nproc) + " -- " + KEEL_BINARY + " " + train);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  return runs[key] = dir;
}

std::string newest_checkpoint(const std::string& run_dir) { return checkpoint::resolve_checkpoint(run_dir).dir; }

std::vector<double> losses(const std::string& run_dir) {
  return metrics::MetricsReader(run_dir + "/metrics.h5").read_double("/train/loss");
}

// The TP split of each model parameter of the tiny config, by name.
std::map<std::string, model::ShardSpec> tiny_specs() {
  std::map<std::string, model::ShardSpec> specs;
  for (const ParameterTensor& p : parameter_tensors(load_config(tiny_config()).model)) specs[p.name].dim = p.shard_dim;
  return specs;
}

// Every tensor of `lazy` (placeholders) read part by part equals the same part of `full`'s tensor, bit for bit:
// the whole tensor, each TP rank's shard for tp = 1 and 2, and a box that crosses the pieces' boundaries.
void expect_parts_equal(const checkpoint::NamedTensors& full, const checkpoint::NamedTensors& lazy,
                        const std::map<std::string, model::ShardSpec>& specs, const std::string& what) {
  ASSERT_EQ(full.size(), lazy.size()) << what;
  for (size_t i = 0; i < full.size(); ++i) {
    const auto& [name, whole] = full[i];
    const at::Tensor& placeholder = lazy[i].second;
    ASSERT_EQ(lazy[i].first, name) << what;
    ASSERT_TRUE(placeholder.is_meta()) << what << " " << name;
    ASSERT_EQ(placeholder.sizes(), whole.sizes()) << what << " " << name;
    ASSERT_EQ(placeholder.scalar_type(), whole.scalar_type()) << what << " " << name;
    EXPECT_TRUE(torch::equal(checkpoint::materialize(placeholder), whole)) << what << " " << name;
    const std::string param = specs.count(name) ? name : name.substr(0, name.rfind('/'));
    ASSERT_TRUE(specs.count(param)) << what << " " << name;
    for (int64_t tp : {1, 2}) {
      for (int64_t rank = 0; rank < tp; ++rank) {
        const at::Tensor got = checkpoint::materialize(model::shard_of(placeholder, specs.at(param), rank, tp));
        const at::Tensor want = model::shard_of(whole, specs.at(param), rank, tp);
        EXPECT_TRUE(got.is_contiguous() && torch::equal(got, want)) << what << " " << name << " tp rank " << rank;
        const at::Tensor into = torch::full_like(want, 7.0);  // read straight into a tensor the caller owns
        checkpoint::materialize_into(model::shard_of(placeholder, specs.at(param), rank, tp), into);
        EXPECT_TRUE(torch::equal(into, want)) << what << " " << name << " tp rank " << rank;
      }
    }
    if (whole.dim() == 2 && whole.size(0) > 4 && whole.size(1) > 6) {
      const int64_t rows = whole.size(0) - 3, cols = whole.size(1) - 5;
      EXPECT_TRUE(torch::equal(checkpoint::materialize(placeholder.narrow(0, 1, rows).narrow(1, 3, cols)),
                               whole.narrow(0, 1, rows).narrow(1, 3, cols)))
          << what << " " << name;
    }
  }
}

TEST(StreamingIo, SlicedReadsEqualTheWholeTensorsCutForEveryTpRank) {
  const auto specs = tiny_specs();
  for (const std::string& run : {run_once(2, 1, 1, 1), run_once(2, 1, 2, 2)}) {
    const checkpoint::ResolvedCheckpoint ckpt = checkpoint::resolve_checkpoint(run);
    const checkpoint::TrainingState full = checkpoint::read_full_state(ckpt.dir, ckpt.manifest, 0);
    const checkpoint::TrainingState lazy = checkpoint::read_lazy_state(ckpt.dir, ckpt.manifest, 0);
    expect_parts_equal(full.model, lazy.model, specs, ckpt.dir + " model");
    expect_parts_equal(full.optimizer, lazy.optimizer, specs, ckpt.dir + " optimizer");
    EXPECT_EQ(lazy.step, full.step);
    EXPECT_EQ(lazy.data_ledger, full.data_ledger);
    EXPECT_EQ(lazy.optimizer_json, full.optimizer_json);
    ASSERT_TRUE(lazy.cpu_rng.defined());
    EXPECT_TRUE(torch::equal(lazy.cpu_rng, full.cpu_rng));
  }
}

TEST(StreamingIo, ResumeAcrossLayoutsContinuesTheSameTraining) {
  const std::string straight = run_once(4, 1, 1, 1);
  const std::vector<double> want = losses(straight);
  ASSERT_EQ(want.size(), 4u);
  struct Case {
    std::string from, to_layout;
    int nproc;
  };
  for (const Case& c :
       {Case{run_once(2, 1, 1, 1), layout(1, 2, 2), 4}, Case{run_once(2, 1, 2, 2), layout(1, 1, 1), 1}}) {
    const std::string second = fresh_dir("stream-resume-" + std::to_string(c.nproc));
    const std::string resume =
        "resume --from " + c.from + " --run-dir " + second + " --set train.steps=4" + c.to_layout;
    const ProcessResult r =
        c.nproc == 1 ? run_keel(resume)
                     : run_keel("launch --nproc " + std::to_string(c.nproc) + " -- " + KEEL_BINARY + " " + resume);
    ASSERT_EQ(r.exit_code, 0) << r.output;
    EXPECT_NE(r.output.find("resharding"), std::string::npos) << r.output;
    const std::vector<double> got = losses(second);
    ASSERT_EQ(got.size(), 2u);
    for (size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i + 2], 1e-5 * want[i + 2]) << c.to_layout;
  }
}

TEST(StreamingIo, MaterializeRefusesWhatItCannotRead) {
  const checkpoint::ResolvedCheckpoint ckpt = checkpoint::resolve_checkpoint(run_once(2, 1, 1, 1));
  const checkpoint::TrainingState lazy = checkpoint::read_lazy_state(ckpt.dir, ckpt.manifest, -1);
  at::Tensor embed;  // [vocab, d_model], a placeholder
  for (const auto& [name, t] : lazy.model) {
    if (name == "embed.weight") embed = t;
  }
  ASSERT_TRUE(embed.defined() && embed.is_meta());
  const at::Tensor plain = torch::ones({2, 3});
  EXPECT_TRUE(checkpoint::materialize(plain).is_same(plain));
  auto message = [](const std::function<void()>& f) {
    try {
      f();
    } catch (const checkpoint::CheckpointError& e) {
      return std::string(e.what());
    }
    return std::string("(no error)");
  };
  EXPECT_NE(message([&] {
              checkpoint::materialize(torch::empty({2, 3}, torch::kMeta));
            }).find("is not a checkpoint placeholder"),
            std::string::npos);
  EXPECT_NE(message([&] { checkpoint::materialize(embed.t()); }).find("strided or permuted"), std::string::npos);
  EXPECT_NE(message([&] { checkpoint::materialize(embed.select(0, 1)); }).find("only views that narrow"),
            std::string::npos);
  EXPECT_NE(message([&] { checkpoint::materialize(embed.slice(0, 0, 10, 2)); }).find("strided or permuted"),
            std::string::npos);
}

// The tiny model exported with a 600 KB limit: embed (512 KiB), the blocks and the final norm, head (512 KiB).
const std::string kShardLimit = "600KB";

TEST(StreamingIo, ShardedExportListsEveryTensorAndImportsBackBitForBit) {
  const std::string ckpt = newest_checkpoint(run_once(2, 1, 2, 2));  // read from four rank files' pieces
  const std::string hf = fresh_dir("stream-hf-sharded");
  ProcessResult r = run_keel("export-hf " + ckpt + " " + hf + " --max-shard-size " + kShardLimit);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("3 files of at most 600000 bytes + model.safetensors.index.json"), std::string::npos)
      << r.output;
  EXPECT_FALSE(fs::exists(hf + "/model.safetensors"));
  const nlohmann::json index =
      nlohmann::json::parse(std::ifstream(hf + "/model.safetensors.index.json"), nullptr, /*allow_exceptions=*/false);
  ASSERT_TRUE(index.is_object() && index.contains("weight_map")) << index.dump();
  const checkpoint::TrainingState full = checkpoint::read_full_state(ckpt, checkpoint::verify_checkpoint_dir(ckpt), -1);
  std::map<std::string, std::string> names;  // HF name -> Keel name
  for (const auto& [name, t] : full.model) names[interop::hf_name_of(name)] = name;
  EXPECT_EQ(index["weight_map"].size(), names.size());
  uint64_t total = 0;
  for (const auto& [hf_name, keel_name] : names) {
    ASSERT_TRUE(index["weight_map"].contains(hf_name)) << hf_name;
    const std::string file = index["weight_map"][hf_name].get<std::string>();
    const interop::SafetensorsHeader header = interop::read_safetensors_header(hf + "/" + file);
    const interop::SafetensorsEntry* entry = header.find(hf_name);
    ASSERT_NE(entry, nullptr) << file << " " << hf_name;
    total += entry->bytes();
  }
  EXPECT_EQ(index["metadata"]["total_size"].get<uint64_t>(), total);
  for (int i = 1; i <= 3; ++i) {
    const std::string file = hf + "/model-0000" + std::to_string(i) + "-of-00003.safetensors";
    ASSERT_TRUE(fs::exists(file)) << file;
    const interop::SafetensorsHeader header = interop::read_safetensors_header(file);
    uint64_t bytes = 0;
    for (const auto& e : header.entries) bytes += e.bytes();
    EXPECT_TRUE(bytes <= 600000 || header.entries.size() == 1) << file << ": " << bytes << " bytes";
  }

  const std::string run = fresh_dir("stream-imported");
  r = run_keel("import-hf " + hf + " --run-dir " + run + " --config " + tiny_config() + " " + test_data_override());
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::string imported = newest_checkpoint(run);
  const checkpoint::TrainingState back =
      checkpoint::read_full_state(imported, checkpoint::verify_checkpoint_dir(imported), -1);
  ASSERT_EQ(back.model.size(), full.model.size());
  std::map<std::string, at::Tensor> by_name(back.model.begin(), back.model.end());
  for (const auto& [name, t] : full.model) EXPECT_TRUE(torch::equal(by_name.at(name), t)) << name;

  // Without the limit: one model.safetensors and no index, as before.
  const std::string single = fresh_dir("stream-hf-single");
  r = run_keel("export-hf " + ckpt + " " + single + " --no-tokenizer");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(fs::exists(single + "/model.safetensors"));
  EXPECT_FALSE(fs::exists(single + "/model.safetensors.index.json"));
}

TEST(StreamingIo, AMissingOrTruncatedShardIsRefusedNamingIt) {
  const std::string ckpt = newest_checkpoint(run_once(2, 1, 1, 1));
  const std::string hf = fresh_dir("stream-hf-damaged");
  ProcessResult r = run_keel("export-hf " + ckpt + " " + hf + " --max-shard-size " + kShardLimit);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::string import = " --config " + tiny_config() + " " + test_data_override();

  const std::string missing = fresh_dir("stream-hf-missing");
  fs::copy(hf, missing, fs::copy_options::recursive);
  fs::remove(missing + "/model-00002-of-00003.safetensors");
  const std::string run1 = fresh_dir("stream-import-missing");
  r = run_keel("import-hf " + missing + " --run-dir " + run1 + import);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find(missing + "/model-00002-of-00003.safetensors: missing"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(run1));

  const std::string truncated = fresh_dir("stream-hf-truncated");
  fs::copy(hf, truncated, fs::copy_options::recursive);
  const std::string shard = truncated + "/model-00003-of-00003.safetensors";
  fs::resize_file(shard, fs::file_size(shard) - 100);
  const std::string run2 = fresh_dir("stream-import-truncated");
  r = run_keel("import-hf " + truncated + " --run-dir " + run2 + import);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find(shard + ": tensor 'lm_head.weight': data_offsets"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(run2));

  const std::string out = fresh_dir("stream-hf-bad-size");
  r = run_keel("export-hf " + ckpt + " " + out + " --max-shard-size 5XB");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("--max-shard-size is '5XB'"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(out));
}

TEST(StreamingIo, ShardSizesParseAsTransformersReadsThem) {
  EXPECT_EQ(interop::parse_shard_size("5GB", "s"), 5000000000);
  EXPECT_EQ(interop::parse_shard_size("5gb", "s"), 5000000000);
  EXPECT_EQ(interop::parse_shard_size("600KB", "s"), 600000);
  EXPECT_EQ(interop::parse_shard_size("2GiB", "s"), int64_t{2} << 30);
  EXPECT_EQ(interop::parse_shard_size("64KiB", "s"), 65536);
  EXPECT_EQ(interop::parse_shard_size("100MB", "s"), 100000000);
  EXPECT_EQ(interop::parse_shard_size("1000", "s"), 1000);
  for (const char* bad : {"0", "-1", "5TB", "GB", "", "1.5GB", "99999999999999999999"}) {
    try {
      interop::parse_shard_size(bad, "--max-shard-size");
      ADD_FAILURE() << bad << " was accepted";
    } catch (const std::runtime_error& e) {
      EXPECT_NE(std::string(e.what()).find("--max-shard-size is '" + std::string(bad) + "'"), std::string::npos)
          << e.what();
    }
  }
}

TEST(StreamingIo, StreamedSafetensorsAreTheSameBytesAsTheWholeFileWriter) {
  interop::SafetensorsFile file;
  file.metadata = {{"format", "pt"}};
  file.tensors.push_back({"b", interop::SafetensorsDtype::kF32, {2, 3}, std::string(24, '\x01')});
  file.tensors.push_back({"a", interop::SafetensorsDtype::kBF16, {5}, std::string(10, '\x02')});
  file.tensors.push_back({"s", interop::SafetensorsDtype::kF16, {}, std::string(2, '\x03')});
  const std::string dir = fresh_dir("stream-st");
  fs::create_directories(dir);
  std::vector<interop::SafetensorsEntry> entries;
  for (const auto& t : file.tensors) entries.push_back({t.name, t.dtype, t.shape});
  interop::write_safetensors_streaming(dir + "/x.safetensors", file.metadata, entries,
                                       [&](size_t i, const std::function<void(const char*, size_t)>& write) {
                                         const std::string& bytes = file.tensors[i].bytes;
                                         const size_t half = bytes.size() / 2;  // in two pieces
                                         write(bytes.data(), half);
                                         write(bytes.data() + half, bytes.size() - half);
                                       });
  std::ifstream in(dir + "/x.safetensors", std::ios::binary);
  const std::string written((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(written, interop::serialize_safetensors(file));
  const interop::SafetensorsHeader header = interop::read_safetensors_header(dir + "/x.safetensors");
  ASSERT_NE(header.find("a"), nullptr);
  EXPECT_EQ(interop::read_safetensors_bytes(header, *header.find("a")), file.tensors[1].bytes);

  // A tensor given the wrong number of bytes: refused naming it, and no file is left behind.
  try {
    interop::write_safetensors_streaming(
        dir + "/y.safetensors", {}, entries,
        [&](size_t, const std::function<void(const char*, size_t)>& write) { write("xx", 2); });
    ADD_FAILURE() << "a short tensor was written";
  } catch (const interop::SafetensorsError& e) {
    EXPECT_NE(std::string(e.what()).find("y.safetensors: tensor 'b': got 2 bytes"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(dir + "/y.safetensors"));
}

}  // namespace
}  // namespace keel::testing
