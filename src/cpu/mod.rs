//! The CPU fallback: what `Normalizer::cpu()` runs, and what `Normalizer::new()` runs where no
//! GPU exists. One module per shader, computing the same algorithm (shifted two-pass statistics),
//! rows or blocks of positions in parallel with rayon. Results do not depend on the thread count:
//! every reduction has a fixed order.
//!
//! Sums run in f32 across 16 independent lanes (so the compiler vectorises them) over blocks of
//! at most `BLOCK` values, and the block sums are added in f64: the rounding error of a block is at
//! most ~32 ulps of its magnitude, and blocks do not compound.

pub(crate) mod batch_norm;
pub(crate) mod layer_norm;

const LANES: usize = 16;
/// Values summed in f32 before the partial sum moves to f64.
const BLOCK: usize = 512;

/// Σ (x − shift). `x − shift` is exact in f32 whenever x and shift are within a factor two of
/// each other (Sterbenz), which is the case that matters: offset data with a small spread.
pub(crate) fn sum_shifted(x: &[f32], shift: f32) -> f64 {
    x.chunks(BLOCK)
        .map(|b| lanes_sum(b, |v| v - shift) as f64)
        .sum()
}

/// Σ (x − shift − center)².
pub(crate) fn sum_sq_centered(x: &[f32], shift: f32, center: f32) -> f64 {
    x.chunks(BLOCK)
        .map(|b| {
            lanes_sum(b, |v| {
                let d = (v - shift) - center;
                d * d
            }) as f64
        })
        .sum()
}

#[inline(always)]
fn lanes_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    for (a, &v) in acc.iter_mut().zip(tail) {
        *a += f(v);
    }
    // A fixed pairwise fold of the lanes.
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            acc[i] += acc[i + width];
        }
        width /= 2;
    }
    acc[0]
}

/// How many rows one rayon task takes: enough values (~64K) to amortise scheduling.
pub(crate) fn rows_per_task(features: usize) -> usize {
    (65536 / features.max(1)).max(1)
}
