//! gpunorm in a real browser: LayerNorm and BatchNorm on WebGPU and on the wasm CPU fallback,
//! checked against the f64 reference inside the page, and bad input giving the same errors as
//! natively. Run by `scripts/browser_test.sh` (wasm-bindgen-test in headless Chromium).
//!
//! Built with GPUNORM_REQUIRE_GPU=1 (as the script does), a browser without a WebGPU adapter
//! fails the GPU tests; otherwise they print SKIPPED.
#![cfg(target_arch = "wasm32")]

use gpunorm::reference::{self, max_error};
use gpunorm::{BatchNorm, LayerNorm, NormError, Normalizer, RmsNorm, RunningStats};
use wasm_bindgen_test::{console_log, wasm_bindgen_test, wasm_bindgen_test_configure};

wasm_bindgen_test_configure!(run_in_browser);

/// The browser's WebGPU adapter, or None with a loud SKIPPED.
async fn gpu() -> Option<Normalizer> {
    match Normalizer::gpu_async().await {
        Ok(norm) => {
            console_log!("GPU: {}", norm.describe());
            Some(norm)
        }
        Err(e) if option_env!("GPUNORM_REQUIRE_GPU") == Some("1") => {
            panic!("GPUNORM_REQUIRE_GPU=1 at build time but no WebGPU adapter: {e}")
        }
        Err(e) => {
            console_log!("SKIPPED (GPU part): no WebGPU adapter: {e}");
            None
        }
    }
}

/// `n` values spread uniformly over mean ± spread, the same for the same seed (xorshift: no
/// `rand` in the browser build).
fn data(n: usize, mean: f32, spread: f32, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let unit = (state >> 40) as f32 / (1u64 << 24) as f32;
            mean + spread * (2.0 * unit - 1.0)
        })
        .collect()
}

/// Rows of 1, 3, 768 and 4097 features (scalar and vec4 kernels, held and looped), ordinary
/// data and offset data with a tiny spread, with and without gamma and beta; RMSNorm on the same
/// rows (the same kernels, built with RMS); both backward passes and the fused residual add on
/// the ordinary rows.
async fn check_layer_norm(norm: &Normalizer) {
    for (rows, features) in [(5, 1), (7, 3), (33, 768), (3, 4097)] {
        for (mean, spread) in [(0.0, 1.0), (1e4, 1e-2)] {
            let x = data(rows * features, mean, spread, features as u64);
            let gamma = data(features, 1.0, 0.5, 1);
            let beta = data(features, 0.0, 0.5, 2);
            for opts in [
                LayerNorm::default(),
                LayerNorm {
                    gamma: Some(&gamma),
                    beta: Some(&beta),
                    ..Default::default()
                },
            ] {
                let y = norm.layer_norm_async(&x, features, &opts).await.unwrap();
                let err = max_error(&y, &reference::layer_norm(&x, features, &opts));
                // Tolerances of tests/layer_norm.rs: 1e-4 on ordinary data, 1e-3 on offset rows.
                let tol = if mean == 0.0 { 1e-4 } else { 1e-3 };
                assert!(
                    err < tol,
                    "{rows}x{features} mean {mean}: error {err:e} on {}",
                    norm.describe()
                );
            }
            let rms = RmsNorm {
                gamma: Some(&gamma),
                ..Default::default()
            };
            let y = norm.rms_norm_async(&x, features, &rms).await.unwrap();
            let err = max_error(&y, &reference::rms_norm(&x, features, &rms));
            assert!(
                err < 1e-4,
                "RMSNorm {rows}x{features} mean {mean}: error {err:e}"
            );

            // The backward passes, on ordinary rows (tests/backward.rs holds the hard cases).
            if mean == 0.0 {
                let dy = data(rows * features, 0.0, 1.0, 5);
                let opts = LayerNorm {
                    gamma: Some(&gamma),
                    ..Default::default()
                };
                let got = norm
                    .layer_norm_backward_async(&x, &dy, features, &opts)
                    .await
                    .unwrap();
                let (dx, dgamma, dbeta) = reference::layer_norm_backward(&x, &dy, features, &opts);
                for (what, err) in [
                    ("dx", max_error(&got.dx, &dx)),
                    ("dgamma", max_error(&got.dgamma, &dgamma)),
                    ("dbeta", max_error(&got.dbeta, &dbeta)),
                ] {
                    assert!(
                        err < 1e-4,
                        "LayerNorm {what} {rows}x{features}: error {err:e}"
                    );
                }
                let got = norm
                    .rms_norm_backward_async(&x, &dy, features, &rms)
                    .await
                    .unwrap();
                let (dx, dgamma) = reference::rms_norm_backward(&x, &dy, features, &rms);
                let err = max_error(&got.dx, &dx).max(max_error(&got.dgamma, &dgamma));
                assert!(
                    err < 1e-4,
                    "RMSNorm backward {rows}x{features}: error {err:e}"
                );

                // The fused residual add: the sum bit for bit, y against the reference.
                let out = norm
                    .add_layer_norm_async(&x, &dy, features, &opts)
                    .await
                    .unwrap();
                let sum: Vec<f32> = x.iter().zip(&dy).map(|(a, b)| a + b).collect();
                assert!(out
                    .sum
                    .iter()
                    .zip(&sum)
                    .all(|(p, q)| p.to_bits() == q.to_bits()));
                let err = max_error(&out.y, &reference::layer_norm(&sum, features, &opts));
                assert!(
                    err < 1e-4,
                    "add_layer_norm {rows}x{features}: error {err:e}"
                );
            }
        }
    }
}

/// Training with a padding mask (statistics, masked rows 0), its backward pass, then eval with
/// running statistics updated from it, on features-last tensors of both BatchNorm kernel
/// families (features % 4).
async fn check_batch_norm(norm: &Normalizer) {
    for (rows, features) in [(64, 3), (300, 16), (97, 768)] {
        let x = data(rows * features, 5.0, 2.0, rows as u64);
        let mask: Vec<bool> = (0..rows).map(|r| r % 7 != 3).collect();
        let gamma = data(features, 1.0, 0.5, 3);
        let opts = BatchNorm {
            mask: Some(&mask),
            gamma: Some(&gamma),
            ..Default::default()
        };
        let out = norm
            .batch_norm_train_async(&x, features, &opts)
            .await
            .unwrap();
        let (y, mean, var, count) = reference::batch_norm_train(&x, features, &opts);
        assert_eq!(out.count, count);
        // Tolerances (relative past 1, as max_error measures): 1e-4 on outputs as in
        // tests/batch_norm.rs, 1e-5 on the statistics.
        let err = max_error(&out.y, &y);
        assert!(err < 1e-4, "train {rows}x{features}: error {err:e}");
        assert!(max_error(&out.mean, &mean) < 1e-5);
        assert!(max_error(&out.var, &var) < 1e-5);
        for r in (0..rows).filter(|r| !mask[*r]) {
            assert!(out.y[r * features..(r + 1) * features]
                .iter()
                .all(|&v| v == 0.0));
        }

        let mut running = RunningStats::new(features);
        running.update(&out).unwrap();
        let y = norm
            .batch_norm_eval_async(&x, features, &opts, &running)
            .await
            .unwrap();
        let mean: Vec<f64> = running.mean.iter().map(|&m| m as f64).collect();
        let var: Vec<f64> = running.var.iter().map(|&v| v as f64).collect();
        let expected = reference::batch_norm_apply(&x, features, &mean, &var, &opts);
        let err = max_error(&y, &expected);
        assert!(err < 1e-4, "eval {rows}x{features}: error {err:e}");

        // The backward pass through the batch statistics, with the mask.
        let dy = data(rows * features, 0.0, 1.0, 6);
        let got = norm
            .batch_norm_backward_async(&x, &dy, features, &opts)
            .await
            .unwrap();
        let (dx, dgamma, dbeta) = reference::batch_norm_backward(&x, &dy, features, &opts);
        for (what, err) in [
            ("dx", max_error(&got.dx, &dx)),
            ("dgamma", max_error(&got.dgamma, &dgamma)),
            ("dbeta", max_error(&got.dbeta, &dbeta)),
        ] {
            assert!(
                err < 1e-4,
                "backward {what} {rows}x{features}: error {err:e}"
            );
        }
    }
}

/// Bad input is the same `NormError` on every backend, and nothing panics.
async fn check_errors(norm: &Normalizer) {
    let x = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
    let ln = LayerNorm::default();
    assert_eq!(
        norm.layer_norm_async(&x, 0, &ln).await,
        Err(NormError::ZeroFeatures)
    );
    assert_eq!(
        norm.layer_norm_async(&x, 4, &ln).await,
        Err(NormError::LengthNotMultiple {
            len: 6,
            features: 4
        })
    );
    let gamma = [1.0f32; 2];
    let opts = LayerNorm {
        gamma: Some(&gamma),
        ..Default::default()
    };
    assert!(matches!(
        norm.layer_norm_async(&x, 3, &opts).await,
        Err(NormError::ParamLength { name: "gamma", .. })
    ));
    let opts = LayerNorm {
        eps: f32::NAN,
        ..Default::default()
    };
    assert!(matches!(
        norm.layer_norm_async(&x, 3, &opts).await,
        Err(NormError::InvalidEps(_))
    ));
    let mask = [false, false];
    let opts = BatchNorm {
        mask: Some(&mask),
        ..Default::default()
    };
    assert!(matches!(
        norm.batch_norm_train_async(&x, 3, &opts).await,
        Err(NormError::EmptyBatch { .. })
    ));
    let mask = [true; 3];
    let opts = BatchNorm {
        mask: Some(&mask),
        ..Default::default()
    };
    assert!(matches!(
        norm.batch_norm_train_async(&x, 3, &opts).await,
        Err(NormError::MaskLength { len: 3, rows: 2 })
    ));
    let mut y = [0f32; 5];
    assert!(matches!(
        norm.layer_norm_into_async(&x, 3, &ln, &mut y).await,
        Err(NormError::OutputLength { .. })
    ));
}

#[wasm_bindgen_test]
async fn layer_norm_and_rms_norm_on_webgpu() {
    if let Some(norm) = gpu().await {
        assert!(norm.is_gpu());
        check_layer_norm(&norm).await;
    }
}

#[wasm_bindgen_test]
async fn layer_norm_and_rms_norm_on_the_cpu_fallback() {
    check_layer_norm(&Normalizer::cpu()).await;
}

#[wasm_bindgen_test]
async fn batch_norm_on_webgpu() {
    if let Some(norm) = gpu().await {
        check_batch_norm(&norm).await;
    }
}

#[wasm_bindgen_test]
async fn batch_norm_on_the_cpu_fallback() {
    check_batch_norm(&Normalizer::cpu()).await;
}

#[wasm_bindgen_test]
async fn gpu_tensors_chain_on_webgpu() {
    let Some(norm) = gpu().await else { return };
    let (rows, features) = (40, 64);
    let x = data(rows * features, 0.0, 1.0, 9);
    let t = norm.upload_rows_async(&x, features).await.unwrap();
    let once = norm
        .layer_norm_gpu_async(&t, features, &LayerNorm::default())
        .await
        .unwrap();
    let y = norm.download_async(&once).await.unwrap();
    let err = max_error(
        &y,
        &reference::layer_norm(&x, features, &LayerNorm::default()),
    );
    assert!(err < 1e-4, "error {err:e}");
}

/// Half tensors on WebGPU: f16 and bf16 rows of even length through the packed kernels
/// (forward and backward), of odd length through the device conversions, BatchNorm widened on
/// the device, and an f16 output past 65504 as infinity, each against the reference on the same
/// (half) inputs: tolerances two roundings of the type, as in tests/half.rs.
#[wasm_bindgen_test]
async fn half_tensors_on_webgpu() {
    use gpunorm::half::{bf16, f16};
    use gpunorm::ElementType;
    let Some(norm) = gpu().await else { return };
    for (rows, features) in [(9, 6), (5, 768), (7, 3)] {
        let x = data(rows * features, 1.0, 2.0, 31);
        let (xh, xb): (Vec<f16>, Vec<bf16>) = (
            x.iter().map(|&v| f16::from_f32(v)).collect(),
            x.iter().map(|&v| bf16::from_f32(v)).collect(),
        );
        let opts = LayerNorm::default();
        for (t, wide, tol) in [
            (
                norm.upload_rows_typed_async(&xh, features).await.unwrap(),
                xh.iter().map(|v| v.to_f32()).collect::<Vec<_>>(),
                2e-3,
            ),
            (
                norm.upload_rows_typed_async(&xb, features).await.unwrap(),
                xb.iter().map(|v| v.to_f32()).collect::<Vec<_>>(),
                1.6e-2,
            ),
        ] {
            let at = format!("{} {rows}x{features}", t.element_type());
            let y = norm
                .layer_norm_gpu_async(&t, features, &opts)
                .await
                .unwrap();
            assert_eq!(y.element_type(), t.element_type());
            let y = norm.download_async(&y).await.unwrap();
            let err = max_error(&y, &reference::layer_norm(&wide, features, &opts));
            assert!(err <= tol, "{at}: layer_norm {err:e}");
            let grads = norm
                .layer_norm_backward_gpu_async(&t, &t, features, &opts)
                .await
                .unwrap();
            let dx = norm.download_async(&grads.dx).await.unwrap();
            let (rdx, ..) = reference::layer_norm_backward(&wide, &wide, features, &opts);
            let scale = rdx.iter().fold(1f64, |m, r| m.max(r.abs()));
            let err = dx
                .iter()
                .zip(&rdx)
                .fold(0f64, |m, (&g, &r)| m.max((g as f64 - r).abs() / scale));
            assert!(err <= tol, "{at}: layer_norm_backward dx {err:e}");
            let bn = BatchNorm::default();
            let (y, _) = norm
                .batch_norm_train_gpu_async(&t, features, &bn)
                .await
                .unwrap();
            let y = norm.download_async(&y).await.unwrap();
            let (ry, ..) = reference::batch_norm_train(&wide, features, &bn);
            assert!(max_error(&y, &ry) <= tol, "{at}: batch_norm_train");
        }
    }
    // gamma of 1e5 puts the outputs past f16's range: ±infinity, never NaN.
    let features = 8;
    let x: Vec<f16> = data(2 * features, 0.0, 1.0, 32)
        .iter()
        .map(|&v| f16::from_f32(v))
        .collect();
    let big = vec![1e5f32; features];
    let t = norm.upload_rows_typed_async(&x, features).await.unwrap();
    let opts = LayerNorm {
        gamma: Some(&big),
        ..Default::default()
    };
    let y = norm
        .layer_norm_gpu_async(&t, features, &opts)
        .await
        .unwrap();
    let y: Vec<f16> = norm.download_as_async(&y).await.unwrap();
    assert!(y.iter().all(|v| !v.is_nan()) && y.iter().any(|v| v.is_infinite()));
    assert_eq!(t.element_type(), ElementType::F16);
}

/// Training on GPU tensors in the browser: the backward pass and the fused add chained on the
/// device, BatchNorm steps whose running statistics stay there, an op recorded on spans of
/// buffers at an offset (WebGPU's 256-byte alignment) with gamma on the device, and a half
/// tensor, each against the reference.
#[wasm_bindgen_test]
async fn training_on_gpu_tensors_on_webgpu() {
    let Some(norm) = gpu().await else { return };
    let (rows, features) = (40, 64);
    let x = data(rows * features, 0.0, 1.0, 11);
    let dy = data(rows * features, 0.0, 1.0, 12);
    let (xt, dyt) = (
        norm.upload_rows_async(&x, features).await.unwrap(),
        norm.upload_async(&dy).await.unwrap(),
    );
    let ln = LayerNorm::default();
    let grads = norm
        .layer_norm_backward_gpu_async(&xt, &dyt, features, &ln)
        .await
        .unwrap();
    let (rdx, rdgamma, _) = reference::layer_norm_backward(&x, &dy, features, &ln);
    // Tolerances of tests/backward.rs (gradients of O(1), sums over 40 rows).
    let dx = norm.download_async(&grads.dx).await.unwrap();
    assert!(max_error(&dx, &rdx) < 1e-4);
    let dgamma = norm.download_async(&grads.dgamma).await.unwrap();
    assert!(max_error(&dgamma, &rdgamma) < 1e-4);
    let add = norm
        .add_rms_norm_gpu_async(&xt, &dyt, features, &RmsNorm::default())
        .await
        .unwrap();
    let sum: Vec<f32> = x.iter().zip(&dy).map(|(a, b)| a + b).collect();
    assert_eq!(norm.download_async(&add.sum).await.unwrap(), sum);
    let y = norm.download_async(&add.y).await.unwrap();
    let r = reference::rms_norm(&sum, features, &RmsNorm::default());
    assert!(max_error(&y, &r) < 1e-4);

    // BatchNorm steps with running statistics on the device, then eval from them.
    let mut host = RunningStats::new(features);
    let device = norm.upload_running_stats_async(&host).await.unwrap();
    let bn = BatchNorm::default();
    for step in 0..3u64 {
        let x = data(rows * features, step as f32, 1.0, 20 + step);
        let t = norm.upload_async(&x).await.unwrap();
        let y = norm
            .batch_norm_train_gpu_running_async(&t, features, &bn, &device)
            .await
            .unwrap();
        let (ry, mean, var, count) = reference::batch_norm_train(&x, features, &bn);
        assert!(max_error(&norm.download_async(&y).await.unwrap(), &ry) < 1e-4);
        let out = gpunorm::BatchNormOutput {
            y: Vec::<f32>::new(),
            mean: mean.iter().map(|&v| v as f32).collect(),
            var: var.iter().map(|&v| v as f32).collect(),
            count,
        };
        host.update(&out).unwrap();
    }
    let back = norm.download_running_stats_async(&device).await.unwrap();
    let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(a, b)| (a - b).abs() < 1e-4);
    assert!(close(&back.mean, &host.mean) && close(&back.var, &host.var));

    // RMSNorm recorded on spans: x at byte 256 of a buffer, gamma on the device.
    let gamma = data(features, 1.0, 0.5, 13);
    let mut padded = vec![0.0f32; 64];
    padded.extend_from_slice(&x);
    let (input, output, weights) = (
        norm.upload_async(&padded).await.unwrap(),
        norm.upload_async(&vec![0.0; x.len()]).await.unwrap(),
        norm.upload_async(&gamma).await.unwrap(),
    );
    let (device, queue) = norm.wgpu().unwrap();
    let mut encoder = device.create_command_encoder(&Default::default());
    let bytes = (x.len() * 4) as u64;
    let op = gpunorm::Encode::RmsNorm {
        x: input.buffer().slice(256..256 + bytes),
        y: output.buffer().slice(..bytes),
        features,
        eps: 1e-6,
        gamma: Some(weights.buffer().slice(..(features * 4) as u64)),
    };
    norm.encode_async(&mut encoder, &op).await.unwrap();
    queue.submit([encoder.finish()]);
    let y = norm.download_async(&output).await.unwrap();
    let opts = RmsNorm {
        gamma: Some(&gamma),
        ..Default::default()
    };
    assert!(max_error(&y, &reference::rms_norm(&x, features, &opts)) < 1e-4);

    // A half tensor: f32 statistics inside, rounded once on the way out (2e-3 for f16).
    let xh: Vec<gpunorm::half::f16> = x.iter().map(|&v| gpunorm::half::f16::from_f32(v)).collect();
    let wide: Vec<f32> = xh.iter().map(|v| v.to_f32()).collect();
    let y = norm.layer_norm_async(&xh, features, &ln).await.unwrap();
    let y: Vec<f32> = y.iter().map(|v| v.to_f32()).collect();
    assert!(max_error(&y, &reference::layer_norm(&wide, features, &ln)) < 2e-3);
}

#[wasm_bindgen_test]
async fn bad_input_gives_errors_on_webgpu() {
    if let Some(norm) = gpu().await {
        check_errors(&norm).await;
    }
}

#[wasm_bindgen_test]
async fn bad_input_gives_errors_on_the_cpu_fallback() {
    check_errors(&Normalizer::cpu()).await;
}

/// A browser thread cannot block: the synchronous API refuses GPU work with an error that names
/// the async form, and runs the CPU fallback as natively.
#[wasm_bindgen_test]
async fn synchronous_calls_explain_themselves() {
    let x = [1.0f32, 2.0, 3.0];
    assert_eq!(
        Normalizer::new().unwrap_err(),
        NormError::NeedsAwait("Normalizer::new")
    );
    let cpu = Normalizer::cpu().layer_norm(&x, 3, &LayerNorm::default());
    assert!(cpu.is_ok_and(|y| (y[2] - 1.2247).abs() < 1e-3));
    if let Some(norm) = gpu().await {
        let err = norm.layer_norm(&x, 3, &LayerNorm::default()).unwrap_err();
        assert_eq!(err, NormError::NeedsAwait("layer_norm"));
        assert!(err.to_string().contains("layer_norm_async"));
    }
}
