//! BatchNorm across shards of a batch (SyncBatchNorm): each shard's statistics, merged, give
//! the whole batch's; each shard normalized with them, and its backward pass with the merged
//! sums, gives the whole batch's output and gradients. On both backends, and on three GPU
//! devices at once.

mod common;

use common::{cpu, data, gpu, max_err, ordinary};
use gpunorm::{
    reference, BatchNorm, NormError, Normalizer, PartialGrads, PartialStats, RunningStats,
};

/// A batch of `rows` offset rows (mean 1e3, spread 1e-1: the shift must carry the precision),
/// cut into shards at `cuts` (row indices), the last cut's shard fully masked.
struct Split {
    x: Vec<f32>,
    dy: Vec<f32>,
    mask: Vec<bool>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

const FEATURES: usize = 24;

impl Split {
    fn new(rows: usize) -> Split {
        let mut mask: Vec<bool> = (0..rows).map(|r| r % 7 != 3).collect();
        // The last 5 rows are padding: a shard of them counts nothing.
        mask[rows - 5..].iter_mut().for_each(|k| *k = false);
        Split {
            x: data(rows * FEATURES, 1e3, 1e-1, 1),
            dy: ordinary(rows * FEATURES, 2),
            mask,
            gamma: data(FEATURES, 1.0, 0.3, 3),
            beta: data(FEATURES, 0.0, 0.3, 4),
        }
    }

    fn opts(&self, rows: std::ops::Range<usize>) -> BatchNorm<'_> {
        BatchNorm {
            mask: Some(&self.mask[rows]),
            gamma: Some(&self.gamma),
            beta: Some(&self.beta),
            ..Default::default()
        }
    }

    fn rows(&self, v: &[f32], rows: std::ops::Range<usize>) -> Vec<f32> {
        v[rows.start * FEATURES..rows.end * FEATURES].to_vec()
    }
}

/// Shards of `split` at `cuts`, each on its `Normalizer` (cycling through `norms`): merged
/// statistics, then outputs and gradients, against the whole batch on `norms[0]` and the
/// reference.
fn sharded(name: &str, norms: &[&Normalizer], cuts: &[usize]) {
    let rows = *cuts.last().unwrap();
    let s = Split::new(rows);
    let shards: Vec<std::ops::Range<usize>> = cuts.windows(2).map(|w| w[0]..w[1]).collect();
    let on = |k: usize| norms[k % norms.len()];
    let parts: Vec<PartialStats> = shards
        .iter()
        .enumerate()
        .map(|(k, r)| {
            on(k)
                .batch_norm_stats(&s.rows(&s.x, r.clone()), FEATURES, &s.opts(r.clone()))
                .unwrap()
        })
        .collect();
    assert_eq!(
        parts.last().unwrap().count(),
        0,
        "{name}: the padding shard counts nothing"
    );
    // The bytes any transport would carry.
    let parts: Vec<PartialStats> = parts
        .iter()
        .map(|p| PartialStats::from_bytes(&p.to_bytes()).unwrap())
        .collect();
    let merged = PartialStats::merge(&parts).unwrap();

    let whole_opts = s.opts(0..rows);
    let whole = norms[0]
        .batch_norm_train(&s.x, FEATURES, &whole_opts)
        .unwrap();
    let (ry, rmean, rvar, count) = reference::batch_norm_train(&s.x, FEATURES, &whole_opts);
    let stats = merged.batch_stats();
    assert_eq!(stats.count, count, "{name}");
    // Statistics as tests/batch_norm.rs holds them (offset columns: 1e-4 of max(1, |ref|)).
    assert!(max_err(&stats.mean, &rmean) < 1e-4, "{name}: mean");
    assert!(max_err(&stats.var, &rvar) < 1e-4, "{name}: var");
    // And against the unsplit statistics of the same backend: a split moves only rounding.
    let rel = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(a, b)| ((a - b) / b.abs().max(1e-3)).abs())
            .fold(0f32, f32::max)
    };
    assert!(
        rel(&stats.mean, &whole.mean) < 1e-6,
        "{name}: mean vs unsplit"
    );
    assert!(rel(&stats.var, &whole.var) < 1e-4, "{name}: var vs unsplit");

    // Each shard normalized with the merged statistics: the whole batch's output.
    let mut y = Vec::new();
    for (k, r) in shards.iter().enumerate() {
        let part = on(k)
            .batch_norm_apply(
                &s.rows(&s.x, r.clone()),
                FEATURES,
                &s.opts(r.clone()),
                &merged,
            )
            .unwrap();
        y.extend(part);
    }
    // Tolerance of tests/batch_norm.rs on offset data.
    assert!(max_err(&y, &ry) < 1e-3, "{name}: y {}", max_err(&y, &ry));
    assert!(
        y[(rows - 5) * FEATURES..].iter().all(|&v| v == 0.0),
        "{name}"
    );

    // The backward pass: sums per shard, merged, then each shard's dx.
    let sums: Vec<PartialGrads> = shards
        .iter()
        .enumerate()
        .map(|(k, r)| {
            let (x, dy) = (s.rows(&s.x, r.clone()), s.rows(&s.dy, r.clone()));
            on(k)
                .batch_norm_backward_sums(&x, &dy, FEATURES, &s.opts(r.clone()), &merged)
                .unwrap()
        })
        .collect();
    let grads = PartialGrads::merge(&sums).unwrap();
    let (rdx, rdgamma, rdbeta) = reference::batch_norm_backward(&s.x, &s.dy, FEATURES, &whole_opts);
    let mut dx = Vec::new();
    for (k, r) in shards.iter().enumerate() {
        let (x, dy) = (s.rows(&s.x, r.clone()), s.rows(&s.dy, r.clone()));
        let g = on(k)
            .batch_norm_backward_apply(&x, &dy, FEATURES, &s.opts(r.clone()), &merged, &grads)
            .unwrap();
        // dgamma and dbeta are the whole batch's, on every shard (f32 sums over a few hundred
        // rows of offset data: 1e-3 of max(1, |ref|), as tests/backward.rs).
        assert!(max_err(&g.dgamma, &rdgamma) < 1e-3, "{name}: dgamma");
        assert!(max_err(&g.dbeta, &rdbeta) < 1e-4, "{name}: dbeta");
        dx.extend(g.dx);
    }
    // dx held to the largest gradient (tests/backward.rs's measure for BatchNorm).
    let scale = rdx.iter().fold(1f64, |m, r| m.max(r.abs()));
    let worst = dx
        .iter()
        .zip(&rdx)
        .fold(0f64, |m, (&g, r)| m.max((g as f64 - r).abs() / scale));
    assert!(worst < 1e-3, "{name}: dx {worst}");

    // Running statistics updated once, from the merged statistics.
    let (mut from_shards, mut from_whole) =
        (RunningStats::new(FEATURES), RunningStats::new(FEATURES));
    from_shards.update_with(&stats).unwrap();
    from_whole.update(&whole).unwrap();
    assert!(
        rel(&from_shards.mean, &from_whole.mean) < 1e-6,
        "{name}: running mean"
    );
}

per_backend! {
    /// Two to five shards, uneven (one of a single row), the last all padding.
    fn shards_give_the_whole_batch(name, norm) {
        sharded(name, &[norm], &[0, 97, 195, 200]);
        sharded(name, &[norm], &[0, 1, 50, 123, 195, 200]);
        sharded(name, &[norm], &[0, 195, 200]);
    }
}

/// A batch split across three GPU devices (three Normalizers, each its own device), then
/// merged, gives what one device gives.
#[test]
fn three_devices_give_what_one_gives() {
    let Some(first) = gpu() else { return };
    let (second, third) = (Normalizer::gpu().unwrap(), Normalizer::gpu().unwrap());
    sharded("3 GPUs", &[first, &second, &third], &[0, 80, 150, 195, 200]);
    // And the CPU fallback beside a GPU: statistics from either merge.
    sharded("GPU + CPU", &[first, cpu()], &[0, 100, 195, 200]);
}

per_backend! {
    fn bad_shards_are_errors(name, norm) {
        let x = ordinary(10 * 4, 5);
        let opts = BatchNorm::default();
        let stats = norm.batch_norm_stats(&x, 4, &opts).unwrap();
        let other = norm.batch_norm_stats(&x, 5, &opts).unwrap();
        assert!(
            matches!(
                PartialStats::merge(&[stats.clone(), other.clone()]),
                Err(NormError::ShardFeatures { part: 1, features: 5, expected: 4 })
            ),
            "{name}"
        );
        assert!(matches!(
            norm.batch_norm_apply(&x, 4, &opts, &other),
            Err(NormError::ShardFeatures { .. })
        ));
        // An empty shard is an error; a shard of padding counts 0.
        assert!(matches!(
            norm.batch_norm_stats::<f32>(&[], 4, &opts),
            Err(NormError::EmptyBatch { .. })
        ));
        let padding = [false; 10];
        let masked = BatchNorm { mask: Some(&padding), ..Default::default() };
        let none = norm.batch_norm_stats(&x, 4, &masked).unwrap();
        assert_eq!(none.count(), 0);
        assert!(matches!(
            norm.batch_norm_apply(&x, 4, &opts, &none),
            Err(NormError::InvalidStats { .. })
        ));
        // Gradient sums are not statistics.
        let sums = norm.batch_norm_backward_sums(&x, &x, 4, &opts, &stats).unwrap();
        assert!(matches!(
            PartialStats::from_bytes(&sums.to_bytes()),
            Err(NormError::InvalidStats { .. })
        ));
        assert!(matches!(
            norm.batch_norm_backward_sums(&x, &x[1..], 4, &opts, &stats),
            Err(NormError::OperandLength { .. })
        ));
    }
}
