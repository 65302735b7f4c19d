//! The CPU fallback: what `Normalizer::cpu()` runs, and what `Normalizer::new()` runs where no
//! GPU exists. One module per shader, computing the same algorithm (shifted two-pass statistics)
//! with f64 accumulators, rows in parallel with rayon. Results do not depend on the thread count:
//! every reduction has a fixed order.

pub(crate) mod batch_norm;
pub(crate) mod layer_norm;

/// Lanes of the f64 accumulators: wide enough for the compiler to vectorise the sums.
const LANES: usize = 8;

/// Σ (x − shift) in f64. `x − shift` is exact in f32 whenever x and shift are within a factor two
/// of each other (Sterbenz), which is the case that matters: offset data with a small spread.
pub(crate) fn sum_shifted(x: &[f32], shift: f32) -> f64 {
    let mut acc = [0f64; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += (v - shift) as f64;
        }
    }
    tail.iter()
        .fold(fold_lanes(acc), |s, &v| s + (v - shift) as f64)
}

/// Σ (x − shift − mean_d)² in f64.
pub(crate) fn sum_sq_centered(x: &[f32], shift: f32, mean_d: f64) -> f64 {
    let mut acc = [0f64; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            let d = (v - shift) as f64 - mean_d;
            *a += d * d;
        }
    }
    tail.iter().fold(fold_lanes(acc), |s, &v| {
        let d = (v - shift) as f64 - mean_d;
        s + d * d
    })
}

fn fold_lanes(acc: [f64; LANES]) -> f64 {
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
}

/// How many rows one rayon task takes: enough values (~64K) to amortise scheduling.
pub(crate) fn rows_per_task(features: usize) -> usize {
    (65536 / features.max(1)).max(1)
}
