//! gpunorm normalizes large f32 batches — LayerNorm over each row, BatchNorm over each feature
//! (training with masks and running statistics, and eval) — with WGSL compute shaders on any GPU
//! that wgpu reaches (Vulkan, Metal, DX12, GL), and falls back to a parallel CPU path where no GPU
//! exists. Every result of every backend is tested against the f64 [`reference`](mod@reference).
//!
//! ```
//! use gpunorm::{BatchNorm, LayerNorm, Normalizer};
//!
//! # fn main() -> Result<(), gpunorm::NormError> {
//! // The best GPU adapter, or the CPU fallback where there is none.
//! let norm = Normalizer::new()?;
//! println!("running on {}", norm.describe());
//!
//! // Two rows of three features: "I" = [1, 2, 3] and a padded position.
//! let x = [1.0, 2.0, 3.0, 0.0, 0.0, 0.0];
//! let y = norm.layer_norm(&x, 3, &LayerNorm::default())?;
//! assert!((y[0] + 1.2247).abs() < 1e-3 && y[1].abs() < 1e-6 && (y[2] - 1.2247).abs() < 1e-3);
//! assert_eq!(&y[3..], &[0.0, 0.0, 0.0]);
//!
//! // BatchNorm over the two positions, the padded one left out of the statistics.
//! let mask = [true, false];
//! let out = norm.batch_norm_train(&x, 3, &BatchNorm { mask: Some(&mask), ..Default::default() })?;
//! assert_eq!((out.count, out.mean[0]), (1, 1.0));
//!
//! // Bad input is an error, never a panic.
//! assert!(norm.layer_norm(&x, 4, &LayerNorm::default()).is_err());
//! # Ok(())
//! # }
//! ```
//!
//! The input is row-major: `x.len() / features` rows, each normalized over its own `features`
//! values with the biased variance, y = (x − mean) / sqrt(var + eps) · gamma + beta.
//!
//! Accuracy: both backends compute the statistics of `x − x[row, 0]` (a shifted two-pass), so rows
//! with a large offset and a tiny spread stay exact to f32 rounding; the test suite holds them to
//! max |y − ref| / max(1, |ref|) < 1e-4 on ordinary data and < 1e-3 on rows with mean 1e4 and
//! spread 1e-2. GPU results are bitwise reproducible from run to run.

#![warn(missing_docs)]

mod batch_norm;
mod context;
mod cpu;
mod error;
mod layer_norm;
pub mod reference;
mod shaders;
mod tensor;

use std::time::Duration;

pub use batch_norm::{mask_from_lengths, BatchNorm, BatchNormOutput, BatchStats, RunningStats};
pub use error::NormError;
pub use layer_norm::LayerNorm;
pub use tensor::GpuTensor;

use batch_norm::{Shape, Stats};
use context::GpuContext;

/// The entry point: a GPU (or the CPU fallback) ready to normalize batches.
///
/// Build it once and share it: it is `Send + Sync`, and its compiled pipelines are cached for
/// every later call. Calls from several threads are safe.
pub struct Normalizer {
    backend: Backend,
}

enum Backend {
    Cpu,
    Gpu(Box<GpuContext>),
}

impl std::fmt::Debug for Normalizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Normalizer")
            .field("backend", &self.describe())
            .finish()
    }
}

/// Where an op's time went, for callers that measure (returned by the `*_into` methods).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timing {
    /// GPU kernel time from timestamp queries, summed over every dispatch of the op. `None` on
    /// the CPU fallback and on adapters without `TIMESTAMP_QUERY`.
    pub kernel: Option<Duration>,
}

impl Normalizer {
    /// The best GPU adapter wgpu finds (high performance), or the CPU fallback when there is
    /// none (logged at `warn` level with the reason). Errors only when an adapter exists but
    /// cannot be opened.
    pub fn new() -> Result<Normalizer, NormError> {
        match GpuContext::new() {
            Ok(ctx) => Ok(Self::from_context(ctx)),
            Err(NormError::NoAdapter(why)) => {
                log::warn!("gpunorm: no GPU adapter ({why}); using the CPU fallback");
                Ok(Self::cpu())
            }
            Err(e) => Err(e),
        }
    }

    /// A GPU, or [`NormError::NoAdapter`] when wgpu finds none.
    pub fn gpu() -> Result<Normalizer, NormError> {
        GpuContext::new().map(Self::from_context)
    }

    /// The CPU fallback: multithreaded (rayon), same algorithm and tolerances as the GPU.
    pub fn cpu() -> Normalizer {
        Normalizer {
            backend: Backend::Cpu,
        }
    }

    fn from_context(ctx: GpuContext) -> Normalizer {
        Normalizer {
            backend: Backend::Gpu(Box::new(ctx)),
        }
    }

    /// True when ops run on a GPU adapter (which may be a software one such as llvmpipe; see
    /// [`Normalizer::adapter_info`]).
    pub fn is_gpu(&self) -> bool {
        matches!(self.backend, Backend::Gpu(_))
    }

    /// The GPU adapter's name, API, device type and driver; `None` on the CPU fallback.
    pub fn adapter_info(&self) -> Option<wgpu::AdapterInfo> {
        match &self.backend {
            Backend::Gpu(ctx) => Some(ctx.device.adapter_info()),
            Backend::Cpu => None,
        }
    }

    /// One line for people: "NVIDIA H100 80GB HBM3 (Vulkan, DiscreteGpu, driver …)" or
    /// "CPU fallback (N threads)".
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Gpu(ctx) => context::describe_adapter(&ctx.device.adapter_info()),
            Backend::Cpu => format!("CPU fallback ({} threads)", rayon::current_num_threads()),
        }
    }

    /// Frees the GPU buffers kept for reuse. Calls keep their large buffers (input, output,
    /// staging) in a pool of up to 2 GiB so the next call of the same shape allocates nothing;
    /// call this after a one-off huge batch to give that memory back. No-op on the CPU fallback.
    pub fn release_buffers(&self) {
        if let Backend::Gpu(ctx) = &self.backend {
            ctx.release_buffers();
        }
    }

    /// Whether GPU kernel times can be read ([`Timing::kernel`]).
    pub fn has_kernel_timing(&self) -> bool {
        matches!(&self.backend, Backend::Gpu(ctx) if ctx.timestamps)
    }

    /// LayerNorm of every `features`-long row of `x` (row-major).
    ///
    /// Errors, with nothing computed, when `features` is 0, `x.len()` is not a multiple of it,
    /// gamma or beta does not have `features` values, or eps is NaN, infinite or negative.
    /// An empty `x` gives an empty output. A NaN or infinity in a row makes that row NaN only.
    pub fn layer_norm(
        &self,
        x: &[f32],
        features: usize,
        opts: &LayerNorm<'_>,
    ) -> Result<Vec<f32>, NormError> {
        let mut y = vec![0f32; x.len()];
        self.layer_norm_into(x, features, opts, &mut y)?;
        Ok(y)
    }

    /// [`Normalizer::layer_norm`] into a buffer the caller owns (and may reuse), `y.len() ==
    /// x.len()`; returns where the time went.
    pub fn layer_norm_into(
        &self,
        x: &[f32],
        features: usize,
        opts: &LayerNorm<'_>,
        y: &mut [f32],
    ) -> Result<Timing, NormError> {
        layer_norm::validate(x, features, opts)?;
        check_output(x, y)?;
        let kernel = match &self.backend {
            Backend::Gpu(ctx) => {
                let _serial = ctx.exclusive();
                layer_norm::gpu(ctx, x, y, features, opts)?
            }
            Backend::Cpu => {
                cpu::layer_norm::layer_norm(x, y, features, opts);
                None
            }
        };
        Ok(Timing { kernel })
    }

    /// BatchNorm in training mode on a features-last `[rows, features]` tensor (a transformer's
    /// `[batch, seq, d_model]` flattened): per-feature mean and biased variance over the rows
    /// where `opts.mask` is true, then y = (x − mean) / sqrt(var + eps) · gamma + beta. Masked
    /// rows are left out of the statistics and written as 0.
    ///
    /// Errors, with nothing computed, on zero features, a length that is not a multiple of
    /// `features`, an empty batch, a mask without one entry per row or with every row masked
    /// out, gamma or beta without one value per feature, and eps NaN, infinite or negative.
    pub fn batch_norm_train(
        &self,
        x: &[f32],
        features: usize,
        opts: &BatchNorm<'_>,
    ) -> Result<BatchNormOutput, NormError> {
        self.train_alloc(x, &Shape::features_last(x, features)?, opts)
    }

    /// [`Normalizer::batch_norm_train`] into a buffer the caller owns, `y.len() == x.len()`;
    /// returns the batch statistics and where the time went.
    pub fn batch_norm_train_into(
        &self,
        x: &[f32],
        features: usize,
        opts: &BatchNorm<'_>,
        y: &mut [f32],
    ) -> Result<(BatchStats, Timing), NormError> {
        self.train(x, &Shape::features_last(x, features)?, opts, y)
    }

    /// BatchNorm in eval mode on a features-last tensor: one elementwise pass with the running
    /// statistics, y = (x − running_mean) / sqrt(running_var + eps) · gamma + beta; masked rows
    /// are written as 0. Errors as [`Normalizer::batch_norm_train`] does, and when the running
    /// statistics do not have one mean and one variance (>= 0) per feature.
    pub fn batch_norm_eval(
        &self,
        x: &[f32],
        features: usize,
        opts: &BatchNorm<'_>,
        stats: &RunningStats,
    ) -> Result<Vec<f32>, NormError> {
        let mut y = vec![0f32; x.len()];
        self.batch_norm_eval_into(x, features, opts, stats, &mut y)?;
        Ok(y)
    }

    /// [`Normalizer::batch_norm_eval`] into a buffer the caller owns, `y.len() == x.len()`.
    pub fn batch_norm_eval_into(
        &self,
        x: &[f32],
        features: usize,
        opts: &BatchNorm<'_>,
        stats: &RunningStats,
        y: &mut [f32],
    ) -> Result<Timing, NormError> {
        self.eval(x, &Shape::features_last(x, features)?, opts, stats, y)
    }

    /// BatchNorm in training mode on a channels-first `[batch, channels, spatial]` tensor (NCHW
    /// with spatial = H·W, or NCL), what CNN users hand to BatchNorm2d: statistics per channel
    /// over batch × spatial. `opts.mask`, if given, has one entry per (batch, spatial) position,
    /// batch-major. Errors as [`Normalizer::batch_norm_train`] does, and on `spatial` 0.
    pub fn batch_norm_train_channels_first(
        &self,
        x: &[f32],
        channels: usize,
        spatial: usize,
        opts: &BatchNorm<'_>,
    ) -> Result<BatchNormOutput, NormError> {
        self.train_alloc(x, &Shape::channels_first(x, channels, spatial)?, opts)
    }

    /// BatchNorm in eval mode on a channels-first `[batch, channels, spatial]` tensor.
    pub fn batch_norm_eval_channels_first(
        &self,
        x: &[f32],
        channels: usize,
        spatial: usize,
        opts: &BatchNorm<'_>,
        stats: &RunningStats,
    ) -> Result<Vec<f32>, NormError> {
        let shape = Shape::channels_first(x, channels, spatial)?;
        let mut y = vec![0f32; x.len()];
        self.eval(x, &shape, opts, stats, &mut y)?;
        Ok(y)
    }

    fn train_alloc(
        &self,
        x: &[f32],
        shape: &Shape,
        opts: &BatchNorm<'_>,
    ) -> Result<BatchNormOutput, NormError> {
        let mut y = vec![0f32; x.len()];
        let (s, _) = self.train(x, shape, opts, &mut y)?;
        Ok(BatchNormOutput {
            y,
            mean: s.mean,
            var: s.var,
            count: s.count,
        })
    }

    fn train(
        &self,
        x: &[f32],
        shape: &Shape,
        opts: &BatchNorm<'_>,
        y: &mut [f32],
    ) -> Result<(BatchStats, Timing), NormError> {
        let (count, first) = batch_norm::validate(shape, opts)?;
        check_output(x, y)?;
        let ((mean, var), kernel) = match &self.backend {
            Backend::Gpu(ctx) => {
                let _serial = ctx.exclusive();
                let io = batch_norm::Io::Host { x, y };
                let out = batch_norm::gpu(ctx, io, shape, opts, Stats::Batch { first })?;
                (out.stats.expect("training returns statistics"), out.kernel)
            }
            Backend::Cpu => (cpu::batch_norm::train(x, y, shape, opts, first), None),
        };
        Ok((BatchStats { mean, var, count }, Timing { kernel }))
    }

    fn eval(
        &self,
        x: &[f32],
        shape: &Shape,
        opts: &BatchNorm<'_>,
        stats: &RunningStats,
        y: &mut [f32],
    ) -> Result<Timing, NormError> {
        batch_norm::validate(shape, opts)?;
        batch_norm::validate_stats(shape, stats)?;
        check_output(x, y)?;
        let kernel = match &self.backend {
            Backend::Gpu(ctx) => {
                let _serial = ctx.exclusive();
                batch_norm::gpu(
                    ctx,
                    batch_norm::Io::Host { x, y },
                    shape,
                    opts,
                    Stats::Running(stats),
                )?
                .kernel
            }
            Backend::Cpu => {
                cpu::batch_norm::eval(x, y, shape, opts, stats);
                None
            }
        };
        Ok(Timing { kernel })
    }
}

fn check_output(x: &[f32], y: &[f32]) -> Result<(), NormError> {
    if y.len() == x.len() {
        Ok(())
    } else {
        Err(NormError::OutputLength {
            len: y.len(),
            expected: x.len(),
        })
    }
}

/// The number of rows of a row-major tensor, or the error that says why it has none.
pub(crate) fn rows_of(x: &[f32], features: usize) -> Result<usize, NormError> {
    rows_of_len(x.len(), features)
}

/// [`rows_of`] for a tensor of `len` values.
pub(crate) fn rows_of_len(len: usize, features: usize) -> Result<usize, NormError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizer_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Normalizer>();
    }
}

/// The README's example, compiled and run as a doctest so it cannot go stale.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
