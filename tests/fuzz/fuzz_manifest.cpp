// Why: manifest.json decides which files of a checkpoint are read and what their checksums must be, and it
// comes from disk (copied between clusters, edited by hand, truncated). This target feeds parse_manifest
// arbitrary bytes and checks:
//   - any input either parses or throws CheckpointError (never a crash, a sanitizer report or another exception);
//   - a manifest that parses keeps its promises: file names are plain names inside the directory (no '/', not
//     "..", not manifest.json), every rank in [0, world_size) has exactly one file, SHA-256 digests are 64 hex;
//   - manifest_to_json of a parsed manifest parses back to the same manifest.
#include <cstdio>
#include <cstdlib>
#include <string>

#include "core/checkpoint/checkpoint_error.h"
#include "core/checkpoint/manifest.h"

namespace {

using namespace keel::checkpoint;

[[noreturn]] void broken_promise(const char* what) {
  std::fprintf(stderr, "fuzz_manifest: %s\n", what);
  std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  Manifest m;
  try {
    m = parse_manifest(text, "fuzz/manifest.json");
  } catch (const CheckpointError&) {
    return 0;
  }
  int64_t rank_files = 0;
  for (const auto& f : m.files) {
    if (f.name.empty() || f.name.find('/') != std::string::npos || f.name == "." || f.name == ".." ||
        f.name == kManifestName)
      broken_promise("a file name escapes the checkpoint directory");
    if (f.sha256.size() != 64) broken_promise("a digest is not 64 hex characters");
    if (f.rank >= 0) {
      ++rank_files;
      if (f.rank >= m.layout.world_size()) broken_promise("a rank outside the layout");
    }
  }
  if (rank_files != m.layout.world_size()) broken_promise("rank files do not cover the layout");
  Manifest again;
  try {
    again = parse_manifest(manifest_to_json(m), "fuzz/round-trip");
  } catch (const CheckpointError&) {
    broken_promise("manifest_to_json wrote a manifest parse_manifest refuses");
  }
  if (again.step != m.step || again.files.size() != m.files.size() || again.model != m.model ||
      again.run_id != m.run_id || again.config_hash != m.config_hash)
    broken_promise("round trip changed the manifest");
  return 0;
}
