//! Helpers shared by the integration tests: the backends to run on, seeded data and the error
//! metric every tolerance is stated in.
#![allow(dead_code)]

use std::sync::OnceLock;

use gpunorm::Normalizer;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The GPU normalizer shared by every test in a binary (opening a device is slow on llvmpipe),
/// or None with a loud SKIPPED. With GPUNORM_REQUIRE_GPU=1 a missing adapter fails instead.
pub fn gpu() -> Option<&'static Normalizer> {
    static GPU: OnceLock<Option<Normalizer>> = OnceLock::new();
    let gpu = GPU.get_or_init(|| match Normalizer::gpu() {
        Ok(n) => {
            eprintln!("GPU: {}", n.describe());
            Some(n)
        }
        Err(e) => {
            if std::env::var("GPUNORM_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("GPUNORM_REQUIRE_GPU=1 but no GPU: {e}");
            }
            None
        }
    });
    if gpu.is_none() {
        eprintln!(
            "SKIPPED (GPU part): no GPU adapter; set up one (e.g. mesa-vulkan-drivers) to run it"
        );
    }
    gpu.as_ref()
}

#[allow(unused_imports)]
pub use gpunorm::reference::max_error as max_err;

/// The binding size gpunorm plans with on the test GPU: the device's, or GPUNORM_MAX_BINDING_BYTES
/// where that is lower (CI runs the GPU suites a second time at 1 MiB).
pub fn planned_binding_bytes() -> u64 {
    let Some(norm) = gpu() else { return u64::MAX };
    let (device, _) = norm.wgpu().expect("a GPU normalizer");
    let limits = device.limits();
    let device = limits
        .max_storage_buffer_binding_size
        .min(limits.max_buffer_size);
    std::env::var("GPUNORM_MAX_BINDING_BYTES")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(device, |lowered| lowered.min(device))
}

/// `n` values drawn uniformly from mean ± spread·√3 (standard deviation `spread`), seeded.
pub fn data(n: usize, mean: f32, spread: f32, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let half = spread * 3f32.sqrt();
    (0..n)
        .map(|_| mean + rng.random_range(-half..half))
        .collect()
}

/// The worked example: two sequences of four tokens, d_model 3, flattened to [8 positions,
/// 3 features]; the second sequence has three tokens, so the last position is padding.
pub fn example_batch() -> Vec<f32> {
    [
        [1., 2., 3.],
        [2., 4., 6.],
        [3., 6., 9.],
        [4., 8., 12.],
        [5., 10., 15.],
        [6., 12., 18.],
        [7., 13., 19.],
        [0., 0., 0.],
    ]
    .concat()
}

/// The error of dx against its reference, row by row against the row's largest gradient: in
/// f32, dx = (g − mean(g) − xhat · mean(g · xhat)) · rstd carries an absolute error of a few
/// ulps of that scale, so an element that nearly cancels cannot be held to its own size. A NaN
/// where the reference has none (or the reverse) counts as infinite.
pub fn dx_error(dx: &[f32], reference: &[f64], features: usize) -> f64 {
    let mut worst = 0f64;
    for (got, want) in dx.chunks(features).zip(reference.chunks(features)) {
        let scale = want.iter().fold(1f64, |m, r| m.max(r.abs()));
        for (&g, &r) in got.iter().zip(want) {
            let e = match (g.is_nan(), r.is_nan()) {
                (true, true) => 0.0,
                (false, false) => (g as f64 - r).abs() / scale,
                _ => f64::INFINITY,
            };
            worst = worst.max(e);
        }
    }
    worst
}

/// The most representable f32 values between paired elements of `a` and `b` (0 where all are
/// equal, ±0 alike, NaN with NaN), and where that is; u32::MAX where one of a pair is NaN and
/// the other not.
#[allow(dead_code)]
pub fn ulps_apart(a: &[f32], b: &[f32]) -> (u32, usize) {
    assert_eq!(a.len(), b.len());
    // Ordered so that adjacent floats are adjacent integers, -0.0 and +0.0 both 0.
    let key = |v: f32| {
        let i = v.to_bits() as i32;
        i64::from(if i < 0 { i32::MIN.wrapping_sub(i) } else { i })
    };
    let apart = |(&x, &y): (&f32, &f32)| match (x.is_nan(), y.is_nan()) {
        (true, true) => 0,
        (false, false) => u32::try_from((key(x) - key(y)).unsigned_abs()).unwrap_or(u32::MAX),
        _ => u32::MAX,
    };
    a.iter().zip(b).map(apart).enumerate().fold(
        (0, 0),
        |(most, at), (i, u)| if u > most { (u, i) } else { (most, at) },
    )
}

/// Ordinary activations: mean 0.5, standard deviation 2.
pub fn ordinary(n: usize, seed: u64) -> Vec<f32> {
    data(n, 0.5, 2.0, seed)
}

/// The CPU fallback shared by every test in a binary.
pub fn cpu() -> &'static Normalizer {
    static CPU: OnceLock<Normalizer> = OnceLock::new();
    CPU.get_or_init(Normalizer::cpu)
}

/// `per_backend! { fn name(backend, norm) { … } }` defines a module `name` with one test per
/// backend, `name::cpu` and `name::gpu`, each running the body with `backend` (its name, for
/// messages) and `norm` (its `Normalizer`): a failure on one backend never hides the other's
/// result. The GPU test prints SKIPPED without an adapter (and fails with GPUNORM_REQUIRE_GPU=1).
#[macro_export]
macro_rules! per_backend {
    ($(#[$meta:meta])* fn $name:ident($backend:ident, $norm:ident) $body:block) => {
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn run($backend: &str, $norm: &'static gpunorm::Normalizer) $body

            #[test]
            fn cpu() {
                run("cpu", $crate::common::cpu())
            }

            #[test]
            fn gpu() {
                if let Some(gpu) = $crate::common::gpu() {
                    run("gpu", gpu)
                }
            }
        }
    };
}
