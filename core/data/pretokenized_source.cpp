// Why: see pretokenized_source.h. The stages of prepare_pretokenized, top to bottom: list and stat every source's
// files and fingerprint them; keep a source whose fingerprint is unchanged and whose files still open cleanly;
// otherwise open (validate) its files, choose its held-out documents and write its document index (of the
// documents training sees); write DIR/prepared.json last. Held-out documents are never copied either: training
// and eval read the same files through SplicedTokens, a view of some token ranges of a file.
#include "core/data/pretokenized_source.h"

#include <glob.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>

#include "core/data/documents.h"
#include "core/data/prepare_common.h"
#include "core/data/pretokenized.h"
#include "core/data/shard.h"
#include "keel/version.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace keel::data {
namespace {

using detail::fingerprint_of;

bool has_glob_chars(const std::string& s) { return s.find_first_of("*?[") != std::string::npos; }

// {path, bytes, mtime_ns} of a file now; throws DataError when it cannot be stat'ed.
json stat_json(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) throw DataError(path + ": cannot stat: " + std::strerror(errno));
  const int64_t mtime_ns = static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
  return {{"path", path}, {"bytes", static_cast<int64_t>(st.st_size)}, {"mtime_ns", mtime_ns}};
}

// The files a token file stands for: a Megatron prefix is its .idx and .bin.
std::vector<std::string> backing_files(const std::string& format, const std::string& file) {
  if (format == "megatron") return {file + ".idx", file + ".bin"};
  return {file};
}

// One token file opened as its format says, validated against `vocab`.
std::unique_ptr<TokenStream> open_token_file(const std::string& format, const std::string& file,
                                             const std::string& dtype, int64_t vocab) {
  if (format == "megatron") return std::make_unique<MappedTokens>(std::move(open_megatron(file, vocab).tokens));
  if (format == "npy") return std::make_unique<MappedTokens>(open_npy(file, vocab));
  if (format == "raw") return std::make_unique<MappedTokens>(open_raw_tokens(file, dtype, vocab));
  if (format == "keel-shard") return std::make_unique<ShardReader>(file, vocab);  // a jsonl-tokens cache
  throw DataError(file + ": unknown token file format '" + format + "' in prepared.json");
}

using Ranges = std::vector<std::pair<int64_t, int64_t>>;  // [begin, end) token ranges, ascending, disjoint

// Some token ranges of one file's stream, concatenated: what training (or eval) sees of a file of a source with
// held-out documents. No token is copied; a read maps through the ranges.
class SplicedTokens : public TokenStream {
 public:
  SplicedTokens(std::unique_ptr<TokenStream> base, Ranges segments)
      : base_(std::move(base)), segments_(std::move(segments)) {
    for (const auto& [b, e] : segments_) {
      starts_.push_back(total_);
      total_ += e - b;
    }
  }
  const std::string& path() const override { return base_->path(); }
  int64_t num_tokens() const override { return total_; }
  void read(int64_t begin, int64_t count, int64_t* out) const override {
    if (begin < 0 || count < 0 || begin > total_ || count > total_ - begin) {
      throw DataError(path() + ": token range [" + std::to_string(begin) + ", " + std::to_string(begin + count) +
                      ") out of range [0, " + std::to_string(total_) + ") of the tokens it gives this split");
    }
    auto k = static_cast<size_t>(std::upper_bound(starts_.begin(), starts_.end(), begin) - starts_.begin()) - 1;
    while (count > 0) {
      const int64_t offset = begin - starts_[k];
      const int64_t n = std::min(count, segments_[k].second - segments_[k].first - offset);
      base_->read(segments_[k].first + offset, n, out);
      out += n;
      begin += n;
      count -= n;
      ++k;
    }
  }

 private:
  std::unique_ptr<TokenStream> base_;
  Ranges segments_;
  std::vector<int64_t> starts_;  // first token of each segment in this view
  int64_t total_ = 0;
};

// The held-out ranges of a prepared.json entry ("heldout": {"ranges": [[begin, end], ...]}, token offsets of the
// source's whole stream of `total` tokens), checked: ascending, disjoint, non-empty, inside the stream.
Ranges heldout_ranges(const json& entry, int64_t total) {
  Ranges out;
  if (!entry.contains("heldout")) return out;
  for (const auto& r : entry.at("heldout").at("ranges")) {
    const int64_t b = r.at(0).get<int64_t>(), e = r.at(1).get<int64_t>();
    if (b >= e || e > total || (!out.empty() && b <= out.back().second)) {
      throw DataError("source " + entry.at("name").get<std::string>() + ": prepared.json heldout range " + r.dump() +
                      " is not inside the stream of " + std::to_string(total) + " tokens after the previous one");
    }
    out.emplace_back(b, e);
  }
  return out;
}

// `streams` (a source's files in stream order) cut to the tokens of one split: those the held-out ranges cover
// (`heldout`) or the others (training). A file left with no token of the split is dropped.
std::vector<std::unique_ptr<TokenStream>> split_streams(std::vector<std::unique_ptr<TokenStream>> streams,
                                                        const Ranges& held, bool heldout) {
  std::vector<std::unique_ptr<TokenStream>> out;
  int64_t file_begin = 0;
  size_t r = 0;  // the first held-out range that ends after file_begin
  for (auto& stream : streams) {
    const int64_t file_end = file_begin + stream->num_tokens();
    Ranges segments;
    int64_t at = file_begin;  // training: the next token not yet assigned
    for (size_t k = r; k < held.size() && held[k].first < file_end; ++k) {
      const int64_t b = std::max(held[k].first, file_begin), e = std::min(held[k].second, file_end);
      if (heldout) {
        segments.emplace_back(b - file_begin, e - file_begin);
      } else if (b > at) {
        segments.emplace_back(at - file_begin, b - file_begin);
      }
      at = e;
    }
    if (!heldout && at < file_end) segments.emplace_back(at - file_begin, file_end - file_begin);
    while (r < held.size() && held[r].second <= file_end) ++r;
    if (!held.empty() && !segments.empty()) {
      out.push_back(std::make_unique<SplicedTokens>(std::move(stream), std::move(segments)));
    } else if (held.empty() && !heldout) {
      out.push_back(std::move(stream));  // no held-out set: the files as they are
    }
    file_begin = file_end;
  }
  return out;
}

// Every file of a prepared.json entry opened and checked (see open_pretokenized_entry), whole.
std::vector<std::unique_ptr<TokenStream>> open_entry_files(const json& entry, int64_t vocab) {
  for (const auto& f : entry.at("files")) {
    const std::string path = f.at("path");
    std::error_code ec;
    if (!fs::exists(path, ec)) throw DataError(path + ": pre-tokenized file listed in prepared.json is missing");
    const json now = stat_json(path);
    if (now["bytes"] != f.at("bytes") || now["mtime_ns"] != f.at("mtime_ns")) {
      throw DataError(path + ": changed since `keel data prepare` (now " + now["bytes"].dump() + " bytes, mtime_ns " +
                      now["mtime_ns"].dump() + "; prepared.json records " + f.at("bytes").dump() + " bytes, mtime_ns " +
                      f.at("mtime_ns").dump() + ")");
    }
  }
  std::vector<std::unique_ptr<TokenStream>> streams;
  for (const auto& tf : entry.at("token_files")) {
    const std::string file = tf.at("file"), kind = tf.at("format");
    auto stream = open_token_file(kind, file, tf.value("dtype", ""), vocab);
    const int64_t listed = tf.at("tokens").get<int64_t>();
    if (stream->num_tokens() != listed) {
      throw DataError(stream->path() + ": has " + std::to_string(stream->num_tokens()) +
                      " tokens, prepared.json says " + std::to_string(listed));
    }
    streams.push_back(std::move(stream));
  }
  return streams;
}

// The streams of one split of an entry, their token count checked against prepared.json's.
std::vector<std::unique_ptr<TokenStream>> open_split(const json& entry, int64_t vocab, bool heldout) {
  auto files = open_entry_files(entry, vocab);
  int64_t total = 0;
  for (const auto& f : files) total += f->num_tokens();
  auto streams = split_streams(std::move(files), heldout_ranges(entry, total), heldout);
  int64_t got = 0;
  for (const auto& s : streams) got += s->num_tokens();
  const int64_t want = heldout ? entry.at("heldout").at("tokens").get<int64_t>() : entry.at("tokens").get<int64_t>();
  if (got != want) {
    throw DataError("source " + entry.at("name").get<std::string>() + ": its files give " + std::to_string(got) + " " +
                    (heldout ? "held-out" : "training") + " tokens, prepared.json says " + std::to_string(want));
  }
  return streams;
}

// The documents of a source's whole stream (starts, `total` tokens) split into the training documents (their
// starts in the training stream, written to documents.bin) and the held-out ones (ids and token ranges).
struct DocumentSplit {
  std::vector<int64_t> train_starts;
  std::vector<int64_t> held_ids;
  json ranges = json::array();  // [[begin, end], ...] of the whole stream, adjacent documents merged
  int64_t held_tokens = 0;
};
DocumentSplit split_documents_of(const keel::SourceConfig& src, const std::vector<int64_t>& starts, int64_t total) {
  DocumentSplit out;
  const auto all = static_cast<int64_t>(starts.size());
  out.held_ids = heldout_document_ids(heldout_documents(src, all), all);
  size_t h = 0;
  for (int64_t k = 0; k < all; ++k) {
    const int64_t b = starts[static_cast<size_t>(k)], e = k + 1 < all ? starts[static_cast<size_t>(k + 1)] : total;
    if (h < out.held_ids.size() && out.held_ids[h] == k) {
      ++h;
      out.held_tokens += e - b;
      if (!out.ranges.empty() && out.ranges.back()[1] == b) {
        out.ranges.back()[1] = e;
      } else {
        out.ranges.push_back({b, e});
      }
    } else {
      out.train_starts.push_back(b - out.held_tokens);
    }
  }
  return out;
}

struct SourcePlan {
  json settings;            // name, format, dtype, inputs, files (with sizes and mtimes)
  json token_files;         // [{file, format, dtype}] in stream order (tokens filled in when opened)
  std::string fingerprint;  // of the settings
};

SourcePlan plan_source(const keel::SourceConfig& src, int64_t vocab, int64_t eos_id) {
  SourcePlan plan;
  json files = json::array();
  plan.token_files = json::array();
  for (const auto& file : list_token_files(src)) {
    std::string kind = src.format;
    if (src.format == "npy" && !is_npy_file(file)) {
      if (src.dtype.empty()) {
        throw DataError("source " + src.name + ": " + file +
                        " is not an .npy file (no \\x93NUMPY magic): give source." + src.name +
                        ".dtype = uint16 or uint32 to read it as a raw token array");
      }
      kind = "raw";
    }
    json tf = {{"file", file}, {"format", kind}};
    if (kind == "raw") tf["dtype"] = src.dtype;
    plan.token_files.push_back(tf);
    for (const auto& f : backing_files(kind, file)) files.push_back(stat_json(f));
  }
  plan.settings = {{"name", src.name}, {"format", src.format}, {"inputs", src.inputs}, {"files", files}};
  if (!src.dtype.empty()) plan.settings["dtype"] = src.dtype;
  json fp_input = {
      {"format_version", kPreparedFormatVersion}, {"vocab", vocab}, {"eos_id", eos_id}, {"source", plan.settings}};
  detail::add_heldout_fingerprint(fp_input, src, effective_heldout(src));
  plan.fingerprint = fingerprint_of(fp_input);
  return plan;
}

// Opens a source's files (full validation), writes its document index and returns its prepared.json entry.
json prepare_source(const std::string& dir, const keel::SourceConfig& src, const SourcePlan& plan, int64_t vocab,
                    int64_t eos_id) {
  json entry = plan.settings;
  entry["fingerprint"] = plan.fingerprint;
  entry["token_files"] = json::array();
  std::vector<int64_t> starts;
  int64_t total = 0, bytes = 0;
  for (const auto& tf : plan.token_files) {
    const std::string file = tf["file"], kind = tf["format"];
    json out = tf;
    if (kind == "jsonl-tokens") {  // parsed once into a Keel shard: JSON cannot be memory-mapped
      const std::vector<int32_t> ids = read_jsonl_tokens(file, vocab);
      char name[48];
      std::snprintf(name, sizeof name, "/cache-%05zu.bin", static_cast<size_t>(entry["token_files"].size()));
      const std::string cache = dir + "/" + src.name + name;
      fs::create_directories(dir + "/" + src.name);
      detail::refuse_non_regular(cache, "a shard file");
      write_shard(cache, ids, vocab, eos_id);
      const ShardReader shard(cache, vocab);
      append_eos_document_starts(shard, eos_id, total, starts);
      out = {{"file", cache}, {"format", "keel-shard"}, {"input", file}, {"tokens", shard.num_tokens()}};
      total += shard.num_tokens();
      bytes += shard.file_bytes();
    } else if (kind == "megatron") {
      MegatronDataset ds = open_megatron(file, vocab);
      for (int64_t s : ds.index.document_starts) starts.push_back(total + s);
      out["tokens"] = ds.tokens.num_tokens();
      out["documents"] = static_cast<int64_t>(ds.index.document_starts.size());
      total += ds.tokens.num_tokens();
      bytes += ds.tokens.file_bytes();
    } else {
      const MappedTokens t =
          kind == "npy" ? open_npy(file, vocab) : open_raw_tokens(file, tf["dtype"].get<std::string>(), vocab);
      append_eos_document_starts(t, eos_id, total, starts);
      out["tokens"] = t.num_tokens();
      total += t.num_tokens();
      bytes += t.file_bytes();
    }
    entry["token_files"].push_back(out);
  }
  while (!starts.empty() && starts.back() >= total) starts.pop_back();  // an EOS that ends the stream
  const DocumentSplit split = split_documents_of(src, starts, total);
  const auto documents = static_cast<int64_t>(split.train_starts.size());
  const std::string source_dir = dir + "/" + src.name;
  fs::create_directories(source_dir);
  detail::refuse_non_regular(source_dir + "/documents.bin");
  write_document_index(source_dir + "/documents.bin", split.train_starts);
  entry["documents"] = documents;
  entry["raw_bytes"] = bytes;
  entry["tokens"] = total - split.held_tokens;
  entry["document_index"] = {{"file", src.name + "/documents.bin"}, {"documents", documents}};
  if (!split.held_ids.empty()) {
    entry["heldout"] = {{"documents", static_cast<int64_t>(split.held_ids.size())},
                        {"document_ids", split.held_ids},
                        {"tokens", split.held_tokens},
                        {"ranges", split.ranges}};
    spdlog::info("source {}: {} of {} documents held out ({} tokens), never trained on", src.name,
                 split.held_ids.size(), starts.size(), split.held_tokens);
  }
  return entry;
}

// Why an old prepared.json entry cannot be kept ("" when it can): its files must open as training opens them,
// and its document index must read back.
std::string entry_problem(const std::string& dir, const json& entry, int64_t vocab) {
  try {
    open_pretokenized_entry(entry, vocab);
    const json& index = entry.at("document_index");
    read_document_index(dir + "/" + index.at("file").get<std::string>(), index.at("documents").get<int64_t>(),
                        entry.at("tokens").get<int64_t>());
  } catch (const json::exception& e) {
    return std::string("malformed prepared.json entry (") + e.what() + ")";
  } catch (const DataError& e) {
    return e.what();
  }
  return "";
}

PrepareSourceReport report_of(const json& entry, bool reused) {
  PrepareSourceReport r;
  r.name = entry["name"];
  r.files = static_cast<int64_t>(entry["files"].size());
  r.documents = entry["documents"];
  r.raw_bytes = entry["raw_bytes"];
  r.tokens = entry["tokens"];
  r.shards = static_cast<int64_t>(entry["token_files"].size());
  r.heldout_documents = entry.contains("heldout") ? entry["heldout"]["documents"].get<int64_t>() : 0;
  r.reused = reused;
  return r;
}

}  // namespace

bool is_pretokenized(const keel::SourceConfig& source) {
  return source.format == "megatron" || source.format == "npy" || source.format == "jsonl-tokens";
}

std::vector<std::string> list_token_files(const keel::SourceConfig& source) {
  if (source.inputs.empty()) throw DataError("source " + source.name + ": no inputs");
  const bool megatron = source.format == "megatron";
  std::vector<std::string> out;
  std::set<std::string> seen;
  for (const auto& input : source.inputs) {
    std::vector<std::string> paths;
    if (has_glob_chars(input)) {
      glob_t g{};
      if (::glob(input.c_str(), 0, nullptr, &g) == 0) {
        for (size_t i = 0; i < g.gl_pathc; ++i) paths.emplace_back(g.gl_pathv[i]);
      }
      globfree(&g);
      if (paths.empty()) throw DataError("source " + source.name + ": input pattern " + input + " matches nothing");
      std::sort(paths.begin(), paths.end());
    } else {
      paths.push_back(input);
    }
    for (const auto& p : paths) {
      const std::string file = megatron ? megatron_prefix(p) : p;
      for (const auto& f : backing_files(megatron ? "megatron" : "npy", file)) {
        std::error_code ec;
        if (!fs::exists(f, ec)) throw DataError("source " + source.name + ": input " + f + " does not exist");
        if (const std::string what = io::non_regular_error(f, "a token file"); !what.empty()) {
          throw DataError("source " + source.name + ": input " + what + " (format " + source.format +
                          " takes files or globs of them)");
        }
      }
      if (seen.insert(file).second) out.push_back(file);
    }
  }
  return out;
}

std::vector<std::unique_ptr<TokenStream>> open_pretokenized_entry(const json& entry, int64_t vocab) {
  return open_split(entry, vocab, /*heldout=*/false);
}

std::vector<std::unique_ptr<TokenStream>> open_pretokenized_heldout(const json& entry, int64_t vocab) {
  if (!entry.contains("heldout")) return {};
  return open_split(entry, vocab, /*heldout=*/true);
}

PrepareReport prepare_pretokenized(const keel::Config& config, const PrepareOptions& options) {
  const auto t0 = std::chrono::steady_clock::now();
  const auto& data = config.data;
  const std::string dir = data.dir;
  const std::string config_name = config.source_file.empty() ? "<config>" : config.source_file;
  const int64_t vocab = config.model.vocab;
  if (data.eos_id < 0) {
    throw DataError(config_name + ": source " + data.sources.front().name + " has format " +
                    data.sources.front().format +
                    ": set data.eos_id, the separator id of the pre-tokenized data (it comes without a tokenizer)");
  }
  PrepareReport report;
  report.dir = dir;
  report.vocab = vocab;
  report.eos_id = static_cast<int32_t>(data.eos_id);

  std::vector<SourcePlan> plans;
  json all_fp = json::array();
  std::set<std::string> names;
  for (const auto& src : data.sources) {
    detail::check_source_name(src.name);
    if (!names.insert(src.name).second) throw DataError(config_name + ": source " + src.name + " given twice");
    plans.push_back(plan_source(src, vocab, data.eos_id));
    all_fp.push_back(plans.back().fingerprint);
  }
  report.fingerprint = fingerprint_of({{"vocab", vocab}, {"eos_id", data.eos_id}, {"pretokenized", all_fp}});

  const std::string manifest_path = dir + "/prepared.json";
  detail::refuse_non_regular(manifest_path);
  json old;
  if (fs::exists(manifest_path)) {
    try {
      old = json::parse(io::read_regular_file<DataError>(manifest_path));
    } catch (const std::exception& e) {
      spdlog::warn("{}: unreadable ({}); preparing again", manifest_path, e.what());
    }
  }
  json manifest = {{"format", "keel-prepared-data"},
                   {"format_version", kPreparedFormatVersion},
                   {"keel_version", KEEL_VERSION},
                   {"fingerprint", report.fingerprint},
                   {"vocab", vocab},
                   {"eos_id", data.eos_id},
                   {"pretokenized", true},
                   {"sources", json::array()}};
  bool all_reused = !options.force && old.is_object() && old.value("fingerprint", json()) == report.fingerprint;
  fs::create_directories(dir);
  for (size_t i = 0; i < data.sources.size(); ++i) {
    const auto& src = data.sources[i];
    const json* kept = nullptr;
    if (!options.force && old.is_object() && old.contains("sources") && old["sources"].is_array()) {
      for (const auto& s : old["sources"]) {
        if (!s.is_object() || s.value("name", json()) != src.name ||
            s.value("fingerprint", json()) != plans[i].fingerprint)
          continue;
        const std::string problem = entry_problem(dir, s, vocab);
        if (problem.empty()) {
          kept = &s;
        } else {
          spdlog::warn("source {}: prepared data damaged: {}; preparing this source again", src.name, problem);
        }
        break;
      }
    }
    all_reused &= kept != nullptr;
    const auto t_src = std::chrono::steady_clock::now();
    const json entry = kept ? *kept : prepare_source(dir, src, plans[i], vocab, data.eos_id);
    if (!kept) {
      spdlog::info("source {}: {} {} file(s) read in place: {} tokens, {} documents, {:.1f} s", src.name,
                   entry["token_files"].size(), src.format, entry["tokens"].get<int64_t>(),
                   entry["documents"].get<int64_t>(),
                   std::chrono::duration<double>(std::chrono::steady_clock::now() - t_src).count());
    }
    manifest["sources"].push_back(entry);
    report.sources.push_back(report_of(entry, kept != nullptr));
  }
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (all_reused) {
    report.up_to_date = true;
    spdlog::info("data in {} is up to date (fingerprint {}): nothing to do", dir, report.fingerprint);
    return report;
  }
  detail::write_text_atomically(manifest_path, manifest.dump(2) + "\n");
  spdlog::info("prepared {} (fingerprint {}, pre-tokenized, no token copied) in {:.1f} s", manifest_path,
               report.fingerprint, report.seconds);
  return report;
}

}  // namespace keel::data
