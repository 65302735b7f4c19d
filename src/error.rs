//! The one error type of gpunorm: every bad input and every GPU failure ends here, never in a panic.

use thiserror::Error;

/// What went wrong in a gpunorm call, worded so the caller can fix it.
///
/// Input errors are detected before any work is done, so a failed call has no effect.
/// New variants may come in later releases, so a `match` on it needs a `_` arm.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum NormError {
    /// `features` (or `channels`) was zero.
    #[error("features must be at least 1, got 0")]
    ZeroFeatures,

    /// The input length does not split into whole rows.
    #[error("input length {len} is not a multiple of features ({features}); pass x with rows × {features} values")]
    LengthNotMultiple {
        /// Values in x.
        len: usize,
        /// Values per row (channels × spatial for channels-first).
        features: usize,
    },

    /// A second tensor of an op (the upstream gradient `dy`, a residual) does not have one value
    /// per value of x.
    #[error("{name} has {len} values but x has {expected}; pass one {name} value per value of x")]
    OperandLength {
        /// Which tensor.
        name: &'static str,
        /// Its length.
        len: usize,
        /// The length of x.
        expected: usize,
    },

    /// A per-feature parameter (gamma, beta, running mean or variance) has the wrong length.
    #[error(
        "{name} has {len} values but there are {features} features; pass one value per feature"
    )]
    ParamLength {
        /// Which parameter.
        name: &'static str,
        /// Its length.
        len: usize,
        /// The number of features it must match.
        features: usize,
    },

    /// eps was NaN, infinite or negative.
    #[error("eps must be finite and >= 0, got {0}")]
    InvalidEps(f32),

    /// A value that must be a finite number in a range was not.
    #[error("{name}{} must be {expected}, got {value}", feature.map_or(String::new(), |f| format!(" of feature {f}")))]
    InvalidParam {
        /// Which value.
        name: &'static str,
        /// What it was.
        value: f32,
        /// What it must be.
        expected: &'static str,
        /// The feature it belongs to, for per-feature values.
        feature: Option<usize>,
    },

    /// The output buffer given to an `*_into` method is not as long as the input.
    #[error("output buffer has {len} values but the input has {expected}; pass y with y.len() == x.len()")]
    OutputLength {
        /// Values in y.
        len: usize,
        /// Values in x.
        expected: usize,
    },

    /// The row mask does not have one entry per row.
    #[error(
        "mask has {len} entries but x has {rows} rows; pass one bool per row (false = padding)"
    )]
    MaskLength {
        /// Entries in the mask.
        len: usize,
        /// Rows (positions) in x.
        rows: usize,
    },

    /// Nothing to normalize: an empty batch, or (training) no position left to compute the
    /// batch statistics from.
    #[error("nothing to normalize: {reason}")]
    EmptyBatch {
        /// Why, and what to pass instead: an empty x, or a training mask false everywhere.
        reason: &'static str,
    },

    /// The running-statistics update needs at least two counted rows (unbiased variance).
    #[error("updating running statistics needs at least 2 counted rows for the unbiased variance, got {count}")]
    TooFewRows {
        /// Rows the batch counted.
        count: usize,
    },

    /// A sequence length was longer than the padded sequence length.
    #[error("sequence {index} has length {length}, longer than seq_len {seq_len}")]
    SequenceTooLong {
        /// Which sequence.
        index: usize,
        /// Its length.
        length: usize,
        /// The padded length.
        seq_len: usize,
    },

    /// A GPU tensor that knows its row width was passed with another one.
    #[error("the GpuTensor holds rows of {features} features, but the call says {given}; pass features = {features}")]
    TensorShape {
        /// The tensor's row width.
        features: usize,
        /// The width the call gave.
        given: usize,
    },

    /// GPU tensors of one call hold different element types.
    #[error("GpuTensor {name} holds {found} values but x holds {expected}; every tensor of one call holds the same type (upload or download_as the other one)")]
    ElementTypes {
        /// The argument whose tensor differs from x.
        name: &'static str,
        /// What it holds.
        found: crate::ElementType,
        /// What x holds.
        expected: crate::ElementType,
    },

    /// A named shape's sizes do not multiply to the input's length.
    #[error("{}", shape_length(*len, *batch, *channels, *spatial))]
    ShapeLength {
        /// Values in x.
        len: usize,
        /// The shape's batch size.
        batch: usize,
        /// The shape's channels.
        channels: usize,
        /// The shape's spatial size.
        spatial: usize,
    },

    /// A shape argument that must not be zero was zero.
    #[error("{name} must be at least 1, got 0")]
    ZeroDimension {
        /// Which argument.
        name: &'static str,
    },

    /// The tensor is larger than the GPU can address in one binding, or its size overflows
    /// (`needed` is then `u64::MAX`).
    #[error("{}", too_large(what, *needed, *limit))]
    TooLarge {
        /// What did not fit.
        what: &'static str,
        /// Bytes it needs.
        needed: u64,
        /// Bytes the adapter allows.
        limit: u64,
    },

    /// The device's limits cannot carry the call (for example a device opened with lowered
    /// limits).
    #[error("{op} needs {limit} of at least {needed} but this device has {has}; open the device with the adapter's limits or use Normalizer::cpu()")]
    DeviceLimit {
        /// What gpunorm was doing.
        op: &'static str,
        /// The wgpu limit, by its field name in `wgpu::Limits`.
        limit: &'static str,
        /// What the call needs.
        needed: u64,
        /// What the device allows.
        has: u64,
    },

    /// A wgpu buffer handed to gpunorm cannot be used as asked.
    #[error("buffer {name} cannot be used: {problem}")]
    InvalidBuffer {
        /// Which buffer.
        name: &'static str,
        /// What is wrong with it.
        problem: &'static str,
    },

    /// Bytes handed to `PartialStats::from_bytes` or `PartialGrads::from_bytes` that are not
    /// what they should be, or statistics (BatchNorm's, or a row op's `RowStats`) that cannot
    /// serve the call.
    #[error("the statistics cannot be used: {problem}")]
    InvalidStats {
        /// What is wrong with them.
        problem: &'static str,
    },

    /// Statistics of shards, or a shard and its tensor, disagree on the number of features.
    #[error("part {part} has {features} features but the others have {expected}; every shard must normalize the same features")]
    ShardFeatures {
        /// Which part (0 for the first).
        part: usize,
        /// Its feature count.
        features: usize,
        /// The others'.
        expected: usize,
    },

    /// Another MPI rank could not compute its part of a collective step (its own error says
    /// why); every rank stops here instead of waiting for it.
    #[error(
        "MPI rank {rank} failed its part of the step (see that rank's error); every rank stops"
    )]
    RankFailed {
        /// The first rank that failed.
        rank: usize,
    },

    /// The operation needs a GPU, and this Normalizer is the CPU fallback.
    #[error("{0} needs a GPU but this Normalizer is the CPU fallback; build it with Normalizer::gpu() or Normalizer::from_wgpu()")]
    NotGpu(&'static str),

    /// A synchronous method was called where it cannot wait: on the web, GPU work finishes only
    /// while the browser's event loop runs, so a GPU `Normalizer` there runs the `_async`
    /// methods alone (the CPU fallback runs both).
    #[error("{0} cannot wait for the GPU on this thread (the browser finishes GPU work only while its event loop runs); await {0}_async instead")]
    NeedsAwait(&'static str),

    /// No GPU adapter could be found (only from [`Normalizer::gpu`](crate::Normalizer::gpu)).
    #[error("no GPU adapter found ({0}); install a Vulkan, Metal, DX12 or GL driver (on Linux: apt-get install mesa-vulkan-drivers) or use Normalizer::cpu()")]
    NoAdapter(String),

    /// The adapter was found but refused to open a device.
    #[error("the GPU adapter could not open a device: {0}")]
    RequestDevice(String),

    /// The GPU device is lost (destroyed, reset by its driver, or out of memory for good): no
    /// later call on this `Normalizer` can succeed.
    #[error("the GPU device is lost ({0}); build a new Normalizer (or use Normalizer::cpu())")]
    DeviceLost(String),

    /// wgpu reported a validation or out-of-memory error during an operation.
    #[error("GPU error during {op}: {message}")]
    Gpu {
        /// What gpunorm was doing.
        op: &'static str,
        /// wgpu's description.
        message: String,
    },
}

fn too_large(what: &str, needed: u64, limit: u64) -> String {
    if needed == u64::MAX {
        format!("the size of {what} overflows what this machine can address; use smaller shapes")
    } else {
        format!("{what} needs {needed} bytes in one GPU binding but this adapter allows {limit}; use smaller rows or Normalizer::cpu()")
    }
}

fn shape_length(len: usize, batch: usize, channels: usize, spatial: usize) -> String {
    let product = batch as u128 * channels as u128 * spatial as u128;
    format!(
        "input has {len} values but the shape is batch {batch} × channels {channels} × spatial \
         {spatial} = {product}; pass x laid out as [batch, channels, spatial]"
    )
}
