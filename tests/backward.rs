//! The backward passes of LayerNorm, RMSNorm and BatchNorm training on every backend: the f64 references against
//! central differences of the f64 forwards, then each backend against the references (row
//! lengths, gamma, offset rows, magnitudes past f32's range, NaN, chunks, bad input, bitwise
//! repeats). Tolerances are max |v − ref| / max(1, |ref|) for dgamma and dbeta; for dx, whose
//! elements are differences of terms as large as the row's gradients, the error is measured
//! against the row's largest: max |dx − ref| / max(1, max |ref in the row|) (`dx_error`).

mod common;

use common::{data, dx_error, gpu, max_err, ordinary, ulps_apart};
use gpunorm::half::f16;
use gpunorm::{reference, BatchNorm, ChannelsFirst, LayerNorm, NormError, Normalizer, RmsNorm};

/// Ordinary data: f32 rounding of a few operations per value, and of sums over rows.
const TOL: f64 = 1e-4;
/// Rows with mean 1e4 and spread 1e-2, as the forward's bound for them.
const TOL_OFFSET: f64 = 1e-3;

/// Σ y · w of a forward output, the loss whose gradient with dy = w the backward computes.
fn loss(y: &[f64], w: &[f32]) -> f64 {
    y.iter().zip(w).map(|(y, &w)| y * w as f64).sum()
}

/// The derivative of `f` at `v` by central differences. The step is taken in f32 and measured
/// after rounding, so the quotient has only the O(h²) error of the method.
fn derivative(v: f32, f: impl Fn(f32) -> f64) -> f64 {
    let h = v.abs().max(1.0) * 2f32.powi(-9);
    let (up, down) = (v + h, v - h);
    (f(up) - f(down)) / (up as f64 - down as f64)
}

/// Every gradient the references give matches central differences of the f64 forwards, for
/// LayerNorm (x, gamma, beta) and RMSNorm (x, gamma), to 1e-5 of its size.
#[test]
fn the_references_match_central_differences() {
    let (rows, features) = (3, 5);
    let x = ordinary(rows * features, 1);
    let w = ordinary(rows * features, 2);
    let gamma = data(features, 1.0, 0.5, 3);
    let beta = data(features, 0.0, 0.5, 4);
    let close = |what: &str, numeric: f64, analytic: f64| {
        let err = (numeric - analytic).abs() / analytic.abs().max(1.0);
        assert!(err < 1e-5, "{what}: numeric {numeric} analytic {analytic}");
    };

    let ln = |x: &[f32], g: &[f32], b: &[f32]| {
        let opts = LayerNorm {
            gamma: Some(g),
            beta: Some(b),
            ..Default::default()
        };
        loss(&reference::layer_norm(x, features, &opts), &w)
    };
    let opts = LayerNorm {
        gamma: Some(&gamma),
        beta: Some(&beta),
        ..Default::default()
    };
    let (dx, dgamma, dbeta) = reference::layer_norm_backward(&x, &w, features, &opts);
    for i in 0..x.len() {
        let numeric = derivative(x[i], |v| {
            let mut x = x.clone();
            x[i] = v;
            ln(&x, &gamma, &beta)
        });
        close(&format!("LayerNorm dx[{i}]"), numeric, dx[i]);
    }
    for c in 0..features {
        let numeric = derivative(gamma[c], |v| {
            let mut g = gamma.clone();
            g[c] = v;
            ln(&x, &g, &beta)
        });
        close(&format!("LayerNorm dgamma[{c}]"), numeric, dgamma[c]);
        let numeric = derivative(beta[c], |v| {
            let mut b = beta.clone();
            b[c] = v;
            ln(&x, &gamma, &b)
        });
        close(&format!("LayerNorm dbeta[{c}]"), numeric, dbeta[c]);
    }

    let rms = |x: &[f32], g: &[f32]| {
        let opts = RmsNorm {
            gamma: Some(g),
            ..Default::default()
        };
        loss(&reference::rms_norm(x, features, &opts), &w)
    };
    let opts = RmsNorm {
        gamma: Some(&gamma),
        ..Default::default()
    };
    let (dx, dgamma) = reference::rms_norm_backward(&x, &w, features, &opts);
    for i in 0..x.len() {
        let numeric = derivative(x[i], |v| {
            let mut x = x.clone();
            x[i] = v;
            rms(&x, &gamma)
        });
        close(&format!("RMSNorm dx[{i}]"), numeric, dx[i]);
    }
    for c in 0..features {
        let numeric = derivative(gamma[c], |v| {
            let mut g = gamma.clone();
            g[c] = v;
            rms(&x, &g)
        });
        close(&format!("RMSNorm dgamma[{c}]"), numeric, dgamma[c]);
    }
}

/// The error of a backend's LayerNorm gradients against the reference: (dx, dgamma, dbeta).
fn ln_errors(norm: &Normalizer, x: &[f32], dy: &[f32], f: usize, o: &LayerNorm) -> [f64; 3] {
    let got = norm.layer_norm_backward(x, dy, f, o).expect("valid input");
    let (dx, dgamma, dbeta) = reference::layer_norm_backward(x, dy, f, o);
    assert_eq!((got.dgamma.len(), got.dbeta.len()), (f, f));
    [
        dx_error(&got.dx, &dx, f),
        max_err(&got.dgamma, &dgamma),
        max_err(&got.dbeta, &dbeta),
    ]
}

/// The error of a backend's RMSNorm gradients against the reference: (dx, dgamma).
fn rms_errors(norm: &Normalizer, x: &[f32], dy: &[f32], f: usize, o: &RmsNorm) -> [f64; 2] {
    let got = norm.rms_norm_backward(x, dy, f, o).expect("valid input");
    let (dx, dgamma) = reference::rms_norm_backward(x, dy, f, o);
    assert_eq!(got.dgamma.len(), f);
    [dx_error(&got.dx, &dx, f), max_err(&got.dgamma, &dgamma)]
}

per_backend! {
    /// Row lengths from 1 to 65537 (the GPU's f32 and vec4 kernels), ordinary and offset rows,
    /// without and with gamma (and beta, which the gradients do not depend on).
    fn every_row_length_matches_the_reference(name, norm) {
        for &features in &[1, 2, 3, 4, 5, 127, 768, 4097, 65537] {
            let rows = if features > 10_000 { 2 } else { 37 };
            let gamma = data(features, 1.0, 0.5, 5);
            let beta = data(features, 0.0, 0.5, 6);
            let dy = ordinary(rows * features, 7);
            for (what, x, tol) in [
                ("ordinary", ordinary(rows * features, features as u64), TOL),
                ("mean 1e4 spread 1e-2", data(rows * features, 1e4, 1e-2, 8), TOL_OFFSET),
            ] {
                for (g, b) in [(None, None), (Some(&gamma[..]), Some(&beta[..]))] {
                    let opts = LayerNorm { gamma: g, beta: b, ..Default::default() };
                    let err = ln_errors(norm, &x, &dy, features, &opts);
                    assert!(
                        err.iter().all(|&e| e < tol),
                        "{name}: LayerNorm {features} features, {what}, gamma {}: {err:?}",
                        g.is_some()
                    );
                    let opts = RmsNorm { gamma: g, ..Default::default() };
                    let err = rms_errors(norm, &x, &dy, features, &opts);
                    assert!(
                        err.iter().all(|&e| e < TOL),
                        "{name}: RMSNorm {features} features, {what}, gamma {}: {err:?}",
                        g.is_some()
                    );
                }
            }
        }
    }
}

per_backend! {
    /// Rows whose statistics leave f32's range (spreads of 1e20, values near 3e38, values near
    /// 1e-22 with eps 0) give the reference's gradients: both backends redo them (the CPU in
    /// f64, the GPU scaled by a power of two).
    fn rows_past_the_range_of_f32_statistics(name, norm) {
        let mut failed = Vec::new();
        for features in [1, 2, 7, 300, 4096] {
            let dy = ordinary(3 * features, 9);
            for (what, x, eps) in [
                ("spread 1e20", data(3 * features, 0.0, 1e20, 1), 1e-5),
                ("near 3e38", data(3 * features, 3e38, 1e36, 2), 1e-5),
                ("spread 1e-22, eps 0", data(3 * features, 0.0, 1e-22, 3), 0.0),
            ] {
                if features <= 2 && eps == 0.0 {
                    // With eps 0, dx of a row of one value (of two, for LayerNorm) is exactly 0,
                    // a difference of terms of |dy| · rstd = 1e22 here: f32 keeps it to 1e-7 of
                    // those terms (1e15), not to 1e-4 absolute. Not a case a model meets.
                    continue;
                }
                let err = ln_errors(norm, &x, &dy, features, &LayerNorm { eps, ..Default::default() });
                if err.iter().any(|&e| e >= TOL) {
                    failed.push(format!("LayerNorm {what}, {features}: {err:?}"));
                }
                let err = rms_errors(norm, &x, &dy, features, &RmsNorm { eps, gamma: None });
                if err.iter().any(|&e| e >= TOL) {
                    failed.push(format!("RMSNorm {what}, {features}: {err:?}"));
                }
            }
        }
        assert!(failed.is_empty(), "{name}:\n{}", failed.join("\n"));
    }
}

per_backend! {
    /// A NaN in x makes its own row's dx NaN and leaves the other rows' dx alone.
    fn a_nan_poisons_only_its_own_row(name, norm) {
        for &features in &[3, 8, 4097] {
            let mut x = ordinary(4 * features, 5);
            x[features + 1] = f32::NAN;
            let dy = ordinary(4 * features, 6);
            let got = norm.layer_norm_backward(&x, &dy, features, &LayerNorm::default()).unwrap();
            let (dx, _, _) = reference::layer_norm_backward(&x, &dy, features, &LayerNorm::default());
            assert!(got.dx[features..2 * features].iter().all(|v| v.is_nan()), "{name}");
            for row in [0, 2, 3] {
                let range = row * features..(row + 1) * features;
                let err = dx_error(&got.dx[range.clone()], &dx[range], features);
                assert!(err < TOL, "{name}: {features} features, row {row}: {err:e}");
            }
        }
    }
}

per_backend! {
    fn bad_input_is_an_error(name, norm) {
        let x = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let ln = LayerNorm::default();
        assert_eq!(
            norm.layer_norm_backward(&x, &x[..5], 3, &ln),
            Err(NormError::OperandLength { name: "dy", len: 5, expected: 6 }),
            "{name}"
        );
        assert_eq!(
            norm.rms_norm_backward(&x, &[0.0; 7], 3, &RmsNorm::default()),
            Err(NormError::OperandLength { name: "dy", len: 7, expected: 6 }),
            "{name}"
        );
        let gamma = [1.0f32; 2];
        let opts = LayerNorm { gamma: Some(&gamma), ..ln };
        assert!(
            matches!(
                norm.layer_norm_backward(&x, &x, 3, &opts),
                Err(NormError::ParamLength { name: "gamma", .. })
            ),
            "{name}"
        );
        assert_eq!(norm.layer_norm_backward(&x, &x, 0, &ln), Err(NormError::ZeroFeatures));
        let eps = RmsNorm { eps: -1.0, gamma: None };
        assert!(matches!(norm.rms_norm_backward(&x, &x, 3, &eps), Err(NormError::InvalidEps(_))));
        let empty = norm.layer_norm_backward::<f32>(&[], &[], 3, &ln).unwrap();
        assert_eq!((empty.dx.len(), empty.dgamma, empty.dbeta), (0, vec![0.0; 3], vec![0.0; 3]));
    }
}

per_backend! {
    /// Enough rows to run in several chunks where bindings are small (CI runs this file again
    /// with 1 MiB bindings): the column sums add up across chunks.
    fn gradients_add_up_across_chunks(name, norm) {
        let (rows, features) = (700, 1000);
        let x = ordinary(rows * features, 11);
        let dy = ordinary(rows * features, 12);
        let gamma = data(features, 1.0, 0.5, 13);
        let opts = LayerNorm { gamma: Some(&gamma), ..Default::default() };
        let err = ln_errors(norm, &x, &dy, features, &opts);
        assert!(err.iter().all(|&e| e < TOL), "{name}: {err:?}");
    }
}

per_backend! {
    /// dbeta over many rows of same-signed gradients, the worst case for the rounding of a sum,
    /// stays within 4e-7 of the reference (a few ulps of f32): the GPU adds its 2048 (LayerNorm)
    /// or 1024 (BatchNorm) tile partials in blocks of 32 (2.3e-7 and 5e-8 on llvmpipe), where
    /// adding them one after another erred by 7.7e-7 and 5.3e-7. dgamma over the same rows, with a zero-mean dy, within TOL. (With a
    /// same-signed dy, BatchNorm's dgamma = Σ dy · xhat nearly cancels, and its error is that of
    /// the mean times the row count, in any f32 implementation.)
    fn column_sums_over_many_rows_stay_accurate(name, norm) {
        let (rows, features) = (131_072, 4);
        let x = ordinary(rows * features, 81);
        let (ones, zero_mean) = (data(rows * features, 1.0, 0.1, 82), ordinary(rows * features, 83));
        let ln = LayerNorm::default();
        let bn = BatchNorm::default();
        let dbeta = [
            max_err(
                &norm.layer_norm_backward(&x, &ones, features, &ln).unwrap().dbeta,
                &reference::layer_norm_backward(&x, &ones, features, &ln).2,
            ),
            max_err(
                &norm.batch_norm_backward(&x, &ones, features, &bn).unwrap().dbeta,
                &reference::batch_norm_backward(&x, &ones, features, &bn).2,
            ),
        ];
        assert!(dbeta.iter().all(|&e| e < 4e-7), "{name}: dbeta (LayerNorm, BatchNorm): {dbeta:?}");
        let dgamma = [
            max_err(
                &norm.layer_norm_backward(&x, &zero_mean, features, &ln).unwrap().dgamma,
                &reference::layer_norm_backward(&x, &zero_mean, features, &ln).1,
            ),
            max_err(
                &norm.batch_norm_backward(&x, &zero_mean, features, &bn).unwrap().dgamma,
                &reference::batch_norm_backward(&x, &zero_mean, features, &bn).1,
            ),
        ];
        assert!(dgamma.iter().all(|&e| e < TOL), "{name}: dgamma (LayerNorm, BatchNorm): {dgamma:?}");
    }
}

#[test]
fn repeated_gpu_gradients_are_bitwise_identical() {
    let Some(norm) = gpu() else { return };
    let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    for &features in &[7, 1024] {
        let x = ordinary(300 * features, 14);
        let dy = ordinary(300 * features, 15);
        let a = norm
            .layer_norm_backward(&x, &dy, features, &LayerNorm::default())
            .unwrap();
        for _ in 0..2 {
            let b = norm
                .layer_norm_backward(&x, &dy, features, &LayerNorm::default())
                .unwrap();
            assert_eq!(bits(&a.dx), bits(&b.dx), "{features} features: dx");
            assert_eq!(
                bits(&a.dgamma),
                bits(&b.dgamma),
                "{features} features: dgamma"
            );
            assert_eq!(bits(&a.dbeta), bits(&b.dbeta), "{features} features: dbeta");
        }
    }
}

// ---- BatchNorm training's backward pass --------------------------------------------------

/// The reference's BatchNorm gradients match central differences of the f64 forward (the
/// output of `reference::batch_norm_train`, batch statistics included), with a mask.
#[test]
fn the_batch_norm_reference_matches_central_differences() {
    let (rows, features) = (6, 3);
    let x = ordinary(rows * features, 21);
    let w = ordinary(rows * features, 22);
    let gamma = data(features, 1.0, 0.5, 23);
    let beta = data(features, 0.0, 0.5, 24);
    let mask = [true, true, false, true, true, true];
    let loss = |x: &[f32], g: &[f32], b: &[f32]| {
        let opts = BatchNorm {
            gamma: Some(g),
            beta: Some(b),
            mask: Some(&mask),
            ..Default::default()
        };
        self::loss(&reference::batch_norm_train(x, features, &opts).0, &w)
    };
    let opts = BatchNorm {
        gamma: Some(&gamma),
        beta: Some(&beta),
        mask: Some(&mask),
        ..Default::default()
    };
    let (dx, dgamma, dbeta) = reference::batch_norm_backward(&x, &w, features, &opts);
    let close = |what: String, numeric: f64, analytic: f64| {
        let err = (numeric - analytic).abs() / analytic.abs().max(1.0);
        assert!(err < 1e-5, "{what}: numeric {numeric} analytic {analytic}");
    };
    for i in 0..x.len() {
        let numeric = derivative(x[i], |v| {
            let mut x = x.clone();
            x[i] = v;
            loss(&x, &gamma, &beta)
        });
        close(format!("dx[{i}]"), numeric, dx[i]);
    }
    for c in 0..features {
        let numeric = derivative(gamma[c], |v| {
            let mut g = gamma.clone();
            g[c] = v;
            loss(&x, &g, &beta)
        });
        close(format!("dgamma[{c}]"), numeric, dgamma[c]);
        let numeric = derivative(beta[c], |v| {
            let mut b = beta.clone();
            b[c] = v;
            loss(&x, &gamma, &b)
        });
        close(format!("dbeta[{c}]"), numeric, dbeta[c]);
    }
}

/// A backend's BatchNorm gradients against the reference: (dx, dgamma, dbeta) errors. dx is
/// held to its feature's largest gradient, measured over the whole tensor's rows here.
///
/// dgamma = Σ dy · (x − mean) · rstd moves by rstd · Σ dy for each unit the mean is off, and
/// the GPU keeps each column's mean − shift in f32 (a shift that is one of the column's values,
/// so about a spread away): a few roundings of it, 2e-7 spreads, move dgamma by 2e-7 · Σ dy.
/// So dgamma's error is measured against the larger of max(1, |dgamma|) and |Σ dy| / 512: with
/// TOL, the mean held within 2e-7 spreads where dy's mean is far from 0 and dgamma cancels.
fn bn_errors(norm: &Normalizer, x: &[f32], dy: &[f32], f: usize, o: &BatchNorm) -> [f64; 3] {
    let got = norm.batch_norm_backward(x, dy, f, o).expect("valid input");
    let (dx, dgamma, dbeta) = reference::batch_norm_backward(x, dy, f, o);
    assert_eq!((got.dgamma.len(), got.dbeta.len()), (f, f));
    let dgamma_err = got
        .dgamma
        .iter()
        .zip(&dgamma)
        .zip(&dbeta)
        .map(|((&g, &r), &sum_dy)| {
            (g as f64 - r).abs() / r.abs().max(1.0).max(sum_dy.abs() / 512.0)
        });
    [
        dx_error(&got.dx, &dx, x.len()),
        dgamma_err.fold(0.0, f64::max),
        max_err(&got.dbeta, &dbeta),
    ]
}

per_backend! {
    /// Features-last shapes across the statistics kernels' tilings, with a mask and gamma,
    /// on ordinary and offset data, and enough rows to chunk at 1 MiB bindings (CI).
    fn batch_norm_gradients_match_the_reference(name, norm) {
        for &(rows, features) in &[(64, 3), (300, 16), (97, 768), (1000, 5), (3000, 100)] {
            let dy = ordinary(rows * features, 31);
            let mask: Vec<bool> = (0..rows).map(|r| r % 7 != 3).collect();
            let gamma = data(features, 1.0, 0.5, 32);
            let opts = BatchNorm { mask: Some(&mask), gamma: Some(&gamma), ..Default::default() };
            for (what, x, tol) in [
                ("ordinary", ordinary(rows * features, 33), TOL),
                ("mean 1e4 spread 1e-2", data(rows * features, 1e4, 1e-2, 34), TOL_OFFSET),
            ] {
                let err = bn_errors(norm, &x, &dy, features, &opts);
                assert!(
                    err.iter().all(|&e| e < tol),
                    "{name}: {rows}x{features} {what}: {err:?}"
                );
            }
            let err = bn_errors(norm, &ordinary(rows * features, 35), &dy, features, &BatchNorm::default());
            assert!(err.iter().all(|&e| e < TOL), "{name}: {rows}x{features} unmasked: {err:?}");
        }
    }
}

per_backend! {
    /// Channels-first tensors: the same gradients as their features-last transpose.
    fn batch_norm_channels_first_gradients(name, norm) {
        for &(batch, channels, spatial) in &[(2, 3, 4), (4, 16, 49), (3, 5, 1)] {
            let len = batch * channels * spatial;
            let (x, dy) = (ordinary(len, 41), ordinary(len, 42));
            let mask: Vec<bool> = (0..batch * spatial).map(|p| p % 5 != 1).collect();
            let opts = BatchNorm { mask: Some(&mask), ..Default::default() };
            let got = norm.batch_norm_backward_channels_first(&x, &dy, channels, spatial, &opts).unwrap();
            let named = ChannelsFirst { batch, channels, spatial };
            assert_eq!(norm.batch_norm_backward_nchw(&x, &dy, named, &opts).unwrap(), got);
            let last = |v: &[f32]| reference::channels_first_to_last(v, channels, spatial);
            let (dx, dgamma, dbeta) =
                reference::batch_norm_backward(&last(&x), &last(&dy), channels, &opts);
            let dx = reference::channels_last_to_first(&dx, channels, spatial);
            let err = [dx_error(&got.dx, &dx, len), max_err(&got.dgamma, &dgamma), max_err(&got.dbeta, &dbeta)];
            assert!(err.iter().all(|&e| e < TOL), "{name}: {batch}x{channels}x{spatial}: {err:?}");
        }
    }
}

per_backend! {
    /// Masked rows get dx = 0 and add nothing: whatever they hold (here NaN and 1e30 against
    /// zeros) changes no other output, bit for bit.
    fn padded_rows_change_nothing_else(name, norm) {
        let (rows, features) = (40, 12);
        let mask: Vec<bool> = (0..rows).map(|r| r % 4 != 0).collect();
        let opts = BatchNorm { mask: Some(&mask), ..Default::default() };
        let (mut x, mut dy) = (ordinary(rows * features, 51), ordinary(rows * features, 52));
        let bits = |g: &gpunorm::BatchNormGrads| {
            [&g.dx, &g.dgamma, &g.dbeta].map(|v| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>())
        };
        for r in (0..rows).filter(|r| !mask[*r]) {
            x[r * features..(r + 1) * features].fill(0.0);
            dy[r * features..(r + 1) * features].fill(0.0);
        }
        let clean = norm.batch_norm_backward(&x, &dy, features, &opts).unwrap();
        for r in (0..rows).filter(|r| !mask[*r]) {
            x[r * features..(r + 1) * features].fill(f32::NAN);
            dy[r * features..(r + 1) * features].fill(1e30);
        }
        let padded = norm.batch_norm_backward(&x, &dy, features, &opts).unwrap();
        assert_eq!(bits(&clean), bits(&padded), "{name}");
        assert!(padded.dx.chunks(features).enumerate().all(|(r, row)| mask[r] || row.iter().all(|&v| v == 0.0)));
    }
}

per_backend! {
    /// Columns whose statistics leave f32's range give the reference's gradients too.
    fn batch_norm_columns_past_the_range_of_f32(name, norm) {
        let (rows, features) = (200, 6);
        let x = data(rows * features, 0.0, 1e20, 61);
        let dy = ordinary(rows * features, 62);
        let err = bn_errors(norm, &x, &dy, features, &BatchNorm::default());
        assert!(err.iter().all(|&e| e < TOL), "{name}: {err:?}");
    }
}

per_backend! {
    /// Statistics are taken around a shift: each column's first counted value on the CPU (whose
    /// corrected two-pass then gives the mean in f64 wherever the shift lies), the median of
    /// its first three on the GPU (whose f32 mean_d is otherwise a rounding of mean − shift).
    /// A column whose first value lies far out (a large first-position activation: 1e3 where
    /// the rest spread 1, or 2e4 where they sit at 1e4) keeps the reference's gradients, and
    /// the forward's mean is within 1e-6 spreads of the f64 one (beyond its rounding to f32). dy's mean is far from 0 here,
    /// so dgamma = Σ dy · xhat carries a mean's error times Σ dy / dgamma (about 100×). Before
    /// either change: dgamma errors of 2.2e-4 (CPU) and 4.7e-4 (GPU), means 5e-6 spreads off.
    /// Channels-first columns (a run per channel on the CPU) too.
    fn batch_norm_with_an_outlying_first_value(name, norm) {
        let (rows, features) = (2000, 8);
        let dy = ordinary(rows * features, 71);
        let gamma = data(features, 1.0, 0.5, 72);
        let opts = BatchNorm { gamma: Some(&gamma), ..Default::default() };
        // The CPU's mean does not depend on the shift at all: the first three values far out.
        let lead = if name == "cpu" { 3 } else { 1 };
        for (what, mut x, outlier) in [
            ("ordinary", ordinary(rows * features, 73), 1e3f32),
            ("mean 1e4 spread 1", data(rows * features, 1e4, 1.0, 74), 2e4),
        ] {
            x[..lead * features].fill(outlier);
            let err = bn_errors(norm, &x, &dy, features, &opts);
            assert!(err.iter().all(|&e| e < TOL), "{name}: {what}: {err:?}");
            let out = norm.batch_norm_train(&x, features, &opts).unwrap();
            for c in 0..features {
                let col: Vec<f64> = x.iter().skip(c).step_by(features).map(|&v| v as f64).collect();
                let mean = col.iter().sum::<f64>() / rows as f64;
                let sd = (col.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / rows as f64).sqrt();
                // Beyond the mean's own rounding to f32.
                let off = ((out.mean[c] as f64 - mean).abs() - f32::EPSILON as f64 * mean.abs()) / sd;
                assert!(off < 1e-6, "{name}: {what}: column {c}'s mean is {off:e} spreads off");
            }
        }
        // Channels-first: each channel's first value (of batch item 0) far out.
        let (batch, channels, spatial) = (4, 8, 500);
        let mut x = ordinary(batch * channels * spatial, 75);
        for c in 0..channels {
            x[c * spatial] = 1e3;
        }
        let out = norm.batch_norm_train_channels_first(&x, channels, spatial, &BatchNorm::default()).unwrap();
        for c in 0..channels {
            let col: Vec<f64> = (0..batch * spatial)
                .map(|p| x[((p / spatial) * channels + c) * spatial + p % spatial] as f64)
                .collect();
            let mean = col.iter().sum::<f64>() / col.len() as f64;
            let sd = (col.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / col.len() as f64).sqrt();
            let off = ((out.mean[c] as f64 - mean).abs() - f32::EPSILON as f64 * mean.abs()) / sd;
            assert!(off < 1e-6, "{name}: channels-first: channel {c}'s mean is {off:e} spreads off");
        }
    }
}

per_backend! {
    /// The backward passes into a caller's dx give the allocating forms' bits, on f32 and f16,
    /// and a dx of the wrong length is refused with nothing written.
    fn backward_into_a_caller_buffer(name, norm) {
        let (rows, features) = (300, 16);
        let (x, dy) = (ordinary(rows * features, 81), ordinary(rows * features, 82));
        let mask: Vec<bool> = (0..rows).map(|r| r % 6 != 1).collect();
        let gamma = data(features, 1.0, 0.5, 83);
        let bn = BatchNorm { mask: Some(&mask), ..Default::default() };
        let ln = LayerNorm { gamma: Some(&gamma), ..Default::default() };
        let rms = RmsNorm { gamma: Some(&gamma), ..Default::default() };
        check_into(name, norm, (&x, &dy), features, (&ln, &rms, &bn), 7.0);
        let half = |v: &[f32]| v.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>();
        check_into(name, norm, (&half(&x), &half(&dy)), features, (&ln, &rms, &bn), f16::from_f32(7.0));
    }
}

/// [`backward_into_a_caller_buffer`] on tensors of one element type; dx buffers start as `fill`.
fn check_into<T: gpunorm::Element>(
    name: &str,
    norm: &Normalizer,
    (x, dy): (&[T], &[T]),
    features: usize,
    (ln, rms, bn): (&LayerNorm, &RmsNorm, &BatchNorm),
    fill: T,
) {
    let fresh = || vec![fill; x.len()];
    let what = format!("{name} {}", std::any::type_name::<T>());

    let whole = norm.layer_norm_backward(x, dy, features, ln).unwrap();
    let mut dx = fresh();
    let (grads, _) = norm
        .layer_norm_backward_into(x, dy, features, ln, &mut dx)
        .unwrap();
    assert_eq!(
        (dx, grads.dgamma, grads.dbeta),
        (whole.dx, whole.dgamma, whole.dbeta),
        "{what}: LayerNorm"
    );

    let whole = norm.rms_norm_backward(x, dy, features, rms).unwrap();
    let mut dx = fresh();
    let (dgamma, _) = norm
        .rms_norm_backward_into(x, dy, features, rms, &mut dx)
        .unwrap();
    assert_eq!((dx, dgamma), (whole.dx, whole.dgamma), "{what}: RMSNorm");

    let whole = norm.batch_norm_backward(x, dy, features, bn).unwrap();
    let mut dx = fresh();
    let (grads, _) = norm
        .batch_norm_backward_into(x, dy, features, bn, &mut dx)
        .unwrap();
    assert_eq!(
        (dx, grads.dgamma, grads.dbeta),
        (whole.dx, whole.dgamma, whole.dbeta),
        "{what}: BatchNorm"
    );

    let mut short = vec![fill; x.len() - 1];
    let refused = Err(NormError::OutputLength {
        len: x.len() - 1,
        expected: x.len(),
    });
    assert_eq!(
        norm.layer_norm_backward_into(x, dy, features, ln, &mut short)
            .map(|_| ()),
        refused,
        "{what}"
    );
    assert_eq!(
        norm.rms_norm_backward_into(x, dy, features, rms, &mut short)
            .map(|_| ()),
        refused,
        "{what}"
    );
    assert_eq!(
        norm.batch_norm_backward_into(x, dy, features, bn, &mut short)
            .map(|_| ()),
        refused,
        "{what}"
    );
    assert!(
        short.iter().all(|&v| v == fill),
        "{what}: a refused call wrote dx"
    );
}

per_backend! {
    fn batch_norm_backward_refuses_bad_input(name, norm) {
        let x = [1.0f32; 6];
        assert_eq!(
            norm.batch_norm_backward(&x, &[0.0; 4], 3, &BatchNorm::default()),
            Err(NormError::OperandLength { name: "dy", len: 4, expected: 6 }),
            "{name}"
        );
        let mask = [false, false];
        let opts = BatchNorm { mask: Some(&mask), ..Default::default() };
        assert!(
            matches!(norm.batch_norm_backward(&x, &x, 3, &opts), Err(NormError::EmptyBatch { .. })),
            "{name}"
        );
        assert!(matches!(
            norm.batch_norm_backward_channels_first(&x, &x, 4, 1, &BatchNorm::default()),
            Err(NormError::LengthNotMultiple { .. })
        ));
    }
}

#[test]
fn repeated_gpu_batch_norm_gradients_are_bitwise_identical() {
    let Some(norm) = gpu() else { return };
    let (rows, features) = (500, 64);
    let (x, dy) = (ordinary(rows * features, 71), ordinary(rows * features, 72));
    let a = norm
        .batch_norm_backward(&x, &dy, features, &BatchNorm::default())
        .unwrap();
    for _ in 0..2 {
        let b = norm
            .batch_norm_backward(&x, &dy, features, &BatchNorm::default())
            .unwrap();
        let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a.dx), bits(&b.dx));
        assert_eq!(bits(&a.dgamma), bits(&b.dgamma));
        assert_eq!(bits(&a.dbeta), bits(&b.dbeta));
    }
}

/// The gradients of LayerNorm and RMSNorm through statistics saved by the forward pass: (dx,
/// dgamma, dbeta) errors against the reference, and the forward's output.
fn saved_errors(
    norm: &Normalizer,
    x: &[f32],
    dy: &[f32],
    f: usize,
    o: &LayerNorm,
) -> ([f64; 3], [f64; 2]) {
    // Saving changes no output bit on the CPU. On a GPU the kernel variant that also writes the
    // statistics is compiled on its own, and a driver may fuse multiply-adds differently in it:
    // an H100's gave 1-3 ulps of difference in some values. 4 ulps is far below the tolerances
    // against the reference, and far above what such a fusing moves.
    let same_output = |saved: &[f32], plain: &[f32]| {
        let most = if norm.is_gpu() { 4 } else { 0 };
        let (apart, at) = ulps_apart(saved, plain);
        assert!(
            apart <= most,
            "saving moved y[{at}] by {apart} ulps: {} against {}",
            saved[at],
            plain[at]
        );
    };
    let out = norm.layer_norm_saving(x, f, o).expect("valid input");
    same_output(&out.y, &norm.layer_norm(x, f, o).unwrap());
    let got = norm
        .layer_norm_backward_saved(x, dy, f, o, &out.stats)
        .unwrap();
    let (dx, dgamma, dbeta) = reference::layer_norm_backward(x, dy, f, o);
    let ln = [
        dx_error(&got.dx, &dx, f),
        max_err(&got.dgamma, &dgamma),
        max_err(&got.dbeta, &dbeta),
    ];
    let rms = RmsNorm {
        eps: o.eps,
        gamma: o.gamma,
    };
    let out = norm.rms_norm_saving(x, f, &rms).unwrap();
    same_output(&out.y, &norm.rms_norm(x, f, &rms).unwrap());
    let got = norm
        .rms_norm_backward_saved(x, dy, f, &rms, &out.stats)
        .unwrap();
    let (dx, dgamma) = reference::rms_norm_backward(x, dy, f, &rms);
    (
        ln,
        [dx_error(&got.dx, &dx, f), max_err(&got.dgamma, &dgamma)],
    )
}

per_backend! {
    /// The backward passes through saved statistics match the reference at every row length,
    /// on offset rows (mean 1e4, spread 1e-2: the statistics keep the shift, so nothing is lost
    /// to a mean rounded to f32) and on rows past f32's range; the saved mean and rstd are each
    /// row's; the CPU's gradients are those it computes without saving, bit for bit.
    fn gradients_through_saved_statistics(name, norm) {
        let mut failed = Vec::new();
        for &features in &[1, 2, 3, 5, 127, 768, 4097, 65537] {
            let rows = if features > 10_000 { 2 } else { 29 };
            let gamma = data(features, 1.0, 0.5, 50);
            let dy = ordinary(rows * features, 51);
            for (what, x, tol, eps) in [
                ("ordinary", ordinary(rows * features, 52), TOL, 1e-5),
                ("mean 1e4 spread 1e-2", data(rows * features, 1e4, 1e-2, 53), TOL_OFFSET, 1e-5),
                ("spread 1e20", data(rows * features, 0.0, 1e20, 54), TOL, 1e-5),
                ("spread 1e-22, eps 0", data(rows * features, 0.0, 1e-22, 55), TOL, 0.0),
            ] {
                if features <= 2 && eps == 0.0 {
                    // dx is exactly 0 there (see rows_past_the_range_of_f32_statistics).
                    continue;
                }
                let opts = LayerNorm { eps, gamma: Some(&gamma), ..Default::default() };
                let (ln, rms) = saved_errors(norm, &x, &dy, features, &opts);
                if ln.iter().chain(&rms).any(|&e| e >= tol) {
                    failed.push(format!("{features} features, {what}: {ln:?} {rms:?}"));
                }
            }
        }
        assert!(failed.is_empty(), "{name}:\n{}", failed.join("\n"));

        let (rows, features) = (6, 10);
        let x = data(rows * features, 1e4, 1e-2, 56);
        let opts = LayerNorm::default();
        let stats = norm.layer_norm_saving(&x, features, &opts).unwrap().stats;
        assert_eq!((stats.rows(), stats.features()), (rows, features));
        for (r, row) in x.chunks(features).enumerate() {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / features as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / features as f64;
            let rstd = 1.0 / (var + opts.eps as f64).sqrt();
            // Each rounded to f32 once (2^-24 of the value), the mean from shift + mean_d.
            let got = stats.mean()[r] as f64;
            assert!((got - mean).abs() <= mean.abs() * 2f64.powi(-23), "{name}: mean of row {r}");
            assert!((stats.rstd()[r] as f64 / rstd - 1.0).abs() < 1e-3, "{name}: rstd of row {r}");
        }
        if !norm.is_gpu() {
            let dy = ordinary(rows * features, 57);
            let saved = norm.layer_norm_backward_saved(&x, &dy, features, &opts, &stats).unwrap();
            assert_eq!(saved, norm.layer_norm_backward(&x, &dy, features, &opts).unwrap());
        }
    }
}

per_backend! {
    /// Statistics that are not those of the call are refused, naming what differs: another
    /// shape, the other kind, another eps. Half tensors save and take statistics too.
    fn saved_statistics_are_checked(name, norm) {
        let (rows, features) = (4, 6);
        let x = ordinary(rows * features, 58);
        let dy = ordinary(rows * features, 59);
        let opts = LayerNorm::default();
        let stats = norm.layer_norm_saving(&x, features, &opts).unwrap().stats;
        let refused = |r: Result<gpunorm::LayerNormGrads, NormError>, what: &str| match r {
            Err(NormError::InvalidStats { problem }) => assert!(problem.contains(what), "{problem}"),
            other => panic!("{name}: {what}: {other:?}"),
        };
        refused(norm.layer_norm_backward_saved(&x[..18], &dy[..18], features, &opts, &stats), "shape");
        refused(norm.layer_norm_backward_saved(&x, &dy, 3, &opts, &stats), "shape");
        let eps = LayerNorm { eps: 1e-3, ..Default::default() };
        refused(norm.layer_norm_backward_saved(&x, &dy, features, &eps, &stats), "eps");
        let rms = norm.rms_norm_saving(&x, features, &RmsNorm::default()).unwrap().stats;
        refused(norm.layer_norm_backward_saved(&x, &dy, features, &opts, &rms), "RMSNorm");
        assert!(matches!(
            norm.rms_norm_backward_saved(&x, &dy, features, &RmsNorm::default(), &stats),
            Err(NormError::InvalidStats { .. })
        ));

        use gpunorm::half::f16;
        let xh: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
        let dyh: Vec<f16> = dy.iter().map(|&v| f16::from_f32(v)).collect();
        let out = norm.layer_norm_saving(&xh, features, &opts).unwrap();
        assert_eq!(out.y, norm.layer_norm(&xh, features, &opts).unwrap(), "{name}");
        let grads = norm.layer_norm_backward_saved(&xh, &dyh, features, &opts, &out.stats).unwrap();
        let wide: Vec<f32> = xh.iter().map(|v| v.to_f32()).collect();
        let dyw: Vec<f32> = dyh.iter().map(|v| v.to_f32()).collect();
        let (rdx, ..) = reference::layer_norm_backward(&wide, &dyw, features, &opts);
        let dx: Vec<f32> = grads.dx.iter().map(|v| v.to_f32()).collect();
        assert!(dx_error(&dx, &rdx, features) <= 2e-3, "{name}: f16 dx");
    }
}

/// Statistics saved on one backend serve the other: the layout is the same.
#[test]
fn saved_statistics_cross_backends() {
    let Some(gpu) = gpu() else { return };
    let cpu = Normalizer::cpu();
    let (rows, features) = (33, 300);
    let gamma = data(features, 1.0, 0.5, 60);
    let opts = LayerNorm {
        gamma: Some(&gamma),
        ..Default::default()
    };
    let dy = ordinary(rows * features, 61);
    for (what, x, tol) in [
        ("ordinary", ordinary(rows * features, 62), TOL),
        (
            "mean 1e4 spread 1e-2",
            data(rows * features, 1e4, 1e-2, 63),
            TOL_OFFSET,
        ),
        ("spread 1e20", data(rows * features, 0.0, 1e20, 64), TOL),
    ] {
        let (rdx, ..) = reference::layer_norm_backward(&x, &dy, features, &opts);
        for (from, to) in [(&cpu, gpu), (gpu, &cpu)] {
            let stats = from.layer_norm_saving(&x, features, &opts).unwrap().stats;
            let got = to
                .layer_norm_backward_saved(&x, &dy, features, &opts, &stats)
                .unwrap();
            let e = dx_error(&got.dx, &rdx, features);
            assert!(
                e < tol,
                "{what}, {} to {}: {e}",
                from.describe(),
                to.describe()
            );
        }
    }
}
