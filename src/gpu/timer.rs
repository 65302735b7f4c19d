//! Kernel time from timestamp queries around compute passes.

use std::sync::Mutex;
use std::time::Duration;

use super::context::GpuContext;
use super::pool::{Lifetime, Pooled};
use super::transfer;
use crate::NormError;

/// Timestamp query sets no call is using.
#[derive(Default)]
pub(crate) struct QuerySets(Mutex<Vec<wgpu::QuerySet>>);

/// Timestamp queries around compute passes: kernel time summed over every pass it wraps. Made
/// only where the device has `TIMESTAMP_QUERY`. Its query set and buffers come from the context's
/// pools and go back when it drops, so only calls that wait for their work may use one.
pub(crate) struct PassTimer<'a> {
    ctx: &'a GpuContext,
    queries: Option<wgpu::QuerySet>,
    resolve: Pooled<'a>,
    staging: Pooled<'a>,
    period_ns: f64,
    total: Duration,
}

impl Drop for PassTimer<'_> {
    fn drop(&mut self) {
        if let Some(q) = self.queries.take() {
            self.ctx
                .query_sets
                .0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(q);
        }
    }
}

impl<'a> PassTimer<'a> {
    /// A timer, or None where the device cannot take timestamps.
    pub fn new(ctx: &'a GpuContext) -> Option<Self> {
        if !ctx.timestamps {
            return None;
        }
        let pooled = ctx
            .query_sets
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop();
        let queries = pooled.unwrap_or_else(|| {
            ctx.device().create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("gpunorm pass timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            })
        });
        use wgpu::BufferUsages as U;
        Some(Self {
            ctx,
            queries: Some(queries),
            resolve: ctx.buffer(
                "gpunorm timestamp resolve",
                16,
                U::QUERY_RESOLVE | U::COPY_SRC,
                Lifetime::Call,
            ),
            staging: transfer::readback_buffer(ctx, 16),
            period_ns: ctx.queue().get_timestamp_period() as f64,
            total: Duration::ZERO,
        })
    }

    fn query_set(&self) -> &wgpu::QuerySet {
        self.queries.as_ref().expect("present until drop")
    }

    /// The timestamp writes to attach to the next compute pass.
    pub fn writes(&self) -> wgpu::ComputePassTimestampWrites<'_> {
        wgpu::ComputePassTimestampWrites {
            query_set: self.query_set(),
            beginning_of_pass_write_index: Some(0),
            end_of_pass_write_index: Some(1),
        }
    }

    /// Records the copy of this pass's timestamps; call after the pass, before submitting.
    pub fn resolve(&self, encoder: &mut wgpu::CommandEncoder) {
        encoder.resolve_query_set(self.query_set(), 0..2, &self.resolve, 0);
        encoder.copy_buffer_to_buffer(&self.resolve, 0, &self.staging, 0, 16);
    }

    /// Reads the pass's timestamps after its submission and adds them to the total.
    pub async fn collect(&mut self) -> Result<(), NormError> {
        let mut ticks = [0u64; 2];
        transfer::read_into(self.ctx, &self.staging, &mut ticks).await?;
        let ns = ticks[1].saturating_sub(ticks[0]) as f64 * self.period_ns;
        self.total += Duration::from_nanos(ns as u64);
        Ok(())
    }
}

/// The summed kernel time of an optional timer.
pub(crate) fn total(timer: &Option<PassTimer<'_>>) -> Option<Duration> {
    timer.as_ref().map(|t| t.total)
}
