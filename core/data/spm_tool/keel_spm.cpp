// Why: libsentencepiece (Debian 0.1.97) embeds protobuf-lite 3.14 and exports its symbols, while LibTorch
// loads the system libprotobuf 3.21. In one process the two runtimes' symbols interpose: the process crashes in
// static initialisers, or protobuf's version check aborts, and dlopen(RTLD_DEEPBIND) breaks libstdc++'s
// iostreams instead. So SentencePiece runs in this small tool, linked with nothing of LibTorch, which keel
// starts for the two heavy operations (training, batch encoding). Files use spm_tool/record_io.h records.
//   keel-spm train FLAGS SENTENCES SEED   train a model (FLAGS are SentencePiece trainer flags)
//   keel-spm encode MODEL DOCS OUT        one record of int32 ids per document
//   keel-spm pieces MODEL OUT             record 0: "eos_id unk_id bos_id pad_id" (-1: none), then one record
//                                         per piece, in id order
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <string>

#include "core/data/spm_tool/record_io.h"

namespace {

using keel::data::spm_io::read_record;
using File = std::unique_ptr<std::FILE, int (*)(std::FILE*)>;

File open_file(const std::string& path, const char* mode) {
  File f(std::fopen(path.c_str(), mode), &std::fclose);
  if (!f) throw std::runtime_error(path + ": cannot open");
  return f;
}

class RecordIterator : public sentencepiece::SentenceIterator {
 public:
  explicit RecordIterator(std::FILE* f) : f_(f) { Next(); }
  bool done() const override { return done_; }
  void Next() override { done_ = !read_record(f_, value_); }
  const std::string& value() const override { return value_; }
  sentencepiece::util::Status status() const override { return {}; }

 private:
  std::FILE* f_;
  std::string value_;
  bool done_ = false;
};

void load(sentencepiece::SentencePieceProcessor& sp, const std::string& path) {
  const auto status = sp.Load(path);
  if (!status.ok()) throw std::runtime_error(path + ": " + status.ToString());
}

int run(int argc, char** argv) {
  const std::string command = argc > 1 ? argv[1] : "";
  if (command == "train" && argc == 5) {
    File flags = open_file(argv[2], "rb");
    std::string flag_text;
    read_record(flags.get(), flag_text);
    File sentences = open_file(argv[3], "rb");
    sentencepiece::SetRandomGeneratorSeed(static_cast<unsigned int>(std::strtoul(argv[4], nullptr, 10)));
    RecordIterator it(sentences.get());
    const auto status = sentencepiece::SentencePieceTrainer::Train(flag_text, &it);
    if (!status.ok()) throw std::runtime_error(status.ToString());
    return 0;
  }
  if (command == "encode" && argc == 5) {
    sentencepiece::SentencePieceProcessor sp;
    load(sp, argv[2]);
    File docs = open_file(argv[3], "rb");
    File out = open_file(argv[4], "wb");
    std::string doc;
    std::vector<int> ids;
    while (read_record(docs.get(), doc)) {
      const auto status = sp.Encode(doc, &ids);
      if (!status.ok()) throw std::runtime_error(status.ToString());
      keel::data::spm_io::write_ids(out.get(), std::vector<int32_t>(ids.begin(), ids.end()));
    }
    return 0;
  }
  if (command == "pieces" && argc == 4) {
    sentencepiece::SentencePieceProcessor sp;
    load(sp, argv[2]);
    File out = open_file(argv[3], "wb");
    keel::data::spm_io::write_string(out.get(), std::to_string(sp.eos_id()) + " " + std::to_string(sp.unk_id()) + " " +
                                                    std::to_string(sp.bos_id()) + " " + std::to_string(sp.pad_id()));
    for (int id = 0; id < sp.GetPieceSize(); ++id) {
      std::string piece = sp.IdToPiece(id);
      if (sp.IsControl(id))
        piece = "\x01" + piece;  // marked: decodes to nothing
      else if (sp.IsByte(id))
        piece = "\x02" + piece;  // marked: <0xNN> decodes to that byte
      keel::data::spm_io::write_string(out.get(), piece);
    }
    return 0;
  }
  std::cerr << "usage: keel-spm train FLAGS SENTENCES SEED | encode MODEL DOCS OUT | pieces MODEL OUT\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "keel-spm: " << e.what() << "\n";
    return 1;
  }
}
