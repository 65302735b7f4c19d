//! The `gpunorm` command: which backend is here (`info`), a worked example of LayerNorm and
//! BatchNorm on a padded batch (`demo`), a validation of a large random batch against the f64
//! reference with CPU-vs-GPU timings (`check`), and a benchmark sweep (`bench`).

mod bench;
mod check;
mod demo;
mod error;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gpunorm::Normalizer;

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
    #[arg(long, global = true, conflicts_with = "gpu")]
    cpu: bool,
    /// Use the GPU adapter wgpu finds even where it is a software one (llvmpipe), which the
    /// default passes over for the faster CPU fallback.
    #[arg(long, global = true)]
    gpu: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Print the backend: adapter name, API, device type, driver and limits.
    Info,
    /// A worked example: two sequences of four tokens, d_model 3, the last position padded,
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
    /// Sweep shapes and ops: CPU fallback and GPU (end to end and kernel time) beside the copy
    /// ceilings of the same run, and upload and download speeds.
    Bench {
        /// Shapes as ROWSxFEATURES, comma-separated.
        #[arg(long, value_delimiter = ',', value_parser = bench::parse_shape,
              default_value = "4096x768,65536x1024,16384x4096,2048x32768")]
        shapes: Vec<(usize, usize)>,
        /// Ops to run, comma-separated.
        #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(bench::OPS),
              default_value = "layer_norm,layer_norm_alloc,rms_norm,batch_norm_train,batch_norm_eval")]
        ops: Vec<String>,
        /// Element type of the tensors: f32, or f16 / bf16 (statistics in f32 inside). GB/s
        /// counts the bytes of that type.
        #[arg(long, default_value = "f32", value_parser = ["f32", "f16", "bf16"])]
        dtype: String,
        /// Timed runs per case (after one untimed warm-up); the median is reported.
        #[arg(long, default_value_t = 9, value_parser = clap::value_parser!(u16).range(1..))]
        reps: u16,
        /// Also time LayerNorm per op on a small 4096x768 batch and on decode-shaped 1x4096 and
        /// 8x4096 rows: one submission each, and 64 recorded into one submission on GPU tensors.
        #[arg(long)]
        small_batch: bool,
        /// Threads of the CPU fallback (default: one per core).
        #[arg(long)]
        threads: Option<usize>,
        /// Time the GPU alone, not the CPU fallback beside it (for kernel variants compared on
        /// one machine).
        #[arg(long)]
        gpu_only: bool,
        /// Also write the figures as JSON to this file.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
        /// Also draw GB/s against shape for each op, CPU and GPU, with the copy ceilings, as SVG.
        #[arg(long)]
        plot: Option<std::path::PathBuf>,
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

fn run(cli: Cli) -> error::CliResult<()> {
    if let Some(Command::Bench {
        threads: Some(t), ..
    }) = &cli.command
    {
        // The global pool is built once, before the first parallel call.
        if let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(*t)
            .build_global()
        {
            log::warn!("could not set {t} CPU threads: {e}");
        }
    }
    let norm = if cli.cpu {
        Normalizer::cpu()
    } else if cli.gpu {
        Normalizer::gpu()?
    } else {
        Normalizer::new()?
    };
    match cli.command {
        Some(Command::Info) => Ok(demo::info(&norm)?),
        Some(Command::Demo) => Ok(demo::demo(&norm)?),
        Some(Command::Check {
            rows,
            features,
            seed,
        }) => check::check(&norm, rows, features, seed),
        Some(Command::Bench {
            shapes,
            ops,
            dtype,
            reps,
            small_batch,
            gpu_only,
            json,
            plot,
            ..
        }) => bench::run(
            &norm,
            &bench::Options {
                shapes,
                ops,
                dtype: bench::Dtype::parse(&dtype),
                reps: reps as usize,
                small_batch,
                gpu_only,
                json,
                plot,
            },
        ),
        None => {
            demo::info(&norm)?;
            demo::demo(&norm)?;
            check::check(&norm, 16384, 1024, 42)
        }
    }
}
