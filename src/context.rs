//! The one GPU context: device, queue, limits, the pipeline cache and the buffer pool, plus the
//! few chores every op shares (readback, timestamps, error scopes).
//!
//! Op modules (`layer_norm`, `batch_norm`) own their shaders and dispatch logic; they come here for
//! pipelines and buffers so nothing on the hot path compiles a shader twice.

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::{mpsc, Mutex};
use std::time::Duration;

use rayon::prelude::*;

use crate::NormError;

/// A GPU with everything gpunorm needs to run on it. `Send + Sync`: wgpu's device and queue are,
/// and the pipeline cache and buffer pool sit behind mutexes.
pub(crate) struct GpuContext {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub limits: wgpu::Limits,
    pub timestamps: bool,
    /// `Features::SUBGROUP` is enabled: workgroup sums use subgroup operations.
    pub subgroups: bool,
    /// Unique in the process: tells this context's GPU tensors from other contexts'.
    pub id: u64,
    pipelines: Mutex<HashMap<String, wgpu::ComputePipeline>>,
    /// Buffers no call is using, oldest first, for the next call of the same shape.
    free: Mutex<Vec<wgpu::Buffer>>,
    /// Held for a whole call on the GL backend (see [`GpuContext::exclusive`]).
    serial: Option<Mutex<()>>,
    /// Timestamp query sets no call is using (see [`PassTimer`]).
    query_sets: Mutex<Vec<wgpu::QuerySet>>,
}

/// Free buffers the pool keeps at most, in bytes; past it the oldest are dropped.
const POOL_BYTES: u64 = 2 << 30;

/// A buffer taken from the pool; it goes back when dropped (unless made with
/// [`GpuContext::take_or_new`] for work nobody waits for).
pub(crate) struct Pooled<'a> {
    ctx: &'a GpuContext,
    buffer: Option<wgpu::Buffer>,
    pooled: bool,
}

impl Deref for Pooled<'_> {
    type Target = wgpu::Buffer;
    fn deref(&self) -> &wgpu::Buffer {
        self.buffer.as_ref().expect("present until drop")
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        if let Some(b) = self.buffer.take().filter(|_| self.pooled) {
            self.ctx.give_back(b);
        }
    }
}

impl GpuContext {
    /// Opens the best adapter wgpu finds (high performance unless `WGPU_POWER_PREF` says
    /// otherwise). Vulkan, Metal and DX12 are tried first and GL only where they find nothing, so
    /// a machine with a primary API never opens a GL context it will not use; `WGPU_BACKEND`
    /// picks the APIs instead.
    pub fn new() -> Result<Self, NormError> {
        let options = wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::from_env()
                .unwrap_or(wgpu::PowerPreference::HighPerformance),
            ..Default::default()
        };
        let tiers = match wgpu::Backends::from_env() {
            Some(chosen) => vec![chosen],
            None => vec![wgpu::Backends::PRIMARY, wgpu::Backends::SECONDARY],
        };
        let mut why = Vec::new();
        for backends in tiers {
            let mut desc = wgpu::InstanceDescriptor::new_without_display_handle().with_env();
            desc.backends = backends;
            let instance = wgpu::Instance::new(desc);
            match pollster::block_on(instance.request_adapter(&options)) {
                Ok(adapter) => return Self::from_adapter(&adapter),
                Err(e) => why.push(format!("{backends:?}: {e}")),
            }
        }
        Err(NormError::NoAdapter(why.join("; ")))
    }

    fn from_adapter(adapter: &wgpu::Adapter) -> Result<Self, NormError> {
        // Ask for everything the adapter can address: normalization tensors are big, and the
        // defaults (128 MiB bindings) would refuse tensors the hardware handles fine.
        let limits = adapter.limits();
        // Kernel times where the adapter can take timestamps; faster reductions where it has
        // subgroup operations.
        let required_features =
            adapter.features() & (wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::SUBGROUP);
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("gpunorm device"),
            required_features,
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| NormError::RequestDevice(e.to_string()))?;
        log::info!("gpunorm: {}", describe_adapter(&adapter.get_info()));
        Ok(Self::from_device(device, queue))
    }

    /// A context on a device someone else opened: its limits and features are what they are
    /// (kernel times need `TIMESTAMP_QUERY` enabled on it, subgroup reductions `SUBGROUP`).
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue) -> Self {
        let gl = device.adapter_info().backend == wgpu::Backend::Gl;
        Self {
            serial: gl.then(|| Mutex::new(())),
            limits: device.limits(),
            timestamps: device.features().contains(wgpu::Features::TIMESTAMP_QUERY),
            subgroups: device.features().contains(wgpu::Features::SUBGROUP),
            id: {
                static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            },
            device,
            queue,
            pipelines: Mutex::new(HashMap::new()),
            free: Mutex::new(Vec::new()),
            query_sets: Mutex::new(Vec::new()),
        }
    }

    /// On the GL backend, a guard that keeps other threads' gpunorm calls out until it drops:
    /// wgpu's GL device waits at most a second for its context, which a thread waiting for a long
    /// kernel holds, and then panics. Elsewhere None, and calls run side by side. Every public
    /// operation takes it first.
    pub fn exclusive(&self) -> Option<std::sync::MutexGuard<'_, ()>> {
        self.serial
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// A buffer of `bytes` bytes (at least 16) with exactly `usage`: a free one of that size and
    /// usage when the pool has it, else a new one labelled `label`. Its contents are whatever the
    /// last user left. It returns to the pool when the guard drops, so take buffers only for work
    /// the caller waits for before the guard goes.
    pub fn take(&self, label: &str, bytes: u64, usage: wgpu::BufferUsages) -> Pooled<'_> {
        let size = bytes.max(16);
        let reused = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            free.iter()
                .position(|b| b.size() == size && b.usage() == usage)
                .map(|i| free.remove(i))
        };
        let buffer = reused.unwrap_or_else(|| self.buffer(label, size, usage));
        Pooled {
            ctx: self,
            buffer: Some(buffer),
            pooled: true,
        }
    }

    /// [`GpuContext::take`] when the caller waits for the work that uses the buffer; otherwise a
    /// new buffer that never enters the pool (the GPU may still be using it after the call).
    pub fn take_or_new(
        &self,
        waits: bool,
        label: &str,
        bytes: u64,
        usage: wgpu::BufferUsages,
    ) -> Pooled<'_> {
        if waits {
            self.take(label, bytes, usage)
        } else {
            Pooled {
                ctx: self,
                buffer: Some(self.buffer(label, bytes, usage)),
                pooled: false,
            }
        }
    }

    fn give_back(&self, buffer: wgpu::Buffer) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        free.push(buffer);
        let mut total: u64 = free.iter().map(|b| b.size()).sum();
        while total > POOL_BYTES {
            total -= free.remove(0).size();
        }
    }

    /// Records a copy of `data` into `dst` (from offset 0) into `encoder`, through a pooled
    /// staging buffer that is already mapped or mapped now: no fresh host allocation per call.
    /// The returned guard must live until the encoder's work has been waited for.
    pub fn upload<T: bytemuck::Pod>(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        dst: &wgpu::Buffer,
        data: &[T],
    ) -> Result<Pooled<'_>, NormError> {
        use wgpu::BufferUsages as U;
        let bytes = std::mem::size_of_val(data) as u64;
        let size = bytes.max(16);
        let usage = U::MAP_WRITE | U::COPY_SRC;
        let reused = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            free.iter()
                .position(|b| b.size() == size && b.usage() == usage)
                .map(|i| free.remove(i))
        };
        let staging = match reused {
            Some(buffer) => {
                // Waits, if need be, for the GPU to finish reading the buffer's last upload.
                let (tx, rx) = mpsc::channel();
                buffer.slice(..).map_async(wgpu::MapMode::Write, move |r| {
                    let _ = tx.send(r);
                });
                self.wait()?;
                rx.recv()
                    .map_err(|e| gpu_err("mapping an upload buffer", e))?
                    .map_err(|e| gpu_err("mapping an upload buffer", e))?;
                buffer
            }
            None => self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("gpunorm upload"),
                size,
                usage,
                mapped_at_creation: true,
            }),
        };
        write_mapped(&staging, bytemuck::cast_slice(data))?;
        staging.unmap();
        if bytes > 0 {
            encoder.copy_buffer_to_buffer(&staging, 0, dst, 0, bytes);
        }
        Ok(Pooled {
            ctx: self,
            buffer: Some(staging),
            pooled: true,
        })
    }

    /// Drops every free buffer of the pool.
    pub fn release_buffers(&self) {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// The largest buffer one binding may cover, in bytes.
    pub fn max_binding_bytes(&self) -> u64 {
        self.limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size)
    }

    /// The compute pipeline for `entry` in the WGSL `source`, built once and cached under `key`
    /// (which is also its label, so a GPU debugger shows what it is).
    pub fn pipeline(
        &self,
        key: &str,
        source: impl FnOnce() -> String,
        entry: &str,
    ) -> Result<wgpu::ComputePipeline, NormError> {
        let mut cache = self.pipelines.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = cache.get(key) {
            return Ok(p.clone());
        }
        let pipeline = self.scoped("building a compute pipeline", || {
            let module = self
                .device
                .create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(key),
                    source: wgpu::ShaderSource::Wgsl(source().into()),
                });
            self.device
                .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(key),
                    layout: None,
                    module: &module,
                    entry_point: Some(entry),
                    compilation_options: Default::default(),
                    cache: None,
                })
        })?;
        cache.insert(key.to_owned(), pipeline.clone());
        Ok(pipeline)
    }

    /// Runs `f` inside out-of-memory and validation error scopes, so a wgpu error becomes a
    /// `NormError` instead of the default handler's panic.
    pub fn scoped<T>(&self, op: &'static str, f: impl FnOnce() -> T) -> Result<T, NormError> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let value = f();
        let errors = [
            pollster::block_on(validation.pop()),
            pollster::block_on(oom.pop()),
        ];
        match errors.into_iter().flatten().next() {
            None => Ok(value),
            Some(e) => Err(NormError::Gpu {
                op,
                message: e.to_string(),
            }),
        }
    }

    /// A storage buffer of `bytes` bytes (at least 16, the size of one vec4).
    pub fn buffer(&self, label: &str, bytes: u64, usage: wgpu::BufferUsages) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes.max(16),
            usage,
            mapped_at_creation: false,
        })
    }

    /// A read-only storage buffer holding `data`, or a 16-byte placeholder when `data` is None
    /// (the shader is told by a flag not to read it). Not pooled: small, and bound in commands
    /// that may still be in flight when the call that made them returns.
    pub fn param_buffer(&self, label: &str, data: Option<&[f32]>) -> wgpu::Buffer {
        let bytes = data.map_or(16, |d| (d.len() * 4) as u64);
        let buffer = self.buffer(
            label,
            bytes,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
        );
        if let Some(d) = data {
            self.queue.write_buffer(&buffer, 0, bytemuck::cast_slice(d));
        }
        buffer
    }

    /// Waits for all submitted work and copies the first `out.len()` floats of the mappable
    /// `staging` buffer into `out`.
    pub fn read_into(&self, staging: &wgpu::Buffer, out: &mut [f32]) -> Result<(), NormError> {
        let bytes = (out.len() * 4) as u64;
        if bytes == 0 {
            return Ok(());
        }
        let slice = staging.slice(..bytes);
        let (tx, rx) = mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        rx.recv()
            .map_err(|e| gpu_err("reading back", e))?
            .map_err(|e| gpu_err("reading back", e))?;
        {
            let view = slice
                .get_mapped_range()
                .map_err(|e| gpu_err("reading back", e))?;
            read_mapped(bytemuck::cast_slice_mut(out), &view);
        }
        staging.unmap();
        Ok(())
    }

    /// Blocks until the queue is idle.
    pub fn wait(&self) -> Result<(), NormError> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| gpu_err("waiting for the GPU", e))
    }
}

/// Copies of at least this many bytes into and out of mapped staging buffers are spread over the
/// rayon threads in pieces of `COPY_PIECE`: one thread cannot fill a host's memory bandwidth, and
/// uploads and readbacks of big tensors are such copies.
const PARALLEL_COPY: usize = 4 << 20;
const COPY_PIECE: usize = 1 << 20;

/// Copies `src` to the start of the mapped buffer `dst`, in pieces of `COPY_PIECE` on the rayon
/// threads when large (each piece through its own write-only view of the mapping).
fn write_mapped(dst: &wgpu::Buffer, src: &[u8]) -> Result<(), NormError> {
    let piece = if src.len() < PARALLEL_COPY {
        src.len().max(1)
    } else {
        COPY_PIECE
    };
    src.par_chunks(piece)
        .enumerate()
        .try_for_each(|(i, s)| -> Result<(), NormError> {
            let at = (i * piece) as u64;
            dst.slice(at..at + s.len() as u64)
                .get_mapped_range_mut()
                .map_err(|e| gpu_err("writing an upload buffer", e))?
                .copy_from_slice(s);
            Ok(())
        })
}

/// `dst.copy_from_slice(src)` out of mapped memory.
fn read_mapped(dst: &mut [u8], src: &[u8]) {
    if src.len() < PARALLEL_COPY {
        dst.copy_from_slice(src);
        return;
    }
    dst.par_chunks_mut(COPY_PIECE)
        .zip(src.par_chunks(COPY_PIECE))
        .for_each(|(d, s)| d.copy_from_slice(s));
}

fn gpu_err(op: &'static str, e: impl std::fmt::Display) -> NormError {
    NormError::Gpu {
        op,
        message: e.to_string(),
    }
}

/// One line naming an adapter: name, API, device type and driver.
pub(crate) fn describe_adapter(info: &wgpu::AdapterInfo) -> String {
    let driver = if info.driver_info.is_empty() {
        info.driver.clone()
    } else {
        format!("{} {}", info.driver, info.driver_info)
    };
    format!(
        "{} ({:?}, {:?}, driver {})",
        info.name, info.backend, info.device_type, driver
    )
}

/// Timestamp queries around compute passes: kernel time summed over every pass it wraps.
/// Absent (`None`) where the adapter lacks `TIMESTAMP_QUERY`. Its query set and buffers come from
/// the context's pools and go back when it drops, so only calls that wait for their work may
/// use one.
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
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(q);
        }
    }
}

impl<'a> PassTimer<'a> {
    pub fn new(ctx: &'a GpuContext) -> Option<Self> {
        if !ctx.timestamps {
            return None;
        }
        let pooled = ctx
            .query_sets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop();
        let queries = pooled.unwrap_or_else(|| {
            ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("gpunorm pass timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            })
        });
        use wgpu::BufferUsages as U;
        Some(Self {
            ctx,
            queries: Some(queries),
            resolve: ctx.take(
                "gpunorm timestamp resolve",
                16,
                U::QUERY_RESOLVE | U::COPY_SRC,
            ),
            staging: ctx.take("gpunorm timestamp readback", 16, U::MAP_READ | U::COPY_DST),
            period_ns: ctx.queue.get_timestamp_period() as f64,
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

    /// Reads the pass's timestamps after its submission completed and adds them to the total.
    pub fn collect(&mut self, ctx: &GpuContext) -> Result<(), NormError> {
        let mut raw = [0f32; 4];
        ctx.read_into(&self.staging, &mut raw)?;
        let ticks: [u64; 2] = bytemuck::cast(raw);
        let ns = ticks[1].saturating_sub(ticks[0]) as f64 * self.period_ns;
        self.total += Duration::from_nanos(ns as u64);
        Ok(())
    }

    pub fn total(timer: &Option<PassTimer<'_>>) -> Option<Duration> {
        timer.as_ref().map(|t| t.total)
    }
}
