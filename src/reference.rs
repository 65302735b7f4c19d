//! The f64 reference: obviously correct, loops shaped like the math, slow on purpose.
//!
//! Every backend of gpunorm is tested against these functions. They take f32 input and return
//! f64 output so a test can measure the error of an f32 result without rounding the reference.
//! They assume valid input (callers validate); shapes that do not fit panic.

use crate::{BatchNorm, LayerNorm, RmsNorm};

/// LayerNorm of each row of `x` (row-major, `features` values per row), biased variance:
/// y = (x − mean) / sqrt(var + eps) · gamma + beta, in f64. Same arguments as
/// [`Normalizer::layer_norm`](crate::Normalizer::layer_norm).
pub fn layer_norm(x: &[f32], features: usize, opts: &LayerNorm<'_>) -> Vec<f64> {
    let (eps, gamma, beta) = (opts.eps, opts.gamma, opts.beta);
    let mut y = Vec::with_capacity(x.len());
    for row in x.chunks_exact(features) {
        let n = features as f64;
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let inv_std = 1.0 / (var + eps as f64).sqrt();
        for (c, &v) in row.iter().enumerate() {
            let g = gamma.map_or(1.0, |g| g[c] as f64);
            let b = beta.map_or(0.0, |b| b[c] as f64);
            y.push((v as f64 - mean) * inv_std * g + b);
        }
    }
    y
}

/// RMSNorm of each row of `x`: y = x / sqrt(mean(x²) + eps) · gamma, in f64. Same arguments as
/// [`Normalizer::rms_norm`](crate::Normalizer::rms_norm).
pub fn rms_norm(x: &[f32], features: usize, opts: &RmsNorm<'_>) -> Vec<f64> {
    let mut y = Vec::with_capacity(x.len());
    for row in x.chunks_exact(features) {
        let mean_sq = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / features as f64;
        let inv_rms = 1.0 / (mean_sq + opts.eps as f64).sqrt();
        for (c, &v) in row.iter().enumerate() {
            let g = opts.gamma.map_or(1.0, |g| g[c] as f64);
            y.push(v as f64 * inv_rms * g);
        }
    }
    y
}

/// The gradients of [`layer_norm`] for the upstream gradient `dy`: (dx, dgamma, dbeta), in f64.
/// Per row, with xhat = (x − mean) / sqrt(var + eps) and g = dy · gamma:
/// dx = (g − mean(g) − xhat · mean(g · xhat)) / sqrt(var + eps); dgamma and dbeta sum dy · xhat
/// and dy over the rows (the gradients of a gamma of ones and a beta of zeros where none is
/// given). Same arguments as
/// [`Normalizer::layer_norm_backward`](crate::Normalizer::layer_norm_backward).
pub fn layer_norm_backward(
    x: &[f32],
    dy: &[f32],
    features: usize,
    opts: &LayerNorm<'_>,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    row_backward(x, dy, features, (opts.eps, opts.gamma), true)
}

/// The gradients of [`rms_norm`] for the upstream gradient `dy`: (dx, dgamma), in f64. Per
/// row, with xhat = x / sqrt(mean(x²) + eps) and g = dy · gamma:
/// dx = (g − xhat · mean(g · xhat)) / sqrt(mean(x²) + eps); dgamma sums dy · xhat over the rows.
pub fn rms_norm_backward(
    x: &[f32],
    dy: &[f32],
    features: usize,
    opts: &RmsNorm<'_>,
) -> (Vec<f64>, Vec<f64>) {
    let (dx, dgamma, _) = row_backward(x, dy, features, (opts.eps, opts.gamma), false);
    (dx, dgamma)
}

/// LayerNorm's backward (`centred`) or RMSNorm's.
fn row_backward(
    x: &[f32],
    dy: &[f32],
    features: usize,
    (eps, gamma): (f32, Option<&[f32]>),
    centred: bool,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let n = features as f64;
    let mut dx = Vec::with_capacity(x.len());
    let (mut dgamma, mut dbeta) = (vec![0.0; features], vec![0.0; features]);
    for (row, dy) in x.chunks_exact(features).zip(dy.chunks_exact(features)) {
        let mean = if centred {
            row.iter().map(|&v| v as f64).sum::<f64>() / n
        } else {
            0.0
        };
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let inv_std = 1.0 / (var + eps as f64).sqrt();
        let xhat: Vec<f64> = row.iter().map(|&v| (v as f64 - mean) * inv_std).collect();
        let g: Vec<f64> = (0..features)
            .map(|c| dy[c] as f64 * gamma.map_or(1.0, |g| g[c] as f64))
            .collect();
        let mean_g = if centred {
            g.iter().sum::<f64>() / n
        } else {
            0.0
        };
        let mean_gx = g.iter().zip(&xhat).map(|(g, h)| g * h).sum::<f64>() / n;
        for c in 0..features {
            dx.push((g[c] - mean_g - xhat[c] * mean_gx) * inv_std);
            dgamma[c] += dy[c] as f64 * xhat[c];
            dbeta[c] += dy[c] as f64;
        }
    }
    (dx, dgamma, dbeta)
}

/// The gradients of BatchNorm training (statistics of the batch, biased variance) on a
/// features-last `[rows, features]` tensor for the upstream gradient `dy`: (dx, dgamma, dbeta),
/// in f64. Per feature over the N counted rows, with xhat = (x − mean) / sqrt(var + eps):
/// dbeta = Σ dy, dgamma = Σ dy · xhat, and dx = gamma / sqrt(var + eps) · (dy − dbeta / N −
/// xhat · dgamma / N) on counted rows, 0 on masked ones. Same arguments as
/// [`Normalizer::batch_norm_backward`](crate::Normalizer::batch_norm_backward).
pub fn batch_norm_backward(
    x: &[f32],
    dy: &[f32],
    features: usize,
    opts: &BatchNorm<'_>,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mean, var, count) = column_stats(x, features, opts.mask);
    let counted = |r: usize| opts.mask.is_none_or(|m| m[r]);
    let n = count as f64;
    let inv_std: Vec<f64> = var
        .iter()
        .map(|v| 1.0 / (v + opts.eps as f64).sqrt())
        .collect();
    let xhat = |r: usize, c: usize| (x[r * features + c] as f64 - mean[c]) * inv_std[c];
    let rows = x.len() / features;
    let (mut dgamma, mut dbeta) = (vec![0.0; features], vec![0.0; features]);
    for r in (0..rows).filter(|&r| counted(r)) {
        for c in 0..features {
            dbeta[c] += dy[r * features + c] as f64;
            dgamma[c] += dy[r * features + c] as f64 * xhat(r, c);
        }
    }
    let mut dx = vec![0.0; x.len()];
    for r in (0..rows).filter(|&r| counted(r)) {
        for c in 0..features {
            let g = opts.gamma.map_or(1.0, |g| g[c] as f64);
            let d = dy[r * features + c] as f64 - dbeta[c] / n - xhat(r, c) * dgamma[c] / n;
            dx[r * features + c] = g * inv_std[c] * d;
        }
    }
    (dx, dgamma, dbeta)
}

/// Per-feature statistics over the rows of a `[rows, features]` tensor where `mask` (if given)
/// is true: (mean, biased variance, counted rows).
pub fn column_stats(
    x: &[f32],
    features: usize,
    mask: Option<&[bool]>,
) -> (Vec<f64>, Vec<f64>, usize) {
    let counted = |r: usize| mask.is_none_or(|m| m[r]);
    let rows: Vec<&[f32]> = x
        .chunks_exact(features)
        .enumerate()
        .filter(|&(r, _)| counted(r))
        .map(|(_, row)| row)
        .collect();
    let n = rows.len() as f64;
    let mean: Vec<f64> = (0..features)
        .map(|c| rows.iter().map(|row| row[c] as f64).sum::<f64>() / n)
        .collect();
    let var = (0..features)
        .map(|c| {
            rows.iter()
                .map(|row| (row[c] as f64 - mean[c]).powi(2))
                .sum::<f64>()
                / n
        })
        .collect();
    (mean, var, rows.len())
}

/// Normalizes each feature of a `[rows, features]` tensor with the given per-feature mean and
/// variance; rows where `mask` is false are written as 0.
pub fn batch_norm_apply(
    x: &[f32],
    features: usize,
    mean: &[f64],
    var: &[f64],
    opts: &BatchNorm<'_>,
) -> Vec<f64> {
    let mut y = Vec::with_capacity(x.len());
    for (r, row) in x.chunks_exact(features).enumerate() {
        let counted = opts.mask.is_none_or(|m| m[r]);
        for (c, &v) in row.iter().enumerate() {
            if !counted {
                y.push(0.0);
                continue;
            }
            let g = opts.gamma.map_or(1.0, |g| g[c] as f64);
            let b = opts.beta.map_or(0.0, |b| b[c] as f64);
            y.push((v as f64 - mean[c]) / (var[c] + opts.eps as f64).sqrt() * g + b);
        }
    }
    y
}

/// BatchNorm in training mode on a `[rows, features]` tensor: per-feature statistics over the
/// counted rows, then normalization. Returns (y, mean, biased var, count).
#[allow(clippy::type_complexity)]
pub fn batch_norm_train(
    x: &[f32],
    features: usize,
    opts: &BatchNorm<'_>,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, usize) {
    let (mean, var, count) = column_stats(x, features, opts.mask);
    let y = batch_norm_apply(x, features, &mean, &var, opts);
    (y, mean, var, count)
}

/// Rearranges a channels-first `[batch, channels, spatial]` tensor into features-last
/// `[batch · spatial, channels]`, so the features-last reference applies to it.
pub fn channels_first_to_last(x: &[f32], channels: usize, spatial: usize) -> Vec<f32> {
    let batch = x.len() / (channels * spatial);
    let mut out = Vec::with_capacity(x.len());
    for n in 0..batch {
        for s in 0..spatial {
            for c in 0..channels {
                out.push(x[(n * channels + c) * spatial + s]);
            }
        }
    }
    out
}

/// The inverse of [`channels_first_to_last`], for f64 results.
pub fn channels_last_to_first(y: &[f64], channels: usize, spatial: usize) -> Vec<f64> {
    let batch = y.len() / (channels * spatial);
    let mut out = vec![0.0; y.len()];
    for n in 0..batch {
        for s in 0..spatial {
            for c in 0..channels {
                out[(n * channels + c) * spatial + s] = y[(n * spatial + s) * channels + c];
            }
        }
    }
    out
}

/// The error measure every gpunorm tolerance is stated in: max |y − ref| / max(1, |ref|) over
/// all elements. A NaN where the reference has none, or the reverse, counts as infinite.
pub fn max_error(y: &[f32], reference: &[f64]) -> f64 {
    assert_eq!(
        y.len(),
        reference.len(),
        "output and reference lengths differ"
    );
    y.iter()
        .zip(reference)
        .map(|(&v, &r)| match (v.is_nan(), r.is_nan()) {
            (true, true) => 0.0,
            (false, false) => (v as f64 - r).abs() / r.abs().max(1.0),
            _ => f64::INFINITY,
        })
        .fold(0.0, f64::max)
}
