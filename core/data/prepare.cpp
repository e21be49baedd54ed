// Why: see prepare.h. The steps, top to bottom:
//   1. list every source's input files (fixed order) and fingerprint settings + file list + sizes;
//   2. stop if DIR/prepared.json carries the same fingerprint and its shards are all there;
//   3. read and split documents; train the tokenizer on an interleaved, evenly spread sample of all sources
//      (skipped when DIR/tokenizer.model was trained with the same settings and inputs);
//   4. per source whose fingerprint changed: tokenize (threads over documents, results kept in document order),
//      append EOS after every document, cut the stream into shards of kShardMaxTokens;
//   5. write DIR/prepared.json atomically, last — it is the commit record of the whole preparation.
#include "core/data/prepare.h"

#include <fnmatch.h>
#include <glob.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "core/checkpoint/sha256.h"
#include "core/data/data_error.h"
#include "core/data/documents.h"
#include "core/data/hash.h"
#include "core/data/prepare_common.h"
#include "core/data/pretokenized_source.h"
#include "core/data/shard.h"
#include "core/data/tokenizer.h"
#include "core/io/regular_file.h"
#include "keel/version.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace keel::data {
namespace {

using detail::check_source_name;
using detail::fingerprint_of;
using detail::refuse_non_regular;
using detail::write_text_atomically;

constexpr int64_t kBinaryProbeBytes = 8192;
constexpr int64_t kTokenizeBlockBytes = int64_t(16) << 20;

double mib(int64_t bytes) { return static_cast<double>(bytes) / (1024.0 * 1024.0); }

// Only called for regular files (list_source_files checks first), so the open never waits on a FIFO.
bool is_binary_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return true;  // unreadable: treat as not text
  char buf[kBinaryProbeBytes];
  f.read(buf, sizeof buf);
  return std::memchr(buf, '\0', static_cast<size_t>(f.gcount())) != nullptr;
}

// A whole file, refused by name (and never waited on) when it is a FIFO, a directory or a device.
std::string read_file(const std::string& path) { return io::read_regular_file<DataError>(path); }

bool has_glob_chars(const std::string& s) { return s.find_first_of("*?[") != std::string::npos; }

bool is_blank(std::string_view s) { return s.find_first_not_of(" \t\r\n\f\v") == std::string_view::npos; }

struct SourceDocs {
  std::vector<std::string> docs;
  int64_t raw_bytes = 0;
};

SourceDocs read_documents(const std::vector<InputFile>& files, const std::string& split) {
  SourceDocs out;
  for (const auto& f : files) {
    const std::string text = read_file(f.path);
    out.raw_bytes += static_cast<int64_t>(text.size());
    for (auto& d : split_documents(text, split)) out.docs.push_back(std::move(d));
  }
  return out;
}

// The tokenizer sample: ≈ sample_bytes of documents, shared equally among sources (a source smaller than its
// share gives the rest to the others), each source's pick spread evenly over the whole source, and the picks
// interleaved source by source.
std::vector<std::string> tokenizer_sample(const std::vector<SourceDocs>& sources, int64_t sample_bytes) {
  const size_t n = sources.size();
  std::vector<int64_t> quota(n, 0);
  std::vector<size_t> order(n);
  for (size_t i = 0; i < n; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return sources[a].raw_bytes < sources[b].raw_bytes; });
  int64_t left = sample_bytes;
  for (size_t k = 0; k < n; ++k) {
    const size_t i = order[k];
    const int64_t share = left / static_cast<int64_t>(n - k);
    quota[i] = std::min(share, sources[i].raw_bytes);
    left -= quota[i];
  }
  std::vector<std::vector<const std::string*>> picks(n);
  for (size_t i = 0; i < n; ++i) {
    int64_t total = 0;
    for (const auto& d : sources[i].docs) total += static_cast<int64_t>(d.size());
    const double ratio = total > 0 ? static_cast<double>(quota[i]) / static_cast<double>(total) : 0.0;
    int64_t seen = 0, taken = 0;
    for (const auto& d : sources[i].docs) {
      seen += static_cast<int64_t>(d.size());
      // Take a document while the bytes taken lag behind `ratio` of the bytes seen (Bresenham-like).
      if (static_cast<double>(taken) < ratio * static_cast<double>(seen)) {
        picks[i].push_back(&d);
        taken += static_cast<int64_t>(d.size());
      }
    }
  }
  std::vector<std::string> sample;
  for (size_t k = 0;; ++k) {
    bool any = false;
    for (size_t i = 0; i < n; ++i) {
      if (k < picks[i].size()) {
        sample.push_back(*picks[i][k]);
        any = true;
      }
    }
    if (!any) break;
  }
  return sample;
}

// Accumulates a source's token stream and writes it out as shards of at most kShardMaxTokens.
// Files are PREFIX-00000.bin ("shard" for training, "heldout" for the held-out set); bos >= 0 is prepended to
// every document (data.add_bos).
class ShardSink {
 public:
  ShardSink(std::string dir, std::string rel_dir, int64_t vocab, int32_t eos, int32_t bos = -1,
            std::string prefix = "shard")
      : dir_(std::move(dir)),
        rel_dir_(std::move(rel_dir)),
        prefix_(std::move(prefix)),
        vocab_(vocab),
        eos_(eos),
        bos_(bos) {}

  void append(const std::vector<int32_t>& tokens) {
    document_starts_.push_back(total_);
    if (bos_ >= 0) pending_.push_back(bos_);
    pending_.insert(pending_.end(), tokens.begin(), tokens.end());
    pending_.push_back(eos_);
    total_ += static_cast<int64_t>(tokens.size()) + 1 + (bos_ >= 0 ? 1 : 0);
    while (static_cast<int64_t>(pending_.size()) >= kShardMaxTokens) flush(kShardMaxTokens);
  }
  void finish() {
    if (!pending_.empty() || shards_.empty()) flush(static_cast<int64_t>(pending_.size()));
  }
  const json& shards() const { return shards_; }
  int64_t total() const { return total_; }
  // Token offset of every document's first token in the source's stream (documents.h).
  const std::vector<int64_t>& document_starts() const { return document_starts_; }

 private:
  void flush(int64_t count) {
    char name[64];
    std::snprintf(name, sizeof name, "%s-%05zu.bin", prefix_.c_str(), shards_.size());
    std::vector<int32_t> piece(pending_.begin(), pending_.begin() + count);
    const int64_t bytes = write_shard(dir_ + "/" + name, piece, vocab_, eos_);
    shards_.push_back({{"file", rel_dir_ + "/" + name}, {"tokens", count}, {"bytes", bytes}});
    pending_.erase(pending_.begin(), pending_.begin() + count);
  }

  std::string dir_, rel_dir_, prefix_;
  int64_t vocab_;
  int32_t eos_, bos_;
  std::vector<int32_t> pending_;
  json shards_ = json::array();
  int64_t total_ = 0;
  std::vector<int64_t> document_starts_;
};

// Tokenize documents, appending them in document order to `sink`, or to `heldout` where held[i] is set.
void tokenize_into(const std::vector<std::string>& docs, const Tokenizer& tokenizer, ShardSink& sink,
                   const std::vector<bool>& held, ShardSink& heldout) {
  size_t begin = 0;
  while (begin < docs.size()) {
    size_t end = begin;
    int64_t bytes = 0;
    while (end < docs.size() && (end == begin || bytes < kTokenizeBlockBytes)) bytes += docs[end++].size();
    // One keel-spm run per block of documents (SentencePiece runs outside this process; see tokenizer.h).
    const std::vector<std::vector<int32_t>> out =
        tokenizer.encode_batch(std::vector<std::string>(docs.begin() + begin, docs.begin() + end));
    for (size_t j = 0; j < out.size(); ++j) (held[begin + j] ? heldout : sink).append(out[j]);
    begin = end;
  }
  sink.finish();
  if (heldout.total() > 0) heldout.finish();
}

// Why a source's prepared shards cannot be kept ("" when they can): each shard is opened and checked exactly as
// a run opens it (open_prepared_shard: header, size, every token id < vocab, token count, EOS id), so prepare never
// calls data "up to date" that `keel train` would refuse.
std::string shards_problem(const std::string& dir, const json& source, int64_t vocab, int64_t eos_id) {
  if (!source.contains("shards") || !source["shards"].is_array()) return "prepared.json lists no shards";
  for (const auto& s : source["shards"]) {
    if (!s.is_object() || !s.contains("file") || !s["file"].is_string() || !s.contains("tokens") ||
        !s["tokens"].is_number_integer()) {
      return "prepared.json has a malformed shard entry " + s.dump();
    }
    const std::string path = dir + "/" + s["file"].get<std::string>();
    std::error_code ec;
    if (!fs::exists(path, ec)) return path + ": missing";
    refuse_non_regular(path, "a shard file");  // throws
    try {
      open_prepared_shard(path, vocab, s["tokens"].get<int64_t>(), eos_id);
    } catch (const DataError& e) {
      return e.what();
    }
  }
  if (source.contains("heldout")) {
    try {
      for (const auto& s : source.at("heldout").at("shards")) {
        const std::string path = dir + "/" + s.at("file").get<std::string>();
        std::error_code ec;
        if (!fs::exists(path, ec)) return path + ": missing";
        refuse_non_regular(path, "a shard file");  // throws
        open_prepared_shard(path, vocab, s.at("tokens").get<int64_t>(), eos_id);
      }
    } catch (const json::exception& e) {
      return std::string("malformed heldout entry (") + e.what() + ")";
    } catch (const DataError& e) {
      return e.what();
    }
  }
  // The document index (documents.h); data prepared before it existed has none and is prepared again (same
  // tokens, same fingerprints: checkpoints of runs on it still resume).
  const json index = source.value("document_index", json());
  if (!index.is_object()) return "no document index (prepared by an older Keel)";
  try {
    const std::string path = dir + "/" + index.at("file").get<std::string>();
    refuse_non_regular(path);  // throws
    read_document_index(path, index.at("documents").get<int64_t>(), source.at("tokens").get<int64_t>());
  } catch (const json::exception& e) {
    return std::string("malformed document_index entry (") + e.what() + ")";
  } catch (const DataError& e) {
    return e.what();
  }
  return "";
}

}  // namespace

double effective_heldout(const keel::SourceConfig& source) {
  return source.heldout == -1.0 ? kDefaultHeldoutShare : source.heldout;
}

int64_t heldout_documents(const keel::SourceConfig& source, int64_t documents) {
  const double setting = effective_heldout(source);
  if (setting <= 0.0 || documents < 2) {
    if (setting >= 1.0 && source.heldout != -1.0) {
      throw DataError("source." + source.name + ".heldout = " + std::to_string(static_cast<int64_t>(setting)) +
                      " but the source has " + std::to_string(documents) +
                      " document(s): training needs at least one; lower it or set 0");
    }
    return 0;
  }
  if (setting >= 1.0) {
    const auto n = static_cast<int64_t>(setting);
    if (n >= documents) {
      throw DataError("source." + source.name + ".heldout = " + std::to_string(n) + " but the source has " +
                      std::to_string(documents) + " documents: training needs at least one; lower it");
    }
    return n;
  }
  // A fraction (or the default share): at least one document, and at least one left for training.
  const auto n = static_cast<int64_t>(std::floor(setting * static_cast<double>(documents)));
  return std::min(std::max<int64_t>(n, 1), documents - 1);
}

std::vector<int64_t> heldout_document_ids(int64_t held, int64_t documents) {
  std::vector<int64_t> ids;
  for (int64_t i = 0; i < held; ++i) ids.push_back(((2 * i + 1) * documents) / (2 * held));
  return ids;
}

std::optional<HeldoutSet> read_heldout(const std::string& dir, const std::string& source, int64_t max_tokens) {
  const std::string manifest_path = dir + "/prepared.json";
  try {
    const json manifest = json::parse(read_file(manifest_path));
    const int64_t vocab = manifest.at("vocab").get<int64_t>(), eos = manifest.at("eos_id").get<int64_t>();
    for (const auto& s : manifest.at("sources")) {
      if (s.at("name") != source) continue;
      if (!s.contains("heldout")) return std::nullopt;
      const json& h = s.at("heldout");
      HeldoutSet out;
      out.documents = h.at("documents").get<int64_t>();
      out.tokens = h.at("tokens").get<int64_t>();
      if (s.contains("token_files")) {  // pre-tokenized: ranges of the source's own files, read in place
        if (max_tokens <= 0) return out;
        for (const auto& stream : open_pretokenized_heldout(s, vocab)) {
          const int64_t n = std::min(max_tokens - static_cast<int64_t>(out.head.size()), stream->num_tokens());
          std::vector<int64_t> ids(static_cast<size_t>(n));
          stream->read(0, n, ids.data());
          for (int64_t id : ids) out.head.push_back(static_cast<int32_t>(id));  // ids < vocab: checked at open
          if (static_cast<int64_t>(out.head.size()) >= max_tokens) break;
        }
        return out;
      }
      for (const auto& sh : h.at("shards")) {
        const int64_t want = max_tokens - static_cast<int64_t>(out.head.size());
        if (want <= 0) break;
        const std::string path = dir + "/" + sh.at("file").get<std::string>();
        refuse_non_regular(path, "a shard file");
        const ShardReader reader = open_prepared_shard(path, vocab, sh.at("tokens").get<int64_t>(), eos);
        const int64_t n = std::min(want, reader.num_tokens());
        for (int64_t i = 0; i < n; ++i) out.head.push_back(reader.token(i));
      }
      return out;
    }
  } catch (const json::exception& e) {
    throw DataError(manifest_path + ": malformed (" + e.what() + ")");
  }
  throw DataError(manifest_path + ": no source named " + source);
}

std::vector<std::string> split_documents(const std::string& text, const std::string& split) {
  std::vector<std::string> docs;
  if (split == "file") {
    if (!is_blank(text)) docs.push_back(text);
    return docs;
  }
  if (split != "fortune") throw DataError("split must be 'file' or 'fortune', got '" + split + "'");
  size_t doc_begin = 0, pos = 0;
  while (pos < text.size()) {
    size_t eol = text.find('\n', pos);
    const size_t next = eol == std::string::npos ? text.size() : eol + 1;
    if (eol == std::string::npos) eol = text.size();
    std::string_view line(text.data() + pos, eol - pos);
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line == "%") {
      std::string_view doc(text.data() + doc_begin, pos - doc_begin);
      if (!is_blank(doc)) docs.emplace_back(doc);
      doc_begin = next;
    }
    pos = next;
  }
  std::string_view tail(text.data() + doc_begin, text.size() - doc_begin);
  if (!is_blank(tail)) docs.emplace_back(tail);
  return docs;
}

std::vector<InputFile> list_source_files(const keel::SourceConfig& source) {
  if (source.split != "file" && source.split != "fortune") {
    throw DataError("source " + source.name + ": split must be 'file' or 'fortune', got '" + source.split + "'");
  }
  if (source.inputs.empty()) throw DataError("source " + source.name + ": no inputs");
  const int64_t max_bytes = source.max_mb > 0 ? static_cast<int64_t>(std::ceil(source.max_mb * 1024.0 * 1024.0)) : -1;
  std::vector<InputFile> files;
  std::set<std::string> seen;  // canonical paths
  int64_t total = 0;

  auto consider = [&](const fs::path& p) {  // returns false once max_mb is reached
    if (max_bytes >= 0 && total >= max_bytes) return false;
    std::error_code ec;
    const std::string canonical = fs::canonical(p, ec).string();
    if (ec || !seen.insert(canonical).second) return true;                  // broken link or duplicate
    if (source.split == "fortune" && p.extension() == ".dat") return true;  // strfile index
    // A named input (or a glob's match) that is a FIFO, socket or device: refused, never read (a FIFO would block
    // prepare, and inputs are read twice and fingerprinted by size).
    if (const std::string kind = io::non_regular_error(p.string()); !kind.empty()) {
      throw DataError("source " + source.name + ": input " + kind +
                      " (inputs are regular files, directories or globs of them)");
    }
    if (is_binary_file(p.string())) {
      spdlog::debug("source {}: skipping binary file {}", source.name, p.string());
      return true;
    }
    const auto size = static_cast<int64_t>(fs::file_size(p, ec));
    if (ec) return true;
    files.push_back({p.string(), size});
    total += size;
    return true;
  };

  for (const auto& input : source.inputs) {
    std::vector<std::string> paths;
    if (has_glob_chars(input)) {
      glob_t g{};
      if (::glob(input.c_str(), GLOB_NOSORT, nullptr, &g) == 0) {
        for (size_t i = 0; i < g.gl_pathc; ++i) paths.emplace_back(g.gl_pathv[i]);
      }
      globfree(&g);
      if (paths.empty()) throw DataError("source " + source.name + ": input pattern " + input + " matches nothing");
      std::sort(paths.begin(), paths.end());
    } else {
      if (!fs::exists(input)) throw DataError("source " + source.name + ": input " + input + " does not exist");
      paths.push_back(input);
    }
    for (const auto& path : paths) {
      if (fs::is_directory(path)) {
        std::vector<std::string> found;
        std::error_code ec;
        for (fs::recursive_directory_iterator it(path, fs::directory_options::skip_permission_denied, ec), end;
             !ec && it != end; it.increment(ec)) {
          std::error_code type_ec;
          // Follows symlinks; directories, FIFOs, sockets, devices and broken links are left out (the rest with a
          // warning: a FIFO is never opened, so it cannot block prepare).
          const std::string name = it->path().filename().string();
          if (::fnmatch(source.include.c_str(), name.c_str(), 0) != 0) continue;
          if (!it->is_regular_file(type_ec)) {
            if (const std::string kind = io::non_regular_error(it->path().string());
                !kind.empty() && !it->is_directory(type_ec)) {
              spdlog::warn("source {}: skipping {}", source.name, kind);
            }
            continue;
          }
          found.push_back(it->path().string());
        }
        std::sort(found.begin(), found.end());
        for (const auto& f : found) {
          if (!consider(f)) break;
        }
      } else if (!consider(path)) {
        break;
      }
    }
  }
  if (files.empty()) throw DataError("source " + source.name + ": no text files found in its inputs");
  return files;
}

namespace {

// Stage 1 of a text preparation: every source's input files, and the fingerprints of the settings and inputs.
struct TextPlan {
  std::vector<std::vector<InputFile>> files;
  std::vector<json> settings;  // per source: name, split, include, max_mb, inputs, files
  json tokenizer_settings;
  std::string tokenizer_fp;
  std::vector<std::string> source_fp;
  std::string fingerprint;
};

TextPlan plan_text_sources(const keel::Config& config, const std::string& config_name) {
  const auto& data = config.data;
  TextPlan plan;
  plan.files.resize(data.sources.size());
  plan.settings.resize(data.sources.size());
  json inputs_of_all = json::array();
  std::set<std::string> names;
  for (size_t i = 0; i < data.sources.size(); ++i) {
    const auto& src = data.sources[i];
    check_source_name(src.name);
    if (!names.insert(src.name).second) throw DataError(config_name + ": source " + src.name + " given twice");
    plan.files[i] = list_source_files(src);
    json file_list = json::array();
    for (const auto& f : plan.files[i]) file_list.push_back({{"path", f.path}, {"bytes", f.bytes}});
    plan.settings[i] = {{"name", src.name},     {"split", src.split},   {"include", src.include},
                        {"max_mb", src.max_mb}, {"inputs", src.inputs}, {"files", file_list}};
    inputs_of_all.push_back(plan.settings[i]);
  }
  const int64_t sample_bytes = std::max<int64_t>(1, data.tokenizer_sample_mb) * 1024 * 1024;
  if (!data.tokenizer.empty()) {
    // An existing tokenizer: its bytes are its identity; the fingerprint is their SHA-256 (what a resume with
    // another tokenizer names).
    std::error_code ec;
    if (!fs::exists(data.tokenizer, ec)) throw DataError("data.tokenizer = " + data.tokenizer + ": file not found");
    io::require_regular_file<DataError>(data.tokenizer);
    const std::string sha = checkpoint::sha256_file(data.tokenizer);
    plan.tokenizer_settings = {{"external", data.tokenizer}, {"sha256", sha}};
    plan.tokenizer_fp = sha;
  } else {
    plan.tokenizer_settings = {{"settings_version", kTokenizerSettingsVersion},
                               {"vocab", config.model.vocab},
                               {"sample_bytes", sample_bytes},
                               {"sources", inputs_of_all}};
    plan.tokenizer_fp = fingerprint_of(plan.tokenizer_settings);
  }
  json all_fp = json::array();
  for (size_t i = 0; i < data.sources.size(); ++i) {
    json fp_input = {{"format_version", kPreparedFormatVersion},
                     {"shard_max_tokens", kShardMaxTokens},
                     {"tokenizer", plan.tokenizer_fp},
                     {"source", plan.settings[i]}};
    detail::add_heldout_fingerprint(fp_input, data.sources[i], effective_heldout(data.sources[i]));
    if (data.add_bos) fp_input["add_bos"] = true;
    plan.source_fp.push_back(fingerprint_of(fp_input));
    all_fp.push_back(plan.source_fp[i]);
  }
  plan.fingerprint = fingerprint_of({{"vocab", config.model.vocab}, {"sources", all_fp}});
  return plan;
}

// Stage 2: what an earlier preparation left that can be kept. Per configured source, its entry in the old
// manifest when the fingerprint matches and every shard passes the checks a run makes when it opens them; a
// damaged shard is named (with its byte offset) and its source redone.
struct PreviousPreparation {
  json manifest;                     // DIR/prepared.json as found (null when absent or unreadable)
  std::vector<const json*> sources;  // into `manifest`; nullptr where the source must be prepared again
};

void find_reusable_sources(const keel::Config& config, const TextPlan& plan, const std::string& manifest_path,
                           const PrepareOptions& options, PreviousPreparation& previous) {
  const auto& data = config.data;
  previous.sources.assign(data.sources.size(), nullptr);
  json& old_manifest = previous.manifest;
  if (fs::exists(manifest_path)) {
    try {
      old_manifest = json::parse(read_file(manifest_path));
    } catch (const std::exception& e) {
      spdlog::warn("{}: unreadable ({}); preparing again", manifest_path, e.what());
      old_manifest = json();
    }
  }
  if (options.force || !old_manifest.is_object() || !old_manifest.contains("sources") ||
      !old_manifest["sources"].is_array() || !old_manifest.contains("eos_id") ||
      !old_manifest["eos_id"].is_number_integer()) {
    return;
  }
  const int64_t old_eos = old_manifest["eos_id"].get<int64_t>();
  for (size_t i = 0; i < data.sources.size(); ++i) {
    for (const auto& s : old_manifest["sources"]) {
      if (!s.is_object() || s.value("name", json()) != data.sources[i].name ||
          s.value("fingerprint", json()) != plan.source_fp[i]) {
        continue;
      }
      const std::string problem = shards_problem(config.data.dir, s, config.model.vocab, old_eos);
      if (problem.empty()) {
        previous.sources[i] = &s;
      } else {
        spdlog::warn("source {}: prepared {}: {}; preparing this source again", data.sources[i].name,
                     problem.rfind("no document index", 0) == 0 ? "data incomplete" : "shard damaged", problem);
      }
      break;
    }
  }
}

// data.tokenizer: the file copied into DIR/tokenizer.model (through a temporary name, then renamed) and
// DIR/tokenizer.json recording where it came from and its SHA-256.
void install_external_tokenizer(const std::string& source, const TextPlan& plan, const std::string& dir) {
  const std::string model_path = dir + "/tokenizer.model", tmp = dir + "/tokenizer.tmp.model";
  std::error_code ec;
  fs::copy_file(source, tmp, fs::copy_options::overwrite_existing, ec);
  if (!ec) fs::rename(tmp, model_path, ec);
  if (ec) throw DataError(model_path + ": cannot copy data.tokenizer " + source + " into place: " + ec.message());
  if (checkpoint::sha256_file(model_path) != plan.tokenizer_fp)
    throw DataError(model_path + ": copy of data.tokenizer " + source + " differs from it (changed while copying?)");
  fs::remove(dir + "/tokenizer.vocab", ec);  // a trained tokenizer's piece list, not this one's
  json tj = plan.tokenizer_settings;
  tj["fingerprint"] = plan.tokenizer_fp;
  write_text_atomically(dir + "/tokenizer.json", tj.dump(2) + "\n");
  spdlog::info("tokenizer: data.tokenizer {} copied to {} (sha256 {})", source, model_path, plan.tokenizer_fp);
}

// Stage 3: documents of the sources that need them, and the tokenizer (trained, or reused when DIR/tokenizer.json
// holds the current fingerprint). Returns whether it was trained; fills `reused` and `docs`.
bool prepare_tokenizer(const keel::Config& config, const TextPlan& plan, const PreviousPreparation& previous,
                       const PrepareOptions& options, std::vector<const json*>& reused, std::vector<SourceDocs>& docs) {
  const auto& data = config.data;
  const std::string dir = data.dir;
  const std::string model_path = dir + "/tokenizer.model";
  const std::string tokenizer_json_path = dir + "/tokenizer.json";
  bool reuse_tokenizer = false;
  if (!options.force && fs::exists(model_path) && fs::exists(tokenizer_json_path)) {
    try {
      reuse_tokenizer = json::parse(read_file(tokenizer_json_path)).value("fingerprint", "") == plan.tokenizer_fp;
    } catch (const std::exception&) {
      reuse_tokenizer = false;
    }
  }
  reused.assign(data.sources.size(), nullptr);
  docs.assign(data.sources.size(), SourceDocs{});
  for (size_t i = 0; i < data.sources.size(); ++i) {
    if (!options.force && reuse_tokenizer) reused[i] = previous.sources[i];
    if (reused[i] != nullptr) continue;  // neither the tokenizer nor the shards need this source's text
    docs[i] = read_documents(plan.files[i], data.sources[i].split);
    spdlog::info("source {}: {} files, {:.2f} MiB, {} documents", data.sources[i].name, plan.files[i].size(),
                 mib(docs[i].raw_bytes), docs[i].docs.size());
  }
  if (reuse_tokenizer) {
    spdlog::info("tokenizer {} matches the settings (fingerprint {}): reused", model_path, plan.tokenizer_fp);
    return false;
  }
  if (!data.tokenizer.empty()) {
    install_external_tokenizer(data.tokenizer, plan, dir);
    return false;
  }
  const int64_t sample_bytes = plan.tokenizer_settings["sample_bytes"].get<int64_t>();
  const auto t_tok = std::chrono::steady_clock::now();
  const auto sample = tokenizer_sample(docs, sample_bytes);
  int64_t bytes = 0;
  for (const auto& s : sample) bytes += static_cast<int64_t>(s.size());
  spdlog::info("training BPE tokenizer (vocab {}) on {:.2f} MiB from {} documents", config.model.vocab, mib(bytes),
               sample.size());
  train_tokenizer(sample, dir + "/tokenizer.tmp", config.model.vocab);
  std::error_code ec;
  fs::rename(dir + "/tokenizer.tmp.model", model_path, ec);
  if (!ec) fs::rename(dir + "/tokenizer.tmp.vocab", dir + "/tokenizer.vocab", ec);
  if (ec) throw DataError(model_path + ": cannot move the trained tokenizer into place: " + ec.message());
  json tj = plan.tokenizer_settings;
  tj.erase("sources");
  tj["fingerprint"] = plan.tokenizer_fp;
  tj["sample_documents"] = sample.size();
  tj["sample_bytes_used"] = bytes;
  write_text_atomically(tokenizer_json_path, tj.dump(2) + "\n");
  spdlog::info("tokenizer trained in {:.1f} s",
               std::chrono::duration<double>(std::chrono::steady_clock::now() - t_tok).count());
  return true;
}

// Stage 4, one source: its prepared.json entry, reused or tokenized into shards + document index.
json prepare_source_shards(const keel::Config& config, size_t i, const TextPlan& plan, const json* old,
                           const SourceDocs& docs, const Tokenizer& tokenizer, PrepareSourceReport& sr) {
  const auto& src = config.data.sources[i];
  const std::string dir = config.data.dir;
  sr.name = src.name;
  sr.files = static_cast<int64_t>(plan.files[i].size());
  json entry = plan.settings[i];
  entry["fingerprint"] = plan.source_fp[i];
  if (old != nullptr) {
    sr.documents = (*old)["documents"];
    sr.raw_bytes = (*old)["raw_bytes"];
    entry["documents"] = sr.documents;
    entry["raw_bytes"] = sr.raw_bytes;
    entry["tokens"] = (*old)["tokens"];
    entry["shards"] = (*old)["shards"];
    entry["document_index"] = (*old)["document_index"];
    if (old->contains("heldout")) {
      entry["heldout"] = (*old)["heldout"];
      sr.heldout_documents = (*old)["heldout"].value("documents", int64_t{0});
    }
    sr.reused = true;
    spdlog::info("source {}: shards up to date (fingerprint {}): reused", src.name, plan.source_fp[i]);
  } else {
    const auto all = static_cast<int64_t>(docs.docs.size());
    const std::vector<int64_t> held_ids = heldout_document_ids(heldout_documents(src, all), all);
    std::vector<bool> held(docs.docs.size(), false);
    for (int64_t id : held_ids) held[static_cast<size_t>(id)] = true;
    sr.heldout_documents = static_cast<int64_t>(held_ids.size());
    sr.documents = all - sr.heldout_documents;
    sr.raw_bytes = docs.raw_bytes;
    entry["documents"] = sr.documents;
    entry["raw_bytes"] = sr.raw_bytes;
    const auto t_src = std::chrono::steady_clock::now();
    const std::string source_dir = dir + "/" + src.name;
    fs::create_directories(source_dir);
    const int32_t bos = config.data.add_bos ? tokenizer.bos_id() : -1;
    ShardSink sink(source_dir, src.name, config.model.vocab, tokenizer.eos_id(), bos);
    ShardSink heldout(source_dir, src.name, config.model.vocab, tokenizer.eos_id(), bos, "heldout");
    tokenize_into(docs.docs, tokenizer, sink, held, heldout);
    entry["tokens"] = sink.total();
    entry["shards"] = sink.shards();
    write_document_index(source_dir + "/documents.bin", sink.document_starts());
    entry["document_index"] = {{"file", src.name + "/documents.bin"},
                               {"documents", static_cast<int64_t>(sink.document_starts().size())}};
    if (!held_ids.empty()) {
      entry["heldout"] = {{"documents", sr.heldout_documents},
                          {"document_ids", held_ids},
                          {"tokens", heldout.total()},
                          {"shards", heldout.shards()}};
    }
    // Remove shards of an earlier, longer preparation.
    std::set<std::string> keep;
    for (const auto* list : {&sink.shards(), &heldout.shards()})
      for (const auto& s : *list) keep.insert(fs::path(s["file"].get<std::string>()).filename().string());
    for (const auto& e : fs::directory_iterator(source_dir)) {
      const std::string name = e.path().filename().string();
      if ((name.rfind("shard-", 0) == 0 || name.rfind("heldout-", 0) == 0) && keep.count(name) == 0)
        fs::remove(e.path());
    }
    if (!held_ids.empty()) {
      spdlog::info("source {}: {} of {} documents held out ({} tokens), never trained on", src.name,
                   sr.heldout_documents, all, heldout.total());
    }
    spdlog::info("source {}: {} tokens ({:.2f} tokens/byte) in {} shard(s), {:.1f} s", src.name, sink.total(),
                 static_cast<double>(sink.total()) / std::max<int64_t>(1, sr.raw_bytes), sink.shards().size(),
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - t_src).count());
  }
  sr.tokens = entry["tokens"];
  sr.shards = static_cast<int64_t>(entry["shards"].size());
  return entry;
}

// Stage 2's verdict: the whole directory is up to date (its report filled from the old manifest).
bool up_to_date(const keel::Config& config, const TextPlan& plan, const PreviousPreparation& previous,
                const PrepareOptions& options, PrepareReport& report) {
  const json& old_manifest = previous.manifest;
  if (options.force || !old_manifest.is_object() || old_manifest.value("fingerprint", json()) != plan.fingerprint ||
      !fs::exists(config.data.dir + "/tokenizer.model")) {
    return false;
  }
  for (const json* s : previous.sources)
    if (s == nullptr) return false;
  report.up_to_date = true;
  report.eos_id = old_manifest["eos_id"].get<int32_t>();
  for (const auto& s : old_manifest["sources"]) {
    report.sources.push_back({s["name"], static_cast<int64_t>(s["files"].size()), s["documents"], s["raw_bytes"],
                              s["tokens"], static_cast<int64_t>(s["shards"].size()), true});
  }
  return true;
}

// The tokenizer's pieces must fit model.vocab: more is refused naming both numbers; fewer leaves embedding rows no
// token uses (padding rows), which prepare states.
void check_tokenizer_fits(const keel::Config& config, const Tokenizer& tokenizer) {
  const std::string what = config.data.tokenizer.empty() ? tokenizer.path() : "data.tokenizer " + config.data.tokenizer;
  if (tokenizer.vocab_size() > config.model.vocab) {
    throw DataError(what + ": tokenizer has " + std::to_string(tokenizer.vocab_size()) +
                    " pieces, more than model.vocab = " + std::to_string(config.model.vocab) +
                    ": set model.vocab to at least " + std::to_string(tokenizer.vocab_size()));
  }
  if (config.data.add_bos && tokenizer.bos_id() < 0)
    throw DataError(what + ": data.add_bos = true but the tokenizer has no BOS piece");
  if (!config.data.tokenizer.empty() && tokenizer.vocab_size() < config.model.vocab) {
    spdlog::info(
        "model.vocab = {} but the tokenizer has {} pieces: {} padding rows (embedding and output rows no "
        "token id uses)",
        config.model.vocab, tokenizer.vocab_size(), config.model.vocab - tokenizer.vocab_size());
  }
}

// prepared.json's "tokenizer": the file, its size, fingerprint (an external one's SHA-256), special ids.
json tokenizer_entry(const keel::Config& config, const Tokenizer& tokenizer, const TextPlan& plan) {
  json entry = {{"file", "tokenizer.model"}, {"pieces", tokenizer.vocab_size()}, {"fingerprint", plan.tokenizer_fp}};
  if (!config.data.tokenizer.empty()) {
    entry["external"] = config.data.tokenizer;
    entry["sha256"] = plan.tokenizer_fp;
    entry["padding_rows"] = config.model.vocab - tokenizer.vocab_size();
  }
  if (!config.data.tokenizer.empty() || config.data.add_bos) {
    entry["bos_id"] = tokenizer.bos_id();
    entry["eos_id"] = tokenizer.eos_id();
    entry["pad_id"] = tokenizer.pad_id();
    entry["add_bos"] = config.data.add_bos;
  }
  return entry;
}

PrepareReport prepare_text(const keel::Config& config, const PrepareOptions& options, const std::string& config_name) {
  const auto t0 = std::chrono::steady_clock::now();
  const std::string dir = config.data.dir;
  PrepareReport report;
  report.dir = dir;
  report.vocab = config.model.vocab;

  // 1. Inputs and fingerprints.
  const TextPlan plan = plan_text_sources(config, config_name);
  report.fingerprint = plan.fingerprint;

  // 2. Up to date? Something other than a file in the place of a file prepare writes is refused first, before
  // anything is read or written (a FIFO would block the read; a rename would replace it).
  const std::string manifest_path = dir + "/prepared.json";
  for (const auto& path :
       {manifest_path, dir + "/tokenizer.model", dir + "/tokenizer.json", dir + "/tokenizer.vocab"}) {
    refuse_non_regular(path);
  }
  PreviousPreparation previous;
  find_reusable_sources(config, plan, manifest_path, options, previous);
  if (up_to_date(config, plan, previous, options, report)) {
    report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    spdlog::info("data in {} is up to date (fingerprint {}): nothing to do", dir, report.fingerprint);
    return report;
  }
  fs::create_directories(dir);

  // 3. Documents (only where needed) and tokenizer.
  std::vector<const json*> reused;
  std::vector<SourceDocs> docs;
  report.tokenizer_trained = prepare_tokenizer(config, plan, previous, options, reused, docs);
  const std::string model_path = dir + "/tokenizer.model";
  const Tokenizer tokenizer(model_path);
  check_tokenizer_fits(config, tokenizer);
  report.eos_id = tokenizer.eos_id();

  // 4. Shards, per source.
  json manifest = {{"format", "keel-prepared-data"},
                   {"format_version", kPreparedFormatVersion},
                   {"keel_version", KEEL_VERSION},
                   {"fingerprint", report.fingerprint},
                   {"vocab", config.model.vocab},
                   {"eos_id", tokenizer.eos_id()},
                   {"tokenizer", tokenizer_entry(config, tokenizer, plan)},
                   {"shard_max_tokens", kShardMaxTokens},
                   {"sources", json::array()}};
  for (size_t i = 0; i < config.data.sources.size(); ++i) {
    PrepareSourceReport sr;
    manifest["sources"].push_back(prepare_source_shards(config, i, plan, reused[i], docs[i], tokenizer, sr));
    report.sources.push_back(sr);
  }

  // 5. The commit record, last.
  write_text_atomically(manifest_path, manifest.dump(2) + "\n");
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  spdlog::info("prepared {} (fingerprint {}) in {:.1f} s", manifest_path, report.fingerprint, report.seconds);
  return report;
}

}  // namespace

PrepareReport prepare_data(const keel::Config& config, const PrepareOptions& options) {
  const auto& data = config.data;
  const std::string config_name = config.source_file.empty() ? "<config>" : config.source_file;
  if (data.sources.empty()) {
    throw DataError(config_name + ": no data sources configured (add [source.NAME] sections)");
  }
  // Pre-tokenized sources carry another tokenizer's ids: a directory is all text or all pre-tokenized.
  const auto pre = std::find_if(data.sources.begin(), data.sources.end(), is_pretokenized);
  if (pre == data.sources.end()) return prepare_text(config, options, config_name);
  const auto text = std::find_if_not(data.sources.begin(), data.sources.end(), is_pretokenized);
  if (text != data.sources.end()) {
    throw DataError(config_name + ": source " + pre->name + " (format " + pre->format + ") and source " + text->name +
                    " (format text) do not share a tokenizer: Keel trains its own for text sources, " + pre->name +
                    " holds ids of the tokenizer it was made with; prepare them in separate data.dir");
  }
  return prepare_pretokenized(config, options);
}

}  // namespace keel::data
