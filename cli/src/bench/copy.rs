//! The GPU copy ceiling: `shaders/bench_copy.wgsl` moves a tensor's bytes from one buffer to
//! another, timed by timestamp queries. Normalization reads its input once and writes its output
//! once, so no kernel of the same size can beat it on the same device.

use std::time::Duration;

use gpunorm::{wgpu, NormError};

/// Threads per workgroup of the copy kernel (its `WG`).
const WG: u64 = 256;

// Keep in sync with `Params` in shaders/bench_copy.wgsl.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct CopyParams {
    vec4s: u32,
    _pad: [u32; 3],
}

/// The copy of one size, ready to run again and again.
pub struct CopyKernel {
    pipeline: wgpu::ComputePipeline,
    bind: wgpu::BindGroup,
    queries: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    readback: wgpu::Buffer,
    groups: u32,
    period_ns: f64,
}

fn fail(e: impl std::fmt::Display) -> NormError {
    NormError::Gpu {
        op: "timing the copy kernel",
        message: e.to_string(),
    }
}

impl CopyKernel {
    /// A copy of `bytes` bytes (a multiple of 16) between two new buffers.
    pub fn new(device: &wgpu::Device, queue: &wgpu::Queue, bytes: u64) -> CopyKernel {
        use wgpu::BufferUsages as U;
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("bench copy"),
            source: wgpu::ShaderSource::Wgsl(
                include_str!("../../../shaders/bench_copy.wgsl").into(),
            ),
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some("bench copy"),
            layout: None,
            module: &module,
            entry_point: Some("copy"),
            compilation_options: Default::default(),
            cache: None,
        });
        let buffer = |size, usage| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("bench copy"),
                size,
                usage,
                mapped_at_creation: false,
            })
        };
        let params = buffer(16, U::UNIFORM | U::COPY_DST);
        let p = CopyParams {
            vec4s: (bytes / 16) as u32,
            _pad: [0; 3],
        };
        queue.write_buffer(&params, 0, bytemuck::bytes_of(&p));
        let (src, dst) = (buffer(bytes, U::STORAGE), buffer(bytes, U::STORAGE));
        let entries: Vec<_> = [&params, &src, &dst]
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: b.as_entire_binding(),
            })
            .collect();
        let bind = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("bench copy"),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        CopyKernel {
            pipeline,
            bind,
            queries: device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("bench copy"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            }),
            resolve: buffer(16, U::QUERY_RESOLVE | U::COPY_SRC),
            readback: buffer(16, U::MAP_READ | U::COPY_DST),
            groups: (bytes / 16).div_ceil(WG).clamp(1, 65535) as u32,
            period_ns: queue.get_timestamp_period() as f64,
        }
    }

    /// Runs the copy once and returns its kernel time.
    pub fn run(&self, device: &wgpu::Device, queue: &wgpu::Queue) -> Result<Duration, NormError> {
        let mut encoder = device.create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("bench copy"),
                timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                    query_set: &self.queries,
                    beginning_of_pass_write_index: Some(0),
                    end_of_pass_write_index: Some(1),
                }),
            });
            pass.set_pipeline(&self.pipeline);
            pass.set_bind_group(0, &self.bind, &[]);
            pass.dispatch_workgroups(self.groups, 1, 1);
        }
        encoder.resolve_query_set(&self.queries, 0..2, &self.resolve, 0);
        encoder.copy_buffer_to_buffer(&self.resolve, 0, &self.readback, 0, 16);
        queue.submit([encoder.finish()]);
        let (tx, rx) = std::sync::mpsc::channel();
        self.readback
            .slice(..)
            .map_async(wgpu::MapMode::Read, move |r| {
                let _ = tx.send(r);
            });
        device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(fail)?;
        rx.recv().map_err(fail)?.map_err(fail)?;
        let ticks: [u64; 2] = {
            let view = self.readback.slice(..).get_mapped_range().map_err(fail)?;
            bytemuck::pod_read_unaligned(&view[..16])
        };
        self.readback.unmap();
        let ns = ticks[1].saturating_sub(ticks[0]) as f64 * self.period_ns;
        Ok(Duration::from_nanos(ns as u64))
    }
}
