#!/usr/bin/env bash
# Builds gpunorm's browser page into target/web/: the wasm module of web/ (release), its
# JavaScript bindings (wasm-bindgen --target web) and the page itself. Serve the folder with any
# static server, for example `python3 -m http.server -d target/web 8000`, and open
# http://localhost:8000 in a browser with WebGPU.
#
# `--dev` builds the module with the dev profile instead (dependencies still optimised, see
# Cargo.toml), which reuses what the browser tests built: scripts/browser_test.sh uses it to
# check the page; its CPU timings are then not the release ones.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
if [ "${1:-}" = "--dev" ]; then
    profile=dev
fi
cargo build -p gpunorm-web --target wasm32-unknown-unknown --profile "$profile"
dir=$([ "$profile" = dev ] && echo debug || echo release)
out=target/web
rm -rf "$out"
mkdir -p "$out"
wasm-bindgen --target web --no-typescript --out-dir "$out/pkg" \
    "target/wasm32-unknown-unknown/$dir/gpunorm_web.wasm"
cp web/index.html web/main.js "$out/"
echo "built $out/ ($(du -sh "$out" | cut -f1))"
