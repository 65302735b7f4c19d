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

/// Every backend to check: the CPU fallback always, the GPU where one exists.
pub fn backends() -> Vec<(&'static str, &'static Normalizer)> {
    static CPU: OnceLock<Normalizer> = OnceLock::new();
    let mut all = vec![("cpu", CPU.get_or_init(Normalizer::cpu))];
    if let Some(g) = gpu() {
        all.push(("gpu", g));
    }
    all
}

pub use gpunorm::reference::max_error as max_err;

/// `n` values drawn uniformly from mean ± spread·√3 (standard deviation `spread`), seeded.
pub fn data(n: usize, mean: f32, spread: f32, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let half = spread * 3f32.sqrt();
    (0..n)
        .map(|_| mean + rng.random_range(-half..half))
        .collect()
}

/// Ordinary activations: mean 0.5, standard deviation 2.
pub fn ordinary(n: usize, seed: u64) -> Vec<f32> {
    data(n, 0.5, 2.0, seed)
}
