//! The memory ceilings a CPU normalization runs against: read-only and copy bandwidth of a
//! 256 MiB buffer on 1 and 2 threads, and single-thread reads of smaller buffers (where the
//! last-level cache stops helping). BatchNorm training must read its input twice, so its best
//! case is bounded by these figures; see BENCHMARKS.md.
//!
//!   cargo run --release --example memory_bandwidth

use std::time::Instant;

use rayon::prelude::*;

fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 32];
    for c in x.chunks_exact(32) {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum()
}

fn median(mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..9)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[4]
}

fn main() {
    let n = 64 << 20;
    let x: Vec<f32> = (0..n).map(|i| (i % 97) as f32).collect();
    let mut y = vec![0f32; n];
    let bytes = (n * 4) as f64;
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let read = median(|| {
            let s: f32 = pool.install(|| x.par_chunks(1 << 16).map(sum).sum());
            std::hint::black_box(s);
        });
        let copy = median(|| {
            pool.install(|| {
                y.par_chunks_mut(1 << 16)
                    .zip(x.par_chunks(1 << 16))
                    .for_each(|(a, b)| a.copy_from_slice(b))
            })
        });
        println!(
            "{threads} thread(s), 256 MiB: read {:.1} GB/s, copy {:.1} GB/s (read + write bytes)",
            bytes / read / 1e9,
            2.0 * bytes / copy / 1e9
        );
    }
    for mib in [4usize, 16, 64, 128, 256] {
        let part = &x[..mib << 18];
        let t = median(|| {
            std::hint::black_box(sum(part));
        });
        println!(
            "1 thread, {mib:>3} MiB: read {:.1} GB/s",
            (part.len() * 4) as f64 / t / 1e9
        );
    }
}
