#!/usr/bin/env bash
# Why: the CUDA build of Keel (CMake preset `cuda`) against the LibTorch inside this machine's PyTorch, with
# CUDA kernels and NCCL. Where the Debian packages of scripts/setup.sh cannot be installed (the lent GPU
# machines have no network), it uses the archive made by bench/gpu/pack_deps.sh if one was brought along, and
# writes .gpudeps/env.sh (library paths) for the commands that run the binaries.
# usage: bash bench/gpu/build.sh [TARGET...]   (default: keel keel_unit_tests)
# env: KEEL_CMAKE_ARGS (extra configure arguments), KEEL_BUILD_TOOL_ARGS (extra build-tool arguments).
set -euo pipefail
cd "$(dirname "$0")/../.."
torch_prefix=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')
prefix=$torch_prefix
extra=()
mkdir -p .gpudeps
: > .gpudeps/env.sh
if [ -f .gpudeps/keel-gpu-deps.tar.xz ]; then
  [ -d .gpudeps/root ] || tar -C .gpudeps -xJf .gpudeps/keel-gpu-deps.tar.xz
  deps=$PWD/.gpudeps/root
  mkdir -p "$deps/fallback"
  # Carried runtime libraries only where this machine lacks them (its own stay first).
  for f in "$deps"/runtime/*; do
    ldconfig -p | grep -q "^[[:space:]]*$(basename "$f") " || ln -sf "$f" "$deps/fallback/"
  done
  cat > .gpudeps/env.sh <<ENV
export PATH="$deps/usr/bin:\$PATH"
export PKG_CONFIG_PATH="$deps/usr/lib/x86_64-linux-gnu/pkgconfig" PKG_CONFIG_LIBDIR="$deps/usr/lib/x86_64-linux-gnu/pkgconfig"
export PKG_CONFIG_SYSROOT_DIR="$deps"
export LD_LIBRARY_PATH="$deps/usr/lib/x86_64-linux-gnu:$deps/fallback\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
ENV
  prefix="$torch_prefix;$deps/usr"
  extra+=(-DHDF5_ROOT="$deps/usr/lib/x86_64-linux-gnu/hdf5/serial" -DHDF5_NO_FIND_PACKAGE_CONFIG_FILE=ON)
fi
# shellcheck disable=SC1091
source .gpudeps/env.sh
# shellcheck disable=SC2086  # KEEL_CMAKE_ARGS is a list of arguments
cmake --preset cuda -DCMAKE_PREFIX_PATH="$prefix" "${extra[@]}" ${KEEL_CMAKE_ARGS:-}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(keel keel_unit_tests)
# KEEL_BUILD_TOOL_ARGS: passed to the build tool, e.g. "-k 0" (ninja: keep going, show every compile error).
# shellcheck disable=SC2086  # KEEL_BUILD_TOOL_ARGS is a list of arguments
cmake --build build-cuda --target "${targets[@]}" ${KEEL_BUILD_TOOL_ARGS:+-- $KEEL_BUILD_TOOL_ARGS}
