//! Tensors that live on the GPU, and the doors for callers who already use wgpu: a
//! `Normalizer` on their device, and ops recorded into their command encoder on their buffers.
//!
//! Upload once, run many ops, read back once: `layer_norm_gpu`, `batch_norm_train_gpu` and
//! `batch_norm_eval_gpu` take and return a [`GpuTensor`], so ops chain without a round trip
//! through the host.

use crate::batch_norm::{self, Io, Shape, Stats};
use crate::context::GpuContext;
use crate::layer_norm::{self, check_buffers, LayerNorm, Rows};
use crate::{Backend, BatchNorm, BatchStats, NormError, Normalizer, RunningStats};

/// f32 values in a GPU storage buffer, made by [`Normalizer::upload`] or returned by a `*_gpu`
/// op; [`Normalizer::download`] reads them back. Belongs to the `Normalizer` that made it: another
/// one refuses it with [`NormError::InvalidBuffer`] (its buffer lives on that `Normalizer`'s
/// device).
#[derive(Debug, Clone)]
pub struct GpuTensor {
    buffer: wgpu::Buffer,
    len: usize,
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

    /// The storage buffer (usage STORAGE | COPY_SRC | COPY_DST), for callers who bind it in their
    /// own passes. The values are its first `len() * 4` bytes.
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }
}

impl Normalizer {
    /// A `Normalizer` on a device and queue the caller already has. Pipelines are built on that
    /// device and picked for what it allows: its limits bound the tensors it takes, workgroup sums
    /// use subgroup operations where it was created with `Features::SUBGROUP` (shared memory
    /// otherwise), and kernel times need `Features::TIMESTAMP_QUERY`.
    pub fn from_wgpu(device: wgpu::Device, queue: wgpu::Queue) -> Normalizer {
        Normalizer {
            backend: Backend::Gpu(Box::new(GpuContext::from_device(device, queue))),
        }
    }

    /// The device and queue this `Normalizer` runs on, to make buffers for
    /// [`Normalizer::encode_layer_norm`] or to run work of one's own beside it; `None` on the CPU
    /// fallback.
    pub fn wgpu(&self) -> Option<(&wgpu::Device, &wgpu::Queue)> {
        match &self.backend {
            Backend::Gpu(ctx) => Some((&ctx.device, &ctx.queue)),
            Backend::Cpu => None,
        }
    }

    fn context(&self, what: &'static str) -> Result<&GpuContext, NormError> {
        match &self.backend {
            Backend::Gpu(ctx) => Ok(ctx),
            Backend::Cpu => Err(NormError::NotGpu(what)),
        }
    }

    /// The context, when `tensor` (the argument called `name`) is one of its own.
    fn context_of(
        &self,
        what: &'static str,
        name: &'static str,
        tensor: &GpuTensor,
    ) -> Result<&GpuContext, NormError> {
        let ctx = self.context(what)?;
        if tensor.owner != ctx.id {
            return Err(NormError::InvalidBuffer {
                name,
                problem:
                    "it is a GpuTensor of another Normalizer; download it there and upload it here",
            });
        }
        Ok(ctx)
    }

    /// Copies `data` into a new GPU tensor. Errors on the CPU fallback ([`NormError::NotGpu`]) and
    /// when the data exceeds one binding of this device.
    pub fn upload(&self, data: &[f32]) -> Result<GpuTensor, NormError> {
        let ctx = self.context("upload")?;
        let _serial = ctx.exclusive();
        let bytes = (data.len() * 4) as u64;
        if bytes > ctx.max_binding_bytes() {
            return Err(NormError::TooLarge {
                what: "a GPU-resident tensor",
                needed: bytes,
                limit: ctx.max_binding_bytes(),
            });
        }
        ctx.scoped("upload", || -> Result<GpuTensor, NormError> {
            let buffer = new_tensor_buffer(ctx, "gpunorm tensor", bytes);
            let mut encoder = ctx
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("gpunorm upload"),
                });
            // The staging buffer may go back to the pool before the copy runs: whoever takes it
            // next maps it first, and wgpu maps a buffer only once the GPU is done with it.
            let _staging = ctx.upload(&mut encoder, &buffer, data)?;
            ctx.queue.submit([encoder.finish()]);
            Ok(GpuTensor {
                buffer,
                len: data.len(),
                owner: ctx.id,
            })
        })?
    }

    /// Reads a GPU tensor back (waits for the work that writes it).
    pub fn download(&self, tensor: &GpuTensor) -> Result<Vec<f32>, NormError> {
        let ctx = self.context_of("download", "tensor", tensor)?;
        let _serial = ctx.exclusive();
        let mut out = vec![0f32; tensor.len];
        ctx.scoped("download", || -> Result<(), NormError> {
            let bytes = (tensor.len * 4) as u64;
            let staging = ctx.take(
                "gpunorm download",
                bytes,
                wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            );
            let mut encoder = ctx
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("gpunorm download"),
                });
            if bytes > 0 {
                encoder.copy_buffer_to_buffer(&tensor.buffer, 0, &staging, 0, bytes);
            }
            ctx.queue.submit([encoder.finish()]);
            ctx.read_into(&staging, &mut out)
        })??;
        Ok(out)
    }

    /// [`Normalizer::layer_norm`] on a GPU tensor, into a new GPU tensor; nothing crosses to the
    /// host and nothing waits, so ops chain. Same errors as `layer_norm`, plus
    /// [`NormError::NotGpu`] on the CPU fallback.
    pub fn layer_norm_gpu(
        &self,
        x: &GpuTensor,
        features: usize,
        opts: &LayerNorm<'_>,
    ) -> Result<GpuTensor, NormError> {
        let ctx = self.context_of("layer_norm_gpu", "x", x)?;
        let _serial = ctx.exclusive();
        let rows = layer_norm::validate_len(x.len, features, opts)?;
        ctx.scoped("layer_norm_gpu", || -> Result<GpuTensor, NormError> {
            let output = new_tensor_buffer(ctx, "gpunorm tensor", (x.len * 4) as u64);
            if rows > 0 {
                let mut encoder =
                    ctx.device
                        .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                            label: Some("layer_norm_gpu"),
                        });
                layer_norm::encode(
                    ctx,
                    &mut encoder,
                    Rows {
                        x: &x.buffer,
                        y: &output,
                        rows,
                    },
                    features,
                    opts,
                    None,
                )?;
                ctx.queue.submit([encoder.finish()]);
            }
            Ok(GpuTensor {
                buffer: output,
                len: x.len,
                owner: ctx.id,
            })
        })?
    }

    /// [`Normalizer::batch_norm_train`] on a GPU tensor (features-last): the output stays on the
    /// device; the statistics come back (for [`RunningStats::update_with`]), so this call waits
    /// for the GPU. Same errors as `batch_norm_train`, plus [`NormError::NotGpu`].
    pub fn batch_norm_train_gpu(
        &self,
        x: &GpuTensor,
        features: usize,
        opts: &BatchNorm<'_>,
    ) -> Result<(GpuTensor, BatchStats), NormError> {
        let (y, stats, count) =
            self.batch_norm_on_device("batch_norm_train_gpu", x, features, opts, None)?;
        let (mean, var) = stats.expect("training returns statistics");
        Ok((y, BatchStats { mean, var, count }))
    }

    /// [`Normalizer::batch_norm_eval`] on a GPU tensor (features-last), into a new GPU tensor,
    /// without waiting for the GPU. Same errors as `batch_norm_eval`, plus [`NormError::NotGpu`].
    pub fn batch_norm_eval_gpu(
        &self,
        x: &GpuTensor,
        features: usize,
        opts: &BatchNorm<'_>,
        stats: &RunningStats,
    ) -> Result<GpuTensor, NormError> {
        self.batch_norm_on_device("batch_norm_eval_gpu", x, features, opts, Some(stats))
            .map(|(y, _, _)| y)
    }

    /// BatchNorm of a GPU tensor into a new one: training without `running` (returns the batch
    /// statistics and the count), eval with it.
    #[allow(clippy::type_complexity)]
    fn batch_norm_on_device(
        &self,
        op: &'static str,
        x: &GpuTensor,
        features: usize,
        opts: &BatchNorm<'_>,
        running: Option<&RunningStats>,
    ) -> Result<(GpuTensor, Option<(Vec<f32>, Vec<f32>)>, usize), NormError> {
        let ctx = self.context_of(op, "x", x)?;
        let _serial = ctx.exclusive();
        let shape = Shape::features_last_len(x.len, features)?;
        let (count, first) = batch_norm::validate(&shape, opts)?;
        let stats = match running {
            Some(r) => {
                batch_norm::validate_stats(&shape, r)?;
                Stats::Running(r)
            }
            None => Stats::Batch { first },
        };
        let output = ctx.scoped(op, || {
            new_tensor_buffer(ctx, "gpunorm tensor", (x.len * 4) as u64)
        })?;
        let io = Io::Device {
            x: &x.buffer,
            y: &output,
            len: x.len,
        };
        let out = batch_norm::gpu(ctx, io, &shape, opts, stats)?;
        Ok((
            GpuTensor {
                buffer: output,
                len: x.len,
                owner: ctx.id,
            },
            out.stats,
            count,
        ))
    }

    /// Records LayerNorm of the first `len` values of `x` (rows of `features`) into `y` as one
    /// compute pass of the caller's `encoder`; the caller submits it. Both buffers need
    /// `BufferUsages::STORAGE` and room for `len` values, `y` must be another buffer than `x`,
    /// and the tensor must fit one binding. A call that fails records nothing.
    pub fn encode_layer_norm(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        len: usize,
        features: usize,
        opts: &LayerNorm<'_>,
    ) -> Result<(), NormError> {
        let ctx = self.context("encode_layer_norm")?;
        let _serial = ctx.exclusive();
        let rows = layer_norm::validate_len(len, features, opts)?;
        check_buffers(ctx, len, features, &[("x", x), ("y", y)])?;
        if x == y {
            // wgpu refuses one buffer bound read-only and read-write in one dispatch, and would
            // say so only when the caller finishes the encoder.
            return Err(NormError::InvalidBuffer {
                name: "y",
                problem: "it is the same buffer as x; the output needs a buffer of its own",
            });
        }
        if rows == 0 {
            return Ok(());
        }
        ctx.scoped("encode_layer_norm", || {
            layer_norm::encode(ctx, encoder, Rows { x, y, rows }, features, opts, None)
        })?
    }
}

fn new_tensor_buffer(ctx: &GpuContext, label: &str, bytes: u64) -> wgpu::Buffer {
    use wgpu::BufferUsages as U;
    ctx.buffer(label, bytes, U::STORAGE | U::COPY_SRC | U::COPY_DST)
}
