//! `gpunorm bench`: a sweep over shapes and ops. For each shape: the copy ceilings of the same
//! run (single-thread memcpy on the CPU; a vec4 copy kernel on the GPU), the CPU fallback, the GPU
//! end to end and kernel only, upload and download speeds; on request, the per-op cost of a small
//! batch and of decode-shaped rows, alone and recorded 64 to a submission. Printed as a table, optionally written as JSON
//! and drawn as an SVG chart. GB/s counts the input read once and the output written once.
//!
//! Every figure is warm: each case runs once untimed (pipelines built, buffers pooled, pages
//! touched) before its timed runs.

mod chart;
mod copy;
mod measure;

use std::io::IsTerminal;
use std::path::PathBuf;

use gpunorm::Normalizer;
use serde::Serialize;

use crate::error::{CliError, CliResult};
use measure::Op;

/// The ops a sweep can run: the `*_into` forms into a reused buffer, `*_alloc`, the forms
/// that return a new `Vec` each call (the backward passes take dy = x), the training steps
/// (new `Vec`s) and the fused add (new `Vec`s, residual = x).
pub const OPS: &[&str] = &[
    "layer_norm",
    "layer_norm_alloc",
    "rms_norm",
    "rms_norm_alloc",
    "layer_norm_backward",
    "layer_norm_backward_alloc",
    "layer_norm_step",
    "layer_norm_step_saved",
    "rms_norm_backward",
    "rms_norm_backward_alloc",
    "add_layer_norm",
    "batch_norm_backward",
    "batch_norm_backward_alloc",
    "batch_norm_train",
    "batch_norm_train_alloc",
    "batch_norm_eval",
    "batch_norm_eval_alloc",
];

pub struct Options {
    pub shapes: Vec<(usize, usize)>,
    pub ops: Vec<String>,
    pub dtype: Dtype,
    pub reps: usize,
    pub small_batch: bool,
    pub gpu_only: bool,
    pub json: Option<PathBuf>,
    pub plot: Option<PathBuf>,
}

/// The element type a sweep runs its ops on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    Bf16,
}

impl Dtype {
    /// One of `--dtype`'s values (checked by the argument parser).
    pub fn parse(name: &str) -> Dtype {
        match name {
            "f32" => Dtype::F32,
            "f16" => Dtype::F16,
            "bf16" => Dtype::Bf16,
            other => unreachable!("dtype {other} was checked by the argument parser"),
        }
    }

    /// Bytes per value.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
    }
}

/// One measured (op, shape, backend): median wall clock of the whole call, and median kernel
/// time where timestamps exist.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub op: String,
    /// The element type of x and the outputs ("f32", "f16", "bf16").
    pub dtype: &'static str,
    pub shape: String,
    pub rows: usize,
    pub features: usize,
    pub backend: &'static str,
    pub seconds: f64,
    pub gbps: f64,
    pub kernel_seconds: Option<f64>,
    pub kernel_gbps: Option<f64>,
}

/// The ceilings and transfer speeds of one shape, in GB/s.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ShapeFacts {
    pub shape: String,
    pub rows: usize,
    pub features: usize,
    pub cpu_copy_1thread_gbps: f64,
    pub gpu_copy_kernel_gbps: Option<f64>,
    pub upload_gbps: Option<f64>,
    pub download_gbps: Option<f64>,
}

/// The per-op cost of LayerNorm on one small shape.
#[derive(Debug, Clone, Serialize)]
pub struct SmallBatch {
    pub shape: String,
    pub op: &'static str,
    pub per_op_seconds_end_to_end: f64,
    pub per_op_seconds_batched: f64,
    /// Of the batched cost, the host's share: recording the ops, nothing submitted.
    pub per_op_seconds_recording: f64,
    pub ops_per_submission: usize,
}

/// Everything one run measured, as written to `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub backend: String,
    pub cpu_threads: usize,
    pub reps: usize,
    pub shapes: Vec<ShapeFacts>,
    pub results: Vec<Record>,
    pub small_batch: Vec<SmallBatch>,
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

pub fn label(shape: (usize, usize)) -> String {
    format!("{}x{}", shape.0, shape.1)
}

pub fn gbps(bytes: f64, seconds: f64) -> f64 {
    bytes / seconds / 1e9
}

/// Input + output bytes of a normalization of `shape`.
pub fn op_bytes(shape: (usize, usize)) -> f64 {
    (2 * shape.0 * shape.1 * 4) as f64
}

/// A ratio with three significant digits, however small: 12.3x, 1.05x, 0.00421x.
pub fn ratio(r: f64) -> String {
    let digits = if r > 0.0 && r.is_finite() {
        (2 - r.log10().floor() as i32).clamp(2, 9) as usize
    } else {
        2
    };
    format!("{r:.digits$}x")
}

pub fn run(norm: &Normalizer, opts: &Options) -> CliResult<()> {
    // A report that cannot be written is found now, not after the whole sweep.
    for path in opts.json.iter().chain(&opts.plot) {
        std::fs::File::create(path).map_err(|e| CliError::file(path, e))?;
    }
    let fallback = Normalizer::cpu();
    let gpu = norm.is_gpu().then_some(norm);
    let cpu = (!opts.gpu_only || gpu.is_none()).then_some(&fallback);
    let ops: Vec<Op> = opts.ops.iter().map(|o| Op::parse(o)).collect();
    print_header(norm, opts.reps, opts.dtype);
    let mut progress = Progress::new(
        opts.shapes.len() * ops.len() * (cpu.is_some() as usize + gpu.is_some() as usize),
    );
    let mut report = Report {
        backend: norm.describe(),
        cpu_threads: rayon::current_num_threads(),
        reps: opts.reps,
        shapes: Vec::new(),
        results: Vec::new(),
        small_batch: Vec::new(),
    };
    for &shape in &opts.shapes {
        let x = measure::input(crate::error::values(shape.0, shape.1)?)?;
        let facts = measure::ceilings(gpu, shape, &x, opts.dtype.size(), opts.reps)?;
        print_ceilings(&facts);
        for op in &ops {
            let backends = [cpu.map(|c| ("cpu", c)), gpu.map(|g| ("gpu", g))];
            for (backend, nz) in backends.into_iter().flatten() {
                progress.step(&format!("{} {} {backend}", op.name(), label(shape)));
                let record = match opts.dtype {
                    Dtype::F32 => measure::op::<f32>(nz, backend, *op, shape, &x, opts.reps)?,
                    Dtype::F16 => {
                        measure::op::<gpunorm::half::f16>(nz, backend, *op, shape, &x, opts.reps)?
                    }
                    Dtype::Bf16 => {
                        measure::op::<gpunorm::half::bf16>(nz, backend, *op, shape, &x, opts.reps)?
                    }
                };
                print_record(&record, &facts);
                report.results.push(record);
            }
        }
        print_transfers(&facts);
        report.shapes.push(facts);
    }
    progress.done();
    print_speedups(&report.results);
    if let (Some(g), true) = (gpu, opts.small_batch) {
        for shape in measure::SMALL {
            report
                .small_batch
                .push(measure::small_batch(g, shape, opts.reps)?);
        }
    }
    write_outputs(&report, opts)
}

fn write_outputs(report: &Report, opts: &Options) -> CliResult<()> {
    if let Some(path) = &opts.json {
        let text = serde_json::to_string_pretty(report).expect("a report serializes");
        std::fs::write(path, text + "\n").map_err(|e| CliError::file(path, e))?;
        println!("  wrote {}", path.display());
    }
    if let Some(path) = &opts.plot {
        chart::draw(report, path).map_err(|e| CliError::file(path, std::io::Error::other(e)))?;
        println!("  drew {}", path.display());
    }
    Ok(())
}

/// One line per case on stderr: rewritten in place on a terminal, one after another when piped
/// (so a log shows how far a long sweep got).
struct Progress {
    total: usize,
    done: usize,
    terminal: bool,
}

impl Progress {
    fn new(total: usize) -> Progress {
        Progress {
            total,
            done: 0,
            terminal: std::io::stderr().is_terminal(),
        }
    }

    fn step(&mut self, what: &str) {
        self.done += 1;
        if self.terminal {
            eprint!("\r  [{}/{}] {what:<50}", self.done, self.total);
        } else {
            eprintln!("  [{}/{}] {what}", self.done, self.total);
        }
    }

    fn done(&self) {
        if self.terminal {
            eprint!("\r{:70}\r", "");
        }
    }
}

fn print_header(norm: &Normalizer, reps: usize, dtype: Dtype) {
    println!(
        "bench: {} | CPU fallback on {} threads | {} tensors | median of {reps} warm runs",
        norm.describe(),
        rayon::current_num_threads(),
        dtype.name()
    );
    if dtype != Dtype::F32 {
        println!(
            "  GB/s counts {0}'s bytes; kernel GB/s too for the LayerNorm family (its kernels read \
             and write {0} rows of even length), f32's for BatchNorm (widened on the GPU).",
            dtype.name()
        );
    }
    println!("  GB/s counts input read once + output written once (backward: x and dy read, dx");
    println!(
        "  written; add_layer_norm: x and residual read, sum and y written). % ceil: CPU rows"
    );
    println!(
        "  against the single-thread memcpy, GPU kernel times against the copy kernel, both of the"
    );
    println!(
        "  same bytes in this run. *_alloc ops return a new Vec per call, as the backward and"
    );
    println!("  add ops do; the others write into a reused buffer.");
    println!(
        "  {:<22} {:>12} {:>8} {:>10} {:>9} {:>9} {:>10} {:>9} {:>9}",
        "op", "shape", "backend", "ms", "GB/s", "% ceil", "kernel ms", "kern GB/s", "% ceil"
    );
}

fn print_ceilings(f: &ShapeFacts) {
    println!(
        "  {:<22} {:>12} {:>8} {:>10} {:>9.2} {:>9}",
        "copy (1 thread)", f.shape, "cpu", "", f.cpu_copy_1thread_gbps, "100%"
    );
    if let Some(c) = f.gpu_copy_kernel_gbps {
        println!(
            "  {:<22} {:>12} {:>8} {:>10} {:>9} {:>9} {:>10} {c:>9.2} {:>9}",
            "copy kernel", f.shape, "gpu", "", "", "", "", "100%"
        );
    }
}

fn print_record(r: &Record, f: &ShapeFacts) {
    let ceiling = if r.backend == "cpu" {
        format!("{:.0}%", 100.0 * r.gbps / f.cpu_copy_1thread_gbps)
    } else {
        String::new()
    };
    let (k_ms, k_rate, k_ceil) = match (r.kernel_seconds, r.kernel_gbps) {
        (Some(k), Some(rate)) => (
            format!("{:.3}", k * 1e3),
            format!("{rate:.2}"),
            f.gpu_copy_kernel_gbps
                .map_or(String::new(), |c| format!("{:.0}%", 100.0 * rate / c)),
        ),
        _ => Default::default(),
    };
    println!(
        "  {:<22} {:>12} {:>8} {:>10.3} {:>9.2} {ceiling:>9} {k_ms:>10} {k_rate:>9} {k_ceil:>9}",
        r.op,
        r.shape,
        r.backend,
        r.seconds * 1e3,
        r.gbps
    );
}

fn print_transfers(f: &ShapeFacts) {
    if let (Some(up), Some(down)) = (f.upload_gbps, f.download_gbps) {
        println!(
            "  {:<22} {:>12} {:>8} upload {up:.2} GB/s, download {down:.2} GB/s",
            "transfers", f.shape, "gpu"
        );
    }
}

/// GPU-vs-CPU speedups, end to end and kernel only, per (op, shape).
fn print_speedups(records: &[Record]) {
    for g in records.iter().filter(|r| r.backend == "gpu") {
        let Some(c) = records
            .iter()
            .find(|c| c.backend == "cpu" && c.op == g.op && c.shape == g.shape)
        else {
            continue;
        };
        let kernel = g.kernel_seconds.map_or(String::new(), |k| {
            format!(", kernel only {}", ratio(c.seconds / k))
        });
        println!(
            "  {:<22} {:>12}  GPU vs CPU fallback: end to end {}{kernel}",
            g.op,
            g.shape,
            ratio(c.seconds / g.seconds)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_keep_three_significant_digits() {
        assert_eq!(ratio(12.345), "12.35x");
        assert_eq!(ratio(1.0), "1.00x");
        assert_eq!(ratio(0.0421), "0.0421x");
        assert_eq!(ratio(0.000_421), "0.000421x");
    }

    #[test]
    fn shapes_parse_or_say_why_not() {
        assert_eq!(parse_shape("4096x768"), Ok((4096, 768)));
        assert!(parse_shape("4096").is_err());
        assert!(parse_shape("0x768").is_err());
    }
}
