#!/usr/bin/env bash
# Why: the lent GPU machines have CUDA, PyTorch (its LibTorch) and CMake, but none of Keel's other build
# dependencies and no network. This packs, from this Debian 12 machine, exactly what a CUDA build of Keel needs
# besides LibTorch into one archive that travels with the checkout (bench/gpu/build.sh unpacks it there):
# headers (Boost pruned to the headers Keel's sources reach), the shared/static libraries and their CMake/pkg-config
# files in the /usr layout, the runtime closure of those libraries (glibc and libstdc++ excluded: the GPU machine's
# own are newer), and pkgconf. On a GPU machine with a package manager, install the packages of
# scripts/setup.sh instead and skip this.
# usage: bash bench/gpu/pack_deps.sh [OUT (default .gpudeps/keel-gpu-deps.tar.xz)]
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-.gpudeps/keel-gpu-deps.tar.xz}
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root=$stage/root
lib=usr/lib/x86_64-linux-gnu
mkdir -p "$root/usr/include" "$root/$lib" "$root/runtime" "$root/usr/bin" "$root/usr/share"

copy() { (cd / && shopt -s nullglob && for pattern in "$@"; do
  # shellcheck disable=SC2206  # the pattern is meant to glob
  matches=($pattern); [ ${#matches[@]} -gt 0 ] || { echo "pack_deps: nothing matches /$pattern" >&2; exit 1; }
  cp -a --parents "${matches[@]}" "$root/"; done); }   # keeps the /usr layout and symlinks

# Headers: whole trees, except Boost, which is cut down to what Keel's sources include (g++ -M).
copy usr/include/hdf5 usr/include/spdlog usr/include/fmt usr/include/nlohmann usr/include/gtest usr/include/gmock \
     usr/include/sentencepiece_processor.h usr/include/sentencepiece_trainer.h
# OpenSSL (libcrypto, SHA-256): its per-architecture headers go beside the others, so one include dir suffices.
copy usr/include/openssl
cp -a /usr/include/x86_64-linux-gnu/openssl/. "$root/usr/include/openssl/"
probe=$stage/probe.cpp
grep -rhoE '#include <boost/[^>]+>' core sdk tests plugins | sort -u > "$probe"
# shellcheck disable=SC1003,SC2020  # tr: spaces and backslashes both become newlines
g++ -std=c++17 -M -MT x "$probe" | tr ' \\' '\n\n' | grep '^/usr/include/boost/' | sort -u | sed 's|^/||' > "$stage/boost.txt"
(cd / && tar cf - -T "$stage/boost.txt") | (cd "$root" && tar xf -)
echo "boost headers kept: $(wc -l < "$stage/boost.txt")"

# Libraries, their CMake packages and pkg-config files.
copy "$lib/libhdf5_serial.so*" $lib/hdf5/serial "$lib/libboost_program_options.so*" "$lib/libboost_filesystem.so*" \
     "$lib/libspdlog.so*" "$lib/libfmt.so*" "$lib/libsentencepiece*.so*" "$lib/libgtest*.a" "$lib/libgmock*.a" \
     "$lib/libcrypto.so*" \
     $lib/cmake/Boost-1.74.0 $lib/cmake/BoostDetectToolset-1.74.0.cmake $lib/cmake/boost_headers-1.74.0 \
     $lib/cmake/boost_program_options-1.74.0 $lib/cmake/boost_filesystem-1.74.0 $lib/cmake/boost_system-1.74.0 \
     $lib/cmake/GTest $lib/cmake/spdlog $lib/cmake/fmt usr/share/cmake/nlohmann_json $lib/pkgconfig/sentencepiece.pc
# The runtime closure of those libraries, minus the C/C++ runtime every Linux has.
for so in $lib/libhdf5_serial.so $lib/libboost_program_options.so $lib/libboost_filesystem.so $lib/libspdlog.so \
          $lib/libfmt.so $lib/libsentencepiece.so $lib/libsentencepiece_train.so; do
  ldd "/$so" | awk '$3 ~ /^\// {print $3}'
done | sort -u | grep -vE '/(libc|libm|libpthread|libdl|librt|libstdc\+\+|libgcc_s|ld-linux-x86-64)\.so' |
  while read -r dep; do cp -L "$dep" "$root/runtime/"; done
# pkgconf (CMake's FindPkgConfig needs a pkg-config binary) and its library.
cp -L "$(command -v pkgconf)" "$root/usr/bin/pkg-config"
cp -L "$(ldd "$(command -v pkgconf)" | awk '/libpkgconf/ {print $3}')" "$root/runtime/"

mkdir -p "$(dirname "$out")"
tar -C "$stage" -cJf "$out" root
echo "wrote $out ($(du -h "$out" | cut -f1); unpacked $(du -sh "$root" | cut -f1))"
