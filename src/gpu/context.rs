//! The one GPU context: the device and queue, the limits gpunorm plans with, the features it
//! uses, the pipeline cache and the buffer pool. Transfers ([`super::transfer`]) and kernel
//! timing ([`super::timer`]) are its other two chores, each in its own module.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::pool::{Lifetime, Pool, Pooled};
use super::shaders::{self, Def, KernelDef, Pipeline};
use super::timer::QuerySets;
use crate::NormError;

/// Environment variable that lowers the binding size gpunorm plans with (never above the
/// device's): chunking and every other size limit then run on any adapter, at small sizes.
pub(crate) const MAX_BINDING_ENV: &str = "GPUNORM_MAX_BINDING_BYTES";

/// A GPU with everything gpunorm needs to run on it. `Send + Sync`: wgpu's device and queue are,
/// and the pipeline cache and buffer pool sit behind mutexes.
pub(crate) struct GpuContext {
    device: wgpu::Device,
    queue: wgpu::Queue,
    limits: wgpu::Limits,
    /// The largest binding gpunorm plans with: the device's, or less (see [`MAX_BINDING_ENV`]).
    max_binding: u64,
    /// `Features::TIMESTAMP_QUERY` is enabled: kernel times can be read.
    pub timestamps: bool,
    /// `Features::SUBGROUP` is enabled: workgroup sums use subgroup operations.
    pub subgroups: bool,
    /// Unique in the process: tells this context's GPU tensors from other contexts'.
    pub id: u64,
    pipelines: Mutex<HashMap<String, Arc<Pipeline>>>,
    pub(super) pool: Pool,
    pub(super) query_sets: QuerySets,
    /// Held for a whole call on the GL backend (see [`GpuContext::exclusive`]).
    serial: Option<Mutex<()>>,
}

impl GpuContext {
    /// The best adapter wgpu finds (high performance unless `WGPU_POWER_PREF` says otherwise).
    /// Vulkan, Metal and DX12 are tried first and GL only where they find nothing, so a machine
    /// with a primary API never opens a GL context it will not use; `WGPU_BACKEND` picks the APIs
    /// instead.
    pub fn adapter() -> Result<wgpu::Adapter, NormError> {
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
                Ok(adapter) => return Ok(adapter),
                Err(e) => why.push(format!("{backends:?}: {e}")),
            }
        }
        Err(NormError::NoAdapter(why.join("; ")))
    }

    /// Opens a device on `adapter`, with every limit and the features gpunorm uses.
    pub fn from_adapter(adapter: &wgpu::Adapter) -> Result<Self, NormError> {
        // Ask for everything the adapter can address: normalization tensors are big, and the
        // defaults (128 MiB bindings) would refuse tensors the hardware handles fine. Kernel
        // times where the adapter can take timestamps; faster reductions where it has subgroups.
        let required_features =
            adapter.features() & (wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::SUBGROUP);
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("gpunorm device"),
            required_features,
            required_limits: adapter.limits(),
            ..Default::default()
        }))
        .map_err(|e| NormError::RequestDevice(e.to_string()))?;
        log::info!("gpunorm: {}", describe_adapter(&adapter.get_info()));
        Ok(Self::from_device(device, queue))
    }

    /// A context on a device someone else opened: its limits and features are what they are
    /// (kernel times need `TIMESTAMP_QUERY` enabled on it, subgroup reductions `SUBGROUP`).
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue) -> Self {
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let limits = device.limits();
        let device_binding = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        let gl = device.adapter_info().backend == wgpu::Backend::Gl;
        Self {
            max_binding: planned_binding(device_binding),
            serial: gl.then(|| Mutex::new(())),
            timestamps: device.features().contains(wgpu::Features::TIMESTAMP_QUERY),
            subgroups: device.features().contains(wgpu::Features::SUBGROUP),
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            limits,
            device,
            queue,
            pipelines: Mutex::new(HashMap::new()),
            pool: Pool::default(),
            query_sets: QuerySets::default(),
        }
    }

    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// The largest buffer one binding may cover, in bytes, as gpunorm plans it.
    pub fn max_binding_bytes(&self) -> u64 {
        self.max_binding
    }

    /// The longest side of a dispatch grid, in workgroups.
    pub fn max_groups(&self) -> usize {
        self.limits.max_compute_workgroups_per_dimension as usize
    }

    /// Fails with a plain message when the device cannot bind `needed` storage buffers in one
    /// kernel.
    pub fn check_storage_buffers(&self, needed: u32, op: &'static str) -> Result<(), NormError> {
        let limit = self.limits.max_storage_buffers_per_shader_stage;
        if needed > limit {
            return Err(NormError::DeviceLimit {
                op,
                limit: "max_storage_buffers_per_shader_stage",
                needed: needed as u64,
                has: limit as u64,
            });
        }
        Ok(())
    }

    /// On the GL backend, a guard that keeps other threads' gpunorm calls out until it drops:
    /// wgpu's GL device waits at most a second for its context, which a thread waiting for a long
    /// kernel holds, and then panics. Elsewhere None, and calls run side by side. Every public
    /// operation takes it first.
    pub fn exclusive(&self) -> Option<MutexGuard<'_, ()>> {
        self.serial
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// A buffer of `bytes` bytes (at least 16) with exactly `usage`; see [`Lifetime`] for when
    /// it is reused. Its contents are whatever the last user left.
    pub fn buffer(
        &self,
        label: &str,
        bytes: u64,
        usage: wgpu::BufferUsages,
        lifetime: Lifetime,
    ) -> Pooled<'_> {
        self.pool.take(&self.device, label, bytes, usage, lifetime)
    }

    /// A new buffer holding `data` (at least 16 bytes): per-call parameters, which may be bound
    /// in work still in flight when the call returns, so they never come from the pool.
    pub fn buffer_with(&self, label: &str, data: &[u8], usage: wgpu::BufferUsages) -> wgpu::Buffer {
        use wgpu::util::DeviceExt;
        let mut padded;
        let contents = if data.len() < 16 {
            padded = data.to_vec();
            padded.resize(16, 0);
            &padded[..]
        } else {
            data
        };
        self.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents,
                usage,
            })
    }

    /// Drops every free buffer of the pool.
    pub fn release_buffers(&self) {
        self.pool.clear();
    }

    /// The pipeline of `kernel` composed with `defs`, built once and cached under `label` (which
    /// is also its name in a GPU debugger, e.g. "layer_norm vec4 subgroup t256 k1").
    pub fn pipeline(
        &self,
        label: &str,
        kernel: &KernelDef,
        defs: &[(&'static str, Def)],
    ) -> Result<Arc<Pipeline>, NormError> {
        let mut cache = self.pipelines.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = cache.get(label) {
            return Ok(p.clone());
        }
        let module = shaders::compose(kernel.source, defs).map_err(|message| NormError::Gpu {
            op: "composing a shader",
            message,
        })?;
        let pipeline = self.scoped("building a compute pipeline", || {
            Pipeline::new(&self.device, kernel, module, label)
        })?;
        let pipeline = Arc::new(pipeline);
        cache.insert(label.to_owned(), pipeline.clone());
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

    /// A command encoder labelled `label`.
    pub fn encoder(&self, label: &str) -> wgpu::CommandEncoder {
        self.device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) })
    }

    /// Blocks until the queue is idle.
    pub fn wait(&self) -> Result<(), NormError> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| gpu_err("waiting for the GPU", e))
    }
}

/// The binding size to plan with on a device allowing `device` bytes: lowered by
/// [`MAX_BINDING_ENV`] when it holds a number, never raised. At least 16 bytes (one vec4).
fn planned_binding(device: u64) -> u64 {
    let wanted = std::env::var(MAX_BINDING_ENV)
        .ok()
        .and_then(|v| match v.trim().parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => {
                log::warn!("gpunorm: {MAX_BINDING_ENV}={v:?} is not a number of bytes; ignored");
                None
            }
        });
    wanted.map_or(device, |w| w.clamp(16, device.max(16)) / 4 * 4)
}

pub(crate) fn gpu_err(op: &'static str, e: impl std::fmt::Display) -> NormError {
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
