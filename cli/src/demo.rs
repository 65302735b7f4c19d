//! `gpunorm info` and `gpunorm demo`: the backend, and the seed document's worked example.

use gpunorm::{mask_from_lengths, wgpu, BatchNorm, LayerNorm, NormError, Normalizer};

pub fn info(norm: &Normalizer) -> Result<(), NormError> {
    println!("backend: {}", norm.describe());
    if let Some(a) = norm.adapter_info() {
        println!(
            "  api {:?}, device type {:?}, vendor {:#06x}, device {:#06x}",
            a.backend, a.device_type, a.vendor, a.device
        );
        if let Some((device, _)) = norm.wgpu() {
            let l = device.limits();
            println!(
                "  largest binding {} MiB, largest buffer {} MiB, {} workgroups per dimension",
                l.max_storage_buffer_binding_size >> 20,
                l.max_buffer_size >> 20,
                l.max_compute_workgroups_per_dimension
            );
            let subgroups = device.features().contains(wgpu::Features::SUBGROUP);
            println!(
                "  workgroup sums: {}",
                if subgroups {
                    "subgroup operations"
                } else {
                    "shared memory"
                }
            );
        }
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

pub fn demo(norm: &Normalizer) -> Result<(), NormError> {
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
