//! Tensors that live on the GPU: the device side of `Normalizer::upload`, `download` and the
//! `*_gpu` ops. Inputs arrive validated; these functions check what only the device can tell
//! (ownership, sizes).
//! Every op records into one submission and returns without waiting, but BatchNorm's training
//! forms, which read their statistics back.

use super::batch_norm::{self, Input, Output};
use super::context::GpuContext;
use super::convert::{narrowed, widened};
use super::layer_norm::{self, Affine, BackwardRows, BackwardScratch, Rows};
use super::pool::Lifetime;
use super::transfer;
use crate::element::{narrow, widen};
use crate::ops::batch_norm::{BatchNorm, BatchStats, Counted, RunningStats, Shape};
use crate::ops::layer_norm::{RowNorm, RowStats, StatsOrigin};
use crate::{Element, ElementType, LayerNorm, NormError};

/// Values of one [`Element`] type (f32, f16 or bf16: [`GpuTensor::element_type`]) in a GPU
/// storage buffer, made by [`Normalizer::upload`](crate::Normalizer::upload)
/// or [`Normalizer::upload_rows`](crate::Normalizer::upload_rows), or returned by a `*_gpu` op;
/// [`Normalizer::download`](crate::Normalizer::download) reads them back. Belongs to the
/// `Normalizer` that made it: another one refuses it with [`NormError::InvalidBuffer`] (its
/// buffer lives on that `Normalizer`'s device).
///
/// A tensor made by `upload_rows` or by an op knows its row width ([`GpuTensor::features`]), and
/// an op given another width refuses it with [`NormError::TensorShape`] instead of reading its
/// values as rows of the wrong length.
///
/// Half tensors take half the bytes of f32 ones on the device and across the bus. An op returns
/// tensors of its input's type (parameter gradients are f32, as in PyTorch's mixed precision),
/// and every operand of one call must hold the same type ([`NormError::ElementTypes`]).
#[derive(Debug, Clone)]
pub struct GpuTensor {
    buffer: wgpu::Buffer,
    len: usize,
    /// The width of its rows, where known.
    features: Option<usize>,
    /// [`GpuContext::id`] of the context that made it.
    owner: u64,
    element: ElementType,
}

impl GpuTensor {
    /// Number of values.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when it holds no values.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The width of its rows: what it was uploaded with (`upload_rows`) or normalized with (an
    /// op's output); None for a tensor from `upload`, whose layout the caller states per call.
    pub fn features(&self) -> Option<usize> {
        self.features
    }

    /// The type of its values.
    pub fn element_type(&self) -> ElementType {
        self.element
    }

    /// The storage buffer (usage STORAGE | COPY_SRC | COPY_DST), for callers who bind it in their
    /// own passes. The values are its first `len() * element_type().size()` bytes, in the host's
    /// byte order (little-endian on every wgpu backend); half values are packed two to a 32-bit
    /// word, the first in the low half.
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }

    /// Refuses a tensor of another context (argument `name`).
    pub(crate) fn check_owner(
        &self,
        ctx: &GpuContext,
        name: &'static str,
    ) -> Result<(), NormError> {
        if self.owner == ctx.id {
            Ok(())
        } else {
            Err(NormError::InvalidBuffer {
                name,
                problem:
                    "it is a GpuTensor of another Normalizer; download it there and upload it here",
            })
        }
    }

    /// Refuses a call that reads this tensor as rows of another width than it knows it has.
    pub(crate) fn check_features(&self, features: usize) -> Result<(), NormError> {
        match self.features {
            Some(known) if known != features => Err(NormError::TensorShape {
                features: known,
                given: features,
            }),
            _ => Ok(()),
        }
    }

    /// Refuses an operand (argument `name`) of another element type than `expected`.
    fn check_element(&self, expected: ElementType, name: &'static str) -> Result<(), NormError> {
        if self.element == expected {
            Ok(())
        } else {
            Err(NormError::ElementTypes {
                name,
                found: self.element,
                expected,
            })
        }
    }

    /// The span of its values, in whole words (not empty: wgpu has no empty spans).
    pub(crate) fn values(&self) -> wgpu::BufferSlice<'_> {
        self.buffer.slice(..self.bytes())
    }

    /// Bytes of its values, rounded up to whole 4-byte words.
    fn bytes(&self) -> u64 {
        self.element.buffer_bytes(self.len).unwrap_or(u64::MAX)
    }

    /// A new, unwritten tensor of `len` values of `element` on `ctx`.
    pub(crate) fn new(
        ctx: &GpuContext,
        len: usize,
        features: Option<usize>,
        element: ElementType,
    ) -> GpuTensor {
        use wgpu::BufferUsages as U;
        let buffer = ctx.buffer(
            "gpunorm tensor",
            element.buffer_bytes(len).unwrap_or(u64::MAX),
            U::STORAGE | U::COPY_SRC | U::COPY_DST,
            Lifetime::Detached,
        );
        GpuTensor {
            buffer: buffer.into_buffer(),
            len,
            features,
            owner: ctx.id,
            element,
        }
    }
}

/// The gradients of LayerNorm or BatchNorm on GPU tensors, from
/// [`Normalizer::layer_norm_backward_gpu`](crate::Normalizer::layer_norm_backward_gpu) and
/// [`Normalizer::batch_norm_backward_gpu`](crate::Normalizer::batch_norm_backward_gpu): the
/// device twin of [`LayerNormGrads`](crate::LayerNormGrads).
#[derive(Debug, Clone)]
pub struct GpuGrads {
    /// The gradient of x, shaped as x.
    pub dx: GpuTensor,
    /// The gradient of gamma: one row of `features` values (of a gamma of ones where none was
    /// given).
    pub dgamma: GpuTensor,
    /// The gradient of beta: one row of `features` values.
    pub dbeta: GpuTensor,
}

/// The gradients of RMSNorm on GPU tensors, from
/// [`Normalizer::rms_norm_backward_gpu`](crate::Normalizer::rms_norm_backward_gpu).
#[derive(Debug, Clone)]
pub struct GpuRmsNormGrads {
    /// The gradient of x, shaped as x.
    pub dx: GpuTensor,
    /// The gradient of gamma: one row of `features` values.
    pub dgamma: GpuTensor,
}

/// The fused residual add on GPU tensors, from
/// [`Normalizer::add_layer_norm_gpu`](crate::Normalizer::add_layer_norm_gpu) and
/// [`Normalizer::add_rms_norm_gpu`](crate::Normalizer::add_rms_norm_gpu).
#[derive(Debug, Clone)]
pub struct GpuAddNormOutput {
    /// x + residual, each value rounded to f32 once: the new residual stream.
    pub sum: GpuTensor,
    /// The normalization of `sum`'s rows.
    pub y: GpuTensor,
}

/// A forward pass's saved statistics on the device, from
/// [`Normalizer::layer_norm_gpu_saving`](crate::Normalizer::layer_norm_gpu_saving) or
/// [`Normalizer::rms_norm_gpu_saving`](crate::Normalizer::rms_norm_gpu_saving), for the
/// `*_backward_gpu_saved` ops: the device twin of [`RowStats`], in the same layout
/// ([`Normalizer::download_row_stats`](crate::Normalizer::download_row_stats) and
/// [`Normalizer::upload_row_stats`](crate::Normalizer::upload_row_stats) move them across).
#[derive(Debug, Clone)]
pub struct GpuRowStats {
    /// Per row (shift, mean − shift, rstd, scale), as [`RowStats`] keeps them.
    moments: GpuTensor,
    origin: StatsOrigin,
}

impl GpuRowStats {
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.moments.len / 4
    }

    /// The row width they were computed over.
    pub fn features(&self) -> usize {
        self.origin.features
    }

    /// Refuses statistics of another context, or that are not those of the backward call (as
    /// [`RowStats`] does).
    fn check(
        &self,
        ctx: &GpuContext,
        rows: usize,
        features: usize,
        op: (&LayerNorm<'_>, RowNorm),
    ) -> Result<(), NormError> {
        self.moments.check_owner(ctx, "stats")?;
        self.origin.check(self.rows(), (rows, features), op)
    }
}

/// [`Normalizer::layer_norm_gpu_saving`](crate::Normalizer::layer_norm_gpu_saving)'s output.
#[derive(Debug, Clone)]
pub struct GpuSavedNormOutput {
    /// The normalized rows.
    pub y: GpuTensor,
    /// Each row's statistics.
    pub stats: GpuRowStats,
}

/// Saved statistics uploaded to the device.
pub(crate) async fn upload_row_stats(
    ctx: &GpuContext,
    stats: &RowStats,
) -> Result<GpuRowStats, NormError> {
    let flat: &[f32] = bytemuck::cast_slice(&stats.moments);
    Ok(GpuRowStats {
        moments: upload(ctx, flat, None).await?,
        origin: stats.origin,
    })
}

/// Saved statistics read back (waits for the forward pass that writes them).
pub(crate) async fn download_row_stats(
    ctx: &GpuContext,
    stats: &GpuRowStats,
) -> Result<RowStats, NormError> {
    let flat: Vec<f32> = download(ctx, &stats.moments).await?;
    Ok(RowStats {
        origin: stats.origin,
        moments: flat
            .chunks_exact(4)
            .map(|m| [m[0], m[1], m[2], m[3]])
            .collect(),
    })
}

/// BatchNorm's running statistics on the device, made by
/// [`Normalizer::upload_running_stats`](crate::Normalizer::upload_running_stats): a training
/// step on GPU tensors ([`Normalizer::batch_norm_train_gpu_running`](crate::Normalizer::batch_norm_train_gpu_running))
/// folds its batch statistics in on the device, and eval reads them there, so a training loop
/// does not wait for the GPU each step.
/// [`Normalizer::download_running_stats`](crate::Normalizer::download_running_stats) reads
/// them back as [`RunningStats`].
#[derive(Debug, Clone)]
pub struct GpuRunningStats {
    /// (0, mean, unbiased var, 1) per feature: the layout the eval kernels read.
    columns: GpuTensor,
    features: usize,
    /// Weight of each new batch, in [0, 1].
    pub momentum: f32,
}

impl GpuRunningStats {
    /// Number of features.
    pub fn features(&self) -> usize {
        self.features
    }

    /// Refuses statistics of another context or of another feature count.
    fn check(&self, ctx: &GpuContext, features: usize) -> Result<(), NormError> {
        self.columns.check_owner(ctx, "running")?;
        if self.features != features {
            return Err(NormError::ParamLength {
                name: "running mean",
                len: self.features,
                features,
            });
        }
        Ok(())
    }
}

/// Running statistics uploaded in the layout the kernels read.
pub(crate) async fn upload_running(
    ctx: &GpuContext,
    stats: &RunningStats,
) -> Result<GpuRunningStats, NormError> {
    let columns: Vec<f32> = stats
        .mean
        .iter()
        .zip(&stats.var)
        .flat_map(|(&m, &v)| [0.0, m, v, 1.0])
        .collect();
    Ok(GpuRunningStats {
        columns: upload(ctx, &columns, None).await?,
        features: stats.mean.len(),
        momentum: stats.momentum,
    })
}

/// Running statistics read back (waits for the work that updates them).
pub(crate) async fn download_running(
    ctx: &GpuContext,
    stats: &GpuRunningStats,
) -> Result<RunningStats, NormError> {
    let columns = download(ctx, &stats.columns).await?;
    Ok(RunningStats {
        mean: columns.chunks_exact(4).map(|q| q[1]).collect(),
        var: columns.chunks_exact(4).map(|q| q[2]).collect(),
        momentum: stats.momentum,
    })
}

/// Copies `data` into a new GPU tensor of its type, of rows `features` wide where given, without
/// waiting for the copy.
pub(crate) async fn upload<T: Element>(
    ctx: &GpuContext,
    data: &[T],
    features: Option<usize>,
) -> Result<GpuTensor, NormError> {
    let bytes = T::TYPE.buffer_bytes(data.len()).unwrap_or(u64::MAX);
    if bytes > ctx.max_binding_bytes() {
        return Err(NormError::TooLarge {
            what: "a GPU-resident tensor",
            needed: bytes,
            limit: ctx.max_binding_bytes(),
        });
    }
    let staged = transfer::stage(ctx, data).await?;
    ctx.scoped("upload", || {
        let tensor = GpuTensor::new(ctx, data.len(), features, T::TYPE);
        let mut encoder = ctx.encoder("gpunorm upload");
        staged.record(&mut encoder, &tensor.buffer);
        ctx.queue().submit([encoder.finish()]);
        tensor
    })
    .await
}

/// Reads a GPU tensor back as `T` (waits for the work that writes it): its own bytes, converted
/// on the host where `T` is another type (widened exactly, or rounded once).
pub(crate) async fn download<T: Element>(
    ctx: &GpuContext,
    tensor: &GpuTensor,
) -> Result<Vec<T>, NormError> {
    use half::{bf16, f16};
    tensor.check_owner(ctx, "tensor")?;
    if tensor.element == T::TYPE {
        return read(ctx, tensor).await;
    }
    Ok(match tensor.element {
        ElementType::F32 => narrow(read::<f32>(ctx, tensor).await?),
        ElementType::F16 => narrow(widen(&read::<f16>(ctx, tensor).await?).into_owned()),
        ElementType::BF16 => narrow(widen(&read::<bf16>(ctx, tensor).await?).into_owned()),
    })
}

/// The tensor's values as the type it holds, `S`.
async fn read<S: Element>(ctx: &GpuContext, tensor: &GpuTensor) -> Result<Vec<S>, NormError> {
    let mut out = crate::ops::new_output(tensor.len);
    transfer::download(ctx, &tensor.buffer, &mut out).await?;
    Ok(out)
}

/// The tensor widened to f32 where `f32_only`, else itself.
async fn f32_if<'a>(
    ctx: &GpuContext,
    tensor: &'a GpuTensor,
    f32_only: bool,
) -> Result<std::borrow::Cow<'a, GpuTensor>, NormError> {
    if f32_only {
        widened(ctx, tensor).await
    } else {
        Ok(std::borrow::Cow::Borrowed(tensor))
    }
}

/// LayerNorm (or RMSNorm) of a tensor of `rows` rows into a new tensor of its type, without
/// waiting; with a residual, of x + residual, that sum written to a new tensor too (returned
/// second); with `save`, each row's statistics saved (returned third). Half rows of odd length
/// are normalized as f32 twins and rounded back.
pub(crate) async fn layer_norm(
    ctx: &GpuContext,
    (x, residual): (&GpuTensor, Option<&GpuTensor>),
    (rows, features): (usize, usize),
    op: (&LayerNorm<'_>, RowNorm),
    save: bool,
) -> Result<(GpuTensor, Option<GpuTensor>, Option<GpuRowStats>), NormError> {
    check_operands(
        ctx,
        features,
        [Some((x, "x")), residual.map(|r| (r, "residual"))],
    )?;
    if rows > layer_norm::max_rows(ctx, features.max(1))? {
        return Err(too_large(ctx, x.len));
    }
    let element = x.element;
    let twins = !layer_norm::reads(element, features);
    let xw = f32_if(ctx, x, twins).await?;
    let rw = match residual {
        Some(r) => Some(f32_if(ctx, r, twins).await?),
        None => None,
    };
    let io = (&*xw, rw.as_deref());
    let (y, sum, moments) = layer_norm_of(ctx, io, (rows, features), op, save).await?;
    let y = narrowed(ctx, y, element).await?;
    let sum = match sum {
        Some(sum) => Some(narrowed(ctx, sum, element).await?),
        None => None,
    };
    let stats = moments.map(|moments| GpuRowStats {
        moments,
        origin: StatsOrigin::of(features, op),
    });
    Ok((y, sum, stats))
}

/// [`layer_norm`] of tensors the kernels read as they are.
async fn layer_norm_of(
    ctx: &GpuContext,
    (x, residual): (&GpuTensor, Option<&GpuTensor>),
    (rows, features): (usize, usize),
    (opts, kind): (&LayerNorm<'_>, RowNorm),
    save: bool,
) -> Result<(GpuTensor, Option<GpuTensor>, Option<GpuTensor>), NormError> {
    let element = x.element;
    let variant = (kind, residual.is_some(), save);
    let prepared = layer_norm::prepare(ctx, features, variant, element).await?;
    ctx.scoped("layer_norm_gpu", || {
        let y = GpuTensor::new(ctx, x.len, Some(features), element);
        let sum = residual.map(|_| GpuTensor::new(ctx, x.len, Some(features), element));
        let moments = save.then(|| GpuTensor::new(ctx, rows * 4, None, ElementType::F32));
        if rows > 0 {
            let mut encoder = ctx.encoder("layer_norm_gpu");
            let io = Rows {
                x: x.values(),
                y: y.values(),
                rows,
                add: residual
                    .zip(sum.as_ref())
                    .map(|(r, s)| (r.values(), s.values())),
                moments: moments.as_ref().map(|m| m.values()),
            };
            let affine = Affine::from(opts);
            layer_norm::record(ctx, &mut encoder, io, features, &prepared, affine, None);
            ctx.queue().submit([encoder.finish()]);
        }
        (y, sum, moments)
    })
    .await
}

/// The backward pass of LayerNorm (or RMSNorm) on tensors of `rows` rows: (dx, dgamma, dbeta)
/// in new tensors (dx of x's type, the gradients f32), without waiting. Half rows of odd length
/// go through f32 twins.
pub(crate) async fn layer_norm_backward(
    ctx: &GpuContext,
    (x, dy): (&GpuTensor, &GpuTensor),
    (rows, features): (usize, usize),
    op: (&LayerNorm<'_>, RowNorm),
    saved: Option<&GpuRowStats>,
) -> Result<GpuGrads, NormError> {
    check_operands(ctx, features, [Some((x, "x")), Some((dy, "dy"))])?;
    if let Some(stats) = saved {
        stats.check(ctx, rows, features, op)?;
    }
    let element = x.element;
    let twins = !layer_norm::reads(element, features);
    let (xw, dyw) = (f32_if(ctx, x, twins).await?, f32_if(ctx, dy, twins).await?);
    let saved = saved.map(|s| &s.moments);
    let grads = layer_norm_backward_of(ctx, (&xw, &dyw), (rows, features), op, saved).await?;
    Ok(GpuGrads {
        dx: narrowed(ctx, grads.dx, element).await?,
        ..grads
    })
}

/// [`layer_norm_backward`] of tensors the kernels read as they are, in one submission.
async fn layer_norm_backward_of(
    ctx: &GpuContext,
    (x, dy): (&GpuTensor, &GpuTensor),
    (rows, features): (usize, usize),
    (opts, kind): (&LayerNorm<'_>, RowNorm),
    saved: Option<&GpuTensor>,
) -> Result<GpuGrads, NormError> {
    let variant = (kind, saved.is_some());
    let prepared = layer_norm::prepare_backward(ctx, features, variant, x.element).await?;
    if rows > prepared.max_rows() {
        return Err(too_large(ctx, x.len));
    }
    ctx.scoped("layer_norm_backward_gpu", || {
        let f32_row = || GpuTensor::new(ctx, features, Some(features), ElementType::F32);
        let grads = GpuGrads {
            dx: GpuTensor::new(ctx, x.len, Some(features), x.element),
            dgamma: f32_row(),
            dbeta: f32_row(),
        };
        let mut encoder = ctx.encoder("layer_norm_backward_gpu");
        if rows > 0 {
            let scratch = BackwardScratch::new(ctx, rows, features, Lifetime::Detached);
            if let Some(saved) = saved {
                scratch.load_moments(&mut encoder, &saved.buffer, rows);
            }
            let io = BackwardRows {
                x: x.values(),
                dy: dy.values(),
                dx: grads.dx.values(),
                rows,
            };
            let op = (&prepared, Affine::from(opts));
            layer_norm::record_backward(
                ctx,
                &mut encoder,
                (io, &scratch),
                features,
                op,
                false,
                None,
            );
            // The merge writes (dgamma, dbeta) side by side.
            let bytes = (features * 4) as u64;
            encoder.copy_buffer_to_buffer(&scratch.grads, 0, &grads.dgamma.buffer, 0, bytes);
            encoder.copy_buffer_to_buffer(&scratch.grads, bytes, &grads.dbeta.buffer, 0, bytes);
        } else {
            // Sums over no rows.
            encoder.clear_buffer(&grads.dgamma.buffer, 0, None);
            encoder.clear_buffer(&grads.dbeta.buffer, 0, None);
        }
        ctx.queue().submit([encoder.finish()]);
        grads
    })
    .await
}

/// BatchNorm training of a tensor into a new one; waits, for the statistics.
pub(crate) async fn batch_norm_train(
    ctx: &GpuContext,
    x: &GpuTensor,
    shape: &Shape,
    opts: &BatchNorm<'_>,
    counted: Counted,
) -> Result<(GpuTensor, BatchStats), NormError> {
    check_operands(ctx, shape.row_width(), [Some((x, "x"))])?;
    // BatchNorm computes on f32 tensors: half ones are widened on the device, and y rounded.
    let (element, xw) = (x.element, widened(ctx, x).await?);
    let x = &*xw;
    let y = ctx
        .scoped("batch_norm_train_gpu", || {
            GpuTensor::new(ctx, x.len, Some(shape.row_width()), ElementType::F32)
        })
        .await?;
    let io = (Input::Device(&x.buffer, x.len), Output::Device(&y.buffer));
    let (stats, _) = batch_norm::train(ctx, io.0, io.1, shape, opts, counted).await?;
    Ok((narrowed(ctx, y, element).await?, stats))
}

/// BatchNorm training's backward pass on tensors into new ones; waits, for the statistics (and
/// the gradients, which come back to the host and go up again as tensors: two rows of
/// `channels` values).
pub(crate) async fn batch_norm_backward(
    ctx: &GpuContext,
    (x, dy): (&GpuTensor, &GpuTensor),
    shape: &Shape,
    opts: &BatchNorm<'_>,
    counted: Counted,
) -> Result<GpuGrads, NormError> {
    check_operands(ctx, shape.row_width(), [Some((x, "x")), Some((dy, "dy"))])?;
    let (element, xw, dyw) = (x.element, widened(ctx, x).await?, widened(ctx, dy).await?);
    let (x, dy) = (&*xw, &*dyw);
    let dx = ctx
        .scoped("batch_norm_backward_gpu", || {
            GpuTensor::new(ctx, x.len, Some(shape.row_width()), ElementType::F32)
        })
        .await?;
    let inputs = (
        Input::Device(&x.buffer, x.len),
        Input::Device(&dy.buffer, dy.len),
    );
    let output = Output::Device(&dx.buffer);
    let (dgamma, dbeta, _) =
        batch_norm::backward(ctx, inputs, output, shape, opts, counted).await?;
    Ok(GpuGrads {
        dx: narrowed(ctx, dx, element).await?,
        dgamma: upload(ctx, &dgamma, Some(shape.channels)).await?,
        dbeta: upload(ctx, &dbeta, Some(shape.channels)).await?,
    })
}

/// BatchNorm training of a tensor into a new one, its statistics folded into `running` on the
/// device: no readback, no wait.
pub(crate) async fn batch_norm_train_running(
    ctx: &GpuContext,
    x: &GpuTensor,
    shape: &Shape,
    (opts, counted): (&BatchNorm<'_>, Counted),
    running: &GpuRunningStats,
) -> Result<GpuTensor, NormError> {
    check_operands(ctx, shape.row_width(), [Some((x, "x"))])?;
    running.check(ctx, shape.channels)?;
    // BatchNorm computes on f32 tensors: half ones are widened on the device, and y rounded.
    let (element, xw) = (x.element, widened(ctx, x).await?);
    let x = &*xw;
    let y = ctx
        .scoped("batch_norm_train_gpu_running", || {
            GpuTensor::new(ctx, x.len, Some(shape.row_width()), ElementType::F32)
        })
        .await?;
    let io = (Input::Device(&x.buffer, x.len), Output::Device(&y.buffer));
    let update = (&running.columns.buffer, running.momentum);
    batch_norm::train_running(ctx, io, shape, opts, counted, update).await?;
    narrowed(ctx, y, element).await
}

/// BatchNorm eval of a tensor into a new one with running statistics on the device, without
/// waiting.
pub(crate) async fn batch_norm_eval_running(
    ctx: &GpuContext,
    x: &GpuTensor,
    shape: &Shape,
    opts: &BatchNorm<'_>,
    running: &GpuRunningStats,
) -> Result<GpuTensor, NormError> {
    check_operands(ctx, shape.row_width(), [Some((x, "x"))])?;
    running.check(ctx, shape.channels)?;
    // BatchNorm computes on f32 tensors: half ones are widened on the device, and y rounded.
    let (element, xw) = (x.element, widened(ctx, x).await?);
    let x = &*xw;
    let y = ctx
        .scoped("batch_norm_eval_gpu_running", || {
            GpuTensor::new(ctx, x.len, Some(shape.row_width()), ElementType::F32)
        })
        .await?;
    let io = (Input::Device(&x.buffer, x.len), Output::Device(&y.buffer));
    batch_norm::eval_running(ctx, io, shape, opts, &running.columns.buffer).await?;
    narrowed(ctx, y, element).await
}

/// BatchNorm eval of a tensor into a new one, without waiting.
pub(crate) async fn batch_norm_eval(
    ctx: &GpuContext,
    x: &GpuTensor,
    shape: &Shape,
    opts: &BatchNorm<'_>,
    stats: &RunningStats,
) -> Result<GpuTensor, NormError> {
    check_operands(ctx, shape.row_width(), [Some((x, "x"))])?;
    // BatchNorm computes on f32 tensors: half ones are widened on the device, and y rounded.
    let (element, xw) = (x.element, widened(ctx, x).await?);
    let x = &*xw;
    let y = ctx
        .scoped("batch_norm_eval_gpu", || {
            GpuTensor::new(ctx, x.len, Some(shape.row_width()), ElementType::F32)
        })
        .await?;
    let io = (Input::Device(&x.buffer, x.len), Output::Device(&y.buffer));
    batch_norm::eval(ctx, io.0, io.1, shape, opts, stats).await?;
    narrowed(ctx, y, element).await
}

/// Refuses operand tensors (those given, with their argument names) of another context, of
/// another row width, or of another element type than the first.
fn check_operands<const N: usize>(
    ctx: &GpuContext,
    features: usize,
    tensors: [Option<(&GpuTensor, &'static str)>; N],
) -> Result<(), NormError> {
    let mut element = None;
    for (tensor, name) in tensors.into_iter().flatten() {
        tensor.check_owner(ctx, name)?;
        tensor.check_features(features)?;
        tensor.check_element(*element.get_or_insert(tensor.element), name)?;
    }
    Ok(())
}

fn too_large(ctx: &GpuContext, len: usize) -> NormError {
    NormError::TooLarge {
        what: "a GPU-resident tensor",
        needed: bytes_of(len),
        limit: ctx.max_binding_bytes(),
    }
}

/// Bytes of `len` f32 values, or u64::MAX (reported as an overflow) where that overflows.
fn bytes_of(len: usize) -> u64 {
    len.checked_mul(4).map_or(u64::MAX, |b| b as u64)
}
