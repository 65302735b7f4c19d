//! `gpunorm check`: LayerNorm, RMSNorm, LayerNorm's backward pass (recomputing its statistics,
//! and through those the forward saved), BatchNorm and its backward
//! pass of a large random batch against the f64 reference, with CPU-fallback and GPU times.

use std::time::{Duration, Instant};

use gpunorm::{reference, BatchNorm, LayerNorm, NormError, Normalizer, RmsNorm, Timing};

use crate::error::{self, CliResult};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One backend's run of one op: its error against the reference, and its times.
struct Case {
    error: f64,
    /// The error of what else the op returns, and what that is.
    stats_error: Option<(&'static str, f64)>,
    wall: Duration,
    timing: Timing,
}

pub fn check(norm: &Normalizer, rows: usize, features: usize, seed: u64) -> CliResult<()> {
    let n = error::values(rows, features)?;
    // x, y and the f64 reference: refused up front when the memory is not there, rather than
    // aborted on in the allocator.
    let mut rng = StdRng::seed_from_u64(seed);
    let mut x = error::filled(n, 0f32, "the input")?;
    x.iter_mut()
        .for_each(|v| *v = rng.random_range(-3.0f32..4.0));
    let mut y = error::filled(n, 0f32, "the output")?;
    error::filled(n, 0f64, "the f64 reference")?;
    let gamma: Vec<f32> = (0..features)
        .map(|_| rng.random_range(0.5f32..1.5))
        .collect();
    let beta: Vec<f32> = (0..features)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let gb = (2 * n * 4) as f64 / 1e9;
    let cpu = Normalizer::cpu();
    let gpu = norm.is_gpu().then_some(norm);
    // A few rows build pipelines and pool buffers outside the timed call.
    let warm = &x[..(2 * features).min(n)];

    println!("check: LayerNorm of a random {rows} x {features} batch ({n} values, gamma and beta)");
    println!("  (GB/s counts the input read once and the output written once)");
    let ln = LayerNorm {
        gamma: Some(&gamma),
        beta: Some(&beta),
        ..Default::default()
    };
    let r = reference::layer_norm(&x, features, &ln);
    let mut run_ln = |nz: &Normalizer| {
        row_case(nz, (&x, warm), &mut y, &r, |nz, x, y| {
            nz.layer_norm_into(x, features, &ln, y)
        })
    };
    report(run_ln(&cpu)?, gpu.map(&mut run_ln).transpose()?, gb);
    drop(r);

    println!("check: RMSNorm of the same batch (gamma)");
    let rms = RmsNorm {
        gamma: Some(&gamma),
        ..Default::default()
    };
    let r = reference::rms_norm(&x, features, &rms);
    let mut run_rms = |nz: &Normalizer| {
        row_case(nz, (&x, warm), &mut y, &r, |nz, x, y| {
            nz.rms_norm_into(x, features, &rms, y)
        })
    };
    report(run_rms(&cpu)?, gpu.map(&mut run_rms).transpose()?, gb);
    drop(r);

    check_layer_norm_backward((&cpu, gpu), (&x, warm), &mut rng, features, &ln)?;
    let bn = BatchNorm {
        gamma: Some(&gamma),
        beta: Some(&beta),
        ..Default::default()
    };
    check_batch_norm((&cpu, gpu), (&x, warm, &mut y), rows, features, &bn)?;
    check_backward(
        (&cpu, gpu),
        (&x, warm),
        &mut rng,
        "BatchNorm backward (through the batch statistics)",
        |x, dy| reference::batch_norm_backward(x, dy, features, &bn),
        |nz, x, dy| {
            let g = nz.batch_norm_backward(x, dy, features, &bn)?;
            Ok((g.dx, g.dgamma, g.dbeta))
        },
    )?;
    println!("  (error = max |y - ref| / max(1, |ref|) against the f64 reference; the tests hold it below 1e-4)");
    Ok(())
}

/// LayerNorm's backward pass on each backend, recomputing its statistics and then through those
/// its forward saved.
fn check_layer_norm_backward(
    (cpu, gpu): (&Normalizer, Option<&Normalizer>),
    (x, warm): (&[f32], &[f32]),
    rng: &mut StdRng,
    features: usize,
    ln: &LayerNorm<'_>,
) -> CliResult<()> {
    check_backward(
        (cpu, gpu),
        (x, warm),
        rng,
        "LayerNorm backward",
        |x, dy| reference::layer_norm_backward(x, dy, features, ln),
        |nz, x, dy| {
            let g = nz.layer_norm_backward(x, dy, features, ln)?;
            Ok((g.dx, g.dgamma, g.dbeta))
        },
    )?;
    // Each backend's forward saves its statistics first, untimed.
    let saved = (
        cpu.layer_norm_saving(x, features, ln)?.stats,
        gpu.map(|g| g.layer_norm_saving(x, features, ln))
            .transpose()?
            .map(|o| o.stats),
    );
    check_backward(
        (cpu, gpu),
        (x, warm),
        rng,
        "LayerNorm backward through its forward's saved statistics",
        |x, dy| reference::layer_norm_backward(x, dy, features, ln),
        |nz, x, dy| {
            let stats = match (nz.is_gpu(), &saved.1) {
                (true, Some(gpu_stats)) => gpu_stats,
                _ => &saved.0,
            };
            // The untimed warm-up runs on a few rows of x: its own statistics.
            let warm_stats;
            let stats = if stats.rows() * features == x.len() {
                stats
            } else {
                warm_stats = nz.layer_norm_saving(x, features, ln)?.stats;
                &warm_stats
            };
            let g = nz.layer_norm_backward_saved(x, dy, features, ln, stats)?;
            Ok((g.dx, g.dgamma, g.dbeta))
        },
    )?;
    Ok(())
}

/// Gradients as a backward pass returns them: (dx, dgamma, dbeta).
type Grads = (Vec<f32>, Vec<f32>, Vec<f32>);

/// A backward pass (`op`, with its `reference`) of `x` with a random dy, on each backend,
/// against the reference.
fn check_backward(
    (cpu, gpu): (&Normalizer, Option<&Normalizer>),
    (x, warm): (&[f32], &[f32]),
    rng: &mut StdRng,
    what: &str,
    reference: impl Fn(&[f32], &[f32]) -> (Vec<f64>, Vec<f64>, Vec<f64>),
    op: impl Fn(&Normalizer, &[f32], &[f32]) -> Result<Grads, NormError>,
) -> CliResult<()> {
    println!("check: {what} of the same batch (a random dy; x and dy read, dx written)");
    let mut dy = error::filled(x.len(), 0f32, "the upstream gradient")?;
    dy.iter_mut()
        .for_each(|v| *v = rng.random_range(-1.0f32..1.0));
    let (rdx, rdgamma, rdbeta) = reference(x, &dy);
    let run_backward = |nz: &Normalizer| -> Result<Case, NormError> {
        op(nz, warm, &dy[..warm.len()])?;
        let start = Instant::now();
        let (dx, dgamma, dbeta) = op(nz, x, &dy)?;
        let wall = start.elapsed();
        let sums =
            reference::max_error(&dgamma, &rdgamma).max(reference::max_error(&dbeta, &rdbeta));
        Ok(Case {
            error: reference::max_error(&dx, &rdx),
            stats_error: Some(("dgamma and dbeta", sums)),
            wall,
            timing: Timing::default(),
        })
    };
    let backward = (run_backward(cpu)?, gpu.map(run_backward).transpose()?);
    report(backward.0, backward.1, (3 * x.len() * 4) as f64 / 1e9);
    Ok(())
}

/// BatchNorm training of `x` into `y` on each backend, output and statistics against the
/// reference.
fn check_batch_norm(
    (cpu, gpu): (&Normalizer, Option<&Normalizer>),
    (x, warm, y): (&[f32], &[f32], &mut [f32]),
    rows: usize,
    features: usize,
    bn: &BatchNorm<'_>,
) -> CliResult<()> {
    let gb = (2 * x.len() * 4) as f64 / 1e9;
    println!(
        "check: BatchNorm (training) of the same batch, statistics per feature over {rows} rows"
    );
    let (r, mean, var, _) = reference::batch_norm_train(x, features, bn);
    let mut run_bn = |nz: &Normalizer| -> Result<Case, NormError> {
        nz.batch_norm_train(warm, features, bn)?;
        let start = Instant::now();
        let (stats, timing) = nz.batch_norm_train_into(x, features, bn, y)?;
        let wall = start.elapsed();
        let stats_error =
            reference::max_error(&stats.mean, &mean).max(reference::max_error(&stats.var, &var));
        Ok(Case {
            error: reference::max_error(y, &r),
            stats_error: Some(("statistics", stats_error)),
            wall,
            timing,
        })
    };
    report(run_bn(cpu)?, gpu.map(&mut run_bn).transpose()?, gb);
    Ok(())
}

/// A row op run on `warm` (pipelines, pooled buffers), then timed on all of `x` into `y`, and
/// its error against the reference `r`.
fn row_case(
    nz: &Normalizer,
    (x, warm): (&[f32], &[f32]),
    y: &mut [f32],
    r: &[f64],
    op: impl Fn(&Normalizer, &[f32], &mut [f32]) -> Result<Timing, NormError>,
) -> Result<Case, NormError> {
    op(nz, warm, &mut y[..warm.len()])?;
    let start = Instant::now();
    let timing = op(nz, x, y)?;
    let wall = start.elapsed();
    Ok(Case {
        error: reference::max_error(y, r),
        stats_error: None,
        wall,
        timing,
    })
}

fn report(cpu: Case, gpu: Option<Case>, gb: f64) {
    line("CPU fallback", &cpu, gb);
    match &gpu {
        Some(g) => {
            line("GPU", g, gb);
            if let Some(k) = g.timing.kernel {
                println!(
                    "  {:<13} kernel {:.3} ms ({:.1} GB/s)",
                    "",
                    k.as_secs_f64() * 1e3,
                    gb / k.as_secs_f64()
                );
            }
            println!(
                "  GPU vs CPU fallback, end to end: {}",
                crate::bench::ratio(cpu.wall.as_secs_f64() / g.wall.as_secs_f64())
            );
        }
        None => println!("  no GPU: only the CPU fallback was checked"),
    }
}

fn line(backend: &str, c: &Case, gb: f64) {
    let stats = c
        .stats_error
        .map_or(String::new(), |(what, e)| format!(" ({what} {e:.2e})"));
    println!(
        "  {:<13} max error {:.2e}{stats}, {:>9.2} ms end to end ({:.1} GB/s)",
        format!("{backend}:"),
        c.error,
        c.wall.as_secs_f64() * 1e3,
        gb / c.wall.as_secs_f64()
    );
}
