//! `gpunorm bench`: a sweep over shapes and ops — CPU fallback and GPU (end to end and kernel
//! time) — beside the single-thread copy bandwidth of the same run, printed as a table and
//! optionally written as JSON. GB/s counts the input read once and the output written once.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use gpunorm::{BatchNorm, LayerNorm, NormError, Normalizer, RunningStats, Timing};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The ops a sweep can run.
pub const OPS: &[&str] = &["layer_norm", "batch_norm_train", "batch_norm_eval"];

pub struct Options {
    pub shapes: Vec<(usize, usize)>,
    pub ops: Vec<String>,
    pub reps: usize,
    pub json: Option<std::path::PathBuf>,
}

/// One measured (op, shape, backend).
struct Record {
    op: String,
    rows: usize,
    features: usize,
    backend: &'static str,
    /// Median wall clock of the whole call, output buffer preallocated.
    seconds: f64,
    /// Median GPU kernel time, where timestamps exist.
    kernel: Option<f64>,
}

pub fn parse_shape(s: &str) -> Result<(usize, usize), String> {
    let (r, f) = s
        .split_once('x')
        .ok_or(format!("shape {s:?} is not ROWSxFEATURES, e.g. 4096x768"))?;
    let num = |v: &str| {
        v.trim()
            .parse::<usize>()
            .map_err(|e| format!("shape {s:?}: {e}"))
    };
    Ok((num(r)?, num(f)?))
}

pub fn run(norm: &Normalizer, opts: &Options) -> Result<(), NormError> {
    let cpu = Normalizer::cpu();
    let threads = rayon::current_num_threads();
    println!(
        "bench: {} | CPU fallback on {threads} threads | median of {} runs",
        norm.describe(),
        opts.reps
    );
    println!("  GB/s counts input read once + output written once; copy = single-thread memcpy, same run");
    println!(
        "  {:<17} {:>12} {:>8} {:>11} {:>9} {:>8} {:>11} {:>9}",
        "op", "shape", "backend", "ms", "GB/s", "% copy", "kernel ms", "kern GB/s"
    );
    let mut records = Vec::new();
    let mut copies = Vec::new();
    for &(rows, features) in &opts.shapes {
        let n = rows * features;
        let bytes = (2 * n * 4) as f64;
        let x = input(n);
        let mut y = vec![1f32; n];
        let copy = median(opts.reps, || {
            let t = Instant::now();
            y.copy_from_slice(&x);
            Ok((t.elapsed(), Timing::default()))
        })?
        .0;
        let copy_gbps = bytes / copy / 1e9;
        copies.push((rows, features, copy_gbps));
        println!(
            "  {:<17} {:>12} {:>8} {:>11.3} {:>9.2} {:>8}",
            "copy (1 thread)",
            format!("{rows}x{features}"),
            "cpu",
            copy * 1e3,
            copy_gbps,
            "100%"
        );
        for op in &opts.ops {
            let backends: Vec<(&'static str, &Normalizer)> = if norm.is_gpu() {
                vec![("cpu", &cpu), ("gpu", norm)]
            } else {
                vec![("cpu", &cpu)]
            };
            for (backend, nz) in backends {
                let (seconds, kernel) = median(opts.reps, || run_op(nz, op, &x, &mut y, features))?;
                let gbps = bytes / seconds / 1e9;
                let (k_ms, k_gbps) = match kernel {
                    Some(k) => (format!("{:.3}", k * 1e3), format!("{:.2}", bytes / k / 1e9)),
                    None => ("-".into(), "-".into()),
                };
                println!("  {op:<17} {:>12} {backend:>8} {:>11.3} {gbps:>9.2} {:>7.0}% {k_ms:>11} {k_gbps:>9}", format!("{rows}x{features}"), seconds * 1e3, 100.0 * gbps / copy_gbps);
                records.push(Record {
                    op: op.clone(),
                    rows,
                    features,
                    backend,
                    seconds,
                    kernel,
                });
            }
        }
    }
    if let Some(path) = &opts.json {
        let json = to_json(norm, threads, &copies, &records);
        std::fs::write(path, json).map_err(|e| NormError::Gpu {
            op: "writing the JSON report",
            message: format!("{}: {e}", path.display()),
        })?;
        println!("  wrote {}", path.display());
    }
    Ok(())
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
        other => unreachable!("op {other} was validated by the parser"),
    };
    Ok((t.elapsed(), timing))
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

/// Activations like the anchors': standard normal plus 3.
fn input(n: usize) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(0);
    (0..n)
        .map(|_| rng.random_range(-1.7f32..1.7) + 3.0)
        .collect()
}

fn to_json(
    norm: &Normalizer,
    threads: usize,
    copies: &[(usize, usize, f64)],
    records: &[Record],
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{{\n  \"backend\": {:?},\n  \"cpu_threads\": {threads},\n  \"copy_1thread_gbps\": [",
        norm.describe()
    );
    let lines: Vec<String> = copies
        .iter()
        .map(|(r, f, g)| format!("    {{\"shape\": \"{r}x{f}\", \"gbps\": {g:.3}}}"))
        .collect();
    let _ = writeln!(s, "{}\n  ],\n  \"results\": [", lines.join(",\n"));
    let lines: Vec<String> = records
        .iter()
        .map(|r| {
            let bytes = (2 * r.rows * r.features * 4) as f64;
            let kernel = r.kernel.map_or("null".to_string(), |k| format!("{k:.9}"));
            let kernel_gbps = r.kernel.map_or("null".to_string(), |k| format!("{:.3}", bytes / k / 1e9));
            format!(
                "    {{\"op\": \"{}\", \"shape\": \"{}x{}\", \"backend\": \"{}\", \"seconds\": {:.9}, \"gbps\": {:.3}, \"kernel_seconds\": {kernel}, \"kernel_gbps\": {kernel_gbps}}}",
                r.op, r.rows, r.features, r.backend, r.seconds, bytes / r.seconds / 1e9
            )
        })
        .collect();
    let _ = writeln!(s, "{}\n  ]\n}}", lines.join(",\n"));
    s
}
