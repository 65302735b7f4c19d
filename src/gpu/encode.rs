//! Ops recorded into a caller's command encoder on spans of the caller's buffers: the device
//! side of `Normalizer::encode` and `encode_layer_norm`. Every span is checked before anything
//! is recorded, so a refused call leaves the encoder as it was.

use wgpu::BufferSlice;

use super::batch_norm::{self, Mode, Recorded};
use super::context::GpuContext;
use super::layer_norm::{self, Affine, BackwardRows, BackwardScratch, Param, Rows};
use super::pool::Lifetime;
use crate::ops::batch_norm::Shape;
use crate::ops::layer_norm::RowNorm;
use crate::ops::{check_eps, rows_of};
use crate::{ElementType, LayerNorm, NormError};

/// An op of the LayerNorm family or of BatchNorm for
/// [`Normalizer::encode`](crate::Normalizer::encode) to record into the caller's command
/// encoder, on spans of the caller's buffers (`buffer.slice(start..end)`); the caller submits
/// it. Parameters on the device mean nothing is uploaded: the op records its kernels, one small
/// uniform, and for BatchNorm copies between the caller's per-feature spans and its own.
///
/// x's span sets the shape: `x.size() / 4` values in rows of `features` (BatchNorm:
/// `[positions, features]`, or `[batch, features, spatial]`). Every other tensor span (y,
/// residual, sum, dy, dx) holds exactly as many values, a BatchNorm mask one u32 per position,
/// and gamma, beta, dgamma, dbeta and running statistics exactly `features` values. Each is
/// checked before anything is recorded:
/// - the spans the kernels bind (x, y, residual, sum, dy, dx, BatchNorm's mask, and the
///   LayerNorm family's gamma and beta) need `BufferUsages::STORAGE` and an offset that is a
///   multiple of the device's `min_storage_buffer_offset_alignment` (256 on most adapters);
/// - the spans that are copied need offsets that are multiples of 4: dgamma and dbeta
///   `BufferUsages::COPY_DST`, BatchNorm's gamma, beta and eval's mean and var `COPY_SRC`, and
///   BatchNorm's running statistics both;
/// - the tensor fits one binding and one dispatch, and BatchNorm's per-column statistics (32
///   bytes a column) one binding too (else `TooLarge`: the host-slice forms stream larger ones);
/// - a buffer the kernels write (y, sum, dx) holds none of the op's inputs, since wgpu binds a
///   buffer read-only or read-write in one dispatch, not both; and no output overlaps another
///   span of the op;
/// - the buffers and the encoder come from this `Normalizer`'s device, which gpunorm cannot
///   check (see [`Normalizer::encode_layer_norm`](crate::Normalizer::encode_layer_norm)).
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum Encode<'a> {
    /// LayerNorm of x's rows into y, as [`Normalizer::layer_norm`](crate::Normalizer::layer_norm).
    LayerNorm {
        /// The input rows.
        x: BufferSlice<'a>,
        /// The output, shaped as x.
        y: BufferSlice<'a>,
        /// Values per row.
        features: usize,
        /// Added to the variance; finite and >= 0.
        eps: f32,
        /// Per-feature scale, or None for 1.
        gamma: Option<BufferSlice<'a>>,
        /// Per-feature shift, or None for 0.
        beta: Option<BufferSlice<'a>>,
    },
    /// RMSNorm of x's rows into y, as [`Normalizer::rms_norm`](crate::Normalizer::rms_norm).
    RmsNorm {
        /// The input rows.
        x: BufferSlice<'a>,
        /// The output, shaped as x.
        y: BufferSlice<'a>,
        /// Values per row.
        features: usize,
        /// Added to the mean square; finite and >= 0.
        eps: f32,
        /// Per-feature scale, or None for 1.
        gamma: Option<BufferSlice<'a>>,
    },
    /// sum = x + residual and y = LayerNorm of sum's rows, in one pass, as
    /// [`Normalizer::add_layer_norm`](crate::Normalizer::add_layer_norm).
    AddLayerNorm {
        /// The input rows.
        x: BufferSlice<'a>,
        /// Added to x.
        residual: BufferSlice<'a>,
        /// x + residual, rounded to f32 once.
        sum: BufferSlice<'a>,
        /// The LayerNorm of sum.
        y: BufferSlice<'a>,
        /// Values per row.
        features: usize,
        /// Added to the variance; finite and >= 0.
        eps: f32,
        /// Per-feature scale, or None for 1.
        gamma: Option<BufferSlice<'a>>,
        /// Per-feature shift, or None for 0.
        beta: Option<BufferSlice<'a>>,
    },
    /// sum = x + residual and y = RMSNorm of sum's rows, in one pass, as
    /// [`Normalizer::add_rms_norm`](crate::Normalizer::add_rms_norm).
    AddRmsNorm {
        /// The input rows.
        x: BufferSlice<'a>,
        /// Added to x.
        residual: BufferSlice<'a>,
        /// x + residual, rounded to f32 once.
        sum: BufferSlice<'a>,
        /// The RMSNorm of sum.
        y: BufferSlice<'a>,
        /// Values per row.
        features: usize,
        /// Added to the mean square; finite and >= 0.
        eps: f32,
        /// Per-feature scale, or None for 1.
        gamma: Option<BufferSlice<'a>>,
    },
    /// The gradients of LayerNorm given dy, as
    /// [`Normalizer::layer_norm_backward`](crate::Normalizer::layer_norm_backward).
    LayerNormBackward {
        /// The forward's input rows.
        x: BufferSlice<'a>,
        /// The upstream gradient, shaped as x.
        dy: BufferSlice<'a>,
        /// The gradient of x, shaped as x.
        dx: BufferSlice<'a>,
        /// The gradient of gamma: `features` values.
        dgamma: BufferSlice<'a>,
        /// The gradient of beta: `features` values.
        dbeta: BufferSlice<'a>,
        /// Values per row.
        features: usize,
        /// The forward's eps.
        eps: f32,
        /// The forward's gamma, or None for 1.
        gamma: Option<BufferSlice<'a>>,
    },
    /// The gradients of RMSNorm given dy, as
    /// [`Normalizer::rms_norm_backward`](crate::Normalizer::rms_norm_backward).
    RmsNormBackward {
        /// The forward's input rows.
        x: BufferSlice<'a>,
        /// The upstream gradient, shaped as x.
        dy: BufferSlice<'a>,
        /// The gradient of x, shaped as x.
        dx: BufferSlice<'a>,
        /// The gradient of gamma: `features` values.
        dgamma: BufferSlice<'a>,
        /// Values per row.
        features: usize,
        /// The forward's eps.
        eps: f32,
        /// The forward's gamma, or None for 1.
        gamma: Option<BufferSlice<'a>>,
    },
    /// BatchNorm training of x into y with the batch's statistics, as
    /// [`Normalizer::batch_norm_train_channels_first`](crate::Normalizer::batch_norm_train_channels_first)
    /// (features-last where `spatial` is 1), the statistics folded into running ones on the
    /// device where `running` is given. A batch that counts fewer than two positions leaves them
    /// as they were. Columns whose statistics leave f32's range (spreads past about 1e19) are
    /// not redone in f64, as the host-slice forms redo them.
    BatchNormTrain {
        /// The input: `[positions, features]` (`spatial` 1) or `[batch, features, spatial]`.
        x: BufferSlice<'a>,
        /// The output, shaped as x; 0 on masked positions.
        y: BufferSlice<'a>,
        /// Features (channels): the statistics are per feature.
        features: usize,
        /// Values per feature of one batch item: 1 for features-last, H·W for channels-first.
        spatial: usize,
        /// Added to the variance; finite and >= 0.
        eps: f32,
        /// Per-feature scale, or None for 1 (copied: see [`Encode`]).
        gamma: Option<BufferSlice<'a>>,
        /// Per-feature shift, or None for 0 (copied).
        beta: Option<BufferSlice<'a>>,
        /// One u32 per position (row, or (item, spatial) pair), 0 for padding: left out of the
        /// statistics and written as 0. None counts every position.
        mask: Option<BufferSlice<'a>>,
        /// Running statistics to update, or None.
        running: Option<RunningSpans<'a>>,
    },
    /// BatchNorm eval of x into y with running statistics on the device, as
    /// [`Normalizer::batch_norm_eval_channels_first`](crate::Normalizer::batch_norm_eval_channels_first).
    BatchNormEval {
        /// The input, shaped as for `BatchNormTrain`.
        x: BufferSlice<'a>,
        /// The output, shaped as x; 0 on masked positions.
        y: BufferSlice<'a>,
        /// Features (channels).
        features: usize,
        /// Values per feature of one batch item: 1 for features-last.
        spatial: usize,
        /// Added to the variance; finite and >= 0.
        eps: f32,
        /// Per-feature scale, or None for 1 (copied).
        gamma: Option<BufferSlice<'a>>,
        /// Per-feature shift, or None for 0 (copied).
        beta: Option<BufferSlice<'a>>,
        /// One u32 per position, 0 for padding (written as 0), or None.
        mask: Option<BufferSlice<'a>>,
        /// The running mean: `features` values (copied).
        mean: BufferSlice<'a>,
        /// The running (unbiased) variance: `features` values (copied).
        var: BufferSlice<'a>,
    },
    /// The gradients of BatchNorm training given dy, as
    /// [`Normalizer::batch_norm_backward_channels_first`](crate::Normalizer::batch_norm_backward_channels_first):
    /// through the batch statistics, recomputed from x.
    BatchNormBackward {
        /// The forward's input.
        x: BufferSlice<'a>,
        /// The upstream gradient, shaped as x.
        dy: BufferSlice<'a>,
        /// The gradient of x, shaped as x; 0 on masked positions.
        dx: BufferSlice<'a>,
        /// The gradient of gamma: `features` values.
        dgamma: BufferSlice<'a>,
        /// The gradient of beta: `features` values.
        dbeta: BufferSlice<'a>,
        /// Features (channels).
        features: usize,
        /// Values per feature of one batch item: 1 for features-last.
        spatial: usize,
        /// The forward's eps.
        eps: f32,
        /// The forward's gamma, or None for 1 (copied).
        gamma: Option<BufferSlice<'a>>,
        /// The forward's mask: one u32 per position, 0 for padding, or None.
        mask: Option<BufferSlice<'a>>,
    },
}

/// BatchNorm's running statistics in a caller's buffers, for [`Encode::BatchNormTrain`] to
/// update in place: new = (1 − momentum) · old + momentum · batch, with the batch's unbiased
/// variance, as [`RunningStats::update`](crate::RunningStats::update) does on the host. They are
/// copied in and out (`COPY_SRC | COPY_DST`, offsets multiples of 4).
///
/// A training step and an eval pass of padded sequences, recorded with no host round trip:
///
/// ```no_run
/// # fn main() -> Result<(), gpunorm::NormError> {
/// use gpunorm::{wgpu, Encode, Normalizer, RunningSpans};
/// let norm = Normalizer::gpu()?;
/// let (device, queue) = norm.wgpu().unwrap();
/// let (rows, features) = (512u64, 256u64);
/// let buffer = |size, usage| {
///     device.create_buffer(&wgpu::BufferDescriptor {
///         label: None, size, usage, mapped_at_creation: false,
///     })
/// };
/// use wgpu::BufferUsages as U;
/// let x = buffer(rows * features * 4, U::STORAGE | U::COPY_DST);
/// let y = buffer(rows * features * 4, U::STORAGE | U::COPY_SRC);
/// // One u32 per row, 0 for padding.
/// let mask = buffer(rows * 4, U::STORAGE | U::COPY_DST);
/// // Running mean, then running variance (start them at 0 and 1).
/// let running = buffer(2 * features * 4, U::COPY_SRC | U::COPY_DST);
/// let (mean, var) = (running.slice(..features * 4), running.slice(features * 4..));
/// let mut encoder = device.create_command_encoder(&Default::default());
/// norm.encode(&mut encoder, &Encode::BatchNormTrain {
///     x: x.slice(..), y: y.slice(..), features: features as usize, spatial: 1, eps: 1e-5,
///     gamma: None, beta: None, mask: Some(mask.slice(..)),
///     running: Some(RunningSpans { mean, var, momentum: 0.1 }),
/// })?;
/// norm.encode(&mut encoder, &Encode::BatchNormEval {
///     x: x.slice(..), y: y.slice(..), features: features as usize, spatial: 1, eps: 1e-5,
///     gamma: None, beta: None, mask: Some(mask.slice(..)), mean, var,
/// })?;
/// queue.submit([encoder.finish()]);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy)]
pub struct RunningSpans<'a> {
    /// The running mean: `features` values.
    pub mean: BufferSlice<'a>,
    /// The running (unbiased) variance: `features` values.
    pub var: BufferSlice<'a>,
    /// Weight of the batch, in [0, 1].
    pub momentum: f32,
}

/// How an op uses a span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Use {
    /// A tensor the kernels read.
    Read,
    /// A tensor the kernels write.
    Write,
    /// A per-feature parameter the kernels read.
    Param,
    /// A per-feature gradient copied in after the kernels.
    Copy,
    /// One u32 per position the kernels read (BatchNorm's mask).
    Mask,
    /// A per-feature input copied out before the kernels (BatchNorm's).
    Source,
    /// Per-feature values copied out before the kernels and back in after them (BatchNorm's
    /// running statistics).
    Running,
}

impl Use {
    /// The usage its buffer needs, the alignment of its offset, and why, for the error.
    fn needs(self, ctx: &GpuContext) -> (wgpu::BufferUsages, u64, &'static str, &'static str) {
        use wgpu::BufferUsages as U;
        let storage = (
            U::STORAGE,
            ctx.storage_offset_alignment(),
            "it lacks BufferUsages::STORAGE",
            "its offset is not a multiple of the device's min_storage_buffer_offset_alignment",
        );
        let four = "its offset is not a multiple of 4";
        match self {
            Use::Read | Use::Write | Use::Param | Use::Mask => storage,
            Use::Copy => (
                U::COPY_DST,
                4,
                "it lacks BufferUsages::COPY_DST (the gradients are copied in)",
                four,
            ),
            Use::Source => (
                U::COPY_SRC,
                4,
                "it lacks BufferUsages::COPY_SRC (BatchNorm's per-feature inputs are copied)",
                four,
            ),
            Use::Running => (
                U::COPY_SRC | U::COPY_DST,
                4,
                "it lacks BufferUsages::COPY_SRC or COPY_DST (running statistics are copied out \
                 and back)",
                four,
            ),
        }
    }
}

/// A span with its argument name and use.
type Span<'a> = (&'static str, BufferSlice<'a>, Use);

/// An op of [`Encode`] in the form its family records.
enum Lowering<'a> {
    Rows(Lowered<'a>),
    Batch(BatchNormOp<'a>),
}

impl<'a> Lowering<'a> {
    fn of(op: &Encode<'a>) -> Lowering<'a> {
        match op {
            Encode::BatchNormTrain { .. }
            | Encode::BatchNormEval { .. }
            | Encode::BatchNormBackward { .. } => Lowering::Batch(BatchNormOp::of(op)),
            _ => Lowering::Rows(Lowered::of(op)),
        }
    }
}

/// Every op of the LayerNorm family in one form: the row kernels' operands, by role.
struct Lowered<'a> {
    name: &'static str,
    kind: RowNorm,
    features: usize,
    affine: Affine<'a>,
    x: BufferSlice<'a>,
    /// y, or dx for the backward pass.
    out: (&'static str, BufferSlice<'a>),
    /// The fused add's residual and sum.
    add: Option<(BufferSlice<'a>, BufferSlice<'a>)>,
    /// The backward pass's dy, dgamma and dbeta (LayerNorm's only).
    backward: Option<(BufferSlice<'a>, BufferSlice<'a>, Option<BufferSlice<'a>>)>,
}

impl<'a> Lowered<'a> {
    fn of(op: &Encode<'a>) -> Lowered<'a> {
        let device = |p: Option<BufferSlice<'a>>| p.map_or(Param::None, Param::Device);
        let affine = |eps, gamma, beta| Affine {
            eps,
            gamma: device(gamma),
            beta: device(beta),
        };
        let lowered = |name, kind, features, affine, x, out| Lowered {
            name,
            kind,
            features,
            affine,
            x,
            out,
            add: None,
            backward: None,
        };
        use RowNorm::{Layer, Rms};
        match *op {
            Encode::LayerNorm {
                x,
                y,
                features,
                eps,
                gamma,
                beta,
            } => lowered(
                "encode LayerNorm",
                Layer,
                features,
                affine(eps, gamma, beta),
                x,
                ("y", y),
            ),
            Encode::RmsNorm {
                x,
                y,
                features,
                eps,
                gamma,
            } => lowered(
                "encode RmsNorm",
                Rms,
                features,
                affine(eps, gamma, None),
                x,
                ("y", y),
            ),
            Encode::AddLayerNorm {
                x,
                residual,
                sum,
                y,
                features,
                eps,
                gamma,
                beta,
            } => Lowered {
                add: Some((residual, sum)),
                ..lowered(
                    "encode AddLayerNorm",
                    Layer,
                    features,
                    affine(eps, gamma, beta),
                    x,
                    ("y", y),
                )
            },
            Encode::AddRmsNorm {
                x,
                residual,
                sum,
                y,
                features,
                eps,
                gamma,
            } => Lowered {
                add: Some((residual, sum)),
                ..lowered(
                    "encode AddRmsNorm",
                    Rms,
                    features,
                    affine(eps, gamma, None),
                    x,
                    ("y", y),
                )
            },
            Encode::LayerNormBackward {
                x,
                dy,
                dx,
                dgamma,
                dbeta,
                features,
                eps,
                gamma,
            } => Lowered {
                backward: Some((dy, dgamma, Some(dbeta))),
                ..lowered(
                    "encode LayerNormBackward",
                    Layer,
                    features,
                    affine(eps, gamma, None),
                    x,
                    ("dx", dx),
                )
            },
            Encode::RmsNormBackward {
                x,
                dy,
                dx,
                dgamma,
                features,
                eps,
                gamma,
            } => Lowered {
                backward: Some((dy, dgamma, None)),
                ..lowered(
                    "encode RmsNormBackward",
                    Rms,
                    features,
                    affine(eps, gamma, None),
                    x,
                    ("dx", dx),
                )
            },
            Encode::BatchNormTrain { .. }
            | Encode::BatchNormEval { .. }
            | Encode::BatchNormBackward { .. } => {
                unreachable!("BatchNorm ops lower to BatchNormOp (Lowering::of)")
            }
        }
    }

    /// Every span with its argument name and use.
    fn spans(&self) -> Vec<Span<'a>> {
        let mut spans = vec![
            ("x", self.x, Use::Read),
            (self.out.0, self.out.1, Use::Write),
        ];
        for (name, param) in [("gamma", self.affine.gamma), ("beta", self.affine.beta)] {
            if let Param::Device(span) = param {
                spans.push((name, span, Use::Param));
            }
        }
        if let Some((residual, sum)) = self.add {
            spans.extend([("residual", residual, Use::Read), ("sum", sum, Use::Write)]);
        }
        if let Some((dy, dgamma, dbeta)) = self.backward {
            spans.extend([("dy", dy, Use::Read), ("dgamma", dgamma, Use::Copy)]);
            spans.extend(dbeta.map(|dbeta| ("dbeta", dbeta, Use::Copy)));
        }
        spans
    }

    /// Checks every span; returns the number of rows.
    fn check(&self, ctx: &GpuContext) -> Result<usize, NormError> {
        check_eps(self.affine.eps)?;
        let len = values("x", self.x)?;
        let rows = rows_of(len, self.features)?;
        check_spans(ctx, &self.spans(), (len, rows, self.features))?;
        let max_rows = if self.backward.is_some() {
            layer_norm::backward_max_rows(ctx, self.features)?
        } else {
            layer_norm::max_rows(ctx, self.features)?
        };
        if rows > max_rows {
            return Err(NormError::TooLarge {
                what: "a tensor recorded into a caller's encoder (one dispatch)",
                needed: self.x.size(),
                limit: (max_rows * self.features * 4) as u64,
            });
        }
        Ok(rows)
    }
}

/// The f32 values a span holds; errors where its size is not whole values.
fn values(name: &'static str, span: BufferSlice<'_>) -> Result<usize, NormError> {
    if span.size().is_multiple_of(4) {
        Ok(usize::try_from(span.size() / 4).unwrap_or(usize::MAX))
    } else {
        Err(NormError::InvalidBuffer {
            name,
            problem: "its size is not a whole number of f32 values",
        })
    }
}

/// Checks every span of an op whose tensors hold `len` values in `positions` positions (rows)
/// of `features`: its buffer's usage and offset ([`Use::needs`]), its length, and that no
/// output collides with another span ([`check_disjoint`]).
fn check_spans(
    ctx: &GpuContext,
    spans: &[Span<'_>],
    (len, positions, features): (usize, usize, usize),
) -> Result<(), NormError> {
    for &(name, span, usage) in spans {
        let (needs, align, lacks, misaligned) = usage.needs(ctx);
        if !span.buffer().usage().contains(needs) {
            return Err(NormError::InvalidBuffer {
                name,
                problem: lacks,
            });
        }
        if !span.offset().is_multiple_of(align) {
            return Err(NormError::InvalidBuffer {
                name,
                problem: misaligned,
            });
        }
        let n = values(name, span)?;
        match usage {
            Use::Read | Use::Write => crate::ops::check_operand(name, n, len)?,
            Use::Mask if n != positions => {
                return Err(NormError::MaskLength {
                    len: n,
                    rows: positions,
                })
            }
            Use::Param | Use::Copy | Use::Source | Use::Running if n != features => {
                return Err(NormError::ParamLength {
                    name,
                    len: n,
                    features,
                })
            }
            _ => {}
        }
    }
    check_disjoint(spans)
}

/// No buffer a kernel writes holds an input of the op (wgpu binds a buffer read-only or
/// read-write in one dispatch), and no output overlaps another span.
fn check_disjoint(spans: &[Span<'_>]) -> Result<(), NormError> {
    for &(name, span, usage) in spans {
        for &(other, theirs, their_use) in spans {
            if other == name || span.buffer() != theirs.buffer() {
                continue;
            }
            if usage == Use::Write && matches!(their_use, Use::Read | Use::Param | Use::Mask) {
                return Err(NormError::InvalidBuffer {
                    name,
                    problem: "its buffer also holds an input of this op; wgpu binds a \
                              buffer read-only or read-write in one dispatch, not both",
                });
            }
            let overlap = span.offset() < theirs.offset() + theirs.size()
                && theirs.offset() < span.offset() + span.size();
            if matches!(usage, Use::Write | Use::Copy | Use::Running) && overlap {
                return Err(NormError::InvalidBuffer {
                    name,
                    problem: "it overlaps another span of this op",
                });
            }
        }
    }
    Ok(())
}
/// Records `op` into `encoder` after checking its spans.
pub(crate) async fn encode(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    op: &Encode<'_>,
) -> Result<(), NormError> {
    match Lowering::of(op) {
        Lowering::Rows(op) => {
            let rows = op.check(ctx)?;
            record(ctx, encoder, &op, rows).await
        }
        Lowering::Batch(op) => batch_norm::record(ctx, encoder, &op.check(ctx)?).await,
    }
}

/// A BatchNorm op of [`Encode`], before its spans are checked.
struct BatchNormOp<'a> {
    name: &'static str,
    features: usize,
    spatial: usize,
    eps: f32,
    x: BufferSlice<'a>,
    /// y, or dx for the backward pass.
    out: (&'static str, BufferSlice<'a>),
    mask: Option<BufferSlice<'a>>,
    gamma: Option<BufferSlice<'a>>,
    beta: Option<BufferSlice<'a>>,
    mode: Mode<'a>,
}

impl<'a> BatchNormOp<'a> {
    fn of(op: &Encode<'a>) -> BatchNormOp<'a> {
        match *op {
            Encode::BatchNormTrain {
                x,
                y,
                features,
                spatial,
                eps,
                gamma,
                beta,
                mask,
                running,
            } => BatchNormOp {
                name: "encode BatchNormTrain",
                features,
                spatial,
                eps,
                x,
                out: ("y", y),
                mask,
                gamma,
                beta,
                mode: Mode::Train {
                    running: running.map(|r| (r.mean, r.var, r.momentum)),
                },
            },
            Encode::BatchNormEval {
                x,
                y,
                features,
                spatial,
                eps,
                gamma,
                beta,
                mask,
                mean,
                var,
            } => BatchNormOp {
                name: "encode BatchNormEval",
                features,
                spatial,
                eps,
                x,
                out: ("y", y),
                mask,
                gamma,
                beta,
                mode: Mode::Eval { mean, var },
            },
            Encode::BatchNormBackward {
                x,
                dy,
                dx,
                dgamma,
                dbeta,
                features,
                spatial,
                eps,
                gamma,
                mask,
            } => BatchNormOp {
                name: "encode BatchNormBackward",
                features,
                spatial,
                eps,
                x,
                out: ("dx", dx),
                mask,
                gamma,
                beta: None,
                mode: Mode::Backward { dy, dgamma, dbeta },
            },
            _ => unreachable!("only BatchNorm ops lower to BatchNormOp (Lowering::of)"),
        }
    }

    /// Checks eps, the shape, momentum and every span, as the host-slice forms check theirs.
    fn check(self, ctx: &GpuContext) -> Result<Recorded<'a>, NormError> {
        check_eps(self.eps)?;
        let len = values("x", self.x)?;
        let shape = Shape::channels_first(len, self.features, self.spatial)?;
        if shape.positions == 0 {
            return Err(NormError::EmptyBatch {
                reason: "x is empty; pass at least one row",
            });
        }
        let mut spans = vec![
            ("x", self.x, Use::Read),
            (self.out.0, self.out.1, Use::Write),
        ];
        spans.extend(self.mask.map(|m| ("mask", m, Use::Mask)));
        spans.extend(self.gamma.map(|g| ("gamma", g, Use::Source)));
        spans.extend(self.beta.map(|b| ("beta", b, Use::Source)));
        match self.mode {
            Mode::Train { running } => {
                if let Some((mean, var, momentum)) = running {
                    crate::ops::batch_norm::check_fold(momentum, 2)?;
                    spans.push(("running mean", mean, Use::Running));
                    spans.push(("running var", var, Use::Running));
                }
            }
            Mode::Eval { mean, var } => {
                spans.extend([("mean", mean, Use::Source), ("var", var, Use::Source)]);
            }
            Mode::Backward { dy, dgamma, dbeta } => spans.extend([
                ("dy", dy, Use::Read),
                ("dgamma", dgamma, Use::Copy),
                ("dbeta", dbeta, Use::Copy),
            ]),
        }
        check_spans(ctx, &spans, (len, shape.positions, self.features))?;
        Ok(Recorded {
            name: self.name,
            shape,
            eps: self.eps,
            x: self.x,
            out: self.out.1,
            mask: self.mask,
            gamma: self.gamma,
            beta: self.beta,
            mode: self.mode,
        })
    }
}

/// Records checked spans of `rows` rows.
async fn record(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    op: &Lowered<'_>,
    rows: usize,
) -> Result<(), NormError> {
    let features = op.features;
    let Some((dy, dgamma, dbeta)) = op.backward else {
        let prepared = layer_norm::prepare(
            ctx,
            features,
            (op.kind, op.add.is_some(), false),
            ElementType::F32,
        )
        .await?;
        return ctx
            .scoped(op.name, || {
                let io = Rows {
                    x: op.x,
                    y: op.out.1,
                    rows,
                    add: op.add,
                    moments: None,
                };
                layer_norm::record(ctx, encoder, io, features, &prepared, op.affine, None)
            })
            .await;
    };
    let prepared =
        layer_norm::prepare_backward(ctx, features, (op.kind, false), ElementType::F32).await?;
    ctx.scoped(op.name, || {
        let scratch = BackwardScratch::new(ctx, rows, features, Lifetime::Detached);
        let io = BackwardRows {
            x: op.x,
            dy,
            dx: op.out.1,
            rows,
        };
        let kernels = (&prepared, op.affine);
        layer_norm::record_backward(ctx, encoder, (io, &scratch), features, kernels, false, None);
        // The merge writes (dgamma, dbeta) side by side.
        let bytes = (features * 4) as u64;
        let grads = &scratch.grads;
        encoder.copy_buffer_to_buffer(grads, 0, dgamma.buffer(), dgamma.offset(), bytes);
        if let Some(dbeta) = dbeta {
            encoder.copy_buffer_to_buffer(grads, bytes, dbeta.buffer(), dbeta.offset(), bytes);
        }
    })
    .await
}

/// Records LayerNorm of the first `len` values of the caller's `x` into the caller's `y`, with
/// the host's gamma and beta.
pub(crate) async fn encode_layer_norm(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    (x, y): (&wgpu::Buffer, &wgpu::Buffer),
    len: usize,
    features: usize,
    opts: &LayerNorm<'_>,
) -> Result<(), NormError> {
    let rows = len / features;
    let bytes = len.checked_mul(4).map_or(u64::MAX, |b| b as u64);
    if bytes == u64::MAX || rows > layer_norm::max_rows(ctx, features.max(1))? {
        return Err(NormError::TooLarge {
            what: "a tensor recorded into a caller's encoder (one dispatch)",
            needed: bytes,
            limit: ctx.max_binding_bytes(),
        });
    }
    for (name, b) in [("x", x), ("y", y)] {
        if b.size() < bytes {
            return Err(NormError::InvalidBuffer {
                name,
                problem: "it is smaller than len f32 values",
            });
        }
    }
    if rows == 0 {
        // Checked as a span would be, with nothing to record.
        for (name, b) in [("x", x), ("y", y)] {
            if !b.usage().contains(wgpu::BufferUsages::STORAGE) {
                return Err(NormError::InvalidBuffer {
                    name,
                    problem: "it lacks BufferUsages::STORAGE",
                });
            }
        }
        return Ok(());
    }
    let op = Lowered {
        name: "encode_layer_norm",
        kind: RowNorm::Layer,
        features,
        affine: Affine::from(opts),
        x: x.slice(..bytes),
        out: ("y", y.slice(..bytes)),
        add: None,
        backward: None,
    };
    let rows = op.check(ctx)?;
    record(ctx, encoder, &op, rows).await
}
