//! CPU mirror of `shaders/layer_norm.wgsl`: per row, shift by the first value, mean of the
//! shifted values, variance around it, then one output pass. A row is read from memory once;
//! the second and third passes run over it in cache.

use rayon::prelude::*;

use super::{rows_per_task, sum_shifted, sum_sq_centered};
use crate::LayerNorm;

/// Normalizes every `features`-long row of `x` into `y` (same length; input already validated).
pub(crate) fn layer_norm(x: &[f32], y: &mut [f32], features: usize, opts: &LayerNorm<'_>) {
    let block = rows_per_task(features) * features;
    y.par_chunks_mut(block)
        .zip(x.par_chunks(block))
        .for_each(|(yb, xb)| {
            for (yr, xr) in yb.chunks_exact_mut(features).zip(xb.chunks_exact(features)) {
                row(xr, yr, opts);
            }
        });
}

fn row(x: &[f32], y: &mut [f32], opts: &LayerNorm<'_>) {
    let n = x.len() as f64;
    let shift = x[0];
    let mean_d = (sum_shifted(x, shift) / n) as f32;
    let var = sum_sq_centered(x, shift, mean_d) / n;
    let rstd = (1.0 / (var + opts.eps as f64).sqrt()) as f32;
    match (opts.gamma, opts.beta) {
        (None, None) => {
            for (o, &v) in y.iter_mut().zip(x) {
                *o = ((v - shift) - mean_d) * rstd;
            }
        }
        (Some(g), None) => {
            for ((o, &v), &g) in y.iter_mut().zip(x).zip(g) {
                *o = ((v - shift) - mean_d) * rstd * g;
            }
        }
        (None, Some(b)) => {
            for ((o, &v), &b) in y.iter_mut().zip(x).zip(b) {
                *o = ((v - shift) - mean_d) * rstd + b;
            }
        }
        (Some(g), Some(b)) => {
            for (((o, &v), &g), &b) in y.iter_mut().zip(x).zip(g).zip(b) {
                *o = ((v - shift) - mean_d) * rstd * g + b;
            }
        }
    }
}
