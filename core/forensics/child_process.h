// Why: `keel verify`, `keel forensics` and `keel tournament` all replay training as child `keel resume` (or
// `keel launch`) processes with their output in a log, and report a failed child with the end of that log. One
// copy of starting, waiting for and summarising such a child. Plain POSIX: no LibTorch.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <string>
#include <vector>

namespace keel::forensics {

// Starts argv (argv[0] a path, no shell) with stdout and stderr into `log` (truncated); returns its pid.
// Throws std::runtime_error("cannot start WHAT: fork failed").
pid_t start_child(const std::vector<std::string>& argv, const std::string& log, const std::string& what);
// The exit status a waitpid() status stands for: the code, or 128 + signal when the child was killed.
int exit_status_of(int wait_status);
// start_child, then waits for it: its exit status.
int run_child(const std::vector<std::string>& argv, const std::string& log, const std::string& what);
// The last `n` lines of a text file, each on a new line after `indent` ("" when it cannot be read).
std::string last_lines(const std::string& path, size_t n, const std::string& indent = "  ");

}  // namespace keel::forensics
