//! The GPU backend: one context type ([`GpuContext`]) that owns the device, queue, pipeline cache
//! and buffer pool; transfers and kernel timing beside it; one host module per op family, each
//! reading plan → record → read back; and GPU tensors for callers who keep data on the device.

mod batch_norm;
mod context;
mod layer_norm;
mod pool;
mod shaders;
pub(crate) mod tensor;
mod timer;
mod transfer;

pub(crate) use context::{describe_adapter, GpuContext};

use crate::ops::batch_norm::{BatchNorm, BatchStats, Counted, RunningStats, Shape};
use crate::ops::Backend;
use crate::{LayerNorm, NormError, Timing};

impl Backend for GpuContext {
    fn layer_norm(
        &self,
        x: &[f32],
        y: &mut [f32],
        features: usize,
        opts: &LayerNorm<'_>,
    ) -> Result<Timing, NormError> {
        self.call(|| layer_norm::run(self, x, y, features, opts))
    }

    fn batch_norm_train(
        &self,
        x: &[f32],
        y: &mut [f32],
        shape: &Shape,
        opts: &BatchNorm<'_>,
        counted: Counted,
    ) -> Result<(BatchStats, Timing), NormError> {
        let io = (batch_norm::Input::Host(x), batch_norm::Output::Host(y));
        self.call(|| batch_norm::train(self, io.0, io.1, shape, opts, counted))
    }

    fn batch_norm_eval(
        &self,
        x: &[f32],
        y: &mut [f32],
        shape: &Shape,
        opts: &BatchNorm<'_>,
        stats: &RunningStats,
    ) -> Result<Timing, NormError> {
        let io = (batch_norm::Input::Host(x), batch_norm::Output::Host(y));
        self.call(|| batch_norm::eval(self, io.0, io.1, shape, opts, stats))
    }
}

/// A 2-D grid of at least `groups` workgroups with no side over `max` (65535 on most
/// adapters); shaders linearise it as `wid.y * num_workgroups.x + wid.x` and skip the excess.
fn grid(groups: usize, max: usize) -> (u32, u32) {
    let gx = groups.min(max);
    let gy = groups.div_ceil(gx.max(1));
    (gx as u32, gy as u32)
}

/// Debug builds fill an output buffer with NaN before a kernel runs, so any element a kernel
/// forgets to write fails the comparison with the reference instead of passing as 0.
#[cfg(debug_assertions)]
fn poison(ctx: &GpuContext, buffer: &wgpu::Buffer, floats: usize) {
    ctx.queue()
        .write_buffer(buffer, 0, &vec![0xFFu8; floats * 4]);
}
