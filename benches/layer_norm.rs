//! LayerNorm end to end (upload, kernel, readback for the GPU), CPU fallback against GPU, and on a
//! tensor already on the GPU, with byte throughput (input read once + output written once).
//! Names: `{cpu,gpu,gpu_resident}/layer_norm/{rows}x{features}`.
//! The GPU part runs where an adapter exists; on llvmpipe it measures regressions, not speed.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gpunorm::{LayerNorm, Normalizer};

const SHAPES: &[(usize, usize)] = &[(4096, 768), (16384, 1024), (1024, 4097), (200_000, 3)];

fn layer_norm(c: &mut Criterion) {
    let gpu = Normalizer::gpu().ok();
    if gpu.is_none() {
        eprintln!("SKIPPED gpu benches: no GPU adapter");
    }
    let backends = [Some(Normalizer::cpu()), gpu];
    for norm in backends.iter().flatten() {
        let backend = if norm.is_gpu() { "gpu" } else { "cpu" };
        let mut group = c.benchmark_group(format!("{backend}/layer_norm"));
        group.sample_size(10);
        for &(rows, features) in SHAPES {
            let x: Vec<f32> = (0..rows * features)
                .map(|i| (i % 251) as f32 * 0.01)
                .collect();
            group.throughput(Throughput::Bytes((2 * x.len() * 4) as u64));
            let opts = LayerNorm::default();
            // Build the pipeline outside the timed region; the result is read back inside it.
            norm.layer_norm(&x[..features], features, &opts).unwrap();
            group.bench_with_input(
                BenchmarkId::from_parameter(format!("{rows}x{features}")),
                &x,
                |b, x| b.iter(|| norm.layer_norm(x, features, &opts).unwrap()),
            );
        }
        group.finish();
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
