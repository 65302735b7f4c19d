//! The fused residual add (`add_layer_norm`, `add_rms_norm`) on every backend: the sum is x +
//! residual rounded once, bit for bit, and y is the norm of that sum against the f64
//! reference. Tolerances are max |y − ref| / max(1, |ref|).

mod common;

use common::{data, gpu, max_err, ordinary};
use gpunorm::{reference, LayerNorm, NormError, RmsNorm};

const TOL: f64 = 1e-4;

fn exact_sum(x: &[f32], r: &[f32]) -> Vec<f32> {
    x.iter().zip(r).map(|(a, b)| a + b).collect()
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits())
}

per_backend! {
    /// Row lengths across the GPU's size classes (held and looped kernels, f32 and vec4), with
    /// gamma and beta; the residual an order of magnitude larger than x, as deep in a network.
    fn every_row_length_matches_the_reference(name, norm) {
        for &features in &[1, 3, 4, 127, 768, 4097, 40_000] {
            let rows = if features > 10_000 { 2 } else { 19 };
            let x = ordinary(rows * features, features as u64);
            let residual = data(rows * features, 5.0, 20.0, 3);
            let sum = exact_sum(&x, &residual);
            let gamma = data(features, 1.0, 0.5, 4);
            let beta = data(features, 0.0, 0.5, 5);
            let ln = LayerNorm { gamma: Some(&gamma), beta: Some(&beta), ..Default::default() };
            let out = norm.add_layer_norm(&x, &residual, features, &ln).unwrap();
            assert!(same_bits(&out.sum, &sum), "{name}: {features}: the sum");
            let err = max_err(&out.y, &reference::layer_norm(&sum, features, &ln));
            assert!(err < TOL, "{name}: LayerNorm {features} features: error {err:e}");

            let rms = RmsNorm { gamma: Some(&gamma), ..Default::default() };
            let out = norm.add_rms_norm(&x, &residual, features, &rms).unwrap();
            assert!(same_bits(&out.sum, &sum), "{name}: {features}: the RMSNorm sum");
            let err = max_err(&out.y, &reference::rms_norm(&sum, features, &rms));
            assert!(err < TOL, "{name}: RMSNorm {features} features: error {err:e}");
        }
    }
}

per_backend! {
    /// A sum whose statistics leave f32's range goes the exact way as a plain row would.
    fn sums_past_the_range_of_f32_statistics(name, norm) {
        let features = 300;
        let x = data(3 * features, 0.0, 1e20, 1);
        let residual = data(3 * features, 0.0, 1e19, 2);
        let sum = exact_sum(&x, &residual);
        let out = norm.add_layer_norm(&x, &residual, features, &LayerNorm::default()).unwrap();
        let err = max_err(&out.y, &reference::layer_norm(&sum, features, &LayerNorm::default()));
        assert!(err < TOL, "{name}: error {err:e}");
    }
}

per_backend! {
    fn bad_input_is_an_error(name, norm) {
        let x = [1.0f32; 6];
        assert_eq!(
            norm.add_layer_norm(&x, &[0.0; 5], 3, &LayerNorm::default()),
            Err(NormError::OperandLength { name: "residual", len: 5, expected: 6 }),
            "{name}"
        );
        assert_eq!(
            norm.add_rms_norm(&x, &x, 4, &RmsNorm::default()),
            Err(NormError::LengthNotMultiple { len: 6, features: 4 }),
            "{name}"
        );
        let empty = norm.add_layer_norm::<f32>(&[], &[], 3, &LayerNorm::default()).unwrap();
        assert!(empty.sum.is_empty() && empty.y.is_empty(), "{name}");
    }
}

/// Past one binding the rows go through in chunks, the sum with them (CI runs this file again
/// with 1 MiB bindings).
#[test]
fn sums_and_outputs_are_chunked_together() {
    let Some(norm) = gpu() else { return };
    let (rows, features) = (600, 1024);
    let x = ordinary(rows * features, 7);
    let residual = ordinary(rows * features, 8);
    let sum = exact_sum(&x, &residual);
    let out = norm
        .add_layer_norm(&x, &residual, features, &LayerNorm::default())
        .unwrap();
    assert!(same_bits(&out.sum, &sum));
    let err = max_err(
        &out.y,
        &reference::layer_norm(&sum, features, &LayerNorm::default()),
    );
    assert!(err < TOL, "error {err:e}");
}
