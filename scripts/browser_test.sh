#!/usr/bin/env bash
# gpunorm in a real browser: installs what it needs (Debian's chromium and chromium-driver, the
# wasm32 target, wasm-bindgen-cli of the version in Cargo.lock), runs the wasm-bindgen tests of
# tests/web.rs in headless Chromium (WebGPU and the wasm CPU fallback, checked against the f64
# reference inside the browser), then builds the page of web/ and checks what it renders
# (scripts/page_test.py, which saves a screenshot to target/web-page.png). Exits non-zero on any
# failure. GPUNORM_REQUIRE_GPU=1 fails where the browser offers no WebGPU adapter.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y chromium chromium-driver
fi
rustup target add wasm32-unknown-unknown
# The test runner and the bindings generator must match the wasm-bindgen the crates link.
version=$(grep -A1 '^name = "wasm-bindgen"$' Cargo.lock | sed -n 's/^version = "\(.*\)"$/\1/p')
if [ "$(wasm-bindgen --version 2>/dev/null)" != "wasm-bindgen $version" ]; then
    cargo install wasm-bindgen-cli --version "$version"
fi

export CHROMEDRIVER=/usr/bin/chromedriver
export WASM_BINDGEN_TEST_WEBDRIVER_JSON=scripts/webdriver.json
export WASM_BINDGEN_TEST_TIMEOUT=300
export CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner
cargo test --target wasm32-unknown-unknown --test web

# The page in the dev profile: what the tests above built serves it, no release build.
bash scripts/build_web.sh --dev
python3 scripts/page_test.py
