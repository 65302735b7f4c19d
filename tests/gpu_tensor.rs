//! GPU-resident tensors and wgpu interop: ops chained on the device, a Normalizer on the
//! caller's device, and LayerNorm recorded into the caller's encoder on the caller's buffers.

mod common;

use common::{gpu, max_err, ordinary};
use gpunorm::{reference, BatchNorm, LayerNorm, NormError, Normalizer, RmsNorm, RunningStats};

/// Same kernel, same input: the device path and the host path agree bit for bit.
#[test]
fn chained_device_ops_match_the_host_path() {
    let Some(norm) = gpu() else { return };
    let features = 300;
    let x = ordinary(50 * features, 1);
    let gamma: Vec<f32> = (0..features)
        .map(|i| 0.5 + i as f32 / features as f32)
        .collect();
    let opts = LayerNorm {
        gamma: Some(&gamma),
        ..Default::default()
    };
    let t = norm.upload(&x).unwrap();
    assert_eq!(t.len(), x.len());
    let once = norm.layer_norm_gpu(&t, features, &opts).unwrap();
    let twice = norm
        .layer_norm_gpu(&once, features, &LayerNorm::default())
        .unwrap();
    let host_once = norm.layer_norm(&x, features, &opts).unwrap();
    let host_twice = norm
        .layer_norm(&host_once, features, &LayerNorm::default())
        .unwrap();
    assert_eq!(norm.download(&once).unwrap(), host_once);
    assert_eq!(norm.download(&twice).unwrap(), host_twice);
    // And against the reference, as everywhere (tolerance as in tests/layer_norm.rs).
    let r = reference::layer_norm(&x, features, &opts);
    assert!(max_err(&host_once, &r) < 1e-4);
    // The input tensor is untouched.
    assert_eq!(norm.download(&t).unwrap(), x);
}

/// RMSNorm on a GPU tensor gives the host path's bits, chains after LayerNorm without a round
/// trip, and refuses a tensor of another row width.
#[test]
fn rms_norm_on_gpu_tensors_matches_the_host_path() {
    let Some(norm) = gpu() else { return };
    let features = 256;
    let x = ordinary(40 * features, 3);
    let t = norm.upload_rows(&x, features).unwrap();
    let rms = RmsNorm::default();
    let y = norm.rms_norm_gpu(&t, features, &rms).unwrap();
    assert_eq!(
        norm.download(&y).unwrap(),
        norm.rms_norm(&x, features, &rms).unwrap()
    );
    let ln = norm
        .layer_norm_gpu(&t, features, &LayerNorm::default())
        .unwrap();
    let chained = norm.rms_norm_gpu(&ln, features, &rms).unwrap();
    let host = norm
        .layer_norm(&x, features, &LayerNorm::default())
        .unwrap();
    assert_eq!(
        norm.download(&chained).unwrap(),
        norm.rms_norm(&host, features, &rms).unwrap()
    );
    assert_eq!(
        norm.rms_norm_gpu(&t, 128, &rms).map(|_| ()),
        Err(NormError::TensorShape {
            features: 256,
            given: 128
        })
    );
}

/// Large uploads and downloads are copied in pieces on several threads: every value comes back
/// in its place, a last piece of odd length included. Under a lowered GPUNORM_MAX_BINDING_BYTES
/// a tensor past one binding is refused instead.
#[test]
fn large_tensors_round_trip_exactly() {
    let Some(norm) = gpu() else { return };
    let binding = common::planned_binding_bytes();
    for len in [(5 << 20) / 4 + 3, (4 << 20) / 4 - 1, 17] {
        let x = ordinary(len, len as u64);
        if (len * 4) as u64 > binding {
            assert!(
                matches!(norm.upload(&x), Err(NormError::TooLarge { .. })),
                "{len} values past a {binding}-byte binding"
            );
            continue;
        }
        let t = norm.upload(&x).unwrap();
        assert_eq!(norm.download(&t).unwrap(), x, "{len} values");
    }
}

#[test]
fn device_ops_check_their_input() {
    let Some(norm) = gpu() else { return };
    let t = norm.upload(&[1.0; 12]).unwrap();
    assert_eq!(
        norm.layer_norm_gpu(&t, 5, &LayerNorm::default())
            .map(|_| ()),
        Err(NormError::LengthNotMultiple {
            len: 12,
            features: 5
        })
    );
    let empty = norm.upload(&[]).unwrap();
    assert!(empty.is_empty());
    let out = norm
        .layer_norm_gpu(&empty, 3, &LayerNorm::default())
        .unwrap();
    assert_eq!(norm.download(&out).unwrap(), Vec::<f32>::new());
}

/// A tensor that knows its row width (from `upload_rows`, or an op's output) refuses a call that
/// reads it as rows of another width; `upload` leaves the width to each call.
#[test]
fn tensors_keep_their_row_width() {
    let Some(norm) = gpu() else { return };
    let x: Vec<f32> = (0..12).map(|v| v as f32).collect();
    assert_eq!(
        norm.upload_rows(&x, 5).map(|_| ()),
        Err(NormError::LengthNotMultiple {
            len: 12,
            features: 5
        })
    );
    assert_eq!(
        norm.upload_rows(&x, 0).map(|_| ()),
        Err(NormError::ZeroFeatures)
    );
    let rows = norm.upload_rows(&x, 4).unwrap();
    assert_eq!(rows.features(), Some(4));
    let wrong = norm
        .layer_norm_gpu(&rows, 3, &LayerNorm::default())
        .unwrap_err();
    assert_eq!(
        wrong,
        NormError::TensorShape {
            features: 4,
            given: 3
        }
    );
    assert!(wrong.to_string().contains("pass features = 4"), "{wrong}");
    let bn = BatchNorm::default();
    assert_eq!(
        norm.batch_norm_train_gpu(&rows, 6, &bn).map(|_| ()),
        Err(NormError::TensorShape {
            features: 4,
            given: 6
        })
    );
    let stats = RunningStats::new(2);
    assert_eq!(
        norm.batch_norm_eval_gpu(&rows, 2, &bn, &stats).map(|_| ()),
        Err(NormError::TensorShape {
            features: 4,
            given: 2
        })
    );

    // The right width runs, and the output carries it on.
    let y = norm
        .layer_norm_gpu(&rows, 4, &LayerNorm::default())
        .unwrap();
    assert_eq!(y.features(), Some(4));
    let err = max_err(
        &norm.download(&y).unwrap(),
        &reference::layer_norm(&x, 4, &LayerNorm::default()),
    );
    assert!(err < 1e-5, "error {err:e}");
    assert!(matches!(
        norm.layer_norm_gpu(&y, 6, &LayerNorm::default()),
        Err(NormError::TensorShape {
            features: 4,
            given: 6
        })
    ));

    // A tensor from `upload` takes the width each call gives.
    let plain = norm.upload(&x).unwrap();
    assert_eq!(plain.features(), None);
    let y = norm
        .layer_norm_gpu(&plain, 3, &LayerNorm::default())
        .unwrap();
    assert_eq!(y.features(), Some(3));
}

/// A tensor belongs to the Normalizer that made it: another one (its own device) refuses it
/// with an error instead of handing wgpu a buffer of a foreign device.
#[test]
fn another_normalizers_tensor_is_refused() {
    let Some(norm) = gpu() else { return };
    let other = Normalizer::gpu().unwrap();
    let t = norm.upload(&[1.0, 2.0, 3.0, 4.0]).unwrap();
    let refused = |r: Result<(), NormError>, name| {
        assert!(
            matches!(r, Err(NormError::InvalidBuffer { name: n, .. }) if n == name),
            "{r:?}"
        )
    };
    refused(
        other
            .layer_norm_gpu(&t, 2, &LayerNorm::default())
            .map(|_| ()),
        "x",
    );
    refused(
        other
            .batch_norm_train_gpu(&t, 2, &BatchNorm::default())
            .map(|_| ()),
        "x",
    );
    refused(other.download(&t).map(|_| ()), "tensor");
    // Both still work with their own tensors.
    assert_eq!(norm.download(&t).unwrap(), [1.0, 2.0, 3.0, 4.0]);
    let mine = other.upload(&[5.0, 6.0]).unwrap();
    assert_eq!(other.download(&mine).unwrap(), [5.0, 6.0]);
}

#[test]
fn the_cpu_fallback_has_no_device_tensors() {
    let cpu = Normalizer::cpu();
    assert!(matches!(cpu.upload(&[1.0, 2.0]), Err(NormError::NotGpu(_))));
}

/// A caller with its own wgpu device hands it to gpunorm and records LayerNorm into its own
/// command encoder, on its own buffers, next to its own work.
#[test]
fn a_normalizer_on_the_callers_device_records_into_the_callers_encoder() {
    if gpu().is_none() {
        return;
    }
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle());
    let adapter = pollster::block_on(instance.request_adapter(&Default::default())).unwrap();
    let (device, queue) = pollster::block_on(adapter.request_device(&Default::default())).unwrap();
    let norm = Normalizer::from_wgpu(device.clone(), queue.clone());
    assert!(norm.is_gpu());

    let features = 64;
    let x = ordinary(20 * features, 7);
    let expected = norm
        .layer_norm(&x, features, &LayerNorm::default())
        .unwrap();
    let r = reference::layer_norm(&x, features, &LayerNorm::default());
    assert!(max_err(&expected, &r) < 1e-4);

    use wgpu::BufferUsages as U;
    let bytes = (x.len() * 4) as u64;
    let make = |usage| {
        device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: bytes,
            usage,
            mapped_at_creation: false,
        })
    };
    let (bx, by, staging) = (
        make(U::STORAGE | U::COPY_DST),
        make(U::STORAGE | U::COPY_SRC),
        make(U::MAP_READ | U::COPY_DST),
    );
    queue.write_buffer(&bx, 0, bytemuck::cast_slice(&x));
    let mut encoder = device.create_command_encoder(&Default::default());
    norm.encode_layer_norm(
        &mut encoder,
        &bx,
        &by,
        x.len(),
        features,
        &LayerNorm::default(),
    )
    .unwrap();
    encoder.copy_buffer_to_buffer(&by, 0, &staging, 0, bytes);
    queue.submit([encoder.finish()]);
    let (tx, rx) = std::sync::mpsc::channel();
    staging
        .slice(..)
        .map_async(wgpu::MapMode::Read, move |r| tx.send(r).unwrap());
    device.poll(wgpu::PollType::wait_indefinitely()).unwrap();
    rx.recv().unwrap().unwrap();
    let y: Vec<f32> = bytemuck::cast_slice(&staging.slice(..).get_mapped_range().unwrap()).to_vec();
    assert_eq!(y, expected);

    // Buffers it cannot use are refused before anything is recorded.
    let mut encoder = device.create_command_encoder(&Default::default());
    let small = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 16,
        usage: U::STORAGE,
        mapped_at_creation: false,
    });
    let opts = LayerNorm::default();
    assert!(matches!(
        norm.encode_layer_norm(&mut encoder, &staging, &by, x.len(), features, &opts),
        Err(NormError::InvalidBuffer { name: "x", .. })
    ));
    assert!(matches!(
        norm.encode_layer_norm(&mut encoder, &bx, &small, x.len(), features, &opts),
        Err(NormError::InvalidBuffer { name: "y", .. })
    ));
    assert!(matches!(
        norm.encode_layer_norm(&mut encoder, &bx, &by, x.len(), 0, &opts),
        Err(NormError::ZeroFeatures)
    ));
    assert!(matches!(
        norm.encode_layer_norm(&mut encoder, &by, &by, x.len(), features, &opts),
        Err(NormError::InvalidBuffer { name: "y", .. })
    ));
    // Sizes whose bytes overflow are an error that says so, never a panic.
    for (len, features) in [(0, 1 << 62), (1 << 62, 1 << 62), (0, 1 << 63), (1 << 62, 4)] {
        match norm.encode_layer_norm(&mut encoder, &bx, &by, len, features, &opts) {
            Err(e @ NormError::TooLarge { .. }) => {
                assert!(
                    e.to_string().contains("overflows"),
                    "{len} x {features}: {e}"
                )
            }
            other => panic!("{len} values of {features} features: {other:?}"),
        }
    }
    // Nothing was recorded by the refused calls: the encoder still finishes cleanly.
    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    queue.submit([encoder.finish()]);
    assert!(pollster::block_on(scope.pop()).is_none());
}

/// BatchNorm on device tensors: the same kernels as the host path, so the same bits, and ops
/// that chain with LayerNorm on the device.
#[test]
fn batch_norm_on_device_tensors_matches_the_host_path() {
    let Some(norm) = gpu() else { return };
    let (rows, features) = (500, 24);
    let x = ordinary(rows * features, 3);
    let mask: Vec<bool> = (0..rows).map(|r| r % 7 != 3).collect();
    let opts = gpunorm::BatchNorm {
        mask: Some(&mask),
        ..Default::default()
    };
    let t = norm.upload(&x).unwrap();
    let (y, stats) = norm.batch_norm_train_gpu(&t, features, &opts).unwrap();
    let host = norm.batch_norm_train(&x, features, &opts).unwrap();
    assert_eq!(norm.download(&y).unwrap(), host.y);
    assert_eq!(
        (stats.mean.clone(), stats.var.clone(), stats.count),
        (host.mean, host.var, host.count)
    );

    let mut running = gpunorm::RunningStats::new(features);
    running.update_with(&stats).unwrap();
    let e = norm
        .batch_norm_eval_gpu(&t, features, &opts, &running)
        .unwrap();
    assert_eq!(
        norm.download(&e).unwrap(),
        norm.batch_norm_eval(&x, features, &opts, &running).unwrap()
    );

    // LayerNorm then BatchNorm, all on the device.
    let h = norm
        .layer_norm_gpu(&t, features, &LayerNorm::default())
        .unwrap();
    let (z, _) = norm
        .batch_norm_train_gpu(&h, features, &gpunorm::BatchNorm::default())
        .unwrap();
    let h_host = norm
        .layer_norm(&x, features, &LayerNorm::default())
        .unwrap();
    let z_host = norm
        .batch_norm_train(&h_host, features, &gpunorm::BatchNorm::default())
        .unwrap();
    assert_eq!(norm.download(&z).unwrap(), z_host.y);

    // Bad input is refused as on the host.
    assert!(matches!(
        norm.batch_norm_train_gpu(&t, 7, &opts),
        Err(NormError::LengthNotMultiple { .. })
    ));
    let short = gpunorm::BatchNorm {
        mask: Some(&mask[1..]),
        ..Default::default()
    };
    assert!(matches!(
        norm.batch_norm_train_gpu(&t, features, &short),
        Err(NormError::MaskLength { .. })
    ));
    assert!(matches!(
        Normalizer::cpu().batch_norm_eval_gpu(&t, features, &opts, &running),
        Err(NormError::NotGpu(_))
    ));
}

/// The training ops on device tensors: the same kernels as the host path, so the same bits,
/// each checked against the f64 reference too, and chained with no host round trip.
#[test]
fn training_ops_on_device_tensors_match_the_host_path() {
    let Some(norm) = gpu() else { return };
    // A vec4 width and an f32 one.
    for (rows, features) in [(50, 300), (70, 13)] {
        let x = ordinary(rows * features, 11);
        let r = ordinary(rows * features, 12);
        let dy = ordinary(rows * features, 13);
        let gamma = common::data(features, 1.0, 0.5, 14);
        let ln = LayerNorm {
            gamma: Some(&gamma),
            ..Default::default()
        };
        let rms = RmsNorm {
            gamma: Some(&gamma),
            ..Default::default()
        };
        let (xt, rt, dyt) = (
            norm.upload_rows(&x, features).unwrap(),
            norm.upload(&r).unwrap(),
            norm.upload(&dy).unwrap(),
        );
        let down = |t: &gpunorm::GpuTensor| norm.download(t).unwrap();

        // The fused add: the sum rounded once, as on the host, and its norm.
        let add = norm.add_layer_norm_gpu(&xt, &rt, features, &ln).unwrap();
        let host = norm.add_layer_norm(&x, &r, features, &ln).unwrap();
        let sum: Vec<f32> = x.iter().zip(&r).map(|(a, b)| a + b).collect();
        assert_eq!(
            (down(&add.sum), down(&add.y)),
            (sum.clone(), host.y.clone())
        );
        // Tolerance as in tests/add_norm.rs.
        assert!(max_err(&host.y, &reference::layer_norm(&sum, features, &ln)) < 1e-4);
        let add = norm.add_rms_norm_gpu(&xt, &rt, features, &rms).unwrap();
        let host = norm.add_rms_norm(&x, &r, features, &rms).unwrap();
        assert_eq!(
            (down(&add.sum), down(&add.y)),
            (sum.clone(), host.y.clone())
        );
        assert!(max_err(&host.y, &reference::rms_norm(&sum, features, &rms)) < 1e-4);

        // The backward passes, on x and on the fused add's sum, still on the device.
        let grads = norm
            .layer_norm_backward_gpu(&xt, &dyt, features, &ln)
            .unwrap();
        let host = norm.layer_norm_backward(&x, &dy, features, &ln).unwrap();
        assert_eq!(
            (down(&grads.dx), down(&grads.dgamma), down(&grads.dbeta)),
            (host.dx.clone(), host.dgamma.clone(), host.dbeta.clone())
        );
        assert_eq!(grads.dgamma.features(), Some(features));
        // dx and the column sums are O(1) to O(rows) here: tolerances as in tests/backward.rs.
        let (rdx, rdgamma, rdbeta) = reference::layer_norm_backward(&x, &dy, features, &ln);
        assert!(max_err(&host.dx, &rdx) < 1e-4);
        assert!(max_err(&host.dgamma, &rdgamma) < 1e-4 && max_err(&host.dbeta, &rdbeta) < 1e-4);
        let again = norm
            .layer_norm_backward_gpu(&xt, &dyt, features, &ln)
            .unwrap();
        assert_eq!(down(&again.dx), host.dx, "repeats bit for bit");
        assert_eq!(down(&again.dgamma), host.dgamma, "repeats bit for bit");

        let grads = norm
            .rms_norm_backward_gpu(&add.sum, &dyt, features, &rms)
            .unwrap();
        let host = norm.rms_norm_backward(&sum, &dy, features, &rms).unwrap();
        assert_eq!(
            (down(&grads.dx), down(&grads.dgamma)),
            (host.dx.clone(), host.dgamma.clone())
        );
        let (rdx, rdgamma) = reference::rms_norm_backward(&sum, &dy, features, &rms);
        assert!(max_err(&host.dx, &rdx) < 1e-4 && max_err(&host.dgamma, &rdgamma) < 1e-4);

        // BatchNorm's backward with a mask: masked rows get dx = 0.
        let mask: Vec<bool> = (0..rows).map(|i| i % 5 != 2).collect();
        let bn = BatchNorm {
            mask: Some(&mask),
            gamma: Some(&gamma),
            ..Default::default()
        };
        let grads = norm
            .batch_norm_backward_gpu(&xt, &dyt, features, &bn)
            .unwrap();
        let host = norm.batch_norm_backward(&x, &dy, features, &bn).unwrap();
        assert_eq!(
            (down(&grads.dx), down(&grads.dgamma), down(&grads.dbeta)),
            (host.dx.clone(), host.dgamma.clone(), host.dbeta.clone())
        );
        assert!(host.dx[2 * features..3 * features]
            .iter()
            .all(|&v| v == 0.0));
        let (rdx, rdgamma, rdbeta) = reference::batch_norm_backward(&x, &dy, features, &bn);
        assert!(max_err(&host.dx, &rdx) < 1e-4);
        assert!(max_err(&host.dgamma, &rdgamma) < 1e-4 && max_err(&host.dbeta, &rdbeta) < 1e-4);
    }

    // Columns whose statistics leave f32's range take the f64 path, on the device's copies.
    let (rows, features) = (200, 6);
    let x = common::data(rows * features, 0.0, 1e20, 61);
    let dy = ordinary(rows * features, 62);
    let (xt, dyt) = (norm.upload(&x).unwrap(), norm.upload(&dy).unwrap());
    let bn = BatchNorm::default();
    let grads = norm
        .batch_norm_backward_gpu(&xt, &dyt, features, &bn)
        .unwrap();
    let host = norm.batch_norm_backward(&x, &dy, features, &bn).unwrap();
    assert_eq!(norm.download(&grads.dx).unwrap(), host.dx);
    // dx is about 1e-20 here: held to its largest value (as in tests/backward.rs).
    let (rdx, _, _) = reference::batch_norm_backward(&x, &dy, features, &bn);
    let scale = rdx.iter().fold(0f64, |m, r| m.max(r.abs()));
    let worst = host
        .dx
        .iter()
        .zip(&rdx)
        .fold(0f64, |m, (&g, r)| m.max((g as f64 - r).abs()));
    assert!(scale > 0.0 && worst / scale < 1e-4, "{worst} / {scale}");
}

/// The training ops on device tensors refuse what their host forms refuse, and what only a
/// device tensor can get wrong: another Normalizer's tensor, another row width.
#[test]
fn training_ops_on_device_tensors_check_their_input() {
    let Some(norm) = gpu() else { return };
    let (ln, rms) = (LayerNorm::default(), RmsNorm::default());
    let x = norm.upload_rows(&ordinary(12, 1), 4).unwrap();
    let short = norm.upload(&[1.0; 8]).unwrap();
    let wide = norm.upload_rows(&[1.0; 12], 6).unwrap();
    let operand = |r: Result<(), NormError>, name| {
        assert!(
            matches!(r, Err(NormError::OperandLength { name: n, len: 8, expected: 12 }) if n == name),
            "{r:?}"
        )
    };
    operand(
        norm.layer_norm_backward_gpu(&x, &short, 4, &ln).map(|_| ()),
        "dy",
    );
    operand(
        norm.rms_norm_backward_gpu(&x, &short, 4, &rms).map(|_| ()),
        "dy",
    );
    operand(
        norm.batch_norm_backward_gpu(&x, &short, 4, &BatchNorm::default())
            .map(|_| ()),
        "dy",
    );
    operand(
        norm.add_layer_norm_gpu(&x, &short, 4, &ln).map(|_| ()),
        "residual",
    );
    operand(
        norm.add_rms_norm_gpu(&x, &short, 4, &rms).map(|_| ()),
        "residual",
    );
    assert_eq!(
        norm.add_layer_norm_gpu(&x, &wide, 4, &ln).map(|_| ()),
        Err(NormError::TensorShape {
            features: 6,
            given: 4
        })
    );
    let gamma = [1.0; 3];
    let bad = LayerNorm {
        gamma: Some(&gamma),
        ..Default::default()
    };
    assert!(matches!(
        norm.layer_norm_backward_gpu(&x, &x, 4, &bad),
        Err(NormError::ParamLength { .. })
    ));
    let other = Normalizer::gpu().unwrap();
    let foreign = other.upload(&[1.0; 12]).unwrap();
    assert!(matches!(
        norm.layer_norm_backward_gpu(&x, &foreign, 4, &ln),
        Err(NormError::InvalidBuffer { name: "dy", .. })
    ));
    assert!(matches!(
        Normalizer::cpu().layer_norm_backward_gpu(&x, &x, 4, &ln),
        Err(NormError::NotGpu(_))
    ));
    // An empty batch: no rows, gradients of zeros.
    let empty = norm.upload(&[]).unwrap();
    let grads = norm
        .layer_norm_backward_gpu(&empty, &empty, 3, &ln)
        .unwrap();
    assert!(norm.download(&grads.dx).unwrap().is_empty());
    assert_eq!(norm.download(&grads.dbeta).unwrap(), [0.0; 3]);
}

/// Reads `range` (bytes) of a buffer back through a staging copy, waiting for the device.
fn read_back(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    buffer: &wgpu::Buffer,
    range: std::ops::Range<u64>,
) -> Vec<f32> {
    let bytes = range.end - range.start;
    let staging = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: bytes,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut encoder = device.create_command_encoder(&Default::default());
    encoder.copy_buffer_to_buffer(buffer, range.start, &staging, 0, bytes);
    queue.submit([encoder.finish()]);
    let (tx, rx) = std::sync::mpsc::channel();
    staging
        .slice(..)
        .map_async(wgpu::MapMode::Read, move |r| tx.send(r).unwrap());
    device.poll(wgpu::PollType::wait_indefinitely()).unwrap();
    rx.recv().unwrap().unwrap();
    let values = bytemuck::cast_slice(&staging.slice(..).get_mapped_range().unwrap()).to_vec();
    values
}

/// Every op of the LayerNorm family recorded into one encoder of the caller's, on spans of
/// three shared buffers (inputs, parameters, outputs) at aligned offsets, gamma and beta on the
/// device: the host path's bits, from one submission.
#[test]
fn every_row_op_records_on_spans_of_the_callers_buffers() {
    use gpunorm::Encode;
    let Some(norm) = gpu() else { return };
    let (device, queue) = norm.wgpu().unwrap();
    let align = device.limits().min_storage_buffer_offset_alignment as u64;
    for (rows, features) in [(10, 96), (7, 13)] {
        let n = rows * features;
        let (x, r, dy) = (ordinary(n, 21), ordinary(n, 22), ordinary(n, 23));
        let gamma = common::data(features, 1.0, 0.5, 24);
        let beta = common::data(features, 0.0, 0.5, 25);
        // Each value set at its own aligned slot of a buffer.
        let slot = ((n * 4) as u64).next_multiple_of(align);
        let at = |k: u64, len: usize| k * slot..k * slot + (len * 4) as u64;
        use wgpu::BufferUsages as U;
        let buffer = |slots: u64, usage| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: slots * slot,
                usage,
                mapped_at_creation: false,
            })
        };
        let inputs = buffer(3, U::STORAGE | U::COPY_DST);
        let params = buffer(2, U::STORAGE | U::COPY_DST);
        let outputs = buffer(8, U::STORAGE | U::COPY_SRC);
        // The parameter gradients are copied in: offsets need only be multiples of 4.
        let grads = buffer(1, U::COPY_DST | U::COPY_SRC);
        for (k, values) in [&x, &r, &dy].into_iter().enumerate() {
            queue.write_buffer(&inputs, at(k as u64, n).start, bytemuck::cast_slice(values));
        }
        queue.write_buffer(&params, 0, bytemuck::cast_slice(&gamma));
        queue.write_buffer(&params, slot, bytemuck::cast_slice(&beta));
        let (xs, rs, dys) = (
            inputs.slice(at(0, n)),
            inputs.slice(at(1, n)),
            inputs.slice(at(2, n)),
        );
        let g = Some(params.slice(at(0, features)));
        let b = Some(params.slice(at(1, features)));
        let out = |k| outputs.slice(at(k, n));
        let grad = |k: u64| {
            let start = 4 + (k * features as u64 * 4);
            grads.slice(start..start + features as u64 * 4)
        };
        let eps = 1e-5;
        let ops = [
            Encode::LayerNorm {
                x: xs,
                y: out(0),
                features,
                eps,
                gamma: g,
                beta: b,
            },
            Encode::RmsNorm {
                x: xs,
                y: out(1),
                features,
                eps,
                gamma: g,
            },
            Encode::AddLayerNorm {
                x: xs,
                residual: rs,
                sum: out(2),
                y: out(3),
                features,
                eps,
                gamma: g,
                beta: b,
            },
            Encode::AddRmsNorm {
                x: xs,
                residual: rs,
                sum: out(4),
                y: out(5),
                features,
                eps,
                gamma: g,
            },
            Encode::LayerNormBackward {
                x: xs,
                dy: dys,
                dx: out(6),
                dgamma: grad(0),
                dbeta: grad(1),
                features,
                eps,
                gamma: g,
            },
            Encode::RmsNormBackward {
                x: xs,
                dy: dys,
                dx: out(7),
                dgamma: grad(2),
                features,
                eps,
                gamma: g,
            },
        ];
        let mut encoder = device.create_command_encoder(&Default::default());
        for op in &ops {
            norm.encode(&mut encoder, op).unwrap();
        }
        queue.submit([encoder.finish()]);
        let got = |k| read_back(device, queue, &outputs, at(k, n));
        let got_grad = |k: u64| {
            let start = 4 + (k * features as u64 * 4);
            read_back(device, queue, &grads, start..start + features as u64 * 4)
        };

        let ln = LayerNorm {
            eps,
            gamma: Some(&gamma),
            beta: Some(&beta),
        };
        let rms = RmsNorm {
            eps,
            gamma: Some(&gamma),
        };
        let y = norm.layer_norm(&x, features, &ln).unwrap();
        assert_eq!(got(0), y, "{features}: LayerNorm");
        // Tolerance as in tests/layer_norm.rs.
        assert!(max_err(&y, &reference::layer_norm(&x, features, &ln)) < 1e-4);
        assert_eq!(
            got(1),
            norm.rms_norm(&x, features, &rms).unwrap(),
            "RmsNorm"
        );
        let add = norm.add_layer_norm(&x, &r, features, &ln).unwrap();
        assert_eq!(
            (got(2), got(3)),
            (add.sum, add.y),
            "{features}: AddLayerNorm"
        );
        let add = norm.add_rms_norm(&x, &r, features, &rms).unwrap();
        assert_eq!((got(4), got(5)), (add.sum, add.y), "{features}: AddRmsNorm");
        let back = norm.layer_norm_backward(&x, &dy, features, &ln).unwrap();
        assert_eq!(
            (got(6), got_grad(0), got_grad(1)),
            (back.dx, back.dgamma, back.dbeta)
        );
        let back = norm.rms_norm_backward(&x, &dy, features, &rms).unwrap();
        assert_eq!(
            (got(7), got_grad(2)),
            (back.dx, back.dgamma),
            "{features}: RmsNormBackward"
        );
    }
}

/// Spans an op cannot use are refused with the argument's name before anything is recorded.
#[test]
fn encoded_ops_check_every_span() {
    use gpunorm::Encode;
    use wgpu::BufferUsages as U;
    let Some(norm) = gpu() else { return };
    let (device, queue) = norm.wgpu().unwrap();
    let align = device.limits().min_storage_buffer_offset_alignment as u64;
    // Slots of 1 KiB: a multiple of every adapter's alignment (at most 256).
    let slot = 1024;
    let buffer = |size, usage| {
        device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size,
            usage,
            mapped_at_creation: false,
        })
    };
    let (features, n) = (8, 64u64);
    let a = buffer(4 * slot, U::STORAGE);
    let b = buffer(4 * slot, U::STORAGE);
    let copy_only = buffer(slot, U::COPY_DST);
    let x = a.slice(..n * 4);
    let y = b.slice(..n * 4);
    let ln = |x, y, gamma| Encode::LayerNorm {
        x,
        y,
        features,
        eps: 1e-5,
        gamma,
        beta: None,
    };
    let mut encoder = device.create_command_encoder(&Default::default());
    let mut refused = |op: Encode, expected: &dyn Fn(&NormError) -> bool| {
        let e = norm.encode(&mut encoder, &op).unwrap_err();
        assert!(expected(&e), "{op:?}: {e}");
    };
    let buffer_named = |name: &'static str| move |e: &NormError| matches!(e, NormError::InvalidBuffer { name: n, .. } if *n == name);
    // An offset off the device's alignment (256 on most adapters).
    if align > 4 {
        refused(ln(a.slice(4..4 + n * 4), y, None), &buffer_named("x"));
    }
    // The output in a buffer the op also reads.
    refused(ln(x, a.slice(slot..slot + n * 4), None), &buffer_named("y"));
    // gamma of the wrong length, y of the wrong length, x not whole rows, eps NaN.
    refused(ln(x, y, Some(b.slice(2 * slot..2 * slot + 12))), &|e| {
        matches!(
            e,
            NormError::ParamLength {
                name: "gamma",
                len: 3,
                features: 8
            }
        )
    });
    refused(ln(x, b.slice(..n * 2), None), &|e| {
        matches!(
            e,
            NormError::OperandLength {
                name: "y",
                len: 32,
                expected: 64
            }
        )
    });
    refused(ln(a.slice(..36), b.slice(..36), None), &|e| {
        matches!(
            e,
            NormError::LengthNotMultiple {
                len: 9,
                features: 8
            }
        )
    });
    refused(
        Encode::RmsNorm {
            x,
            y,
            features,
            eps: f32::NAN,
            gamma: None,
        },
        &|e| matches!(e, NormError::InvalidEps(_)),
    );
    // A span the kernels bind without STORAGE; dgamma without COPY_DST.
    refused(ln(copy_only.slice(..n * 4), y, None), &buffer_named("x"));
    let backward = |dgamma| Encode::RmsNormBackward {
        x,
        dy: a.slice(slot..slot + n * 4),
        dx: y,
        dgamma,
        features,
        eps: 1e-6,
        gamma: None,
    };
    refused(
        backward(b.slice(2 * slot..2 * slot + 32)),
        &buffer_named("dgamma"),
    );
    // Outputs that overlap.
    let add = Encode::AddRmsNorm {
        x,
        residual: x,
        sum: y,
        y,
        features,
        eps: 1e-6,
        gamma: None,
    };
    refused(add, &buffer_named("y"));
    // A copy target that is fine passes the checks (and records).
    norm.encode(&mut encoder, &backward(copy_only.slice(4..36)))
        .unwrap();
    assert!(matches!(
        Normalizer::cpu().encode(&mut encoder, &ln(x, y, None)),
        Err(NormError::NotGpu(_))
    ));
    // The refused calls recorded nothing: the encoder finishes and runs cleanly.
    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    queue.submit([encoder.finish()]);
    assert!(pollster::block_on(scope.pop()).is_none());
}

/// A BatchNorm training loop on the device: each step's output has the waiting form's bits,
/// and the running statistics, folded in on the device, match the host's fold of the same
/// batches (f32 on the device, f64 on the host: 1e-5 relative). Eval then reads them there.
#[test]
fn batch_norm_running_statistics_stay_on_the_device() {
    let Some(norm) = gpu() else { return };
    // 40000 features run in two blocks of columns at 1 MiB bindings (CI's second pass).
    for (rows, features) in [(300, 24), (4, 40_000)] {
        let mask: Vec<bool> = (0..rows).map(|r| r % 7 != 3).collect();
        let gamma = common::data(features, 1.0, 0.5, 30);
        let opts = BatchNorm {
            mask: Some(&mask),
            gamma: Some(&gamma),
            ..Default::default()
        };
        let mut host = RunningStats::new(features);
        host.momentum = 0.3;
        let device = norm.upload_running_stats(&host).unwrap();
        assert_eq!(device.features(), features);
        for step in 0..4 {
            let x = common::data(rows * features, step as f32, 1.0 + step as f32, step);
            let t = norm.upload(&x).unwrap();
            let y = norm
                .batch_norm_train_gpu_running(&t, features, &opts, &device)
                .unwrap();
            let out = norm.batch_norm_train(&x, features, &opts).unwrap();
            assert_eq!(norm.download(&y).unwrap(), out.y, "{features}: step {step}");
            host.update(&out).unwrap();
        }
        let back = norm.download_running_stats(&device).unwrap();
        assert_eq!(back.momentum, 0.3);
        let close = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .all(|(a, b)| (a - b).abs() <= 1e-5 * b.abs().max(1.0))
        };
        assert!(close(&back.mean, &host.mean), "{features}: running mean");
        assert!(close(&back.var, &host.var), "{features}: running var");

        let x = ordinary(rows * features, 40);
        let t = norm.upload(&x).unwrap();
        let e = norm
            .batch_norm_eval_gpu_running(&t, features, &opts, &device)
            .unwrap();
        let expected = norm.batch_norm_eval(&x, features, &opts, &back).unwrap();
        assert_eq!(norm.download(&e).unwrap(), expected, "{features}: eval");
    }
}

/// Running statistics on the device refuse what the host's refuse, and another Normalizer's.
#[test]
fn device_running_statistics_check_their_input() {
    let Some(norm) = gpu() else { return };
    let t = norm.upload(&ordinary(40, 1)).unwrap();
    let opts = BatchNorm::default();
    let mut running = norm.upload_running_stats(&RunningStats::new(4)).unwrap();
    assert!(matches!(
        norm.batch_norm_train_gpu_running(&t, 8, &opts, &running),
        Err(NormError::ParamLength {
            name: "running mean",
            len: 4,
            features: 8
        })
    ));
    let mask: Vec<bool> = (0..10).map(|r| r == 2).collect();
    let one_row = BatchNorm {
        mask: Some(&mask),
        ..Default::default()
    };
    assert!(matches!(
        norm.batch_norm_train_gpu_running(&t, 4, &one_row, &running),
        Err(NormError::TooFewRows { count: 1 })
    ));
    running.momentum = 1.5;
    assert!(matches!(
        norm.batch_norm_train_gpu_running(&t, 4, &opts, &running),
        Err(NormError::InvalidParam {
            name: "momentum",
            ..
        })
    ));
    let other = Normalizer::gpu().unwrap();
    let theirs = other.upload_running_stats(&RunningStats::new(4)).unwrap();
    assert!(matches!(
        norm.batch_norm_eval_gpu_running(&t, 4, &opts, &theirs),
        Err(NormError::InvalidBuffer {
            name: "running",
            ..
        })
    ));
    let uneven = RunningStats {
        var: vec![1.0; 3],
        ..RunningStats::new(4)
    };
    assert!(matches!(
        norm.upload_running_stats(&uneven),
        Err(NormError::ParamLength { .. })
    ));
    assert!(matches!(
        Normalizer::cpu().upload_running_stats(&RunningStats::new(4)),
        Err(NormError::NotGpu(_))
    ));
}

/// Channels-first BatchNorm on device tensors (the named-shape forms): the host path's bits,
/// outputs whose row width is one batch item, and a tensor of another width refused.
#[test]
fn channels_first_batch_norm_on_device_tensors() {
    use gpunorm::ChannelsFirst;
    let Some(norm) = gpu() else { return };
    let shape = ChannelsFirst {
        batch: 3,
        channels: 5,
        spatial: 49,
    };
    let n = 3 * 5 * 49;
    let (x, dy) = (ordinary(n, 50), ordinary(n, 51));
    let mask: Vec<bool> = (0..3 * 49).map(|p| p % 11 != 4).collect();
    let opts = BatchNorm {
        mask: Some(&mask),
        ..Default::default()
    };
    let (xt, dyt) = (
        norm.upload_rows(&x, 5 * 49).unwrap(),
        norm.upload(&dy).unwrap(),
    );
    let (y, stats) = norm.batch_norm_train_nchw_gpu(&xt, shape, &opts).unwrap();
    let host = norm.batch_norm_train_nchw(&x, shape, &opts).unwrap();
    assert_eq!(norm.download(&y).unwrap(), host.y);
    assert_eq!(
        (stats.mean.clone(), stats.count),
        (host.mean.clone(), host.count)
    );
    assert_eq!(y.features(), Some(5 * 49));
    let last = reference::channels_first_to_last(&x, 5, 49);
    let (ry, ..) = reference::batch_norm_train(&last, 5, &BatchNorm::default());
    let unmasked = norm
        .batch_norm_train_nchw(&x, shape, &BatchNorm::default())
        .unwrap();
    // Tolerance as in tests/batch_norm.rs.
    assert!(max_err(&unmasked.y, &reference::channels_last_to_first(&ry, 5, 49)) < 1e-4);

    let mut running = RunningStats::new(5);
    running.update(&host).unwrap();
    let e = norm
        .batch_norm_eval_nchw_gpu(&xt, shape, &opts, &running)
        .unwrap();
    assert_eq!(
        norm.download(&e).unwrap(),
        norm.batch_norm_eval_nchw(&x, shape, &opts, &running)
            .unwrap()
    );
    let grads = norm
        .batch_norm_backward_nchw_gpu(&xt, &dyt, shape, &opts)
        .unwrap();
    let host = norm
        .batch_norm_backward_nchw(&x, &dy, shape, &opts)
        .unwrap();
    assert_eq!(
        (
            norm.download(&grads.dx).unwrap(),
            norm.download(&grads.dgamma).unwrap(),
            norm.download(&grads.dbeta).unwrap()
        ),
        (host.dx, host.dgamma, host.dbeta)
    );
    // A tensor of rows of another width, and a shape that does not multiply out.
    let wrong = norm.upload_rows(&x, 5).unwrap();
    assert!(matches!(
        norm.batch_norm_train_nchw_gpu(&wrong, shape, &opts),
        Err(NormError::TensorShape {
            features: 5,
            given: 245
        })
    ));
    let short = ChannelsFirst { batch: 2, ..shape };
    assert!(matches!(
        norm.batch_norm_eval_nchw_gpu(&xt, short, &opts, &running),
        Err(NormError::ShapeLength { .. })
    ));
}

/// Saved statistics on GPU tensors: the forward keeps them on the device with the bits the host
/// path gives, the backward through them gives the host path's gradients bit for bit, statistics
/// from the CPU fallback serve it (within the reference's tolerance), and statistics that are not
/// the call's, or of another Normalizer, are refused.
#[test]
fn saved_statistics_stay_on_the_device() {
    let Some(norm) = gpu() else { return };
    let gamma: Vec<f32> = (0..300).map(|i| 0.5 + i as f32 / 300.0).collect();
    for (rows, features, mean, spread) in
        [(40, 300, 1e4, 1e-2), (7, 4097, 0.0, 1.0), (64, 6, 0.0, 1.0)]
    {
        let x = common::data(rows * features, mean, spread, 70);
        let dy = ordinary(rows * features, 71);
        let opts = LayerNorm {
            gamma: (features == 300).then_some(&gamma[..]),
            ..Default::default()
        };
        let (xt, dyt) = (
            norm.upload_rows(&x, features).unwrap(),
            norm.upload_rows(&dy, features).unwrap(),
        );
        let out = norm.layer_norm_gpu_saving(&xt, features, &opts).unwrap();
        let host = norm.layer_norm_saving(&x, features, &opts).unwrap();
        assert_eq!(norm.download(&out.y).unwrap(), host.y);
        assert_eq!(out.stats.rows(), rows);
        assert_eq!(norm.download_row_stats(&out.stats).unwrap(), host.stats);
        let grads = norm
            .layer_norm_backward_gpu_saved(&xt, &dyt, features, &opts, &out.stats)
            .unwrap();
        let want = norm
            .layer_norm_backward_saved(&x, &dy, features, &opts, &host.stats)
            .unwrap();
        assert_eq!(norm.download(&grads.dx).unwrap(), want.dx);
        assert_eq!(norm.download(&grads.dgamma).unwrap(), want.dgamma);
        assert_eq!(norm.download(&grads.dbeta).unwrap(), want.dbeta);

        let rms = RmsNorm::default();
        let out = norm.rms_norm_gpu_saving(&xt, features, &rms).unwrap();
        let host = norm.rms_norm_saving(&x, features, &rms).unwrap();
        let grads = norm
            .rms_norm_backward_gpu_saved(&xt, &dyt, features, &rms, &out.stats)
            .unwrap();
        let want = norm
            .rms_norm_backward_saved(&x, &dy, features, &rms, &host.stats)
            .unwrap();
        assert_eq!(norm.download(&grads.dx).unwrap(), want.dx);
        assert_eq!(norm.download(&grads.dgamma).unwrap(), want.dgamma);

        // The CPU fallback's statistics on the device (tolerances as in tests/backward.rs).
        let cpu = Normalizer::cpu()
            .layer_norm_saving(&x, features, &opts)
            .unwrap()
            .stats;
        let up = norm.upload_row_stats(&cpu).unwrap();
        let grads = norm
            .layer_norm_backward_gpu_saved(&xt, &dyt, features, &opts, &up)
            .unwrap();
        let (rdx, ..) = reference::layer_norm_backward(&x, &dy, features, &opts);
        let dx = norm.download(&grads.dx).unwrap();
        let tol = if mean == 0.0 { 1e-4 } else { 1e-3 };
        let e = common::dx_error(&dx, &rdx, features);
        assert!(e < tol, "{rows}x{features}: {e}");
    }

    let (x, features) = (ordinary(8 * 16, 72), 16);
    let xt = norm.upload_rows(&x, features).unwrap();
    let stats = norm
        .layer_norm_gpu_saving(&xt, features, &LayerNorm::default())
        .unwrap()
        .stats;
    let short = norm.upload_rows(&x[..7 * 16], features).unwrap();
    let r =
        norm.layer_norm_backward_gpu_saved(&short, &short, features, &LayerNorm::default(), &stats);
    assert!(matches!(r, Err(NormError::InvalidStats { .. })), "{r:?}");
    let r = norm.rms_norm_backward_gpu_saved(&xt, &xt, features, &RmsNorm::default(), &stats);
    assert!(matches!(r, Err(NormError::InvalidStats { .. })), "{r:?}");
    let other = Normalizer::gpu().unwrap();
    let theirs = other.upload_rows(&x, features).unwrap();
    let r = other.layer_norm_backward_gpu_saved(
        &theirs,
        &theirs,
        features,
        &LayerNorm::default(),
        &stats,
    );
    assert!(
        matches!(r, Err(NormError::InvalidBuffer { name: "stats", .. })),
        "{r:?}"
    );
}

/// BatchNorm training (three steps, running statistics updated in place), eval from those
/// running statistics, and backward, all recorded into one encoder of the caller's and submitted
/// once, on spans of the caller's buffers with the mask, gamma, beta and running statistics on
/// the device: the host path's bits for every output, and running statistics within 1e-5 of the
/// host's f64 fold (the device folds in f32). The mask's first position is padding, so the
/// device finds the seeds itself.
#[test]
fn batch_norm_records_on_spans_of_the_callers_buffers() {
    use gpunorm::{Encode, RunningSpans};
    use wgpu::BufferUsages as U;
    let Some(norm) = gpu() else { return };
    let (device, queue) = norm.wgpu().unwrap();
    let align = device.limits().min_storage_buffer_offset_alignment as u64;
    // Features-last with the vec4 row kernels, odd features, channels-first.
    for (batch, features, spatial) in [(300, 24, 1), (37, 13, 1), (3, 5, 7)] {
        let positions = batch * spatial;
        let n = positions * features;
        let mask: Vec<bool> = (0..positions).map(|p| p % 7 != 0).collect();
        let words: Vec<u32> = mask.iter().map(|&k| k as u32).collect();
        let xs: Vec<Vec<f32>> = (0..3)
            .map(|s| common::data(n, 100.0 * s as f32, 1.0 + s as f32, 50 + s))
            .collect();
        let dy = ordinary(n, 53);
        let gamma = common::data(features, 1.0, 0.5, 54);
        let beta = common::data(features, 0.0, 0.5, 55);
        let slot = ((n * 4) as u64).next_multiple_of(align);
        let at = |k: u64, len: usize| k * slot..k * slot + (len * 4) as u64;
        let buffer = |slots: u64, usage| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: slots * slot,
                usage,
                mapped_at_creation: false,
            })
        };
        let inputs = buffer(5, U::STORAGE | U::COPY_DST);
        let outputs = buffer(5, U::STORAGE | U::COPY_SRC);
        // Copied spans: offsets need only be multiples of 4.
        let small = buffer(1, U::COPY_SRC | U::COPY_DST);
        let feat = |k: u64| {
            let start = 4 + k * features as u64 * 4;
            start..start + features as u64 * 4
        };
        for (k, x) in xs.iter().chain([&dy]).enumerate() {
            queue.write_buffer(&inputs, at(k as u64, n).start, bytemuck::cast_slice(x));
        }
        queue.write_buffer(&inputs, at(4, 0).start, bytemuck::cast_slice(&words));
        let host_running = RunningStats {
            momentum: 0.25,
            ..RunningStats::new(features)
        };
        for (k, values) in [&gamma, &beta, &host_running.mean, &host_running.var]
            .into_iter()
            .enumerate()
        {
            queue.write_buffer(&small, feat(k as u64).start, bytemuck::cast_slice(values));
        }
        let input = |k| inputs.slice(at(k, n));
        let out = |k| outputs.slice(at(k, n));
        let mask_span = Some(inputs.slice(at(4, positions)));
        let (g, b) = (Some(small.slice(feat(0))), Some(small.slice(feat(1))));
        let (mean, var) = (small.slice(feat(2)), small.slice(feat(3)));
        let eps = 1e-5;
        let mut encoder = device.create_command_encoder(&Default::default());
        for step in 0..3 {
            let op = Encode::BatchNormTrain {
                x: input(step),
                y: out(step),
                features,
                spatial,
                eps,
                gamma: g,
                beta: b,
                mask: mask_span,
                running: Some(RunningSpans {
                    mean,
                    var,
                    momentum: 0.25,
                }),
            };
            norm.encode(&mut encoder, &op).unwrap();
        }
        let eval = Encode::BatchNormEval {
            x: input(0),
            y: out(3),
            features,
            spatial,
            eps,
            gamma: g,
            beta: b,
            mask: mask_span,
            mean,
            var,
        };
        norm.encode(&mut encoder, &eval).unwrap();
        let backward = Encode::BatchNormBackward {
            x: input(2),
            dy: input(3),
            dx: out(4),
            dgamma: small.slice(feat(4)),
            dbeta: small.slice(feat(5)),
            features,
            spatial,
            eps,
            gamma: g,
            mask: mask_span,
        };
        norm.encode(&mut encoder, &backward).unwrap();
        queue.submit([encoder.finish()]);

        let got = |k| read_back(device, queue, &outputs, at(k, n));
        let got_small = |k| read_back(device, queue, &small, feat(k));
        let opts = BatchNorm {
            eps,
            gamma: Some(&gamma),
            beta: Some(&beta),
            mask: Some(&mask),
        };
        let case = format!("{batch}×{features}×{spatial}");
        let mut host = host_running.clone();
        for (step, x) in xs.iter().enumerate() {
            let expected = norm
                .batch_norm_train_channels_first(x, features, spatial, &opts)
                .unwrap();
            assert_eq!(got(step as u64), expected.y, "{case}: train step {step}");
            if spatial == 1 {
                // Tolerance as in tests/batch_norm.rs.
                let (y, ..) = reference::batch_norm_train(x, features, &opts);
                assert!(max_err(&expected.y, &y) < 1e-4, "{case}");
            }
            host.update(&expected).unwrap();
        }
        let running = RunningStats {
            mean: got_small(2),
            var: got_small(3),
            momentum: 0.25,
        };
        let close = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .all(|(a, b)| (a - b).abs() <= 1e-5 * b.abs().max(1.0))
        };
        assert!(close(&running.mean, &host.mean), "{case}: running mean");
        assert!(close(&running.var, &host.var), "{case}: running var");
        let expected = norm
            .batch_norm_eval_channels_first(&xs[0], features, spatial, &opts, &running)
            .unwrap();
        assert_eq!(got(3), expected, "{case}: eval");
        let grads = norm
            .batch_norm_backward_channels_first(&xs[2], &dy, features, spatial, &opts)
            .unwrap();
        assert_eq!(
            (got(4), got_small(4), got_small(5)),
            (grads.dx, grads.dgamma, grads.dbeta),
            "{case}: backward"
        );
    }
}

/// BatchNorm's spans are refused with the argument's name before anything is recorded: a mask
/// of the wrong length, a copied span without COPY_SRC, running statistics that overlap, a
/// momentum out of [0, 1], spatial 0, and an output in a buffer the kernels read.
#[test]
fn encoded_batch_norm_checks_every_span() {
    use gpunorm::{Encode, RunningSpans};
    use wgpu::BufferUsages as U;
    let Some(norm) = gpu() else { return };
    let (device, queue) = norm.wgpu().unwrap();
    let slot = 1024;
    let buffer = |usage| {
        device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: 4 * slot,
            usage,
            mapped_at_creation: false,
        })
    };
    let (features, n) = (8, 64u64);
    let a = buffer(U::STORAGE);
    let b = buffer(U::STORAGE);
    let copies = buffer(U::COPY_SRC | U::COPY_DST);
    let feat = |k: u64| copies.slice(k * 32..(k + 1) * 32);
    let train = |y, mask, gamma, running, spatial| Encode::BatchNormTrain {
        x: a.slice(..n * 4),
        y,
        features,
        spatial,
        eps: 1e-5,
        gamma,
        beta: None,
        mask,
        running,
    };
    let y = b.slice(..n * 4);
    let running = |mean, var, momentum| {
        Some(RunningSpans {
            mean,
            var,
            momentum,
        })
    };
    let mut encoder = device.create_command_encoder(&Default::default());
    let mut refused = |op: Encode, expected: &dyn Fn(&NormError) -> bool| {
        let e = norm.encode(&mut encoder, &op).unwrap_err();
        assert!(expected(&e), "{op:?}: {e}");
    };
    let named = |name: &'static str| move |e: &NormError| matches!(e, NormError::InvalidBuffer { name: n, .. } if *n == name);
    // 8 rows need 8 mask words, not 7.
    let mask7 = Some(a.slice(slot..slot + 28));
    refused(train(y, mask7, None, None, 1), &|e| {
        matches!(e, NormError::MaskLength { len: 7, rows: 8 })
    });
    // gamma is copied: a STORAGE-only buffer will not do.
    let g = Some(b.slice(slot..slot + 32));
    refused(train(y, None, g, None, 1), &named("gamma"));
    refused(
        train(
            y,
            None,
            None,
            running(feat(0), copies.slice(16..48), 0.1),
            1,
        ),
        &named("running mean"),
    );
    refused(
        train(y, None, None, running(feat(0), feat(1), 1.5), 1),
        &|e| {
            matches!(
                e,
                NormError::InvalidParam {
                    name: "momentum",
                    ..
                }
            )
        },
    );
    refused(train(y, None, None, None, 0), &|e| {
        matches!(e, NormError::ZeroDimension { name: "spatial" })
    });
    // y in the buffer that holds x.
    refused(
        train(a.slice(slot..slot + n * 4), None, None, None, 1),
        &named("y"),
    );
    let eval = Encode::BatchNormEval {
        x: a.slice(..n * 4),
        y,
        features,
        spatial: 1,
        eps: 1e-5,
        gamma: None,
        beta: None,
        mask: None,
        mean: feat(0),
        var: copies.slice(32..60),
    };
    refused(eval, &|e| {
        matches!(
            e,
            NormError::ParamLength {
                name: "var",
                len: 7,
                features: 8
            }
        )
    });
    let backward = |dgamma| Encode::BatchNormBackward {
        x: a.slice(..n * 4),
        dy: a.slice(slot..slot + n * 4),
        dx: y,
        dgamma,
        dbeta: feat(1),
        features,
        spatial: 1,
        eps: 1e-5,
        gamma: None,
        mask: None,
    };
    refused(backward(b.slice(slot..slot + 32)), &named("dgamma"));
    // What passes the checks records, and the refused calls recorded nothing.
    norm.encode(&mut encoder, &backward(feat(2))).unwrap();
    norm.encode(
        &mut encoder,
        &train(y, None, None, running(feat(3), feat(4), 0.1), 1),
    )
    .unwrap();
    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    queue.submit([encoder.finish()]);
    assert!(pollster::block_on(scope.pop()).is_none());
}

/// A recorded training step whose mask counts one position: y is the host path's, and the
/// running statistics stay as they were (an unbiased variance needs two positions; the host's
/// update refuses such a batch).
#[test]
fn a_recorded_batch_of_one_position_leaves_the_running_statistics() {
    use gpunorm::{Encode, RunningSpans};
    use wgpu::BufferUsages as U;
    let Some(norm) = gpu() else { return };
    let (device, queue) = norm.wgpu().unwrap();
    let (rows, features) = (6, 4);
    let x = ordinary(rows * features, 60);
    let mask: Vec<bool> = (0..rows).map(|r| r == 4).collect();
    let words: Vec<u32> = mask.iter().map(|&k| k as u32).collect();
    let buffer = |size: u64, usage| {
        device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size,
            usage,
            mapped_at_creation: false,
        })
    };
    let xb = buffer(96, U::STORAGE | U::COPY_DST);
    let mb = buffer(24, U::STORAGE | U::COPY_DST);
    let yb = buffer(96, U::STORAGE | U::COPY_SRC);
    let stats = buffer(32, U::COPY_SRC | U::COPY_DST);
    queue.write_buffer(&xb, 0, bytemuck::cast_slice(&x));
    queue.write_buffer(&mb, 0, bytemuck::cast_slice(&words));
    let before = [0.5f32, -1.0, 2.0, 3.0, 1.0, 2.0, 0.25, 4.0];
    queue.write_buffer(&stats, 0, bytemuck::cast_slice(&before));
    let mut encoder = device.create_command_encoder(&Default::default());
    let op = Encode::BatchNormTrain {
        x: xb.slice(..),
        y: yb.slice(..),
        features,
        spatial: 1,
        eps: 1e-5,
        gamma: None,
        beta: None,
        mask: Some(mb.slice(..)),
        running: Some(RunningSpans {
            mean: stats.slice(..16),
            var: stats.slice(16..),
            momentum: 0.5,
        }),
    };
    norm.encode(&mut encoder, &op).unwrap();
    queue.submit([encoder.finish()]);
    let opts = BatchNorm {
        mask: Some(&mask),
        ..Default::default()
    };
    let expected = norm.batch_norm_train(&x, features, &opts).unwrap();
    assert_eq!(read_back(device, queue, &yb, 0..96), expected.y);
    assert_eq!(read_back(device, queue, &stats, 0..32), before);
}
