//! The one error type of gpunorm: every bad input and every GPU failure ends here, never in a panic.

use thiserror::Error;

/// What went wrong in a gpunorm call, worded so the caller can fix it.
///
/// Input errors are detected before any work is done, so a failed call has no effect.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum NormError {
    /// `features` (or `channels`) was zero.
    #[error("features must be at least 1, got 0")]
    ZeroFeatures,

    /// The input length does not split into whole rows.
    #[error("input length {len} is not a multiple of features ({features}); pass x with rows × {features} values")]
    LengthNotMultiple { len: usize, features: usize },

    /// A per-feature parameter (gamma, beta, running mean or variance) has the wrong length.
    #[error(
        "{name} has {len} values but there are {features} features; pass one value per feature"
    )]
    ParamLength {
        name: &'static str,
        len: usize,
        features: usize,
    },

    /// eps was NaN, infinite or negative.
    #[error("eps must be finite and >= 0, got {0}")]
    InvalidEps(f32),

    /// A value that must be a finite number in a range was not.
    #[error("{name} must be {expected}, got {value}")]
    InvalidParam {
        name: &'static str,
        value: f32,
        expected: &'static str,
    },

    /// The output buffer given to an `*_into` method is not as long as the input.
    #[error("output buffer has {len} values but the input has {expected}; pass y with y.len() == x.len()")]
    OutputLength { len: usize, expected: usize },

    /// The row mask does not have one entry per row.
    #[error(
        "mask has {len} entries but x has {rows} rows; pass one bool per row (false = padding)"
    )]
    MaskLength { len: usize, rows: usize },

    /// No row was left to compute statistics from.
    #[error("no rows to compute statistics from ({reason}); pass at least one unmasked row")]
    EmptyBatch { reason: &'static str },

    /// The running-statistics update needs at least two counted rows (unbiased variance).
    #[error("updating running statistics needs at least 2 counted rows for the unbiased variance, got {count}")]
    TooFewRows { count: usize },

    /// A sequence length was longer than the padded sequence length.
    #[error("sequence {index} has length {length}, longer than seq_len {seq_len}")]
    SequenceTooLong {
        index: usize,
        length: usize,
        seq_len: usize,
    },

    /// A shape argument that must not be zero was zero.
    #[error("{name} must be at least 1, got 0")]
    ZeroDimension { name: &'static str },

    /// The tensor is larger than the GPU can address in one binding.
    #[error("{what} needs {needed} bytes in one GPU binding but this adapter allows {limit}; use smaller rows or Normalizer::cpu()")]
    TooLarge {
        what: &'static str,
        needed: u64,
        limit: u64,
    },

    /// No GPU adapter could be found (only from [`Normalizer::gpu`](crate::Normalizer::gpu)).
    #[error("no GPU adapter found ({0}); install a Vulkan, Metal, DX12 or GL driver (on Linux: apt-get install mesa-vulkan-drivers) or use Normalizer::cpu()")]
    NoAdapter(String),

    /// The adapter was found but refused to open a device.
    #[error("the GPU adapter could not open a device: {0}")]
    RequestDevice(String),

    /// wgpu reported a validation, out-of-memory or device-lost error during an operation.
    #[error("GPU error during {op}: {message}")]
    Gpu { op: &'static str, message: String },
}
