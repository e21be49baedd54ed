#!/usr/bin/env bash
# Why: Keel hashes every checkpoint file (core/checkpoint/sha256.cpp), so its speed matters for large checkpoints.
# This builds bench/sha256_speed.cpp twice, against today's OpenSSL-backed sha256.cpp and against the hand-written
# FIPS 180-4 one Keel used until commit a2affa4 (taken from git history), hashes the same GIB GiB (a buffer in
# memory, then a file, which the page cache holds after it is written), and prints GiB/s of each, their ratio and
# `sha256sum` on the same file for reference. Both digests must agree. A benchmark, not a test.
# usage: bash bench/sha256.sh [GIB (default 1)]
set -euo pipefail
cd "$(dirname "$0")/.."
gib=${1:-1}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/old/core/checkpoint"
git show a2affa4:core/checkpoint/sha256.h > "$work/old/core/checkpoint/sha256.h"
git show a2affa4:core/checkpoint/sha256.cpp > "$work/old/core/checkpoint/sha256.cpp"
cp core/checkpoint/checkpoint_error.h "$work/old/core/checkpoint/"
flags=(-std=c++17 -O2 -DNDEBUG)  # the optimisation level of Keel's default RelWithDebInfo build
g++ "${flags[@]}" -I. bench/sha256_speed.cpp core/checkpoint/sha256.cpp -lcrypto -o "$work/new"
g++ "${flags[@]}" -I"$work/old" bench/sha256_speed.cpp "$work/old/core/checkpoint/sha256.cpp" -o "$work/old_bin"
new=$("$work/new" "$gib" "$work/data.bin")
old=$("$work/old_bin" "$gib" "$work/data.bin")
get() { sed -n "s/^$1=//p" <<< "$2"; }
[ "$(get digest "$new")" = "$(get digest "$old")" ] || { echo "sha256.sh: the two digests differ" >&2; exit 1; }
start=$(date +%s.%N)
sha256sum "$work/data.bin" > /dev/null
coreutils=$(python3 -c "import sys; print(f'{$gib / ($(date +%s.%N) - $start):.3f}')")
echo "machine:  $(uname -m), $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "cpu sha:  $(grep -qw sha_ni /proc/cpuinfo && echo 'sha_ni present' || echo 'no sha_ni')"
echo "data:     $gib GiB, $(date -u +%F), commit $(git rev-parse --short HEAD)"
printf '%-26s %10s %10s\n' "implementation" "memory" "file"
printf '%-26s %10s %10s GiB/s\n' "hand-written (until a2affa4)" "$(get memory_gib_per_s "$old")" "$(get file_gib_per_s "$old")"
printf '%-26s %10s %10s GiB/s\n' "OpenSSL EVP (libcrypto)" "$(get memory_gib_per_s "$new")" "$(get file_gib_per_s "$new")"
printf '%-26s %10s %10s GiB/s\n' "sha256sum (coreutils)" "" "$coreutils"
python3 -c "print(f'speed-up (memory): {$(get memory_gib_per_s "$new") / $(get memory_gib_per_s "$old"):.2f}x')"
