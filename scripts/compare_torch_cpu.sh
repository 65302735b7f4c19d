#!/usr/bin/env bash
# Same-run comparison of gpunorm's CPU fallback with PyTorch's CPU kernels for the training ops
# (RMSNorm, the LayerNorm and RMSNorm backward passes through autograd, x + r then LayerNorm)
# and for f16 and bf16 LayerNorm and RMSNorm,
# both on 2 threads. Ratios only mean something within one run of this script.
#   scripts/compare_torch_cpu.sh [SHAPE ...]      e.g. scripts/compare_torch_cpu.sh 65536x1024
# Needs PyTorch: pip install torch numpy (PyPI's wheel brings its CUDA libraries, about 5 GB;
# TORCH_PYTHON names a python that has it, for example a virtual environment's).
set -euo pipefail
cd "$(dirname "$0")/.."
shapes=("$@")
[ ${#shapes[@]} -gt 0 ] || shapes=(65536x1024 16384x4096)
list=$(IFS=,; echo "${shapes[*]}")
python=${TORCH_PYTHON:-python3}
cargo build --release --quiet
date -u +"%Y-%m-%d %H:%M UTC"; nproc; grep -m1 "model name" /proc/cpuinfo || true
env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "$python" ../shared/anchors/torch_cpu_anchor.py "${shapes[@]}"
target/release/gpunorm bench --cpu --threads 2 --shapes "$list" \
    --ops layer_norm_alloc,rms_norm_alloc,layer_norm_backward_alloc,rms_norm_backward_alloc,add_layer_norm
for dtype in f16 bf16; do
    target/release/gpunorm bench --cpu --threads 2 --shapes "$list" --dtype "$dtype" \
        --ops layer_norm_alloc,layer_norm,rms_norm_alloc,rms_norm
done
