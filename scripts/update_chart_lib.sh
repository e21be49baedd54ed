#!/usr/bin/env bash
# Why: `keel report` inlines Apache ECharts into every page (no network at view time), so the library is
# vendored in core/report/vendor/echarts/ and embedded into the binary at build time. This script re-fetches
# it from the npm registry: the version pinned in core/report/vendor/package.json (or the one given), checks
# the tarball against the sha512 integrity the registry publishes (and, for the pinned version, against
# package-lock.json), and copies dist/echarts.min.js, LICENSE, NOTICE and the bundled third-party licence.
#   scripts/update_chart_lib.sh            re-fetch the pinned version (verifies the vendored copy is genuine)
#   scripts/update_chart_lib.sh 6.2.0      move to another version (then update package.json/-lock by hand or
#                                          with `npm install --package-lock-only` in core/report/vendor/)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
vendor="$root/core/report/vendor"
pinned="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["dependencies"]["echarts"])' "$vendor/package.json")"
version="${1:-$pinned}"
registry="${NPM_REGISTRY:-https://registry.npmjs.org}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

curl -fsSL "$registry/echarts/$version" -o "$work/meta.json"
read -r tarball integrity < <(python3 -c 'import json,sys; d=json.load(open(sys.argv[1]))["dist"]; print(d["tarball"], d["integrity"])' "$work/meta.json")
curl -fsSL "$tarball" -o "$work/echarts.tgz"
actual="sha512-$(openssl dgst -sha512 -binary "$work/echarts.tgz" | base64 -w0)"
if [[ "$actual" != "$integrity" ]]; then
  echo "update_chart_lib.sh: echarts-$version.tgz integrity $actual does not match the registry's $integrity" >&2
  exit 1
fi
if [[ "$version" == "$pinned" ]]; then
  locked="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["packages"]["node_modules/echarts"]["integrity"])' "$vendor/package-lock.json")"
  if [[ "$actual" != "$locked" ]]; then
    echo "update_chart_lib.sh: echarts-$version.tgz integrity $actual does not match package-lock.json's $locked" >&2
    exit 1
  fi
fi
tar -xzf "$work/echarts.tgz" -C "$work"
cp "$work/package/dist/echarts.min.js" "$work/package/LICENSE" "$work/package/NOTICE" "$vendor/echarts/"
cp "$work/package/licenses/LICENSE-d3" "$vendor/echarts/LICENSE-d3"
echo "vendored echarts $version ($actual) into $vendor/echarts/"
[[ "$version" == "$pinned" ]] || echo "now pin $version in $vendor/package.json and package-lock.json" >&2
