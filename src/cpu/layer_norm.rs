//! CPU mirror of `shaders/layer_norm.wgsl`: per row, shift by the first value, mean of the
//! shifted values, variance around it, then one output pass. A row is read from memory once;
//! the second and third passes run over it in cache. RMSNorm ([`RowNorm::Rms`]) takes the same
//! path with no shift and no mean: the mean square, then the output.

use rayon::prelude::*;

use super::{
    multiversion, rows_per_task, should_stream, stream_fence, sum_shifted, sum_sq_centered,
    write_out, PREFETCH_DISTANCE,
};
use crate::ops::layer_norm::RowNorm;
use crate::ops::stats_out_of_range;
use crate::LayerNorm;

/// Normalizes every `features`-long row of `x` into `y` (same length; input already validated).
pub(crate) fn layer_norm(
    x: &[f32],
    y: &mut [f32],
    features: usize,
    opts: &LayerNorm<'_>,
    kind: RowNorm,
) {
    let block = rows_per_task(features) * features;
    let stream = should_stream(y.len());
    y.par_chunks_mut(block)
        .zip(x.par_chunks(block))
        .for_each(|(yb, xb)| {
            rows(xb, yb, features, (opts, kind), stream);
            stream_fence();
        });
}

multiversion! {
    fn rows(x: &[f32], y: &mut [f32], features: usize, op: (&LayerNorm<'_>, RowNorm), stream: bool) => rows_body
}

#[inline(always)]
fn rows_body(
    x: &[f32],
    y: &mut [f32],
    features: usize,
    (opts, kind): (&LayerNorm<'_>, RowNorm),
    stream: bool,
) {
    // Prefetch a row's worth of values at least PREFETCH_DISTANCE ahead: one row is too close
    // when rows are short.
    let distance = features.max(PREFETCH_DISTANCE);
    for (r, (yr, xr)) in y
        .chunks_exact_mut(features)
        .zip(x.chunks_exact(features))
        .enumerate()
    {
        let lo = (r * features + distance).min(x.len());
        let hi = (lo + features).min(x.len());
        match kind {
            RowNorm::Layer => row(xr, yr, opts, &x[lo..hi], stream),
            RowNorm::Rms => rms_row(xr, yr, opts, &x[lo..hi], stream),
        }
    }
}

/// One row; `ahead` (data read later, or empty) is prefetched while this row is in cache, and
/// `stream` sends the output past the caches.
#[inline(always)]
fn row(x: &[f32], y: &mut [f32], opts: &LayerNorm<'_>, ahead: &[f32], stream: bool) {
    let n = x.len() as f64;
    let shift = x[0];
    let mean_d = (sum_shifted(x, shift) / n) as f32;
    let var = sum_sq_centered(x, shift, mean_d, ahead) / n;
    if stats_out_of_range(mean_d as f64, var, opts.eps) {
        return row_in_f64(x, y, opts, RowNorm::Layer);
    }
    let rstd = (1.0 / (var + opts.eps as f64).sqrt()) as f32;
    normalize(x, y, (shift, mean_d, rstd), opts, stream);
}

/// One row of RMSNorm: the mean square in one pass over `x`, then the output.
#[inline(always)]
fn rms_row(x: &[f32], y: &mut [f32], opts: &LayerNorm<'_>, ahead: &[f32], stream: bool) {
    let mean_sq = sum_sq_centered(x, 0.0, 0.0, ahead) / x.len() as f64;
    if stats_out_of_range(0.0, mean_sq, opts.eps) {
        return row_in_f64(x, y, opts, RowNorm::Rms);
    }
    let rrms = (1.0 / (mean_sq + opts.eps as f64).sqrt()) as f32;
    normalize(x, y, (0.0, 0.0, rrms), opts, stream);
}

/// y = ((x − shift) − mean_d) · rstd · gamma + beta over one row (RMSNorm: shift and mean_d 0,
/// which leaves x exactly).
#[inline(always)]
fn normalize(
    x: &[f32],
    y: &mut [f32],
    (shift, mean_d, rstd): (f32, f32, f32),
    opts: &LayerNorm<'_>,
    stream: bool,
) {
    let (gamma, beta) = (opts.gamma, opts.beta);
    write_out(
        y,
        stream,
        #[inline(always)]
        |out, off| {
            let span = off..off + out.len();
            let xs = &x[span.clone()];
            match (
                gamma.map(|g| &g[span.clone()]),
                beta.map(|b| &b[span.clone()]),
            ) {
                (None, None) => {
                    for (o, &v) in out.iter_mut().zip(xs) {
                        *o = ((v - shift) - mean_d) * rstd;
                    }
                }
                (Some(g), None) => {
                    for ((o, &v), &g) in out.iter_mut().zip(xs).zip(g) {
                        *o = ((v - shift) - mean_d) * rstd * g;
                    }
                }
                (None, Some(b)) => {
                    for ((o, &v), &b) in out.iter_mut().zip(xs).zip(b) {
                        *o = ((v - shift) - mean_d) * rstd + b;
                    }
                }
                (Some(g), Some(b)) => {
                    for (((o, &v), &g), &b) in out.iter_mut().zip(xs).zip(g).zip(b) {
                        *o = ((v - shift) - mean_d) * rstd * g + b;
                    }
                }
            }
        },
    );
}

/// A row whose f32 statistics went out of range, normalized in f64 throughout: its squares range
/// over 1e-90..1e77, well inside f64. Rare, so plain loops. A row holding NaN or infinity gets
/// what the same f64 arithmetic gives in the reference: NaN throughout for LayerNorm; for RMSNorm
/// NaN where the row holds a NaN, and with an infinity, NaN there and 0 elsewhere.
#[cold]
fn row_in_f64(x: &[f32], y: &mut [f32], opts: &LayerNorm<'_>, kind: RowNorm) {
    let n = x.len() as f64;
    let mean = match kind {
        RowNorm::Layer => x.iter().map(|&v| v as f64).sum::<f64>() / n,
        RowNorm::Rms => 0.0,
    };
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    let rstd = 1.0 / (var + opts.eps as f64).sqrt();
    for (c, (o, &v)) in y.iter_mut().zip(x).enumerate() {
        let g = opts.gamma.map_or(1.0, |g| g[c] as f64);
        let b = opts.beta.map_or(0.0, |b| b[c] as f64);
        *o = ((v as f64 - mean) * rstd * g + b) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The build for wider registers (AVX2 where this CPU has it) and the baseline build of the
    /// same code give the same bits, with and without streaming stores.
    #[test]
    fn every_build_gives_the_same_bits() {
        for &features in &[1usize, 5, 64, 1027] {
            let x: Vec<f32> = (0..features * 37)
                .map(|i| ((i * 7919) % 1013) as f32 * 0.37 - 90.0)
                .collect();
            let gamma: Vec<f32> = (0..features).map(|i| 1.0 + (i % 7) as f32 * 0.1).collect();
            let opts = LayerNorm {
                gamma: Some(&gamma),
                ..Default::default()
            };
            for (stream, kind) in [
                (false, RowNorm::Layer),
                (true, RowNorm::Layer),
                (false, RowNorm::Rms),
                (true, RowNorm::Rms),
            ] {
                let mut wide = vec![0f32; x.len()];
                let mut base = vec![1f32; x.len()];
                let op = (&opts, kind);
                rows(&x, &mut wide, features, op, stream);
                rows_body(&x, &mut base, features, op, stream);
                crate::cpu::stream_fence();
                assert!(
                    wide.iter()
                        .zip(&base)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{features} features, stream {stream}, {kind:?}"
                );
            }
        }
    }
}
