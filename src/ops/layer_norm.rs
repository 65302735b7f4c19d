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
pub(crate) type FusedAdd<'a> = Option<(&'a [f32], &'a mut [f32])>;

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
