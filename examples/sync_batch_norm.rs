//! SyncBatchNorm over MPI: every rank normalizes its shard of one batch, forward and backward,
//! with statistics merged across the ranks, and checks its shard against the whole batch done
//! in one process. Run it on every rank:
//!
//! ```sh
//! cargo build --features mpi --example sync_batch_norm
//! mpirun -np 4 target/debug/examples/sync_batch_norm
//! ```
//!
//! Rank 0 prints the merged statistics' largest relative difference from one process's, and
//! last, the largest over statistics, outputs and gradients: `max difference from one process:
//! <relative difference>`. It exits with an error where a difference passes its tolerance.

use gpunorm::mpi::{all_gather_grads, all_gather_stats};
use gpunorm::{BatchNorm, NormError, Normalizer};
use mpi::collective::SystemOperation;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator, CommunicatorCollectives, Root};

const ROWS: usize = 1001;
const FEATURES: usize = 48;

/// `n` values spread uniformly over mean ± spread, the same on every rank (xorshift).
fn data(n: usize, mean: f32, spread: f32, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let unit = (state >> 40) as f32 / (1u64 << 24) as f32;
            mean + spread * (2.0 * unit - 1.0)
        })
        .collect()
}

/// The largest |a − b| / max(|b|, floor) over two slices.
fn rel(a: &[f32], b: &[f32], floor: f32) -> f64 {
    a.iter()
        .zip(b)
        .map(|(a, b)| ((a - b).abs() / b.abs().max(floor)) as f64)
        .fold(0.0, f64::max)
}

fn main() -> Result<(), NormError> {
    let universe = gpunorm::mpi::initialize().expect("MPI initializes");
    let world = universe.world();
    let (rank, size) = (world.rank() as usize, world.size() as usize);
    let norm = Normalizer::new()?;

    // One deterministic batch: offset activations, a padded tail masked out.
    let x = data(ROWS * FEATURES, 100.0, 2.0, 1);
    let dy = data(ROWS * FEATURES, 0.0, 1.0, 2);
    let mask: Vec<bool> = (0..ROWS).map(|r| r < ROWS - 37 && r % 9 != 4).collect();
    let gamma = data(FEATURES, 1.0, 0.5, 3);
    let beta = data(FEATURES, 0.0, 0.5, 4);
    let opts = |rows: std::ops::Range<usize>| BatchNorm {
        mask: Some(&mask[rows]),
        gamma: Some(&gamma),
        beta: Some(&beta),
        ..Default::default()
    };

    // This rank's rows.
    let mine = rank * ROWS / size..(rank + 1) * ROWS / size;
    let values = mine.start * FEATURES..mine.end * FEATURES;
    let (xs, dys) = (&x[values.clone()], &dy[values.clone()]);
    let local = opts(mine.clone());

    let stats = all_gather_stats(&world, norm.batch_norm_stats(xs, FEATURES, &local))?;
    let y = norm.batch_norm_apply(xs, FEATURES, &local, &stats)?;
    let sums = norm.batch_norm_backward_sums(xs, dys, FEATURES, &local, &stats);
    let grads = all_gather_grads(&world, sums)?;
    let g = norm.batch_norm_backward_apply(xs, dys, FEATURES, &local, &stats, &grads)?;

    // The whole batch in this one process.
    let whole = norm.batch_norm_train(&x, FEATURES, &opts(0..ROWS))?;
    let whole_grads = norm.batch_norm_backward(&x, &dy, FEATURES, &opts(0..ROWS))?;
    let merged = stats.batch_stats();
    let stats_diff = rel(&merged.mean, &whole.mean, 1e-3).max(rel(&merged.var, &whole.var, 1e-3));
    let diffs = [
        stats_diff,
        rel(&y, &whole.y[values.clone()], 1.0),
        rel(&g.dx, &whole_grads.dx[values], 1.0),
        rel(&g.dgamma, &whole_grads.dgamma, 1.0),
        rel(&g.dbeta, &whole_grads.dbeta, 1.0),
    ];
    let mine_worst = diffs.iter().copied().fold(0.0, f64::max);
    check_errors(&world, &norm, xs)?;
    let mut worst = 0.0f64;
    world.all_reduce_into(&mine_worst, &mut worst, SystemOperation::max());
    let root = world.process_at_rank(0);
    if rank == 0 {
        let mut all = vec![0.0f64; size];
        root.gather_into_root(&stats_diff, &mut all[..]);
        println!("{} on {size} rank(s), {ROWS} x {FEATURES}", norm.describe());
        println!(
            "merged count {}, mean[0] {:.6}, var[0] {:.6}",
            merged.count, merged.mean[0], merged.var[0]
        );
        println!("statistics: max relative difference from one process: {stats_diff:.3e}");
        println!("max difference from one process: {worst:.3e}");
        // Statistics in f64 merged against one pass in f32 tiles: 1e-6 relative; outputs and
        // gradients in f32: 1e-5 of max(1, |value|).
        if stats_diff > 1e-6 || worst > 1e-5 {
            eprintln!("difference past its tolerance");
            std::process::exit(1);
        }
    } else {
        root.gather_into(&stats_diff);
    }
    Ok(())
}

/// Bad input on one rank is an error on every rank, never a hang: the last rank with another
/// feature count, then with an empty shard.
fn check_errors(
    world: &SimpleCommunicator,
    norm: &Normalizer,
    xs: &[f32],
) -> Result<(), NormError> {
    let (rank, size) = (world.rank() as usize, world.size() as usize);
    let last = rank == size - 1;
    let opts = BatchNorm::default();
    let features = if last { FEATURES / 2 } else { FEATURES };
    let result = all_gather_stats(world, norm.batch_norm_stats(xs, features, &opts));
    let expected = |r: &Result<_, NormError>| match r {
        Err(NormError::ShardFeatures { .. }) => size > 1,
        Ok(_) => size == 1,
        _ => false,
    };
    if !expected(&result) {
        panic!("rank {rank}: ranks of different feature counts gave {result:?}");
    }
    let shard: &[f32] = if last { &[] } else { xs };
    let result = all_gather_stats(world, norm.batch_norm_stats(shard, FEATURES, &opts));
    match result {
        Err(NormError::EmptyBatch { .. }) if last => Ok(()),
        Err(NormError::RankFailed { rank: r }) if r == size - 1 => Ok(()),
        other => panic!("rank {rank}: an empty shard on the last rank gave {other:?}"),
    }
}
