//! What `gpunorm bench` times: the ops in both forms, the copy ceilings, the transfers and the
//! small-batch cost. Every timing is the median of warm runs (one untimed run first).

use std::time::{Duration, Instant};

use gpunorm::{
    wgpu, BatchNorm, Element, LayerNorm, NormError, Normalizer, RmsNorm, RunningStats, Timing,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::copy::CopyKernel;
use super::{gbps, label, op_bytes, Record, ShapeFacts, SmallBatch};
use crate::error::{self, CliResult};

/// Small-batch shapes whose per-op cost is reported (a short batch, and decode-shaped rows of
/// one and eight tokens), and how many ops share one submission.
pub const SMALL: [(usize, usize); 3] = [(4096, 768), (1, 4096), (8, 4096)];
const BATCHED: usize = 64;

/// An op of the sweep, in one of its two forms.
#[derive(Debug, Clone, Copy)]
pub struct Op {
    kind: Kind,
    /// Returns a new `Vec` per call (`layer_norm`), instead of writing into a reused buffer
    /// (`layer_norm_into`).
    alloc: bool,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    LayerNorm,
    RmsNorm,
    LayerNormBackward,
    /// A training step: forward, then backward recomputing the statistics.
    LayerNormStep,
    /// A training step through saved statistics.
    LayerNormStepSaved,
    RmsNormBackward,
    AddLayerNorm,
    BatchNormBackward,
    Train,
    Eval,
}

impl Op {
    /// One of [`super::OPS`] (checked by the argument parser).
    pub fn parse(name: &str) -> Op {
        let alloc = name.ends_with("_alloc");
        let kind = match name.trim_end_matches("_alloc") {
            "layer_norm" => Kind::LayerNorm,
            "rms_norm" => Kind::RmsNorm,
            "layer_norm_backward" => Kind::LayerNormBackward,
            "layer_norm_step" => Kind::LayerNormStep,
            "layer_norm_step_saved" => Kind::LayerNormStepSaved,
            "rms_norm_backward" => Kind::RmsNormBackward,
            "add_layer_norm" => Kind::AddLayerNorm,
            "batch_norm_backward" => Kind::BatchNormBackward,
            "batch_norm_train" => Kind::Train,
            "batch_norm_eval" => Kind::Eval,
            other => unreachable!("op {other} was checked by the argument parser"),
        };
        Op { kind, alloc }
    }

    pub fn name(&self) -> String {
        let base = match self.kind {
            Kind::LayerNorm => "layer_norm",
            Kind::RmsNorm => "rms_norm",
            Kind::LayerNormBackward => "layer_norm_backward",
            Kind::LayerNormStep => "layer_norm_step",
            Kind::LayerNormStepSaved => "layer_norm_step_saved",
            Kind::RmsNormBackward => "rms_norm_backward",
            Kind::AddLayerNorm => "add_layer_norm",
            Kind::BatchNormBackward => "batch_norm_backward",
            Kind::Train => "batch_norm_train",
            Kind::Eval => "batch_norm_eval",
        };
        format!("{base}{}", if self.alloc { "_alloc" } else { "" })
    }

    /// Bytes the op must move at least: x in and y out, twice the tensor; a backward pass reads
    /// x and dy and writes dx, three times; the fused add reads x and the residual and writes
    /// the sum and y, four times; a training step (forward, then backward with y as dy) five.
    pub fn bytes(&self, shape: (usize, usize), element: usize) -> f64 {
        let passes = match self.kind {
            Kind::LayerNormBackward | Kind::RmsNormBackward | Kind::BatchNormBackward => 3,
            // The forward (x in, y out) and the backward (x and dy in, dx out).
            Kind::LayerNormStep | Kind::LayerNormStepSaved => 5,
            Kind::AddLayerNorm => 4,
            _ => 2,
        };
        (passes * shape.0 * shape.1 * element) as f64
    }

    /// Bytes a value of a tensor of `element` bytes takes in the GPU kernels: as stored for the
    /// LayerNorm family on rows of even length (half rows fill whole words there), 4 elsewhere
    /// (BatchNorm, and half rows of odd length, compute on f32 twins).
    fn kernel_element(&self, features: usize, element: usize) -> usize {
        match self.kind {
            Kind::Train | Kind::Eval | Kind::BatchNormBackward => 4,
            _ if features % 2 == 1 => 4,
            _ => element,
        }
    }

    /// One call, timed end to end. A backward pass takes x as its dy too, the fused add as its
    /// residual (it returns new vectors: it has no `_into` form yet).
    fn call<T: Element>(
        &self,
        norm: &Normalizer,
        x: &[T],
        y: &mut [T],
        features: usize,
    ) -> Result<(Duration, Timing), NormError> {
        let (ln, rms, bn) = (
            LayerNorm::default(),
            RmsNorm::default(),
            BatchNorm::default(),
        );
        let stats = RunningStats::new(features);
        let t = Instant::now();
        let timing = match (self.kind, self.alloc) {
            (Kind::LayerNorm, false) => norm.layer_norm_into(x, features, &ln, y)?,
            (Kind::LayerNorm, true) => drop_timed(norm.layer_norm(x, features, &ln)?),
            (Kind::RmsNorm, false) => norm.rms_norm_into(x, features, &rms, y)?,
            (Kind::RmsNorm, true) => drop_timed(norm.rms_norm(x, features, &rms)?),
            (Kind::LayerNormBackward, false) => {
                norm.layer_norm_backward_into(x, x, features, &ln, y)?.1
            }
            (Kind::LayerNormBackward, true) => {
                drop_timed(norm.layer_norm_backward(x, x, features, &ln)?)
            }
            (Kind::LayerNormStep, _) => {
                let y = norm.layer_norm(x, features, &ln)?;
                drop_timed((norm.layer_norm_backward(x, &y, features, &ln)?, y))
            }
            (Kind::LayerNormStepSaved, _) => {
                let out = norm.layer_norm_saving(x, features, &ln)?;
                let grads = norm.layer_norm_backward_saved(x, &out.y, features, &ln, &out.stats)?;
                drop_timed((grads, out))
            }
            (Kind::RmsNormBackward, false) => {
                norm.rms_norm_backward_into(x, x, features, &rms, y)?.1
            }
            (Kind::RmsNormBackward, true) => {
                drop_timed(norm.rms_norm_backward(x, x, features, &rms)?)
            }
            (Kind::AddLayerNorm, _) => drop_timed(norm.add_layer_norm(x, x, features, &ln)?),
            (Kind::BatchNormBackward, false) => {
                norm.batch_norm_backward_into(x, x, features, &bn, y)?.1
            }
            (Kind::BatchNormBackward, true) => {
                drop_timed(norm.batch_norm_backward(x, x, features, &bn)?)
            }
            (Kind::Train, false) => norm.batch_norm_train_into(x, features, &bn, y)?.1,
            (Kind::Train, true) => drop_timed(norm.batch_norm_train(x, features, &bn)?),
            (Kind::Eval, false) => norm.batch_norm_eval_into(x, features, &bn, &stats, y)?,
            (Kind::Eval, true) => drop_timed(norm.batch_norm_eval(x, features, &bn, &stats)?),
        };
        Ok((t.elapsed(), timing))
    }
}

/// Drops an allocating op's result inside the timed region (freeing is part of its cost), with
/// no kernel time: the allocating forms do not report one.
fn drop_timed<T>(value: T) -> Timing {
    drop(value);
    Timing::default()
}

/// Median wall and kernel time of `op` on `norm` with tensors of `T` (`x` rounded to it), as a
/// record. Wall-clock GB/s counts `T`'s bytes, and so does kernel GB/s where the kernels read
/// and write `T` ([`Op::kernel_element`]); elsewhere they count the f32 twins the GPU widens to.
pub fn op<T: Element + FromF32>(
    norm: &Normalizer,
    backend: &'static str,
    op: Op,
    shape: (usize, usize),
    x: &[f32],
    reps: usize,
) -> CliResult<Record> {
    let x: Vec<T> = x.iter().map(|&v| T::from_f32(v)).collect();
    let mut y = error::filled(x.len(), T::from_f32(1.0), "the output")?;
    let (seconds, kernel) = median(reps, || op.call(norm, &x, &mut y, shape.1))?;
    let bytes = op.bytes(shape, std::mem::size_of::<T>());
    let kernel_bytes = op.bytes(shape, op.kernel_element(shape.1, std::mem::size_of::<T>()));
    Ok(Record {
        op: op.name(),
        dtype: T::NAME,
        shape: label(shape),
        rows: shape.0,
        features: shape.1,
        backend,
        seconds,
        gbps: gbps(bytes, seconds),
        kernel_seconds: kernel,
        kernel_gbps: kernel.map(|k| gbps(kernel_bytes, k)),
    })
}

/// The element types a sweep converts its f32 input to.
pub trait FromF32 {
    fn from_f32(v: f32) -> Self;
}

impl FromF32 for f32 {
    fn from_f32(v: f32) -> f32 {
        v
    }
}

impl FromF32 for gpunorm::half::f16 {
    fn from_f32(v: f32) -> Self {
        gpunorm::half::f16::from_f32(v)
    }
}

impl FromF32 for gpunorm::half::bf16 {
    fn from_f32(v: f32) -> Self {
        gpunorm::half::bf16::from_f32(v)
    }
}

/// One untimed run, then the median wall clock and median kernel time of `reps` runs.
pub fn median(
    reps: usize,
    mut f: impl FnMut() -> Result<(Duration, Timing), NormError>,
) -> Result<(f64, Option<f64>), NormError> {
    f()?;
    let mut walls = Vec::with_capacity(reps);
    let mut kernels = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let (wall, timing) = f()?;
        walls.push(wall.as_secs_f64());
        kernels.extend(timing.kernel.map(|k| k.as_secs_f64()));
    }
    let mid = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let kernel = (!kernels.is_empty()).then(|| mid(&mut kernels));
    Ok((mid(&mut walls), kernel))
}

/// Activations like the anchors': roughly normal around 3.
pub fn input(n: usize) -> CliResult<Vec<f32>> {
    let mut rng = StdRng::seed_from_u64(0);
    let mut x = error::filled(n, 0f32, "the input")?;
    x.iter_mut()
        .for_each(|v| *v = rng.random_range(-1.7f32..1.7) + 3.0);
    Ok(x)
}

/// The copy ceilings and transfer speeds of one shape, whose tensors hold values of `size`
/// bytes: the copies move that many bytes per value, as the ops do (transfers stay f32's).
pub fn ceilings(
    gpu: Option<&Normalizer>,
    shape: (usize, usize),
    x: &[f32],
    size: usize,
    reps: usize,
) -> CliResult<ShapeFacts> {
    let bytes = op_bytes(shape) * size as f64 / 4.0;
    let src = &bytemuck::cast_slice::<f32, u8>(x)[..x.len() * size];
    let mut y = error::filled(src.len(), 1u8, "the output")?;
    let cpu_copy = median(reps, || {
        let t = Instant::now();
        y.copy_from_slice(src);
        Ok((t.elapsed(), Timing::default()))
    })?
    .0;
    let mut facts = ShapeFacts {
        shape: label(shape),
        rows: shape.0,
        features: shape.1,
        cpu_copy_1thread_gbps: gbps(bytes, cpu_copy),
        ..Default::default()
    };
    if let Some(g) = gpu {
        facts.gpu_copy_kernel_gbps = gpu_copy(g, src.len() / 4, reps)?.map(|s| gbps(bytes, s));
        // A tensor past one binding cannot live on the device whole: no transfer figures.
        if let Some((up, down)) = transfers(g, x, reps)? {
            facts.upload_gbps = Some(up);
            facts.download_gbps = Some(down);
        }
    }
    Ok(facts)
}

fn wait(device: &wgpu::Device, op: &'static str) -> Result<(), NormError> {
    device
        .poll(wgpu::PollType::wait_indefinitely())
        .map(|_| ())
        .map_err(|e| NormError::Gpu {
            op,
            message: e.to_string(),
        })
}

/// Upload and download speeds of `x` through GPU tensors, in GB/s (bytes of x each way); None
/// when `x` does not fit one binding of the device.
fn transfers(norm: &Normalizer, x: &[f32], reps: usize) -> Result<Option<(f64, f64)>, NormError> {
    let (device, _) = norm.wgpu().expect("a GPU normalizer");
    let tensor = match norm.upload(x) {
        Ok(t) => t,
        Err(NormError::TooLarge { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let bytes = (x.len() * 4) as f64;
    let up = median(reps, || {
        let t = Instant::now();
        let uploaded = norm.upload(x)?;
        wait(device, "waiting for an upload")?;
        drop(uploaded);
        Ok((t.elapsed(), Timing::default()))
    })?
    .0;
    let down = median(reps, || {
        let t = Instant::now();
        norm.download(&tensor)?;
        Ok((t.elapsed(), Timing::default()))
    })?
    .0;
    Ok(Some((gbps(bytes, up), gbps(bytes, down))))
}

/// Per-op cost of LayerNorm on a small batch: end to end (upload, kernel, readback, one
/// submission each) and device-resident with `BATCHED` ops recorded into one submission.
pub fn small_batch(
    norm: &Normalizer,
    (rows, features): (usize, usize),
    reps: usize,
) -> CliResult<SmallBatch> {
    let x = input(rows * features)?;
    let mut y = vec![0f32; x.len()];
    let opts = LayerNorm::default();
    let single = median(reps, || {
        let t = Instant::now();
        norm.layer_norm_into(&x, features, &opts, &mut y)?;
        Ok((t.elapsed(), Timing::default()))
    })?
    .0;
    let (device, queue) = norm.wgpu().expect("a GPU normalizer");
    let (input, output) = (norm.upload(&x)?, norm.upload(&y)?);
    // BATCHED LayerNorms recorded into one encoder.
    let record = || -> Result<wgpu::CommandEncoder, NormError> {
        let mut encoder = device.create_command_encoder(&Default::default());
        for _ in 0..BATCHED {
            let io = (input.buffer(), output.buffer());
            norm.encode_layer_norm(&mut encoder, io.0, io.1, x.len(), features, &opts)?;
        }
        Ok(encoder)
    };
    let batched = median(reps, || {
        let t = Instant::now();
        queue.submit([record()?.finish()]);
        wait(device, "waiting for a batch")?;
        Ok((t.elapsed(), Timing::default()))
    })?
    .0 / BATCHED as f64;
    // The host's share of that: the same ops recorded, the encoder dropped unsubmitted.
    let recording = median(reps, || {
        let t = Instant::now();
        let encoder = record()?;
        let elapsed = t.elapsed();
        drop(encoder);
        Ok((elapsed, Timing::default()))
    })?
    .0 / BATCHED as f64;
    println!(
        "  small batch {}: LayerNorm per op {:.1} us end to end (one submission each), {:.1} us with {BATCHED} recorded into one submission (device-resident), {:.1} us of it recording on the host",
        label((rows, features)),
        single * 1e6,
        batched * 1e6,
        recording * 1e6
    );
    Ok(SmallBatch {
        shape: label((rows, features)),
        op: "layer_norm",
        per_op_seconds_end_to_end: single,
        per_op_seconds_batched: batched,
        per_op_seconds_recording: recording,
        ops_per_submission: BATCHED,
    })
}

/// Median kernel time of a vec4 copy of `n` f32 on the GPU, from timestamp queries; None
/// without them or when the tensor exceeds one binding.
fn gpu_copy(norm: &Normalizer, n: usize, reps: usize) -> Result<Option<f64>, NormError> {
    let (device, queue) = norm.wgpu().expect("a GPU normalizer");
    let bytes = (n.div_ceil(4) * 16) as u64;
    let limits = device.limits();
    if !norm.has_kernel_timing()
        || bytes
            > limits
                .max_storage_buffer_binding_size
                .min(limits.max_buffer_size)
    {
        return Ok(None);
    }
    let copy = CopyKernel::new(device, queue, bytes);
    let kernel = median(reps, || {
        let d = copy.run(device, queue)?;
        Ok((d, Timing { kernel: Some(d) }))
    })?
    .1;
    Ok(kernel)
}
