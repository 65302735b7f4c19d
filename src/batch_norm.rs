//! BatchNorm: options, outputs, running statistics, padding masks, validation, and the GPU host
//! that drives `shaders/batch_norm.wgsl`.
//!
//! Path of a tensor in training mode: `Normalizer::batch_norm_train` validates → `gpu` uploads x
//! (and the mask) → one submission runs `stats_seed`, `stats_partial`, `stats_merge` and `apply`
//! → y and the
//! per-column statistics are read back. Eval mode runs `apply` alone on the running statistics.

use std::time::Duration;

use crate::context::{GpuContext, PassTimer, Pooled};
use crate::layer_norm::{entry, grid};
use crate::shaders;
use crate::{check_eps, check_param, NormError};

/// Options for BatchNorm ([`Normalizer::batch_norm_train`](crate::Normalizer::batch_norm_train),
/// [`Normalizer::batch_norm_eval`](crate::Normalizer::batch_norm_eval) and their
/// channels-first forms).
///
/// ```
/// use gpunorm::{mask_from_lengths, BatchNorm};
/// // Two sequences padded to length 4; the second has 3 real tokens.
/// let mask = mask_from_lengths(&[4, 3], 4).unwrap();
/// let opts = BatchNorm { mask: Some(&mask), ..Default::default() };
/// assert_eq!(opts.eps, 1e-5);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchNorm<'a> {
    /// Added to the variance before the square root; finite and >= 0. Default 1e-5.
    pub eps: f32,
    /// Per-feature scale (one value per feature or channel), or None for 1.
    pub gamma: Option<&'a [f32]>,
    /// Per-feature shift, or None for 0.
    pub beta: Option<&'a [f32]>,
    /// One entry per position (row for features-last, (batch, spatial) pair for channels-first);
    /// false marks padding: left out of the statistics and written as 0. None counts every row.
    pub mask: Option<&'a [bool]>,
}

impl Default for BatchNorm<'_> {
    fn default() -> Self {
        Self {
            eps: 1e-5,
            gamma: None,
            beta: None,
            mask: None,
        }
    }
}

/// What BatchNorm training returns: the output and the batch statistics it used.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchNormOutput {
    /// Normalized tensor, same layout as the input; masked positions are 0.
    pub y: Vec<f32>,
    /// Per-feature mean over the counted positions.
    pub mean: Vec<f32>,
    /// Per-feature biased variance over the counted positions.
    pub var: Vec<f32>,
    /// Positions counted (rows, or batch × spatial for channels-first, less the masked ones).
    pub count: usize,
}

/// Batch statistics from [`Normalizer::batch_norm_train_into`](crate::Normalizer::batch_norm_train_into):
/// [`BatchNormOutput`] without the output tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchStats {
    /// Per-feature mean over the counted positions.
    pub mean: Vec<f32>,
    /// Per-feature biased variance over the counted positions.
    pub var: Vec<f32>,
    /// Positions counted.
    pub count: usize,
}

/// Running statistics for eval mode, updated with PyTorch's rule after each training step.
#[derive(Debug, Clone, PartialEq)]
pub struct RunningStats {
    /// Running per-feature mean.
    pub mean: Vec<f32>,
    /// Running per-feature (unbiased) variance.
    pub var: Vec<f32>,
    /// Weight of each new batch, in [0, 1].
    pub momentum: f32,
}

impl RunningStats {
    /// Mean 0, variance 1 and momentum 0.1 for each of `features` features, as PyTorch starts.
    pub fn new(features: usize) -> RunningStats {
        RunningStats {
            mean: vec![0.0; features],
            var: vec![1.0; features],
            momentum: 0.1,
        }
    }

    /// Folds a training batch in: new = (1 − momentum) · old + momentum · batch, where the batch
    /// variance is the unbiased one, var · count / (count − 1).
    ///
    /// Errors, leaving the statistics unchanged, when the batch counted fewer than 2 positions,
    /// its feature count differs, or momentum is not in [0, 1].
    pub fn update(&mut self, out: &BatchNormOutput) -> Result<(), NormError> {
        self.fold(&out.mean, &out.var, out.count)
    }

    /// [`RunningStats::update`] from the statistics of a `batch_norm_train_into` call.
    pub fn update_with(&mut self, stats: &BatchStats) -> Result<(), NormError> {
        self.fold(&stats.mean, &stats.var, stats.count)
    }

    fn fold(&mut self, mean: &[f32], var: &[f32], count: usize) -> Result<(), NormError> {
        let features = self.mean.len();
        check_param("running var", Some(&self.var), features)?;
        check_param("batch mean", Some(mean), features)?;
        check_param("batch var", Some(var), features)?;
        if !(0.0..=1.0).contains(&self.momentum) {
            return Err(NormError::InvalidParam {
                name: "momentum",
                value: self.momentum,
                expected: "in [0, 1]",
            });
        }
        if count < 2 {
            return Err(NormError::TooFewRows { count });
        }
        let m = self.momentum as f64;
        let unbias = count as f64 / (count - 1) as f64;
        for c in 0..features {
            let new_mean = (1.0 - m) * self.mean[c] as f64 + m * mean[c] as f64;
            let new_var = (1.0 - m) * self.var[c] as f64 + m * var[c] as f64 * unbias;
            self.mean[c] = new_mean as f32;
            self.var[c] = new_var as f32;
        }
        Ok(())
    }
}

/// The row mask of a padded batch: `lengths[i]` real positions, then padding, for each of the
/// `lengths.len()` sequences of `seq_len` positions (batch-major, `lengths.len() · seq_len` entries).
///
/// ```
/// assert_eq!(gpunorm::mask_from_lengths(&[2, 1], 3).unwrap(), [true, true, false, true, false, false]);
/// ```
pub fn mask_from_lengths(lengths: &[usize], seq_len: usize) -> Result<Vec<bool>, NormError> {
    if lengths.len().checked_mul(seq_len).is_none() {
        return Err(NormError::TooLarge {
            what: "a mask of lengths.len() × seq_len entries",
            needed: u64::MAX,
            limit: usize::MAX as u64,
        });
    }
    if let Some((index, &length)) = lengths.iter().enumerate().find(|&(_, &l)| l > seq_len) {
        return Err(NormError::SequenceTooLong {
            index,
            length,
            seq_len,
        });
    }
    Ok(lengths
        .iter()
        .flat_map(|&l| (0..seq_len).map(move |s| s < l))
        .collect())
}

/// A BatchNorm tensor seen as [batch, channels, spatial]; features-last is spatial = 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Shape {
    pub channels: usize,
    pub spatial: usize,
    /// batch × spatial.
    pub positions: usize,
}

impl Shape {
    pub fn features_last(x: &[f32], features: usize) -> Result<Shape, NormError> {
        Self::features_last_len(x.len(), features)
    }

    /// [`Shape::features_last`] for a tensor of `len` values that is not a host slice.
    pub fn features_last_len(len: usize, features: usize) -> Result<Shape, NormError> {
        let rows = crate::rows_of_len(len, features)?;
        Ok(Shape {
            channels: features,
            spatial: 1,
            positions: rows,
        })
    }

    pub fn channels_first(x: &[f32], channels: usize, spatial: usize) -> Result<Shape, NormError> {
        if spatial == 0 {
            return Err(NormError::ZeroDimension { name: "spatial" });
        }
        let plane = channels.checked_mul(spatial).ok_or(NormError::TooLarge {
            what: "channels × spatial (it overflows usize)",
            needed: u64::MAX,
            limit: usize::MAX as u64,
        })?;
        let batch = crate::rows_of(x, plane).map_err(|e| match e {
            NormError::LengthNotMultiple { len, .. } => NormError::LengthNotMultiple {
                len,
                features: plane,
            },
            e => e,
        })?;
        Ok(Shape {
            channels,
            spatial,
            positions: batch * spatial,
        })
    }
}

/// Checks a BatchNorm call (either mode); returns the number of counted positions and the first
/// of them (the GPU shifts each column by its value there).
pub(crate) fn validate(shape: &Shape, opts: &BatchNorm<'_>) -> Result<(usize, usize), NormError> {
    check_eps(opts.eps)?;
    check_param("gamma", opts.gamma, shape.channels)?;
    check_param("beta", opts.beta, shape.channels)?;
    if shape.positions == 0 {
        return Err(NormError::EmptyBatch {
            reason: "x is empty",
        });
    }
    match opts.mask {
        None => Ok((shape.positions, 0)),
        Some(m) if m.len() != shape.positions => Err(NormError::MaskLength {
            len: m.len(),
            rows: shape.positions,
        }),
        Some(m) => {
            let first = m.iter().position(|&k| k).ok_or(NormError::EmptyBatch {
                reason: "every row is masked out",
            })?;
            Ok((m.iter().filter(|&&k| k).count(), first))
        }
    }
}

/// Checks running statistics against the shape: one mean and one non-negative variance per feature.
pub(crate) fn validate_stats(shape: &Shape, stats: &RunningStats) -> Result<(), NormError> {
    check_param("running mean", Some(&stats.mean), shape.channels)?;
    check_param("running var", Some(&stats.var), shape.channels)?;
    match stats.var.iter().find(|v| v.is_nan() || **v < 0.0) {
        Some(&value) => Err(NormError::InvalidParam {
            name: "running var",
            value,
            expected: "a variance >= 0",
        }),
        None => Ok(()),
    }
}

// Keep in sync with `Params` in shaders/batch_norm.wgsl.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct BatchNormParams {
    positions: u32,
    channels: u32,
    spatial: u32,
    tile_offset: u32,
    tile_cols: u32,
    tile_rows: u32,
    rows_per_tile: u32,
    row_tiles: u32,
    col_tiles: u32,
    eps: f32,
    flags: u32,
    total_tiles: u32,
    first: u32,
    _pad: [u32; 3],
}
const _: () = assert!(std::mem::size_of::<BatchNormParams>() == 64);

const FLAG_GAMMA: u32 = 1;
const FLAG_BETA: u32 = 2;
const FLAG_MASK: u32 = 4;
const THREADS: usize = 256;
/// About this many workgroups in the statistics pass keep a big GPU busy without making the
/// in-order merge long.
const TARGET_TILES: usize = 8192;

impl BatchNormParams {
    /// Parameters for one chunk of `positions` positions of a tensor shaped like `shape`.
    fn new(shape: &Shape, positions: usize, opts: &BatchNorm<'_>) -> Self {
        // Features-last: adjacent threads read adjacent columns. Channels-first: every thread of a
        // workgroup works on one channel, reading contiguous spatial runs.
        let tile_cols = if shape.spatial == 1 {
            shape.channels.next_power_of_two().min(64)
        } else {
            1
        };
        let tile_rows = THREADS / tile_cols;
        let col_tiles = shape.channels.div_ceil(tile_cols);
        let row_tiles = TARGET_TILES
            .div_ceil(col_tiles)
            .min(positions.div_ceil(tile_rows * 4))
            .max(1);
        let rows_per_tile = positions.div_ceil(row_tiles);
        let row_tiles = positions.div_ceil(rows_per_tile);
        let flags = if opts.gamma.is_some() { FLAG_GAMMA } else { 0 }
            | if opts.beta.is_some() { FLAG_BETA } else { 0 }
            | if opts.mask.is_some() { FLAG_MASK } else { 0 };
        BatchNormParams {
            positions: positions as u32,
            channels: shape.channels as u32,
            spatial: shape.spatial as u32,
            tile_offset: 0,
            tile_cols: tile_cols as u32,
            tile_rows: tile_rows as u32,
            rows_per_tile: rows_per_tile as u32,
            row_tiles: row_tiles as u32,
            col_tiles: col_tiles as u32,
            eps: opts.eps,
            flags,
            total_tiles: 0,
            first: 0,
            _pad: [0; 3],
        }
    }
}

/// Where the statistics come from: computed from the batch, or given (eval mode).
pub(crate) enum Stats<'a> {
    /// From the batch; `first` is the first counted position, whose values shift each column.
    Batch {
        first: usize,
    },
    Running(&'a RunningStats),
}

/// What a GPU BatchNorm run returns besides the output.
pub(crate) struct GpuOutput {
    /// Per-column (mean, biased var) in training mode; None in eval mode.
    pub stats: Option<(Vec<f32>, Vec<f32>)>,
    pub kernel: Option<Duration>,
}

/// Where the values come from and where the output goes.
pub(crate) enum Io<'a> {
    /// Host slices: uploaded (in chunks that fit one binding) and read back.
    Host { x: &'a [f32], y: &'a mut [f32] },
    /// Storage buffers on the device, `len` values each, fitting one binding; nothing crosses
    /// to the host but the statistics.
    Device {
        x: &'a wgpu::Buffer,
        y: &'a wgpu::Buffer,
        len: usize,
    },
}

impl Io<'_> {
    fn len(&self) -> usize {
        match self {
            Io::Host { x, .. } => x.len(),
            Io::Device { len, .. } => *len,
        }
    }
}

/// A buffer the call made (pooled or not) or one it was given.
enum Buf<'a> {
    Made(Pooled<'a>),
    Given(&'a wgpu::Buffer),
}

impl std::ops::Deref for Buf<'_> {
    type Target = wgpu::Buffer;
    fn deref(&self) -> &wgpu::Buffer {
        match self {
            Buf::Made(p) => p,
            Buf::Given(b) => b,
        }
    }
}

/// One piece of a tensor that fits one binding: whole rows, or whole batch items.
struct Chunk<'a> {
    input: Buf<'a>,
    mask: Pooled<'a>,
    params: wgpu::Buffer,
    /// Workgroups of its statistics pass.
    tiles: usize,
    /// Offset of the chunk in the tensor, and its length, in values.
    start: usize,
    len: usize,
}

/// Runs BatchNorm on the GPU. Training returns the batch statistics; eval returns None. Host
/// tensors larger than one binding are split into chunks of whole rows (batch items for
/// channels-first), all resident: statistics over every chunk, then each chunk is normalized.
/// Device tensors are one chunk; eval on them returns without waiting for the GPU.
pub(crate) fn gpu(
    ctx: &GpuContext,
    mut io: Io<'_>,
    shape: &Shape,
    opts: &BatchNorm<'_>,
    stats: Stats<'_>,
) -> Result<GpuOutput, NormError> {
    let c = shape.channels;
    let s = shape.spatial;
    let len = io.len();
    let limit = ctx.max_binding_bytes();
    // A chunk holds whole batch items (one item = channels × spatial values = spatial positions).
    let item_bytes = (c * s * 4) as u64;
    if item_bytes > limit || c * s > u32::MAX as usize {
        return Err(NormError::TooLarge {
            what: "one row (or batch item) of a BatchNorm tensor",
            needed: item_bytes,
            limit,
        });
    }
    let items_per_chunk = ((limit / item_bytes) as usize).min(u32::MAX as usize / (c * s));
    let chunk_values = match io {
        Io::Host { .. } => items_per_chunk * c * s,
        Io::Device { .. } => len,
    };
    let training = matches!(stats, Stats::Batch { .. });
    // Training reads its statistics back, so it waits; eval on a device tensor does not.
    let waits = training || matches!(io, Io::Host { .. });
    let source = shaders::batch_norm;
    // Four values at a time where four neighbours share a position or a channel.
    let by4 = if s == 1 { c } else { s }.is_multiple_of(4);
    let apply = if by4 {
        ctx.pipeline("batch_norm apply4", shaders::batch_norm_apply4, "apply4")?
    } else {
        ctx.pipeline("batch_norm apply", source, "apply")?
    };
    let per_thread = if by4 { 4 } else { 1 };
    let stages = if training {
        Some((
            ctx.pipeline("batch_norm stats_seed", source, "stats_seed")?,
            ctx.pipeline("batch_norm stats_partial", source, "stats_partial")?,
            ctx.pipeline("batch_norm stats_merge", source, "stats_merge")?,
        ))
    } else {
        None
    };

    ctx.scoped("batch_norm", || -> Result<_, NormError> {
        use wgpu::BufferUsages as U;
        // Every chunk on the device, with its mask and its parameters.
        let first = match stats {
            Stats::Batch { first } => first,
            Stats::Running(_) => 0,
        };
        let mut chunks = Vec::new();
        let mut total_tiles = 0u32;
        // Uploads go through pooled staging buffers, recorded here and submitted before the work.
        let mut uploads = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("batch_norm upload"),
            });
        let mut staged = Vec::new();
        for start in (0..len).step_by(chunk_values.max(1)) {
            let chunk_len = chunk_values.min(len - start);
            let positions = chunk_len / c;
            let (p0, p1) = (start / c, start / c + positions);
            let mut p = BatchNormParams::new(shape, positions, opts);
            p.tile_offset = total_tiles;
            p.first = if (p0..p1).contains(&first) {
                (first - p0) as u32
            } else {
                0
            };
            total_tiles += p.row_tiles;
            let input = match &io {
                Io::Host { x, .. } => {
                    let b = ctx.take(
                        "batch_norm x",
                        (chunk_len * 4) as u64,
                        U::STORAGE | U::COPY_DST,
                    );
                    staged.push(ctx.upload(&mut uploads, &b, &x[start..start + chunk_len])?);
                    Buf::Made(b)
                }
                Io::Device { x, .. } => Buf::Given(x),
            };
            let words: Option<Vec<u32>> = opts
                .mask
                .map(|m| m[p0..p1].iter().map(|&k| k as u32).collect());
            let mask_bytes = words.as_ref().map_or(16, |w| w.len() as u64 * 4);
            let mask = ctx.take_or_new(
                waits,
                "batch_norm mask",
                mask_bytes,
                U::STORAGE | U::COPY_DST,
            );
            if let Some(w) = &words {
                staged.push(ctx.upload(&mut uploads, &mask, w)?);
            }
            let params = ctx.buffer("batch_norm params", 64, U::UNIFORM | U::COPY_DST);
            let tiles = p.col_tiles as usize * p.row_tiles as usize;
            chunks.push((
                Chunk {
                    input,
                    mask,
                    params,
                    tiles,
                    start,
                    len: chunk_len,
                },
                p,
            ));
        }
        ctx.queue.submit([uploads.finish()]);
        for (chunk, p) in &mut chunks {
            p.total_tiles = total_tiles;
            ctx.queue
                .write_buffer(&chunk.params, 0, bytemuck::bytes_of(p));
        }
        let chunks: Vec<Chunk> = chunks.into_iter().map(|(chunk, _)| chunk).collect();
        let seed_chunk = chunks
            .iter()
            .position(|ch| (ch.start / c..(ch.start + ch.len) / c).contains(&first))
            .unwrap_or(0);

        let columns = ctx.take_or_new(
            waits,
            "batch_norm columns",
            c as u64 * 16,
            U::STORAGE | U::COPY_SRC | U::COPY_DST,
        );
        if let Stats::Running(rs) = stats {
            let cols: Vec<[f32; 4]> = rs
                .mean
                .iter()
                .zip(&rs.var)
                .map(|(&m, &v)| [0.0, m, v, 0.0])
                .collect();
            ctx.queue
                .write_buffer(&columns, 0, bytemuck::cast_slice(&cols));
        }
        let partials = ctx.take_or_new(
            waits,
            "batch_norm partials",
            total_tiles as u64 * c as u64 * 16,
            U::STORAGE,
        );
        let (output, staging) = match &io {
            Io::Host { .. } => {
                let bytes = (chunk_values.min(len) * 4) as u64;
                let out = ctx.take(
                    "batch_norm y",
                    bytes,
                    U::STORAGE | U::COPY_SRC | U::COPY_DST,
                );
                (
                    Buf::Made(out),
                    Some(ctx.take("batch_norm y readback", bytes, U::MAP_READ | U::COPY_DST)),
                )
            }
            Io::Device { y, .. } => (Buf::Given(y), None),
        };
        let stats_staging = ctx.take_or_new(
            waits,
            "batch_norm stats readback",
            c as u64 * 16,
            U::MAP_READ | U::COPY_DST,
        );
        let gamma = ctx.param_buffer("batch_norm gamma", opts.gamma);
        let beta = ctx.param_buffer("batch_norm beta", opts.beta);

        // Each pipeline's automatic layout holds only the bindings its entry point uses.
        let bind = |pipeline: &wgpu::ComputePipeline, chunk: &Chunk, used: &[u32]| {
            let all = [
                entry(0, &chunk.params),
                entry(1, &chunk.input),
                entry(2, &chunk.mask),
                entry(3, &partials),
                entry(4, &columns),
                entry(5, &output),
                entry(6, &gamma),
                entry(7, &beta),
            ];
            let entries: Vec<_> = all
                .into_iter()
                .filter(|e| used.contains(&e.binding))
                .collect();
            ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("batch_norm"),
                layout: &pipeline.get_bind_group_layout(0),
                entries: &entries,
            })
        };
        let max_groups = ctx.limits.max_compute_workgroups_per_dimension as usize;
        let column_groups = grid(c.div_ceil(THREADS), max_groups);
        let mut timer = if waits { PassTimer::new(ctx) } else { None };
        let mut column_stats = None;

        for (i, chunk) in chunks.iter().enumerate() {
            let mut encoder = ctx
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("batch_norm"),
                });
            {
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("batch_norm"),
                    timestamp_writes: timer.as_ref().map(|t| t.writes()),
                });
                // The statistics of every chunk go first, in the same pass as chunk 0's output.
                if let (0, Some((seed, partial, merge))) = (i, &stages) {
                    pass.set_pipeline(seed);
                    pass.set_bind_group(0, &bind(seed, &chunks[seed_chunk], &[0, 1, 4]), &[]);
                    pass.dispatch_workgroups(column_groups.0, column_groups.1, 1);
                    pass.set_pipeline(partial);
                    for ch in &chunks {
                        pass.set_bind_group(0, &bind(partial, ch, &[0, 1, 2, 3, 4]), &[]);
                        let (gx, gy) = grid(ch.tiles, max_groups);
                        pass.dispatch_workgroups(gx, gy, 1);
                    }
                    pass.set_pipeline(merge);
                    pass.set_bind_group(0, &bind(merge, chunk, &[0, 3, 4]), &[]);
                    pass.dispatch_workgroups(column_groups.0, column_groups.1, 1);
                }
                pass.set_pipeline(&apply);
                pass.set_bind_group(0, &bind(&apply, chunk, &[0, 1, 2, 4, 5, 6, 7]), &[]);
                let (gx, gy) = grid(chunk.len.div_ceil(THREADS * per_thread), max_groups);
                pass.dispatch_workgroups(gx, gy, 1);
            }
            if let Some(t) = &timer {
                t.resolve(&mut encoder);
            }
            if let Some(staging) = &staging {
                #[cfg(debug_assertions)]
                crate::layer_norm::poison(ctx, &output, chunk.len);
                encoder.copy_buffer_to_buffer(&output, 0, staging, 0, (chunk.len * 4) as u64);
            }
            if i == 0 && training {
                encoder.copy_buffer_to_buffer(&columns, 0, &stats_staging, 0, c as u64 * 16);
            }
            ctx.queue.submit([encoder.finish()]);
            if let (Some(staging), Io::Host { y, .. }) = (&staging, &mut io) {
                ctx.read_into(staging, &mut y[chunk.start..chunk.start + chunk.len])?;
            }
            if i == 0 && training {
                let mut cols = vec![0f32; 4 * c];
                ctx.read_into(&stats_staging, &mut cols)?;
                // mean = shift + mean_d, added in f64 so the sum is rounded once.
                let mean = cols
                    .chunks(4)
                    .map(|q| (q[0] as f64 + q[1] as f64) as f32)
                    .collect();
                let var = cols.chunks(4).map(|q| q[2]).collect();
                column_stats = Some((mean, var));
            }
            if let Some(t) = &mut timer {
                t.collect(ctx)?;
            }
        }
        Ok(GpuOutput {
            stats: column_stats,
            kernel: PassTimer::total(&timer),
        })
    })?
}
