#!/usr/bin/env bash
# Why: one idempotent set-up step shared by the README's two commands: installs, from Debian's archive, every
# package Keel builds and runs with, and only those that are missing.
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config
  libtorch-dev libgloo-dev libopenblas0-pthread   # LibTorch 1.13 CPU + c10d Gloo; OpenBLAS (~30x faster fp32 matmul)
  libhdf5-dev hdf5-tools python3-h5py             # metrics; h5dump and h5py read them without Keel
  libssl-dev                                      # libcrypto: SHA-256 of checkpoint files (OpenSSL EVP)
  libspdlog-dev libfmt-dev
  libboost-dev libboost-program-options-dev libboost-filesystem-dev
  libgtest-dev libgmock-dev
  libsentencepiece-dev nlohmann-json3-dev
  sentencepiece                                   # spm_train: tests train an external tokenizer (data.tokenizer)
  fortunes fortunes-min python3                   # the bundled corpus: English prose + Python stdlib sources
  python3-torch                                   # bench/: the PyTorch reference run side by side
  clang libclang-rt-14-dev                        # scripts/fuzz.sh: libFuzzer targets (tests/fuzz/)
  clang-format                                    # scripts/format.sh --check (run first by scripts/test.sh)
  shellcheck                                      # bench/gpu/*.sh are checked (ctest gpu_build_shellcheck)
  chromium                                        # keel report's page is tested in headless Chromium
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#packages[@]} packages present"
  exit 0
fi
echo "setup: installing ${missing[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
