//! The one GPU context: the device and queue, the limits gpunorm plans with, the features it
//! uses, the pipeline cache and the buffer pool. Transfers ([`super::transfer`]) and kernel
//! timing ([`super::timer`]) are its other two chores, each in its own module.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use super::pool::{Lifetime, Pool, Pooled};
use super::shaders::{self, Def, KernelDef, Pipeline};
use super::timer::QuerySets;
use super::transfer;
use crate::NormError;

/// Environment variable that lowers the binding size gpunorm plans with (never above the
/// device's): chunking and every other size limit then run on any adapter, at small sizes.
pub(crate) const MAX_BINDING_ENV: &str = "GPUNORM_MAX_BINDING_BYTES";

/// Kernel choices that can be switched at run time, so that one run on one machine compares
/// variants side by side (`gpunorm bench` under different settings). Read once per context from
/// the environment; the defaults are the variants measured fastest (BENCHMARKS.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tuning {
    /// `GPUNORM_SUBGROUPS=0`: shared-memory tree sums even where subgroups could be used.
    pub subgroups: bool,
    /// `GPUNORM_LN_HOLD=K`: LayerNorm rows of up to K elements (vec4s where features % 4 == 0)
    /// per thread are held in registers, longer rows looped; a power of two up to 32, or 0 for
    /// always looped. Default 32.
    pub ln_hold: u32,
    /// `GPUNORM_LN_BWD_HOLD=K`: the LayerNorm and RMSNorm backward holds rows of up to K
    /// elements of x and of dy per thread in registers, several short rows a workgroup, and reads
    /// them once; longer rows (and every row with 0, the default until measured on a GPU) take
    /// the looped kernel, one workgroup a row. A power of two up to 32.
    pub ln_bwd_hold: u32,
    /// `GPUNORM_LN_BWD_FUSE=1`: where the backward holds rows of 256 threads each (rows longer
    /// than 512 elements), each workgroup takes a tile of 64 rows in turn and writes their column
    /// partials itself, so x and dy are read once in all (off by default until measured).
    pub ln_bwd_fuse: bool,
    /// `GPUNORM_BN_APPLY4=0`: BatchNorm's elementwise pass one value per thread, never four.
    pub bn_apply4: bool,
    /// `GPUNORM_RUNTIME_CHECKS=all|bounds|none`: the checks naga adds to every shader. `all`
    /// is wgpu's default; `bounds` (gpunorm's default) keeps the bounds checks on every index
    /// and drops the counters that bound every loop and the guards on every integer division;
    /// `none` drops the bounds checks too. See [`super::shaders::Pipeline::new`] for why each
    /// is safe for gpunorm's kernels.
    pub checks: Checks,
    /// `GPUNORM_BN_ROWS=0`: features-last BatchNorm through the general kernels, not the vec4
    /// column kernels of `batch_norm_rows.wgsl`.
    pub bn_rows: bool,
    /// `GPUNORM_BN_TILES=N`: about this many workgroups in BatchNorm's statistics pass.
    pub bn_tiles: u32,
    /// `GPUNORM_BN_HOLD=K`: the vec4 column kernels keep K rows per thread in registers for the
    /// statistics, reading the input once instead of twice (a power of two up to 32; 0, the
    /// default until measured on a GPU, reads each tile twice).
    pub bn_hold: u32,
}

/// Which of naga's runtime checks gpunorm's shaders keep (see [`Tuning::checks`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Checks {
    All,
    Bounds,
    None,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            subgroups: true,
            ln_hold: 32,
            ln_bwd_hold: 0,
            ln_bwd_fuse: false,
            bn_apply4: true,
            checks: Checks::Bounds,
            bn_rows: true,
            bn_tiles: 1024,
            bn_hold: 0,
        }
    }
}

impl Tuning {
    pub fn from_env() -> Tuning {
        let read = |name: &str| {
            let value = std::env::var(name).ok()?;
            let parsed = value.trim().parse::<u32>().ok();
            if parsed.is_none() {
                log::warn!("{name}={value:?} is not a number; ignored");
            }
            parsed
        };
        let d = Tuning::default();
        Tuning {
            subgroups: read("GPUNORM_SUBGROUPS").map_or(d.subgroups, |v| v != 0),
            ln_hold: read("GPUNORM_LN_HOLD")
                .filter(|&k| (k == 0 || k.is_power_of_two()) && k <= 32)
                .unwrap_or(d.ln_hold),
            ln_bwd_hold: read("GPUNORM_LN_BWD_HOLD")
                .filter(|&k| (k == 0 || k.is_power_of_two()) && k <= 32)
                .unwrap_or(d.ln_bwd_hold),
            ln_bwd_fuse: read("GPUNORM_LN_BWD_FUSE").map_or(d.ln_bwd_fuse, |v| v != 0),
            bn_apply4: read("GPUNORM_BN_APPLY4").map_or(d.bn_apply4, |v| v != 0),
            checks: match std::env::var("GPUNORM_RUNTIME_CHECKS").as_deref() {
                Ok("all") => Checks::All,
                Ok("bounds") => Checks::Bounds,
                Ok("none") => Checks::None,
                Ok(other) => {
                    log::warn!("GPUNORM_RUNTIME_CHECKS={other:?} is not all, bounds or none");
                    d.checks
                }
                Err(_) => d.checks,
            },
            bn_rows: read("GPUNORM_BN_ROWS").map_or(d.bn_rows, |v| v != 0),
            bn_tiles: read("GPUNORM_BN_TILES")
                .filter(|&n| n > 0)
                .unwrap_or(d.bn_tiles),
            bn_hold: read("GPUNORM_BN_HOLD")
                .filter(|&k| (k == 0 || k.is_power_of_two()) && k <= 32)
                .unwrap_or(d.bn_hold),
        }
    }
}

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
    /// `Features::SUBGROUP` is enabled and the adapter has one subgroup size: workgroup sums use
    /// subgroup operations. (Where the size may vary between dispatches, so may the order of a
    /// subgroup sum, and results would not repeat bit for bit.)
    pub subgroups: bool,
    pub tuning: Tuning,
    /// Unique in the process: tells this context's GPU tensors from other contexts'.
    pub id: u64,
    pipelines: Mutex<HashMap<String, Arc<Pipeline>>>,
    pub(super) pool: Pool,
    pub(super) query_sets: QuerySets,
    /// Held for a whole call on the GL backend (see [`GpuContext::call`]); a lock that is awaited,
    /// so a call's future stays `Send` while it holds it.
    serial: Option<futures_intrusive::sync::Mutex<()>>,
    /// Why the device was lost, once it is (from its device-lost callback or a failed call).
    lost: Arc<Mutex<Option<String>>>,
    /// 16 bytes of storage bound where a kernel's optional input is absent (gamma, beta, a
    /// mask): only ever read, so one serves every op.
    placeholder: wgpu::Buffer,
}

impl GpuContext {
    /// The best adapter wgpu finds (high performance unless `WGPU_POWER_PREF` says otherwise).
    /// Vulkan, Metal and DX12 are tried first and GL only where they find nothing, so a machine
    /// with a primary API never opens a GL context it will not use; `WGPU_BACKEND` picks the APIs
    /// instead.
    pub async fn adapter() -> Result<wgpu::Adapter, NormError> {
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
            match instance.request_adapter(&options).await {
                Ok(adapter) => return Ok(adapter),
                Err(e) => why.push(format!("{backends:?}: {e}")),
            }
        }
        Err(NormError::NoAdapter(why.join("; ")))
    }

    /// Opens a device on `adapter`, with every limit and the features gpunorm uses.
    pub async fn from_adapter(adapter: &wgpu::Adapter) -> Result<Self, NormError> {
        // Ask for everything the adapter can address: normalization tensors are big, and the
        // defaults (128 MiB bindings) would refuse tensors the hardware handles fine. Kernel
        // times where the adapter can take timestamps; faster reductions where it has subgroups.
        let required_features =
            adapter.features() & (wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::SUBGROUP);
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("gpunorm device"),
                required_features,
                required_limits: adapter.limits(),
                ..Default::default()
            })
            .await
            .map_err(|e| NormError::RequestDevice(e.to_string()))?;
        log::info!("gpunorm: {}", describe_adapter(&adapter.get_info()));
        let ctx = Self::from_device(device, queue);
        // The device is gpunorm's own, so its device-lost callback is too (a caller's device
        // keeps the callback its owner set; its loss shows in the errors of the calls instead).
        let lost = ctx.lost.clone();
        ctx.device.set_device_lost_callback(move |reason, message| {
            let why = format!("{reason:?}: {message}");
            *lost.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        });
        Ok(ctx)
    }

    /// A context on a device someone else opened: its limits and features are what they are
    /// (kernel times need `TIMESTAMP_QUERY` enabled on it, subgroup reductions `SUBGROUP`).
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue) -> Self {
        Self::with_tuning(device, queue, Tuning::from_env())
    }

    /// [`GpuContext::from_device`] with the kernel choices `tuning` makes.
    pub fn with_tuning(device: wgpu::Device, queue: wgpu::Queue, tuning: Tuning) -> Self {
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let limits = device.limits();
        let device_binding = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        let gl = device.adapter_info().backend == wgpu::Backend::Gl;
        Self {
            max_binding: planned_binding(device_binding),
            serial: gl.then(|| futures_intrusive::sync::Mutex::new((), true)),
            timestamps: device.features().contains(wgpu::Features::TIMESTAMP_QUERY),
            subgroups: device.features().contains(wgpu::Features::SUBGROUP)
                && {
                    let info = device.adapter_info();
                    info.subgroup_min_size == info.subgroup_max_size
                }
                && tuning.subgroups,
            tuning,
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            limits,
            placeholder: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("gpunorm placeholder"),
                size: 16,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            }),
            device,
            queue,
            pipelines: Mutex::new(HashMap::new()),
            pool: Pool::default(),
            query_sets: QuerySets::default(),
            lost: Arc::new(Mutex::new(None)),
        }
    }

    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    /// A buffer to bind where an optional input is absent; kernels never write it.
    pub fn placeholder(&self) -> &wgpu::Buffer {
        &self.placeholder
    }

    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// The largest buffer one binding may cover, in bytes, as gpunorm plans it.
    pub fn max_binding_bytes(&self) -> u64 {
        self.max_binding
    }

    /// The alignment of a storage binding's offset, in bytes.
    pub fn storage_offset_alignment(&self) -> u64 {
        self.limits.min_storage_buffer_offset_alignment.into()
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

    /// Runs one public operation: refused at once on a lost device, alone on the GL backend
    /// (wgpu's GL device waits at most a second for its context, which a thread waiting for a
    /// long kernel holds, and then panics; elsewhere calls run side by side), and with a failure
    /// the device's loss explains reported as [`NormError::DeviceLost`].
    pub async fn call<T>(
        &self,
        op: impl Future<Output = Result<T, NormError>>,
    ) -> Result<T, NormError> {
        self.check_alive()?;
        let _serial = match &self.serial {
            Some(lock) => Some(lock.lock().await),
            None => None,
        };
        match op.await {
            Err(NormError::Gpu { message, .. }) if is_loss(&message) || self.probe_lost().await => {
                Err(NormError::DeviceLost(self.lost().unwrap_or(message)))
            }
            result => result,
        }
    }

    /// After a failed call: whether the device is lost. Known from the device-lost callback of a
    /// device gpunorm opened; a caller's device is asked by mapping a small new buffer, which a
    /// working device always can.
    async fn probe_lost(&self) -> bool {
        if self.lost().is_some() {
            return true;
        }
        let probe = self
            .scoped("probing the device", || {
                self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("gpunorm device probe"),
                    size: 16,
                    usage: wgpu::BufferUsages::MAP_READ,
                    mapped_at_creation: false,
                })
            })
            .await;
        let mapped = match &probe {
            Ok(probe) => {
                let slice = probe.slice(..);
                let mode = wgpu::MapMode::Read;
                let mapped = transfer::map_slice(self, slice, mode, "probing the device").await;
                mapped.is_ok()
            }
            Err(_) => false,
        };
        if mapped {
            return false;
        }
        let why = "it no longer maps a new buffer (destroyed or reset)".to_owned();
        let mut lost = self.lost.lock().unwrap_or_else(|e| e.into_inner());
        lost.get_or_insert(why);
        true
    }

    /// Why the device was lost, once it is.
    fn lost(&self) -> Option<String> {
        self.lost.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Refuses a call on a device known to be lost. (A loss not yet known shows as a failed call,
    /// which [`GpuContext::call`] then explains; no poll on every call's path.)
    fn check_alive(&self) -> Result<(), NormError> {
        match self.lost() {
            Some(why) => Err(NormError::DeviceLost(why)),
            None => Ok(()),
        }
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
        let cap = self.max_binding;
        self.pool
            .take(&self.device, label, (bytes, cap), usage, lifetime)
    }

    /// A new buffer holding `data` (at least 16 bytes): per-call parameters, which may be bound
    /// in work still in flight when the call returns, so they never come from the pool.
    pub fn buffer_with(&self, label: &str, data: &[u8], usage: wgpu::BufferUsages) -> wgpu::Buffer {
        // Through the queue rather than mapped at creation: on a lost device wgpu reports a
        // failed write as an error, where a failed mapping would panic.
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: (data.len() as u64).max(16).next_multiple_of(4),
            usage: usage | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        if !data.is_empty() {
            self.queue.write_buffer(&buffer, 0, data);
        }
        buffer
    }

    /// Drops every free buffer of the pool.
    pub fn release_buffers(&self) {
        self.pool.clear();
    }

    /// The pipeline of `kernel` composed with `defs`, built once and cached under `label` (which
    /// is also its name in a GPU debugger, e.g. "layer_norm vec4 subgroup t256 k1").
    pub async fn pipeline(
        &self,
        label: &str,
        kernel: &KernelDef,
        defs: &[(&'static str, Def)],
    ) -> Result<Arc<Pipeline>, NormError> {
        let cached = |cache: &Mutex<HashMap<String, Arc<Pipeline>>>| {
            cache
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(label)
                .cloned()
        };
        if let Some(p) = cached(&self.pipelines) {
            return Ok(p);
        }
        let module = shaders::compose(kernel.source, defs).map_err(|message| NormError::Gpu {
            op: "composing a shader",
            message,
        })?;
        let pipeline = self
            .scoped("building a compute pipeline", || {
                Pipeline::new(&self.device, kernel, module, label, self.tuning.checks)
            })
            .await?;
        // Two calls may have built it side by side; both get the one cached first.
        let mut cache = self.pipelines.lock().unwrap_or_else(|e| e.into_inner());
        Ok(cache
            .entry(label.to_owned())
            .or_insert_with(|| Arc::new(pipeline))
            .clone())
    }

    /// Runs `f` inside out-of-memory and validation error scopes, so a wgpu error becomes a
    /// `NormError` instead of the default handler's panic.
    ///
    /// `f` is synchronous on purpose: error scopes belong to the thread that pushed them, and an
    /// awaiting op may resume on another thread, so every op records and submits in scoped
    /// steps and awaits between them (a failed mapping is reported by the mapping itself).
    pub async fn scoped<T>(&self, op: &'static str, f: impl FnOnce() -> T) -> Result<T, NormError> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let value = f();
        // Both scopes are popped here, before the first await; the futures only report.
        let (validation, oom) = (validation.pop(), oom.pop());
        match (validation.await, oom.await) {
            (None, None) => Ok(value),
            (Some(e), _) | (None, Some(e)) => Err(NormError::Gpu {
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

/// Whether a wgpu error message speaks of a lost or destroyed device.
fn is_loss(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("lost") || m.contains("destroyed")
}

pub(crate) fn gpu_err(op: &'static str, e: impl std::fmt::Display) -> NormError {
    NormError::Gpu {
        op,
        message: e.to_string(),
    }
}

/// A device on the first adapter wgpu finds, for unit tests of GPU pieces; None (SKIPPED) without
/// one, a failure with GPUNORM_REQUIRE_GPU=1.
#[cfg(test)]
pub(crate) fn test_device() -> Option<(wgpu::Device, wgpu::Queue)> {
    match pollster::block_on(GpuContext::adapter()) {
        Ok(adapter) => {
            Some(pollster::block_on(adapter.request_device(&Default::default())).expect("a device"))
        }
        Err(e) => {
            assert!(
                std::env::var("GPUNORM_REQUIRE_GPU").map_or(true, |v| v != "1"),
                "GPUNORM_REQUIRE_GPU=1 but no GPU: {e}"
            );
            eprintln!("SKIPPED (GPU part): no GPU adapter");
            None
        }
    }
}

/// One line naming an adapter: name, API, device type and driver, leaving out what the adapter
/// does not say (a browser's WebGPU adapter may give no name and no driver).
pub(crate) fn describe_adapter(info: &wgpu::AdapterInfo) -> String {
    let name = if info.name.is_empty() {
        "unnamed adapter"
    } else {
        &info.name
    };
    let driver = match (info.driver.is_empty(), info.driver_info.is_empty()) {
        (true, true) => String::new(),
        (false, true) => format!(", driver {}", info.driver),
        (true, false) => format!(", driver {}", info.driver_info),
        (false, false) => format!(", driver {} {}", info.driver, info.driver_info),
    };
    format!(
        "{name} ({:?}, {:?}{driver})",
        info.backend, info.device_type
    )
}
