// Why: a thin, deterministic wrapper over SentencePiece so the rest of Keel never sees its headers or its
// options. The training settings are fixed here (byte-level BPE with byte fallback, identity normalization,
// whitespace and newlines kept verbatim so code round-trips, EOS = id 1, no BOS, fixed seed and one thread)
// because they are part of the data format: change them and every prepared shard changes.
// SentencePiece itself never runs in a Keel process (its bundled protobuf clashes with LibTorch's): training,
// encoding and reading a model's pieces go through the small `keel-spm` tool (spm_tool/keel_spm.cpp); decoding
// is done here from the piece table.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace keel::data {

// Fixed special ids of every Keel tokenizer.
inline constexpr int32_t kUnkId = 0;
inline constexpr int32_t kEosId = 1;
// Bump when train_tokenizer's settings change (it is part of prepare's fingerprint).
inline constexpr int kTokenizerSettingsVersion = 1;

// Train a BPE tokenizer on the UTF-8 text in `text_file` and write `model_prefix.model` and
// `model_prefix.vocab`. The text is cut into training pieces of at most ~2 KiB at line breaks (newlines kept).
// If the text is too small to reach vocab_size, the model is smaller (a warning is logged).
// Throws DataError on failure.
void train_tokenizer(const std::string& text_file, const std::string& model_prefix, int64_t vocab_size);
// The same from documents held in memory (what `keel data prepare` uses).
void train_tokenizer(const std::vector<std::string>& documents, const std::string& model_prefix, int64_t vocab_size);

class Tokenizer {
 public:
  Tokenizer();
  explicit Tokenizer(const std::string& model_path);  // = Tokenizer() + load(model_path)
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

  // Load a SentencePiece model file. Throws DataError naming the path.
  void load(const std::string& model_path);
  bool loaded() const { return !pieces_.empty(); }
  const std::string& path() const { return path_; }

  // Thread-safe after load(). Encoding starts the keel-spm tool: encode many documents with encode_batch().
  std::vector<int32_t> encode(const std::string& text) const;
  std::vector<std::vector<int32_t>> encode_batch(const std::vector<std::string>& texts) const;
  std::string decode(const std::vector<int32_t>& ids) const;
  // One piece as text ("▁the", "<0x0A>", "</s>"), for show-batch.
  std::string id_to_piece(int32_t id) const;

  int64_t vocab_size() const;  // number of pieces in the model (<= the model's embedding vocab)
  int32_t eos_id() const;
  int32_t bos_id() const;  // -1 when the model has no BOS piece (Keel's own tokenizers)
  int32_t pad_id() const;  // -1 when the model has no PAD piece

 private:
  void require_loaded() const;

  // The model's pieces, read once at load() through the keel-spm tool (see spm_tool/keel_spm.cpp); decoding
  // and piece lookup are done here, encoding goes through the tool.
  std::vector<std::string> pieces_;
  std::vector<uint8_t> kind_;  // 0 normal, 1 control (decodes to nothing), 2 byte (<0xNN>)
  int32_t eos_id_ = -1;
  int32_t unk_id_ = 0;
  int32_t bos_id_ = -1;
  int32_t pad_id_ = -1;
  std::string path_;
};

}  // namespace keel::data
