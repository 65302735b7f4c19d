//! What each op is, independent of where it runs: its options and outputs, the checks every call
//! passes before any backend sees it, and [`Backend`], the contract the CPU fallback and the GPU
//! both fulfil. Nothing here touches a device.

pub(crate) mod batch_norm;
pub(crate) mod layer_norm;
pub(crate) mod partial;
pub(crate) mod rms_norm;

use std::time::Duration;

use crate::{Element, NormError};
use batch_norm::{BatchNorm, BatchStats, Counted, RunningStats, Shape};
use layer_norm::{LayerNorm, RowNorm, RowOutputs};
use partial::{ColumnGrads, ColumnStats};

/// The gradients of gamma and beta from a backward pass that wrote dx into the caller's buffer
/// ([`Normalizer::layer_norm_backward_into`](crate::Normalizer::layer_norm_backward_into),
/// [`Normalizer::batch_norm_backward_into`](crate::Normalizer::batch_norm_backward_into)).
#[derive(Debug, Clone, PartialEq)]
pub struct ParamGrads {
    /// The gradient of gamma, one value per feature (of a gamma of ones where none was given).
    pub dgamma: Vec<f32>,
    /// The gradient of beta, one value per feature (of a beta of zeros where none was given).
    pub dbeta: Vec<f32>,
}

/// Where an op's time went, for callers that measure (returned by the `*_into` methods).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timing {
    /// GPU kernel time from timestamp queries, summed over every dispatch of the op. `None` on
    /// the CPU fallback and on adapters without `TIMESTAMP_QUERY`.
    pub kernel: Option<Duration>,
}

/// The ops every backend runs on host slices. Inputs arrive validated (shapes, lengths, eps,
/// mask, `y.len() == x.len()`); a backend only computes, or reports a device failure. The ops
/// are async: the GPU awaits its readbacks, and the CPU fallback finishes on the first poll.
pub(crate) trait Backend: Send + Sync {
    /// LayerNorm (or, as `kind` says, RMSNorm with `opts.beta` None) of every `features`-long
    /// row of `x` into `y`, tensors of any [`Element`] type; with `add` (a residual and an
    /// output for the sum, both as long as `x`), of the rows of x + residual, the sum written out
    /// too; with `moments` (one per row), each row's statistics saved there
    /// ([`RowStats`](crate::RowStats)'s layout).
    async fn layer_norm<T: Element>(
        &self,
        x: &[T],
        y: &mut [T],
        features: usize,
        op: (&LayerNorm<'_>, RowNorm),
        out: RowOutputs<'_, T>,
    ) -> Result<Timing, NormError>;

    /// The backward pass of LayerNorm (or RMSNorm, as `kind` says): dx into `dx`, and the
    /// column sums (dgamma, dbeta). `dy` and `dx` have one value per value of `x`. With `saved`
    /// (one per row, from a forward pass's `moments`), each row's statistics are taken from
    /// there instead of recomputed.
    async fn layer_norm_backward<T: Element>(
        &self,
        x_dy: (&[T], &[T]),
        dx: &mut [T],
        features: usize,
        op: (&LayerNorm<'_>, RowNorm),
        saved: Option<&[[f32; 4]]>,
    ) -> Result<(Vec<f32>, Vec<f32>, Timing), NormError>;

    /// BatchNorm training: batch statistics over the counted positions, then `y`.
    async fn batch_norm_train(
        &self,
        x: &[f32],
        y: &mut [f32],
        shape: &Shape,
        opts: &BatchNorm<'_>,
        counted: Counted,
    ) -> Result<(BatchStats, Timing), NormError>;

    /// BatchNorm training's backward pass: dx into `dx` (0 on masked positions) and the
    /// per-channel (dgamma, dbeta) over the counted positions.
    async fn batch_norm_backward(
        &self,
        x_dy: (&[f32], &[f32]),
        dx: &mut [f32],
        shape: &Shape,
        opts: &BatchNorm<'_>,
        counted: Counted,
    ) -> Result<(Vec<f32>, Vec<f32>, Timing), NormError>;

    /// A shard's BatchNorm statistics per column (count 0 where nothing is counted).
    async fn batch_norm_stats(
        &self,
        x: &[f32],
        shape: &Shape,
        opts: &BatchNorm<'_>,
    ) -> Result<Vec<ColumnStats>, NormError>;

    /// BatchNorm's elementwise pass with given statistics (merged from shards).
    async fn batch_norm_apply(
        &self,
        x: &[f32],
        y: &mut [f32],
        shape: &Shape,
        opts: &BatchNorm<'_>,
        stats: &[ColumnStats],
    ) -> Result<(), NormError>;

    /// A shard's backward sums per column, given the merged statistics.
    async fn batch_norm_backward_sums(
        &self,
        x_dy: (&[f32], &[f32]),
        shape: &Shape,
        opts: &BatchNorm<'_>,
        stats: &[ColumnStats],
    ) -> Result<Vec<ColumnGrads>, NormError>;

    /// A shard's dx, given the merged statistics and sums.
    async fn batch_norm_backward_apply(
        &self,
        x_dy: (&[f32], &[f32]),
        dx: &mut [f32],
        shape: &Shape,
        opts: &BatchNorm<'_>,
        merged: (&[ColumnStats], &[ColumnGrads]),
    ) -> Result<(), NormError>;

    /// BatchNorm eval: one elementwise pass with the running statistics.
    async fn batch_norm_eval(
        &self,
        x: &[f32],
        y: &mut [f32],
        shape: &Shape,
        opts: &BatchNorm<'_>,
        stats: &RunningStats,
    ) -> Result<Timing, NormError>;
}

/// The number of rows of a row-major tensor of `len` values, or the error that says why it has
/// none.
pub(crate) fn rows_of(len: usize, features: usize) -> Result<usize, NormError> {
    if features == 0 {
        return Err(NormError::ZeroFeatures);
    }
    if !len.is_multiple_of(features) {
        return Err(NormError::LengthNotMultiple { len, features });
    }
    Ok(len / features)
}

pub(crate) fn check_eps(eps: f32) -> Result<(), NormError> {
    if eps.is_finite() && eps >= 0.0 {
        Ok(())
    } else {
        Err(NormError::InvalidEps(eps))
    }
}

/// A per-feature parameter, if given, has one value per feature.
pub(crate) fn check_param(
    name: &'static str,
    param: Option<&[f32]>,
    features: usize,
) -> Result<(), NormError> {
    match param {
        Some(p) if p.len() != features => Err(NormError::ParamLength {
            name,
            len: p.len(),
            features,
        }),
        _ => Ok(()),
    }
}

/// A zeroed output of `len` values for the allocating forms (`layer_norm` and the like).
///
/// A large `vec![0.0; len]` is fresh zero pages from the operating system, and the op's first
/// write to each 4 KiB page faults for the kernel to map and zero it: at 256 MiB that made
/// `layer_norm` several times slower than `layer_norm_into` a reused buffer. On Linux, outputs of
/// 4 MiB and more ask for transparent huge pages before the first touch, so each fault maps
/// 2 MiB; the memory stays zeroed and initialized, only its page size changes.
pub(crate) fn new_output<T: bytemuck::Zeroable>(len: usize) -> Vec<T> {
    let y: Vec<T> = bytemuck::zeroed_vec(len);
    #[cfg(target_os = "linux")]
    if std::mem::size_of_val(&y[..]) >= HUGE_OUTPUT {
        const HUGE: usize = 2 << 20;
        let start = (y.as_ptr() as usize).next_multiple_of(HUGE);
        let end = (y.as_ptr() as usize + std::mem::size_of_val(&y[..])) / HUGE * HUGE;
        if end > start {
            // SAFETY: madvise only advises the kernel about pages inside `y`'s allocation; with
            // MADV_HUGEPAGE it changes neither their contents nor their validity. A refusal
            // (a kernel without transparent huge pages) leaves ordinary pages, so it is ignored.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    y
}

/// Outputs of at least this many bytes ask for huge pages ([`new_output`]).
#[cfg(target_os = "linux")]
const HUGE_OUTPUT: usize = 4 << 20;

/// Below this variance the f32 squares of the deviations may have lost bits (their squares are
/// under f32's smallest normal number, 2^-126), where an eps this small does not hide it.
const TINY_VAR: f64 = 1.0 / (1u128 << 100) as f64;

/// Whether statistics computed in f32 went out of f32's range: a shift, sum or square that
/// overflowed (spreads of 1e19 and more), or squares too small to keep their bits (values near
/// 1e-20 and below, with an eps too small to matter beside them). Also true for data holding NaN
/// or infinity. Both backends redo such rows or columns another way.
pub(crate) fn stats_out_of_range(mean: f64, var: f64, eps: f32) -> bool {
    !(mean.is_finite() && var.is_finite()) || (var < TINY_VAR && (eps as f64) < TINY_VAR * 2e7)
}

/// A second tensor of an op (`dy`, a residual) has one value per value of x.
pub(crate) fn check_operand(
    name: &'static str,
    len: usize,
    expected: usize,
) -> Result<(), NormError> {
    if len == expected {
        Ok(())
    } else {
        Err(NormError::OperandLength {
            name,
            len,
            expected,
        })
    }
}

/// An `*_into` output has one value per input value.
pub(crate) fn check_output<X, Y>(x: &[X], y: &[Y]) -> Result<(), NormError> {
    if y.len() == x.len() {
        Ok(())
    } else {
        Err(NormError::OutputLength {
            len: y.len(),
            expected: x.len(),
        })
    }
}
