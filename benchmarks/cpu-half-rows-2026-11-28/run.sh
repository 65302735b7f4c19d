#!/usr/bin/env bash
# The half-precision CPU rows before (commit 5a26f24) and after, alternated in one shell
# command, 2 threads. OLD and NEW are the two builds' target/release/gpunorm.
set -euo pipefail
date -u +"%Y-%m-%d %H:%M UTC"; nproc; grep -m1 "model name" /proc/cpuinfo || true
for round in 1 2 3; do
    for dtype in f16 bf16; do
        for bin in "$OLD" "$NEW"; do
            echo "== round $round, $dtype, $bin"
            "$bin" bench --cpu --threads 2 --dtype "$dtype" --ops layer_norm,rms_norm \
                --shapes 65536x1024,16384x4096 --reps 7 | grep -E "^  (copy|layer_norm|rms_norm) "
        done
    done
done
