//! LayerNorm: its options, input validation, and the GPU host that drives `shaders/layer_norm.wgsl`.
//!
//! Path of a tensor: `Normalizer::layer_norm` validates → `gpu` splits the rows into chunks that
//! fit one binding → each chunk is uploaded, dispatched (a size-class kernel, see [`Kernel`]) and
//! read back.

use std::time::Duration;

use crate::context::{GpuContext, PassTimer};
use crate::shaders::{self, Reduce, Width};
use crate::{check_eps, check_param, NormError};

/// Options for [`Normalizer::layer_norm`](crate::Normalizer::layer_norm).
///
/// ```
/// use gpunorm::LayerNorm;
/// let gamma = [1.0, 2.0, 0.5];
/// let opts = LayerNorm { gamma: Some(&gamma), ..Default::default() };
/// assert_eq!(opts.eps, 1e-5);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerNorm<'a> {
    /// Added to the variance before the square root; finite and >= 0. Default 1e-5.
    pub eps: f32,
    /// Per-feature scale (one value per feature), or None for 1.
    pub gamma: Option<&'a [f32]>,
    /// Per-feature shift (one value per feature), or None for 0.
    pub beta: Option<&'a [f32]>,
}

impl Default for LayerNorm<'_> {
    fn default() -> Self {
        Self {
            eps: 1e-5,
            gamma: None,
            beta: None,
        }
    }
}

/// Checks a LayerNorm call; returns the number of rows.
pub(crate) fn validate(
    x: &[f32],
    features: usize,
    opts: &LayerNorm<'_>,
) -> Result<usize, NormError> {
    validate_len(x.len(), features, opts)
}

/// [`validate`] for a tensor of `len` values that is not a host slice.
pub(crate) fn validate_len(
    len: usize,
    features: usize,
    opts: &LayerNorm<'_>,
) -> Result<usize, NormError> {
    let rows = crate::rows_of_len(len, features)?;
    check_eps(opts.eps)?;
    check_param("gamma", opts.gamma, features)?;
    check_param("beta", opts.beta, features)?;
    Ok(rows)
}

/// Threads per LayerNorm workgroup.
const WG: u32 = 256;

/// The LayerNorm pipeline for a row length on a device: pipelines are specialised by size class
/// (threads per row, elements held per thread), by features % 4 (vec4 or f32 elements) and by the
/// device's reductions, and cached under [`Kernel::label`].
#[derive(Debug, Clone, Copy)]
struct Kernel {
    width: Width,
    reduce: Reduce,
    /// Threads per row: a power of two up to `WG`; a workgroup takes `WG / per_row` rows.
    per_row: u32,
    /// Elements each thread keeps in registers (`layer_norm_held`, one read of the input), or 0
    /// for the looped kernel that reads the row again for each pass.
    held: u32,
}

impl Kernel {
    /// Rows of up to 128 elements share a workgroup, one thread per element rounded up to a
    /// power of two; rows of up to 2048 elements (8192 features with vec4) are held in
    /// registers by 256 threads, 1, 2, 4 or 8 elements each; longer rows use the looped kernel,
    /// one workgroup per row. (Holding rows of up to 8192 elements in 1024-thread workgroups ran
    /// 2.3–3× slower than the looped kernel on llvmpipe at 256×32768, so it is not offered.)
    fn for_features(ctx: &GpuContext, features: usize) -> Kernel {
        let width = Width::for_features(features);
        let n = features / width.lanes();
        let reduce = if ctx.subgroups {
            Reduce::Subgroup
        } else {
            Reduce::Tree
        };
        let (per_row, held) = match n.div_ceil(WG as usize) {
            _ if n <= WG as usize / 2 => (n.next_power_of_two() as u32, 1),
            k @ 1..=8 => (WG, k.next_power_of_two() as u32),
            _ => (WG, 0),
        };
        Kernel {
            width,
            reduce,
            per_row,
            held,
        }
    }

    fn entry(&self) -> &'static str {
        if self.held > 0 {
            "layer_norm_held"
        } else {
            "layer_norm"
        }
    }

    /// Rows one workgroup normalizes.
    fn rows_per_group(&self) -> usize {
        if self.held > 0 {
            (WG / self.per_row) as usize
        } else {
            1
        }
    }

    /// The pipeline cache key, also the label a GPU debugger shows.
    fn label(&self) -> String {
        format!(
            "layer_norm {} {} t{} k{}",
            self.width.name(),
            self.reduce.name(),
            self.per_row,
            self.held
        )
    }

    /// The WGSL module.
    fn source(&self) -> String {
        shaders::layer_norm(self.width, self.reduce, WG, self.per_row, self.held.max(1))
    }
}

// Keep in sync with `Params` in shaders/layer_norm.wgsl.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct LayerNormParams {
    rows: u32,
    features: u32,
    eps: f32,
    flags: u32,
}
const _: () = assert!(std::mem::size_of::<LayerNormParams>() == 16);

const FLAG_GAMMA: u32 = 1;
const FLAG_BETA: u32 = 2;

/// Rows one dispatch may cover: bounded by the binding size, the 2-D grid and u32 indexing.
/// Errors when a single row does not fit one binding.
fn max_rows(ctx: &GpuContext, features: usize) -> Result<usize, NormError> {
    let row_bytes = (features * 4) as u64;
    let max_bytes = ctx.max_binding_bytes();
    if row_bytes > max_bytes {
        return Err(NormError::TooLarge {
            what: "one row",
            needed: row_bytes,
            limit: max_bytes,
        });
    }
    let max_groups = ctx.limits.max_compute_workgroups_per_dimension as usize;
    Ok(((max_bytes / row_bytes) as usize)
        .min(max_groups * max_groups)
        .min(u32::MAX as usize / features))
}

/// The rows one LayerNorm dispatch reads from `x` and writes to `y`, both from offset 0.
pub(crate) struct Rows<'a> {
    pub x: &'a wgpu::Buffer,
    pub y: &'a wgpu::Buffer,
    pub rows: usize,
}

/// Records LayerNorm of `io` as one compute pass of `encoder`, timed by `timer` where given.
/// The rows must fit one dispatch ([`max_rows`]); the caller has validated everything else.
pub(crate) fn encode(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    io: Rows<'_>,
    features: usize,
    opts: &LayerNorm<'_>,
    timer: Option<&PassTimer>,
) -> Result<(), NormError> {
    let Rows {
        x: input,
        y: output,
        rows,
    } = io;
    let kernel = Kernel::for_features(ctx, features);
    let label = kernel.label();
    let pipeline = ctx.pipeline(&label, || kernel.source(), kernel.entry())?;
    let flags = if opts.gamma.is_some() { FLAG_GAMMA } else { 0 }
        | if opts.beta.is_some() { FLAG_BETA } else { 0 };
    let p = LayerNormParams {
        rows: rows as u32,
        features: features as u32,
        eps: opts.eps,
        flags,
    };
    let params = ctx.buffer(
        "layer_norm params",
        16,
        wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
    );
    ctx.queue.write_buffer(&params, 0, bytemuck::bytes_of(&p));
    let gamma = ctx.param_buffer("layer_norm gamma", opts.gamma);
    let beta = ctx.param_buffer("layer_norm beta", opts.beta);
    let bind_group = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some(&label),
        layout: &pipeline.get_bind_group_layout(0),
        entries: &[
            entry(0, &params),
            entry(1, input),
            entry(2, output),
            entry(3, &gamma),
            entry(4, &beta),
        ],
    });
    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some(&label),
        timestamp_writes: timer.map(|t| t.writes()),
    });
    pass.set_pipeline(&pipeline);
    pass.set_bind_group(0, &bind_group, &[]);
    let (gx, gy) = grid(
        rows.div_ceil(kernel.rows_per_group()),
        ctx.limits.max_compute_workgroups_per_dimension as usize,
    );
    pass.dispatch_workgroups(gx, gy, 1);
    Ok(())
}

/// Runs LayerNorm on the GPU into `y`; returns the kernel time where timestamps exist. Tensors
/// larger than one binding go through in chunks of whole rows.
pub(crate) fn gpu(
    ctx: &GpuContext,
    x: &[f32],
    y: &mut [f32],
    features: usize,
    opts: &LayerNorm<'_>,
) -> Result<Option<Duration>, NormError> {
    let rows = x.len() / features;
    if rows == 0 {
        return Ok(None);
    }
    let chunk_rows = max_rows(ctx, features)?.min(rows);
    let chunk_bytes = (chunk_rows * features * 4) as u64;
    ctx.scoped("layer_norm", || -> Result<_, NormError> {
        use wgpu::BufferUsages as U;
        let input = ctx.take("layer_norm x", chunk_bytes, U::STORAGE | U::COPY_DST);
        let output = ctx.take(
            "layer_norm y",
            chunk_bytes,
            U::STORAGE | U::COPY_SRC | U::COPY_DST,
        );
        let staging = ctx.take(
            "layer_norm readback",
            chunk_bytes,
            U::MAP_READ | U::COPY_DST,
        );
        let mut timer = PassTimer::new(ctx);
        for (x_chunk, y_chunk) in x
            .chunks(chunk_rows * features)
            .zip(y.chunks_mut(chunk_rows * features))
        {
            #[cfg(debug_assertions)]
            poison(ctx, &output, x_chunk.len());
            let mut encoder = ctx
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("layer_norm"),
                });
            let _upload = ctx.upload(&mut encoder, &input, x_chunk)?;
            encode(
                ctx,
                &mut encoder,
                Rows {
                    x: &input,
                    y: &output,
                    rows: x_chunk.len() / features,
                },
                features,
                opts,
                timer.as_ref(),
            )?;
            if let Some(t) = &timer {
                t.resolve(&mut encoder);
            }
            encoder.copy_buffer_to_buffer(&output, 0, &staging, 0, (x_chunk.len() * 4) as u64);
            ctx.queue.submit([encoder.finish()]);
            ctx.read_into(&staging, y_chunk)?;
            if let Some(t) = &mut timer {
                t.collect(ctx)?;
            }
        }
        Ok(PassTimer::total(&timer))
    })?
}

/// Checks that a caller's buffers can carry `len` values of a `features`-wide tensor in one
/// dispatch: storage usage, sizes, and the binding limit.
pub(crate) fn check_buffers(
    ctx: &GpuContext,
    len: usize,
    features: usize,
    buffers: &[(&'static str, &wgpu::Buffer)],
) -> Result<(), NormError> {
    let bytes = (len * 4) as u64;
    for &(name, b) in buffers {
        if !b.usage().contains(wgpu::BufferUsages::STORAGE) {
            return Err(NormError::InvalidBuffer {
                name,
                problem: "it lacks BufferUsages::STORAGE",
            });
        }
        if b.size() < bytes {
            return Err(NormError::InvalidBuffer {
                name,
                problem: "it is smaller than len f32 values",
            });
        }
    }
    let rows = len / features.max(1);
    if rows > max_rows(ctx, features)? {
        return Err(NormError::TooLarge {
            what: "a GPU-resident tensor",
            needed: bytes,
            limit: ctx.max_binding_bytes(),
        });
    }
    Ok(())
}

pub(crate) fn entry(binding: u32, buffer: &wgpu::Buffer) -> wgpu::BindGroupEntry<'_> {
    wgpu::BindGroupEntry {
        binding,
        resource: buffer.as_entire_binding(),
    }
}

/// A 2-D grid of at least `groups` workgroups with no side over `max` (65535 on most
/// adapters); shaders linearise it as `wid.y * num_workgroups.x + wid.x` and skip the excess.
pub(crate) fn grid(groups: usize, max: usize) -> (u32, u32) {
    let gx = groups.min(max);
    let gy = groups.div_ceil(gx.max(1));
    (gx as u32, gy as u32)
}

/// Debug builds fill an output buffer with NaN before a kernel runs, so any element a kernel
/// forgets to write fails the comparison with the reference instead of passing as 0.
#[cfg(debug_assertions)]
pub(crate) fn poison(ctx: &GpuContext, buffer: &wgpu::Buffer, floats: usize) {
    ctx.queue.write_buffer(buffer, 0, &vec![0xFFu8; floats * 4]);
}
