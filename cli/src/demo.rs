//! `gpunorm info` and `gpunorm demo`: the backend, and a worked example on a padded batch.

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

/// The example batch: two sequences padded to four tokens, d_model 3; the second sequence has
/// three real tokens, so its last position is padding.
const TOKENS: [(&str, [f32; 3]); 8] = [
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
    let x: Vec<f32> = TOKENS.iter().flat_map(|(_, v)| *v).collect();
    println!(
        "A worked example: two sequences of four tokens, d_model 3, flattened to 8 positions."
    );
    println!(
        "\"I love deep learning\" fills its four positions; \"Transformers are powerful\" has"
    );
    println!("three tokens, so its fourth position is padding (all zeros).");
    println!();
    layer_norm_part(norm, &x)?;
    batch_norm_part(norm, &x)
}

fn layer_norm_part(norm: &Normalizer, x: &[f32]) -> Result<(), NormError> {
    let y = norm.layer_norm(x, 3, &LayerNorm::default())?;
    println!(
        "LayerNorm: each position normalized over its own 3 features, on {}",
        backend_name(norm)
    );
    println!("  {:<13} {:>24}   {:>26}", "position", "x", "y");
    for ((word, v), out) in TOKENS.iter().zip(y.chunks(3)) {
        println!("  {word:<13} {:>24}   {:>26}", fmt3(v), fmt3(out));
    }
    println!("  \"I\" = [1, 2, 3] has mean 2 and standard deviation 0.816, so it becomes");
    println!("  [-1.22, 0, 1.22]. Every position is normalized alone: the padding stays [0, 0, 0]");
    println!("  (a constant row has nothing to scale) and moves no other position.");
    println!();
    Ok(())
}

fn batch_norm_part(norm: &Normalizer, x: &[f32]) -> Result<(), NormError> {
    let all = norm.batch_norm_train(x, 3, &BatchNorm::default())?;
    let mask = mask_from_lengths(&[4, 3], 4)?;
    let masked = norm.batch_norm_train(
        x,
        3,
        &BatchNorm {
            mask: Some(&mask),
            ..Default::default()
        },
    )?;
    println!("BatchNorm: each feature normalized over all positions; feature 1 shown");
    println!(
        "  {:<13} {:>8}   {:>14}   {:>14}",
        "position", "x[1]", "pad counted", "pad masked"
    );
    for (i, (word, v)) in TOKENS.iter().enumerate() {
        let (a, m) = (all.y[3 * i], masked.y[3 * i]);
        println!("  {word:<13} {:>8.2}   {a:>14.2}   {m:>14.2}", v[0]);
    }
    let std = |var: f32| var.sqrt();
    println!(
        "  {:<13} {:>8}   {:>14.2}   {:>14.2}",
        "mean", "", all.mean[0], masked.mean[0]
    );
    println!(
        "  {:<13} {:>8}   {:>14.2}   {:>14.2}",
        "std",
        "",
        std(all.var[0]),
        std(masked.var[0])
    );
    println!(
        "  Counted, the padding drags feature 1's mean from {:.2} to {:.2} and widens its std from",
        masked.mean[0], all.mean[0]
    );
    println!(
        "  {:.2} to {:.2}: every real token's output shifts because of a position that is not there.",
        std(masked.var[0]),
        std(all.var[0])
    );
    println!("  With the mask (mask_from_lengths(&[4, 3], 4)) the padding is left out of the");
    println!(
        "  statistics ({} positions counted instead of {}) and its output is 0.",
        masked.count, all.count
    );
    println!(
        "  LayerNorm needs no mask: it never mixes positions, which is why transformers use it."
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
