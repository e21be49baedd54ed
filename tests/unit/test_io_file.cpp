// Why: core/io/file.h is the one atomic file writer (checkpoints, configs, eval results, report pages). These
// tests pin its promises: the old file or the whole new one, an existing file kept when asked (link, not rename),
// no temporary file left behind on failure, and errors that name the final path, not the temporary one.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>

#include "core/io/file.h"
#include "test_support.h"

namespace {

namespace fs = std::filesystem;
using keel::io::FileError;
using keel::io::IfExists;

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// Files in `dir` other than `keep` (temporary debris).
int others_in(const std::string& dir, const std::string& keep) {
  int n = 0;
  for (const auto& e : fs::directory_iterator(dir)) n += e.path().filename() != keep;
  return n;
}

TEST(IoFile, WriteReplacesByDefaultAndLeavesNoTemporary) {
  const std::string dir = keel::testing::test_dir();
  const std::string path = dir + "/a.txt";
  keel::io::write_file_atomically(path, "old");
  keel::io::write_file_atomically(path, "new contents");
  EXPECT_EQ(slurp(path), "new contents");
  EXPECT_EQ(others_in(dir, "a.txt"), 0);
}

TEST(IoFile, KeepNeverReplacesAnExistingFileAndNamesIt) {
  const std::string dir = keel::testing::test_dir();
  const std::string path = dir + "/once.h5";
  keel::io::write_file_atomically(path, "first", IfExists::kKeep);
  EXPECT_EQ(slurp(path), "first");
  try {
    keel::io::write_file_atomically(path, "second", IfExists::kKeep);
    FAIL() << "an existing file was replaced";
  } catch (const FileError& e) {
    EXPECT_EQ(e.path(), path);
    EXPECT_EQ(std::string(e.what()), path + ": it appeared meanwhile (not replaced)");
  }
  EXPECT_EQ(slurp(path), "first");
  EXPECT_EQ(others_in(dir, "once.h5"), 0);
}

TEST(IoFile, AFailingWriterLeavesNothingAndItsMessageNamesThePathNotTheTemporary) {
  const std::string dir = keel::testing::test_dir();
  const std::string path = dir + "/out.bin";
  try {
    keel::io::write_atomically(path, [](const std::string& tmp) {
      std::ofstream(tmp) << "partial";
      throw std::runtime_error(tmp + ": disk on fire");
    });
    FAIL() << "no error";
  } catch (const FileError& e) {
    EXPECT_EQ(std::string(e.what()), path + ": " + path + ": disk on fire");
    EXPECT_EQ(e.reason(), path + ": disk on fire");
  }
  EXPECT_FALSE(fs::exists(path));
  EXPECT_TRUE(fs::is_empty(dir));
}

TEST(IoFile, MissingDirectoryAndUnreadableFilesAreNamed) {
  const std::string dir = keel::testing::test_dir();
  const std::string path = dir + "/no/such/dir/x";
  try {
    keel::io::write_file_atomically(path, "x");
    FAIL() << "no error";
  } catch (const FileError& e) {
    EXPECT_EQ(std::string(e.what()), path + ": No such file or directory");
  }
  EXPECT_THROW(keel::io::read_small_file(dir + "/missing"), FileError);
  keel::io::write_file_atomically(dir + "/big", std::string(100, 'x'));
  try {
    keel::io::read_small_file(dir + "/big", 10);
    FAIL() << "no error";
  } catch (const FileError& e) {
    EXPECT_EQ(std::string(e.what()), dir + "/big: 100 bytes, larger than expected");
  }
  EXPECT_EQ(keel::io::read_small_file(dir + "/big"), std::string(100, 'x'));
}

TEST(IoFile, RenameDurablyMovesAndNamesAFailure) {
  const std::string dir = keel::testing::test_dir();
  keel::io::write_file_atomically(dir + "/a", "A");
  keel::io::rename_durably(dir + "/a", dir + "/b");
  EXPECT_EQ(slurp(dir + "/b"), "A");
  EXPECT_FALSE(fs::exists(dir + "/a"));
  try {
    keel::io::rename_durably(dir + "/a", dir + "/c");
    FAIL() << "no error";
  } catch (const FileError& e) {
    EXPECT_EQ(std::string(e.what()), dir + "/a: cannot rename to " + dir + "/c: No such file or directory");
  }
}

}  // namespace
