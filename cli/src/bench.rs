//! `gpunorm bench`: a sweep over shapes and ops. For each shape: the copy ceilings of the same
//! run (single-thread memcpy on the CPU; a vec4 copy kernel on the GPU), the CPU fallback, the GPU
//! end to end and kernel only, and upload and download speeds; then the per-op cost of a small
//! batch, alone and recorded 64 to a submission. Printed as a table, optionally written as JSON
//! and drawn as an SVG chart. GB/s counts the input read once and the output written once.

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use gpunorm::{wgpu, BatchNorm, LayerNorm, NormError, Normalizer, RunningStats, Timing};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The ops a sweep can run.
pub const OPS: &[&str] = &["layer_norm", "batch_norm_train", "batch_norm_eval"];
/// Small-batch shape whose per-op cost is reported, and how many ops share one submission.
const SMALL: (usize, usize) = (4096, 768);
const BATCHED: usize = 64;

pub struct Options {
    pub shapes: Vec<(usize, usize)>,
    pub ops: Vec<String>,
    pub reps: usize,
    pub json: Option<std::path::PathBuf>,
    pub plot: Option<std::path::PathBuf>,
}

/// One measured (op, shape, backend): median wall clock of the whole call (output buffer
/// preallocated), and median kernel time where timestamps exist.
struct Record {
    op: String,
    shape: (usize, usize),
    backend: &'static str,
    seconds: f64,
    kernel: Option<f64>,
}

/// The ceilings and transfer speeds of one shape, in GB/s.
#[derive(Default)]
struct ShapeFacts {
    shape: (usize, usize),
    cpu_copy: f64,
    gpu_copy: Option<f64>,
    upload: Option<f64>,
    download: Option<f64>,
}

pub fn parse_shape(s: &str) -> Result<(usize, usize), String> {
    let (r, f) = s
        .split_once('x')
        .ok_or(format!("shape {s:?} is not ROWSxFEATURES, e.g. 4096x768"))?;
    let num = |v: &str| {
        v.trim()
            .parse::<usize>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or(format!("shape {s:?}: {v:?} is not a positive number"))
    };
    Ok((num(r)?, num(f)?))
}

fn gbps(bytes: f64, seconds: f64) -> f64 {
    bytes / seconds / 1e9
}

/// Input + output bytes of a normalization of `shape`.
fn op_bytes(shape: (usize, usize)) -> f64 {
    (2 * shape.0 * shape.1 * 4) as f64
}

pub fn run(norm: &Normalizer, opts: &Options) -> Result<(), NormError> {
    let cpu = Normalizer::cpu();
    let threads = rayon::current_num_threads();
    let gpu = norm.is_gpu().then_some(norm);
    println!(
        "bench: {} | CPU fallback on {threads} threads | median of {} runs",
        norm.describe(),
        opts.reps
    );
    println!(
        "  GB/s counts input read once + output written once. % ceiling: CPU rows against the"
    );
    println!("  single-thread memcpy, GPU kernel times against the copy kernel, both of this run.");
    println!(
        "  {:<17} {:>12} {:>8} {:>10} {:>9} {:>9} {:>10} {:>9} {:>9}",
        "op", "shape", "backend", "ms", "GB/s", "% ceil", "kernel ms", "kern GB/s", "% ceil"
    );
    let mut records = Vec::new();
    let mut facts = Vec::new();
    let steps = opts.shapes.len() * opts.ops.len() * if gpu.is_some() { 2 } else { 1 };
    let mut step = 0;
    // A progress line for people watching a long sweep; nothing when stderr is a file or pipe.
    let progress = std::io::stderr().is_terminal();
    for &shape in &opts.shapes {
        let (rows, features) = shape;
        let n = rows * features;
        let bytes = op_bytes(shape);
        let x = input(n);
        let mut y = vec![1f32; n];
        let mut f = ShapeFacts {
            shape,
            ..Default::default()
        };
        f.cpu_copy = gbps(
            bytes,
            median(opts.reps, || {
                let t = Instant::now();
                y.copy_from_slice(&x);
                Ok((t.elapsed(), Timing::default()))
            })?
            .0,
        );
        if let Some(g) = gpu {
            f.gpu_copy = gpu_copy(g, n, opts.reps)?.map(|s| gbps(bytes, s));
            // A tensor past one binding cannot live on the device whole: no transfer figures.
            if let Some((up, down)) = transfers(g, &x, opts.reps)? {
                f.upload = Some(up);
                f.download = Some(down);
            }
        }
        println!(
            "  {:<17} {:>12} {:>8} {:>10} {:>9.2} {:>9}",
            "copy (1 thread)",
            label(shape),
            "cpu",
            "",
            f.cpu_copy,
            "100%"
        );
        if let Some(c) = f.gpu_copy {
            println!(
                "  {:<17} {:>12} {:>8} {:>10} {:>9} {:>9} {:>10} {:>9.2} {:>9}",
                "copy kernel",
                label(shape),
                "gpu",
                "",
                "",
                "",
                "",
                c,
                "100%"
            );
        }
        for op in &opts.ops {
            let backends = [Some(("cpu", &cpu)), gpu.map(|g| ("gpu", g))];
            for (backend, nz) in backends.into_iter().flatten() {
                step += 1;
                if progress {
                    eprint!(
                        "\r  [{step}/{steps}] {op} {} {backend}        ",
                        label(shape)
                    );
                }
                let (seconds, kernel) = median(opts.reps, || run_op(nz, op, &x, &mut y, features))?;
                let rate = gbps(bytes, seconds);
                let ceiling = if backend == "cpu" {
                    format!("{:.0}%", 100.0 * rate / f.cpu_copy)
                } else {
                    String::new()
                };
                let (k_ms, k_rate, k_ceil) = match kernel {
                    Some(k) => (
                        format!("{:.3}", k * 1e3),
                        format!("{:.2}", gbps(bytes, k)),
                        f.gpu_copy.map_or(String::new(), |c| {
                            format!("{:.0}%", 100.0 * gbps(bytes, k) / c)
                        }),
                    ),
                    None => Default::default(),
                };
                if progress {
                    eprint!("\r{:60}\r", "");
                }
                println!("  {op:<17} {:>12} {backend:>8} {:>10.3} {rate:>9.2} {ceiling:>9} {k_ms:>10} {k_rate:>9} {k_ceil:>9}", label(shape), seconds * 1e3);
                records.push(Record {
                    op: op.clone(),
                    shape,
                    backend,
                    seconds,
                    kernel,
                });
            }
        }
        if let (Some(up), Some(down)) = (f.upload, f.download) {
            println!(
                "  {:<17} {:>12} {:>8} upload {up:.2} GB/s, download {down:.2} GB/s",
                "transfers",
                label(shape),
                "gpu"
            );
        }
        facts.push(f);
    }
    speedups(&records);
    let small = match gpu {
        Some(g) => Some(small_batch(g, opts.reps)?),
        None => None,
    };
    if let Some(path) = &opts.json {
        write(path, &to_json(norm, threads, &facts, &records, small))?;
        println!("  wrote {}", path.display());
    }
    if let Some(path) = &opts.plot {
        write(path, &to_svg(norm, &facts, &records))?;
        println!("  drew {}", path.display());
    }
    Ok(())
}

fn label(shape: (usize, usize)) -> String {
    format!("{}x{}", shape.0, shape.1)
}

fn write(path: &std::path::Path, text: &str) -> Result<(), NormError> {
    std::fs::write(path, text).map_err(|e| NormError::Gpu {
        op: "writing a report",
        message: format!("{}: {e}", path.display()),
    })
}

fn run_op(
    norm: &Normalizer,
    op: &str,
    x: &[f32],
    y: &mut [f32],
    features: usize,
) -> Result<(Duration, Timing), NormError> {
    let t = Instant::now();
    let timing = match op {
        "layer_norm" => norm.layer_norm_into(x, features, &LayerNorm::default(), y)?,
        "batch_norm_train" => {
            norm.batch_norm_train_into(x, features, &BatchNorm::default(), y)?
                .1
        }
        "batch_norm_eval" => norm.batch_norm_eval_into(
            x,
            features,
            &BatchNorm::default(),
            &RunningStats::new(features),
            y,
        )?,
        other => unreachable!("op {other} was checked by the argument parser"),
    };
    Ok((t.elapsed(), timing))
}

/// GPU-vs-CPU speedups, end to end and kernel only, per (op, shape).
fn speedups(records: &[Record]) {
    let mut lines = Vec::new();
    for g in records.iter().filter(|r| r.backend == "gpu") {
        if let Some(c) = records
            .iter()
            .find(|c| c.backend == "cpu" && c.op == g.op && c.shape == g.shape)
        {
            let kernel = g.kernel.map_or(String::new(), |k| {
                format!(", kernel only {:.2}x", c.seconds / k)
            });
            lines.push(format!(
                "  {:<17} {:>12}  GPU vs CPU fallback: end to end {:.2}x{kernel}",
                g.op,
                label(g.shape),
                c.seconds / g.seconds
            ));
        }
    }
    if !lines.is_empty() {
        println!("{}", lines.join("\n"));
    }
}

/// One warm-up, then the median wall clock and median kernel time of `reps` runs.
fn median(
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
fn input(n: usize) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(0);
    (0..n)
        .map(|_| rng.random_range(-1.7f32..1.7) + 3.0)
        .collect()
}

/// Upload and download speeds of `x` through GPU tensors, in GB/s (bytes of x each way); None
/// when `x` does not fit one binding of the device.
fn transfers(norm: &Normalizer, x: &[f32], reps: usize) -> Result<Option<(f64, f64)>, NormError> {
    let (device, queue) = norm.wgpu().expect("a GPU normalizer");
    let limits = device.limits();
    if (x.len() * 4) as u64
        > limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size)
    {
        return Ok(None);
    }
    let bytes = (x.len() * 4) as f64;
    let mut tensor = None;
    let up = median(reps, || {
        let t = Instant::now();
        tensor = Some(norm.upload(x)?);
        queue.submit([]);
        device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| NormError::Gpu {
                op: "waiting for an upload",
                message: e.to_string(),
            })?;
        Ok((t.elapsed(), Timing::default()))
    })?
    .0;
    let tensor = tensor.expect("uploaded at least once");
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
/// Returns (end to end, batched) seconds per op.
fn small_batch(norm: &Normalizer, reps: usize) -> Result<(f64, f64), NormError> {
    let (rows, features) = SMALL;
    let x = input(rows * features);
    let mut y = vec![0f32; x.len()];
    let opts = LayerNorm::default();
    let single = median(reps, || {
        let t = Instant::now();
        norm.layer_norm_into(&x, features, &opts, &mut y)?;
        Ok((t.elapsed(), Timing::default()))
    })?
    .0;
    let (device, queue) = norm.wgpu().expect("a GPU normalizer");
    let input = norm.upload(&x)?;
    let output = norm.upload(&y)?;
    let batched = median(reps, || {
        let t = Instant::now();
        let mut encoder = device.create_command_encoder(&Default::default());
        for _ in 0..BATCHED {
            norm.encode_layer_norm(
                &mut encoder,
                input.buffer(),
                output.buffer(),
                x.len(),
                features,
                &opts,
            )?;
        }
        queue.submit([encoder.finish()]);
        device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| NormError::Gpu {
                op: "waiting for a batch",
                message: e.to_string(),
            })?;
        Ok((t.elapsed(), Timing::default()))
    })?
    .0 / BATCHED as f64;
    println!(
        "  small batch {}: LayerNorm per op {:.1} us end to end (one submission each), {:.1} us with {BATCHED} recorded into one submission (device-resident)",
        label(SMALL),
        single * 1e6,
        batched * 1e6
    );
    Ok((single, batched))
}

// Keep in sync with `Params` in shaders/bench_copy.wgsl.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct CopyParams {
    vec4s: u32,
    _pad: [u32; 3],
}

/// Median kernel time of a vec4 copy of `n` f32 on the GPU, from timestamp queries; None
/// without them or when the tensor exceeds one binding.
fn gpu_copy(norm: &Normalizer, n: usize, reps: usize) -> Result<Option<f64>, NormError> {
    let (device, queue) = norm.wgpu().expect("a GPU normalizer");
    let bytes = (n.div_ceil(4) * 16) as u64;
    if !norm.has_kernel_timing()
        || bytes
            > device
                .limits()
                .max_storage_buffer_binding_size
                .min(device.limits().max_buffer_size)
    {
        return Ok(None);
    }
    use wgpu::BufferUsages as U;
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("bench copy"),
        source: wgpu::ShaderSource::Wgsl(include_str!("../../shaders/bench_copy.wgsl").into()),
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some("bench copy"),
        layout: None,
        module: &module,
        entry_point: Some("copy"),
        compilation_options: Default::default(),
        cache: None,
    });
    let buffer = |size, usage| {
        device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("bench copy"),
            size,
            usage,
            mapped_at_creation: false,
        })
    };
    let params = buffer(16, U::UNIFORM | U::COPY_DST);
    queue.write_buffer(
        &params,
        0,
        bytemuck::bytes_of(&CopyParams {
            vec4s: (bytes / 16) as u32,
            _pad: [0; 3],
        }),
    );
    let (src, dst) = (buffer(bytes, U::STORAGE), buffer(bytes, U::STORAGE));
    let bind = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("bench copy"),
        layout: &pipeline.get_bind_group_layout(0),
        entries: &[
            wgpu::BindGroupEntry {
                binding: 0,
                resource: params.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: 1,
                resource: src.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: 2,
                resource: dst.as_entire_binding(),
            },
        ],
    });
    let queries = device.create_query_set(&wgpu::QuerySetDescriptor {
        label: Some("bench copy"),
        ty: wgpu::QueryType::Timestamp,
        count: 2,
    });
    let resolve = buffer(16, U::QUERY_RESOLVE | U::COPY_SRC);
    let readback = buffer(16, U::MAP_READ | U::COPY_DST);
    let groups = (bytes / 16).div_ceil(256).clamp(1, 65535) as u32;
    let period = queue.get_timestamp_period() as f64;
    let kernel = median(reps, || {
        let mut encoder = device.create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("bench copy"),
                timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                    query_set: &queries,
                    beginning_of_pass_write_index: Some(0),
                    end_of_pass_write_index: Some(1),
                }),
            });
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind, &[]);
            pass.dispatch_workgroups(groups, 1, 1);
        }
        encoder.resolve_query_set(&queries, 0..2, &resolve, 0);
        encoder.copy_buffer_to_buffer(&resolve, 0, &readback, 0, 16);
        queue.submit([encoder.finish()]);
        let (tx, rx) = std::sync::mpsc::channel();
        readback.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        let fail = |e: String| NormError::Gpu {
            op: "timing the copy kernel",
            message: e,
        };
        device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| fail(e.to_string()))?;
        rx.recv()
            .map_err(|e| fail(e.to_string()))?
            .map_err(|e| fail(e.to_string()))?;
        let ticks: [u64; 2] = {
            let view = readback
                .slice(..)
                .get_mapped_range()
                .map_err(|e| fail(e.to_string()))?;
            bytemuck::pod_read_unaligned(&view[..16])
        };
        readback.unmap();
        let ns = ticks[1].saturating_sub(ticks[0]) as f64 * period;
        let d = Duration::from_nanos(ns as u64);
        Ok((d, Timing { kernel: Some(d) }))
    })?
    .1;
    Ok(kernel)
}

fn to_json(
    norm: &Normalizer,
    threads: usize,
    facts: &[ShapeFacts],
    records: &[Record],
    small: Option<(f64, f64)>,
) -> String {
    let num = |v: Option<f64>| v.map_or("null".to_string(), |v| format!("{v:.3}"));
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{{\n  \"backend\": {:?},\n  \"cpu_threads\": {threads},\n  \"shapes\": [",
        norm.describe()
    );
    let lines: Vec<String> = facts
        .iter()
        .map(|f| {
            format!(
                "    {{\"shape\": \"{}\", \"cpu_copy_1thread_gbps\": {:.3}, \"gpu_copy_kernel_gbps\": {}, \"upload_gbps\": {}, \"download_gbps\": {}}}",
                label(f.shape), f.cpu_copy, num(f.gpu_copy), num(f.upload), num(f.download)
            )
        })
        .collect();
    let _ = writeln!(s, "{}\n  ],\n  \"results\": [", lines.join(",\n"));
    let lines: Vec<String> = records
        .iter()
        .map(|r| {
            let bytes = op_bytes(r.shape);
            format!(
                "    {{\"op\": \"{}\", \"shape\": \"{}\", \"backend\": \"{}\", \"seconds\": {:.9}, \"gbps\": {:.3}, \"kernel_seconds\": {}, \"kernel_gbps\": {}}}",
                r.op, label(r.shape), r.backend, r.seconds, gbps(bytes, r.seconds),
                r.kernel.map_or("null".to_string(), |k| format!("{k:.9}")),
                num(r.kernel.map(|k| gbps(bytes, k)))
            )
        })
        .collect();
    let _ = write!(s, "{}\n  ]", lines.join(",\n"));
    if let Some((single, batched)) = small {
        let _ = write!(
            s,
            ",\n  \"small_batch\": {{\"shape\": \"{}\", \"op\": \"layer_norm\", \"per_op_seconds_end_to_end\": {single:.9}, \"per_op_seconds_batched\": {batched:.9}, \"ops_per_submission\": {BATCHED}}}",
            label(SMALL)
        );
    }
    let _ = writeln!(s, "\n}}");
    s
}

/// GB/s against shape on a log scale (so CPU, software and real GPUs share one chart): one
/// colour per op, grey for the copy ceilings; solid lines for the CPU, dashed for the GPU end to
/// end, dotted for GPU kernel time.
fn to_svg(norm: &Normalizer, facts: &[ShapeFacts], records: &[Record]) -> String {
    const SOLID: &str = "";
    const DASHED: &str = "8 4";
    const DOTTED: &str = "2 3";
    let (w, h, left, right, top, bottom) = (980.0, 560.0, 70.0, 270.0, 64.0, 60.0);
    // (legend, colour, dash, a value per shape)
    let mut series: Vec<(String, &str, &str, Vec<Option<f64>>)> = Vec::new();
    let at = |f: &dyn Fn(&ShapeFacts) -> Option<f64>| facts.iter().map(f).collect::<Vec<_>>();
    series.push((
        "copy ceiling, CPU 1 thread".into(),
        "#999999",
        SOLID,
        at(&|f| Some(f.cpu_copy)),
    ));
    if facts.iter().any(|f| f.gpu_copy.is_some()) {
        series.push((
            "copy ceiling, GPU kernel".into(),
            "#999999",
            DOTTED,
            at(&|f| f.gpu_copy),
        ));
    }
    let colours = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a"];
    for (k, op) in OPS
        .iter()
        .filter(|op| records.iter().any(|r| r.op == **op))
        .enumerate()
    {
        let colour = colours[k % colours.len()];
        for backend in ["cpu", "gpu"] {
            let find = |f: &ShapeFacts| {
                records
                    .iter()
                    .find(|r| r.op == *op && r.backend == backend && r.shape == f.shape)
            };
            if !facts.iter().any(|f| find(f).is_some()) {
                continue;
            }
            let dash = if backend == "cpu" { SOLID } else { DASHED };
            let whole = if backend == "cpu" {
                "CPU fallback"
            } else {
                "GPU end to end"
            };
            series.push((
                format!("{op}, {whole}"),
                colour,
                dash,
                at(&|f| find(f).map(|r| gbps(op_bytes(r.shape), r.seconds))),
            ));
            if facts
                .iter()
                .any(|f| find(f).is_some_and(|r| r.kernel.is_some()))
            {
                let kernel =
                    at(&|f| find(f).and_then(|r| r.kernel.map(|k| gbps(op_bytes(r.shape), k))));
                series.push((format!("{op}, GPU kernel"), colour, DOTTED, kernel));
            }
        }
    }
    let values: Vec<f64> = series
        .iter()
        .flat_map(|s| s.3.iter().flatten().copied())
        .filter(|v| *v > 0.0)
        .collect();
    let lo = values
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .log10()
        .floor();
    let hi = values
        .iter()
        .copied()
        .fold(0.0, f64::max)
        .log10()
        .ceil()
        .max(lo + 1.0);
    let plot_w = w - left - right;
    let plot_h = h - top - bottom;
    let x_of = |i: usize| left + plot_w * (i as f64 + 0.5) / facts.len().max(1) as f64;
    let y_of = |v: f64| top + plot_h * (1.0 - (v.log10() - lo) / (hi - lo));
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="24" font-size="15">gpunorm bench: GB/s (input read once + output written once) against shape</text>"#
    );
    let _ = writeln!(
        s,
        r##"<text x="{left}" y="44" fill="#555">{}; CPU fallback on {} threads</text>"##,
        escape(&norm.describe()),
        rayon::current_num_threads()
    );
    for e in (lo as i32)..=(hi as i32) {
        let v = 10f64.powi(e);
        let y = y_of(v);
        let tick = if v >= 1.0 {
            format!("{v:.0}")
        } else {
            format!("{v}")
        };
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#e4e4e4"/><text x="{}" y="{:.1}" text-anchor="end">{tick}</text>"##,
            left + plot_w,
            left - 6.0,
            y + 4.0
        );
    }
    for (i, f) in facts.iter().enumerate() {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            x_of(i),
            h - bottom + 20.0,
            label(f.shape)
        );
    }
    let mid = top + plot_h / 2.0;
    let _ = writeln!(
        s,
        r#"<text x="18" y="{mid:.1}" transform="rotate(-90 18 {mid:.1})" text-anchor="middle">GB/s (log scale)</text>"#
    );
    for (k, (name, colour, dash, points)) in series.iter().enumerate() {
        let dash = if dash.is_empty() {
            String::new()
        } else {
            format!(r#" stroke-dasharray="{dash}""#)
        };
        let path: Vec<(f64, f64)> = points
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.filter(|v| *v > 0.0).map(|v| (x_of(i), y_of(v))))
            .collect();
        if path.is_empty() {
            continue;
        }
        let line: Vec<String> = path.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>"#,
            line.join(" ")
        );
        for (x, y) in &path {
            let _ = writeln!(
                s,
                r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{colour}"/>"#
            );
        }
        let (lx, ly) = (w - right + 20.0, top + 18.0 * k as f64);
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" x2="{}" y1="{ly}" y2="{ly}" stroke="{colour}" stroke-width="2"{dash}/><text x="{}" y="{}">{}</text>"#,
            lx + 28.0,
            lx + 34.0,
            ly + 4.0,
            escape(name)
        );
    }
    let _ = writeln!(s, "</svg>");
    s
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
