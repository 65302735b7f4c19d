//! Property tests on both backends: random shapes (1×1 up to about 100 KiB), magnitudes from 1e-30
//! to 1e30 (past where f32 statistics overflow or lose their bits) with offsets up to 100× the
//! spread, gamma, beta and masks, and a NaN in some row. Every call either matches the f64
//! reference within tolerance or (where a NaN is in its row) gives NaN there only; GPU results
//! repeat bit for bit. BatchNorm's backward pass runs on the same batches.

mod common;

use common::{dx_error, max_err};
use gpunorm::{reference, BatchNorm, LayerNorm};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// Offsets up to 100× the spread cost up to two more digits than ordinary data (1e-4).
const TOL: f64 = 1e-3;

/// A batch: rows, features, the values, optional gamma and beta, and a row holding a NaN.
#[derive(Debug, Clone)]
struct Batch {
    rows: usize,
    features: usize,
    x: Vec<f32>,
    gamma: Option<Vec<f32>>,
    beta: Option<Vec<f32>>,
    nan_row: Option<usize>,
    mask: Vec<bool>,
}

fn batches() -> impl Strategy<Value = Batch> {
    (1usize..48, 1usize..700, -30i32..30, -100f32..100.0).prop_flat_map(
        |(rows, features, exponent, offset)| {
            let n = rows * features;
            let spread = 10f32.powi(exponent);
            (
                Just((rows, features)),
                proptest::collection::vec(-1.7f32..1.7, n),
                proptest::option::of(proptest::collection::vec(0.25f32..2.0, features)),
                proptest::option::of(proptest::collection::vec(-1f32..1.0, features)),
                proptest::option::of(0..rows),
                proptest::collection::vec(any::<bool>(), rows),
                Just((spread, offset)),
            )
                .prop_map(
                    move |(
                        (rows, features),
                        unit,
                        gamma,
                        beta,
                        nan_row,
                        mut mask,
                        (spread, offset),
                    )| {
                        let x = unit.iter().map(|u| (offset + u) * spread).collect();
                        mask[0] = true;
                        Batch {
                            rows,
                            features,
                            x,
                            gamma,
                            beta,
                            nan_row,
                            mask,
                        }
                    },
                )
        },
    )
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: 40,
        failure_persistence: None,
        ..Config::default()
    })
}

per_backend! {
    fn layer_norm_matches_the_reference(name, norm) {
        runner()
            .run(&batches(), |b| {
                let mut x = b.x.clone();
                if let Some(r) = b.nan_row {
                    x[r * b.features] = f32::NAN;
                }
                let opts = LayerNorm {
                    gamma: b.gamma.as_deref(),
                    beta: b.beta.as_deref(),
                    ..Default::default()
                };
                let y = norm.layer_norm(&x, b.features, &opts).unwrap();
                let r = reference::layer_norm(&x, b.features, &opts);
                for row in 0..b.rows {
                    let span = row * b.features..(row + 1) * b.features;
                    if Some(row) == b.nan_row {
                        prop_assert!(y[span].iter().all(|v| v.is_nan()), "{name}: row {row}");
                    } else {
                        let err = max_err(&y[span.clone()], &r[span]);
                        prop_assert!(err < TOL, "{name}: row {row}: error {err:e}");
                    }
                }
                if norm.is_gpu() {
                    let again = norm.layer_norm(&x, b.features, &opts).unwrap();
                    prop_assert!(bits(&again) == bits(&y), "{name}: not repeatable");
                }
                Ok(())
            })
            .unwrap();
    }
}

per_backend! {
    fn batch_norm_matches_the_reference(name, norm) {
        runner()
            .run(&batches(), |b| {
                let opts = BatchNorm {
                    gamma: b.gamma.as_deref(),
                    beta: b.beta.as_deref(),
                    mask: Some(&b.mask),
                    ..Default::default()
                };
                let out = norm.batch_norm_train(&b.x, b.features, &opts).unwrap();
                let (y, mean, var, count) = reference::batch_norm_train(&b.x, b.features, &opts);
                prop_assert_eq!(out.count, count);
                // Statistics relative to the spread of the data they describe.
                let spread = b.x.iter().fold(0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
                let rel = |v: &[f32], r: &[f64], s: f64| {
                    v.iter().zip(r).map(|(&a, &b)| (a as f64 - b).abs() / s).fold(0.0, f64::max)
                };
                let err = max_err(&out.y, &y).max(rel(&out.mean, &mean, spread as f64));
                prop_assert!(err < TOL, "{name}: error {err:e}");
                for (&v, &r) in out.var.iter().zip(&var) {
                    if r > f32::MAX as f64 {
                        prop_assert_eq!(v, f32::INFINITY, "{}: a variance past f32", name);
                    } else {
                        // Relative, down to f32's subnormal spacing (variances near 1e-60 are 0)
                        // on the CPU; on a GPU down to the smallest normal f32, as GPUs may flush
                        // subnormal results to zero (the H100's Vulkan driver does, and wgpu has
                        // no switch for it), so variances under 1.2e-38 may come out 0.
                        let floor = if norm.is_gpu() {
                            f32::MIN_POSITIVE as f64
                        } else {
                            2.0 * f32::from_bits(1) as f64
                        };
                        let tol = TOL * r + floor;
                        prop_assert!((v as f64 - r).abs() <= tol, "{name}: var {v} vs {r}");
                    }
                }
                if norm.is_gpu() {
                    let again = norm.batch_norm_train(&b.x, b.features, &opts).unwrap();
                    prop_assert!(bits(&again.y) == bits(&out.y), "{name}: not repeatable");
                }
                Ok(())
            })
            .unwrap();
    }
}

per_backend! {
    /// BatchNorm's backward pass on the same batches (no NaN), dy with a mean far from 0:
    /// dx against each feature's largest gradient, dbeta relative, and dgamma relative to the
    /// larger of |dgamma| and |Σ dy| / 512 (its sensitivity to the mean; see tests/backward.rs).
    fn batch_norm_backward_matches_the_reference(name, norm) {
        runner()
            .run(&batches(), |b| {
                let opts = BatchNorm {
                    gamma: b.gamma.as_deref(),
                    beta: b.beta.as_deref(),
                    mask: Some(&b.mask),
                    ..Default::default()
                };
                let dy: Vec<f32> = (0..b.x.len()).map(|i| (i as f32 * 0.7).sin() + 0.3).collect();
                let got = norm.batch_norm_backward(&b.x, &dy, b.features, &opts).unwrap();
                let (dx, dgamma, dbeta) = reference::batch_norm_backward(&b.x, &dy, b.features, &opts);
                let dx_err = dx_error(&got.dx, &dx, b.x.len());
                prop_assert!(dx_err < TOL, "{name}: dx error {dx_err:e}");
                let dbeta_err = max_err(&got.dbeta, &dbeta);
                prop_assert!(dbeta_err < TOL, "{name}: dbeta error {dbeta_err:e}");
                for ((&g, &r), &sum_dy) in got.dgamma.iter().zip(&dgamma).zip(&dbeta) {
                    let err = (g as f64 - r).abs() / r.abs().max(1.0).max(sum_dy.abs() / 512.0);
                    prop_assert!(err < TOL, "{name}: dgamma {g} vs {r}");
                }
                let masked = (0..b.rows).filter(|&r| !b.mask[r]);
                let zero = |r: usize| got.dx[r * b.features..(r + 1) * b.features].iter().all(|&v| v == 0.0);
                prop_assert!(masked.clone().all(zero), "{name}: a masked row's dx is not 0");
                Ok(())
            })
            .unwrap();
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|v| v.to_bits()).collect()
}
