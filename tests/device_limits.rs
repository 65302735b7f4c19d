//! gpunorm on devices opened with lowered limits (`Normalizer::from_wgpu`): every op plans within
//! the limits it is given, on any adapter, and says so in plain words where it cannot.

mod common;

use common::{data, gpu, max_err, ordinary};
use gpunorm::{mask_from_lengths, reference, BatchNorm, LayerNorm, NormError, Normalizer};

/// Ordinary data: f32 rounding of a few operations, far below this.
const TOL: f64 = 1e-4;

/// A `Normalizer` on the test adapter, opened with `lower` applied to its limits.
fn lowered(lower: impl FnOnce(&mut gpunorm::wgpu::Limits)) -> Option<Normalizer> {
    gpu()?;
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle());
    let adapter = pollster::block_on(instance.request_adapter(&Default::default())).ok()?;
    let mut limits = adapter.limits();
    lower(&mut limits);
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        required_limits: limits,
        ..Default::default()
    }))
    .expect("a device with lowered limits");
    Some(Normalizer::from_wgpu(device, queue))
}

/// The error of BatchNorm eval on `x` with a training run's statistics as running ones, against
/// the reference applying the same statistics.
fn eval_error(
    norm: &Normalizer,
    x: &[f32],
    features: usize,
    opts: &BatchNorm<'_>,
    trained: &gpunorm::BatchNormOutput,
) -> f64 {
    let stats = gpunorm::RunningStats {
        mean: trained.mean.clone(),
        var: trained.var.clone(),
        momentum: 0.1,
    };
    let y = norm.batch_norm_eval(x, features, opts, &stats).unwrap();
    let f64s = |v: &[f32]| v.iter().map(|&v| v as f64).collect::<Vec<_>>();
    let y_ref =
        reference::batch_norm_apply(x, features, &f64s(&stats.mean), &f64s(&stats.var), opts);
    max_err(&y, &y_ref)
}

/// BatchNorm training of features-last `x` matches the reference (output, mean, variance and
/// count), and so does eval with the statistics it found as running ones.
fn check_train_and_eval(norm: &Normalizer, x: &[f32], features: usize, opts: &BatchNorm<'_>) {
    let rows = x.len() / features;
    let out = norm.batch_norm_train(x, features, opts).unwrap();
    let (y_ref, mean, var, count) = reference::batch_norm_train(x, features, opts);
    assert_eq!(out.count, count, "{rows}x{features}");
    let err = max_err(&out.y, &y_ref)
        .max(max_err(&out.mean, &mean))
        .max(max_err(&out.var, &var));
    assert!(
        err < TOL,
        "batch_norm_train {rows}x{features}: error {err:e}"
    );
    let err = eval_error(norm, x, features, opts, &out);
    assert!(
        err < TOL,
        "batch_norm_eval {rows}x{features}: error {err:e}"
    );
}

/// A grid of at most 64 workgroups a side and 1 MiB bindings: LayerNorm and BatchNorm (both
/// layouts, masked, training and eval) split into many chunks and fold their grids, and match the
/// reference.
#[test]
fn small_grids_and_bindings_still_give_the_reference() {
    let Some(norm) = lowered(|l| {
        l.max_compute_workgroups_per_dimension = 64;
        l.max_storage_buffer_binding_size = 1 << 20;
    }) else {
        return;
    };
    for &(rows, features) in &[(20_000, 3), (3000, 129), (700, 1024), (40, 20_000)] {
        let x = ordinary(rows * features, features as u64);
        let y = norm
            .layer_norm(&x, features, &LayerNorm::default())
            .unwrap();
        let err = max_err(
            &y,
            &reference::layer_norm(&x, features, &LayerNorm::default()),
        );
        assert!(err < TOL, "layer_norm {rows}x{features}: error {err:e}");

        // The first counted row lies in a later chunk.
        let mut mask = vec![false; rows / 2];
        mask.resize(rows, true);
        let opts = BatchNorm {
            mask: Some(&mask),
            ..Default::default()
        };
        check_train_and_eval(&norm, &x, features, &opts);
    }
    // Channels-first, with the mask over (batch, spatial) positions.
    let (batch, channels, spatial) = (64, 6, 1000);
    let x = data(batch * channels * spatial, 3.0, 1.5, 4);
    let mask = mask_from_lengths(&vec![700; batch], spatial).unwrap();
    let opts = BatchNorm {
        mask: Some(&mask),
        ..Default::default()
    };
    let out = norm
        .batch_norm_train_channels_first(&x, channels, spatial, &opts)
        .unwrap();
    let last = reference::channels_first_to_last(&x, channels, spatial);
    let (y_ref, mean, _, _) = reference::batch_norm_train(&last, channels, &opts);
    let y_ref = reference::channels_last_to_first(&y_ref, channels, spatial);
    let err = max_err(&out.y, &y_ref).max(max_err(&out.mean, &mean));
    assert!(err < TOL, "channels-first: error {err:e}");
}

/// Every kernel binds at most 4 storage buffers, the least a WebGPU device may offer: a device
/// that allows no more runs LayerNorm and BatchNorm (with gamma, beta and a mask, in both layouts
/// and widths), and matches the reference.
#[test]
fn four_storage_buffers_are_enough() {
    let Some(norm) = lowered(|l| l.max_storage_buffers_per_shader_stage = 4) else {
        return;
    };
    for features in [8, 7] {
        let x = ordinary(10 * features, 1);
        let (gamma, beta) = (data(features, 1.0, 0.3, 2), data(features, 0.0, 1.0, 3));
        let ln = LayerNorm {
            gamma: Some(&gamma),
            beta: Some(&beta),
            ..Default::default()
        };
        let y = norm.layer_norm(&x, features, &ln).unwrap();
        assert!(max_err(&y, &reference::layer_norm(&x, features, &ln)) < TOL);
        let mask = [true, false, true, true, true, true, true, true, true, false];
        let bn = BatchNorm {
            gamma: Some(&gamma),
            beta: Some(&beta),
            mask: Some(&mask),
            ..Default::default()
        };
        let out = norm.batch_norm_train(&x, features, &bn).unwrap();
        let (y, _, _, _) = reference::batch_norm_train(&x, features, &bn);
        assert!(max_err(&out.y, &y) < TOL, "{features} features");
        let err = eval_error(&norm, &x, features, &bn, &out);
        assert!(err < TOL, "{features} features, eval");
    }
}

/// A device destroyed under a `Normalizer` (as a driver reset or the caller's `destroy()` would
/// leave it) makes every later call an error that says a new `Normalizer` is needed: never a
/// panic, never a result. Both for a device gpunorm opened and for one the caller passed in.
#[test]
fn a_lost_device_is_an_error_that_says_to_start_again() {
    let Some(callers) = lowered(|_| {}) else {
        return;
    };
    let own = Normalizer::gpu().expect("the test adapter");
    for (name, norm) in [("gpunorm's device", own), ("the caller's device", callers)] {
        let x = ordinary(64 * 8, 1);
        let (ln, bn) = (LayerNorm::default(), BatchNorm::default());
        norm.layer_norm(&x, 8, &ln).unwrap();
        let t = norm.upload(&x).unwrap();
        let (device, _) = norm.wgpu().unwrap();
        let (bx, by) = (
            t.buffer().clone(),
            norm.upload(&x).unwrap().buffer().clone(),
        );
        let mut encoder = device.create_command_encoder(&Default::default());
        device.destroy();
        let stats = gpunorm::RunningStats::new(8);
        let results = [
            norm.layer_norm(&x, 8, &ln).map(|_| ()),
            norm.batch_norm_train(&x, 8, &bn).map(|_| ()),
            norm.batch_norm_eval(&x, 8, &bn, &stats).map(|_| ()),
            norm.upload(&x).map(|_| ()),
            norm.download(&t).map(|_| ()),
            norm.layer_norm_gpu(&t, 8, &ln).map(|_| ()),
            norm.batch_norm_train_gpu(&t, 8, &bn).map(|_| ()),
            norm.encode_layer_norm(&mut encoder, &bx, &by, x.len(), 8, &ln),
        ];
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Err(e @ NormError::DeviceLost(_)) => {
                    assert!(
                        e.to_string().contains("new Normalizer"),
                        "{name}, call {i}: {e}"
                    )
                }
                other => panic!("{name}, call {i}: expected DeviceLost, got {other:?}"),
            }
        }
    }
}

/// Columns whose statistics (32 bytes each) exceed one binding: with 64 KiB bindings, 2048 columns
/// fit, so 5000 run in three blocks. Training and eval, with gamma, beta and a mask, features-last
/// (widths that take the vec4 kernels and ones that do not), channels-first, and a GPU tensor,
/// all match the reference.
#[test]
fn batches_wider_than_one_binding_of_statistics_run_in_blocks() {
    let Some(norm) = lowered(|l| l.max_storage_buffer_binding_size = 64 << 10) else {
        return;
    };
    for features in [5000, 4999, 2056] {
        let rows = 40;
        let x = ordinary(rows * features, features as u64);
        let gamma = data(features, 1.0, 0.3, 1);
        let beta = data(features, 0.0, 1.0, 2);
        let mask: Vec<bool> = (0..rows).map(|r| r % 7 != 3).collect();
        let opts = BatchNorm {
            gamma: Some(&gamma),
            beta: Some(&beta),
            mask: Some(&mask),
            ..Default::default()
        };
        check_train_and_eval(&norm, &x, features, &opts);
    }
    // Channels-first: 3000 channels, with 4 positions each (four at a time) and 3.
    for spatial in [4, 3] {
        let (batch, channels) = (3, 3000);
        let x = data(batch * channels * spatial, 3.0, 1.5, spatial as u64);
        let out = norm
            .batch_norm_train_channels_first(&x, channels, spatial, &BatchNorm::default())
            .unwrap();
        let last = reference::channels_first_to_last(&x, channels, spatial);
        let (y_ref, mean, var, _) =
            reference::batch_norm_train(&last, channels, &BatchNorm::default());
        let y_ref = reference::channels_last_to_first(&y_ref, channels, spatial);
        let err = max_err(&out.y, &y_ref)
            .max(max_err(&out.mean, &mean))
            .max(max_err(&out.var, &var));
        assert!(
            err < TOL,
            "channels-first, spatial {spatial}: error {err:e}"
        );
    }
    // A GPU tensor of 3 rows of 5000 (60 KB, one binding).
    let features = 5000;
    let x = ordinary(3 * features, 11);
    let tensor = norm.upload(&x).unwrap();
    let (y, stats) = norm
        .batch_norm_train_gpu(&tensor, features, &BatchNorm::default())
        .unwrap();
    let (y_ref, mean, _, _) = reference::batch_norm_train(&x, features, &BatchNorm::default());
    let err = max_err(&norm.download(&y).unwrap(), &y_ref).max(max_err(&stats.mean, &mean));
    assert!(err < TOL, "GPU tensor: error {err:e}");
}
