#!/usr/bin/env bash
# Why: one formatting for every C++/CUDA file (.clang-format, clang-format 14), checked by the test command so
# that a change cannot land unformatted. `bash scripts/format.sh` rewrites the files in place; `--check` lists
# the files that differ and exits 1 (what scripts/test.sh runs first, before the half-hour build).
set -euo pipefail
cd "$(dirname "$0")/.."
clang_format=$(command -v clang-format-14 || command -v clang-format || true)
if [ -z "$clang_format" ]; then
  echo "format: clang-format 14 not found (scripts/setup.sh installs it)" >&2
  exit 1
fi
mapfile -t files < <(git ls-files '*.cpp' '*.h' '*.cu' '*.cuh')
if [ "${1:-}" = "--check" ]; then
  bad=()
  for f in "${files[@]}"; do
    "$clang_format" --dry-run -Werror "$f" >/dev/null 2>&1 || bad+=("$f")
  done
  if [ ${#bad[@]} -gt 0 ]; then
    echo "format: ${#bad[@]} file(s) differ from .clang-format (fix with: bash scripts/format.sh):" >&2
    printf '  %s\n' "${bad[@]}" >&2
    exit 1
  fi
  echo "format: all ${#files[@]} C++/CUDA files match .clang-format"
else
  "$clang_format" -i "${files[@]}"
fi
