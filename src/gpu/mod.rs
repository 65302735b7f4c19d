//! The GPU backend: one context type ([`GpuContext`]) that owns the device, queue, pipeline cache
//! and buffer pool; transfers and kernel timing beside it; one host module per op family, each
//! reading plan → record → read back; and GPU tensors for callers who keep data on the device.

mod batch_norm;
mod context;
mod convert;
pub(crate) mod encode;
mod layer_norm;
mod pool;
mod shaders;
pub(crate) mod tensor;
mod timer;
mod transfer;

pub(crate) use context::{describe_adapter, GpuContext};

use crate::element::{narrow_all, widen, OutputOf};
use crate::ops::batch_norm::{BatchNorm, BatchStats, Counted, RunningStats, Shape};
use crate::ops::layer_norm::{RowNorm, RowOutputs};
use crate::ops::partial::{ColumnGrads, ColumnStats};
use crate::ops::{new_output, Backend};
use crate::{Element, LayerNorm, NormError, Timing};

impl Backend for GpuContext {
    /// The kernels read and write f32 rows and half rows of even length as they are
    /// ([`layer_norm::reads`]); half rows of odd length are widened on the host whole, and the
    /// outputs rounded after.
    async fn layer_norm<T: Element>(
        &self,
        x: &[T],
        y: &mut [T],
        features: usize,
        op: (&LayerNorm<'_>, RowNorm),
        (add, moments): RowOutputs<'_, T>,
    ) -> Result<Timing, NormError> {
        if layer_norm::reads(T::TYPE, features) {
            let run = layer_norm::run(self, x, y, features, op, add, moments);
            return self.call(run).await;
        }
        let (x, mut y) = (widen(x), OutputOf::new(y));
        let timing = match add {
            None => {
                let run = layer_norm::run(self, &x, y.values(), features, op, None, moments);
                self.call(run).await?
            }
            Some((residual, sum)) => {
                let (residual, mut sum) = (widen(residual), OutputOf::new(sum));
                let add = Some((&residual[..], sum.values()));
                let run = layer_norm::run(self, &x, y.values(), features, op, add, moments);
                let timing = self.call(run).await?;
                sum.finish();
                timing
            }
        };
        y.finish();
        Ok(timing)
    }

    /// As [`Backend::layer_norm`] for GPU contexts: half rows of odd length widened whole.
    async fn layer_norm_backward<T: Element>(
        &self,
        (x, dy): (&[T], &[T]),
        dx: &mut [T],
        features: usize,
        op: (&LayerNorm<'_>, RowNorm),
        saved: Option<&[[f32; 4]]>,
    ) -> Result<(Vec<f32>, Vec<f32>, Timing), NormError> {
        if layer_norm::reads(T::TYPE, features) {
            let run = layer_norm::backward(self, (x, dy), dx, features, op, saved);
            return self.call(run).await;
        }
        let (x, dy) = (widen(x), widen(dy));
        let mut wide = new_output(x.len());
        let run = layer_norm::backward(self, (&x, &dy), &mut wide, features, op, saved);
        let sums = self.call(run).await?;
        narrow_all(&wide, dx);
        Ok(sums)
    }

    async fn batch_norm_train(
        &self,
        x: &[f32],
        y: &mut [f32],
        shape: &Shape,
        opts: &BatchNorm<'_>,
        counted: Counted,
    ) -> Result<(BatchStats, Timing), NormError> {
        let io = (batch_norm::Input::Host(x), batch_norm::Output::Host(y));
        self.call(batch_norm::train(self, io.0, io.1, shape, opts, counted))
            .await
    }

    async fn batch_norm_backward(
        &self,
        x_dy: (&[f32], &[f32]),
        dx: &mut [f32],
        shape: &Shape,
        opts: &BatchNorm<'_>,
        counted: Counted,
    ) -> Result<(Vec<f32>, Vec<f32>, Timing), NormError> {
        use batch_norm::{Input, Output};
        let io = ((Input::Host(x_dy.0), Input::Host(x_dy.1)), Output::Host(dx));
        let op = batch_norm::backward(self, io.0, io.1, shape, opts, counted);
        self.call(op).await
    }

    async fn batch_norm_stats(
        &self,
        x: &[f32],
        shape: &Shape,
        opts: &BatchNorm<'_>,
    ) -> Result<Vec<ColumnStats>, NormError> {
        self.call(batch_norm::partial_stats(self, x, shape, opts))
            .await
    }

    async fn batch_norm_apply(
        &self,
        x: &[f32],
        y: &mut [f32],
        shape: &Shape,
        opts: &BatchNorm<'_>,
        stats: &[ColumnStats],
    ) -> Result<(), NormError> {
        self.call(batch_norm::apply_stats(self, x, y, shape, opts, stats))
            .await
    }

    async fn batch_norm_backward_sums(
        &self,
        x_dy: (&[f32], &[f32]),
        shape: &Shape,
        opts: &BatchNorm<'_>,
        stats: &[ColumnStats],
    ) -> Result<Vec<ColumnGrads>, NormError> {
        self.call(batch_norm::partial_grads(self, x_dy, shape, opts, stats))
            .await
    }

    async fn batch_norm_backward_apply(
        &self,
        x_dy: (&[f32], &[f32]),
        dx: &mut [f32],
        shape: &Shape,
        opts: &BatchNorm<'_>,
        merged: (&[ColumnStats], &[ColumnGrads]),
    ) -> Result<(), NormError> {
        let op = batch_norm::apply_grads(self, x_dy, dx, shape, opts, merged);
        self.call(op).await
    }

    async fn batch_norm_eval(
        &self,
        x: &[f32],
        y: &mut [f32],
        shape: &Shape,
        opts: &BatchNorm<'_>,
        stats: &RunningStats,
    ) -> Result<Timing, NormError> {
        let io = (batch_norm::Input::Host(x), batch_norm::Output::Host(y));
        self.call(batch_norm::eval(self, io.0, io.1, shape, opts, stats))
            .await
    }
}

/// A 2-D grid of at least `groups` workgroups with no side over `max` (65535 on most
/// adapters); shaders linearise it as `wid.y * num_workgroups.x + wid.x` and skip the excess.
fn grid(groups: usize, max: usize) -> (u32, u32) {
    let gx = groups.min(max);
    let gy = groups.div_ceil(gx.max(1));
    (gx as u32, gy as u32)
}

/// Debug builds fill the first `bytes` of an output buffer with NaN (of f32, f16 and bf16 alike)
/// before a kernel runs, so any element a kernel forgets to write fails the comparison with the
/// reference instead of passing as 0.
#[cfg(debug_assertions)]
fn poison(ctx: &GpuContext, buffer: &wgpu::Buffer, bytes: u64) {
    ctx.queue()
        .write_buffer(buffer, 0, &vec![0xFFu8; bytes as usize]);
}

#[cfg(test)]
mod tests {
    use super::context::{test_device, Checks, GpuContext, Tuning};
    use crate::ops::batch_norm::{validate_training, Shape};
    use crate::ops::layer_norm::RowNorm;
    use crate::ops::Backend;
    use crate::{reference, BatchNorm, LayerNorm, RmsNorm};

    /// `n` values drawn uniformly from `mean ± spread`, the same for the same seed.
    fn values(n: usize, mean: f32, spread: f32, seed: u64) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n)
            .map(|_| mean + rng.random_range(-spread..spread))
            .collect()
    }

    /// Each kernel choice the tuning switches can make (`GPUNORM_*`, used to compare variants
    /// on one machine) computes the same normalizations (LayerNorm, RMSNorm, LayerNorm's
    /// backward, BatchNorm training): every one matches the f64 reference,
    /// within the integration tests' tolerances (1e-4 relative; 1e-3 on rows with mean 1e4 and
    /// spread 1e-2), on shapes that reach each size class.
    #[test]
    fn every_tuning_matches_the_reference() {
        let Some((device, queue)) = test_device() else {
            return;
        };
        let d = Tuning::default();
        let tunings = [
            d,
            Tuning {
                checks: Checks::All,
                subgroups: false,
                ..d
            },
            Tuning {
                checks: Checks::None,
                ..d
            },
            Tuning {
                ln_hold: 0,
                bn_rows: false,
                bn_apply4: false,
                ..d
            },
            Tuning {
                ln_hold: 8,
                bn_tiles: 16,
                ..d
            },
            Tuning { bn_hold: 4, ..d },
            Tuning { bn_hold: 32, ..d },
            Tuning {
                ln_bwd_hold: 8,
                ..d
            },
            Tuning {
                ln_bwd_hold: 32,
                subgroups: false,
                ..d
            },
            Tuning {
                ln_bwd_hold: 8,
                ln_bwd_fuse: true,
                ..d
            },
            Tuning {
                ln_bwd_hold: 32,
                ln_bwd_fuse: true,
                ..d
            },
        ];
        let shapes = [
            (2, 32768),
            (3, 9000),
            (5, 4100),
            // Three tiles of the fused backward (64 rows each), one row to a workgroup.
            (130, 600),
            (301, 64),
            (257, 12),
            (67, 3),
        ];
        for tuning in tunings {
            let ctx = GpuContext::with_tuning(device.clone(), queue.clone(), tuning);
            for (rows, features) in shapes {
                let seed = (rows * features) as u64;
                for (x, tol) in [
                    (values(rows * features, 3.0, 1.7, seed), 1e-4),
                    (values(rows * features, 1e4, 1e-2, seed), 1e-3),
                ] {
                    let mut y = vec![0f32; x.len()];
                    let ln = LayerNorm::default();
                    let out = (None, None);
                    pollster::block_on(ctx.layer_norm(
                        &x,
                        &mut y,
                        features,
                        (&ln, RowNorm::Layer),
                        out,
                    ))
                    .unwrap();
                    let err = reference::max_error(&y, &reference::layer_norm(&x, features, &ln));
                    assert!(err < tol, "{tuning:?} LN {rows}x{features}: {err:e}");

                    let rms = RmsNorm::default();
                    let (opts, kind) = rms.as_row_norm();
                    let out = (None, None);
                    pollster::block_on(ctx.layer_norm(&x, &mut y, features, (&opts, kind), out))
                        .unwrap();
                    let err = reference::max_error(&y, &reference::rms_norm(&x, features, &rms));
                    assert!(err < tol, "{tuning:?} RMS {rows}x{features}: {err:e}");

                    // The backward: dx against each row's largest gradient (tests/common's
                    // dx_error), dgamma and dbeta as everything else.
                    let dy = values(x.len(), 0.0, 1.0, seed + 1);
                    let mut dx = vec![0f32; x.len()];
                    let (dgamma, dbeta, _) = pollster::block_on(ctx.layer_norm_backward(
                        (&x, &dy),
                        &mut dx,
                        features,
                        (&ln, RowNorm::Layer),
                        None,
                    ))
                    .unwrap();
                    let (rdx, rdg, rdb) = reference::layer_norm_backward(&x, &dy, features, &ln);
                    let dx_err = dx
                        .chunks(features)
                        .zip(rdx.chunks(features))
                        .map(|(got, want)| {
                            let scale = want.iter().fold(1f64, |m, r| m.max(r.abs()));
                            got.iter()
                                .zip(want)
                                .map(|(&g, &w)| (g as f64 - w).abs() / scale)
                                .fold(0f64, f64::max)
                        })
                        .fold(0f64, f64::max);
                    assert!(
                        dx_err < tol,
                        "{tuning:?} LN dx {rows}x{features}: {dx_err:e}"
                    );
                    let err =
                        reference::max_error(&dgamma, &rdg).max(reference::max_error(&dbeta, &rdb));
                    assert!(err < tol, "{tuning:?} LN dgamma {rows}x{features}: {err:e}");

                    let mask: Vec<bool> = (0..rows).map(|r| r % 5 != 3).collect();
                    let bn = BatchNorm {
                        mask: Some(&mask),
                        ..Default::default()
                    };
                    let shape = Shape::features_last(x.len(), features).unwrap();
                    let counted = validate_training(&shape, &bn).unwrap();
                    pollster::block_on(ctx.batch_norm_train(&x, &mut y, &shape, &bn, counted))
                        .unwrap();
                    let expected = reference::batch_norm_train(&x, features, &bn).0;
                    let err = reference::max_error(&y, &expected);
                    assert!(err < tol, "{tuning:?} BN {rows}x{features}: {err:e}");
                }
            }
        }
    }
}
