// Why: the checkpoint file formats, piece by piece: SHA-256 against FIPS test vectors, the manifest parser
// (round trip, and a named refusal for each kind of bad field), the HDF5 tensor layer (every dtype, scalars,
// sharding attributes, refusals), the full rank file (every section round-trips, RNG restores exactly, a
// NaN/Inf tensor or a null in its JSON is never written, a JSON type error on reading names file and field)
// and the typed JSON helpers every checkpoint JSON read goes through.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>

#include "core/checkpoint/checkpoint_error.h"
#include "core/checkpoint/h5_file.h"
#include "core/checkpoint/json_fields.h"
#include "core/checkpoint/manifest.h"
#include "core/checkpoint/sha256.h"
#include "core/checkpoint/training_state.h"
#include "test_support.h"

using namespace keel::checkpoint;

namespace {

Manifest sample_manifest() {
  Manifest m;
  m.keel_version = "0.1.0";
  m.step = 100;
  m.created = "2026-11-22T00:00:00Z";
  m.run_id = "run-x";
  m.config_hash = sha256_hex("config");
  m.model = {{"model.layers", "2"}, {"model.vocab", "2048"}};
  m.data_fingerprint = R"({"vocab":2048})";
  m.lineage = R"({"run_id":"run-x"})";
  m.files = {{rank_file_name(0), 0, 123, sha256_hex("a")}, {"config.ini", -1, 6, sha256_hex("config")}};
  return m;
}

// A small rank-file state that write_rank_file accepts.
TrainingState small_state() {
  TrainingState s;
  s.step = 40;
  s.model = {{"embed.weight", torch::randn({5, 4})}, {"blocks.0.attn.wq.weight", torch::randn({4, 4})}};
  s.optimizer_name = "adamw";
  s.optimizer_json = R"({"step": 40})";
  s.optimizer = {{"embed.weight/exp_avg", torch::randn({5, 4})}, {"embed.weight/exp_avg_sq", torch::rand({5, 4})}};
  s.lr_schedule = R"({"kind": "warmup_cosine", "lr": 0.003, "lr_factor": 1.0, "lr_factor_until": -1})";
  s.data_ledger = R"({"step": 40, "sources": [{"name": "prose", "epoch": 0}]})";
  s.config_ini = "[model]\nlayers = 2\n";
  s.lineage = R"({"run_id": "r"})";
  return s;
}

}  // namespace

TEST(Sha256, MatchesFipsVectors) {
  EXPECT_EQ(sha256_hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  Sha256 streamed;  // one million 'a', fed in odd-sized pieces
  const std::string piece(997, 'a');
  size_t left = 1000000;
  while (left > 0) {
    const size_t n = std::min(left, piece.size());
    streamed.update(piece.data(), n);
    left -= n;
  }
  EXPECT_EQ(streamed.hex_digest(), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST(Sha256, FileDigestEqualsMemoryDigestAndMissingFileIsNamed) {
  const std::string path = keel::testing::test_dir() + "/bytes.bin";
  std::ofstream(path, std::ios::binary) << std::string(70000, 'x');
  EXPECT_EQ(sha256_file(path), sha256_hex(std::string(70000, 'x')));
  EXPECT_NE(keel::testing::checkpoint_error_of([&] { sha256_file(path + ".missing"); }).find("bytes.bin.missing"),
            std::string::npos);
}

TEST(Manifest, RoundTrips) {
  const Manifest m = sample_manifest();
  const Manifest back = parse_manifest(manifest_to_json(m), "manifest.json");
  EXPECT_EQ(back.step, 100);
  EXPECT_EQ(back.run_id, "run-x");
  EXPECT_EQ(back.model, m.model);
  ASSERT_EQ(back.files.size(), 2u);
  EXPECT_EQ(back.files[0].name, "rank-00000.h5");
  EXPECT_EQ(back.files[1].rank, -1);
  EXPECT_EQ(back.rank_file(0)->sha256, sha256_hex("a"));
  EXPECT_EQ(nlohmann::json::parse(back.data_fingerprint)["vocab"], 2048);
}

TEST(Manifest, EveryBadFieldIsRefusedByName) {
  auto with = [](const std::function<void(nlohmann::json&)>& edit) {
    nlohmann::json j = nlohmann::json::parse(manifest_to_json(sample_manifest()));
    edit(j);
    return keel::testing::checkpoint_error_of([&] { parse_manifest(j.dump(), "ckpt/manifest.json"); });
  };
  EXPECT_NE(keel::testing::checkpoint_error_of([] { parse_manifest("{not json", "m.json"); }).find("not valid JSON"),
            std::string::npos);
  EXPECT_NE(with([](auto& j) { j.erase("step"); }).find("'step' is missing"), std::string::npos);
  EXPECT_NE(with([](auto& j) { j["step"] = -1; }).find("'step'"), std::string::npos);
  EXPECT_NE(with([](auto& j) { j["step"] = "ten"; }).find("'step' must be an integer"), std::string::npos);
  EXPECT_NE(with([](auto& j) { j["format_version"] = 99; }).find("format_version"), std::string::npos);
  EXPECT_NE(with([](auto& j) { j["format"] = "other"; }).find("'format'"), std::string::npos);
  EXPECT_NE(with([](auto& j) { j["files"][1]["name"] = "../../etc/passwd"; }).find("files[1].name"), std::string::npos);
  EXPECT_NE(with([](auto& j) { j["files"][1]["name"] = "manifest.json"; }).find("files[1].name"), std::string::npos);
  EXPECT_NE(with([](auto& j) { j["files"][0]["sha256"] = "XYZ"; }).find("files[0].sha256"), std::string::npos);
  EXPECT_NE(with([](auto& j) { j["files"][0]["rank"] = 3; }).find("files[0].rank"), std::string::npos);
  EXPECT_NE(with([](auto& j) { j["files"][0]["rank"] = -1; }).find("'files' lists 0 rank files"), std::string::npos);
  EXPECT_NE(with([](auto& j) { j["files"][0]["bytes"] = -5; }).find("files[0].bytes"), std::string::npos);
  EXPECT_NE(with([](auto& j) { j["layout"]["world_size"] = 4; }).find("layout.world_size"), std::string::npos);
  EXPECT_NE(with([](auto& j) { j["model"]["model.layers"] = 2; }).find("model.model.layers"), std::string::npos);
  EXPECT_NE(with([](auto& j) { j["files"] = nlohmann::json::array(); }).find("'files'"), std::string::npos);
  EXPECT_NE(with([](auto& j) { j["files"].push_back(j["files"][1]); }).find("listed twice"), std::string::npos);
  EXPECT_NE(with([](auto& j) { j["step"] = nullptr; }).find("'step' must be an integer, got null"), std::string::npos);
  EXPECT_NE(with([](auto& j) { j["tensors_finite"] = 1; }).find("'tensors_finite' must be true or false"),
            std::string::npos);
}

TEST(Manifest, TensorsFiniteIsOptionalAndRoundTrips) {
  Manifest m = sample_manifest();
  EXPECT_FALSE(parse_manifest(manifest_to_json(m), "m.json").tensors_finite.has_value()) << "older manifests: unknown";
  m.tensors_finite = true;
  EXPECT_EQ(parse_manifest(manifest_to_json(m), "m.json").tensors_finite, true);
}

TEST(H5File, EveryDtypeRoundTripsWithShapeAndShardAttributes) {
  const std::string path = keel::testing::test_dir() + "/t.h5";
  const std::vector<DType> dtypes = {DType::kFloat32, DType::kFloat64, DType::kBFloat16, DType::kFloat16,
                                     DType::kInt64,   DType::kInt32,   DType::kUInt8};
  {
    H5Writer out(path);
    for (size_t i = 0; i < dtypes.size(); ++i) {
      RawTensor t;
      t.dtype = dtypes[i];
      t.shape = {2, 3};
      t.global_shape = {4, 3};
      t.offset = {2, 0};
      t.bytes.resize(6 * dtype_size(dtypes[i]));
      for (size_t b = 0; b < t.bytes.size(); ++b) t.bytes[b] = static_cast<uint8_t>(b * 7 + i);
      out.write_tensor("group/sub/" + dtype_name(dtypes[i]), t);
    }
    RawTensor scalar;
    scalar.dtype = DType::kInt64;
    scalar.bytes.resize(8, 1);
    out.write_tensor("scalar", scalar);
    out.write_text("text", "hello\nworld");
    out.write_text("empty", "");
    out.set_attribute("/", "name", "keel");
    out.set_attribute("/", "count", int64_t{42});
    out.close();
  }
  H5Reader in(path);
  EXPECT_EQ(in.datasets_under("/group").size(), dtypes.size());
  for (size_t i = 0; i < dtypes.size(); ++i) {
    const RawTensor t = in.read_tensor("group/sub/" + dtype_name(dtypes[i]));
    EXPECT_EQ(t.dtype, dtypes[i]);
    EXPECT_EQ(t.shape, (std::vector<int64_t>{2, 3}));
    EXPECT_EQ(t.global_shape, (std::vector<int64_t>{4, 3}));
    EXPECT_EQ(t.offset, (std::vector<int64_t>{2, 0}));
    for (size_t b = 0; b < t.bytes.size(); ++b) ASSERT_EQ(t.bytes[b], static_cast<uint8_t>(b * 7 + i));
  }
  const RawTensor scalar = in.read_tensor("scalar");
  EXPECT_TRUE(scalar.shape.empty());
  EXPECT_EQ(scalar.bytes.size(), 8u);
  EXPECT_EQ(in.read_text("text"), "hello\nworld");
  EXPECT_EQ(in.read_text("empty"), "");
  EXPECT_EQ(in.string_attribute("/", "name"), "keel");
  EXPECT_EQ(in.int_attribute("/", "count"), 42);
  EXPECT_EQ(in.groups_under("/group"), std::vector<std::string>{"sub"});
}

TEST(H5File, MissingObjectsWrongKindsAndNonHdf5FilesAreNamed) {
  const std::string dir = keel::testing::test_dir();
  {
    H5Writer out(dir + "/t.h5");
    out.write_text("text", "abc");
    out.close();
  }
  EXPECT_NE(keel::testing::checkpoint_error_of([&] { H5Writer again(dir + "/t.h5"); }).find("t.h5"), std::string::npos)
      << "refuses to overwrite";
  H5Reader in(dir + "/t.h5");
  EXPECT_NE(keel::testing::checkpoint_error_of([&] { in.read_tensor("model/w"); }).find("'model/w'"),
            std::string::npos);
  EXPECT_NE(keel::testing::checkpoint_error_of([&] { in.read_tensor("text"); }).find("'text'"), std::string::npos);
  EXPECT_NE(keel::testing::checkpoint_error_of([&] { in.read_text("text/inner"); }).find("text/inner"),
            std::string::npos);
  EXPECT_NE(keel::testing::checkpoint_error_of([&] { in.int_attribute("/", "nope"); }).find("'nope'"),
            std::string::npos);
  std::ofstream(dir + "/junk.h5") << "this is not HDF5";
  EXPECT_NE(keel::testing::checkpoint_error_of([&] { H5Reader junk(dir + "/junk.h5"); }).find("junk.h5"),
            std::string::npos);
}

TEST(TrainingStateFile, EverySectionRoundTripsAndRngRestoresExactly) {
  const std::string path = keel::testing::test_dir() + "/rank-00000.h5";
  TrainingState s;
  s.step = 7;
  s.tokens_seen = 7168;
  s.model = {{"embed.weight", torch::randn({5, 4})}, {"blocks.0.attn.wq.weight", torch::randn({4, 4})}};
  s.optimizer_name = "adamw";
  s.optimizer_step = 7;
  s.optimizer = {{"embed.weight/exp_avg", torch::randn({5, 4})}, {"embed.weight/exp_avg_sq", torch::rand({5, 4})}};
  s.lr_schedule = R"({"kind":"warmup_cosine"})";
  s.data_ledger = R"({"step":7})";
  s.config_ini = "[model]\nlayers = 2\n";
  s.lineage = R"({"run_id":"r"})";
  s.plugins.push_back({"spike_handler", "zscore_skip", "1.0", R"({"window":[1,2]})", {{"history", torch::arange(3)}}});
  torch::manual_seed(5);
  capture_rng(s);
  const at::Tensor expected_draw = torch::rand({3});  // what the generator gives right after the capture
  write_rank_file(path, s, {0, 1});

  const TrainingState back = read_rank_file(path);
  EXPECT_EQ(back.step, 7);
  EXPECT_EQ(back.tokens_seen, 7168);
  ASSERT_EQ(back.model.size(), 2u);
  for (const auto& [name, tensor] : s.model) {
    bool found = false;
    for (const auto& [n, t] : back.model) {
      if (n == name) {
        found = true;
        EXPECT_TRUE(torch::equal(t, tensor)) << name;
      }
    }
    EXPECT_TRUE(found) << name;
  }
  EXPECT_EQ(back.optimizer_name, "adamw");
  EXPECT_EQ(back.optimizer_step, 7);
  EXPECT_EQ(back.optimizer.size(), 2u);
  EXPECT_EQ(back.lr_schedule, s.lr_schedule);
  EXPECT_EQ(back.data_ledger, s.data_ledger);
  EXPECT_EQ(back.config_ini, s.config_ini);
  EXPECT_EQ(back.lineage, s.lineage);
  ASSERT_EQ(back.plugins.size(), 1u);
  EXPECT_EQ(back.plugins[0].name, "zscore_skip");
  EXPECT_EQ(back.plugins[0].json, s.plugins[0].json);
  EXPECT_TRUE(torch::equal(back.plugins[0].tensors.at(0).second, torch::arange(3)));

  torch::manual_seed(99);
  restore_rng(back);
  EXPECT_TRUE(torch::equal(torch::rand({3}), expected_draw));
}

TEST(TrainingStateFile, ForeignHdf5FileIsRefusedByName) {
  const std::string path = keel::testing::test_dir() + "/other.h5";
  {
    H5Writer out(path);
    out.set_attribute("/", "format", "something-else");
    out.close();
  }
  EXPECT_NE(keel::testing::checkpoint_error_of([&] { read_rank_file(path); }).find("other.h5: not a Keel checkpoint"),
            std::string::npos);
}

TEST(TrainingStateFile, NonFiniteTensorsAndNullJsonAreNeverWritten) {
  const std::string dir = keel::testing::test_dir();
  const std::string path = dir + "/rank-00000.h5";
  TrainingState poisoned = small_state();
  poisoned.model[1].second[2][3] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_EQ(keel::testing::checkpoint_error_of([&] {
              write_rank_file(path, poisoned, {0, 1});
            }),
            "cannot save checkpoint step 40: model tensor blocks.0.attn.wq.weight holds NaN/Inf (rank-00000.h5)");
  EXPECT_FALSE(std::filesystem::exists(path)) << "refused before the file is created";

  poisoned = small_state();
  poisoned.optimizer[1].second[0][0] = std::numeric_limits<float>::infinity();
  EXPECT_NE(keel::testing::checkpoint_error_of([&] {
              write_rank_file(path, poisoned, {0, 1});
            }).find("optimizer tensor embed.weight/exp_avg_sq holds NaN/Inf (rank-00000.h5)"),
            std::string::npos);
  poisoned = small_state();
  poisoned.optimizer[0].second = torch::full({5, 4}, -std::numeric_limits<float>::infinity()).to(torch::kBFloat16);
  EXPECT_NE(keel::testing::checkpoint_error_of([&] {
              write_rank_file(path, poisoned, {0, 1});
            }).find("embed.weight/exp_avg"),
            std::string::npos);
  // nlohmann writes a NaN as null: a poisoned LR factor is refused too.
  poisoned = small_state();
  poisoned.lr_schedule = nlohmann::json{{"lr", 0.003}, {"lr_factor", std::nan("")}}.dump();
  EXPECT_EQ(keel::testing::checkpoint_error_of([&] {
              write_rank_file(path, poisoned, {0, 1});
            }),
            "cannot save checkpoint step 40: /lr_schedule: field 'lr_factor' is null (a NaN or Inf written as JSON) "
            "(rank-00000.h5)");
  poisoned = small_state();
  poisoned.optimizer_json = R"({"step": nan})";  // a plugin that formats its own JSON with std::to_string
  EXPECT_NE(keel::testing::checkpoint_error_of([&] {
              write_rank_file(path, poisoned, {0, 1});
            }).find("cannot save checkpoint step 40: optimizer adamw state: not valid JSON"),
            std::string::npos);
  EXPECT_FALSE(std::filesystem::exists(path));

  // A clean state is written and marked as checked.
  write_rank_file(path, small_state(), {0, 1});
  EXPECT_EQ(H5Reader(path).int_attribute("/", "tensors_finite"), 1);
  EXPECT_EQ(read_rank_file(path).step, 40);
}

TEST(TrainingStateFile, JsonTypeErrorsNameTheFileObjectAndField) {
  const std::string dir = keel::testing::test_dir();
  int n = 0;
  auto read_error = [&](const std::function<void(TrainingState&)>& edit) {
    TrainingState s = small_state();
    edit(s);
    const std::string path = dir + "/rank-" + std::to_string(n++) + ".h5";
    write_rank_file(path, s, {0, 1});
    return keel::testing::checkpoint_error_of([&] { read_rank_file(path); });
  };
  EXPECT_EQ(read_error([](TrainingState& s) { s.lr_schedule = R"({"lr": "fast"})"; }),
            dir + "/rank-0.h5:/lr_schedule: field 'lr': expected a number, got a string");
  EXPECT_EQ(read_error([](TrainingState& s) { s.optimizer_json = R"({"step": 1.5})"; }),
            dir + "/rank-1.h5:/optimizer/state_json: field 'step': expected an integer, got 1.5");
  EXPECT_EQ(read_error([](TrainingState& s) { s.data_ledger = R"({"sources": [{"name": "prose", "epoch": "one"}]})"; }),
            dir + "/rank-2.h5:/data/ledger: field 'sources[0].epoch': expected an integer, got a string");
  EXPECT_EQ(read_error([](TrainingState& s) {
              s.data_ledger = R"({"mixture_history": [{"from_step": 0, "weights": {"code": true}}]})";
            }),
            dir + "/rank-3.h5:/data/ledger: field 'mixture_history[0].weights.code': expected a number, got true");
  EXPECT_EQ(read_error([](TrainingState& s) { s.lineage = R"({"run_id": 7})"; }),
            dir + "/rank-4.h5:/lineage: field 'run_id': expected a string, got 7");
  EXPECT_EQ(read_error([](TrainingState& s) {
              s.plugins.push_back({"spike_handler", "zscore_skip", "1", R"({"skipped": "x", "w": [1, 2]})", {}});
            }),
            "(no CheckpointError)");  // a plugin's own fields are the plugin's to type; only a null (a NaN) is Keel's
                                      // business
}

TEST(JsonFields, TypedReadsNameOriginAndPath) {
  const nlohmann::json j =
      parse_json_object(R"({"a": 1, "b": null, "c": {"d": "x"}, "e": [{"f": 2.5}], "g": [1, null]})", "F");
  const JsonFields f(j, "F");
  EXPECT_EQ(f.integer("a"), 1);
  EXPECT_EQ(f.number_or("missing", 4.5), 4.5);
  EXPECT_EQ(keel::testing::checkpoint_error_of([&] { f.number_or("b", 1.0); }),
            "F: field 'b': expected a number, got null");
  EXPECT_EQ(keel::testing::checkpoint_error_of([&] { f.object("c").integer("d"); }),
            "F: field 'c.d': expected an integer, got a string");
  EXPECT_EQ(keel::testing::checkpoint_error_of([&] { f.objects("e")[0].integer("f"); }),
            "F: field 'e[0].f': expected an integer, got 2.5");
  EXPECT_EQ(keel::testing::checkpoint_error_of([&] { f.string("nope"); }), "F: field 'nope' is missing");
  EXPECT_EQ(keel::testing::checkpoint_error_of([&] { f.object("a"); }), "F: field 'a': expected an object, got 1");
  EXPECT_EQ(find_null(j).value_or(""), "b");
  EXPECT_EQ(find_null(j["g"], "g").value_or(""), "g[1]");
  EXPECT_EQ(keel::testing::checkpoint_error_of([] { parse_json_object("[1]", "F"); }),
            "F: expected a JSON object, got an array");
}
