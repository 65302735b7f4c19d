//! RMSNorm: its options and the checks of a call. It runs on LayerNorm's kernels, with no shift,
//! no mean and no beta ([`RowNorm::Rms`]).

use super::layer_norm::{self, LayerNorm, RowNorm};
use crate::NormError;

/// Options for [`Normalizer::rms_norm`](crate::Normalizer::rms_norm): y = x / sqrt(mean(x²) +
/// eps) · gamma over each row.
///
/// ```
/// use gpunorm::RmsNorm;
/// let gamma = [1.0, 2.0, 0.5];
/// let opts = RmsNorm { gamma: Some(&gamma), ..Default::default() };
/// assert_eq!(opts.eps, 1e-6);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RmsNorm<'a> {
    /// Added to the mean square before the square root; finite and >= 0. Default 1e-6.
    pub eps: f32,
    /// Per-feature scale (one value per feature), or None for 1.
    pub gamma: Option<&'a [f32]>,
}

impl Default for RmsNorm<'_> {
    fn default() -> Self {
        Self {
            eps: 1e-6,
            gamma: None,
        }
    }
}

impl<'a> RmsNorm<'a> {
    /// The options the shared row kernels take, run as [`RowNorm::Rms`].
    pub(crate) fn as_row_norm(&self) -> (LayerNorm<'a>, RowNorm) {
        let opts = LayerNorm {
            eps: self.eps,
            gamma: self.gamma,
            beta: None,
        };
        (opts, RowNorm::Rms)
    }
}

/// The gradients of RMSNorm, from
/// [`Normalizer::rms_norm_backward`](crate::Normalizer::rms_norm_backward).
#[derive(Debug, Clone, PartialEq)]
pub struct RmsNormGrads<T = f32> {
    /// The gradient of x: one value per value of x.
    pub dx: Vec<T>,
    /// The gradient of gamma, one value per feature (of a gamma of ones where none was given).
    pub dgamma: Vec<f32>,
}

/// Checks an RMSNorm call on a tensor of `len` values; returns the number of rows.
pub(crate) fn validate(
    len: usize,
    features: usize,
    opts: &RmsNorm<'_>,
) -> Result<usize, NormError> {
    layer_norm::validate(len, features, &opts.as_row_norm().0)
}
