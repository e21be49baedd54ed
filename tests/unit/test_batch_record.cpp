// Why: the per-step sample record rests on three small pieces that must be exactly right: the document index
// (which documents a token window covers), the /data/batch table in metrics.h5 (written with the step's row, read
// back by Keel and by h5py, a re-run step's later block winning), and the expected same-source share of two arms
// under the Gumbel-max coupling that `keel data compare-order` reports next to the observed one.
#include <gtest/gtest.h>
#include <hdf5.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/data/data_error.h"
#include "core/data/documents.h"
#include "core/data/run_order.h"
#include "core/metrics/metrics_reader.h"
#include "core/metrics/metrics_writer.h"
#include "test_support.h"

namespace fs = std::filesystem;
using keel::data::DataError;
using keel::data::DocSpan;
using keel::data::DocumentIndex;
using keel::testing::test_dir;

namespace {

// DIR/prepared.json with one source "prose" of `tokens` tokens whose documents start at `starts`.
std::string write_index_dir(const std::vector<int64_t>& starts, int64_t tokens, bool with_index = true) {
  const std::string dir = test_dir();
  fs::create_directories(dir + "/prose");
  nlohmann::json source = {{"name", "prose"}, {"tokens", tokens}};
  if (with_index) {
    keel::data::write_document_index(dir + "/prose/documents.bin", starts);
    source["document_index"] = {{"file", "prose/documents.bin"}, {"documents", starts.size()}};
  }
  std::ofstream(dir + "/prepared.json") << nlohmann::json{{"sources", {source}}}.dump();
  return dir;
}

void expect_span(const DocSpan& s, int64_t first, int64_t offset, int64_t n) {
  EXPECT_EQ(s.first_doc, first);
  EXPECT_EQ(s.first_doc_offset, offset);
  EXPECT_EQ(s.n_docs, n);
}

}  // namespace

TEST(DocumentIndex, MapsATokenWindowToTheDocumentsItCovers) {
  // Documents [0, 10), [10, 25), [25, 26), [26, 40).
  const std::string dir = write_index_dir({0, 10, 25, 26}, 40);
  const DocumentIndex index(dir, {"prose"});
  EXPECT_EQ(index.missing(), "");
  expect_span(index.span(0, 0, 5), 0, 0, 1);     // inside the first document
  expect_span(index.span(0, 5, 5), 0, 5, 1);     // ends exactly at its end (token 9 is its EOS)
  expect_span(index.span(0, 5, 6), 0, 5, 2);     // one token into the next
  expect_span(index.span(0, 10, 17), 1, 0, 3);   // starts on a boundary, covers the one-token document
  expect_span(index.span(0, 24, 16), 1, 14, 3);  // to the end of the stream
  EXPECT_EQ(index.document_start(0, 2), 25);
  EXPECT_EQ(index.document_start(0, 4), -1);
  // The file is plain little-endian int64 (numpy: np.fromfile(path, "<i8")).
  EXPECT_EQ(fs::file_size(dir + "/prose/documents.bin"), 4u * 8u);
}

TEST(DocumentIndex, DataWithoutAnIndexRecordsNoDocuments) {
  const std::string dir = write_index_dir({}, 40, /*with_index=*/false);
  const DocumentIndex index(dir, {"prose"});
  EXPECT_EQ(index.missing(), "prose");
  expect_span(index.span(0, 0, 5), -1, 0, 0);
}

TEST(DocumentIndex, ADamagedIndexIsRefusedNamingTheFileAndTheFix) {
  const std::string dir = write_index_dir({0, 10, 25}, 40);
  std::ofstream(dir + "/prose/documents.bin", std::ios::app) << "xyz";
  try {
    DocumentIndex index(dir, {"prose"});
    FAIL() << "no error";
  } catch (const DataError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find(dir + "/prose/documents.bin: document index is 27 bytes, expected 3 documents x 8"),
              std::string::npos)
        << what;
    EXPECT_NE(what.find("keel data prepare"), std::string::npos) << what;
  }
  const std::string unordered = write_index_dir({0, 30, 25}, 40);
  EXPECT_THROW(DocumentIndex(unordered, {"prose"}), DataError);
  const std::string past_end = write_index_dir({0, 50}, 40);
  EXPECT_THROW(DocumentIndex(past_end, {"prose"}), DataError);
}

TEST(BatchRecord, RowsAreWrittenWithTheirStepAndARerunStepsLaterBlockWins) {
  const std::string path = test_dir() + "/metrics.h5";
  auto row = [](int64_t step, int64_t sample_base) {
    keel::metrics::StepRow r;
    r.step = step;
    for (int64_t slot = 0; slot < 3; ++slot)
      r.batch.push_back({slot, slot % 2, sample_base + slot, 0, slot, 7 + slot, 2, 1 + slot});
    return r;
  };
  {
    keel::metrics::MetricsWriter writer(path, keel::metrics::OpenMode::kCreate, {}, {}, 2);
    keel::metrics::StepRow no_names = row(0, 0);
    EXPECT_THROW(writer.append(no_names), std::invalid_argument);  // set_batch_sources first
    writer.set_batch_sources({"prose", "code"});
    writer.append(row(0, 100));
    writer.append(row(1, 200));  // flush: steps 0 and 1
    writer.append(row(2, 300));
    writer.append(row(1, 400));  // a rollback re-runs step 1 with other samples
  }
  const keel::metrics::MetricsReader reader(path);
  EXPECT_EQ(reader.batch_sources(), (std::vector<std::string>{"prose", "code"}));
  const auto rows = reader.read_batch();
  ASSERT_EQ(rows.size(), 12u);
  EXPECT_EQ(rows[4].step, 1);
  EXPECT_EQ(rows[4].slot, 1);
  EXPECT_EQ(rows[4].source, 1);
  EXPECT_EQ(rows[4].sample_id, 201);
  EXPECT_EQ(rows[4].first_doc, 8);
  EXPECT_EQ(rows[4].first_doc_offset, 2);
  EXPECT_EQ(rows[4].n_docs, 2);
  const auto by_step = reader.read_batches_by_step();
  ASSERT_EQ(by_step.size(), 3u);
  ASSERT_EQ(by_step.at(1).size(), 3u);
  EXPECT_EQ(by_step.at(1)[0].sample_id, 400);  // the later block of step 1
  EXPECT_EQ(by_step.at(2)[2].sample_id, 302);
  EXPECT_EQ(reader.info("/data/batch").shape, (std::vector<int64_t>{12}));
  {  // Stored packed: 46 bytes a sample.
    const hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
    const hid_t dset = H5Dopen2(file, "/data/batch", H5P_DEFAULT);
    const hid_t type = H5Dget_type(dset);
    EXPECT_EQ(H5Tget_size(type), 46u);
    H5Tclose(type);
    H5Dclose(dset);
    H5Fclose(file);
  }

  // A resumed writer appends; one for other sources is refused by name.
  {
    keel::metrics::MetricsWriter writer(path, keel::metrics::OpenMode::kAppend, {}, {}, 1);
    writer.set_batch_sources({"prose", "code"});
    writer.append(row(3, 500));
  }
  EXPECT_EQ(keel::metrics::MetricsReader(path).read_batch().size(), 15u);
  keel::metrics::MetricsWriter other(path, keel::metrics::OpenMode::kAppend, {}, {}, 1);
  try {
    other.set_batch_sources({"prose", "web"});
    FAIL() << "no error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("/data/batch records sources [prose,code] but this run has [prose,web]"),
              std::string::npos)
        << e.what();
  }
}

TEST(BatchRecord, ExpectedSameSourceShareUnderTheGumbelCoupling) {
  using keel::data::expected_same_source_share;
  EXPECT_NEAR(expected_same_source_share({0.5, 0.5}, {0.3, 0.7}), 0.8, 1e-12);
  EXPECT_NEAR(expected_same_source_share({5, 5}, {3, 7}), 0.8, 1e-12);  // unnormalized weights
  EXPECT_NEAR(expected_same_source_share({0.2, 0.3, 0.5}, {0.2, 0.3, 0.5}), 1.0, 1e-12);
  EXPECT_EQ(expected_same_source_share({1, 0}, {0, 1}), 0.0);
  // Independent of the order of the sources; between (1 - TV) / (1 + TV) and 1 - TV (total variation 0.2 here).
  const double abc = expected_same_source_share({0.2, 0.3, 0.5}, {0.4, 0.3, 0.3});
  EXPECT_NEAR(expected_same_source_share({0.5, 0.2, 0.3}, {0.3, 0.4, 0.3}), abc, 1e-12);
  EXPECT_NEAR(abc, 0.75, 1e-12);
  EXPECT_GE(abc, 0.8 / 1.2);
  EXPECT_LE(abc, 0.8);
}
