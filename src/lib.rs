//! gpunorm normalizes large f32 batches — LayerNorm and RMSNorm over each row, BatchNorm over
//! each feature (training with masks and running statistics, and eval) — with WGSL compute shaders on any GPU
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
//! Every op has an `_async` twin ([`Normalizer::layer_norm_async`], [`Normalizer::new_async`],
//! ...) that awaits the GPU instead of blocking, with a `Send` future; the synchronous methods wait
//! for those on the calling thread. On `wasm32` gpunorm runs on the browser's WebGPU, where only
//! the `_async` forms can run GPU work ([`NormError::NeedsAwait`] says so), and the CPU fallback
//! runs on one thread.
//!
//! Accuracy: both backends compute the statistics of `x − x[row, 0]` (a shifted two-pass), so rows
//! with a large offset and a tiny spread stay exact to f32 rounding; the test suite holds them to
//! max |y − ref| / max(1, |ref|) < 1e-4 on ordinary data and < 1e-3 on rows with mean 1e4 and
//! spread 1e-2. GPU results are bitwise reproducible from run to run.

#![warn(missing_docs)]

mod cpu;
mod element;
mod error;
mod gpu;
#[cfg(feature = "mpi")]
pub mod mpi;
mod normalizer;
mod ops;
pub mod reference;

/// The wgpu gpunorm is built on, for callers who pass their own device
/// ([`Normalizer::from_wgpu`]) or buffers ([`Normalizer::encode_layer_norm`]).
pub use wgpu;

/// The half-precision types gpunorm's ops take beside f32: `half::f16` and `half::bf16`.
pub use half;

pub use element::{Element, ElementType};
pub use error::NormError;
pub use gpu::encode::{Encode, RunningSpans};
pub use gpu::tensor::{
    GpuAddNormOutput, GpuGrads, GpuRmsNormGrads, GpuRowStats, GpuRunningStats, GpuSavedNormOutput,
    GpuTensor,
};
pub use normalizer::Normalizer;
pub use ops::batch_norm::{
    mask_from_lengths, BatchNorm, BatchNormGrads, BatchNormOutput, BatchStats, ChannelsFirst,
    RunningStats,
};
pub use ops::layer_norm::{AddNormOutput, LayerNorm, LayerNormGrads, RowStats, SavedNormOutput};
pub use ops::partial::{ColumnGrads, ColumnStats, PartialGrads, PartialStats};
pub use ops::rms_norm::{RmsNorm, RmsNormGrads};
pub use ops::{ParamGrads, Timing};

/// The README's example, compiled and run as a doctest so it cannot go stale.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
