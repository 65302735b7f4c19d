//! Half precision: every host-slice op on f16 and bf16 tensors, on both backends, against the
//! f64 reference on the same (half) inputs. Statistics are f32 inside, so each output may be off
//! by about two roundings of its storage type: tolerances 2e-3 for f16 and 1.6e-2 for bf16
//! (in `max_error`'s measure, |y − ref| / max(1, |ref|)), and 1e-4 for the f32 statistics and
//! parameter gradients, as for f32 tensors.

mod common;

use common::{data, dx_error, max_err, ordinary};
use gpunorm::half::{bf16, f16};
use gpunorm::{
    reference, BatchNorm, Element, ElementType, LayerNorm, NormError, RmsNorm, RunningStats,
};

/// A half type under test: its conversions and its tolerance.
trait Half: Element {
    const TOL: f64;
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl Half for f16 {
    const TOL: f64 = 2e-3;
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

impl Half for bf16 {
    const TOL: f64 = 1.6e-2;
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

/// `values` rounded to `T`, and those rounded values back as f32 (exactly): what the reference
/// sees.
fn rounded<T: Half>(values: &[f32]) -> (Vec<T>, Vec<f32>) {
    let half: Vec<T> = values.iter().map(|&v| T::from_f32(v)).collect();
    let wide = half.iter().map(|&v| v.to_f32()).collect();
    (half, wide)
}

/// Representable values of T between a and b (0 when equal, ±0 alike, NaN with NaN); u32::MAX
/// where one is NaN and the other not.
fn steps<T: Half>(a: T, b: T) -> u32 {
    let key = |v: T| {
        let i = bytemuck::cast::<T, u16>(v) as i16;
        i32::from(if i < 0 { i16::MIN.wrapping_sub(i) } else { i })
    };
    match (a.to_f32().is_nan(), b.to_f32().is_nan()) {
        (true, true) => 0,
        (false, false) => (key(a) - key(b)).unsigned_abs(),
        _ => u32::MAX,
    }
}

fn wide<T: Half>(values: &[T]) -> Vec<f32> {
    values.iter().map(|&v| v.to_f32()).collect()
}

/// Running statistics as the reference takes them.
fn in_f64(running: &RunningStats) -> (Vec<f64>, Vec<f64>) {
    let f64s = |v: &[f32]| v.iter().map(|&v| v as f64).collect();
    (f64s(&running.mean), f64s(&running.var))
}

/// Every op on one half type against the reference, at row lengths across the kernels' size
/// classes and on offset rows.
fn every_op<T: Half>(name: &str, norm: &gpunorm::Normalizer) {
    let tol = T::TOL;
    for &(rows, features, mean, spread) in &[
        (37, 1, 0.5, 2.0),
        (37, 2, 0.5, 2.0),
        (37, 3, 0.5, 2.0),
        (30, 6, 0.5, 2.0),
        (50, 768, 0.5, 2.0),
        (9, 4097, 0.5, 2.0),
        (5, 4098, 0.5, 2.0),
        (2, 65537, 0.5, 2.0),
        (2, 65538, 0.5, 2.0),
        (20, 256, 100.0, 1.0),
        (20, 258, 100.0, 1.0),
    ] {
        let at = format!("{name} {} {rows}x{features}", T::NAME);
        let (x, xw) = rounded::<T>(&data(rows * features, mean, spread, 1));
        let (r, rw) = rounded::<T>(&ordinary(rows * features, 2));
        let (dy, dyw) = rounded::<T>(&ordinary(rows * features, 3));
        let gamma = data(features, 1.0, 0.5, 4);
        let beta = data(features, 0.0, 0.5, 5);
        let ln = LayerNorm {
            gamma: Some(&gamma),
            beta: Some(&beta),
            ..Default::default()
        };
        let rms = RmsNorm {
            gamma: Some(&gamma),
            ..Default::default()
        };

        let y: Vec<T> = norm.layer_norm(&x, features, &ln).unwrap();
        let e = max_err(&wide(&y), &reference::layer_norm(&xw, features, &ln));
        assert!(e <= tol, "{at}: layer_norm {e}");
        // Rounded once, to nearest: the f32 op's output on the same values, each rounded.
        let once: Vec<T> = norm
            .layer_norm(&xw, features, &ln)
            .unwrap()
            .iter()
            .map(|&v| T::from_f32(v))
            .collect();
        assert!(
            y == once,
            "{at}: layer_norm is not the f32 result rounded once"
        );
        // Saved statistics are those of the f32 op on the same values, and y is layer_norm's.
        // The same values on the CPU; on a GPU the saving kernel variant may differ by a few
        // f32 ulps (see tests/backward.rs), which can round to a neighbouring T.
        let saved = norm.layer_norm_saving(&x, features, &ln).unwrap();
        let most = if norm.is_gpu() { 1 } else { 0 };
        let apart = saved.y.iter().zip(&y).map(|(&a, &b)| steps(a, b)).max();
        assert!(apart <= Some(most), "{at}: layer_norm_saving's y");
        let f32_stats = norm.layer_norm_saving(&xw, features, &ln).unwrap().stats;
        assert_eq!(
            saved.stats, f32_stats,
            "{at}: layer_norm_saving's statistics"
        );
        let y = norm.rms_norm(&x, features, &rms).unwrap();
        let e = max_err(&wide(&y), &reference::rms_norm(&xw, features, &rms));
        assert!(e <= tol, "{at}: rms_norm {e}");

        // The sum is rounded to T once; y is the norm of x + residual before that rounding
        // (exact in f32 for these magnitudes), as the f64 reference on the same inputs.
        let add = norm.add_layer_norm(&x, &r, features, &ln).unwrap();
        let sum: Vec<f32> = xw.iter().zip(&rw).map(|(a, b)| a + b).collect();
        let exact: Vec<f64> = xw
            .iter()
            .zip(&rw)
            .map(|(&a, &b)| a as f64 + b as f64)
            .collect();
        assert!(
            max_err(&wide(&add.sum), &exact) <= tol,
            "{at}: add_layer_norm sum"
        );
        let e = max_err(&wide(&add.y), &reference::layer_norm(&sum, features, &ln));
        assert!(e <= tol, "{at}: add_layer_norm {e}");
        let add = norm.add_rms_norm(&x, &r, features, &rms).unwrap();
        let e = max_err(&wide(&add.y), &reference::rms_norm(&sum, features, &rms));
        assert!(e <= tol, "{at}: add_rms_norm {e}");

        let grads = norm.layer_norm_backward(&x, &dy, features, &ln).unwrap();
        // The f32 arithmetic of f32 tensors holding the same values, dx rounded once.
        let f32_grads = norm.layer_norm_backward(&xw, &dyw, features, &ln).unwrap();
        let once: Vec<T> = f32_grads.dx.iter().map(|&v| T::from_f32(v)).collect();
        assert!(
            grads.dx == once,
            "{at}: layer_norm_backward dx is not rounded once"
        );
        assert_eq!(grads.dgamma, f32_grads.dgamma, "{at}: dgamma");
        assert_eq!(grads.dbeta, f32_grads.dbeta, "{at}: dbeta");
        let (rdx, rdgamma, rdbeta) = reference::layer_norm_backward(&xw, &dyw, features, &ln);
        let e = dx_error(&wide(&grads.dx), &rdx, features);
        assert!(e <= tol, "{at}: layer_norm_backward dx {e}");
        // f32 sums of up to a few hundred thousand products: as tests/backward.rs holds them.
        let sums = max_err(&grads.dgamma, &rdgamma).max(max_err(&grads.dbeta, &rdbeta));
        assert!(
            sums <= 1e-4,
            "{at}: layer_norm_backward dgamma/dbeta {sums}"
        );
        let grads = norm.rms_norm_backward(&x, &dy, features, &rms).unwrap();
        let (rdx, rdgamma) = reference::rms_norm_backward(&xw, &dyw, features, &rms);
        let e = dx_error(&wide(&grads.dx), &rdx, features);
        assert!(e <= tol, "{at}: rms_norm_backward dx {e}");
        assert!(max_err(&grads.dgamma, &rdgamma) <= 1e-4, "{at}: rms dgamma");

        // BatchNorm over the rows, a mask leaving one row out.
        if rows < 3 {
            continue;
        }
        let mask: Vec<bool> = (0..rows).map(|i| i != 1).collect();
        let bn = BatchNorm {
            mask: Some(&mask),
            gamma: Some(&gamma),
            beta: Some(&beta),
            ..Default::default()
        };
        let out = norm.batch_norm_train(&x, features, &bn).unwrap();
        let (ry, rmean, rvar, count) = reference::batch_norm_train(&xw, features, &bn);
        let e = max_err(&wide(&out.y), &ry);
        assert!(e <= tol, "{at}: batch_norm_train {e}");
        assert!(max_err(&out.mean, &rmean) <= 1e-4 && max_err(&out.var, &rvar) <= 1e-4);
        assert_eq!(out.count, count);
        let mut running = RunningStats::new(features);
        running.update(&out).unwrap();
        let y = norm.batch_norm_eval(&x, features, &bn, &running).unwrap();
        let (rm, rv) = in_f64(&running);
        let e = max_err(
            &wide(&y),
            &reference::batch_norm_apply(&xw, features, &rm, &rv, &bn),
        );
        assert!(e <= tol, "{at}: batch_norm_eval {e}");
        let grads = norm.batch_norm_backward(&x, &dy, features, &bn).unwrap();
        let (rdx, rdgamma, rdbeta) = reference::batch_norm_backward(&xw, &dyw, features, &bn);
        let e = dx_error(&wide(&grads.dx), &rdx, x.len());
        assert!(e <= tol, "{at}: batch_norm_backward dx {e}");
        let sums = max_err(&grads.dgamma, &rdgamma).max(max_err(&grads.dbeta, &rdbeta));
        assert!(
            sums <= 1e-4,
            "{at}: batch_norm_backward dgamma/dbeta {sums}"
        );
    }
}

per_backend! {
    fn every_op_on_f16_matches_the_reference(name, norm) {
        every_op::<f16>(name, norm);
    }
}

per_backend! {
    fn every_op_on_bf16_matches_the_reference(name, norm) {
        every_op::<bf16>(name, norm);
    }
}

per_backend! {
    /// Channels-first BatchNorm (forward and backward) on half tensors.
    fn channels_first_batch_norm_on_half_tensors(name, norm) {
        let (batch, channels, spatial) = (3, 5, 49);
        let (x, xw) = rounded::<f16>(&ordinary(batch * channels * spatial, 6));
        let (dy, dyw) = rounded::<f16>(&ordinary(batch * channels * spatial, 7));
        let bn = BatchNorm::default();
        let out = norm.batch_norm_train_channels_first(&x, channels, spatial, &bn).unwrap();
        let last = reference::channels_first_to_last(&xw, channels, spatial);
        let (ry, ..) = reference::batch_norm_train(&last, channels, &bn);
        let ry = reference::channels_last_to_first(&ry, channels, spatial);
        assert!(max_err(&wide(&out.y), &ry) <= f16::TOL, "{name}");
        let grads = norm.batch_norm_backward_channels_first(&x, &dy, channels, spatial, &bn).unwrap();
        let dy_last = reference::channels_first_to_last(&dyw, channels, spatial);
        let (rdx, ..) = reference::batch_norm_backward(&last, &dy_last, channels, &bn);
        let rdx = reference::channels_last_to_first(&rdx, channels, spatial);
        assert!(dx_error(&wide(&grads.dx), &rdx, rdx.len()) <= f16::TOL, "{name}");
    }
}

per_backend! {
    /// 65537 f16 values near 3 sum to about 196611, past f16's largest finite value (65504):
    /// the f32 statistics inside still normalize the row, and the column.
    fn sums_past_the_range_of_f16(name, norm) {
        let features = 65537;
        let (x, xw) = rounded::<f16>(&data(features, 3.0, 0.1, 8));
        let y = norm.layer_norm(&x, features, &LayerNorm::default()).unwrap();
        let e = max_err(&wide(&y), &reference::layer_norm(&xw, features, &LayerNorm::default()));
        assert!(e <= f16::TOL, "{name}: layer_norm {e}");
        let y = norm.rms_norm(&x, features, &RmsNorm::default()).unwrap();
        assert!(y.iter().all(|v| (v.to_f32() - 1.0).abs() < 0.1), "{name}: rms_norm");
        let out = norm.batch_norm_train(&x, 1, &BatchNorm::default()).unwrap();
        assert!((out.mean[0] - 3.0).abs() < 1e-2, "{name}: mean {}", out.mean[0]);
        let (ry, ..) = reference::batch_norm_train(&xw, 1, &BatchNorm::default());
        assert!(max_err(&wide(&out.y), &ry) <= f16::TOL, "{name}: batch_norm_train");
    }
}

per_backend! {
    /// Outputs past f16's range become ±infinity (not NaN); subnormal inputs normalize; NaN and
    /// infinite inputs spoil their own row only, as in f32.
    fn values_at_the_limits_of_f16(name, norm) {
        let features = 8;
        let (x, _) = rounded::<f16>(&ordinary(4 * features, 9));
        let big = vec![1e5f32; features];
        let opts = LayerNorm { gamma: Some(&big), ..Default::default() };
        let y = norm.layer_norm(&x, features, &opts).unwrap();
        let exact = norm.layer_norm(&wide(&x), features, &LayerNorm::default()).unwrap();
        for (v, e) in y.iter().zip(&exact) {
            if e.abs() * 1e5 > 65520.0 {
                assert!(v.is_infinite() && v.to_f32().signum() == e.signum(), "{name}: {v} for {e}");
            } else {
                assert!(!v.is_nan(), "{name}");
            }
        }
        assert!(y.iter().any(|v| v.is_infinite()), "{name}: the case overflows");

        // Subnormal f16 values (below 6.1e-5), with eps 0.
        let tiny: Vec<f16> = (0..features).map(|i| f16::from_bits(1 + i as u16 * 37)).collect();
        assert!(tiny.iter().all(|v| !v.is_normal()));
        let opts = LayerNorm { eps: 0.0, ..Default::default() };
        let y = norm.layer_norm(&tiny, features, &opts).unwrap();
        let e = max_err(&wide(&y), &reference::layer_norm(&wide(&tiny), features, &opts));
        assert!(e <= f16::TOL, "{name}: subnormals {e}");

        // NaN in row 1 and +Inf in row 2: those rows only.
        let mut bad = x.clone();
        bad[features + 3] = f16::NAN;
        bad[2 * features + 5] = f16::INFINITY;
        let y = norm.layer_norm(&bad, features, &LayerNorm::default()).unwrap();
        let clean = norm.layer_norm(&x, features, &LayerNorm::default()).unwrap();
        assert!(y[features..2 * features].iter().all(|v| v.is_nan()), "{name}");
        assert_eq!(y[..features], clean[..features], "{name}");
        assert_eq!(y[3 * features..], clean[3 * features..], "{name}");
    }
}

per_backend! {
    /// The `_into` forms write half outputs into the caller's buffer, agree with the allocating
    /// forms, and a refused call writes nothing.
    fn into_forms_write_half_outputs(name, norm) {
        let features = 16;
        let (x, _) = rounded::<bf16>(&ordinary(10 * features, 10));
        let mut y = vec![bf16::from_f32(7.0); x.len()];
        norm.layer_norm_into(&x, features, &LayerNorm::default(), &mut y).unwrap();
        assert_eq!(y, norm.layer_norm(&x, features, &LayerNorm::default()).unwrap(), "{name}");
        norm.rms_norm_into(&x, features, &RmsNorm::default(), &mut y).unwrap();
        assert_eq!(y, norm.rms_norm(&x, features, &RmsNorm::default()).unwrap(), "{name}");
        let bn = BatchNorm::default();
        let (stats, _) = norm.batch_norm_train_into(&x, features, &bn, &mut y).unwrap();
        let out = norm.batch_norm_train(&x, features, &bn).unwrap();
        assert_eq!((&y, &stats.mean), (&out.y, &out.mean), "{name}");
        let mut short = vec![bf16::from_f32(7.0); x.len() - 1];
        assert!(matches!(
            norm.layer_norm_into(&x, features, &LayerNorm::default(), &mut short),
            Err(NormError::OutputLength { .. })
        ));
        assert!(short.iter().all(|v| v.to_f32() == 7.0), "{name}: a refused call writes nothing");
    }
}

/// Half GPU tensors keep half the bytes and come back bit for bit, at odd lengths too (the last
/// word holds one value); `download` widens them exactly, `download_as` converts to any type.
#[test]
fn half_gpu_tensors_round_trip() {
    let Some(norm) = common::gpu() else { return };
    for len in [1, 2, 3, 1001, 4096] {
        let (x, xw) = rounded::<f16>(&ordinary(len, 20));
        let t = norm.upload_typed(&x).unwrap();
        assert_eq!((t.len(), t.element_type()), (len, ElementType::F16));
        assert!(t.buffer().size() >= (2 * len as u64).next_multiple_of(4));
        assert_eq!(norm.download_as::<f16>(&t).unwrap(), x, "{len}");
        assert_eq!(norm.download(&t).unwrap(), xw, "{len}: widened exactly");
        let as_bf16: Vec<bf16> = xw.iter().map(|&v| bf16::from_f32(v)).collect();
        assert_eq!(norm.download_as::<bf16>(&t).unwrap(), as_bf16, "{len}");

        let (b, bw) = rounded::<bf16>(&ordinary(len, 21));
        let t = norm.upload_rows_typed(&b, 1).unwrap();
        assert_eq!(t.element_type(), ElementType::BF16);
        assert_eq!(norm.download_as::<bf16>(&t).unwrap(), b, "{len}");
        assert_eq!(norm.download(&t).unwrap(), bw, "{len}");
        let t = norm.upload_typed(&bw).unwrap();
        assert_eq!(
            norm.download_as::<bf16>(&t).unwrap(),
            b,
            "{len}: rounded once"
        );
    }
    // A large f16 tensor takes half the device bytes of its f32 twin.
    // (Under CI's lowered 1 MiB binding too.)
    let x = vec![f16::ONE; 1 << 17];
    let (half, full) = (
        norm.upload_typed(&x).unwrap(),
        norm.upload(&vec![1f32; 1 << 17]).unwrap(),
    );
    assert!(half.buffer().size() * 2 <= full.buffer().size());
}

/// Every op on half GPU tensors returns tensors of the input's type (parameter gradients f32)
/// and matches the reference; row ops on rows of even length (read as they are) give the host
/// path's bits, and the ops that widen on the device (BatchNorm, odd rows) hold the tolerance.
fn every_op_on_gpu_tensors<T: Half>(norm: &gpunorm::Normalizer) {
    let tol = T::TOL;
    for &(rows, features) in &[(40, 1), (33, 3), (12, 6), (9, 256), (3, 4098), (5, 4099)] {
        let at = format!("{} {rows}x{features}", T::NAME);
        let (x, xw) = rounded::<T>(&data(rows * features, 2.0, 1.0, 22));
        let (r, rw) = rounded::<T>(&ordinary(rows * features, 23));
        let (dy, dyw) = rounded::<T>(&ordinary(rows * features, 24));
        let gamma = data(features, 1.0, 0.5, 25);
        let ln = LayerNorm {
            gamma: Some(&gamma),
            ..Default::default()
        };
        let rms = RmsNorm {
            gamma: Some(&gamma),
            ..Default::default()
        };
        let (xt, rt, dyt) = (
            norm.upload_rows_typed(&x, features).unwrap(),
            norm.upload_rows_typed(&r, features).unwrap(),
            norm.upload_rows_typed(&dy, features).unwrap(),
        );
        let get = |t: &gpunorm::GpuTensor| {
            assert_eq!(t.element_type(), T::TYPE, "{at}");
            norm.download_as::<T>(t).unwrap()
        };

        let y = get(&norm.layer_norm_gpu(&xt, features, &ln).unwrap());
        let e = max_err(&wide(&y), &reference::layer_norm(&xw, features, &ln));
        assert!(e <= tol, "{at}: layer_norm_gpu {e}");
        let y = get(&norm.rms_norm_gpu(&xt, features, &rms).unwrap());
        let e = max_err(&wide(&y), &reference::rms_norm(&xw, features, &rms));
        assert!(e <= tol, "{at}: rms_norm_gpu {e}");
        if features % 2 == 0 {
            assert_eq!(
                y,
                norm.rms_norm(&x, features, &rms).unwrap(),
                "{at}: host bits"
            );
        }

        let add = norm.add_layer_norm_gpu(&xt, &rt, features, &ln).unwrap();
        let sum: Vec<f32> = xw.iter().zip(&rw).map(|(a, b)| a + b).collect();
        let exact: Vec<f64> = sum.iter().map(|&v| v as f64).collect();
        assert!(max_err(&wide(&get(&add.sum)), &exact) <= tol, "{at}: sum");
        let e = max_err(
            &wide(&get(&add.y)),
            &reference::layer_norm(&sum, features, &ln),
        );
        assert!(e <= tol, "{at}: add_layer_norm_gpu {e}");

        let grads = norm
            .layer_norm_backward_gpu(&xt, &dyt, features, &ln)
            .unwrap();
        let (rdx, rdgamma, rdbeta) = reference::layer_norm_backward(&xw, &dyw, features, &ln);
        let e = dx_error(&wide(&get(&grads.dx)), &rdx, features);
        assert!(e <= tol, "{at}: layer_norm_backward_gpu dx {e}");
        assert_eq!(grads.dgamma.element_type(), ElementType::F32);
        let (dgamma, dbeta) = (
            norm.download(&grads.dgamma).unwrap(),
            norm.download(&grads.dbeta).unwrap(),
        );
        let sums = max_err(&dgamma, &rdgamma).max(max_err(&dbeta, &rdbeta));
        assert!(sums <= 1e-4, "{at}: dgamma/dbeta {sums}");
        let grads = norm
            .rms_norm_backward_gpu(&xt, &dyt, features, &rms)
            .unwrap();
        let (rdx, _) = reference::rms_norm_backward(&xw, &dyw, features, &rms);
        let e = dx_error(&wide(&get(&grads.dx)), &rdx, features);
        assert!(e <= tol, "{at}: rms_norm_backward_gpu dx {e}");

        let bn = BatchNorm::default();
        let (yt, stats) = norm.batch_norm_train_gpu(&xt, features, &bn).unwrap();
        let (ry, rmean, ..) = reference::batch_norm_train(&xw, features, &bn);
        let e = max_err(&wide(&get(&yt)), &ry);
        assert!(e <= tol, "{at}: batch_norm_train_gpu {e}");
        assert!(max_err(&stats.mean, &rmean) <= 1e-4, "{at}: mean");
        let grads = norm
            .batch_norm_backward_gpu(&xt, &dyt, features, &bn)
            .unwrap();
        let (rdx, ..) = reference::batch_norm_backward(&xw, &dyw, features, &bn);
        let e = dx_error(&wide(&get(&grads.dx)), &rdx, x.len());
        assert!(e <= tol, "{at}: batch_norm_backward_gpu dx {e}");
        let mut running = RunningStats::new(features);
        running.momentum = 1.0;
        running.update_with(&stats).unwrap();
        let y = get(&norm
            .batch_norm_eval_gpu(&xt, features, &bn, &running)
            .unwrap());
        let (rm, rv) = in_f64(&running);
        let e = max_err(
            &wide(&y),
            &reference::batch_norm_apply(&xw, features, &rm, &rv, &bn),
        );
        assert!(e <= tol, "{at}: batch_norm_eval_gpu {e}");
    }
}

#[test]
fn every_op_on_f16_gpu_tensors() {
    let Some(norm) = common::gpu() else { return };
    every_op_on_gpu_tensors::<f16>(norm);
}

#[test]
fn every_op_on_bf16_gpu_tensors() {
    let Some(norm) = common::gpu() else { return };
    every_op_on_gpu_tensors::<bf16>(norm);
}

/// Tensors of one call must hold one element type: anything else is refused, naming the
/// argument, before any work.
#[test]
fn mixed_element_types_are_refused() {
    let Some(norm) = common::gpu() else { return };
    let features = 8;
    let (x, xw) = rounded::<f16>(&ordinary(4 * features, 26));
    let (xt, wt) = (
        norm.upload_rows_typed(&x, features).unwrap(),
        norm.upload_rows_typed(&xw, features).unwrap(),
    );
    let bt = norm
        .upload_rows_typed(&rounded::<bf16>(&xw).0, features)
        .unwrap();
    let ln = LayerNorm::default();
    let refused = |r: Result<_, NormError>, name: &str| match r {
        Err(NormError::ElementTypes { name: n, .. }) => assert_eq!(n, name),
        Err(e) => panic!("{name}: {e}"),
        Ok(_) => panic!("{name}: accepted"),
    };
    refused(
        norm.add_layer_norm_gpu(&xt, &wt, features, &ln).map(|_| ()),
        "residual",
    );
    refused(
        norm.add_rms_norm_gpu(&wt, &bt, features, &RmsNorm::default())
            .map(|_| ()),
        "residual",
    );
    refused(
        norm.layer_norm_backward_gpu(&xt, &bt, features, &ln)
            .map(|_| ()),
        "dy",
    );
    refused(
        norm.batch_norm_backward_gpu(&bt, &xt, features, &BatchNorm::default())
            .map(|_| ()),
        "dy",
    );
    let e = norm
        .add_layer_norm_gpu(&xt, &wt, features, &ln)
        .unwrap_err();
    assert!(
        e.to_string().contains("f32") && e.to_string().contains("f16"),
        "{e}"
    );
}

per_backend! {
    /// BatchNorm on half tensors larger than the CPU's pieces (about 2^20 values each, merged
    /// as shards of one batch): features-last with a padded tail across a piece boundary, and
    /// channels-first, forward, eval and backward, against the reference on the same inputs.
    fn batch_norm_on_large_half_tensors(name, norm) {
        let (rows, features) = (1300, 1000);
        let (x, xw) = rounded::<f16>(&data(rows * features, 3.0, 0.5, 40));
        // A zero-mean dy: with a same-signed one, dgamma = Σ dy · xhat nearly cancels over the
        // 1100 rows and carries the f32 error of its terms' sum (see tests/backward.rs).
        let (dy, dyw) = rounded::<f16>(&data(rows * features, 0.0, 1.0, 41));
        let mask: Vec<bool> = (0..rows).map(|r| r < 1100 || r % 7 == 0).collect();
        let gamma = data(features, 1.0, 0.5, 42);
        let bn = BatchNorm { mask: Some(&mask), gamma: Some(&gamma), ..Default::default() };
        let out = norm.batch_norm_train(&x, features, &bn).unwrap();
        let (ry, rmean, rvar, count) = reference::batch_norm_train(&xw, features, &bn);
        assert!(max_err(&wide(&out.y), &ry) <= f16::TOL, "{name}: y");
        assert!(max_err(&out.mean, &rmean) <= 1e-4 && max_err(&out.var, &rvar) <= 1e-4, "{name}");
        assert_eq!(out.count, count, "{name}");
        let mut running = RunningStats::new(features);
        running.update(&out).unwrap();
        let y = norm.batch_norm_eval(&x, features, &bn, &running).unwrap();
        let (rm, rv) = in_f64(&running);
        let e = max_err(&wide(&y), &reference::batch_norm_apply(&xw, features, &rm, &rv, &bn));
        assert!(e <= f16::TOL, "{name}: eval {e}");
        let grads = norm.batch_norm_backward(&x, &dy, features, &bn).unwrap();
        let (rdx, rdgamma, rdbeta) = reference::batch_norm_backward(&xw, &dyw, features, &bn);
        let e = dx_error(&wide(&grads.dx), &rdx, x.len());
        assert!(e <= f16::TOL, "{name}: dx {e}");
        let sums = max_err(&grads.dgamma, &rdgamma).max(max_err(&grads.dbeta, &rdbeta));
        assert!(sums <= 1e-4, "{name}: dgamma/dbeta {sums}");
        assert!(grads.dx[1101 * features..1102 * features].iter().all(|v| v.to_f32() == 0.0));

        // Items of 180000 values (within CI's 1 MiB binding as f32), five to a CPU piece.
        let (batch, channels, spatial) = (7, 3, 60_000);
        let (x, xw) = rounded::<bf16>(&data(batch * channels * spatial, -2.0, 1.0, 43));
        let out = norm.batch_norm_train_channels_first(&x, channels, spatial, &BatchNorm::default()).unwrap();
        let last = reference::channels_first_to_last(&xw, channels, spatial);
        let (ry, ..) = reference::batch_norm_train(&last, channels, &BatchNorm::default());
        let ry = reference::channels_last_to_first(&ry, channels, spatial);
        assert!(max_err(&wide(&out.y), &ry) <= bf16::TOL, "{name}: channels-first");
    }
}
