//! BatchNorm end to end, CPU fallback against GPU: training (statistics + apply) and eval (apply
//! with running statistics), features-last and channels-first, with byte throughput (input read
//! once + output written once). Names: `{backend}/batch_norm_{train,eval}/{shape}`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gpunorm::{BatchNorm, Normalizer, RunningStats};

/// Few features and many rows (once 20x slow in PyTorch), many features, a transformer batch.
const SHAPES: &[(usize, usize)] = &[(200_000, 3), (37, 4097), (4096, 4097), (16384, 1024)];
/// Channels-first [batch, channels, spatial]: a CNN feature map.
const NCHW: (usize, usize, usize) = (32, 64, 56 * 56);

fn batch_norm(c: &mut Criterion) {
    let gpu = Normalizer::gpu().ok();
    if gpu.is_none() {
        eprintln!("SKIPPED gpu benches: no GPU adapter");
    }
    let backends = [Some(Normalizer::cpu()), gpu];
    let opts = BatchNorm::default();
    for norm in backends.iter().flatten() {
        let backend = if norm.is_gpu() { "gpu" } else { "cpu" };
        let mut train = c.benchmark_group(format!("{backend}/batch_norm_train"));
        train.sample_size(10);
        for &(rows, features) in SHAPES {
            let x = input(rows * features);
            norm.batch_norm_train(&x[..features * 2], features, &opts)
                .unwrap();
            train.throughput(Throughput::Bytes((2 * x.len() * 4) as u64));
            train.bench_with_input(
                BenchmarkId::from_parameter(format!("{rows}x{features}")),
                &x,
                |b, x| b.iter(|| norm.batch_norm_train(x, features, &opts).unwrap()),
            );
        }
        let (n, ch, sp) = NCHW;
        let x = input(n * ch * sp);
        train.throughput(Throughput::Bytes((2 * x.len() * 4) as u64));
        train.bench_with_input(
            BenchmarkId::from_parameter(format!("nchw{n}x{ch}x{sp}")),
            &x,
            |b, x| {
                b.iter(|| {
                    norm.batch_norm_train_channels_first(x, ch, sp, &opts)
                        .unwrap()
                })
            },
        );
        train.finish();

        let mut eval = c.benchmark_group(format!("{backend}/batch_norm_eval"));
        eval.sample_size(10);
        for &(rows, features) in SHAPES {
            let x = input(rows * features);
            let stats = RunningStats::new(features);
            eval.throughput(Throughput::Bytes((2 * x.len() * 4) as u64));
            eval.bench_with_input(
                BenchmarkId::from_parameter(format!("{rows}x{features}")),
                &x,
                |b, x| b.iter(|| norm.batch_norm_eval(x, features, &opts, &stats).unwrap()),
            );
        }
        eval.finish();
    }
}

fn input(n: usize) -> Vec<f32> {
    (0..n).map(|i| (i % 251) as f32 * 0.01).collect()
}

criterion_group!(benches, batch_norm);
criterion_main!(benches);
