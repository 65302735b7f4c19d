//! The `gpunorm` command: which backend is here, the seed document's worked example, and a
//! validation of a large random batch against the f64 reference with CPU-vs-GPU timings.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use gpunorm::{mask_from_lengths, reference, BatchNorm, LayerNorm, NormError, Normalizer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Parser)]
#[command(
    name = "gpunorm",
    version,
    about = "LayerNorm and BatchNorm on any GPU wgpu reaches, checked against an f64 CPU reference",
    long_about = "LayerNorm and BatchNorm on any GPU wgpu reaches, checked against an f64 CPU \
                  reference.\n\nWith no subcommand: info, then demo, then check."
)]
struct Cli {
    /// Use the CPU fallback even where a GPU exists.
    #[arg(long, global = true)]
    cpu: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Print the backend: adapter name, API, device type, driver and limits.
    Info,
    /// Run the seed document's worked example (two sequences, d_model 3, one padded position)
    /// through LayerNorm, BatchNorm, and BatchNorm with the pad masked out.
    Demo,
    /// Validate LayerNorm and BatchNorm on a random batch against the f64 reference and time the
    /// CPU fallback and the GPU.
    Check {
        /// Rows of the batch.
        #[arg(long, default_value_t = 16384)]
        rows: usize,
        /// Features per row.
        #[arg(long, default_value_t = 1024)]
        features: usize,
        /// Seed of the random batch.
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpunorm: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), NormError> {
    let norm = if cli.cpu {
        Normalizer::cpu()
    } else {
        Normalizer::new()?
    };
    match cli.command {
        Some(Command::Info) => info(&norm),
        Some(Command::Demo) => demo(&norm),
        Some(Command::Check {
            rows,
            features,
            seed,
        }) => check(&norm, rows, features, seed),
        None => {
            info(&norm)?;
            demo(&norm)?;
            check(&norm, 16384, 1024, 42)
        }
    }
}

fn info(norm: &Normalizer) -> Result<(), NormError> {
    println!("backend: {}", norm.describe());
    if let Some(a) = norm.adapter_info() {
        println!(
            "  api {:?}, device type {:?}, vendor {:#06x}, device {:#06x}",
            a.backend, a.device_type, a.vendor, a.device
        );
        println!(
            "  kernel timestamps: {}",
            if norm.has_kernel_timing() {
                "yes"
            } else {
                "no"
            }
        );
    } else {
        println!("  no GPU in use: ops run on the CPU fallback");
    }
    println!();
    Ok(())
}

/// The seed's batch: two sequences of up to four words, d_model 3, the last position padded.
const SEED_WORDS: [(&str, [f32; 3]); 8] = [
    ("I", [1., 2., 3.]),
    ("love", [2., 4., 6.]),
    ("deep", [3., 6., 9.]),
    ("learning", [4., 8., 12.]),
    ("Transformers", [5., 10., 15.]),
    ("are", [6., 12., 18.]),
    ("powerful", [7., 13., 19.]),
    ("<pad>", [0., 0., 0.]),
];

fn demo(norm: &Normalizer) -> Result<(), NormError> {
    let x: Vec<f32> = SEED_WORDS.iter().flat_map(|(_, v)| *v).collect();
    let y = norm.layer_norm(&x, 3, &LayerNorm::default())?;
    println!(
        "LayerNorm of the seed's batch (each position over its own 3 features) on {}:",
        backend_name(norm)
    );
    println!("  {:<13} {:>24}   {:>26}", "position", "x", "y");
    for ((word, v), out) in SEED_WORDS.iter().zip(y.chunks(3)) {
        println!("  {word:<13} {:>24}   {:>26}", fmt3(v), fmt3(out));
    }
    println!("  the seed's values: \"I\" -> [-1.22, 0, 1.22] (it rounds std to 0.81 and writes -1.23); <pad> -> [0, 0, 0]");
    println!("  every position is normalized alone, so the padded one neither moves nor is moved.");
    println!();

    let all = norm.batch_norm_train(&x, 3, &BatchNorm::default())?;
    let mask = mask_from_lengths(&[4, 3], 4)?;
    let masked = norm.batch_norm_train(
        &x,
        3,
        &BatchNorm {
            mask: Some(&mask),
            ..Default::default()
        },
    )?;
    println!("BatchNorm of the same batch: feature 1 normalized over all 8 positions");
    println!(
        "  {:<13} {:>8}   {:>14}   {:>14}",
        "position", "x[1]", "pad counted", "pad masked"
    );
    for (i, (word, v)) in SEED_WORDS.iter().enumerate() {
        println!(
            "  {word:<13} {:>8.2}   {:>14.2}   {:>14.2}",
            v[0],
            all.y[3 * i],
            masked.y[3 * i]
        );
    }
    println!(
        "  {:<13} {:>8}   {:>14.2}   {:>14.2}",
        "mean", "", all.mean[0], masked.mean[0]
    );
    println!(
        "  {:<13} {:>8}   {:>14.2}   {:>14.2}",
        "std",
        "",
        all.var[0].sqrt(),
        masked.var[0].sqrt()
    );
    println!("  the seed's values with the pad counted: mean 3.5, std 2.29, \"I\" -> -1.09, \"powerful\" -> 1.52 (3.5 / 2.29 = 1.528, truncated)");
    println!(
        "  the pad drags the mean from 4 to 3.5 and widens the std from 2 to 2.29: every real"
    );
    println!(
        "  token's value shifts. With the mask (mask_from_lengths(&[4, 3], 4)) the pad is left out"
    );
    println!(
        "  of the statistics ({} positions counted instead of {}) and its output is 0.",
        masked.count, all.count
    );
    println!();
    Ok(())
}

fn fmt3(v: &[f32]) -> String {
    format!("[{:>6.2}, {:>6.2}, {:>6.2}]", v[0], v[1], v[2])
}

fn backend_name(norm: &Normalizer) -> &'static str {
    if norm.is_gpu() {
        "the GPU"
    } else {
        "the CPU fallback"
    }
}

fn check(norm: &Normalizer, rows: usize, features: usize, seed: u64) -> Result<(), NormError> {
    let n = rows
        .checked_mul(features)
        .filter(|&n| n > 0)
        .ok_or(NormError::ZeroDimension {
            name: "rows × features",
        })?;
    let mut rng = StdRng::seed_from_u64(seed);
    let x: Vec<f32> = (0..n).map(|_| rng.random_range(-3.0f32..4.0)).collect();
    let gamma: Vec<f32> = (0..features)
        .map(|_| rng.random_range(0.5f32..1.5))
        .collect();
    let beta: Vec<f32> = (0..features)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let opts = LayerNorm {
        gamma: Some(&gamma),
        beta: Some(&beta),
        ..Default::default()
    };
    let mb = (2 * n * 4) as f64 / 1e9;
    println!("check: LayerNorm of a random {rows} x {features} batch ({n} values, gamma and beta)");
    println!("  (GB/s counts the input read once and the output written once)");

    let r = reference::layer_norm(&x, features, opts.eps, opts.gamma, opts.beta);
    let cpu = Normalizer::cpu();
    let (y_cpu, t_cpu) = timed(|| cpu.layer_norm(&x, features, &opts))?;
    println!(
        "  CPU fallback: max error {:.2e}, {:>9.2} ms end to end ({:.1} GB/s)",
        reference::max_error(&y_cpu, &r),
        ms(t_cpu),
        mb / t_cpu.as_secs_f64()
    );
    if norm.is_gpu() {
        // The first call builds the pipeline; time the second.
        norm.layer_norm(&x[..features], features, &opts)?;
        let ((y_gpu, timing), t_gpu) = timed(|| norm.layer_norm_timed(&x, features, &opts))?;
        println!(
            "  GPU:          max error {:.2e}, {:>9.2} ms end to end ({:.1} GB/s)",
            reference::max_error(&y_gpu, &r),
            ms(t_gpu),
            mb / t_gpu.as_secs_f64()
        );
        if let Some(k) = timing.kernel {
            println!(
                "                kernel {:.3} ms ({:.1} GB/s)",
                ms(k),
                mb / k.as_secs_f64()
            );
        }
        println!(
            "  GPU vs CPU fallback, end to end: {:.2}x",
            t_cpu.as_secs_f64() / t_gpu.as_secs_f64()
        );
    } else {
        println!("  no GPU: only the CPU fallback was checked");
    }

    println!(
        "check: BatchNorm (training) of the same batch, statistics per feature over {rows} rows"
    );
    let bn = BatchNorm {
        gamma: Some(&gamma),
        beta: Some(&beta),
        ..Default::default()
    };
    let (r, mean, var, _) = reference::batch_norm_train(&x, features, &bn);
    let (out_cpu, t_cpu) = timed(|| cpu.batch_norm_train(&x, features, &bn))?;
    let stat_err =
        |m: &[f32], v: &[f32]| reference::max_error(m, &mean).max(reference::max_error(v, &var));
    println!(
        "  CPU fallback: max error {:.2e} (statistics {:.2e}), {:>9.2} ms end to end ({:.1} GB/s)",
        reference::max_error(&out_cpu.y, &r),
        stat_err(&out_cpu.mean, &out_cpu.var),
        ms(t_cpu),
        mb / t_cpu.as_secs_f64()
    );
    if norm.is_gpu() {
        norm.batch_norm_train(&x[..features], features, &bn)?;
        let ((out, timing), t_gpu) = timed(|| norm.batch_norm_train_timed(&x, features, &bn))?;
        println!("  GPU:          max error {:.2e} (statistics {:.2e}), {:>9.2} ms end to end ({:.1} GB/s)",
            reference::max_error(&out.y, &r), stat_err(&out.mean, &out.var), ms(t_gpu), mb / t_gpu.as_secs_f64());
        if let Some(k) = timing.kernel {
            println!(
                "                kernel {:.3} ms ({:.1} GB/s)",
                ms(k),
                mb / k.as_secs_f64()
            );
        }
        println!(
            "  GPU vs CPU fallback, end to end: {:.2}x",
            t_cpu.as_secs_f64() / t_gpu.as_secs_f64()
        );
    }
    println!("  (error = max |y - ref| / max(1, |ref|) against the f64 reference; the tests hold it below 1e-4)");
    Ok(())
}

fn timed<T>(f: impl FnOnce() -> Result<T, NormError>) -> Result<(T, Duration), NormError> {
    let start = Instant::now();
    let v = f()?;
    Ok((v, start.elapsed()))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
