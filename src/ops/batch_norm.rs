//! BatchNorm: options, outputs, running statistics, padding masks, the tensor shapes it takes and
//! the checks of a call.

use super::{check_eps, check_param, rows_of};
use crate::NormError;

/// Options for BatchNorm ([`Normalizer::batch_norm_train`](crate::Normalizer::batch_norm_train),
/// [`Normalizer::batch_norm_eval`](crate::Normalizer::batch_norm_eval) and their
/// channels-first forms).
///
/// ```
/// use gpunorm::{mask_from_lengths, BatchNorm};
/// // Two sequences padded to length 4; the second has 3 real tokens.
/// let mask = mask_from_lengths(&[4, 3], 4).unwrap();
/// let opts = BatchNorm { mask: Some(&mask), ..Default::default() };
/// assert_eq!(opts.eps, 1e-5);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchNorm<'a> {
    /// Added to the variance before the square root; finite and >= 0. Default 1e-5.
    pub eps: f32,
    /// Per-feature scale (one value per feature or channel), or None for 1.
    pub gamma: Option<&'a [f32]>,
    /// Per-feature shift, or None for 0.
    pub beta: Option<&'a [f32]>,
    /// One entry per position (row for features-last, (batch, spatial) pair for channels-first);
    /// false marks padding: left out of the statistics and written as 0. None counts every row.
    pub mask: Option<&'a [bool]>,
}

impl Default for BatchNorm<'_> {
    fn default() -> Self {
        Self {
            eps: 1e-5,
            gamma: None,
            beta: None,
            mask: None,
        }
    }
}

/// What BatchNorm training returns: the output and the batch statistics it used.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchNormOutput<T = f32> {
    /// Normalized tensor, same layout as the input; masked positions are 0.
    pub y: Vec<T>,
    /// Per-feature mean over the counted positions.
    pub mean: Vec<f32>,
    /// Per-feature biased variance over the counted positions.
    pub var: Vec<f32>,
    /// Positions counted (rows, or batch × spatial for channels-first, less the masked ones).
    pub count: usize,
}

/// Batch statistics from [`Normalizer::batch_norm_train_into`](crate::Normalizer::batch_norm_train_into):
/// [`BatchNormOutput`] without the output tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchStats {
    /// Per-feature mean over the counted positions.
    pub mean: Vec<f32>,
    /// Per-feature biased variance over the counted positions.
    pub var: Vec<f32>,
    /// Positions counted.
    pub count: usize,
}

/// Running statistics for eval mode, updated with PyTorch's rule after each training step.
#[derive(Debug, Clone, PartialEq)]
pub struct RunningStats {
    /// Running per-feature mean.
    pub mean: Vec<f32>,
    /// Running per-feature (unbiased) variance.
    pub var: Vec<f32>,
    /// Weight of each new batch, in [0, 1].
    pub momentum: f32,
}

impl RunningStats {
    /// Mean 0, variance 1 and momentum 0.1 for each of `features` features, as PyTorch starts.
    pub fn new(features: usize) -> RunningStats {
        RunningStats {
            mean: vec![0.0; features],
            var: vec![1.0; features],
            momentum: 0.1,
        }
    }

    /// Folds a training batch in: new = (1 − momentum) · old + momentum · batch, where the batch
    /// variance is the unbiased one, var · count / (count − 1).
    ///
    /// Errors, leaving the statistics unchanged, when the batch counted fewer than 2 positions,
    /// its feature count differs, or momentum is not in [0, 1].
    pub fn update<T>(&mut self, out: &BatchNormOutput<T>) -> Result<(), NormError> {
        self.fold(&out.mean, &out.var, out.count)
    }

    /// [`RunningStats::update`] from the statistics of a `batch_norm_train_into` call.
    pub fn update_with(&mut self, stats: &BatchStats) -> Result<(), NormError> {
        self.fold(&stats.mean, &stats.var, stats.count)
    }

    fn fold(&mut self, mean: &[f32], var: &[f32], count: usize) -> Result<(), NormError> {
        let features = self.mean.len();
        check_param("running var", Some(&self.var), features)?;
        check_param("batch mean", Some(mean), features)?;
        check_param("batch var", Some(var), features)?;
        check_fold(self.momentum, count)?;
        let m = self.momentum as f64;
        let unbias = count as f64 / (count - 1) as f64;
        for c in 0..features {
            let new_mean = (1.0 - m) * self.mean[c] as f64 + m * mean[c] as f64;
            let new_var = (1.0 - m) * self.var[c] as f64 + m * var[c] as f64 * unbias;
            self.mean[c] = new_mean as f32;
            self.var[c] = new_var as f32;
        }
        Ok(())
    }
}

/// Checks what folding a batch into running statistics needs: a momentum in [0, 1] and a batch
/// of at least 2 counted positions (the unbiased variance divides by count − 1).
pub(crate) fn check_fold(momentum: f32, count: usize) -> Result<(), NormError> {
    if !(0.0..=1.0).contains(&momentum) {
        return Err(NormError::InvalidParam {
            name: "momentum",
            value: momentum,
            expected: "in [0, 1]",
            feature: None,
        });
    }
    if count < 2 {
        return Err(NormError::TooFewRows { count });
    }
    Ok(())
}

/// The row mask of a padded batch: `lengths[i]` real positions, then padding, for each of the
/// `lengths.len()` sequences of `seq_len` positions (batch-major, `lengths.len() · seq_len` entries).
///
/// ```
/// assert_eq!(gpunorm::mask_from_lengths(&[2, 1], 3).unwrap(), [true, true, false, true, false, false]);
/// ```
pub fn mask_from_lengths(lengths: &[usize], seq_len: usize) -> Result<Vec<bool>, NormError> {
    if lengths.len().checked_mul(seq_len).is_none() {
        return Err(NormError::TooLarge {
            what: "a mask of lengths.len() × seq_len entries",
            needed: u64::MAX,
            limit: usize::MAX as u64,
        });
    }
    if let Some((index, &length)) = lengths.iter().enumerate().find(|&(_, &l)| l > seq_len) {
        return Err(NormError::SequenceTooLong {
            index,
            length,
            seq_len,
        });
    }
    Ok(lengths
        .iter()
        .flat_map(|&l| (0..seq_len).map(move |s| s < l))
        .collect())
}

/// The shape of a channels-first `[batch, channels, spatial]` tensor (NCHW with spatial = H·W,
/// or NCL), each size named where it is written:
/// `ChannelsFirst { batch: 8, channels: 64, spatial: 32 * 32 }`. All three are checked against
/// the input: batch × channels × spatial must be its length. (Sizes whose product still matches,
/// such as channels and spatial swapped, can only be caught by what else depends on them, such as
/// gamma's length.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelsFirst {
    /// Items in the batch (N).
    pub batch: usize,
    /// Channels (C): the statistics are per channel.
    pub channels: usize,
    /// Positions per channel of one item: H·W for images, L for sequences.
    pub spatial: usize,
}

/// The gradients of BatchNorm training, from
/// [`Normalizer::batch_norm_backward`](crate::Normalizer::batch_norm_backward).
#[derive(Debug, Clone, PartialEq)]
pub struct BatchNormGrads<T = f32> {
    /// The gradient of x: one value per value of x, 0 on masked positions.
    pub dx: Vec<T>,
    /// The gradient of gamma, one value per channel (of a gamma of ones where none was given).
    pub dgamma: Vec<f32>,
    /// The gradient of beta, one value per channel (of a beta of zeros where none was given).
    pub dbeta: Vec<f32>,
}

/// A BatchNorm tensor seen as [batch, channels, spatial]; features-last is spatial = 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Shape {
    pub channels: usize,
    pub spatial: usize,
    /// batch × spatial.
    pub positions: usize,
}

impl Shape {
    /// Values of one batch item: a row of a features-last tensor (`channels`), or a
    /// channels-first item (`channels × spatial`). A GPU tensor's row width.
    pub fn row_width(&self) -> usize {
        self.channels * self.spatial
    }

    /// A `[rows, features]` tensor of `len` values.
    pub fn features_last(len: usize, features: usize) -> Result<Shape, NormError> {
        let rows = rows_of(len, features)?;
        Ok(Shape {
            channels: features,
            spatial: 1,
            positions: rows,
        })
    }

    /// A tensor of `len` values with the named shape `named`: its batch is checked too.
    pub fn named(len: usize, named: ChannelsFirst) -> Result<Shape, NormError> {
        if named.batch == 0 {
            return Err(NormError::ZeroDimension { name: "batch" });
        }
        let expected = named
            .batch
            .checked_mul(named.channels)
            .and_then(|v| v.checked_mul(named.spatial));
        if expected != Some(len) {
            return Err(NormError::ShapeLength {
                len,
                batch: named.batch,
                channels: named.channels,
                spatial: named.spatial,
            });
        }
        Shape::channels_first(len, named.channels, named.spatial)
    }

    /// A `[batch, channels, spatial]` tensor of `len` values.
    pub fn channels_first(len: usize, channels: usize, spatial: usize) -> Result<Shape, NormError> {
        if spatial == 0 {
            return Err(NormError::ZeroDimension { name: "spatial" });
        }
        let plane = channels.checked_mul(spatial).ok_or(NormError::TooLarge {
            what: "channels × spatial",
            needed: u64::MAX,
            limit: usize::MAX as u64,
        })?;
        let batch = rows_of(len, plane).map_err(|e| match e {
            NormError::LengthNotMultiple { len, .. } => NormError::LengthNotMultiple {
                len,
                features: plane,
            },
            e => e,
        })?;
        Ok(Shape {
            channels,
            spatial,
            positions: batch * spatial,
        })
    }
}

/// The positions a training batch counts: how many, and the first of them (each column is
/// shifted by its value there).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Counted {
    pub count: usize,
    pub first: usize,
}

/// Checks a BatchNorm call of either mode: eps, gamma and beta, a batch that is not empty, a
/// mask with one entry per position. (Eval may mask out every position: its output is all 0.)
pub(crate) fn validate(shape: &Shape, opts: &BatchNorm<'_>) -> Result<(), NormError> {
    check_eps(opts.eps)?;
    check_param("gamma", opts.gamma, shape.channels)?;
    check_param("beta", opts.beta, shape.channels)?;
    if shape.positions == 0 {
        return Err(NormError::EmptyBatch {
            reason: "x is empty; pass at least one row",
        });
    }
    match opts.mask {
        Some(m) if m.len() != shape.positions => Err(NormError::MaskLength {
            len: m.len(),
            rows: shape.positions,
        }),
        _ => Ok(()),
    }
}

/// Checks a training call ([`validate`], and at least one position counted: the batch
/// statistics need one); returns the positions it counts.
pub(crate) fn validate_training(shape: &Shape, opts: &BatchNorm<'_>) -> Result<Counted, NormError> {
    validate(shape, opts)?;
    let Some(mask) = opts.mask else {
        return Ok(Counted {
            count: shape.positions,
            first: 0,
        });
    };
    let first = mask.iter().position(|&k| k).ok_or(NormError::EmptyBatch {
        reason: "every position is masked out, so there are no batch statistics; \
                 pass at least one unmasked position",
    })?;
    Ok(Counted {
        count: mask.iter().filter(|&&k| k).count(),
        first,
    })
}

/// Checks running statistics against the shape: one mean and one non-negative variance per feature.
pub(crate) fn validate_stats(shape: &Shape, stats: &RunningStats) -> Result<(), NormError> {
    check_param("running mean", Some(&stats.mean), shape.channels)?;
    check_param("running var", Some(&stats.var), shape.channels)?;
    match stats.var.iter().position(|v| v.is_nan() || *v < 0.0) {
        Some(feature) => Err(NormError::InvalidParam {
            name: "running var",
            value: stats.var[feature],
            expected: "a variance >= 0",
            feature: Some(feature),
        }),
        None => Ok(()),
    }
}
