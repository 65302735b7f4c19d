#!/usr/bin/env bash
# SyncBatchNorm over MPI: builds examples/sync_batch_norm.rs with the `mpi` feature and runs it
# on 1, 2 and 4 ranks. Each run checks every rank's shard, forward and backward, against the
# whole batch in one process (the example exits non-zero past its tolerances) and checks that a
# bad shard on one rank is an error on every rank; rank 0's last line is its largest difference.
# Needs Debian's openmpi-bin, libopenmpi-dev and libclang-dev (.ci/run installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --features mpi --example sync_batch_norm
for ranks in 1 2 4; do
    echo "== $ranks rank(s)"
    timeout 300 mpirun --allow-run-as-root --oversubscribe -np "$ranks" \
        target/debug/examples/sync_batch_norm
done
