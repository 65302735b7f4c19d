#!/usr/bin/env bash
# Readies .device/ for scripts/h100.sh: the release binaries and the f16 PyTorch anchor
# (../shared/device/prepare.sh), the binaries stripped so that they travel light, and the GPU test
# binaries, built in release, stripped and gzipped.
set -euo pipefail
cd "$(dirname "$0")/.."
../shared/device/prepare.sh scripts/torch_half_anchor.py
strip .device/gpunorm
mkdir -p .device/tests
cargo test --release --no-run --workspace --message-format=json 2>/dev/null |
    grep -o '"executable":"[^"]*"' | cut -d'"' -f4 |
    grep -E '/(gpunorm|layer_norm|rms_norm|backward|add_norm|batch_norm|gpu_tensor|half|sync_batch_norm|device_limits|backend_choice|properties)-' |
    while read -r bin; do
        name=$(basename "$bin")
        strip -o ".device/tests/$name" "$bin"
        gzip -f ".device/tests/$name"
    done
du -sh .device .device/tests
