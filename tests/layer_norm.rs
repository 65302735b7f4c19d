//! LayerNorm on every backend against the f64 reference: the shape table, the hard cases, bad
//! input, determinism and threads. Tolerances are max |y − ref| / max(1, |ref|).

mod common;

use common::{data, example_batch, gpu, max_err, ordinary};
use gpunorm::{reference, LayerNorm, NormError, Normalizer};

/// Ordinary data: f32 rounding of a few operations, far below this.
const TOL: f64 = 1e-4;
/// Rows with mean 1e4 and spread 1e-2: a plain f32 two-pass errs by 1e-2..1e-1 here.
const TOL_OFFSET: f64 = 1e-3;

fn check(norm: &Normalizer, x: &[f32], features: usize, opts: &LayerNorm<'_>) -> f64 {
    let y = norm.layer_norm(x, features, opts).expect("valid input");
    let r = reference::layer_norm(x, features, opts);
    max_err(&y, &r)
}

per_backend! {
    fn every_row_length_matches_the_reference(name, norm) {
        for &features in &[1, 2, 3, 4, 5, 127, 768, 4097, 65537, 100_003] {
            let rows = if features > 10_000 { 2 } else { 7 };
            let x = ordinary(rows * features, features as u64);
            let err = check(norm, &x, features, &LayerNorm::default());
            assert!(
                err < TOL,
                "{name}: {features} features: error {err:e} >= {TOL:e}"
            );
        }
    }
}

/// Row lengths at the edges of the GPU kernels' size classes (several rows per workgroup; 1, 2, 4
/// or 8 elements held per thread; the looped kernel), in vec4 and f32 elements, ordinary and
/// offset, with row counts that leave the last workgroup part empty. On the GPU's own device
/// (subgroup sums where it has them), and on a device opened with wgpu's default features
/// (shared-memory sums): gpunorm picks its kernels from what the device it runs on allows.
#[test]
fn every_kernel_size_class_matches_the_reference() {
    let Some(own) = gpu() else { return };
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle());
    let adapter = pollster::block_on(instance.request_adapter(&Default::default())).unwrap();
    let (device, queue) = pollster::block_on(adapter.request_device(&Default::default())).unwrap();
    let plain = Normalizer::from_wgpu(device, queue);
    let lengths = [
        1, 2, 3, 4, 8, 12, 17, 64, 127, 128, 129, 512, 513, 516, 1024, 1028, 2048, 2052, 4096,
        4100, 8192, 8196, 32768, 32772, 255, 257, 2047, 2049, 8191, 8193,
    ];
    for (name, norm) in [("gpu", own), ("default-features device", &plain)] {
        for &features in &lengths {
            let rows = if features <= 516 { 1001 } else { 3 };
            let x = ordinary(rows * features, features as u64);
            let err = check(norm, &x, features, &LayerNorm::default());
            assert!(
                err < TOL,
                "{name}: {features} features: error {err:e} >= {TOL:e}"
            );
            let x = data(rows * features, 1e4, 1e-2, features as u64);
            let err = check(norm, &x, features, &LayerNorm::default());
            assert!(
                err < TOL_OFFSET,
                "{name}: {features} features, mean 1e4 spread 1e-2: error {err:e}"
            );
        }
    }
}

per_backend! {
    fn gamma_and_beta_are_applied_per_feature(name, norm) {
        for &features in &[3, 8, 1000] {
            let x = ordinary(5 * features, 11);
            let gamma = data(features, 1.0, 0.5, 12);
            let beta = data(features, 0.0, 1.0, 13);
            for opts in [
                LayerNorm {
                    gamma: Some(&gamma),
                    beta: Some(&beta),
                    eps: 1e-3,
                },
                LayerNorm {
                    gamma: Some(&gamma),
                    ..Default::default()
                },
                LayerNorm {
                    beta: Some(&beta),
                    ..Default::default()
                },
            ] {
                let err = check(norm, &x, features, &opts);
                assert!(
                    err < TOL,
                    "{name}: {features} features, {opts:?}: error {err:e}"
                );
            }
        }
    }
}

per_backend! {
    fn one_row_and_many_rows(name, norm) {
        let x = ordinary(768, 1);
        let err = check(norm, &x, 768, &LayerNorm::default());
        assert!(err < TOL, "{name}: one row: error {err:e}");
        // More workgroups than one side of the grid holds (65535): rows of 129 features take a
        // whole workgroup each, so 70000 of them need the grid's second dimension. (Short rows
        // share workgroups: 70000 rows of 8 fit in 547.)
        let x = ordinary(70_000 * 129, 2);
        let err = check(norm, &x, 129, &LayerNorm::default());
        assert!(err < TOL, "{name}: 70000 x 129: error {err:e}");
    }
}

per_backend! {
    fn constant_and_padded_rows_become_zero(name, norm) {
        for &features in &[1, 3, 4, 513] {
            let mut x = vec![7.25f32; features];
            x.extend(vec![0.0; features]);
            let y = norm
                .layer_norm(&x, features, &LayerNorm::default())
                .unwrap();
            // (c − c) / sqrt(0 + eps) is exactly 0; no NaN from a zero variance.
            assert!(
                y.iter().all(|&v| v == 0.0),
                "{name}: {features} features: {y:?}"
            );
        }
    }
}

per_backend! {
    fn offset_rows_with_a_tiny_spread_stay_accurate(name, norm) {
        for &features in &[3, 4, 768, 4097] {
            let x = data(9 * features, 1e4, 1e-2, features as u64);
            let err = check(norm, &x, features, &LayerNorm::default());
            assert!(
                err < TOL_OFFSET,
                "{name}: {features} features, mean 1e4 spread 1e-2: error {err:e}"
            );
            let x = data(9 * features, -3e5, 0.5, 3);
            let err = check(norm, &x, features, &LayerNorm::default());
            assert!(
                err < TOL_OFFSET,
                "{name}: {features} features, mean -3e5 spread 0.5: error {err:e}"
            );
        }
    }
}

per_backend! {
    /// Rows whose f32 statistics would overflow or underflow: a shift, sum or square past f32's
    /// range (spreads of 1e20, ±f32::MAX, values near 3e38), or squares too small to keep their
    /// bits (values near 1e-22 with eps 0), at every size class. Both backends redo such rows
    /// (the CPU in f64, the GPU scaled by a power of two) and match the reference. Subnormal
    /// inputs are held to it on the CPU only: GPUs may flush them to zero.
    fn rows_past_the_range_of_f32_statistics_stay_exact(name, norm) {
        let exact = LayerNorm {
            eps: 0.0,
            ..Default::default()
        };
        let mut cases: Vec<(&str, Vec<f32>, usize, LayerNorm<'_>)> = vec![
            ("±f32::MAX", vec![f32::MAX, -f32::MAX], 2, LayerNorm::default()),
        ];
        for features in [1, 2, 7, 300, 4096, 9000] {
            let default = LayerNorm::default();
            cases.push(("spread 1e20", data(3 * features, 0.0, 1e20, 1), features, default));
            cases.push(("near 3e38", data(3 * features, 3e38, 1e36, 2), features, default));
            cases.push(("spread 1e-22, eps 0", data(3 * features, 0.0, 1e-22, 3), features, exact));
        }
        if name == "cpu" {
            cases.push(("subnormal, eps 0", data(3 * 100, 0.0, 1e-40, 4), 100, exact));
        }
        // Every case runs, and a failure lists all that failed, with what came out: on a GPU
        // one failing case says little about the others.
        let mut failed = Vec::new();
        for (what, x, features, opts) in cases {
            assert!(x.iter().all(|v| v.is_finite()), "{what}: finite input");
            let y = norm.layer_norm(&x, features, &opts).unwrap();
            let err = max_err(&y, &reference::layer_norm(&x, features, &opts));
            // max_err is never NaN: a NaN against a number counts as infinite.
            if err >= TOL {
                let head = &y[..2];
                failed.push(format!("{what}, {features} features: error {err:e}, y {head:?}.."));
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
            let y = norm
                .layer_norm(&x, features, &LayerNorm::default())
                .unwrap();
            let r = reference::layer_norm(&x, features, &LayerNorm::default());
            for row in [1, 3] {
                let out = &y[row * features..(row + 1) * features];
                assert!(
                    out.iter().all(|v| v.is_nan()),
                    "{name}: row {row} should be all NaN"
                );
            }
            for row in [0, 2] {
                let range = row * features..(row + 1) * features;
                let err = max_err(&y[range.clone()], &r[range]);
                assert!(
                    err < TOL,
                    "{name}: {features} features: clean row {row}: error {err:e}"
                );
            }
        }
    }
}

per_backend! {
    fn bad_input_is_an_error_with_nothing_computed(name, norm) {
        let x = [1.0f32; 12];
        let three = [1.0f32; 3];
        let four = [1.0f32; 4];
        let ln = |x: &[f32], f, o: &LayerNorm<'_>| norm.layer_norm(x, f, o);
        let d = LayerNorm::default();
        assert_eq!(ln(&x, 0, &d), Err(NormError::ZeroFeatures), "{name}");
        assert_eq!(ln(&[], 0, &d), Err(NormError::ZeroFeatures), "{name}");
        assert_eq!(
            ln(&x, 5, &d),
            Err(NormError::LengthNotMultiple {
                len: 12,
                features: 5
            }),
            "{name}"
        );
        let g = LayerNorm {
            gamma: Some(&three),
            ..d
        };
        assert_eq!(
            ln(&x, 4, &g),
            Err(NormError::ParamLength {
                name: "gamma",
                len: 3,
                features: 4
            }),
            "{name}"
        );
        let b = LayerNorm {
            beta: Some(&four),
            ..d
        };
        assert_eq!(
            ln(&x, 3, &b),
            Err(NormError::ParamLength {
                name: "beta",
                len: 4,
                features: 3
            }),
            "{name}"
        );
        for eps in [f32::NAN, f32::INFINITY, -1e-5] {
            let e = LayerNorm { eps, ..d };
            assert!(
                matches!(ln(&x, 3, &e), Err(NormError::InvalidEps(_))),
                "{name}: eps {eps}"
            );
        }
        // The messages say what was wrong and what would be right.
        let msg = ln(&x, 5, &d).unwrap_err().to_string();
        assert!(
            msg.contains("12") && msg.contains("multiple of features (5)"),
            "{msg}"
        );
    }
}

per_backend! {
    fn empty_input_gives_empty_output(name, norm) {
        assert_eq!(
            norm.layer_norm::<f32>(&[], 3, &LayerNorm::default()),
            Ok(vec![]),
            "{name}"
        );
    }
}

per_backend! {
    /// The worked example: batch 2, sequence length 4, d_model 3, the last position of the second
    /// sequence padded with zeros.
    fn the_worked_example(name, norm) {
        let x = example_batch();
        // "I" = [1, 2, 3]: mean 2, biased variance 2/3, so ±1/sqrt(2/3 + 1e-5) = ±1.22473.
        let i_word = 1.0 / (2.0f64 / 3.0 + 1e-5).sqrt();
        let y = norm.layer_norm(&x, 3, &LayerNorm::default()).unwrap();
        assert!(
            (y[0] as f64 + i_word).abs() < 1e-5 && y[1].abs() < 1e-6,
            "{name}: {:?}",
            &y[..3]
        );
        assert!((y[2] as f64 - i_word).abs() < 1e-5, "{name}: {:?}", &y[..3]);
        // Rounded to two decimals, as a reader checks it by hand: ±1.22.
        assert!((y[2] - 1.22).abs() < 0.01, "{name}");
        assert_eq!(&y[21..], &[0.0, 0.0, 0.0], "{name}: the padded position");
        assert!(
            max_err(&y, &reference::layer_norm(&x, 3, &LayerNorm::default())) < TOL,
            "{name}"
        );
    }
}

#[test]
fn repeated_gpu_calls_are_bitwise_identical() {
    let Some(norm) = gpu() else { return };
    for &features in &[7, 1024, 4097] {
        let x = ordinary(33 * features, 9);
        let a = norm
            .layer_norm(&x, features, &LayerNorm::default())
            .unwrap();
        for _ in 0..3 {
            let b = norm
                .layer_norm(&x, features, &LayerNorm::default())
                .unwrap();
            assert!(
                a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
                "{features} features"
            );
        }
    }
}

per_backend! {
    fn one_normalizer_serves_several_threads(name, norm) {
        std::thread::scope(|s| {
            for t in 0..4u64 {
                s.spawn(move || {
                    let features = 100 + 37 * t as usize;
                    let x = ordinary(50 * features, t);
                    for _ in 0..3 {
                        let err = check(norm, &x, features, &LayerNorm::default());
                        assert!(err < TOL, "{name}: thread {t}: error {err:e}");
                    }
                });
            }
        });
    }
}

#[test]
fn gpu_reports_kernel_time_where_timestamps_exist() {
    let Some(norm) = gpu() else { return };
    let x = ordinary(64 * 256, 4);
    let mut y = vec![0.0; x.len()];
    let timing = norm
        .layer_norm_into(&x, 256, &LayerNorm::default(), &mut y)
        .unwrap();
    assert_eq!(timing.kernel.is_some(), norm.has_kernel_timing());
    if let Some(t) = timing.kernel {
        assert!(t.as_nanos() > 0, "a kernel that ran took some time");
    }
}

/// A tensor larger than llvmpipe's 128 MiB binding limit is split into chunks of rows.
#[test]
fn tensors_larger_than_one_binding_are_chunked() {
    let Some(norm) = gpu() else { return };
    let features = 1024;
    let rows = 36 * 1024; // 144 MiB of f32
    let x = ordinary(rows * features, 21);
    let y = norm
        .layer_norm(&x, features, &LayerNorm::default())
        .unwrap();
    // Spot-check rows at the start, across any chunk boundary and at the end.
    for row in [0, 1, rows / 2 - 1, rows / 2, 32767, 32768, rows - 1] {
        let range = row * features..(row + 1) * features;
        let r = reference::layer_norm(&x[range.clone()], features, &LayerNorm::default());
        let err = max_err(&y[range], &r);
        assert!(err < TOL, "row {row}: error {err:e}");
    }
}

per_backend! {
    fn into_a_caller_buffer_gives_the_same_result(name, norm) {
        let features = 96;
        let x = ordinary(40 * features, 8);
        let gamma = data(features, 1.0, 0.2, 1);
        let opts = LayerNorm {
            gamma: Some(&gamma),
            ..Default::default()
        };
        let expected = norm.layer_norm(&x, features, &opts).unwrap();
        // A reused buffer holding stale values is overwritten completely.
        let mut y = vec![f32::NAN; x.len()];
        norm.layer_norm_into(&x, features, &opts, &mut y).unwrap();
        assert_eq!(y, expected, "{name}");
        let mut short = vec![0.0; x.len() - 1];
        assert_eq!(
            norm.layer_norm_into(&x, features, &opts, &mut short),
            Err(NormError::OutputLength {
                len: x.len() - 1,
                expected: x.len()
            }),
            "{name}"
        );
        // Bad input is reported before the output is touched.
        let mut untouched = vec![5.0; x.len()];
        assert!(norm.layer_norm_into(&x, 7, &opts, &mut untouched).is_err());
        assert!(untouched.iter().all(|&v| v == 5.0), "{name}");
    }
}

/// Outputs of 32 MiB and more leave the CPU fallback through non-temporal stores; row lengths
/// that are not multiples of 4 put every row start at a different alignment.
#[test]
fn cpu_fallback_streams_large_outputs_exactly() {
    let cpu = Normalizer::cpu();
    for &features in &[1027, 4096] {
        let rows = (9 << 20) / features + 1; // just over 36 MiB of output
        let x = ordinary(rows * features, 3);
        let gamma = data(features, 1.0, 0.2, 1);
        let beta = data(features, 0.0, 1.0, 2);
        let opts = LayerNorm {
            gamma: Some(&gamma),
            beta: Some(&beta),
            ..Default::default()
        };
        let y = cpu.layer_norm(&x, features, &opts).unwrap();
        for row in [0, 1, 2, 3, rows / 2, rows - 2, rows - 1] {
            let range = row * features..(row + 1) * features;
            let r = reference::layer_norm(&x[range.clone()], features, &opts);
            let err = max_err(&y[range], &r);
            assert!(err < TOL, "{features} features, row {row}: error {err:e}");
        }
    }
}
