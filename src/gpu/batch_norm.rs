//! BatchNorm on the GPU: the host side of `shaders/batch_norm.wgsl`,
//! `shaders/batch_norm_apply4.wgsl` and `shaders/batch_norm_rows.wgsl` (features-last tensors
//! whose width is a multiple of 4).
//!
//! Plan ([`Plan`]): chunks of whole batch items that fit one binding and one dispatch. Record and
//! read back ([`Run`]): training streams the chunks twice, once for the statistics (seed,
//! partial, merge per chunk, the chunk holding the first counted position first) and once to
//! apply them; eval streams them once. A tensor of one chunk is uploaded once. Only one chunk is
//! on the device at a time, so device memory stays bounded whatever the tensor's size.
//!
//! A tensor so wide that its per-column statistics (32 bytes a column) exceed one binding runs
//! in blocks of columns, each with its own statistics and partials buffers: the statistics pass
//! runs block by block, and the elementwise pass applies every block to a chunk before reading
//! it back.

use std::ops::Range;

use wgpu::BufferSlice;

use super::context::GpuContext;
use super::pool::{Lifetime, Pooled};
use super::shaders::{flags, Def, KernelDef, Pipeline, Slot, Source, WG};
use super::timer::{self, PassTimer};
use super::{grid, transfer};
use crate::cpu::{batch_norm_backward, redo_columns_in_f64};
use crate::ops::batch_norm::{BatchNorm, BatchStats, Counted, RunningStats, Shape};
use crate::ops::partial::{ColumnGrads, ColumnStats};
use crate::ops::stats_out_of_range;
use crate::{NormError, Timing};

const SEED: KernelDef = KernelDef {
    source: Source::BatchNorm,
    entry: "stats_seed",
    slots: &[Slot::Uniform(0), Slot::Read(1), Slot::ReadWrite(4)],
};
const PARTIAL: KernelDef = KernelDef {
    source: Source::BatchNorm,
    entry: "stats_partial",
    slots: &[
        Slot::Uniform(0),
        Slot::Read(1),
        Slot::Read(2),
        Slot::ReadWrite(3),
        Slot::ReadWrite(4),
    ],
};
const PARTIAL_ROWS: KernelDef = KernelDef {
    source: Source::BatchNormRows,
    entry: "stats_partial_rows",
    slots: &[
        Slot::Uniform(0),
        Slot::Read(1),
        Slot::Read(2),
        Slot::ReadWrite(3),
        Slot::Read(4),
    ],
};
const PARTIAL_HELD: KernelDef = KernelDef {
    entry: "stats_partial_held",
    ..PARTIAL_ROWS
};
const MERGE: KernelDef = KernelDef {
    source: Source::BatchNorm,
    entry: "stats_merge",
    slots: &[Slot::Uniform(0), Slot::ReadWrite(3), Slot::ReadWrite(4)],
};
/// params, x, mask, columns (statistics, then gamma and beta), y.
const APPLY: KernelDef = KernelDef {
    source: Source::BatchNorm,
    entry: "apply",
    slots: &[
        Slot::Uniform(0),
        Slot::Read(1),
        Slot::Read(2),
        Slot::ReadWrite(4),
        Slot::ReadWrite(5),
    ],
};
const APPLY4: KernelDef = KernelDef {
    source: Source::BatchNormApply4,
    entry: "apply4",
    slots: &[
        Slot::Uniform(0),
        Slot::Read(1),
        Slot::Read(2),
        Slot::Read(4),
        Slot::ReadWrite(5),
    ],
};
const APPLY_ROWS: KernelDef = KernelDef {
    source: Source::BatchNormRows,
    entry: "apply_rows",
    ..APPLY4
};
/// The backward pass (training): params, x, mask, partials, columns, dy for the sums over tiles;
/// params, partials, columns to merge them; params, x, mask, columns, dx, dy for dx.
const BACKWARD_PARTIAL: KernelDef = KernelDef {
    source: Source::BatchNorm,
    entry: "backward_partial",
    slots: &[
        Slot::Uniform(0),
        Slot::Read(1),
        Slot::Read(2),
        Slot::ReadWrite(3),
        Slot::ReadWrite(4),
        Slot::Read(6),
    ],
};
const BACKWARD_MERGE: KernelDef = KernelDef {
    source: Source::BatchNorm,
    entry: "backward_merge",
    slots: &[Slot::Uniform(0), Slot::ReadWrite(3), Slot::ReadWrite(4)],
};
const BACKWARD_APPLY: KernelDef = KernelDef {
    source: Source::BatchNorm,
    entry: "backward_apply",
    slots: &[
        Slot::Uniform(0),
        Slot::Read(1),
        Slot::Read(2),
        Slot::ReadWrite(4),
        Slot::ReadWrite(5),
        Slot::Read(6),
    ],
};
/// Folds a batch's statistics into running statistics on the device.
const RUNNING_UPDATE: KernelDef = KernelDef {
    source: Source::BatchNorm,
    entry: "running_update",
    slots: &[Slot::Uniform(0), Slot::ReadWrite(4), Slot::ReadWrite(7)],
};
/// `stats_seed` for a mask on the device: each column finds the first counted positions.
const SEED_SCAN: KernelDef = KernelDef {
    source: Source::BatchNorm,
    entry: "stats_seed_scan",
    slots: &[
        Slot::Uniform(0),
        Slot::Read(1),
        Slot::Read(2),
        Slot::ReadWrite(4),
    ],
};
/// Per-feature values between the caller's buffers (side by side in a pairs buffer) and the
/// columns, for ops recorded into a caller's encoder.
const PACK_AFFINE: KernelDef = KernelDef {
    source: Source::BatchNorm,
    entry: "pack_affine",
    slots: &[Slot::Uniform(0), Slot::ReadWrite(4), Slot::ReadWrite(8)],
};
const PACK_RUNNING: KernelDef = KernelDef {
    entry: "pack_running",
    ..PACK_AFFINE
};
const FOLD_RUNNING: KernelDef = KernelDef {
    entry: "fold_running",
    ..PACK_AFFINE
};
const UNPACK_GRADS: KernelDef = KernelDef {
    entry: "unpack_grads",
    ..PACK_AFFINE
};
#[cfg(test)]
pub(crate) const KERNELS: [&KernelDef; 17] = [
    &SEED,
    &SEED_SCAN,
    &PACK_AFFINE,
    &PACK_RUNNING,
    &FOLD_RUNNING,
    &UNPACK_GRADS,
    &PARTIAL,
    &PARTIAL_ROWS,
    &PARTIAL_HELD,
    &MERGE,
    &APPLY,
    &APPLY4,
    &APPLY_ROWS,
    &BACKWARD_PARTIAL,
    &BACKWARD_MERGE,
    &BACKWARD_APPLY,
    &RUNNING_UPDATE,
];

// Keep in sync with `Params` in shaders/shared/batch_norm_params.wgsl (a test compares the two).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct BatchNormParams {
    positions: u32,
    channels: u32,
    spatial: u32,
    tile_cols: u32,
    tile_rows: u32,
    rows_per_tile: u32,
    row_tiles: u32,
    col_tiles: u32,
    eps: f32,
    flags: u32,
    first: u32,
    stride: u32,
    col_base: u32,
    momentum: f32,
    seed_b: u32,
    seed_c: u32,
}
const _: () = assert!(std::mem::size_of::<BatchNormParams>() == 64);

/// Bytes of one column's statistics, (shift, mean_d, M2, count), and of its (gamma, beta, 0, 0):
/// the columns buffer holds all the statistics, then all the affine parameters.
const COLUMN_BYTES: u64 = 16;

/// Where a BatchNorm input comes from.
pub(crate) enum Input<'a> {
    /// A host slice, uploaded chunk by chunk.
    Host(&'a [f32]),
    /// A storage buffer on the device holding `len` values that fit one binding.
    Device(&'a wgpu::Buffer, usize),
}

impl Input<'_> {
    fn len(&self) -> usize {
        match self {
            Input::Host(x) => x.len(),
            Input::Device(_, len) => *len,
        }
    }
}

/// Where a BatchNorm output goes: a host slice (read back chunk by chunk) or a device buffer.
pub(crate) enum Output<'a> {
    Host(&'a mut [f32]),
    Device(&'a wgpu::Buffer),
}

/// Runs BatchNorm training; returns the batch statistics.
pub(crate) async fn train(
    ctx: &GpuContext,
    x: Input<'_>,
    mut y: Output<'_>,
    shape: &Shape,
    opts: &BatchNorm<'_>,
    counted: Counted,
) -> Result<(BatchStats, Timing), NormError> {
    let plan = Plan::new(ctx, shape, &x, opts, (counted.first, true))?;
    let mut run = Run::new(ctx, &plan, (&x, opts), Lifetime::Call, "batch_norm_train").await?;
    run.statistics(&x).await?;
    let statistics = run.stats_readback().await?;
    run.apply(&x, &mut y).await?;
    let (mean, var) = statistics.read(ctx).await?;
    let mut stats = BatchStats {
        mean,
        var,
        count: counted.count,
    };
    redo_out_of_range(ctx, (&x, &mut y), shape, opts, &mut stats).await?;
    Ok((stats, run.timing()))
}

/// Columns whose statistics left f32's range (spreads past about 1e19, or tiny values with eps
/// 0: see `stats_out_of_range`) are redone by the CPU fallback's f64 path, and their outputs
/// rewritten: on the host slice, or through a copy of a device tensor. Rare.
async fn redo_out_of_range(
    ctx: &GpuContext,
    (x, y): (&Input<'_>, &mut Output<'_>),
    shape: &Shape,
    opts: &BatchNorm<'_>,
    stats: &mut BatchStats,
) -> Result<(), NormError> {
    let columns: Vec<usize> = (0..shape.channels)
        .filter(|&c| stats_out_of_range(stats.mean[c] as f64, stats.var[c] as f64, opts.eps))
        .collect();
    if columns.is_empty() {
        return Ok(());
    }
    let moments = (&mut stats.mean[..], &mut stats.var[..]);
    match (x, y) {
        (Input::Host(x), Output::Host(y)) => {
            redo_columns_in_f64(x, y, shape, opts, moments, &columns);
        }
        (Input::Device(xb, len), Output::Device(yb)) => {
            let (mut xh, mut yh) = (vec![0f32; *len], vec![0f32; *len]);
            transfer::download(ctx, xb, &mut xh).await?;
            transfer::download(ctx, yb, &mut yh).await?;
            redo_columns_in_f64(&xh, &mut yh, shape, opts, moments, &columns);
            ctx.scoped("batch_norm_train", || {
                ctx.queue().write_buffer(yb, 0, bytemuck::cast_slice(&yh))
            })
            .await?;
        }
        _ => unreachable!("host inputs go with host outputs, device ones with device ones"),
    }
    Ok(())
}

/// A shard's statistics per column, (count, shift, mean − shift, M2), from the statistics
/// pass alone; all zero where nothing is counted. Columns out of f32's range are taken in f64
/// on the host.
pub(crate) async fn partial_stats(
    ctx: &GpuContext,
    x: &[f32],
    shape: &Shape,
    opts: &BatchNorm<'_>,
) -> Result<Vec<ColumnStats>, NormError> {
    let counted = |p: usize| opts.mask.is_none_or(|m| m[p]);
    let Some(first) = (0..shape.positions).find(|&p| counted(p)) else {
        return Ok(vec![ColumnStats::default(); shape.channels]);
    };
    let n = (0..shape.positions).filter(|&p| counted(p)).count() as f64;
    let input = Input::Host(x);
    let plan = Plan::new(ctx, shape, &input, opts, (first, true))?;
    let op = "batch_norm_stats";
    let mut run = Run::new(ctx, &plan, (&input, opts), Lifetime::Call, op).await?;
    run.statistics(&input).await?;
    let cols = run.stats_readback().await?.read_columns(ctx).await?;
    Ok((0..shape.channels)
        .map(|c| {
            let [shift, mean_d, m2, _] = cols[c];
            let var = m2 as f64 / n;
            if stats_out_of_range(mean_d as f64, var, opts.eps) {
                let (mean, var) = crate::cpu::column_in_f64(x, shape, opts.mask, c);
                return ColumnStats {
                    count: n,
                    shift: mean,
                    mean_d: 0.0,
                    m2: var * n,
                };
            }
            ColumnStats {
                count: n,
                shift: shift as f64,
                mean_d: mean_d as f64,
                m2: m2 as f64,
            }
        })
        .collect())
}

/// The statistics a kernel reads for given (merged) ones: (shift, mean_d, var, 1), so that
/// M2 / count is the variance without a large count in f32.
fn given_columns(stats: &[ColumnStats]) -> Vec<[f32; 4]> {
    stats
        .iter()
        .map(|c| [c.shift as f32, c.mean_d as f32, c.var() as f32, 1.0])
        .collect()
}

/// Normalization of host rows with given statistics: the apply pass alone. Columns out of
/// f32's range are rewritten on the host in f64.
pub(crate) async fn apply_stats(
    ctx: &GpuContext,
    x: &[f32],
    y: &mut [f32],
    shape: &Shape,
    opts: &BatchNorm<'_>,
    stats: &[ColumnStats],
) -> Result<(), NormError> {
    let input = Input::Host(x);
    let plan = Plan::new(ctx, shape, &input, opts, (0, true))?;
    let op = "batch_norm_apply";
    let mut run = Run::new(ctx, &plan, (&input, opts), Lifetime::Call, op).await?;
    run.load_columns(&given_columns(stats)).await?;
    run.apply(&input, &mut Output::Host(y)).await?;
    crate::cpu::columns_in_f64(x, y, shape, opts, stats);
    Ok(())
}

/// A shard's backward sums per column given the (merged) statistics: the sums pass alone.
pub(crate) async fn partial_grads(
    ctx: &GpuContext,
    (x, dy): (&[f32], &[f32]),
    shape: &Shape,
    opts: &BatchNorm<'_>,
    stats: &[ColumnStats],
) -> Result<Vec<ColumnGrads>, NormError> {
    let op = "batch_norm_backward_sums";
    ctx.check_storage_buffers(Slot::storage_count(BACKWARD_APPLY.slots), op)?;
    let n = opts
        .mask
        .map_or(shape.positions, |m| m.iter().filter(|&&k| k).count()) as f64;
    let input = Input::Host(x);
    let plan = Plan::new(ctx, shape, &input, opts, (0, false))?;
    let mut run = Run::new(ctx, &plan, (&input, opts), Lifetime::Call, op).await?;
    run.load_columns(&given_columns(stats)).await?;
    run.set_dy(Input::Host(dy), opts).await?;
    run.backward_sums(&input).await?;
    let (dgamma, dbeta) = run.read_gradients().await?;
    Ok(dbeta
        .iter()
        .zip(&dgamma)
        .map(|(&sum_dy, &sum_dy_xhat)| ColumnGrads {
            count: n,
            sum_dy: sum_dy as f64,
            sum_dy_xhat: sum_dy_xhat as f64,
            pad: 0.0,
        })
        .collect())
}

/// dx of host rows from the (merged) statistics and sums: the dx pass alone.
pub(crate) async fn apply_grads(
    ctx: &GpuContext,
    (x, dy): (&[f32], &[f32]),
    dx: &mut [f32],
    shape: &Shape,
    opts: &BatchNorm<'_>,
    (stats, grads): (&[ColumnStats], &[ColumnGrads]),
) -> Result<(), NormError> {
    let op = "batch_norm_backward_apply";
    ctx.check_storage_buffers(Slot::storage_count(BACKWARD_APPLY.slots), op)?;
    let input = Input::Host(x);
    let plan = Plan::new(ctx, shape, &input, opts, (0, false))?;
    let mut run = Run::new(ctx, &plan, (&input, opts), Lifetime::Call, op).await?;
    // The kernel divides the sums by the count in columns[c].w: the whole batch's, here 1 with
    // the variance in .z, so the sums go in already divided.
    let count = stats.first().map_or(1.0, |c| c.count);
    let cols = given_columns(stats);
    run.load_columns(&cols).await?;
    run.set_dy(Input::Host(dy), opts).await?;
    let sums: Vec<[f32; 2]> = grads
        .iter()
        .map(|g| [(g.sum_dy / count) as f32, (g.sum_dy_xhat / count) as f32])
        .collect();
    ctx.scoped(op, || {
        write_affine_sums(ctx, &plan, &run.columns, opts, &sums)
    })
    .await?;
    run.apply(&input, &mut Output::Host(dx)).await
}

/// BatchNorm training of a device tensor into a device buffer, its batch statistics folded into
/// `running` on the device ((0, mean, var, 1) per column) with weight `momentum`: no readback,
/// no wait. Columns whose statistics leave f32's range are not redone in f64 here, as the
/// waiting forms redo them (see [`train`]).
pub(crate) async fn train_running(
    ctx: &GpuContext,
    (x, mut y): (Input<'_>, Output<'_>),
    shape: &Shape,
    opts: &BatchNorm<'_>,
    counted: Counted,
    (running, momentum): (&wgpu::Buffer, f32),
) -> Result<(), NormError> {
    let op = "batch_norm_train_gpu_running";
    ctx.check_storage_buffers(Slot::storage_count(RUNNING_UPDATE.slots), op)?;
    let plan = Plan::new(ctx, shape, &x, opts, (counted.first, true))?;
    let mut run = Run::new(ctx, &plan, (&x, opts), Lifetime::Detached, op).await?;
    run.statistics(&x).await?;
    run.apply(&x, &mut y).await?;
    run.update_running(running, momentum).await
}

/// BatchNorm eval of a device tensor with running statistics on the device, without waiting.
pub(crate) async fn eval_running(
    ctx: &GpuContext,
    (x, mut y): (Input<'_>, Output<'_>),
    shape: &Shape,
    opts: &BatchNorm<'_>,
    running: &wgpu::Buffer,
) -> Result<(), NormError> {
    let plan = Plan::new(ctx, shape, &x, opts, (0, true))?;
    let op = "batch_norm_eval_gpu_running";
    let mut run = Run::new(ctx, &plan, (&x, opts), Lifetime::Detached, op).await?;
    run.load_running_device(running).await?;
    run.apply(&x, &mut y).await
}

/// Runs BatchNorm eval with the running statistics. On device buffers it returns without
/// waiting for the GPU.
pub(crate) async fn eval(
    ctx: &GpuContext,
    x: Input<'_>,
    mut y: Output<'_>,
    shape: &Shape,
    opts: &BatchNorm<'_>,
    stats: &RunningStats,
) -> Result<Timing, NormError> {
    let plan = Plan::new(ctx, shape, &x, opts, (0, true))?;
    let lifetime = Lifetime::waited(matches!(y, Output::Host(_)));
    let mut run = Run::new(ctx, &plan, (&x, opts), lifetime, "batch_norm_eval").await?;
    run.load_running(stats).await?;
    run.apply(&x, &mut y).await?;
    Ok(run.timing())
}

/// Runs BatchNorm training's backward pass: dx into `dx` (0 on masked positions), and
/// (dgamma, dbeta). Three streams over the chunks of host tensors (device ones are one chunk):
/// the forward's statistics, the sums of dy and dy · xhat, and dx, all on the general kernels
/// (`Plan` without the vec4 column kernels). Columns whose statistics leave f32's range send
/// the call to the CPU fallback's f64 path, as the forward redoes them on the host: rare.
pub(crate) async fn backward(
    ctx: &GpuContext,
    (x, dy): (Input<'_>, Input<'_>),
    mut dx: Output<'_>,
    shape: &Shape,
    opts: &BatchNorm<'_>,
    counted: Counted,
) -> Result<(Vec<f32>, Vec<f32>, Timing), NormError> {
    let op = "batch_norm_backward";
    ctx.check_storage_buffers(Slot::storage_count(BACKWARD_APPLY.slots), op)?;
    let plan = Plan::new(ctx, shape, &x, opts, (counted.first, false))?;
    let mut run = Run::new(ctx, &plan, (&x, opts), Lifetime::Call, op).await?;
    run.statistics(&x).await?;
    let (mean, var) = run.stats_readback().await?.read(ctx).await?;
    if (0..shape.channels).any(|c| stats_out_of_range(mean[c] as f64, var[c] as f64, opts.eps)) {
        let (dgamma, dbeta) = backward_in_f64(ctx, (&x, &dy), &mut dx, shape, opts).await?;
        return Ok((dgamma, dbeta, run.timing()));
    }
    run.set_dy(dy, opts).await?;
    run.backward_sums(&x).await?;
    run.apply(&x, &mut dx).await?;
    let (dgamma, dbeta) = run.read_gradients().await?;
    Ok((dgamma, dbeta, run.timing()))
}

/// The backward pass on the CPU fallback's f64 path, for statistics out of f32's range: on the
/// host slices, or on copies of device tensors with dx written back.
async fn backward_in_f64(
    ctx: &GpuContext,
    (x, dy): (&Input<'_>, &Input<'_>),
    dx: &mut Output<'_>,
    shape: &Shape,
    opts: &BatchNorm<'_>,
) -> Result<(Vec<f32>, Vec<f32>), NormError> {
    match (x, dy, dx) {
        (Input::Host(x), Input::Host(dy), Output::Host(dx)) => {
            Ok(batch_norm_backward((x, dy), dx, shape, opts))
        }
        (Input::Device(xb, len), Input::Device(dyb, _), Output::Device(dxb)) => {
            let (mut xh, mut dyh, mut dxh) = (vec![0f32; *len], vec![0f32; *len], vec![0f32; *len]);
            transfer::download(ctx, xb, &mut xh).await?;
            transfer::download(ctx, dyb, &mut dyh).await?;
            let grads = batch_norm_backward((&xh, &dyh), &mut dxh, shape, opts);
            ctx.scoped("batch_norm_backward", || {
                ctx.queue().write_buffer(dxb, 0, bytemuck::cast_slice(&dxh))
            })
            .await?;
            Ok(grads)
        }
        _ => unreachable!("host inputs go with host outputs, device ones with device ones"),
    }
}

/// A BatchNorm op to record into a caller's encoder, on spans of the caller's buffers that
/// `gpu::encode` has checked: the tensor fits one chunk, and nothing waits or reads back.
pub(crate) struct Recorded<'a> {
    /// The op its GPU errors are reported under.
    pub name: &'static str,
    pub shape: Shape,
    pub eps: f32,
    pub x: BufferSlice<'a>,
    /// y, or dx for the backward pass.
    pub out: BufferSlice<'a>,
    /// One u32 per position, 0 for padding.
    pub mask: Option<BufferSlice<'a>>,
    pub gamma: Option<BufferSlice<'a>>,
    pub beta: Option<BufferSlice<'a>>,
    pub mode: Mode<'a>,
}

/// What a recorded BatchNorm computes, with the spans of that mode alone.
#[derive(Clone, Copy)]
pub(crate) enum Mode<'a> {
    /// Batch statistics, with running (mean, var) updated in place with weight `momentum`.
    Train {
        running: Option<(BufferSlice<'a>, BufferSlice<'a>, f32)>,
    },
    /// Given running (mean, var).
    Eval {
        mean: BufferSlice<'a>,
        var: BufferSlice<'a>,
    },
    /// Training's gradients, dgamma and dbeta copied into their spans.
    Backward {
        dy: BufferSlice<'a>,
        dgamma: BufferSlice<'a>,
        dbeta: BufferSlice<'a>,
    },
}

/// Records `op` into `encoder`: the per-feature spans copied side by side into pairs buffers,
/// one compute pass (the statistics as [`Run::statistics`] records them, with the seed found on
/// the device where the mask lives there; the backward sums; the elementwise pass; the running
/// statistics folded in or the gradients unpacked), and the copies out. Columns whose
/// statistics leave f32's range are not redone in f64, as in [`train_running`].
pub(crate) async fn record(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    op: &Recorded<'_>,
) -> Result<(), NormError> {
    use wgpu::BufferUsages as U;
    let backward = matches!(op.mode, Mode::Backward { .. });
    let apply_def = if backward { &BACKWARD_APPLY } else { &APPLY };
    ctx.check_storage_buffers(Slot::storage_count(apply_def.slots), op.name)?;
    let c = op.shape.channels;
    let len = op.shape.positions * c * op.shape.spatial;
    // The plan of a device tensor without a host mask: one chunk, seeds 0, 1, 2 (replaced by the
    // scan where the mask is on the device), flags set below.
    let plain = BatchNorm {
        eps: op.eps,
        ..Default::default()
    };
    let x = Input::Device(op.x.buffer(), len);
    let plan = Plan::new(ctx, &op.shape, &x, &plain, (0, !backward))?;
    if plan.blocks.len() > 1 {
        return Err(NormError::TooLarge {
            what: "the per-column statistics of a BatchNorm recorded into a caller's encoder \
                   (32 bytes per column, one binding)",
            needed: c as u64 * 2 * COLUMN_BYTES,
            limit: ctx.max_binding_bytes(),
        });
    }
    let mut p = plan.params[0][0];
    p.flags = flags::of(op.gamma.is_some(), op.beta.is_some(), op.mask.is_some());
    if let Mode::Train {
        running: Some((_, _, momentum)),
    } = op.mode
    {
        p.momentum = momentum;
    }
    let kernel = |k| pipeline(ctx, &plan, k);
    let (pack, apply) = (
        kernel(&PACK_AFFINE).await?,
        kernel(plan.apply_kernel(backward)).await?,
    );
    // What each mode runs besides: eval's statistics come from the running ones; training's
    // and the backward pass's from the seed, tiles and merge, which the backward follows with
    // its sums; and last the fold into running statistics, or the gradients unpacked.
    let eval = matches!(op.mode, Mode::Eval { .. });
    let stats = if eval {
        None
    } else {
        let seed = kernel(if op.mask.is_some() { &SEED_SCAN } else { &SEED }).await?;
        let partial = kernel(plan.partial_kernel()).await?;
        Some((seed, partial, kernel(&MERGE).await?))
    };
    let pack_running = if eval {
        Some(kernel(&PACK_RUNNING).await?)
    } else {
        None
    };
    let sums = if backward {
        let partial = kernel(&BACKWARD_PARTIAL).await?;
        Some((partial, kernel(&BACKWARD_MERGE).await?))
    } else {
        None
    };
    let last = match op.mode {
        Mode::Train { running: Some(_) } => Some(kernel(&FOLD_RUNNING).await?),
        Mode::Backward { .. } => Some(kernel(&UNPACK_GRADS).await?),
        _ => None,
    };
    ctx.scoped(op.name, || {
        let pairs_bytes = 2 * c as u64 * 4;
        let scratch = |label, bytes, usage| ctx.buffer(label, bytes, usage, Lifetime::Detached);
        let params = ctx.buffer_with("batch_norm params", bytemuck::bytes_of(&p), U::UNIFORM);
        let columns = scratch(
            "batch_norm columns",
            2 * c as u64 * COLUMN_BYTES,
            U::STORAGE,
        );
        // The tiles' partials where statistics are taken (not in eval).
        let partials = stats.is_some().then(|| {
            scratch(
                "batch_norm partials",
                plan.max_row_tiles() as u64 * c as u64 * COLUMN_BYTES,
                U::STORAGE,
            )
        });
        let pairs = U::STORAGE | U::COPY_SRC | U::COPY_DST;
        // gamma and beta in, the gradients out; the running statistics in (and out), where the
        // mode reads them.
        let affine = scratch("batch_norm affine", pairs_bytes, pairs);
        let running_spans = match op.mode {
            Mode::Eval { mean, var }
            | Mode::Train {
                running: Some((mean, var, _)),
            } => Some([mean, var]),
            _ => None,
        };
        let running =
            running_spans.map(|spans| (scratch("batch_norm running", pairs_bytes, pairs), spans));
        let mask = op.mask.unwrap_or(ctx.placeholder().slice(..));
        // (a, b) spans into a pairs buffer, and back.
        let half = pairs_bytes / 2;
        let copy_in = |encoder: &mut wgpu::CommandEncoder, spans: [Option<BufferSlice>; 2], to| {
            for (k, span) in spans.into_iter().enumerate() {
                if let Some(s) = span {
                    encoder.copy_buffer_to_buffer(
                        s.buffer(),
                        s.offset(),
                        to,
                        k as u64 * half,
                        half,
                    );
                }
            }
        };
        let copy_out = |encoder: &mut wgpu::CommandEncoder, from, spans: [BufferSlice; 2]| {
            for (k, s) in spans.into_iter().enumerate() {
                encoder.copy_buffer_to_buffer(from, k as u64 * half, s.buffer(), s.offset(), half);
            }
        };
        copy_in(encoder, [op.gamma, op.beta], &affine);
        if let Some((buffer, [mean, var])) = &running {
            copy_in(encoder, [Some(*mean), Some(*var)], buffer);
        }
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(op.name),
                timestamp_writes: None,
            });
            let mut dispatch = |kernel: &Pipeline, spans: &[BufferSlice], groups| {
                pass.set_pipeline(&kernel.pipeline);
                pass.set_bind_group(0, &kernel.bind_slices(ctx.device(), spans), &[]);
                let (gx, gy) = grid(groups, ctx.max_groups());
                pass.dispatch_workgroups(gx, gy, 1);
            };
            let (params, columns) = (params.slice(..), columns.slice(..));
            let per_column = c.div_ceil(WG as usize);
            let running_pairs = running.as_ref().map(|(buffer, _)| buffer.slice(..));
            dispatch(&pack, &[params, columns, affine.slice(..)], per_column);
            if let (Some(pack_running), Some(pairs)) = (&pack_running, running_pairs) {
                dispatch(pack_running, &[params, columns, pairs], per_column);
            }
            if let (Some((seed, partial, merge)), Some(partials)) = (&stats, &partials) {
                let partials = partials.slice(..);
                let seed_spans = if op.mask.is_some() {
                    vec![params, op.x, mask, columns]
                } else {
                    vec![params, op.x, columns]
                };
                dispatch(seed, &seed_spans, per_column);
                let tiles = [params, op.x, mask, partials, columns];
                dispatch(partial, &tiles, p.tiles());
                dispatch(merge, &[params, partials, columns], merge_groups(c));
            }
            let mut apply_spans = vec![params, op.x, mask, columns, op.out];
            if let (Some((partial, merge)), Some(partials), Mode::Backward { dy, .. }) =
                (&sums, &partials, op.mode)
            {
                let partials = partials.slice(..);
                let tiles = [params, op.x, mask, partials, columns, dy];
                dispatch(partial, &tiles, p.tiles());
                dispatch(merge, &[params, partials, columns], per_column);
                apply_spans.push(dy);
            }
            dispatch(&apply, &apply_spans, plan.apply_groups(&p, backward));
            if let Some(last) = &last {
                // fold_running on the running statistics, or unpack_grads into the affine pairs.
                let pairs = running_pairs.unwrap_or(affine.slice(..));
                dispatch(last, &[params, columns, pairs], per_column);
            }
        }
        match (op.mode, &running) {
            (Mode::Train { .. }, Some((buffer, spans))) => copy_out(encoder, buffer, *spans),
            (Mode::Backward { dgamma, dbeta, .. }, _) => {
                copy_out(encoder, &affine, [dgamma, dbeta])
            }
            _ => {}
        }
    })
    .await
}

/// How a tensor is cut into chunks and tiled.
struct Plan {
    shape: Shape,
    /// Values of each chunk: whole batch items (one item = channels × spatial values).
    chunks: Vec<Range<usize>>,
    /// Columns of each block: a tensor whose per-column statistics (32 bytes a column) exceed
    /// one binding runs in blocks of columns, each with statistics buffers of its own.
    blocks: Vec<Range<usize>>,
    /// The kernel parameters of each chunk (outer) and block (inner).
    params: Vec<Vec<BatchNormParams>>,
    /// The chunk holding the first counted position (its statistics pass goes first).
    seed_chunk: usize,
    /// The kernels of `batch_norm_rows.wgsl`: features-last, four columns per thread.
    rows: bool,
    /// Rows each thread of `stats_partial_held` keeps in registers, or 0 for the statistics
    /// kernels that read a tile twice.
    hold: usize,
    /// Otherwise, four values at a time (`apply4`): four neighbours share a position or a
    /// channel.
    by4: bool,
}

impl Plan {
    fn new(
        ctx: &GpuContext,
        shape: &Shape,
        x: &Input<'_>,
        opts: &BatchNorm<'_>,
        (first, vec4_rows): (usize, bool),
    ) -> Result<Plan, NormError> {
        let (c, s) = (shape.channels, shape.spatial);
        let limit = ctx.max_binding_bytes();
        let width = block_columns(c, limit)?;
        let blocks: Vec<Range<usize>> = (0..c)
            .step_by(width)
            .map(|b| b..(b + width).min(c))
            .collect();
        let rows = vec4_rows && ctx.tuning.bn_rows && s == 1 && c.is_multiple_of(4);
        let item = c * s;
        let items = chunk_items(ctx, item)?;
        let len = x.len();
        if matches!(x, Input::Device(..)) && len > items * item {
            return Err(NormError::TooLarge {
                what: "a GPU-resident BatchNorm tensor (one binding and one dispatch)",
                needed: (len * 4) as u64,
                limit: (items * item * 4) as u64,
            });
        }
        let chunks: Vec<Range<usize>> = (0..len)
            .step_by(items * item)
            .map(|start| start..(start + items * item).min(len))
            .collect();
        // The first three counted positions: each column's shift is the median of its values
        // there (see `stats_seed`).
        let seeds: Vec<usize> = (first..shape.positions)
            .filter(|&p| opts.mask.is_none_or(|m| m[p]))
            .take(3)
            .collect();
        // Tiles of one chunk and block share one partials buffer, which must fit one binding.
        let max_row_tiles =
            usize::try_from(limit / (width as u64 * COLUMN_BYTES)).unwrap_or(usize::MAX);
        let one = |chunk: &Range<usize>, block: &Range<usize>, hold| {
            let positions = chunk.len() / c;
            let p0 = chunk.start / c;
            let block_shape = Shape {
                channels: block.len(),
                ..*shape
            };
            let mut p = BatchNormParams::new(
                ctx,
                &block_shape,
                positions,
                opts,
                max_row_tiles,
                (rows, hold),
            )?;
            // Seeds local to the chunk; those outside it (in another chunk) repeat the first.
            let local = |p: usize| p.checked_sub(p0).filter(|&f| f < positions);
            p.first = local(first).unwrap_or(0) as u32;
            let seed = |k: usize| {
                seeds
                    .get(k)
                    .and_then(|&p| local(p))
                    .map_or(p.first, |f| f as u32)
            };
            (p.seed_b, p.seed_c) = (seed(1), seed(2));
            p.stride = c as u32;
            p.col_base = block.start as u32;
            Ok(p)
        };
        let tiled = |hold: usize| -> Result<Vec<Vec<BatchNormParams>>, NormError> {
            chunks
                .iter()
                .map(|chunk| blocks.iter().map(|block| one(chunk, block, hold)).collect())
                .collect()
        };
        // Held statistics need tiles of at most `hold` rows per thread; where the limits on
        // tiles force longer ones, the tiles are read twice instead.
        let mut hold = if rows { ctx.tuning.bn_hold as usize } else { 0 };
        let mut params = tiled(hold)?;
        if hold > 0
            && params
                .iter()
                .flatten()
                .any(|p| p.rows_per_tile as usize > p.tile_rows as usize * hold)
        {
            hold = 0;
            params = tiled(0)?;
        }
        let seed_chunk = chunks
            .iter()
            .position(|ch| (ch.start / c..ch.end / c).contains(&first))
            .unwrap_or(0);
        Ok(Plan {
            shape: *shape,
            chunks,
            blocks,
            params,
            seed_chunk,
            rows,
            hold,
            by4: !rows && ctx.tuning.bn_apply4 && if s == 1 { c } else { s }.is_multiple_of(4),
        })
    }

    /// The largest number of row tiles of any chunk and block.
    fn max_row_tiles(&self) -> usize {
        self.params
            .iter()
            .flatten()
            .map(|p| p.row_tiles as usize)
            .max()
            .unwrap_or(1)
    }

    /// The widest block, in columns.
    fn block_width(&self) -> usize {
        self.blocks.iter().map(|b| b.len()).max().unwrap_or(0)
    }

    /// The statistics kernel of the tiles.
    fn partial_kernel(&self) -> &'static KernelDef {
        match (self.rows, self.hold) {
            (false, _) => &PARTIAL,
            (true, 0) => &PARTIAL_ROWS,
            (true, _) => &PARTIAL_HELD,
        }
    }

    /// The elementwise kernel: y, or dx where `backward` (general kernels only: see
    /// [`backward`]).
    fn apply_kernel(&self, backward: bool) -> &'static KernelDef {
        match (backward, self.rows, self.by4) {
            (true, _, _) => &BACKWARD_APPLY,
            (false, true, _) => &APPLY_ROWS,
            (false, false, true) => &APPLY4,
            (false, false, false) => &APPLY,
        }
    }

    /// Workgroups of the elementwise kernel on the chunk and block `p` describes.
    fn apply_groups(&self, p: &BatchNormParams, backward: bool) -> usize {
        if self.rows && !backward {
            return p.tiles();
        }
        let per_thread = if self.by4 && !backward { 4 } else { 1 };
        (p.positions as usize * p.channels as usize).div_ceil(WG as usize * per_thread)
    }

    /// Chunk indices with the seed chunk first, then the rest in order.
    fn statistics_order(&self) -> impl Iterator<Item = usize> + '_ {
        std::iter::once(self.seed_chunk)
            .chain((0..self.chunks.len()).filter(|&i| i != self.seed_chunk))
    }
}

/// Columns per block for a tensor of `channels` columns: all of them where their statistics
/// (`2 * COLUMN_BYTES` a column) fit one binding of `limit` bytes; otherwise as many as fit, a
/// multiple of 8 so that every block starts on a 4-column (vec4) boundary.
fn block_columns(channels: usize, limit: u64) -> Result<usize, NormError> {
    let fit = usize::try_from(limit / (2 * COLUMN_BYTES)).unwrap_or(usize::MAX);
    if channels <= fit {
        return Ok(channels.max(1));
    }
    if fit < 8 {
        return Err(NormError::TooLarge {
            what: "the statistics of 8 BatchNorm columns (32 bytes per column)",
            needed: 16 * COLUMN_BYTES,
            limit,
        });
    }
    Ok(fit / 8 * 8)
}

/// Batch items per chunk: as many as one binding, one dispatch of the elementwise pass and u32
/// indexing allow. Errors when not even one item fits.
fn chunk_items(ctx: &GpuContext, item: usize) -> Result<usize, NormError> {
    let limit = ctx.max_binding_bytes();
    let item_bytes = (item * 4) as u64;
    if item_bytes > limit || item > u32::MAX as usize {
        return Err(NormError::TooLarge {
            what: "one row (or batch item) of a BatchNorm tensor",
            needed: item_bytes,
            limit,
        });
    }
    // Saturating: on 32-bit targets (wasm) a 65535² grid of 256 threads overflows usize.
    let grid_values = ctx
        .max_groups()
        .saturating_pow(2)
        .saturating_mul(WG as usize);
    if item > grid_values {
        return Err(NormError::DeviceLimit {
            op: "batch_norm",
            limit: "max_compute_workgroups_per_dimension",
            needed: item.div_ceil(WG as usize).isqrt() as u64 + 1,
            has: ctx.max_groups() as u64,
        });
    }
    Ok(usize::try_from(limit / item_bytes)
        .unwrap_or(usize::MAX)
        .min(u32::MAX as usize / item)
        .min(grid_values / item))
}

impl BatchNormParams {
    /// Workgroups of the tiled kernels: one per (column tile, row tile).
    fn tiles(&self) -> usize {
        (self.col_tiles * self.row_tiles) as usize
    }

    /// Parameters for one chunk of `positions` positions of a tensor shaped like `shape`, with
    /// at most `max_row_tiles` row tiles; for the kernels of `batch_norm_rows.wgsl` where
    /// `rows`, whose tile columns are vec4 columns; with tiles of `hold` rows per thread where
    /// `hold` is not 0 (`stats_partial_held`), as far as the limits on tiles allow.
    fn new(
        ctx: &GpuContext,
        shape: &Shape,
        positions: usize,
        opts: &BatchNorm<'_>,
        max_row_tiles: usize,
        (rows, hold): (bool, usize),
    ) -> Result<Self, NormError> {
        // Features-last: adjacent threads read adjacent columns. Channels-first: every thread of
        // a workgroup works on one channel, reading contiguous spatial runs.
        let width = if rows {
            shape.channels / 4
        } else {
            shape.channels
        };
        let tile_cols = if shape.spatial == 1 {
            width.next_power_of_two().min(64)
        } else {
            1
        };
        let tile_rows = WG as usize / tile_cols;
        let col_tiles = width.div_ceil(tile_cols);
        let max_tiles = ctx.max_groups().saturating_pow(2);
        if col_tiles > max_tiles {
            return Err(NormError::DeviceLimit {
                op: "batch_norm statistics",
                limit: "max_compute_workgroups_per_dimension",
                needed: col_tiles.isqrt() as u64 + 1,
                has: ctx.max_groups() as u64,
            });
        }
        let wanted = if hold > 0 {
            positions.div_ceil(tile_rows * hold)
        } else {
            (ctx.tuning.bn_tiles as usize)
                .div_ceil(col_tiles)
                .min(positions.div_ceil(tile_rows * 4))
        };
        let row_tiles = wanted.min(max_row_tiles).min(max_tiles / col_tiles).max(1);
        let rows_per_tile = positions.div_ceil(row_tiles).max(1);
        let row_tiles = positions.div_ceil(rows_per_tile).max(1);
        Ok(BatchNormParams {
            positions: positions as u32,
            channels: shape.channels as u32,
            spatial: shape.spatial as u32,
            tile_cols: tile_cols as u32,
            tile_rows: tile_rows as u32,
            rows_per_tile: rows_per_tile as u32,
            row_tiles: row_tiles as u32,
            col_tiles: col_tiles as u32,
            eps: opts.eps,
            flags: flags::of(
                opts.gamma.is_some(),
                opts.beta.is_some(),
                opts.mask.is_some(),
            ),
            first: 0,
            stride: 0,
            col_base: 0,
            momentum: 0.0,
            seed_b: 0,
            seed_c: 0,
        })
    }
}

/// The pipeline of `kernel` for a plan.
async fn pipeline(
    ctx: &GpuContext,
    plan: &Plan,
    kernel: &KernelDef,
) -> Result<std::sync::Arc<Pipeline>, NormError> {
    // K matters to stats_partial_held alone; the other kernels of its file take 1.
    let k = if kernel.entry == PARTIAL_HELD.entry {
        plan.hold
    } else {
        1
    };
    let label = format!("batch_norm {} k{k}", kernel.entry);
    ctx.pipeline(&label, kernel, &[("K", Def::U32(k as u32))])
        .await
}

/// Workgroups of `stats_merge` for `channels` columns: its `merge_columns()` columns each.
fn merge_groups(channels: usize) -> usize {
    channels.div_ceil(channels.next_power_of_two().min(32))
}

/// The per-column statistics, (shift, mean_d, M2, count), on their way to the host.
struct StatsReadback<'a> {
    staging: Pooled<'a>,
    channels: usize,
}

impl StatsReadback<'_> {
    /// Waits for the statistics and returns each column's (shift, mean_d, M2, count).
    async fn read_columns(self, ctx: &GpuContext) -> Result<Vec<[f32; 4]>, NormError> {
        let mut cols = vec![[0f32; 4]; self.channels];
        transfer::read_into(ctx, &self.staging, &mut cols).await?;
        Ok(cols)
    }

    /// Waits for the statistics and returns (mean, biased var) per column.
    async fn read(self, ctx: &GpuContext) -> Result<(Vec<f32>, Vec<f32>), NormError> {
        let mut cols = vec![[0f32; 4]; self.channels];
        transfer::read_into(ctx, &self.staging, &mut cols).await?;
        // mean = shift + mean_d, added in f64 so the sum is rounded once; var = M2 / count as
        // the kernels compute it.
        let mean = cols
            .iter()
            .map(|q| (q[0] as f64 + q[1] as f64) as f32)
            .collect();
        let var = cols.iter().map(|q| q[2] / q[3]).collect();
        Ok((mean, var))
    }
}

/// One BatchNorm call in flight: its plan, pipelines and the buffers every chunk shares.
struct Run<'a> {
    ctx: &'a GpuContext,
    plan: &'a Plan,
    /// The op its GPU errors are reported under.
    op: &'static str,
    /// Per chunk, per block.
    params: Vec<Vec<wgpu::Buffer>>,
    mask: Option<&'a [bool]>,
    /// Per block: its columns' statistics, then their (gamma, beta, 0, 0).
    columns: Vec<Pooled<'a>>,
    /// The input buffer of host tensors, and which chunk it holds.
    input: Option<Pooled<'a>>,
    resident: Option<usize>,
    /// The chunk's mask as u32 words (a 16-byte placeholder without a mask).
    mask_buffer: Pooled<'a>,
    timer: Option<PassTimer<'a>>,
    /// How long its buffers live: `Detached` where nobody waits for the work.
    lifetime: Lifetime,
    /// The backward pass's upstream gradient, its buffer where it comes from the host, and which
    /// chunk that holds.
    dy: Option<(Input<'a>, Option<Pooled<'a>>)>,
    dy_resident: Option<usize>,
}

/// Writes (gamma, beta, 0, 0) per column into the second half of each block's columns buffer.
fn write_affine(ctx: &GpuContext, plan: &Plan, columns: &[Pooled<'_>], opts: &BatchNorm<'_>) {
    write_affine_sums(ctx, plan, columns, opts, &[]);
}

/// Writes (gamma, beta, Σ dy, Σ dy · xhat) per column into the second half of each block's
/// columns buffer, with the sums given (zero where `sums` is empty).
fn write_affine_sums(
    ctx: &GpuContext,
    plan: &Plan,
    columns: &[Pooled<'_>],
    opts: &BatchNorm<'_>,
    sums: &[[f32; 2]],
) {
    for (block, buffer) in plan.blocks.iter().zip(columns) {
        let affine: Vec<[f32; 4]> = block
            .clone()
            .map(|i| {
                let g = opts.gamma.map_or(1.0, |g| g[i]);
                let [s1, s2] = sums.get(i).copied().unwrap_or_default();
                [g, opts.beta.map_or(0.0, |b| b[i]), s1, s2]
            })
            .collect();
        let half = block.len() as u64 * COLUMN_BYTES;
        ctx.queue()
            .write_buffer(buffer, half, bytemuck::cast_slice(&affine));
    }
}

/// A chunk's input and mask in staging buffers ([`Run::stage`]), to copy in before its kernels.
#[derive(Default)]
struct Staged<'a> {
    x: Option<transfer::Staged<'a>>,
    mask: Option<transfer::Staged<'a>>,
    dy: Option<transfer::Staged<'a>>,
}

impl<'a> Run<'a> {
    async fn new(
        ctx: &'a GpuContext,
        plan: &'a Plan,
        (x, opts): (&Input<'_>, &BatchNorm<'a>),
        lifetime: Lifetime,
        op: &'static str,
    ) -> Result<Run<'a>, NormError> {
        use wgpu::BufferUsages as U;
        ctx.check_storage_buffers(Slot::storage_count(APPLY.slots), "batch_norm")?;
        let largest = plan.chunks.iter().map(|c| c.len()).max().unwrap_or(0);
        let c = plan.shape.channels;
        let mask_bytes = if opts.mask.is_some() {
            (largest / c * 4) as u64
        } else {
            16
        };
        ctx.scoped(op, || {
            let uniform =
                |p| ctx.buffer_with("batch_norm params", bytemuck::bytes_of(p), U::UNIFORM);
            let params = plan
                .params
                .iter()
                .map(|blocks| blocks.iter().map(uniform).collect())
                .collect();
            let columns: Vec<Pooled<'a>> = plan
                .blocks
                .iter()
                .map(|block| {
                    ctx.buffer(
                        "batch_norm columns",
                        block.len() as u64 * 2 * COLUMN_BYTES,
                        U::STORAGE | U::COPY_SRC | U::COPY_DST,
                        lifetime,
                    )
                })
                .collect();
            // Each block's second half: (gamma, beta, 0, 0) per column, read only where either
            // is given.
            if opts.gamma.is_some() || opts.beta.is_some() {
                write_affine(ctx, plan, &columns, opts);
            }
            let input = matches!(x, Input::Host(_)).then(|| {
                ctx.buffer(
                    "batch_norm x",
                    (plan.chunks[0].len() * 4) as u64,
                    U::STORAGE | U::COPY_DST,
                    Lifetime::Call,
                )
            });
            Run {
                ctx,
                plan,
                op,
                params,
                mask: opts.mask,
                columns,
                input,
                resident: None,
                mask_buffer: ctx.buffer(
                    "batch_norm mask",
                    mask_bytes,
                    U::STORAGE | U::COPY_DST,
                    lifetime,
                ),
                timer: if lifetime == Lifetime::Call {
                    PassTimer::new(ctx)
                } else {
                    None
                },
                lifetime,
                dy: None,
                dy_resident: None,
            }
        })
        .await
    }

    fn timing(&self) -> Timing {
        Timing {
            kernel: timer::total(&self.timer),
        }
    }

    /// Eval: the running statistics as (0, mean, var, 1) per column.
    async fn load_running(&mut self, stats: &RunningStats) -> Result<(), NormError> {
        let cols: Vec<[f32; 4]> = stats
            .mean
            .iter()
            .zip(&stats.var)
            .map(|(&m, &v)| [0.0, m, v, 1.0])
            .collect();
        self.load_columns(&cols).await
    }

    /// Given statistics, (shift, mean_d, M2, count) per column of the whole tensor, into each
    /// block's columns.
    async fn load_columns(&mut self, cols: &[[f32; 4]]) -> Result<(), NormError> {
        self.ctx
            .scoped(self.op, || {
                for (block, buffer) in self.plan.blocks.iter().zip(&self.columns) {
                    let part = bytemuck::cast_slice(&cols[block.clone()]);
                    self.ctx.queue().write_buffer(buffer, 0, part);
                }
            })
            .await
    }

    /// Eval from running statistics on the device: each block's columns copied from
    /// `running` ((0, mean, var, 1) per column, the layout eval reads).
    async fn load_running_device(&mut self, running: &wgpu::Buffer) -> Result<(), NormError> {
        let ctx = self.ctx;
        ctx.scoped(self.op, || {
            let mut encoder = ctx.encoder("batch_norm running statistics");
            for (block, columns) in self.plan.blocks.iter().zip(&self.columns) {
                let (at, len) = (block.start as u64, block.len() as u64);
                encoder.copy_buffer_to_buffer(
                    running,
                    at * COLUMN_BYTES,
                    columns,
                    0,
                    len * COLUMN_BYTES,
                );
            }
            ctx.queue().submit([encoder.finish()]);
        })
        .await
    }

    /// Folds the batch statistics (after [`Run::statistics`]) into `running` on the device,
    /// with the batch weighted by `momentum`.
    async fn update_running(&self, running: &wgpu::Buffer, momentum: f32) -> Result<(), NormError> {
        use wgpu::BufferUsages as U;
        let ctx = self.ctx;
        let update = self.pipeline(&RUNNING_UPDATE).await?;
        ctx.scoped(self.op, || {
            let mut encoder = ctx.encoder("batch_norm running update");
            {
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("batch_norm running update"),
                    timestamp_writes: None,
                });
                pass.set_pipeline(&update.pipeline);
                for (b, (block, columns)) in self.plan.blocks.iter().zip(&self.columns).enumerate()
                {
                    let p = BatchNormParams {
                        momentum,
                        ..self.plan.params[0][b]
                    };
                    let p =
                        ctx.buffer_with("batch_norm params", bytemuck::bytes_of(&p), U::UNIFORM);
                    pass.set_bind_group(
                        0,
                        &update.bind(ctx.device(), &[&p, columns, running]),
                        &[],
                    );
                    let (gx, gy) = grid(block.len().div_ceil(WG as usize), ctx.max_groups());
                    pass.dispatch_workgroups(gx, gy, 1);
                }
            }
            ctx.queue().submit([encoder.finish()]);
        })
        .await
    }

    /// Makes chunk `i` of `x` (and its mask) the one the kernels read: stages its upload where
    /// it is not on the device yet, for [`Run::record_staged`] to copy in.
    async fn stage(&mut self, x: &Input<'a>, i: usize) -> Result<Staged<'a>, NormError> {
        let mut staged = Staged::default();
        let chunk = self.plan.chunks[i].clone();
        let dy = match &self.dy {
            Some((Input::Host(dy), _)) => Some(*dy),
            _ => None,
        };
        if let Some(dy) = dy.filter(|_| self.dy_resident != Some(i)) {
            staged.dy = Some(transfer::stage(self.ctx, &dy[chunk.clone()]).await?);
            self.dy_resident = Some(i);
        }
        if self.resident == Some(i) {
            return Ok(staged);
        }
        let c = self.plan.shape.channels;
        if let Input::Host(x) = x {
            staged.x = Some(transfer::stage(self.ctx, &x[chunk.clone()]).await?);
        }
        if let Some(mask) = self.mask {
            let words: Vec<u32> = mask[chunk.start / c..chunk.end / c]
                .iter()
                .map(|&k| k as u32)
                .collect();
            staged.mask = Some(transfer::stage(self.ctx, &words).await?);
        }
        self.resident = Some(i);
        Ok(staged)
    }

    /// Records the copies of a staged chunk into `encoder`; the staging buffers must live until
    /// it is submitted.
    fn record_staged(&self, encoder: &mut wgpu::CommandEncoder, staged: &Staged<'_>) {
        if let (Some(data), Some(input)) = (&staged.x, &self.input) {
            data.record(encoder, input);
        }
        if let Some(words) = &staged.mask {
            words.record(encoder, &self.mask_buffer);
        }
        if let (Some(data), Some((_, Some(buffer)))) = (&staged.dy, &self.dy) {
            data.record(encoder, buffer);
        }
    }

    /// The buffer the backward kernels read dy from.
    fn dy_buffer(&self) -> Option<&wgpu::Buffer> {
        match self.dy.as_ref()? {
            (Input::Device(buffer, _), _) => Some(buffer),
            (Input::Host(_), buffer) => buffer.as_deref(),
        }
    }

    /// The buffer the kernels read x from.
    fn x_buffer<'b>(&'b self, x: &'b Input<'_>) -> &'b wgpu::Buffer {
        match x {
            Input::Host(_) => self.input.as_ref().expect("made for host inputs"),
            Input::Device(buffer, _) => buffer,
        }
    }

    /// Submits `encoder`, with the pass's timestamps where timed.
    fn submit(&self, mut encoder: wgpu::CommandEncoder) {
        if let Some(t) = &self.timer {
            t.resolve(&mut encoder);
        }
        self.ctx.queue().submit([encoder.finish()]);
    }

    /// Adds the kernel time of the pass submitted last, where timed.
    async fn collect_time(&mut self) -> Result<(), NormError> {
        match &mut self.timer {
            Some(t) => t.collect().await,
            None => Ok(()),
        }
    }

    async fn pipeline(&self, kernel: &KernelDef) -> Result<std::sync::Arc<Pipeline>, NormError> {
        pipeline(self.ctx, self.plan, kernel).await
    }

    /// The statistics pass, chunk by chunk: seed (first chunk only), partial tiles, merge.
    /// Returns the statistics, their copy to the host submitted.
    async fn statistics(&mut self, x: &Input<'a>) -> Result<(), NormError> {
        use wgpu::BufferUsages as U;
        let ctx = self.ctx;
        let (seed, partial, merge) = (
            self.pipeline(&SEED).await?,
            self.pipeline(self.plan.partial_kernel()).await?,
            self.pipeline(&MERGE).await?,
        );
        let partials = ctx
            .scoped(self.op, || {
                ctx.buffer(
                    "batch_norm partials",
                    (self.plan.max_row_tiles() * self.plan.block_width()) as u64 * COLUMN_BYTES,
                    U::STORAGE,
                    self.lifetime,
                )
            })
            .await?;
        let order: Vec<usize> = self.plan.statistics_order().collect();
        for (b, block) in self.plan.blocks.iter().enumerate() {
            for (k, &i) in order.iter().enumerate() {
                let staged = self.stage(x, i).await?;
                let run = &*self;
                ctx.scoped(self.op, || {
                    let mut encoder = ctx.encoder("batch_norm statistics");
                    run.record_staged(&mut encoder, &staged);
                    let xb = run.x_buffer(x);
                    let columns = &run.columns[b];
                    let p = &run.params[i][b];
                    let tiles = &run.plan.params[i][b];
                    {
                        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                            label: Some("batch_norm statistics"),
                            timestamp_writes: run.timer.as_ref().map(|t| t.writes()),
                        });
                        if k == 0 {
                            pass.set_pipeline(&seed.pipeline);
                            let group = seed.bind(ctx.device(), &[p, xb, columns]);
                            pass.set_bind_group(0, &group, &[]);
                            let groups = block.len().div_ceil(WG as usize);
                            let (gx, gy) = grid(groups, ctx.max_groups());
                            pass.dispatch_workgroups(gx, gy, 1);
                        }
                        pass.set_pipeline(&partial.pipeline);
                        let group = partial
                            .bind(ctx.device(), &[p, xb, &run.mask_buffer, &partials, columns]);
                        pass.set_bind_group(0, &group, &[]);
                        let (gx, gy) = grid(tiles.tiles(), ctx.max_groups());
                        pass.dispatch_workgroups(gx, gy, 1);
                        pass.set_pipeline(&merge.pipeline);
                        let group = merge.bind(ctx.device(), &[p, &partials, columns]);
                        pass.set_bind_group(0, &group, &[]);
                        let (gx, gy) = grid(merge_groups(block.len()), ctx.max_groups());
                        pass.dispatch_workgroups(gx, gy, 1);
                    }
                    run.submit(encoder);
                })
                .await?;
                self.collect_time().await?;
            }
        }
        Ok(())
    }

    /// Copies each block's statistics (the first half of its columns buffer) side by side into
    /// a staging buffer, to read once the GPU is done.
    async fn stats_readback(&self) -> Result<StatsReadback<'a>, NormError> {
        let (ctx, c) = (self.ctx, self.plan.shape.channels);
        let staging = ctx
            .scoped(self.op, || {
                let staging = transfer::readback_buffer(ctx, c as u64 * COLUMN_BYTES);
                let mut encoder = ctx.encoder("batch_norm statistics readback");
                for (block, columns) in self.plan.blocks.iter().zip(&self.columns) {
                    let (at, bytes) = (block.start as u64, block.len() as u64);
                    encoder.copy_buffer_to_buffer(
                        columns,
                        0,
                        &staging,
                        at * COLUMN_BYTES,
                        bytes * COLUMN_BYTES,
                    );
                }
                ctx.queue().submit([encoder.finish()]);
                staging
            })
            .await?;
        Ok(StatsReadback {
            staging,
            channels: c,
        })
    }

    /// Makes this run a backward pass with upstream gradient `dy`: its buffer, and the columns'
    /// (gamma, beta, 0, 0) written whatever the options, so the sums in `.zw` start at 0.
    async fn set_dy(&mut self, dy: Input<'a>, opts: &BatchNorm<'_>) -> Result<(), NormError> {
        use wgpu::BufferUsages as U;
        let ctx = self.ctx;
        let bytes = (self.plan.chunks[0].len() * 4) as u64;
        let host = matches!(dy, Input::Host(_));
        let buffer = ctx
            .scoped(self.op, || {
                write_affine(ctx, self.plan, &self.columns, opts);
                host.then(|| {
                    ctx.buffer(
                        "batch_norm_backward dy",
                        bytes,
                        U::STORAGE | U::COPY_DST,
                        Lifetime::Call,
                    )
                })
            })
            .await?;
        self.dy = Some((dy, buffer));
        Ok(())
    }

    /// The backward pass's sums, (dgamma, dbeta) per column: each block's `.w` and `.z`.
    async fn read_gradients(&self) -> Result<(Vec<f32>, Vec<f32>), NormError> {
        let ctx = self.ctx;
        let c = self.plan.shape.channels;
        let staging = ctx
            .scoped(self.op, || {
                let staging = transfer::readback_buffer(ctx, c as u64 * COLUMN_BYTES);
                let mut encoder = ctx.encoder("batch_norm_backward gradients");
                for (block, columns) in self.plan.blocks.iter().zip(&self.columns) {
                    let (at, len) = (block.start as u64, block.len() as u64);
                    let half = len * COLUMN_BYTES;
                    encoder.copy_buffer_to_buffer(columns, half, &staging, at * COLUMN_BYTES, half);
                }
                ctx.queue().submit([encoder.finish()]);
                staging
            })
            .await?;
        let mut cols = vec![[0f32; 4]; c];
        transfer::read_into(ctx, &staging, &mut cols).await?;
        Ok((
            cols.iter().map(|q| q[3]).collect(),
            cols.iter().map(|q| q[2]).collect(),
        ))
    }

    /// The backward pass's column sums, chunk by chunk from the one on the device: per chunk and
    /// block, (Σ dy, Σ dy · xhat) over row tiles, added in order onto the columns' `.zw`.
    async fn backward_sums(&mut self, x: &Input<'a>) -> Result<(), NormError> {
        use wgpu::BufferUsages as U;
        let ctx = self.ctx;
        let (partial, merge) = (
            self.pipeline(&BACKWARD_PARTIAL).await?,
            self.pipeline(&BACKWARD_MERGE).await?,
        );
        let partials = ctx
            .scoped(self.op, || {
                ctx.buffer(
                    "batch_norm_backward partials",
                    (self.plan.max_row_tiles() * self.plan.block_width()) as u64 * COLUMN_BYTES,
                    U::STORAGE,
                    Lifetime::Call,
                )
            })
            .await?;
        let first = self.resident.unwrap_or(0);
        let order: Vec<usize> = std::iter::once(first)
            .chain((0..self.plan.chunks.len()).filter(|&i| i != first))
            .collect();
        for i in order {
            let staged = self.stage(x, i).await?;
            let run = &*self;
            let dy = run.dy_buffer().expect("set by backward");
            ctx.scoped(self.op, || {
                let mut encoder = ctx.encoder("batch_norm_backward sums");
                run.record_staged(&mut encoder, &staged);
                {
                    let xb = run.x_buffer(x);
                    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                        label: Some("batch_norm_backward sums"),
                        timestamp_writes: run.timer.as_ref().map(|t| t.writes()),
                    });
                    for (b, (block, columns)) in
                        run.plan.blocks.iter().zip(&run.columns).enumerate()
                    {
                        let p = &run.params[i][b];
                        let tiles = &run.plan.params[i][b];
                        pass.set_pipeline(&partial.pipeline);
                        let buffers: [&wgpu::Buffer; 6] =
                            [p, xb, &run.mask_buffer, &partials, columns, dy];
                        pass.set_bind_group(0, &partial.bind(ctx.device(), &buffers), &[]);
                        let (gx, gy) = grid(tiles.tiles(), ctx.max_groups());
                        pass.dispatch_workgroups(gx, gy, 1);
                        pass.set_pipeline(&merge.pipeline);
                        let group = merge.bind(ctx.device(), &[p, &partials, columns]);
                        pass.set_bind_group(0, &group, &[]);
                        let (gx, gy) = grid(block.len().div_ceil(WG as usize), ctx.max_groups());
                        pass.dispatch_workgroups(gx, gy, 1);
                    }
                }
                run.submit(encoder);
            })
            .await?;
            self.collect_time().await?;
        }
        Ok(())
    }

    /// The elementwise pass, chunk by chunk, starting with the chunk already on the device.
    async fn apply(&mut self, x: &Input<'a>, y: &mut Output<'_>) -> Result<(), NormError> {
        use wgpu::BufferUsages as U;
        let ctx = self.ctx;
        // With dy set, the backward pass's dx (general kernels only: see `backward`).
        let backward = self.dy.is_some();
        let apply = self.pipeline(self.plan.apply_kernel(backward)).await?;
        let bytes = (self.plan.chunks[0].len() * 4) as u64;
        let (output, staging) = match y {
            Output::Host(_) => {
                ctx.scoped(self.op, || {
                    let output = ctx.buffer(
                        "batch_norm y",
                        bytes,
                        U::STORAGE | U::COPY_SRC | U::COPY_DST,
                        Lifetime::Call,
                    );
                    (Some(output), Some(transfer::readback_buffer(ctx, bytes)))
                })
                .await?
            }
            Output::Device(_) => (None, None),
        };
        let first = self.resident.unwrap_or(0);
        let order: Vec<usize> = std::iter::once(first)
            .chain((0..self.plan.chunks.len()).filter(|&i| i != first))
            .collect();
        for i in order {
            let chunk = self.plan.chunks[i].clone();
            let staged = self.stage(x, i).await?;
            let run = &*self;
            let yb: &wgpu::Buffer = match (&output, &*y) {
                (Some(out), _) => out,
                (None, Output::Device(b)) => b,
                (None, Output::Host(_)) => unreachable!("host outputs have a device buffer"),
            };
            ctx.scoped(self.op, || {
                let mut encoder = ctx.encoder("batch_norm apply");
                run.record_staged(&mut encoder, &staged);
                #[cfg(debug_assertions)]
                super::poison(ctx, yb, (chunk.len() * 4) as u64);
                {
                    let xb = run.x_buffer(x);
                    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                        label: Some("batch_norm apply"),
                        timestamp_writes: run.timer.as_ref().map(|t| t.writes()),
                    });
                    pass.set_pipeline(&apply.pipeline);
                    // Every block of the chunk, so that its whole output is there to read back.
                    for (b, columns) in run.columns.iter().enumerate() {
                        let mut buffers: Vec<&wgpu::Buffer> =
                            vec![&run.params[i][b], xb, &run.mask_buffer, columns, yb];
                        if let Some(dy) = run.dy_buffer() {
                            buffers.push(dy);
                        }
                        let group = apply.bind(ctx.device(), &buffers);
                        pass.set_bind_group(0, &group, &[]);
                        let groups = run.plan.apply_groups(&run.plan.params[i][b], backward);
                        let (gx, gy) = grid(groups, ctx.max_groups());
                        pass.dispatch_workgroups(gx, gy, 1);
                    }
                }
                if let Some(staging) = &staging {
                    encoder.copy_buffer_to_buffer(yb, 0, staging, 0, (chunk.len() * 4) as u64);
                }
                run.submit(encoder);
            })
            .await?;
            self.collect_time().await?;
            if let (Some(staging), Output::Host(y)) = (&staging, &mut *y) {
                transfer::read_into(ctx, staging, &mut y[chunk]).await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::shaders::{fields, shader_params};

    /// `BatchNormParams` and the shaders' `Params` have the same fields at the same offsets.
    #[test]
    fn params_match_the_shader() {
        let expected = fields!(BatchNormParams {
            positions,
            channels,
            spatial,
            tile_cols,
            tile_rows,
            rows_per_tile,
            row_tiles,
            col_tiles,
            eps,
            flags,
            first,
            stride,
            col_base,
            momentum,
            seed_b,
            seed_c
        });
        for source in [
            Source::BatchNorm,
            Source::BatchNormApply4,
            Source::BatchNormRows,
        ] {
            let (members, size) = shader_params(source, &[("K", Def::U32(1))]);
            assert_eq!(members, expected, "{source:?}");
            assert_eq!(size as usize, std::mem::size_of::<BatchNormParams>());
        }
    }
}
