// Why: `keel control` and the running trainer talk through files in RUN_DIR/control/. This is the one place
// that defines that protocol, both sides of it:
//   - a request is `control/<microseconds>.request`, written atomically, with lines "swap SLOT=NAME_OR_PATH",
//     "arg NAME.KEY=VALUE" (repeatable) and optionally "at_step N" (apply at the boundary before step N);
//   - the trainer reads pending requests at each step boundary (rank 0, in name order), and renames a request
//     it applied to `.done`, or replaces one it refused with `.refused` holding the one-line reason.
// Torch-free.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace keel::train {

struct SwapRequest {
  std::string slot;               // "optimizer", "spike_handler", ...
  std::string plugin;             // a built-in name or a path to a .so
  std::vector<std::string> args;  // "NAME.KEY=VALUE", for [plugin.NAME]
  int64_t at_step = -1;           // -1: the next boundary
  // The config overrides that describe the swap: "plugins.SLOT=PLUGIN", "plugin.NAME.KEY=VALUE"...
  std::vector<std::string> overrides() const;
};

// The request file's text, and back. parse_swap_request throws std::runtime_error naming what is wrong (an
// unknown line is quoted only when it is short, printable text).
std::string format_swap_request(const SwapRequest& request);
SwapRequest parse_swap_request(const std::string& text);

// Writes `request` into CONTROL_DIR (created if needed) atomically; returns the request file's path.
std::string write_swap_request(const std::string& control_dir, const SwapRequest& request);

struct PendingRequest {
  std::string path;
  std::string text;
};
// Every `.request` in CONTROL_DIR, oldest first ({} when there is no such directory).
std::vector<PendingRequest> read_pending_requests(const std::string& control_dir);
// The trainer's answer: the request file becomes .done, or .refused with the reason.
void mark_request_done(const std::string& request_path);
void mark_request_refused(const std::string& request_path, const std::string& reason);

// What became of a request written by write_swap_request: nullopt while it is pending, else "done" or
// "refused: REASON".
std::optional<std::string> request_outcome(const std::string& request_path);

}  // namespace keel::train
