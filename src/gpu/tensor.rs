//! Tensors that live on the GPU: the device side of `Normalizer::upload`, `download` and the
//! `*_gpu` ops. Inputs arrive validated; these functions check what only the device can tell
//! (ownership, sizes).
//! Every op records into one submission and returns without waiting, but BatchNorm's training
//! forms, which read their statistics back.

use super::batch_norm::{self, Input, Output};
use super::context::GpuContext;
use super::layer_norm::{self, Affine, BackwardRows, BackwardScratch, Rows};
use super::pool::Lifetime;
use super::transfer;
use crate::ops::batch_norm::{BatchNorm, BatchStats, Counted, RunningStats, Shape};
use crate::ops::layer_norm::RowNorm;
use crate::{LayerNorm, NormError};

/// f32 values in a GPU storage buffer, made by [`Normalizer::upload`](crate::Normalizer::upload)
/// or [`Normalizer::upload_rows`](crate::Normalizer::upload_rows), or returned by a `*_gpu` op;
/// [`Normalizer::download`](crate::Normalizer::download) reads them back. Belongs to the
/// `Normalizer` that made it: another one refuses it with [`NormError::InvalidBuffer`] (its
/// buffer lives on that `Normalizer`'s device).
///
/// A tensor made by `upload_rows` or by an op knows its row width ([`GpuTensor::features`]), and
/// an op given another width refuses it with [`NormError::TensorShape`] instead of reading its
/// values as rows of the wrong length.
#[derive(Debug, Clone)]
pub struct GpuTensor {
    buffer: wgpu::Buffer,
    len: usize,
    /// The width of its rows, where known.
    features: Option<usize>,
    /// [`GpuContext::id`] of the context that made it.
    owner: u64,
}

impl GpuTensor {
    /// Number of f32 values.
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

    /// The storage buffer (usage STORAGE | COPY_SRC | COPY_DST), for callers who bind it in their
    /// own passes. The values are its first `len() * 4` bytes.
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

    /// The span of its values (not empty: wgpu has no empty spans).
    fn values(&self) -> wgpu::BufferSlice<'_> {
        self.buffer.slice(..(self.len * 4) as u64)
    }

    /// A new, unwritten tensor of `len` values on `ctx`.
    fn new(ctx: &GpuContext, len: usize, features: Option<usize>) -> GpuTensor {
        use wgpu::BufferUsages as U;
        let buffer = ctx.buffer(
            "gpunorm tensor",
            (len * 4) as u64,
            U::STORAGE | U::COPY_SRC | U::COPY_DST,
            Lifetime::Detached,
        );
        GpuTensor {
            buffer: buffer.into_buffer(),
            len,
            features,
            owner: ctx.id,
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

/// Copies `data` into a new GPU tensor of rows `features` wide where given, without waiting for
/// the copy.
pub(crate) async fn upload(
    ctx: &GpuContext,
    data: &[f32],
    features: Option<usize>,
) -> Result<GpuTensor, NormError> {
    let bytes = (data.len() * 4) as u64;
    if bytes > ctx.max_binding_bytes() {
        return Err(NormError::TooLarge {
            what: "a GPU-resident tensor",
            needed: bytes,
            limit: ctx.max_binding_bytes(),
        });
    }
    let staged = transfer::stage(ctx, data).await?;
    ctx.scoped("upload", || {
        let tensor = GpuTensor::new(ctx, data.len(), features);
        let mut encoder = ctx.encoder("gpunorm upload");
        staged.record(&mut encoder, &tensor.buffer);
        ctx.queue().submit([encoder.finish()]);
        tensor
    })
    .await
}

/// Reads a GPU tensor back (waits for the work that writes it).
pub(crate) async fn download(ctx: &GpuContext, tensor: &GpuTensor) -> Result<Vec<f32>, NormError> {
    tensor.check_owner(ctx, "tensor")?;
    let mut out = vec![0f32; tensor.len];
    transfer::download(ctx, &tensor.buffer, &mut out).await?;
    Ok(out)
}

/// LayerNorm (or RMSNorm) of a tensor of `rows` rows into a new tensor, without waiting; with a
/// residual, of x + residual, that sum written to a new tensor too (returned second).
pub(crate) async fn layer_norm(
    ctx: &GpuContext,
    (x, residual): (&GpuTensor, Option<&GpuTensor>),
    rows: usize,
    features: usize,
    (opts, kind): (&LayerNorm<'_>, RowNorm),
) -> Result<(GpuTensor, Option<GpuTensor>), NormError> {
    check_operands(
        ctx,
        features,
        [Some((x, "x")), residual.map(|r| (r, "residual"))],
    )?;
    if rows > layer_norm::max_rows(ctx, features.max(1))? {
        return Err(too_large(ctx, x.len));
    }
    let prepared = layer_norm::prepare(ctx, features, (kind, residual.is_some())).await?;
    ctx.scoped("layer_norm_gpu", || {
        let y = GpuTensor::new(ctx, x.len, Some(features));
        let sum = residual.map(|_| GpuTensor::new(ctx, x.len, Some(features)));
        if rows > 0 {
            let mut encoder = ctx.encoder("layer_norm_gpu");
            let io = Rows {
                x: x.values(),
                y: y.values(),
                rows,
                add: residual
                    .zip(sum.as_ref())
                    .map(|(r, s)| (r.values(), s.values())),
            };
            let affine = Affine::from(opts);
            layer_norm::record(ctx, &mut encoder, io, features, &prepared, affine, None);
            ctx.queue().submit([encoder.finish()]);
        }
        (y, sum)
    })
    .await
}

/// The backward pass of LayerNorm (or RMSNorm) on tensors of `rows` rows: (dx, dgamma, dbeta)
/// in new tensors, recorded in one submission, without waiting.
pub(crate) async fn layer_norm_backward(
    ctx: &GpuContext,
    (x, dy): (&GpuTensor, &GpuTensor),
    rows: usize,
    features: usize,
    (opts, kind): (&LayerNorm<'_>, RowNorm),
) -> Result<GpuGrads, NormError> {
    check_operands(ctx, features, [Some((x, "x")), Some((dy, "dy"))])?;
    let prepared = layer_norm::prepare_backward(ctx, features, kind).await?;
    if rows > prepared.max_rows() {
        return Err(too_large(ctx, x.len));
    }
    ctx.scoped("layer_norm_backward_gpu", || {
        let grads = GpuGrads {
            dx: GpuTensor::new(ctx, x.len, Some(features)),
            dgamma: GpuTensor::new(ctx, features, Some(features)),
            dbeta: GpuTensor::new(ctx, features, Some(features)),
        };
        let mut encoder = ctx.encoder("layer_norm_backward_gpu");
        if rows > 0 {
            let scratch = BackwardScratch::new(ctx, rows, features, Lifetime::Detached);
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
    let y = ctx
        .scoped("batch_norm_train_gpu", || {
            GpuTensor::new(ctx, x.len, Some(shape.row_width()))
        })
        .await?;
    let io = (Input::Device(&x.buffer, x.len), Output::Device(&y.buffer));
    let (stats, _) = batch_norm::train(ctx, io.0, io.1, shape, opts, counted).await?;
    Ok((y, stats))
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
    let dx = ctx
        .scoped("batch_norm_backward_gpu", || {
            GpuTensor::new(ctx, x.len, Some(shape.row_width()))
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
        dx,
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
    let y = ctx
        .scoped("batch_norm_train_gpu_running", || {
            GpuTensor::new(ctx, x.len, Some(shape.row_width()))
        })
        .await?;
    let io = (Input::Device(&x.buffer, x.len), Output::Device(&y.buffer));
    let update = (&running.columns.buffer, running.momentum);
    batch_norm::train_running(ctx, io, shape, opts, counted, update).await?;
    Ok(y)
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
    let y = ctx
        .scoped("batch_norm_eval_gpu_running", || {
            GpuTensor::new(ctx, x.len, Some(shape.row_width()))
        })
        .await?;
    let io = (Input::Device(&x.buffer, x.len), Output::Device(&y.buffer));
    batch_norm::eval_running(ctx, io, shape, opts, &running.columns.buffer).await?;
    Ok(y)
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
    let y = ctx
        .scoped("batch_norm_eval_gpu", || {
            GpuTensor::new(ctx, x.len, Some(shape.row_width()))
        })
        .await?;
    let io = (Input::Device(&x.buffer, x.len), Output::Device(&y.buffer));
    batch_norm::eval(ctx, io.0, io.1, shape, opts, stats).await?;
    Ok(y)
}

/// Refuses operand tensors (those given, with their argument names) of another context or of
/// another row width.
fn check_operands<const N: usize>(
    ctx: &GpuContext,
    features: usize,
    tensors: [Option<(&GpuTensor, &'static str)>; N],
) -> Result<(), NormError> {
    for (tensor, name) in tensors.into_iter().flatten() {
        tensor.check_owner(ctx, name)?;
        tensor.check_features(features)?;
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
