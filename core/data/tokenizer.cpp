// Why: see tokenizer.h. Training (in keel-spm) feeds SentencePiece through a SentenceIterator so documents can carry
// newlines (a line-per-sentence text file could not, and code would then spend a byte-fallback token on every
// '\n'). Each document is cut into pieces of at most kMaxPieceBytes at line breaks, because SentencePiece
// silently drops training sentences longer than max_sentence_length.
#include "core/data/tokenizer.h"

#include <spdlog/spdlog.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <mutex>
#include <sstream>
#include <string_view>
#include <utility>

#include "core/data/data_error.h"
#include "core/data/spm_tool/record_io.h"
#include "core/io/regular_file.h"

namespace keel::data {
namespace {

constexpr size_t kMaxPieceBytes = 2048;
constexpr size_t kMaxSentenceBytes = 4 * kMaxPieceBytes;  // SentencePiece's max_sentence_length (bytes)

// Cut `doc` into training sentences of <= kMaxPieceBytes, preferably just after a '\n'.
void append_pieces(std::string_view doc, std::vector<std::string>& out) {
  while (!doc.empty()) {
    size_t n = std::min(doc.size(), kMaxPieceBytes);
    if (n < doc.size()) {
      const size_t nl = doc.rfind('\n', n - 1);
      if (nl != std::string_view::npos && nl > 0) {
        n = nl + 1;
      } else {
        while (n > 1 && (static_cast<unsigned char>(doc[n]) & 0xC0) == 0x80) --n;  // keep UTF-8 whole
      }
    }
    std::string_view piece = doc.substr(0, n);
    // Whitespace-only pieces teach the model nothing and SentencePiece rejects empty sentences.
    if (piece.find_first_not_of(" \t\r\n") != std::string_view::npos) out.emplace_back(piece);
    doc.remove_prefix(n);
  }
}

// The keel-spm tool: $KEEL_SPM_TOOL, else beside the running binary, else the build tree's copy.
std::string spm_tool() {
  std::vector<std::string> candidates;
  if (const char* env = std::getenv("KEEL_SPM_TOOL")) candidates.emplace_back(env);
  std::error_code ec;
  const auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec) candidates.push_back((exe.parent_path() / "keel-spm").string());
#ifdef KEEL_SPM_TOOL_PATH
  candidates.emplace_back(KEEL_SPM_TOOL_PATH);
#endif
  for (const auto& path : candidates)
    if (::access(path.c_str(), X_OK) == 0) return path;
  std::string tried;
  for (const auto& path : candidates) tried += " " + path;
  throw DataError("cannot find the keel-spm tool (SentencePiece); tried:" + tried);
}

// A scratch directory for the files exchanged with keel-spm; removed when it goes out of scope.
struct ScratchDir {
  ScratchDir() {
    std::string pattern = (std::filesystem::temp_directory_path() / "keel-spm-XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) throw DataError("cannot create a temp dir for keel-spm");
    path = pattern;
  }
  ~ScratchDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string file(const std::string& name) const { return path + "/" + name; }
  std::string path;
};

// Runs keel-spm with `args` (no shell); throws DataError with its stderr when it fails.
void run_spm(const std::vector<std::string>& args, const ScratchDir& scratch, const std::string& what) {
  const std::string tool = spm_tool();
  const std::string err_path = scratch.file("stderr");
  const pid_t pid = ::fork();
  if (pid < 0) throw DataError(what + ": fork failed");
  if (pid == 0) {
    if (std::freopen(err_path.c_str(), "w", stderr) == nullptr) ::_exit(126);
    std::vector<char*> argv{const_cast<char*>(tool.c_str())};
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execv(tool.c_str(), argv.data());
    ::_exit(127);
  }
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return;
  std::ifstream err(err_path);
  std::string text((std::istreambuf_iterator<char>(err)), std::istreambuf_iterator<char>());
  while (!text.empty() && (text.back() == '\n' || text.back() == '\r')) text.pop_back();
  throw DataError(what + ": keel-spm failed (" +
                  (WIFEXITED(status) ? "exit " + std::to_string(WEXITSTATUS(status))
                                     : "signal " + std::to_string(WTERMSIG(status))) +
                  "): " + text);
}

std::unique_ptr<std::FILE, int (*)(std::FILE*)> open_file(const std::string& path, const char* mode) {
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> f(std::fopen(path.c_str(), mode), &std::fclose);
  if (!f) throw DataError(path + ": cannot open");
  return f;
}

}  // namespace

void train_tokenizer(const std::vector<std::string>& documents, const std::string& model_prefix, int64_t vocab_size) {
  std::vector<std::string> sentences;
  for (const auto& doc : documents) append_pieces(doc, sentences);
  if (sentences.empty()) throw DataError(model_prefix + ".model: cannot train a tokenizer on empty text");

  // The full option list is the tokenizer's definition; see kTokenizerSettingsVersion.
  std::ostringstream args;
  args << "--model_prefix=" << model_prefix << " --vocab_size=" << vocab_size << " --model_type=bpe"
       << " --byte_fallback=true"
       << " --character_coverage=0.9995"
       << " --normalization_rule_name=identity"
       << " --remove_extra_whitespaces=false"
       << " --add_dummy_prefix=false"
       << " --allow_whitespace_only_pieces=true"
       << " --split_digits=true"
       << " --max_sentence_length=" << kMaxSentenceBytes << " --input_sentence_size=0"
       << " --shuffle_input_sentence=false"
       << " --hard_vocab_limit=false"
       << " --unk_id=" << kUnkId << " --eos_id=" << kEosId << " --bos_id=-1 --pad_id=-1"
       << " --num_threads=1"
       << " --minloglevel=2";
  // SentencePiece's trainer and its random seed are process globals.
  static std::mutex train_mutex;
  std::lock_guard<std::mutex> lock(train_mutex);
  ScratchDir scratch;
  {
    auto flags = open_file(scratch.file("flags"), "wb");
    spm_io::write_string(flags.get(), args.str());
    auto input = open_file(scratch.file("sentences"), "wb");
    for (const auto& sentence : sentences) spm_io::write_string(input.get(), sentence);
  }
  try {
    run_spm({"train", scratch.file("flags"), scratch.file("sentences"), "20240101"}, scratch,
            model_prefix + ".model: tokenizer training");
  } catch (const DataError& e) {
    // SentencePiece keeps every character of the covered 99.95% of the text as a piece of its own; a corpus with
    // more distinct characters than that (many scripts at a small vocab) cannot fit. Say which key to change.
    if (std::string(e.what()).find("required_chars") == std::string::npos) throw;
    throw DataError(std::string(e.what()) +
                    " -- the text has more distinct characters than model.vocab = " + std::to_string(vocab_size) +
                    " leaves room for: raise model.vocab, or drop or narrow the source " + "with many scripts");
  }
  Tokenizer trained(model_prefix + ".model");
  if (trained.vocab_size() < vocab_size) {
    spdlog::warn("tokenizer {}.model has {} pieces, fewer than the requested vocab {} (too little text)", model_prefix,
                 trained.vocab_size(), vocab_size);
  }
}

void train_tokenizer(const std::string& text_file, const std::string& model_prefix, int64_t vocab_size) {
  train_tokenizer(std::vector<std::string>{io::read_regular_file<DataError>(text_file)}, model_prefix, vocab_size);
}

Tokenizer::Tokenizer() = default;
Tokenizer::Tokenizer(const std::string& model_path) { load(model_path); }
Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

void Tokenizer::load(const std::string& model_path) {
  if (!std::filesystem::exists(model_path)) throw DataError(model_path + ": cannot load tokenizer: file not found");
  io::require_regular_file<DataError>(model_path);  // keel-spm would wait on a FIFO forever
  ScratchDir scratch;
  run_spm({"pieces", model_path, scratch.file("pieces")}, scratch, model_path + ": cannot load tokenizer");
  auto in = open_file(scratch.file("pieces"), "rb");
  std::string record;
  if (!spm_io::read_record(in.get(), record)) throw DataError(model_path + ": cannot load tokenizer: no pieces");
  std::istringstream ids(record);
  int32_t eos = -1, unk = 0, bos = -1, pad = -1;
  ids >> eos >> unk >> bos >> pad;
  if (eos < 0) throw DataError(model_path + ": tokenizer has no EOS piece");
  std::vector<std::string> pieces;
  std::vector<uint8_t> kind;
  while (spm_io::read_record(in.get(), record)) {
    uint8_t k = 0;
    if (!record.empty() && (record[0] == '\x01' || record[0] == '\x02')) {
      k = static_cast<uint8_t>(record[0]);
      record.erase(0, 1);
    }
    pieces.push_back(record);
    kind.push_back(k);
  }
  pieces_ = std::move(pieces);
  kind_ = std::move(kind);
  eos_id_ = eos;
  unk_id_ = unk;
  bos_id_ = bos;
  pad_id_ = pad;
  path_ = model_path;
}

void Tokenizer::require_loaded() const {
  if (pieces_.empty()) throw DataError("tokenizer used before load()");
}

std::vector<std::vector<int32_t>> Tokenizer::encode_batch(const std::vector<std::string>& texts) const {
  require_loaded();
  ScratchDir scratch;
  {
    auto docs = open_file(scratch.file("docs"), "wb");
    for (const auto& text : texts) spm_io::write_string(docs.get(), text);
  }
  run_spm({"encode", path_, scratch.file("docs"), scratch.file("ids")}, scratch, path_ + ": encode");
  auto in = open_file(scratch.file("ids"), "rb");
  std::vector<std::vector<int32_t>> out;
  out.reserve(texts.size());
  std::string record;
  while (spm_io::read_record(in.get(), record)) out.push_back(spm_io::ids_of(record));
  if (out.size() != texts.size())
    throw DataError(path_ + ": encode returned " + std::to_string(out.size()) + " of " + std::to_string(texts.size()) +
                    " documents");
  return out;
}

std::vector<int32_t> Tokenizer::encode(const std::string& text) const { return encode_batch({text}).front(); }

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  require_loaded();
  static const std::string kSpace = "\xe2\x96\x81";  // U+2581, SentencePiece's whitespace mark
  std::string text;
  for (int32_t id : ids) {
    if (id < 0 || id >= static_cast<int32_t>(pieces_.size())) id = unk_id_;  // past the tokenizer: padding
    if (kind_[id] == 1) continue;
    if (kind_[id] == 2) {  // "<0xNN>"
      text.push_back(static_cast<char>(std::stoi(pieces_[id].substr(3, 2), nullptr, 16)));
      continue;
    }
    if (id == unk_id_) {
      text += " \xe2\x81\x87 ";  // SentencePiece renders unknown as " ⁇ "
      continue;
    }
    const std::string& piece = pieces_[id];
    for (size_t i = 0; i < piece.size();) {
      if (piece.compare(i, kSpace.size(), kSpace) == 0) {
        text.push_back(' ');
        i += kSpace.size();
      } else {
        text.push_back(piece[i++]);
      }
    }
  }
  return text;
}

std::string Tokenizer::id_to_piece(int32_t id) const {
  require_loaded();
  if (id < 0 || id >= static_cast<int32_t>(pieces_.size())) return "<id " + std::to_string(id) + ">";
  return pieces_[id];
}

int64_t Tokenizer::vocab_size() const {
  require_loaded();
  return static_cast<int64_t>(pieces_.size());
}
int32_t Tokenizer::eos_id() const {
  require_loaded();
  return eos_id_;
}

int32_t Tokenizer::bos_id() const {
  require_loaded();
  return bos_id_;
}
int32_t Tokenizer::pad_id() const {
  require_loaded();
  return pad_id_;
}

}  // namespace keel::data
