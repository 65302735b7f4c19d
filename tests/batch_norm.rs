//! BatchNorm on every backend against the f64 reference: the worked example's numbers with and without the
//! padding mask, random masks, both layouts, running statistics, eval mode, the hard shapes, bad
//! input and determinism. Output tolerances are max |y − ref| / max(1, |ref|).

mod common;

use common::{data, example_batch, gpu, max_err, ordinary};
use gpunorm::{
    mask_from_lengths, reference, BatchNorm, BatchNormOutput, ChannelsFirst, NormError, Normalizer,
    RunningStats,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Ordinary data: f32 rounding of a few operations, far below this.
const TOL: f64 = 1e-4;
/// Columns with mean 1e4 and spread 1e-2.
const TOL_OFFSET: f64 = 1e-3;

/// Relative error of statistics against the reference, each relative to its own magnitude.
fn stat_err(v: &[f32], r: &[f64]) -> f64 {
    v.iter()
        .zip(r)
        .map(|(&v, &r)| (v as f64 - r).abs() / r.abs().max(1e-30))
        .fold(0.0, f64::max)
}

/// Trains on features-last `x` with `norm` and checks the result against the reference.
fn train_and_check(
    name: &str,
    norm: &Normalizer,
    x: &[f32],
    features: usize,
    opts: &BatchNorm<'_>,
    tol: f64,
) {
    let out = norm.batch_norm_train(x, features, opts).unwrap();
    let y_ref = reference::batch_norm_train(x, features, opts).0;
    check_train(name, &out, x, features, opts, &y_ref, tol);
}

/// Checks a training result against the reference: y to `tol`, mean to `tol` (absolute/relative
/// as for y), var relative to itself to `tol`, and the count exactly.
fn check_train(
    name: &str,
    out: &BatchNormOutput,
    x_last: &[f32],
    features: usize,
    opts: &BatchNorm<'_>,
    y_ref: &[f64],
    tol: f64,
) {
    let (_, mean, var, count) = reference::batch_norm_train(x_last, features, opts);
    assert_eq!(out.count, count, "{name}: count");
    let e = max_err(&out.y, y_ref);
    assert!(e < tol, "{name}: y error {e:e} >= {tol:e}");
    let e = max_err(&out.mean, &mean);
    assert!(e < tol, "{name}: mean error {e:e}");
    let e = stat_err(&out.var, &var);
    assert!(e < tol, "{name}: var relative error {e:e}");
}

fn random_mask(rows: usize, seed: u64) -> Vec<bool> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut m: Vec<bool> = (0..rows).map(|_| rng.random_bool(0.7)).collect();
    m[rows / 2] = true;
    m
}

per_backend! {
    fn the_worked_example_without_and_with_the_mask(name, norm) {
        let x = example_batch();
        // Feature 1 over all 8 positions, pad included: mean 3.5, biased var 140/8 − 3.5² = 5.25,
        // std 2.2913; "I" → −2.5/2.2913 = −1.091, "powerful" → 3.5/2.2913 = 1.528.
        let out = norm.batch_norm_train(&x, 3, &BatchNorm::default()).unwrap();
        assert_eq!(out.count, 8, "{name}");
        assert!(
            (out.mean[0] - 3.5).abs() < 1e-6,
            "{name}: mean {}",
            out.mean[0]
        );
        assert!(
            (out.var[0].sqrt() - 2.2913).abs() < 1e-4,
            "{name}: std {}",
            out.var[0].sqrt()
        );
        assert!(
            (out.y[0] + 1.091).abs() < 1e-3 && (out.y[18] - 1.528).abs() < 1e-3,
            "{name}"
        );
        // The same, rounded to two decimals as a reader checks them by hand.
        assert!(
            (out.y[0] + 1.09).abs() < 0.01 && (out.y[18] - 1.52).abs() < 0.01,
            "{name}"
        );

        // The pad left out: 1..7, mean 4, biased var 140/7 − 16 = 4, std 2; "I" → −1.5,
        // "powerful" → 1.5, and the pad's output is 0.
        let mask = mask_from_lengths(&[4, 3], 4).unwrap();
        let opts = BatchNorm {
            mask: Some(&mask),
            ..Default::default()
        };
        let out = norm.batch_norm_train(&x, 3, &opts).unwrap();
        assert_eq!(out.count, 7, "{name}");
        assert!(
            (out.mean[0] - 4.0).abs() < 1e-6 && (out.var[0] - 4.0).abs() < 1e-5,
            "{name}: {:?}",
            out
        );
        assert!(
            (out.y[0] + 1.5).abs() < 1e-5 && (out.y[18] - 1.5).abs() < 1e-5,
            "{name}"
        );
        assert_eq!(&out.y[21..], &[0.0, 0.0, 0.0], "{name}: the pad");
        let y_ref = reference::batch_norm_train(&x, 3, &opts).0;
        check_train(name, &out, &x, 3, &opts, &y_ref, TOL);
    }
}

per_backend! {
    fn random_batches_with_and_without_masks(name, norm) {
        for &(rows, features) in &[(1, 5), (2, 1), (33, 3), (300, 64), (129, 100), (1000, 7)] {
            let x = ordinary(rows * features, (rows * features) as u64);
            let gamma = data(features, 1.0, 0.3, 1);
            let beta = data(features, 0.0, 1.0, 2);
            let mask = random_mask(rows, rows as u64);
            let with_mask = rows > 2;
            for opts in [
                BatchNorm::default(),
                BatchNorm {
                    gamma: Some(&gamma),
                    beta: Some(&beta),
                    eps: 1e-3,
                    mask: None,
                },
                BatchNorm {
                    mask: with_mask.then_some(&mask[..]),
                    beta: Some(&beta),
                    ..Default::default()
                },
            ] {
                train_and_check(
                    &format!("{name} {rows}x{features} {opts:?}"),
                    norm,
                    &x,
                    features,
                    &opts,
                    TOL,
                );
            }
        }
    }
}

per_backend! {
    fn offset_columns_stay_accurate(name, norm) {
        for &(rows, features) in &[(1000, 3), (257, 64), (130, 2050)] {
            let x = data(rows * features, 1e4, 1e-2, 8);
            let mask = random_mask(rows, 4);
            for opts in [
                BatchNorm::default(),
                BatchNorm {
                    mask: Some(&mask),
                    ..Default::default()
                },
            ] {
                train_and_check(
                    &format!("{name} offset {rows}x{features}"),
                    norm,
                    &x,
                    features,
                    &opts,
                    TOL_OFFSET,
                );
            }
        }
    }
}

per_backend! {
    /// The shapes the kernels are built for: few features and many rows, and many features.
    fn hard_shapes(name, norm) {
        for &(rows, features) in &[(200_000, 3), (37, 4097)] {
            let x = ordinary(rows * features, 17);
            let opts = BatchNorm::default();
            train_and_check(
                &format!("{name} {rows}x{features}"),
                norm,
                &x,
                features,
                &opts,
                TOL,
            );
        }
    }
}

per_backend! {
    fn channels_first_matches_the_features_last_reference(name, norm) {
        for &(batch, channels, spatial) in &[(3, 5, 37), (2, 16, 64), (4, 1, 9), (1, 3, 1000)] {
            let x = ordinary(batch * channels * spatial, spatial as u64);
            let x_last = reference::channels_first_to_last(&x, channels, spatial);
            let gamma = data(channels, 1.0, 0.3, 5);
            let mask = random_mask(batch * spatial, 6);
            for opts in [
                BatchNorm {
                    gamma: Some(&gamma),
                    ..Default::default()
                },
                BatchNorm {
                    mask: Some(&mask),
                    ..Default::default()
                },
            ] {
                let out = norm
                    .batch_norm_train_channels_first(&x, channels, spatial, &opts)
                    .unwrap();
                let shape = ChannelsFirst { batch, channels, spatial };
                let named = norm.batch_norm_train_nchw(&x, shape, &opts).unwrap();
                assert_eq!(named, out, "{name}: the named form computes the same");
                let y_ref = reference::batch_norm_train(&x_last, channels, &opts).0;
                let y_ref = reference::channels_last_to_first(&y_ref, channels, spatial);
                check_train(
                    &format!("{name} NCL {batch}x{channels}x{spatial}"),
                    &out,
                    &x_last,
                    channels,
                    &opts,
                    &y_ref,
                    TOL,
                );

                let stats = RunningStats {
                    mean: data(channels, 0.3, 1.0, 1),
                    var: data(channels, 2.0, 0.5, 2),
                    momentum: 0.1,
                };
                let y = norm
                    .batch_norm_eval_channels_first(&x, channels, spatial, &opts, &stats)
                    .unwrap();
                let named = norm.batch_norm_eval_nchw(&x, shape, &opts, &stats).unwrap();
                assert_eq!(named, y, "{name}: the named form computes the same");
                let (m, v) = (to_f64(&stats.mean), to_f64(&stats.var));
                let y_ref = reference::batch_norm_apply(&x_last, channels, &m, &v, &opts);
                let e = max_err(
                    &y,
                    &reference::channels_last_to_first(&y_ref, channels, spatial),
                );
                assert!(e < TOL, "{name} NCL eval: error {e:e}");
            }
        }
    }
}

fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&v| v as f64).collect()
}

per_backend! {
    fn eval_mode_uses_the_running_statistics(name, norm) {
        let (rows, features) = (500, 12);
        let x = ordinary(rows * features, 3);
        let stats = RunningStats {
            mean: data(features, 0.5, 1.0, 1),
            var: data(features, 3.0, 1.0, 2),
            momentum: 0.1,
        };
        let gamma = data(features, 1.0, 0.3, 3);
        let beta = data(features, 0.0, 1.0, 4);
        let mask = random_mask(rows, 9);
        for opts in [
            BatchNorm::default(),
            BatchNorm {
                gamma: Some(&gamma),
                beta: Some(&beta),
                mask: Some(&mask),
                eps: 0.0,
            },
        ] {
            let y = norm.batch_norm_eval(&x, features, &opts, &stats).unwrap();
            let y_ref = reference::batch_norm_apply(
                &x,
                features,
                &to_f64(&stats.mean),
                &to_f64(&stats.var),
                &opts,
            );
            let e = max_err(&y, &y_ref);
            assert!(e < TOL, "{name}: eval error {e:e}");
            if opts.mask.is_some() {
                assert!(
                    y.chunks(features)
                        .zip(&mask)
                        .all(|(r, &k)| k || r.iter().all(|&v| v == 0.0)),
                    "{name}: masked rows are 0"
                );
            }
        }
    }
}

per_backend! {
    /// PyTorch's rule worked by hand on the example's masked batch, feature 1: batch mean 4, biased var 4
    /// over 7 positions, so the unbiased var is 4 · 7/6 = 4.6667. From mean 0, var 1, momentum 0.1:
    /// mean 0.9 · 0 + 0.1 · 4 = 0.4, var 0.9 · 1 + 0.1 · 4.6667 = 1.36667. A second step with the same
    /// batch: mean 0.9 · 0.4 + 0.4 = 0.76, var 0.9 · 1.36667 + 0.46667 = 1.69667.
    fn running_statistics_follow_pytorch(name, norm) {
        let x = example_batch();
        let mask = mask_from_lengths(&[4, 3], 4).unwrap();
        let out = norm
            .batch_norm_train(
                &x,
                3,
                &BatchNorm {
                    mask: Some(&mask),
                    ..Default::default()
                },
            )
            .unwrap();
        let mut stats = RunningStats::new(3);
        assert_eq!(
            (stats.mean.clone(), stats.var.clone(), stats.momentum),
            (vec![0.0; 3], vec![1.0; 3], 0.1)
        );
        stats.update(&out).unwrap();
        assert!(
            (stats.mean[0] - 0.4).abs() < 1e-6 && (stats.var[0] - 1.366_667).abs() < 1e-5,
            "{name}: {stats:?}"
        );
        stats.update(&out).unwrap();
        assert!(
            (stats.mean[0] - 0.76).abs() < 1e-6 && (stats.var[0] - 1.696_667).abs() < 1e-5,
            "{name}: {stats:?}"
        );
    }
}

#[test]
fn running_statistics_refuse_what_they_cannot_fold() {
    // One counted row has no unbiased variance: an error, with the statistics untouched.
    let one = Normalizer::cpu()
        .batch_norm_train(&[1.0, 2.0], 2, &BatchNorm::default())
        .unwrap();
    let mut stats = RunningStats::new(2);
    assert_eq!(stats.update(&one), Err(NormError::TooFewRows { count: 1 }));
    assert_eq!(stats, RunningStats::new(2));
    let mut stats = RunningStats::new(3);
    assert!(matches!(
        stats.update(&one),
        Err(NormError::ParamLength { .. })
    ));
    let mut stats = RunningStats {
        momentum: 1.5,
        ..RunningStats::new(2)
    };
    let two = Normalizer::cpu()
        .batch_norm_train(&[1.0, 2.0, 3.0, 5.0], 2, &BatchNorm::default())
        .unwrap();
    assert!(matches!(
        stats.update(&two),
        Err(NormError::InvalidParam {
            name: "momentum",
            ..
        })
    ));
}

per_backend! {
    fn a_nan_poisons_only_its_own_column(name, norm) {
        let (rows, features) = (50, 4);
        let mut x = ordinary(rows * features, 1);
        x[7 * features + 2] = f32::NAN;
        let out = norm
            .batch_norm_train(&x, features, &BatchNorm::default())
            .unwrap();
        assert!(out.mean[2].is_nan() && out.var[2].is_nan(), "{name}");
        let y_ref = reference::batch_norm_train(&x, features, &BatchNorm::default()).0;
        assert!(
            max_err(&out.y, &y_ref) < TOL,
            "{name}: NaN only in column 2"
        );
        assert!(
            out.y
                .chunks(features)
                .all(|r| r[2].is_nan() && !r[0].is_nan()),
            "{name}"
        );
    }
}

per_backend! {
    fn bad_input_is_an_error(name, norm) {
        let x = [1.0f32; 12];
        let three = [1.0f32; 3];
        let m4 = [true; 4];
        let none = [false; 4];
        let stats3 = RunningStats::new(3);
        let d = BatchNorm::default();
        let train = |x: &[f32], f, o: &BatchNorm<'_>| norm.batch_norm_train(x, f, o).map(|_| ());
        let eval = |x: &[f32], f, o: &BatchNorm<'_>, s: &RunningStats| {
            norm.batch_norm_eval(x, f, o, s).map(|_| ())
        };
        assert_eq!(train(&x, 0, &d), Err(NormError::ZeroFeatures), "{name}");
        assert_eq!(
            train(&x, 5, &d),
            Err(NormError::LengthNotMultiple {
                len: 12,
                features: 5
            }),
            "{name}"
        );
        assert!(
            matches!(train(&[], 3, &d), Err(NormError::EmptyBatch { .. })),
            "{name}"
        );
        assert!(
            matches!(eval(&[], 3, &d, &stats3), Err(NormError::EmptyBatch { .. })),
            "{name}"
        );
        let all_masked = BatchNorm {
            mask: Some(&none),
            ..d
        };
        assert!(
            matches!(train(&x, 3, &all_masked), Err(NormError::EmptyBatch { .. })),
            "{name}"
        );
        let short_mask = BatchNorm {
            mask: Some(&m4[..3]),
            ..d
        };
        assert_eq!(
            train(&x, 3, &short_mask),
            Err(NormError::MaskLength { len: 3, rows: 4 }),
            "{name}"
        );
        assert_eq!(
            eval(&x, 3, &short_mask, &stats3),
            Err(NormError::MaskLength { len: 3, rows: 4 }),
            "{name}"
        );
        let g = BatchNorm {
            gamma: Some(&three),
            ..d
        };
        assert_eq!(
            train(&x, 4, &g),
            Err(NormError::ParamLength {
                name: "gamma",
                len: 3,
                features: 4
            }),
            "{name}"
        );
        let b = BatchNorm {
            beta: Some(&three),
            ..d
        };
        assert_eq!(
            train(&x, 2, &b),
            Err(NormError::ParamLength {
                name: "beta",
                len: 3,
                features: 2
            }),
            "{name}"
        );
        for eps in [f32::NAN, f32::NEG_INFINITY, -1.0] {
            let e = BatchNorm { eps, ..d };
            assert!(
                matches!(train(&x, 3, &e), Err(NormError::InvalidEps(_))),
                "{name}"
            );
            assert!(
                matches!(eval(&x, 3, &e, &stats3), Err(NormError::InvalidEps(_))),
                "{name}"
            );
        }
        assert!(
            matches!(
                eval(&x, 4, &d, &stats3),
                Err(NormError::ParamLength {
                    name: "running mean",
                    ..
                })
            ),
            "{name}"
        );
        let bad_var = RunningStats {
            var: vec![1.0, -1.0, 1.0],
            ..RunningStats::new(3)
        };
        assert!(
            matches!(
                eval(&x, 3, &d, &bad_var),
                Err(NormError::InvalidParam { .. })
            ),
            "{name}"
        );
        let short_var = RunningStats {
            var: vec![1.0; 2],
            ..RunningStats::new(3)
        };
        assert!(
            matches!(
                eval(&x, 3, &d, &short_var),
                Err(NormError::ParamLength {
                    name: "running var",
                    ..
                })
            ),
            "{name}"
        );
        // Channels-first shapes.
        let cf = |x: &[f32], c, s| {
            norm.batch_norm_train_channels_first(x, c, s, &d)
                .map(|_| ())
        };
        assert_eq!(cf(&x, 0, 3), Err(NormError::ZeroFeatures), "{name}");
        assert_eq!(
            cf(&x, 3, 0),
            Err(NormError::ZeroDimension { name: "spatial" }),
            "{name}"
        );
        assert_eq!(
            cf(&x, 5, 2),
            Err(NormError::LengthNotMultiple {
                len: 12,
                features: 10
            }),
            "{name}"
        );
        // 12 values of 3 channels x 2 spatial are 2 items of 2 positions: 4 mask entries.
        let cf_mask = BatchNorm {
            mask: Some(&m4[..3]),
            ..d
        };
        assert_eq!(
            norm.batch_norm_train_channels_first(&x, 3, 2, &cf_mask)
                .map(|_| ()),
            Err(NormError::MaskLength { len: 3, rows: 4 }),
            "{name}"
        );
        let cf_ok = BatchNorm {
            mask: Some(&m4),
            ..d
        };
        assert!(
            norm.batch_norm_train_channels_first(&x, 3, 2, &cf_ok)
                .is_ok(),
            "{name}"
        );
        // Named shapes: the batch is checked too, and the product of the sizes must be the
        // input's length, overflow included.
        let named = |batch, channels, spatial| {
            let shape = ChannelsFirst { batch, channels, spatial };
            norm.batch_norm_train_nchw(&x, shape, &cf_ok).map(|_| ())
        };
        assert_eq!(named(2, 3, 2), Ok(()), "{name}");
        let wrong = named(1, 3, 2).unwrap_err();
        assert_eq!(
            wrong,
            NormError::ShapeLength { len: 12, batch: 1, channels: 3, spatial: 2 },
            "{name}"
        );
        assert!(
            wrong.to_string().contains("batch 1 × channels 3 × spatial 2 = 6"),
            "{name}: {wrong}"
        );
        assert_eq!(
            named(0, 3, 4),
            Err(NormError::ZeroDimension { name: "batch" }),
            "{name}"
        );
        assert!(
            matches!(named(usize::MAX, 3, 2), Err(NormError::ShapeLength { .. })),
            "{name}"
        );
        let stats = RunningStats::new(3);
        let eval_shape = ChannelsFirst { batch: 2, channels: 2, spatial: 3 };
        assert!(
            matches!(
                norm.batch_norm_eval_nchw(&x, eval_shape, &d, &stats),
                Err(NormError::ParamLength { .. })
            ),
            "{name}: running statistics of 3 channels for a shape of 2"
        );
    }
}

per_backend! {
    /// Columns whose f32 statistics would overflow or underflow (spreads of 1e19 and 1e20, values
    /// near 1e-22 with eps 0), beside ordinary columns, in both layouts: outputs and statistics
    /// match the reference, and a variance past f32's range (1e40) is reported as inf.
    fn columns_past_the_range_of_f32_statistics_stay_exact(name, norm) {
        let rows = 300;
        let cases = [("1e19", 1e19f32, 1e-5), ("1e20", 1e20, 1e-5), ("1e-22", 1e-22, 0.0)];
        for (what, spread, eps) in cases {
            // Column 1 holds the extreme values; columns 0 and 2 are ordinary.
            let mut x = ordinary(rows * 3, 9);
            for (r, v) in data(rows, 0.0, spread, 10).into_iter().enumerate() {
                x[r * 3 + 1] = v;
            }
            let opts = BatchNorm {
                eps,
                ..Default::default()
            };
            let out = norm.batch_norm_train(&x, 3, &opts).unwrap();
            let (y, mean, var, _) = reference::batch_norm_train(&x, 3, &opts);
            let err = max_err(&out.y, &y);
            assert!(err < TOL, "{name}: spread {what}: y error {err:e}");
            for c in 0..3 {
                let (m, v) = (out.mean[c] as f64, out.var[c] as f64);
                let close = (m - mean[c]).abs() <= 1e-4 * var[c].sqrt();
                assert!(close, "{name}: {what}: mean {m} vs {}", mean[c]);
                if var[c] > f32::MAX as f64 {
                    assert_eq!(out.var[c], f32::INFINITY, "{name}: {what}: var past f32");
                } else {
                    // Relative, down to f32's subnormal spacing (variances near 1e-44 round to it).
                    let tol = 1e-4 * var[c] + 2.0 * f32::from_bits(1) as f64;
                    assert!((v - var[c]).abs() <= tol, "{name}: {what}: var {v} vs {}", var[c]);
                }
            }
            // The same column as a channel of a channels-first tensor.
            let (channels, spatial) = (3, 1);
            let cf = norm
                .batch_norm_train_channels_first(&x, channels, spatial, &opts)
                .unwrap();
            assert!(max_err(&cf.y, &y) < TOL, "{name}: {what}: channels-first");
        }
        // A GPU tensor takes the same path, through a copy.
        if let Some(gpu) = norm.is_gpu().then_some(norm) {
            let x = data(rows * 2, 0.0, 1e20, 11);
            let t = gpu.upload(&x).unwrap();
            let (yt, stats) = gpu
                .batch_norm_train_gpu(&t, 2, &BatchNorm::default())
                .unwrap();
            let (y, _, _, _) = reference::batch_norm_train(&x, 2, &BatchNorm::default());
            assert!(max_err(&gpu.download(&yt).unwrap(), &y) < TOL, "GPU tensor");
            assert_eq!(stats.var, [f32::INFINITY; 2], "GPU tensor: var past f32");
        }
    }
}

per_backend! {
    /// Eval needs no batch statistics: a batch of padding only is all 0, not an error. Training
    /// on it is an error that speaks of the statistics it lacks; eval on nothing at all does not.
    fn eval_of_a_batch_of_padding_is_zero(name, norm) {
        let x = ordinary(4 * 8, 3);
        let none = [false; 4];
        let opts = BatchNorm {
            mask: Some(&none),
            ..Default::default()
        };
        let y = norm
            .batch_norm_eval(&x, 8, &opts, &RunningStats::new(8))
            .unwrap();
        assert!(y.iter().all(|&v| v == 0.0), "{name}: {y:?}");
        let train = norm.batch_norm_train(&x, 8, &opts).unwrap_err();
        assert!(train.to_string().contains("batch statistics"), "{name}: {train}");
        let empty = norm
            .batch_norm_eval::<f32>(&[], 8, &BatchNorm::default(), &RunningStats::new(8))
            .unwrap_err();
        assert!(!empty.to_string().contains("statistics"), "{name}: {empty}");
    }
}

/// A bad running variance is named by its feature.
#[test]
fn a_bad_running_variance_names_its_feature() {
    let mut stats = RunningStats::new(5);
    stats.var[3] = f32::NAN;
    let err = Normalizer::cpu()
        .batch_norm_eval(&[1.0; 10], 5, &BatchNorm::default(), &stats)
        .unwrap_err();
    assert!(
        matches!(
            err,
            NormError::InvalidParam {
                feature: Some(3),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("running var of feature 3"),
        "{err}"
    );
}

#[test]
fn bad_lengths_make_no_mask() {
    assert_eq!(
        mask_from_lengths(&[2, 5], 4),
        Err(NormError::SequenceTooLong {
            index: 1,
            length: 5,
            seq_len: 4
        })
    );
    // A mask too large to address is an error, not an abort in the allocator.
    assert!(matches!(
        mask_from_lengths(&[1, 1], usize::MAX),
        Err(NormError::TooLarge { .. })
    ));
    assert_eq!(
        mask_from_lengths(&[2, 0, 3], 3).unwrap(),
        [true, true, false, false, false, false, true, true, true]
    );
}

#[test]
fn repeated_gpu_runs_are_bitwise_identical() {
    let Some(norm) = gpu() else { return };
    for &(rows, features) in &[(20_000, 3), (300, 257)] {
        let x = ordinary(rows * features, 2);
        let first = norm
            .batch_norm_train(&x, features, &BatchNorm::default())
            .unwrap();
        for _ in 0..3 {
            let again = norm
                .batch_norm_train(&x, features, &BatchNorm::default())
                .unwrap();
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&first.y), bits(&again.y));
            assert_eq!(bits(&first.mean), bits(&again.mean));
            assert_eq!(bits(&first.var), bits(&again.var));
        }
    }
}

/// The CPU fallback merges fixed blocks in a fixed order: one thread or many, the same bits.
#[test]
fn cpu_results_do_not_depend_on_the_thread_count() {
    let cpu = Normalizer::cpu();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    // Narrow rows, and rows wider than one statistics tile with a mask.
    for &(rows, features) in &[(40_000, 5), (700, 2500)] {
        let x = ordinary(rows * features, 3);
        let mask = random_mask(rows, 6);
        let opts = BatchNorm {
            mask: (features > 5).then_some(&mask[..]),
            ..Default::default()
        };
        let many = cpu.batch_norm_train(&x, features, &opts).unwrap();
        let one = pool.install(|| cpu.batch_norm_train(&x, features, &opts).unwrap());
        assert_eq!(many, one, "{rows}x{features}");
    }
}

per_backend! {
    fn into_a_caller_buffer_gives_the_same_result(name, norm) {
        let (rows, features) = (300, 10);
        let x = ordinary(rows * features, 4);
        let mask = random_mask(rows, 2);
        let opts = BatchNorm {
            mask: Some(&mask),
            ..Default::default()
        };
        let out = norm.batch_norm_train(&x, features, &opts).unwrap();
        let mut y = vec![f32::NAN; x.len()];
        let (stats, _) = norm
            .batch_norm_train_into(&x, features, &opts, &mut y)
            .unwrap();
        assert_eq!(
            (&y, &stats.mean, &stats.var, stats.count),
            (&out.y, &out.mean, &out.var, out.count),
            "{name}"
        );

        let mut a = RunningStats::new(features);
        let mut b = RunningStats::new(features);
        a.update(&out).unwrap();
        b.update_with(&stats).unwrap();
        assert_eq!(a, b, "{name}");

        let expected = norm.batch_norm_eval(&x, features, &opts, &a).unwrap();
        let mut y = vec![f32::NAN; x.len()];
        norm.batch_norm_eval_into(&x, features, &opts, &a, &mut y)
            .unwrap();
        assert_eq!(y, expected, "{name}");
        assert_eq!(
            norm.batch_norm_eval_into(&x, features, &opts, &a, &mut y[1..])
                .map(|_| ()),
            Err(NormError::OutputLength {
                len: x.len() - 1,
                expected: x.len()
            }),
            "{name}"
        );
    }
}

/// Outputs of 32 MiB and more leave the CPU fallback through non-temporal stores; odd feature
/// counts and masks put row starts at every alignment.
#[test]
fn cpu_fallback_streams_large_outputs_exactly() {
    let cpu = Normalizer::cpu();
    for &(features, masked) in &[(1027, true), (3, false)] {
        let rows = (9 << 20) / features + 1;
        let x = ordinary(rows * features, 5);
        let mask = random_mask(rows, 3);
        let opts = BatchNorm {
            mask: masked.then_some(&mask[..]),
            ..Default::default()
        };
        train_and_check(
            &format!("cpu {rows}x{features}"),
            &cpu,
            &x,
            features,
            &opts,
            TOL,
        );
    }
}

/// A tensor larger than llvmpipe's 128 MiB binding limit is split into chunks of whole rows:
/// statistics over all of them, then each chunk normalized.
#[test]
fn gpu_tensors_larger_than_one_binding_are_chunked() {
    let Some(norm) = gpu() else { return };
    let (rows, features) = (36 * 1024, 1024); // 144 MiB of f32
    let x = data(rows * features, 3.0, 1.5, 31);
    let mask = random_mask(rows, 8);
    let opts = BatchNorm {
        mask: Some(&mask),
        ..Default::default()
    };
    let out = norm.batch_norm_train(&x, features, &opts).unwrap();
    let (mean, var, count) = reference::column_stats(&x, features, Some(&mask));
    assert_eq!(out.count, count);
    assert!(
        max_err(&out.mean, &mean) < TOL && stat_err(&out.var, &var) < TOL,
        "statistics"
    );
    // Spot-check rows at the start, around the chunk boundary and at the end.
    for row in [0, 1, rows / 2, 32767, 32768, rows - 1] {
        let range = row * features..(row + 1) * features;
        let y_ref = reference::batch_norm_apply(
            &x[range.clone()],
            features,
            &mean,
            &var,
            &BatchNorm {
                mask: Some(&mask[row..row + 1]),
                ..opts
            },
        );
        let err = max_err(&out.y[range], &y_ref);
        assert!(err < TOL, "row {row}: error {err:e}");
    }
    let stats = RunningStats {
        mean: out.mean.clone(),
        var: out.var.clone(),
        momentum: 0.1,
    };
    let y = norm.batch_norm_eval(&x, features, &opts, &stats).unwrap();
    let last = (rows - 1) * features..rows * features;
    let y_ref = reference::batch_norm_apply(
        &x[last.clone()],
        features,
        &to_f64(&stats.mean),
        &to_f64(&stats.var),
        &BatchNorm {
            mask: Some(&mask[rows - 1..]),
            ..opts
        },
    );
    assert!(max_err(&y[last], &y_ref) < TOL, "eval, last row");
}
