//! LayerNorm: its options and the checks of a call.

use super::{check_eps, check_operand, check_param, rows_of};
use crate::NormError;

/// Options for [`Normalizer::layer_norm`](crate::Normalizer::layer_norm).
///
/// ```
/// use gpunorm::LayerNorm;
/// let gamma = [1.0, 2.0, 0.5];
/// let opts = LayerNorm { gamma: Some(&gamma), ..Default::default() };
/// assert_eq!(opts.eps, 1e-5);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerNorm<'a> {
    /// Added to the variance before the square root; finite and >= 0. Default 1e-5.
    pub eps: f32,
    /// Per-feature scale (one value per feature), or None for 1.
    pub gamma: Option<&'a [f32]>,
    /// Per-feature shift (one value per feature), or None for 0.
    pub beta: Option<&'a [f32]>,
}

impl Default for LayerNorm<'_> {
    fn default() -> Self {
        Self {
            eps: 1e-5,
            gamma: None,
            beta: None,
        }
    }
}

/// The gradients of LayerNorm, from
/// [`Normalizer::layer_norm_backward`](crate::Normalizer::layer_norm_backward).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerNormGrads<T = f32> {
    /// The gradient of x: one value per value of x.
    pub dx: Vec<T>,
    /// The gradient of gamma, one value per feature (of a gamma of ones where none was given).
    pub dgamma: Vec<f32>,
    /// The gradient of beta, one value per feature (of a beta of zeros where none was given).
    pub dbeta: Vec<f32>,
}

/// What [`Normalizer::add_layer_norm`](crate::Normalizer::add_layer_norm) and
/// [`Normalizer::add_rms_norm`](crate::Normalizer::add_rms_norm) return.
#[derive(Debug, Clone, PartialEq)]
pub struct AddNormOutput<T = f32> {
    /// x + residual, each value rounded to `T` once: the new residual stream.
    pub sum: Vec<T>,
    /// The normalization of the rows of x + residual (of `sum`'s rows; for half types, of the
    /// sum before its rounding to `T`).
    pub y: Vec<T>,
}

/// What a training forward pass saves for its backward pass: the statistics it normalized each
/// row with, from [`Normalizer::layer_norm_saving`](crate::Normalizer::layer_norm_saving) or
/// [`Normalizer::rms_norm_saving`](crate::Normalizer::rms_norm_saving), for
/// [`Normalizer::layer_norm_backward_saved`](crate::Normalizer::layer_norm_backward_saved) (or
/// the RMSNorm twin), which then skips recomputing them.
///
/// They are kept as the kernels use them, so that the backward pass is as exact as one that
/// recomputes: per row its shift (the row's first value), the mean of x − shift and the rstd,
/// of the row scaled by a power of two where its statistics leave f32's range (1 otherwise).
/// A mean rounded to f32 alone would lose the spread of rows like 1e4 ± 1e-2. [`RowStats::mean`]
/// and [`RowStats::rstd`] give the usual per-row values. Statistics of another backend work as
/// well (the layout is the same); the rows, features, kind (LayerNorm or RMSNorm) and eps must
/// be those of the backward call.
#[derive(Debug, Clone, PartialEq)]
pub struct RowStats {
    pub(crate) origin: StatsOrigin,
    /// Per row: (shift, mean − shift, rstd, scale) of the row scaled by `scale`: xhat = (x ·
    /// scale − shift − mean_d) · rstd, and the unscaled row's rstd is rstd · scale.
    pub(crate) moments: Vec<[f32; 4]>,
}

impl RowStats {
    /// Statistics of `rows` rows, to be filled in by a forward pass.
    pub(crate) fn new(
        rows: usize,
        features: usize,
        (opts, kind): (&LayerNorm<'_>, RowNorm),
    ) -> RowStats {
        RowStats {
            origin: StatsOrigin::of(features, (opts, kind)),
            moments: vec![[0.0; 4]; rows],
        }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.moments.len()
    }

    /// The row width they were computed over.
    pub fn features(&self) -> usize {
        self.origin.features
    }

    /// Each row's mean (0 for RMSNorm), rounded to f32.
    pub fn mean(&self) -> Vec<f32> {
        self.moments
            .iter()
            .map(|&[shift, mean_d, _, scale]| {
                ((shift as f64 + mean_d as f64) / scale as f64) as f32
            })
            .collect()
    }

    /// Each row's 1 / sqrt(var + eps) (RMSNorm: 1 / sqrt(mean(x²) + eps)), rounded to f32.
    pub fn rstd(&self) -> Vec<f32> {
        self.moments
            .iter()
            .map(|&[_, _, rstd, scale]| (rstd as f64 * scale as f64) as f32)
            .collect()
    }

    /// Refuses statistics that are not those of a backward call of `kind` over `rows` rows
    /// `features` wide with `eps`.
    pub(crate) fn check(
        &self,
        rows: usize,
        features: usize,
        op: (&LayerNorm<'_>, RowNorm),
    ) -> Result<(), NormError> {
        self.origin.check(self.rows(), (rows, features), op)
    }
}

/// What saved statistics were computed for: the row width, the op and its eps. Host and device
/// statistics ([`RowStats`], [`GpuRowStats`](crate::GpuRowStats)) check a backward call
/// against it alike.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct StatsOrigin {
    pub features: usize,
    pub kind: RowNorm,
    pub eps: f32,
}

impl StatsOrigin {
    pub fn of(features: usize, (opts, kind): (&LayerNorm<'_>, RowNorm)) -> StatsOrigin {
        StatsOrigin {
            features,
            kind,
            eps: opts.eps,
        }
    }

    /// Refuses statistics of `held` rows that are not those of a backward call of `kind` over
    /// `rows` rows `features` wide with `opts.eps`.
    pub fn check(
        &self,
        held: usize,
        (rows, features): (usize, usize),
        (opts, kind): (&LayerNorm<'_>, RowNorm),
    ) -> Result<(), NormError> {
        let problem = if self.kind != kind {
            match kind {
                RowNorm::Layer => "they are RMSNorm's, and the call is LayerNorm's backward",
                RowNorm::Rms => "they are LayerNorm's, and the call is RMSNorm's backward",
            }
        } else if held != rows || self.features != features {
            "they are of another shape than x (another number of rows or features)"
        } else if self.eps.to_bits() != opts.eps.to_bits() {
            "they were computed with another eps than the call's"
        } else {
            return Ok(());
        };
        Err(NormError::InvalidStats { problem })
    }
}

/// What [`Normalizer::layer_norm_saving`](crate::Normalizer::layer_norm_saving) and
/// [`Normalizer::rms_norm_saving`](crate::Normalizer::rms_norm_saving) return: the output, and
/// the statistics the backward pass can take instead of recomputing them.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedNormOutput<T = f32> {
    /// The normalized rows, as the op without saving gives them.
    pub y: Vec<T>,
    /// Each row's statistics.
    pub stats: RowStats,
}

/// Checks a backward call on x and dy of `len` and `dy_len` values; returns the number of rows.
pub(crate) fn validate_backward(
    len: usize,
    dy_len: usize,
    features: usize,
    opts: &LayerNorm<'_>,
) -> Result<usize, NormError> {
    let rows = validate(len, features, opts)?;
    check_operand("dy", dy_len, len)?;
    Ok(rows)
}

/// The fused residual add of a row op: the residual, and the output for x + residual.
pub(crate) type FusedAdd<'a, T> = Option<(&'a [T], &'a mut [T])>;

/// What a row op on tensors of `T` writes besides y: the fused add's sum (with its residual),
/// and each row's saved statistics ([`RowStats`]'s moments).
pub(crate) type RowOutputs<'a, T> = (FusedAdd<'a, T>, Option<&'a mut [[f32; 4]]>);

/// What the row kernels of both backends compute over each row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RowNorm {
    /// LayerNorm: shifted mean and variance, gamma and beta.
    Layer,
    /// RMSNorm: the mean square alone (no shift, no mean), gamma; beta is never given.
    Rms,
}

/// Checks a LayerNorm call on a tensor of `len` values; returns the number of rows.
pub(crate) fn validate(
    len: usize,
    features: usize,
    opts: &LayerNorm<'_>,
) -> Result<usize, NormError> {
    let rows = rows_of(len, features)?;
    check_eps(opts.eps)?;
    check_param("gamma", opts.gamma, features)?;
    check_param("beta", opts.beta, features)?;
    Ok(rows)
}
