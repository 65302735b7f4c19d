//! RMSNorm on every backend against the f64 reference: every row length and kernel size class,
//! gamma, the hard cases (offset rows, magnitudes past f32's range, zero and constant rows, NaN),
//! bad input, chunking and determinism. Tolerances are max |y − ref| / max(1, |ref|).

mod common;

use common::{data, gpu, max_err, ordinary};
use gpunorm::{reference, NormError, Normalizer, RmsNorm};

/// Ordinary data: f32 rounding of a few operations, far below this. RMSNorm never subtracts,
/// so offset rows need no looser bound.
const TOL: f64 = 1e-4;

fn check(norm: &Normalizer, x: &[f32], features: usize, opts: &RmsNorm<'_>) -> f64 {
    let y = norm.rms_norm(x, features, opts).expect("valid input");
    max_err(&y, &reference::rms_norm(x, features, opts))
}

per_backend! {
    fn every_row_length_matches_the_reference(name, norm) {
        for &features in &[1, 2, 3, 4, 5, 127, 768, 4097, 65537, 100_003] {
            let rows = if features > 10_000 { 2 } else { 7 };
            for (what, x) in [
                ("ordinary", ordinary(rows * features, features as u64)),
                ("mean 1e4 spread 1e-2", data(rows * features, 1e4, 1e-2, 3)),
            ] {
                let err = check(norm, &x, features, &RmsNorm::default());
                assert!(err < TOL, "{name}: {features} features, {what}: error {err:e}");
            }
        }
    }
}

/// The size classes of the shared row kernels (several rows per workgroup, 1..32 elements held
/// per thread, the looped kernel), vec4 and f32, with part-empty last workgroups.
#[test]
fn every_kernel_size_class_matches_the_reference() {
    let Some(norm) = gpu() else { return };
    let lengths = [
        1, 3, 4, 12, 17, 127, 128, 129, 513, 516, 1028, 2049, 4100, 8193, 32772, 32773,
    ];
    for &features in &lengths {
        let rows = if features <= 516 { 1001 } else { 3 };
        let x = ordinary(rows * features, features as u64);
        let err = check(norm, &x, features, &RmsNorm::default());
        assert!(err < TOL, "{features} features: error {err:e}");
    }
}

per_backend! {
    fn gamma_is_applied_per_feature(name, norm) {
        for &features in &[3, 768, 4097] {
            let x = ordinary(5 * features, 11);
            let gamma = data(features, 1.0, 0.5, 12);
            let opts = RmsNorm { gamma: Some(&gamma), ..Default::default() };
            let err = check(norm, &x, features, &opts);
            assert!(err < TOL, "{name}: {features} features: error {err:e}");
        }
    }
}

per_backend! {
    /// A row of zeros stays zeros (0 / sqrt(eps)); a constant row c becomes c / sqrt(c² + eps),
    /// and with eps 0 exactly ±1.
    fn zero_and_constant_rows(name, norm) {
        for &features in &[3, 8, 1024, 9000] {
            let mut x = vec![0f32; features];
            x.extend(std::iter::repeat_n(-2.5f32, features));
            let y = norm.rms_norm(&x, features, &RmsNorm::default()).unwrap();
            assert!(y[..features].iter().all(|&v| v == 0.0), "{name}: zeros");
            let err = max_err(&y, &reference::rms_norm(&x, features, &RmsNorm::default()));
            assert!(err < TOL, "{name}: {features} features: error {err:e}");
            let exact = RmsNorm { eps: 0.0, gamma: None };
            let y = norm.rms_norm(&x[features..], features, &exact).unwrap();
            assert!(y.iter().all(|&v| (v + 1.0).abs() < 1e-6), "{name}: {:?}", &y[..2]);
        }
    }
}

per_backend! {
    /// Rows whose mean square leaves f32's range: values past 1e19 (their squares overflow),
    /// ±f32::MAX, values near 3e38, and values near 1e-22 with eps 0 (their squares underflow),
    /// at every size class. Both backends redo such rows and match the reference. Subnormal
    /// inputs on the CPU only: GPUs may flush them to zero.
    fn rows_past_the_range_of_f32_statistics_stay_exact(name, norm) {
        let exact = RmsNorm { eps: 0.0, gamma: None };
        let mut cases: Vec<(&str, Vec<f32>, usize, RmsNorm<'_>)> = vec![
            ("±f32::MAX", vec![f32::MAX, -f32::MAX], 2, RmsNorm::default()),
        ];
        for features in [7, 300, 4096, 9000] {
            let default = RmsNorm::default();
            cases.push(("spread 1e20", data(3 * features, 0.0, 1e20, 1), features, default));
            cases.push(("near 3e38", data(3 * features, 3e38, 1e36, 2), features, default));
            cases.push(("spread 1e15", data(3 * features, 0.0, 1e15, 5), features, default));
            cases.push(("spread 1e-22, eps 0", data(3 * features, 0.0, 1e-22, 3), features, exact));
        }
        if name == "cpu" {
            cases.push(("subnormal, eps 0", data(3 * 100, 0.0, 1e-40, 4), 100, exact));
        }
        let mut failed = Vec::new();
        for (what, x, features, opts) in cases {
            let y = norm.rms_norm(&x, features, &opts).unwrap();
            let err = max_err(&y, &reference::rms_norm(&x, features, &opts));
            if err >= TOL {
                failed.push(format!("{what}, {features} features: error {err:e}, y {:?}..", &y[..2]));
            }
        }
        assert!(failed.is_empty(), "{name}:\n{}", failed.join("\n"));
    }
}

per_backend! {
    fn a_nan_poisons_only_its_own_row(name, norm) {
        for &features in &[3, 8, 4097] {
            let mut x = ordinary(4 * features, 5);
            x[features + features / 2] = f32::NAN;
            x[3 * features] = f32::INFINITY;
            let y = norm.rms_norm(&x, features, &RmsNorm::default()).unwrap();
            let r = reference::rms_norm(&x, features, &RmsNorm::default());
            // A NaN makes its row NaN. An infinity makes the mean square infinite: its own
            // output is inf · 0 = NaN and the row's finite values 0, as the reference says
            // (max_err takes NaN against NaN as equal, and against a number as infinite).
            for row in [1, 3] {
                let range = row * features..(row + 1) * features;
                let err = max_err(&y[range.clone()], &r[range.clone()]);
                assert!(err < TOL, "{name}: {features} features: row {row}: {:?}", &y[range][..3]);
            }
            for row in [0, 2] {
                let range = row * features..(row + 1) * features;
                let err = max_err(&y[range.clone()], &r[range]);
                assert!(err < TOL, "{name}: {features} features: clean row {row}: error {err:e}");
            }
        }
    }
}

per_backend! {
    fn bad_input_is_an_error_with_nothing_computed(name, norm) {
        let x = [1.0f32; 6];
        let opts = RmsNorm::default();
        assert_eq!(norm.rms_norm(&x, 0, &opts), Err(NormError::ZeroFeatures), "{name}");
        assert_eq!(
            norm.rms_norm(&x, 4, &opts),
            Err(NormError::LengthNotMultiple { len: 6, features: 4 }),
            "{name}"
        );
        let gamma = [1.0f32; 2];
        let with_gamma = RmsNorm { gamma: Some(&gamma), ..opts };
        assert_eq!(
            norm.rms_norm(&x, 3, &with_gamma),
            Err(NormError::ParamLength { name: "gamma", len: 2, features: 3 }),
            "{name}"
        );
        for eps in [f32::NAN, f32::INFINITY, -1e-6] {
            let r = norm.rms_norm(&x, 3, &RmsNorm { eps, gamma: None });
            assert!(matches!(r, Err(NormError::InvalidEps(_))), "{name}: eps {eps}: {r:?}");
        }
        let mut y = [7.0f32; 5];
        assert_eq!(
            norm.rms_norm_into(&x, 3, &opts, &mut y),
            Err(NormError::OutputLength { len: 5, expected: 6 }),
            "{name}"
        );
        assert_eq!(y, [7.0; 5], "{name}: a refused call writes nothing");
        assert_eq!(norm.rms_norm::<f32>(&[], 3, &opts), Ok(vec![]), "{name}: empty input");
    }
}

per_backend! {
    fn into_a_caller_buffer_gives_the_same_result(name, norm) {
        let features = 768;
        let x = ordinary(64 * features, 8);
        let y = norm.rms_norm(&x, features, &RmsNorm::default()).unwrap();
        let mut into = vec![f32::NAN; x.len()];
        norm.rms_norm_into(&x, features, &RmsNorm::default(), &mut into).unwrap();
        assert!(
            y.iter().zip(&into).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{name}"
        );
    }
}

#[test]
fn repeated_gpu_calls_are_bitwise_identical() {
    let Some(norm) = gpu() else { return };
    for &features in &[7, 1024, 4097] {
        let x = ordinary(33 * features, 9);
        let a = norm.rms_norm(&x, features, &RmsNorm::default()).unwrap();
        for _ in 0..3 {
            let b = norm.rms_norm(&x, features, &RmsNorm::default()).unwrap();
            assert!(
                a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
                "{features} features"
            );
        }
    }
}

/// Past one binding the rows go through in chunks (CI runs this file again with 1 MiB bindings,
/// where every shape above chunks too).
#[test]
fn tensors_larger_than_one_binding_are_chunked() {
    let Some(norm) = gpu() else { return };
    let features = 1024;
    let rows = 36 * 1024; // 144 MiB of f32
    let x = ordinary(rows * features, 21);
    let y = norm.rms_norm(&x, features, &RmsNorm::default()).unwrap();
    for row in [0, 1, rows / 2 - 1, rows / 2, 32767, 32768, rows - 1] {
        let range = row * features..(row + 1) * features;
        let r = reference::rms_norm(&x[range.clone()], features, &RmsNorm::default());
        let err = max_err(&y[range], &r);
        assert!(err < TOL, "row {row}: error {err:e}");
    }
}
