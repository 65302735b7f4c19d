//! LayerNorm and RMSNorm on the GPU: the host side of `shaders/layer_norm.wgsl`.
//!
//! A host tensor goes plan → record → read back: [`run`] splits the rows into chunks that fit one
//! binding, and for each chunk uploads it, records the size-class kernel ([`record`]) and reads
//! the output back. GPU tensors and callers' encoders use [`record`] alone.

use std::sync::Arc;

use super::context::GpuContext;
use super::pool::{Lifetime, Pooled};
use super::shaders::{flags, Def, KernelDef, Pipeline, Slot, Source, WG};
use super::timer::{self, PassTimer};
use super::{grid, transfer};
use crate::ops::layer_norm::RowNorm;
use crate::{Element, ElementType, LayerNorm, NormError, Timing};

/// The two entry points, with the bindings both use: params, x, y, gamma, beta.
const SLOTS: &[Slot] = &[
    Slot::Uniform(0),
    Slot::Read(1),
    Slot::ReadWrite(2),
    Slot::Read(3),
    Slot::Read(4),
];
const HELD: KernelDef = KernelDef {
    source: Source::LayerNorm,
    entry: "layer_norm_held",
    slots: SLOTS,
};
const LOOPED: KernelDef = KernelDef {
    source: Source::LayerNorm,
    entry: "layer_norm",
    slots: SLOTS,
};
/// Built with ADD (the fused residual add): also the residual and the sum written out.
const ADD_SLOTS: &[Slot] = &[
    Slot::Uniform(0),
    Slot::Read(1),
    Slot::ReadWrite(2),
    Slot::Read(3),
    Slot::Read(4),
    Slot::Read(9),
    Slot::ReadWrite(10),
];
const HELD_ADD: KernelDef = KernelDef {
    slots: ADD_SLOTS,
    ..HELD
};
const LOOPED_ADD: KernelDef = KernelDef {
    slots: ADD_SLOTS,
    ..LOOPED
};
/// Built with SAVE: also each row's moments written out.
const SAVE_SLOTS: &[Slot] = &[
    Slot::Uniform(0),
    Slot::Read(1),
    Slot::ReadWrite(2),
    Slot::Read(3),
    Slot::Read(4),
    Slot::ReadWrite(6),
];
const HELD_SAVE: KernelDef = KernelDef {
    slots: SAVE_SLOTS,
    ..HELD
};
const LOOPED_SAVE: KernelDef = KernelDef {
    slots: SAVE_SLOTS,
    ..LOOPED
};
/// The backward pass: dx per row (params, x, dx, gamma, dy, row moments), the column sums over
/// tiles of rows (params, x, dy, row moments, partials), and their merge (params, partials,
/// gradients).
const BACKWARD: KernelDef = KernelDef {
    source: Source::LayerNorm,
    entry: "layer_norm_backward",
    slots: &[
        Slot::Uniform(0),
        Slot::Read(1),
        Slot::ReadWrite(2),
        Slot::Read(3),
        Slot::Read(5),
        Slot::ReadWrite(6),
    ],
};
/// `BACKWARD` for rows held in registers, several a workgroup (`Tuning::ln_bwd_hold`).
const BACKWARD_HELD: KernelDef = KernelDef {
    entry: "layer_norm_backward_held",
    ..BACKWARD
};
/// `BACKWARD_HELD` a tile of rows a workgroup, writing the tile's column partials too
/// (`Tuning::ln_bwd_fuse`): x, dx, gamma, dy, moments and partials.
const BACKWARD_FUSED: KernelDef = KernelDef {
    source: Source::LayerNorm,
    entry: "layer_norm_backward_fused",
    slots: &[
        Slot::Uniform(0),
        Slot::Read(1),
        Slot::ReadWrite(2),
        Slot::Read(3),
        Slot::Read(5),
        Slot::ReadWrite(6),
        Slot::ReadWrite(7),
    ],
};
const BACKWARD_COLUMNS: KernelDef = KernelDef {
    source: Source::LayerNorm,
    entry: "layer_norm_backward_columns",
    slots: &[
        Slot::Uniform(0),
        Slot::Read(1),
        Slot::Read(5),
        Slot::ReadWrite(6),
        Slot::ReadWrite(7),
    ],
};
const BACKWARD_MERGE: KernelDef = KernelDef {
    source: Source::LayerNorm,
    entry: "layer_norm_backward_merge",
    slots: &[Slot::Uniform(0), Slot::ReadWrite(7), Slot::ReadWrite(8)],
};
/// Rows of one tile of the backward's column sums (`TILE_ROWS` in the shader).
const TILE_ROWS: usize = 64;
/// Every kernel, and the shader def it is built with beyond the layout ones: ADD, SAVE, SAVED
/// or none.
#[cfg(test)]
pub(crate) const KERNELS: [(&KernelDef, Option<&str>); 15] = [
    (&HELD, None),
    (&BACKWARD_HELD, None),
    (&BACKWARD_HELD, Some("SAVED")),
    (&BACKWARD_FUSED, None),
    (&BACKWARD_FUSED, Some("SAVED")),
    (&LOOPED, None),
    (&HELD_ADD, Some("ADD")),
    (&LOOPED_ADD, Some("ADD")),
    (&HELD_SAVE, Some("SAVE")),
    (&LOOPED_SAVE, Some("SAVE")),
    (&BACKWARD, None),
    (&BACKWARD, Some("SAVED")),
    (&BACKWARD_COLUMNS, None),
    (&BACKWARD_MERGE, None),
    (&BACKWARD_COLUMNS, Some("SAVED")),
];

// Keep in sync with `Params` in shaders/layer_norm.wgsl (a test compares the two).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct LayerNormParams {
    rows: u32,
    features: u32,
    eps: f32,
    flags: u32,
}
const _: () = assert!(std::mem::size_of::<LayerNormParams>() == 16);

/// Whether the kernels read and write tensors of `element` in rows `features` wide as they are:
/// f32 always, and half rows of even length, which fill whole 32-bit words. Half rows of odd
/// length go through f32 twins (`convert`).
pub(crate) fn reads(element: ElementType, features: usize) -> bool {
    element == ElementType::F32 || features.is_multiple_of(2)
}

/// How the kernels see rows `features` wide of `element`: values per vector (4 where that
/// divides the row, else 2 where that does, else 1) and the storage type. A half tensor and its
/// f32 twin share the layout, so they share the arithmetic: a half output is the f32 output
/// rounded once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    width: usize,
    element: ElementType,
}

impl Layout {
    fn new(features: usize, element: ElementType) -> Layout {
        let width = match features {
            f if f.is_multiple_of(4) => 4,
            f if f.is_multiple_of(2) => 2,
            _ => 1,
        };
        Layout { width, element }
    }

    /// The shader defs that say it: VEC4 or VEC2, and PACKED (with BF16) for half tensors.
    fn defs(self) -> [(&'static str, Def); 4] {
        [
            ("VEC4", Def::Flag(self.width == 4)),
            ("VEC2", Def::Flag(self.width == 2)),
            ("PACKED", Def::Flag(self.element != ElementType::F32)),
            ("BF16", Def::Flag(self.element == ElementType::BF16)),
        ]
    }

    /// For pipeline labels: "vec4 f16" and the like.
    fn label(self) -> String {
        let width = ["", "f32", "vec2", "", "vec4"][self.width];
        format!("{width} {}", self.element)
    }
}

/// The LayerNorm kernel for a row length on a device: specialised by size class (threads per
/// row, elements held per thread), by the rows' [`Layout`] and by the device's reductions.
#[derive(Debug, Clone, Copy)]
struct Kernel {
    /// RMSNorm (the shader def RMS) rather than LayerNorm.
    rms: bool,
    /// The fused residual add (the shader def ADD).
    add: bool,
    /// Each row's moments written out (the shader def SAVE).
    save: bool,
    layout: Layout,
    subgroup: bool,
    /// Threads per row: a power of two up to `WG`; a workgroup takes `WG / per_row` rows.
    per_row: u32,
    /// Elements each thread keeps in registers (`layer_norm_held`, one read of the input), or 0
    /// for the looped kernel that reads the row again for each pass.
    held: u32,
}

impl Kernel {
    /// Rows of up to 128 elements share a workgroup, one thread per element rounded up to a
    /// power of two; rows of up to `Tuning::ln_hold` × 256 elements (32 × 256 = 8192, so 32768
    /// features with vec4) are held in registers by 256 threads, 1, 2, 4, ... elements each;
    /// longer rows use the looped kernel, one workgroup per row. On the H100, holding 32 vec4s
    /// per thread ran a 2048×32768 batch at 2662 GB/s against 1458 for the looped kernel, and
    /// changed nothing at the shorter standard shapes (BENCHMARKS.md).
    fn for_features(
        ctx: &GpuContext,
        features: usize,
        (kind, add, save): (RowNorm, bool, bool),
        element: ElementType,
    ) -> Kernel {
        let layout = Layout::new(features, element);
        let (per_row, held) = held_class(features / layout.width, ctx.tuning.ln_hold);
        Kernel {
            rms: kind == RowNorm::Rms,
            add,
            save,
            layout,
            subgroup: ctx.subgroups,
            per_row,
            held,
        }
    }

    fn def(&self) -> &'static KernelDef {
        match (self.held > 0, self.add, self.save) {
            (true, false, false) => &HELD,
            (false, false, false) => &LOOPED,
            (true, true, _) => &HELD_ADD,
            (false, true, _) => &LOOPED_ADD,
            (true, false, true) => &HELD_SAVE,
            (false, false, true) => &LOOPED_SAVE,
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
            "{}{}{} {} {} t{} k{}",
            if self.save { "saving " } else { "" },
            if self.add { "add_" } else { "" },
            if self.rms { "rms_norm" } else { "layer_norm" },
            self.layout.label(),
            if self.subgroup { "subgroup" } else { "tree" },
            self.per_row,
            self.held
        )
    }

    async fn pipeline(&self, ctx: &GpuContext) -> Result<Arc<Pipeline>, NormError> {
        let mut defs = vec![
            ("RMS", Def::Flag(self.rms)),
            ("ADD", Def::Flag(self.add)),
            ("SAVE", Def::Flag(self.save)),
            ("SUBGROUP", Def::Flag(self.subgroup)),
            ("T", Def::U32(self.per_row)),
            ("K", Def::U32(self.held.max(1))),
        ];
        defs.extend(self.layout.defs());
        ctx.pipeline(&self.label(), self.def(), &defs).await
    }
}

/// The kernel for rows `features` wide and its pipeline, ready to [`record`].
pub(crate) struct Prepared {
    kernel: Kernel,
    pipeline: Arc<Pipeline>,
}

/// Picks the kernel of `kind` (with the fused residual add where `add`, writing each row's
/// moments where `save`) for rows `features` wide of `element` (which it [`reads`]) and builds
/// its pipeline (once per context).
pub(crate) async fn prepare(
    ctx: &GpuContext,
    features: usize,
    op: (RowNorm, bool, bool),
    element: ElementType,
) -> Result<Prepared, NormError> {
    let kernel = Kernel::for_features(ctx, features, op, element);
    let what = if kernel.add {
        "add_layer_norm"
    } else {
        "layer_norm"
    };
    ctx.check_storage_buffers(Slot::storage_count(kernel.def().slots), what)?;
    let pipeline = kernel.pipeline(ctx).await?;
    Ok(Prepared { kernel, pipeline })
}

/// The size class of rows of `n` elements (vec4s, vec2s or values) with at most `hold` held per
/// thread: (threads per row, elements each holds), the latter 0 where the rows are looped
/// instead (`hold` 0, or longer rows). Short rows take a power of two of threads, one element
/// each, so a workgroup holds several rows.
fn held_class(n: usize, hold: u32) -> (u32, u32) {
    let wg = WG as usize;
    match n.div_ceil(wg) {
        _ if hold == 0 => (WG, 0),
        _ if n <= wg / 2 => (n.next_power_of_two() as u32, 1),
        k if k <= hold as usize => (WG, k.next_power_of_two() as u32),
        _ => (WG, 0),
    }
}

/// Rows one dispatch may cover: bounded by the binding size, the 2-D grid and u32 indexing.
/// Errors when a single row does not fit one binding.
pub(crate) fn max_rows(ctx: &GpuContext, features: usize) -> Result<usize, NormError> {
    // A caller's encoder or GPU tensor may claim any number of features.
    let row_bytes = features.checked_mul(4).map_or(u64::MAX, |b| b as u64);
    let max_bytes = ctx.max_binding_bytes();
    if row_bytes > max_bytes {
        return Err(NormError::TooLarge {
            what: "one row",
            needed: row_bytes,
            limit: max_bytes,
        });
    }
    // Both kinds share their size classes; half rows of the same width fit as many rows per
    // group or more.
    let kernel = Kernel::for_features(
        ctx,
        features,
        (RowNorm::Layer, false, false),
        ElementType::F32,
    );
    let max_groups = ctx.max_groups();
    // Saturating: on 32-bit targets (wasm) a 65535² grid overflows usize.
    let grid_rows = max_groups
        .saturating_mul(max_groups)
        .saturating_mul(kernel.rows_per_group());
    Ok(usize::try_from(max_bytes / row_bytes)
        .unwrap_or(usize::MAX)
        .min(grid_rows)
        .min(u32::MAX as usize / features))
}

/// The rows one LayerNorm dispatch reads from `x` and writes to `y`, and for the fused add the
/// residual it reads and the sum it writes: spans of buffers, each `rows` rows long.
pub(crate) struct Rows<'a> {
    pub x: wgpu::BufferSlice<'a>,
    pub y: wgpu::BufferSlice<'a>,
    pub rows: usize,
    pub add: Option<(wgpu::BufferSlice<'a>, wgpu::BufferSlice<'a>)>,
    /// Where a saving kernel writes each row's moments (16 bytes a row).
    pub moments: Option<wgpu::BufferSlice<'a>>,
}

/// gamma or beta of a recorded op: none, host values written to the device with the op, or a
/// span of a device buffer (`features` values).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Param<'a> {
    None,
    Host(&'a [f32]),
    Device(wgpu::BufferSlice<'a>),
}

impl<'a> Param<'a> {
    pub fn host(values: Option<&'a [f32]>) -> Param<'a> {
        values.map_or(Param::None, Param::Host)
    }

    fn is_some(&self) -> bool {
        !matches!(self, Param::None)
    }

    /// What a kernel binds for it: the device span, a new buffer of the host values, or the
    /// context's placeholder where there are none (made once, not per op).
    fn bound<'b>(&self, ctx: &'b GpuContext, label: &str) -> Bound<'b>
    where
        'a: 'b,
    {
        match *self {
            Param::Device(span) => Bound::Span(span),
            Param::Host(values) => Bound::Owned(ctx.buffer_with(
                label,
                bytemuck::cast_slice(values),
                wgpu::BufferUsages::STORAGE,
            )),
            Param::None => Bound::Span(ctx.placeholder().slice(..)),
        }
    }
}

/// A parameter as bound: a buffer made for the op, or the caller's span.
enum Bound<'a> {
    Owned(wgpu::Buffer),
    Span(wgpu::BufferSlice<'a>),
}

impl Bound<'_> {
    fn slice(&self) -> wgpu::BufferSlice<'_> {
        match self {
            Bound::Owned(buffer) => buffer.slice(..),
            Bound::Span(span) => *span,
        }
    }
}

/// eps, gamma and beta of a recorded op.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Affine<'a> {
    pub eps: f32,
    pub gamma: Param<'a>,
    pub beta: Param<'a>,
}

impl<'a> From<&LayerNorm<'a>> for Affine<'a> {
    fn from(opts: &LayerNorm<'a>) -> Affine<'a> {
        Affine {
            eps: opts.eps,
            gamma: Param::host(opts.gamma),
            beta: Param::host(opts.beta),
        }
    }
}

/// Records LayerNorm of `io` as one compute pass of `encoder`, with the kernel [`prepare`]d for
/// `features`, timed by `timer` where given. The rows must fit one dispatch ([`max_rows`]); the
/// caller has validated everything else.
pub(crate) fn record(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    io: Rows<'_>,
    features: usize,
    prepared: &Prepared,
    affine: Affine<'_>,
    timer: Option<&PassTimer>,
) {
    use wgpu::BufferUsages as U;
    let Prepared { kernel, pipeline } = prepared;
    let params = LayerNormParams {
        rows: io.rows as u32,
        features: features as u32,
        eps: affine.eps,
        flags: flags::of(affine.gamma.is_some(), affine.beta.is_some(), false),
    };
    let params = ctx.buffer_with("layer_norm params", bytemuck::bytes_of(&params), U::UNIFORM);
    let gamma = affine.gamma.bound(ctx, "layer_norm gamma");
    let beta = affine.beta.bound(ctx, "layer_norm beta");
    let mut slices = vec![params.slice(..), io.x, io.y, gamma.slice(), beta.slice()];
    if let Some((r, sum)) = io.add {
        slices.extend([r, sum]);
    }
    slices.extend(io.moments);
    let bind_group = pipeline.bind_slices(ctx.device(), &slices);
    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some("layer_norm"),
        timestamp_writes: timer.map(|t| t.writes()),
    });
    pass.set_pipeline(&pipeline.pipeline);
    pass.set_bind_group(0, &bind_group, &[]);
    let (gx, gy) = grid(io.rows.div_ceil(kernel.rows_per_group()), ctx.max_groups());
    pass.dispatch_workgroups(gx, gy, 1);
}

/// Runs LayerNorm (or RMSNorm, as `kind` says) of host rows of `T` (which the kernels
/// [`reads`]) on the GPU into `y`; with `add` (the residual and the sum's output), of x +
/// residual, writing that sum too. Half rows cross the bus as they are, half the bytes of f32.
/// Tensors larger than one binding go through in chunks of whole rows, each uploaded,
/// normalized and read back in turn.
pub(crate) async fn run<T: Element>(
    ctx: &GpuContext,
    x: &[T],
    y: &mut [T],
    features: usize,
    (opts, kind): (&LayerNorm<'_>, RowNorm),
    mut add: Option<(&[T], &mut [T])>,
    mut moments: Option<&mut [[f32; 4]]>,
) -> Result<Timing, NormError> {
    use wgpu::BufferUsages as U;
    let rows = x.len() / features;
    if rows == 0 {
        return Ok(Timing::default());
    }
    // Saved moments take 16 bytes a row, in one binding too.
    let moments_rows = usize::try_from(ctx.max_binding_bytes() / 16).unwrap_or(usize::MAX);
    let chunk_rows = max_rows(ctx, features)?.min(rows).min(moments_rows);
    let chunk = chunk_rows * features;
    let span_bytes = |len: usize| T::TYPE.buffer_bytes(len).unwrap_or(u64::MAX);
    let bytes = span_bytes(chunk);
    let op = (kind, add.is_some(), moments.is_some());
    let prepared = prepare(ctx, features, op, T::TYPE).await?;
    // One input and one output buffer, and with the fused add another of each.
    let buffers = usize::from(add.is_some()) + 1;
    let saved = ctx
        .scoped("layer_norm", || {
            moments.is_some().then(|| {
                let bytes = chunk_rows as u64 * 16;
                let usage = U::STORAGE | U::COPY_SRC;
                let moments = ctx.buffer("layer_norm moments", bytes, usage, Lifetime::Call);
                (moments, transfer::readback_buffer(ctx, bytes))
            })
        })
        .await?;
    let (inputs, outputs, stagings, mut timer) = ctx
        .scoped("layer_norm", || {
            let make = |label, usage| -> Vec<_> {
                (0..buffers)
                    .map(|_| ctx.buffer(label, bytes, usage, Lifetime::Call))
                    .collect()
            };
            let inputs = make("layer_norm input", U::STORAGE | U::COPY_DST);
            let outputs = make("layer_norm output", U::STORAGE | U::COPY_SRC | U::COPY_DST);
            let stagings = (0..buffers)
                .map(|_| transfer::readback_buffer(ctx, bytes))
                .collect::<Vec<_>>();
            (inputs, outputs, stagings, PassTimer::new(ctx))
        })
        .await?;
    for (k, (x, y)) in x.chunks(chunk).zip(y.chunks_mut(chunk)).enumerate() {
        let span = k * chunk..k * chunk + x.len();
        let mut uploads = vec![transfer::stage(ctx, x).await?];
        if let Some((residual, _)) = &add {
            uploads.push(transfer::stage(ctx, &residual[span.clone()]).await?);
        }
        ctx.scoped("layer_norm", || {
            #[cfg(debug_assertions)]
            for output in &outputs {
                super::poison(ctx, output, span_bytes(x.len()));
            }
            let mut encoder = ctx.encoder("layer_norm");
            for (upload, input) in uploads.iter().zip(&inputs) {
                upload.record(&mut encoder, input);
            }
            let bytes = span_bytes(x.len());
            let chunk_rows = x.len() / features;
            let io = Rows {
                x: inputs[0].slice(..bytes),
                y: outputs[0].slice(..bytes),
                rows: chunk_rows,
                add: (buffers == 2).then(|| (inputs[1].slice(..bytes), outputs[1].slice(..bytes))),
                moments: saved
                    .as_ref()
                    .map(|(m, _)| m.slice(..chunk_rows as u64 * 16)),
            };
            let affine = Affine::from(opts);
            record(
                ctx,
                &mut encoder,
                io,
                features,
                &prepared,
                affine,
                timer.as_ref(),
            );
            if let Some(t) = &timer {
                t.resolve(&mut encoder);
            }
            for (output, staging) in outputs.iter().zip(&stagings) {
                encoder.copy_buffer_to_buffer(output, 0, staging, 0, bytes);
            }
            if let Some((m, staging)) = &saved {
                encoder.copy_buffer_to_buffer(m, 0, staging, 0, chunk_rows as u64 * 16);
            }
            ctx.queue().submit([encoder.finish()]);
        })
        .await?;
        transfer::read_into(ctx, &stagings[0], y).await?;
        if let Some((_, sum)) = &mut add {
            transfer::read_into(ctx, &stagings[1], &mut sum[span.clone()]).await?;
        }
        if let (Some(moments), Some((_, staging))) = (&mut moments, &saved) {
            let rows = span.start / features..span.end / features;
            transfer::read_into(ctx, staging, &mut moments[rows]).await?;
        }
        if let Some(t) = &mut timer {
            t.collect().await?;
        }
    }
    Ok(Timing {
        kernel: timer::total(&timer),
    })
}

/// The three backward kernels for rows `features` wide, ready to [`record_backward`].
pub(crate) struct Backward {
    rows: Arc<Pipeline>,
    /// None where the rows kernel writes the column partials itself (`BACKWARD_FUSED`).
    columns: Option<Arc<Pipeline>>,
    merge: Arc<Pipeline>,
    /// Rows one workgroup of the rows kernel takes: 1 for the looped kernel, WG / T held,
    /// TILE_ROWS fused.
    rows_per_group: usize,
    /// Workgroups across a row's columns (256 elements each).
    blocks: usize,
    /// Rows one dispatch may cover: one workgroup per row, and each row's moments (16 bytes)
    /// in one binding.
    max_rows: usize,
}

/// Picks the backward kernels of `kind` for rows `features` wide of `element` (which they
/// [`reads`]) and builds their pipelines (once per context).
pub(crate) async fn prepare_backward(
    ctx: &GpuContext,
    features: usize,
    (kind, saved): (RowNorm, bool),
    element: ElementType,
) -> Result<Backward, NormError> {
    ctx.check_storage_buffers(Slot::storage_count(BACKWARD.slots), "layer_norm_backward")?;
    let (rms, layout, subgroup) = (
        kind == RowNorm::Rms,
        Layout::new(features, element),
        ctx.subgroups,
    );
    // Rows held in registers as the forward holds them, up to `ln_bwd_hold` elements of x and
    // as many of dy per thread; otherwise (and by default) the looped kernel.
    let (per_row, held) = held_class(features / layout.width, ctx.tuning.ln_bwd_hold);
    // Fused where one row fills a workgroup and the device binds the six storage buffers.
    let fused = ctx.tuning.ln_bwd_fuse
        && held > 0
        && per_row == WG
        && ctx
            .check_storage_buffers(
                Slot::storage_count(BACKWARD_FUSED.slots),
                "layer_norm_backward",
            )
            .is_ok();
    let rows_kernel = match (fused, held > 0) {
        (true, _) => &BACKWARD_FUSED,
        (false, true) => &BACKWARD_HELD,
        (false, false) => &BACKWARD,
    };
    // T and K shape the rows kernel alone: the column kernels take one build (T = WG, K = 1)
    // whatever the rows kernel holds.
    let pipeline = |kernel: &'static KernelDef, (t, k): (u32, u32)| {
        let mut defs = vec![
            ("RMS", Def::Flag(rms)),
            ("SAVED", Def::Flag(saved)),
            ("SUBGROUP", Def::Flag(subgroup)),
            ("T", Def::U32(t)),
            ("K", Def::U32(k)),
        ];
        defs.extend(layout.defs());
        let label = format!(
            "{}{} {} {} {} t{t} k{k}",
            kernel.entry,
            if saved { " saved" } else { "" },
            if rms { "rms" } else { "layer" },
            layout.label(),
            if subgroup { "subgroup" } else { "tree" }
        );
        async move { ctx.pipeline(&label, kernel, &defs).await }
    };
    let rows = pipeline(rows_kernel, (per_row, held.max(1))).await?;
    let columns = match fused {
        true => None,
        false => Some(pipeline(&BACKWARD_COLUMNS, (WG, 1)).await?),
    };
    let merge = pipeline(&BACKWARD_MERGE, (WG, 1)).await?;
    let n = features / layout.width;
    Ok(Backward {
        rows,
        columns,
        merge,
        rows_per_group: match (fused, held > 0) {
            (true, _) => TILE_ROWS,
            (false, true) => (WG / per_row) as usize,
            (false, false) => 1,
        },
        blocks: n.div_ceil(WG as usize),
        max_rows: backward_max_rows(ctx, features)?,
    })
}

/// Rows one backward dispatch may cover: [`max_rows`], one workgroup per row, and each row's
/// moments (16 bytes) in one binding.
pub(crate) fn backward_max_rows(ctx: &GpuContext, features: usize) -> Result<usize, NormError> {
    let moments_rows = usize::try_from(ctx.max_binding_bytes() / 16).unwrap_or(usize::MAX);
    Ok(max_rows(ctx, features)?
        .min(ctx.max_groups().saturating_pow(2))
        .min(moments_rows))
}

impl Backward {
    /// Rows one [`record_backward`] may cover.
    pub(crate) fn max_rows(&self) -> usize {
        self.max_rows
    }
}

/// The spans of one backward dispatch over `rows` rows: the inputs and dx. The rest is
/// [`BackwardScratch`].
pub(crate) struct BackwardRows<'a> {
    pub x: wgpu::BufferSlice<'a>,
    pub dy: wgpu::BufferSlice<'a>,
    pub dx: wgpu::BufferSlice<'a>,
    pub rows: usize,
}

/// The backward pass's buffers besides its tensors: each row's moments, the column sums of
/// each tile of rows, and the gradients (dgamma then dbeta, `features` values each).
pub(crate) struct BackwardScratch<'a> {
    moments: Pooled<'a>,
    partials: Pooled<'a>,
    pub grads: Pooled<'a>,
}

impl<'a> BackwardScratch<'a> {
    /// Records the copy of `rows` rows' saved moments from `src` to where the SAVED backward
    /// kernels read them.
    pub(crate) fn load_moments(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        src: &wgpu::Buffer,
        rows: usize,
    ) {
        encoder.copy_buffer_to_buffer(src, 0, &self.moments, 0, rows as u64 * 16);
    }

    /// Scratch for up to `rows` rows `features` wide (`COPY_SRC` on the gradients).
    pub(crate) fn new(
        ctx: &'a GpuContext,
        rows: usize,
        features: usize,
        lifetime: Lifetime,
    ) -> BackwardScratch<'a> {
        use wgpu::BufferUsages as U;
        let grads_bytes = (2 * features * 4) as u64;
        let tiles = rows.div_ceil(TILE_ROWS) as u64;
        let storage = |label, bytes, extra| ctx.buffer(label, bytes, U::STORAGE | extra, lifetime);
        BackwardScratch {
            // COPY_DST: saved moments are written in (`backward`'s SAVED kernels).
            moments: storage(
                "layer_norm_backward row moments",
                rows as u64 * 16,
                U::COPY_DST,
            ),
            partials: storage(
                "layer_norm_backward partials",
                tiles * grads_bytes,
                U::empty(),
            ),
            grads: storage("layer_norm_backward grads", grads_bytes, U::COPY_SRC),
        }
    }
}

/// Records the backward pass of `io` as one compute pass of `encoder`: dx, then the column sums
/// of dy · xhat and dy into `scratch.grads`, added onto what it holds where `accumulate`. The
/// rows must fit one dispatch ([`Backward::max_rows`]) and `scratch`.
pub(crate) fn record_backward(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    (io, scratch): (BackwardRows<'_>, &BackwardScratch<'_>),
    features: usize,
    (prepared, affine): (&Backward, Affine<'_>),
    accumulate: bool,
    timer: Option<&PassTimer>,
) {
    use wgpu::BufferUsages as U;
    let params = LayerNormParams {
        rows: io.rows as u32,
        features: features as u32,
        eps: affine.eps,
        flags: flags::of(affine.gamma.is_some(), false, false)
            | if accumulate { flags::ACCUMULATE } else { 0 },
    };
    let params = ctx.buffer_with(
        "layer_norm_backward params",
        bytemuck::bytes_of(&params),
        U::UNIFORM,
    );
    let BackwardScratch {
        moments,
        partials,
        grads,
    } = scratch;
    let gamma = affine.gamma.bound(ctx, "layer_norm_backward gamma");
    let (params, gamma) = (params.slice(..), gamma.slice());
    let (moments, partials, grads) = (moments.slice(..), partials.slice(..), grads.slice(..));
    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some("layer_norm_backward"),
        timestamp_writes: timer.map(|t| t.writes()),
    });
    let blocks = prepared.blocks;
    // The fused rows kernel binds the partials too, and no columns kernel runs.
    let rows_spans = [params, io.x, io.dx, gamma, io.dy, moments, partials];
    let rows_spans = match prepared.columns {
        Some(_) => &rows_spans[..6],
        None => &rows_spans[..],
    };
    let column_spans = [params, io.x, io.dy, moments, partials];
    let merge_spans = [params, partials, grads];
    let mut steps = vec![(
        &prepared.rows,
        rows_spans,
        io.rows.div_ceil(prepared.rows_per_group),
    )];
    if let Some(columns) = &prepared.columns {
        steps.push((
            columns,
            &column_spans[..],
            io.rows.div_ceil(TILE_ROWS) * blocks,
        ));
    }
    steps.push((&prepared.merge, &merge_spans[..], blocks));
    for (pipeline, slices, groups) in steps {
        pass.set_pipeline(&pipeline.pipeline);
        pass.set_bind_group(0, &pipeline.bind_slices(ctx.device(), slices), &[]);
        let (gx, gy) = grid(groups, ctx.max_groups());
        pass.dispatch_workgroups(gx, gy, 1);
    }
}

/// The backward pass of LayerNorm (or RMSNorm) of host rows of `T` (which the kernels
/// [`reads`]) on the GPU: dx into `dx`, and the column sums (dgamma, dbeta). Chunks of whole
/// rows go through in turn, each uploaded with its dy, run through the three backward kernels
/// in one pass and its dx read back; the column sums stay on the device, each chunk adding onto
/// the last, and are read once at the end.
pub(crate) async fn backward<T: Element>(
    ctx: &GpuContext,
    (x, dy): (&[T], &[T]),
    dx: &mut [T],
    features: usize,
    (opts, kind): (&LayerNorm<'_>, RowNorm),
    saved: Option<&[[f32; 4]]>,
) -> Result<(Vec<f32>, Vec<f32>, Timing), NormError> {
    use wgpu::BufferUsages as U;
    let rows = x.len() / features;
    if rows == 0 {
        return Ok((vec![0.0; features], vec![0.0; features], Timing::default()));
    }
    let prepared = prepare_backward(ctx, features, (kind, saved.is_some()), T::TYPE).await?;
    let chunk_rows = prepared.max_rows().min(rows);
    let chunk = chunk_rows * features;
    let grads_bytes = (2 * features * 4) as u64;
    let span_bytes = |len: usize| T::TYPE.buffer_bytes(len).unwrap_or(u64::MAX);
    let bufs = ctx
        .scoped("layer_norm_backward", || {
            let bytes = span_bytes(chunk);
            let storage =
                |label, extra| ctx.buffer(label, bytes, U::STORAGE | extra, Lifetime::Call);
            (
                storage("layer_norm_backward x", U::COPY_DST),
                storage("layer_norm_backward dy", U::COPY_DST),
                storage("layer_norm_backward dx", U::COPY_SRC | U::COPY_DST),
                BackwardScratch::new(ctx, chunk_rows, features, Lifetime::Call),
                transfer::readback_buffer(ctx, bytes),
                PassTimer::new(ctx),
            )
        })
        .await?;
    let (xb, dyb, dxb, scratch, staging, mut timer) = bufs;
    for (k, ((x, dy), dx)) in x
        .chunks(chunk)
        .zip(dy.chunks(chunk))
        .zip(dx.chunks_mut(chunk))
        .enumerate()
    {
        let (x_up, dy_up) = (
            transfer::stage(ctx, x).await?,
            transfer::stage(ctx, dy).await?,
        );
        ctx.scoped("layer_norm_backward", || {
            if let Some(saved) = saved {
                // The chunk's saved moments, where the backward kernels read them.
                let first = k * chunk_rows;
                let mine = &saved[first..first + x.len() / features];
                ctx.queue()
                    .write_buffer(&scratch.moments, 0, bytemuck::cast_slice(mine));
            }
            let mut encoder = ctx.encoder("layer_norm_backward");
            x_up.record(&mut encoder, &xb);
            dy_up.record(&mut encoder, &dyb);
            let bytes = span_bytes(x.len());
            let io = BackwardRows {
                x: xb.slice(..bytes),
                dy: dyb.slice(..bytes),
                dx: dxb.slice(..bytes),
                rows: x.len() / features,
            };
            let op = (&prepared, Affine::from(opts));
            record_backward(
                ctx,
                &mut encoder,
                (io, &scratch),
                features,
                op,
                k > 0,
                timer.as_ref(),
            );
            if let Some(t) = &timer {
                t.resolve(&mut encoder);
            }
            encoder.copy_buffer_to_buffer(&dxb, 0, &staging, 0, bytes);
            ctx.queue().submit([encoder.finish()]);
        })
        .await?;
        transfer::read_into(ctx, &staging, dx).await?;
        if let Some(t) = &mut timer {
            t.collect().await?;
        }
    }
    let grads_staging = ctx
        .scoped("layer_norm_backward", || {
            let staging = transfer::readback_buffer(ctx, grads_bytes);
            let mut encoder = ctx.encoder("layer_norm_backward gradients");
            encoder.copy_buffer_to_buffer(&scratch.grads, 0, &staging, 0, grads_bytes);
            ctx.queue().submit([encoder.finish()]);
            staging
        })
        .await?;
    let mut both = vec![0f32; 2 * features];
    transfer::read_into(ctx, &grads_staging, &mut both).await?;
    let dbeta = both.split_off(features);
    Ok((
        both,
        dbeta,
        Timing {
            kernel: timer::total(&timer),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::shaders::{fields, shader_params};

    /// `LayerNormParams` and the shader's `Params` have the same fields at the same offsets.
    #[test]
    fn params_match_the_shader() {
        let defs = [("T", Def::U32(256)), ("K", Def::U32(1))];
        let (members, size) = shader_params(Source::LayerNorm, &defs);
        assert_eq!(
            members,
            fields!(LayerNormParams {
                rows,
                features,
                eps,
                flags
            })
        );
        assert_eq!(size as usize, std::mem::size_of::<LayerNormParams>());
    }
}
