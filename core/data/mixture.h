// Why: the three small languages of the data config — mixture weights ("prose=0.7,code=0.3"), staged
// schedules ("0:prose=0.7,code=0.3;500:prose=0.3,code=0.7") and skip lists ("prose:chunk:3;code:samples:100-200")
// — are parsed in one place, against the list of prepared sources, with errors that name the key and the bad
// part. Stages and rules carry the step from which they apply, so that changes made mid-run (a plugin, or a
// resumed branch with another mixture) become part of the ledger and every batch stays reconstructible.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace keel::data {

// From step `from_step` on (until the next stage), source i is picked with probability weights[i] / sum.
struct MixtureStage {
  int64_t from_step = 0;
  std::vector<double> weights;  // one per source, in prepared order; >= 0, sum > 0
  std::string origin;           // "data.mixture", "data.schedule", "proportional", "set_mixture", ...
};

// Samples matched by a rule are passed over by the source's cursor at steps [from_step, to_step).
struct SkipRule {
  enum class Kind { kChunk, kSamples };
  int32_t source = 0;
  Kind kind = Kind::kChunk;
  int64_t first = 0;  // chunk index or (unpermuted) sample id, inclusive
  int64_t last = 0;   // inclusive
  int64_t from_step = 0;
  int64_t to_step = -1;  // exclusive; -1 = forever
  std::string spec;      // canonical text "prose:chunk:3-5"
  std::string origin;    // who added it: "data.skip" (the config), "rollback at step 13 by rollback_skip", ...
  bool active_at(int64_t step) const { return step >= from_step && (to_step < 0 || step < to_step); }
};

// "prose=0.7,code=0.3" → weights by source index; sources not named get 0. Throws DataError naming `origin`.
std::vector<double> parse_weights(const std::string& text, const std::vector<std::string>& sources,
                                  const std::string& origin);
// "0:prose=0.7,code=0.3;500:prose=0.3" → stages sorted by from_step (duplicates rejected).
std::vector<MixtureStage> parse_schedule(const std::string& text, const std::vector<std::string>& sources,
                                         const std::string& origin);
// "prose:chunk:3;prose:chunk:10-12;code:samples:100-200" → rules applying from `from_step`, with origin `origin`.
std::vector<SkipRule> parse_skip(const std::string& text, const std::vector<std::string>& sources, int64_t from_step,
                                 const std::string& origin);
// The weights as text again: "prose=0.7,code=0.3".
std::string format_weights(const std::vector<double>& weights, const std::vector<std::string>& sources);

}  // namespace keel::data
