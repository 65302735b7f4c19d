#!/usr/bin/env bash
# Same-run comparison of gpunorm's CPU fallback with the CPU anchors (onnxruntime's
# LayerNormalization and BatchNormalization kernels, numpy's copy), on 2 threads, then the
# fallback on 1 thread for scaling. Ratios only mean something within one run of this script.
#   scripts/compare_cpu.sh [SHAPE ...]      e.g. scripts/compare_cpu.sh 65536x1024 16384x4096
# Needs: pip install numpy onnxruntime onnx; the anchors in ../shared/anchors beside the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
shapes=("$@")
[ ${#shapes[@]} -gt 0 ] || shapes=(4096x768 65536x1024 16384x4096 2048x32768)
list=$(IFS=,; echo "${shapes[*]}")
anchor=../shared/anchors/cpu_anchor.py
cargo build --release --quiet
date -u +"%Y-%m-%d %H:%M UTC"; nproc; grep -m1 "model name" /proc/cpuinfo || true
# OPENBLAS_* slow a current numpy down here (see the workplace notes); unset for the anchor only.
env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python3 "$anchor" "${shapes[@]}"
target/release/gpunorm bench --cpu --threads 2 --shapes "$list"
target/release/gpunorm bench --cpu --threads 1 --shapes "$list"
