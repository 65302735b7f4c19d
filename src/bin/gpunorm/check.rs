//! `gpunorm check`: LayerNorm and BatchNorm of a large random batch against the f64 reference,
//! with CPU-fallback and GPU times.

use std::time::{Duration, Instant};

use gpunorm::{reference, BatchNorm, LayerNorm, NormError, Normalizer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub fn check(norm: &Normalizer, rows: usize, features: usize, seed: u64) -> Result<(), NormError> {
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

    let r = reference::layer_norm(&x, features, &opts);
    let cpu = Normalizer::cpu();
    let mut y_cpu = vec![0f32; n];
    let (_, t_cpu) = timed(|| cpu.layer_norm_into(&x, features, &opts, &mut y_cpu))?;
    println!(
        "  CPU fallback: max error {:.2e}, {:>9.2} ms end to end ({:.1} GB/s)",
        reference::max_error(&y_cpu, &r),
        ms(t_cpu),
        mb / t_cpu.as_secs_f64()
    );
    if norm.is_gpu() {
        // The first call builds the pipeline; time the second.
        norm.layer_norm(&x[..features], features, &opts)?;
        let mut y_gpu = vec![0f32; n];
        let (timing, t_gpu) = timed(|| norm.layer_norm_into(&x, features, &opts, &mut y_gpu))?;
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
    let ((stats_cpu, _), t_cpu) =
        timed(|| cpu.batch_norm_train_into(&x, features, &bn, &mut y_cpu))?;
    let stat_err =
        |m: &[f32], v: &[f32]| reference::max_error(m, &mean).max(reference::max_error(v, &var));
    println!(
        "  CPU fallback: max error {:.2e} (statistics {:.2e}), {:>9.2} ms end to end ({:.1} GB/s)",
        reference::max_error(&y_cpu, &r),
        stat_err(&stats_cpu.mean, &stats_cpu.var),
        ms(t_cpu),
        mb / t_cpu.as_secs_f64()
    );
    if norm.is_gpu() {
        norm.batch_norm_train(&x[..features], features, &bn)?;
        let mut y_gpu = vec![0f32; n];
        let ((stats, timing), t_gpu) =
            timed(|| norm.batch_norm_train_into(&x, features, &bn, &mut y_gpu))?;
        println!("  GPU:          max error {:.2e} (statistics {:.2e}), {:>9.2} ms end to end ({:.1} GB/s)",
            reference::max_error(&y_gpu, &r), stat_err(&stats.mean, &stats.var), ms(t_gpu), mb / t_gpu.as_secs_f64());
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
