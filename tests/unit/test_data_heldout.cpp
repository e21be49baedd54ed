// Why: the held-out split's rule (how many documents, which ones) and the config keys of this feature
// (source.NAME.heldout, data.tokenizer, data.add_bos) are a contract: the counts are documented in
// docs/data.md, and a key at its default must leave config.ini (and so every existing run's config hash) as it was.
#include <gtest/gtest.h>

#include <string>

#include "core/config/config.h"
#include "core/data/data_error.h"
#include "core/data/prepare.h"

using keel::SourceConfig;
using keel::data::heldout_document_ids;
using keel::data::heldout_documents;

namespace {

SourceConfig source_with(double heldout, const std::string& format = "text") {
  SourceConfig s;
  s.name = "prose";
  s.format = format;
  s.heldout = heldout;
  return s;
}

keel::Config parse(const std::string& extra) {
  return keel::parse_config_text("[source.prose]\ninputs = /tmp\n" + extra, "test.ini");
}

std::string error_of(const std::string& extra) {
  try {
    parse(extra);
  } catch (const keel::ConfigError& e) {
    return e.what();
  }
  return "(accepted)";
}

}  // namespace

TEST(Heldout, CountsFractionsAndNone) {
  EXPECT_EQ(heldout_documents(source_with(0.0), 1000), 0);
  EXPECT_EQ(heldout_documents(source_with(7.0), 1000), 7);
  EXPECT_EQ(heldout_documents(source_with(0.05), 1000), 50);
  EXPECT_EQ(heldout_documents(source_with(0.05), 10), 1);         // a fraction rounds down, but holds out at least one
  EXPECT_EQ(heldout_documents(source_with(0.9), 2), 1);           // and never every document
  EXPECT_EQ(heldout_documents(source_with(0.05), 1), 0);          // one document: nothing to spare
  EXPECT_EQ(heldout_documents(source_with(5.0, "npy"), 100), 5);  // pre-tokenized sources: the same rule
}

TEST(Heldout, AbsentMeansTheDefaultShareOfOnePercentAtLeastOneDocument) {
  EXPECT_EQ(heldout_documents(source_with(-1.0), 13146), 131);
  EXPECT_EQ(heldout_documents(source_with(-1.0), 1000), 10);
  EXPECT_EQ(heldout_documents(source_with(-1.0), 150), 1);
  EXPECT_EQ(heldout_documents(source_with(-1.0), 2), 1);
  EXPECT_EQ(heldout_documents(source_with(-1.0), 1), 0);  // a single document is trained on, not held out
  EXPECT_EQ(heldout_documents(source_with(-1.0, "megatron"), 1000), 10);
}

TEST(Heldout, ACountThatLeavesNothingToTrainOnIsRefusedNamingTheKey) {
  try {
    heldout_documents(source_with(10.0), 10);
    FAIL() << "accepted";
  } catch (const keel::data::DataError& e) {
    EXPECT_NE(std::string(e.what()).find("source.prose.heldout = 10 but the source has 10 documents"),
              std::string::npos)
        << e.what();
  }
  EXPECT_THROW(heldout_documents(source_with(1.0), 1), keel::data::DataError);
}

TEST(Heldout, DocumentsAreSpreadEvenlyAndDeterministically) {
  EXPECT_EQ(heldout_document_ids(6, 60), (std::vector<int64_t>{5, 15, 25, 35, 45, 55}));
  EXPECT_EQ(heldout_document_ids(1, 2), (std::vector<int64_t>{1}));
  EXPECT_EQ(heldout_document_ids(3, 3), (std::vector<int64_t>{0, 1, 2}));
  EXPECT_TRUE(heldout_document_ids(0, 100).empty());
  const auto ids = heldout_document_ids(131, 13146);
  ASSERT_EQ(ids.size(), 131u);
  for (size_t i = 1; i < ids.size(); ++i) EXPECT_GT(ids[i], ids[i - 1]);
  EXPECT_LT(ids.back(), 13146);
}

TEST(Heldout, KeyIsParsedValidatedAndWrittenOnlyWhenSet) {
  EXPECT_EQ(parse("heldout = 25\n").data.sources.at(0).heldout, 25.0);
  EXPECT_EQ(parse("heldout = 0.02\n").data.sources.at(0).heldout, 0.02);
  EXPECT_EQ(parse("").data.sources.at(0).heldout, -1.0);
  EXPECT_EQ(keel::to_ini(parse("")).find("heldout"), std::string::npos);
  EXPECT_NE(keel::to_ini(parse("heldout = 0\n")).find("heldout = 0"), std::string::npos);
  const keel::Config round_trip = keel::parse_config_text(keel::to_ini(parse("heldout = 0.02\n")), "config.ini");
  EXPECT_EQ(round_trip.data.sources.at(0).heldout, 0.02);

  EXPECT_NE(error_of("heldout = 2.5\n").find("source.prose.heldout must be a document count"), std::string::npos);
  EXPECT_NE(error_of("heldout = -3\n").find("source.prose.heldout must be"), std::string::npos);
  EXPECT_EQ(parse("format = npy\nheldout = 5\n").data.sources.at(0).heldout, 5.0);  // every format has one
}

TEST(Heldout, TokenizerKeysAreWrittenOnlyWhenSetAndResolveRelativePaths) {
  const keel::Config plain = parse("");
  EXPECT_EQ(keel::to_ini(plain).find("tokenizer ="), std::string::npos);
  EXPECT_EQ(keel::to_ini(plain).find("add_bos"), std::string::npos);

  keel::Config c = keel::parse_config_text("[data]\ntokenizer = tok/llama.model\nadd_bos = true\n", "/x/run.ini");
  EXPECT_EQ(c.data.add_bos, true);
  const std::string ini = keel::to_ini(c);
  EXPECT_NE(ini.find("add_bos = true"), std::string::npos) << ini;
  EXPECT_NE(ini.find("tokenizer = "), std::string::npos) << ini;
  // [data] stays one section.
  EXPECT_EQ(ini.find("[data]"), ini.rfind("[data]"));
  EXPECT_EQ(keel::parse_config_text(ini, "config.ini").data.tokenizer, c.data.tokenizer);
  EXPECT_NE(error_of("[data]\nadd_bos = maybe\n").find("data.add_bos"), std::string::npos);
}
