//! LayerNorm and RMSNorm (the same family and kernels) end to end (upload, kernel, readback for
//! the GPU), CPU fallback against GPU, and LayerNorm on a tensor already on the GPU, with byte
//! throughput (input read once + output written once).
//! Names: `{cpu,gpu}/{layer_norm,rms_norm}/{rows}x{features}`,
//! `gpu_resident/layer_norm/{rows}x{features}`.
//! The GPU part runs where an adapter exists; on llvmpipe it measures regressions, not speed.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gpunorm::{LayerNorm, Normalizer, RmsNorm};

const SHAPES: &[(usize, usize)] = &[(4096, 768), (16384, 1024), (1024, 4097), (200_000, 3)];

fn layer_norm(c: &mut Criterion) {
    let gpu = Normalizer::gpu().ok();
    if gpu.is_none() {
        eprintln!("SKIPPED gpu benches: no GPU adapter");
    }
    let backends = [Some(Normalizer::cpu()), gpu];
    for norm in backends.iter().flatten() {
        let backend = if norm.is_gpu() { "gpu" } else { "cpu" };
        for op in ["layer_norm", "rms_norm"] {
            let mut group = c.benchmark_group(format!("{backend}/{op}"));
            group.sample_size(10);
            for &(rows, features) in SHAPES {
                let x: Vec<f32> = (0..rows * features)
                    .map(|i| (i % 251) as f32 * 0.01)
                    .collect();
                group.throughput(Throughput::Bytes((2 * x.len() * 4) as u64));
                let run = |x: &[f32]| match op {
                    "layer_norm" => norm.layer_norm(x, features, &LayerNorm::default()),
                    _ => norm.rms_norm(x, features, &RmsNorm::default()),
                };
                // Build the pipeline outside the timed region; the result is read back inside.
                run(&x[..features]).unwrap();
                group.bench_with_input(
                    BenchmarkId::from_parameter(format!("{rows}x{features}")),
                    &x,
                    |b, x| b.iter(|| run(x).unwrap()),
                );
            }
            group.finish();
        }
    }
    if let Some(gpu) = backends[1].as_ref() {
        device_resident(c, gpu);
    }
}

/// The tensor already on the GPU: one op and the device sync are timed, no transfers.
fn device_resident(c: &mut Criterion, norm: &Normalizer) {
    let (device, _) = norm.wgpu().expect("a GPU normalizer");
    let mut group = c.benchmark_group("gpu_resident/layer_norm");
    group.sample_size(10);
    for &(rows, features) in SHAPES {
        let x: Vec<f32> = (0..rows * features)
            .map(|i| (i % 251) as f32 * 0.01)
            .collect();
        let tensor = norm.upload(&x).unwrap();
        let opts = LayerNorm::default();
        group.throughput(Throughput::Bytes((2 * x.len() * 4) as u64));
        group.bench_function(
            BenchmarkId::from_parameter(format!("{rows}x{features}")),
            |b| {
                b.iter(|| {
                    let y = norm.layer_norm_gpu(&tensor, features, &opts).unwrap();
                    device.poll(wgpu::PollType::wait_indefinitely()).unwrap();
                    y
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, layer_norm);
criterion_main!(benches);
