// Why: the two preparation paths — raw text tokenized by Keel (prepare.cpp) and pre-tokenized corpora read in
// place (pretokenized_source.cpp) — write the same commit record (DIR/prepared.json, last and atomically), name
// sources by the same rules and fingerprint their settings the same way. These few helpers are that shared
// ground; internal to core/data.
#pragma once

#include <cstdint>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>

#include "core/config/config.h"
#include "core/data/data_error.h"
#include "core/data/hash.h"
#include "core/io/file.h"
#include "core/io/regular_file.h"

namespace keel::data {
// The held-out share of a source whose source.NAME.heldout is absent (docs/data.md#the-held-out-split).
inline constexpr double kDefaultHeldoutShare = 0.01;
}  // namespace keel::data

namespace keel::data::detail {

inline std::string hex64(uint64_t h) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

inline std::string fingerprint_of(const nlohmann::json& j) { return hex64(fnv1a64(j.dump())); }

// Files of DIR that prepare rewrites by renaming over them: something other than a file there was not written by
// Keel, and is refused rather than replaced.
inline void refuse_non_regular(const std::string& path, const std::string& noun = "a regular file") {
  const std::string message = io::non_regular_error(path, noun);
  if (!message.empty()) throw DataError(message + ": Keel does not replace it; move it away and prepare again");
}

// core/io's atomic writer, with its error as a DataError ("PATH: REASON").
inline void write_text_atomically(const std::string& path, const std::string& text) {
  try {
    io::write_file_atomically(path, text);
  } catch (const io::FileError& e) {
    throw DataError(e.what());
  }
}

// The held-out setting's part of a source's fingerprint input (`effective`: effective_heldout of the source). Added
// only when not at the settings that existed before held-out sets, so earlier preparations stay up to date.
inline void add_heldout_fingerprint(nlohmann::json& fp_input, const keel::SourceConfig& source, double effective) {
  if (effective == 0.0) return;
  fp_input["heldout"] = source.heldout == -1.0 ? nlohmann::json("default") : nlohmann::json(effective);
  if (source.heldout == -1.0) fp_input["heldout_default_share"] = kDefaultHeldoutShare;
}

inline void check_source_name(const std::string& name) {
  const bool ok =
      !name.empty() && name != "." && name != ".." &&
      name.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-") == std::string::npos;
  if (!ok) throw DataError("source name '" + name + "' must be non-empty and use only [A-Za-z0-9_.-]");
}

}  // namespace keel::data::detail
