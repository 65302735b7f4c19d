//! Resident memory stays bounded under load: 8 threads share one GPU `Normalizer` for 1000 mixed
//! calls each (LayerNorm, BatchNorm training and eval, shapes that change every call, up to 4 MB
//! of input), and every result matches the f64 reference. Its own test binary, so that no other
//! test's allocations move the process's resident size while it measures.

mod common;

use common::{gpu, max_err, ordinary};
use gpunorm::{reference, BatchNorm, LayerNorm, Normalizer, RunningStats};

const THREADS: u64 = 8;
const CALLS: u64 = 1000;
/// Calls per thread before the resident size is taken as the baseline: by then every size class
/// a thread uses has been seen many times over.
const WARM_UP: u64 = 200;
/// How far the resident size may grow past the warmed-up one: "a few hundred MiB".
const GROWTH_LIMIT: u64 = 256 << 20;
/// Output tolerance, max |y − ref| / max(1, |ref|), as in the other suites.
const TOL: f64 = 1e-4;

/// The process's resident set, in bytes (Linux; None elsewhere).
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Call `call` of thread `t`: an op and a shape that vary from call to call, mostly small, one
/// in eight up to 4 MB of input.
fn one_call(norm: &Normalizer, t: u64, call: u64) {
    let k = t * 7919 + call * 104_729;
    let features = [3, 12, 64, 100, 256, 768, 1000, 1024][(k % 8) as usize];
    let max_values = if k % 8 == 5 { 1 << 20 } else { 1 << 16 };
    let rows = 2 + (k / 8) as usize % (max_values / features);
    let x = ordinary(rows * features, k);
    let (y, expected) = match call % 3 {
        0 => {
            let opts = LayerNorm::default();
            let y = norm.layer_norm(&x, features, &opts).unwrap();
            (y, reference::layer_norm(&x, features, &opts))
        }
        1 => {
            let opts = BatchNorm::default();
            let out = norm.batch_norm_train(&x, features, &opts).unwrap();
            (out.y, reference::batch_norm_train(&x, features, &opts).0)
        }
        _ => {
            let opts = BatchNorm::default();
            let stats = RunningStats::new(features);
            let y = norm.batch_norm_eval(&x, features, &opts, &stats).unwrap();
            let (m, v) = (vec![0.0; features], vec![1.0; features]);
            (y, reference::batch_norm_apply(&x, features, &m, &v, &opts))
        }
    };
    let err = max_err(&y, &expected);
    assert!(
        err < TOL,
        "thread {t}, call {call}, {rows}x{features}: error {err:e}"
    );
}

#[test]
fn eight_threads_of_mixed_calls_stay_within_a_few_hundred_mib() {
    let Some(norm) = gpu() else { return };
    let warmed = std::sync::Barrier::new(THREADS as usize + 1);
    let measured = std::sync::Barrier::new(THREADS as usize + 1);
    let baseline = std::thread::scope(|s| {
        for t in 0..THREADS {
            let (warmed, measured) = (&warmed, &measured);
            s.spawn(move || {
                for call in 0..WARM_UP {
                    one_call(norm, t, call);
                }
                warmed.wait();
                measured.wait();
                for call in WARM_UP..CALLS {
                    one_call(norm, t, call);
                }
            });
        }
        warmed.wait();
        let baseline = resident_bytes();
        measured.wait();
        baseline
    });
    let end = resident_bytes();
    let (Some(baseline), Some(end)) = (baseline, end) else {
        eprintln!("SKIPPED (memory check): no /proc/self/status on this system");
        return;
    };
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!(
        "resident: {:.0} MiB after warm-up, {:.0} MiB after {} calls",
        mib(baseline),
        mib(end),
        THREADS * CALLS
    );
    assert!(
        end <= baseline + GROWTH_LIMIT,
        "resident memory grew from {:.0} to {:.0} MiB",
        mib(baseline),
        mib(end)
    );
}
