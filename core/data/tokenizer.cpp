// Why: see tokenizer.h. Training goes through SentencePiece's SentenceIterator so that documents can carry
// newlines (a line-per-sentence text file could not, and code would then spend a byte-fallback token on every
// '\n'). Each document is cut into pieces of at most kMaxPieceBytes at line breaks, because SentencePiece
// silently drops training sentences longer than max_sentence_length.
#include "core/data/tokenizer.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>
#include <spdlog/spdlog.h>

#include <fstream>
#include <mutex>
#include <sstream>
#include <string_view>

#include "core/data/data_error.h"

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

class VectorIterator : public sentencepiece::SentenceIterator {
 public:
  explicit VectorIterator(const std::vector<std::string>& sentences) : sentences_(sentences) {}
  bool done() const override { return index_ >= sentences_.size(); }
  void Next() override { ++index_; }
  const std::string& value() const override { return sentences_[index_]; }
  sentencepiece::util::Status status() const override { return {}; }

 private:
  const std::vector<std::string>& sentences_;
  size_t index_ = 0;
};

}  // namespace

void train_tokenizer(const std::vector<std::string>& documents, const std::string& model_prefix,
                     int64_t vocab_size) {
  std::vector<std::string> sentences;
  for (const auto& doc : documents) append_pieces(doc, sentences);
  if (sentences.empty()) throw DataError(model_prefix + ".model: cannot train a tokenizer on empty text");

  // The full option list is the tokenizer's definition; see kTokenizerSettingsVersion.
  std::ostringstream args;
  args << "--model_prefix=" << model_prefix << " --vocab_size=" << vocab_size
       << " --model_type=bpe"
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
  sentencepiece::SetRandomGeneratorSeed(20240101u);
  VectorIterator it(sentences);
  const auto status = sentencepiece::SentencePieceTrainer::Train(args.str(), &it);
  if (!status.ok()) {
    throw DataError(model_prefix + ".model: tokenizer training failed: " + status.ToString());
  }
  Tokenizer trained(model_prefix + ".model");
  if (trained.vocab_size() < vocab_size) {
    spdlog::warn("tokenizer {}.model has {} pieces, fewer than the requested vocab {} (too little text)",
                 model_prefix, trained.vocab_size(), vocab_size);
  }
}

void train_tokenizer(const std::string& text_file, const std::string& model_prefix, int64_t vocab_size) {
  std::ifstream f(text_file, std::ios::binary);
  if (!f) throw DataError(text_file + ": cannot open tokenizer training text");
  std::ostringstream text;
  text << f.rdbuf();
  train_tokenizer(std::vector<std::string>{text.str()}, model_prefix, vocab_size);
}

Tokenizer::Tokenizer() = default;
Tokenizer::Tokenizer(const std::string& model_path) { load(model_path); }
Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

void Tokenizer::load(const std::string& model_path) {
  auto processor = std::make_unique<sentencepiece::SentencePieceProcessor>();
  const auto status = processor->Load(model_path);
  if (!status.ok()) throw DataError(model_path + ": cannot load tokenizer: " + status.ToString());
  if (processor->eos_id() < 0) throw DataError(model_path + ": tokenizer has no EOS piece");
  processor_ = std::move(processor);
  path_ = model_path;
}

const sentencepiece::SentencePieceProcessor& Tokenizer::sp() const {
  if (!processor_) throw DataError("tokenizer used before load()");
  return *processor_;
}

std::vector<int32_t> Tokenizer::encode(const std::string& text) const {
  std::vector<int> ids;
  const auto status = sp().Encode(text, &ids);
  if (!status.ok()) throw DataError(path_ + ": encode failed: " + status.ToString());
  return std::vector<int32_t>(ids.begin(), ids.end());
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  std::vector<int> v(ids.begin(), ids.end());
  const int n = sp().GetPieceSize();
  for (int& id : v) {
    if (id < 0 || id >= n) id = kUnkId;  // ids past the tokenizer (padding of the model vocab) show as unk
  }
  std::string text;
  const auto status = sp().Decode(v, &text);
  if (!status.ok()) throw DataError(path_ + ": decode failed: " + status.ToString());
  return text;
}

std::string Tokenizer::id_to_piece(int32_t id) const {
  if (id < 0 || id >= sp().GetPieceSize()) return "<id " + std::to_string(id) + ">";
  return sp().IdToPiece(id);
}

int64_t Tokenizer::vocab_size() const { return sp().GetPieceSize(); }
int32_t Tokenizer::eos_id() const { return sp().eos_id(); }

}  // namespace keel::data
