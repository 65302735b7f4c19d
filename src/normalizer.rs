//! [`Normalizer`], the one public entry point: it validates every call (`ops`), then hands it to
//! its backend, the CPU fallback or a GPU context, through the same [`Backend`] contract.
//!
//! Every op is written once, as an `_async` method; its synchronous twin waits for it on the
//! calling thread ([`Normalizer::block`]).

use std::future::Future;

use crate::cpu::Cpu;
use crate::element::{narrow, widen, OutputOf};
use crate::gpu::encode::{self, Encode};
use crate::gpu::tensor::{
    self, GpuAddNormOutput, GpuGrads, GpuRmsNormGrads, GpuRowStats, GpuRunningStats,
    GpuSavedNormOutput, GpuTensor,
};
use crate::gpu::{describe_adapter, GpuContext};
use crate::ops::batch_norm::{self, Shape};
use crate::ops::layer_norm::{RowNorm, RowOutputs};
use crate::ops::partial::{ColumnGrads, ColumnStats};
use crate::ops::{check_output, layer_norm, new_output, rms_norm, Backend};
use crate::{
    AddNormOutput, BatchNorm, BatchNormGrads, BatchNormOutput, BatchStats, ChannelsFirst, Element,
    LayerNorm, LayerNormGrads, NormError, ParamGrads, PartialGrads, PartialStats, RmsNorm,
    RmsNormGrads, RowStats, RunningStats, SavedNormOutput, Timing,
};

/// Environment variable that overrides [`Normalizer::new`]'s choice: `cpu`, `gpu` or `auto`.
const BACKEND_ENV: &str = "GPUNORM_BACKEND";

/// The entry point: a GPU (or the CPU fallback) ready to normalize batches.
///
/// Build it once and share it: it is `Send + Sync`, and its compiled pipelines are cached for
/// every later call. Calls from several threads are safe.
pub struct Normalizer {
    engine: Engine,
}

/// What a `Normalizer` runs on.
enum Engine {
    Cpu(Cpu),
    Gpu(Box<GpuContext>),
}

impl Engine {
    /// LayerNorm or RMSNorm (as `op` says) of rows of `T`, with the fused add where `add` is
    /// given and each row's statistics saved into `moments` where that is.
    async fn layer_norm_of<T: Element>(
        &self,
        x: &[T],
        y: &mut [T],
        features: usize,
        op: (&LayerNorm<'_>, RowNorm),
        out: RowOutputs<'_, T>,
    ) -> Result<Timing, NormError> {
        match self {
            Engine::Cpu(cpu) => cpu.layer_norm(x, y, features, op, out).await,
            Engine::Gpu(ctx) => ctx.layer_norm(x, y, features, op, out).await,
        }
    }

    /// The backward pass of LayerNorm or RMSNorm on tensors of `T`: dx into `dx`, and dgamma and
    /// dbeta, each row's statistics taken from `saved` where given.
    async fn layer_norm_backward_of<T: Element>(
        &self,
        x_dy: (&[T], &[T]),
        dx: &mut [T],
        features: usize,
        op: (&LayerNorm<'_>, RowNorm),
        saved: Option<&[[f32; 4]]>,
    ) -> Result<(ParamGrads, Timing), NormError> {
        let (dgamma, dbeta, timing) = match self {
            Engine::Cpu(cpu) => {
                cpu.layer_norm_backward(x_dy, dx, features, op, saved)
                    .await?
            }
            Engine::Gpu(ctx) => {
                ctx.layer_norm_backward(x_dy, dx, features, op, saved)
                    .await?
            }
        };
        Ok((ParamGrads { dgamma, dbeta }, timing))
    }

    /// [`Engine::layer_norm_backward_of`] into a new dx.
    async fn layer_norm_backward_alloc<T: Element>(
        &self,
        x_dy: (&[T], &[T]),
        features: usize,
        op: (&LayerNorm<'_>, RowNorm),
        saved: Option<&[[f32; 4]]>,
    ) -> Result<(Vec<T>, ParamGrads), NormError> {
        let mut dx = new_output(x_dy.0.len());
        let (grads, _) = self
            .layer_norm_backward_of(x_dy, &mut dx, features, op, saved)
            .await?;
        Ok((dx, grads))
    }

    async fn batch_norm_train(
        &self,
        x: &[f32],
        y: &mut [f32],
        shape: &Shape,
        opts: &BatchNorm<'_>,
        counted: batch_norm::Counted,
    ) -> Result<(BatchStats, Timing), NormError> {
        match self {
            Engine::Cpu(cpu) => cpu.batch_norm_train(x, y, shape, opts, counted).await,
            Engine::Gpu(ctx) => ctx.batch_norm_train(x, y, shape, opts, counted).await,
        }
    }

    /// [`Engine::batch_norm_train`] on tensors of `T`. The CPU fallback takes half tensors in
    /// pieces, each widened in turn; elsewhere they are widened whole and y rounded after.
    async fn batch_norm_train_of<T: Element>(
        &self,
        x: &[T],
        y: &mut [T],
        shape: &Shape,
        opts: &BatchNorm<'_>,
        counted: batch_norm::Counted,
    ) -> Result<(BatchStats, Timing), NormError> {
        if let (Engine::Cpu(_), false) = (self, T::IS_F32) {
            let stats = crate::cpu::batch_norm_train_of(x, y, shape, opts);
            return Ok((stats, Timing::default()));
        }
        let (x, mut y) = (widen(x), OutputOf::new(y));
        let stats = self
            .batch_norm_train(&x, y.values(), shape, opts, counted)
            .await?;
        y.finish();
        Ok(stats)
    }

    /// [`Engine::batch_norm_eval`] on tensors of `T`, as [`Engine::batch_norm_train_of`].
    async fn batch_norm_eval_of<T: Element>(
        &self,
        x: &[T],
        y: &mut [T],
        shape: &Shape,
        opts: &BatchNorm<'_>,
        stats: &RunningStats,
    ) -> Result<Timing, NormError> {
        if let (Engine::Cpu(_), false) = (self, T::IS_F32) {
            crate::cpu::batch_norm_eval_of(x, y, shape, opts, stats);
            return Ok(Timing::default());
        }
        let (x, mut y) = (widen(x), OutputOf::new(y));
        let timing = self
            .batch_norm_eval(&x, y.values(), shape, opts, stats)
            .await?;
        y.finish();
        Ok(timing)
    }

    /// [`Engine::batch_norm_backward`] on tensors of `T`: dx into `dx`, and dgamma and dbeta,
    /// as [`Engine::batch_norm_train_of`].
    async fn batch_norm_backward_of<T: Element>(
        &self,
        (x, dy): (&[T], &[T]),
        shape: &Shape,
        opts: &BatchNorm<'_>,
        counted: batch_norm::Counted,
        dx: &mut [T],
    ) -> Result<(ParamGrads, Timing), NormError> {
        if let (Engine::Cpu(_), false) = (self, T::IS_F32) {
            let (dgamma, dbeta) = crate::cpu::batch_norm_backward_of((x, dy), dx, shape, opts);
            return Ok((ParamGrads { dgamma, dbeta }, Timing::default()));
        }
        let (x, dy, mut dx) = (widen(x), widen(dy), OutputOf::new(dx));
        let (dgamma, dbeta, timing) = self
            .batch_norm_backward((&x, &dy), dx.values(), shape, opts, counted)
            .await?;
        dx.finish();
        Ok((ParamGrads { dgamma, dbeta }, timing))
    }

    async fn batch_norm_backward(
        &self,
        x_dy: (&[f32], &[f32]),
        dx: &mut [f32],
        shape: &Shape,
        opts: &BatchNorm<'_>,
        counted: batch_norm::Counted,
    ) -> Result<(Vec<f32>, Vec<f32>, Timing), NormError> {
        match self {
            Engine::Cpu(cpu) => {
                cpu.batch_norm_backward(x_dy, dx, shape, opts, counted)
                    .await
            }
            Engine::Gpu(ctx) => {
                ctx.batch_norm_backward(x_dy, dx, shape, opts, counted)
                    .await
            }
        }
    }

    async fn batch_norm_eval(
        &self,
        x: &[f32],
        y: &mut [f32],
        shape: &Shape,
        opts: &BatchNorm<'_>,
        stats: &RunningStats,
    ) -> Result<Timing, NormError> {
        match self {
            Engine::Cpu(cpu) => cpu.batch_norm_eval(x, y, shape, opts, stats).await,
            Engine::Gpu(ctx) => ctx.batch_norm_eval(x, y, shape, opts, stats).await,
        }
    }
}

/// The sharded BatchNorm steps, on either backend.
impl Engine {
    async fn partial_stats(
        &self,
        x: &[f32],
        shape: &Shape,
        opts: &BatchNorm<'_>,
    ) -> Result<Vec<ColumnStats>, NormError> {
        match self {
            Engine::Cpu(cpu) => cpu.batch_norm_stats(x, shape, opts).await,
            Engine::Gpu(ctx) => ctx.batch_norm_stats(x, shape, opts).await,
        }
    }

    async fn apply_stats(
        &self,
        x: &[f32],
        y: &mut [f32],
        shape: &Shape,
        opts: &BatchNorm<'_>,
        stats: &[ColumnStats],
    ) -> Result<(), NormError> {
        match self {
            Engine::Cpu(cpu) => cpu.batch_norm_apply(x, y, shape, opts, stats).await,
            Engine::Gpu(ctx) => ctx.batch_norm_apply(x, y, shape, opts, stats).await,
        }
    }

    async fn partial_grads(
        &self,
        x_dy: (&[f32], &[f32]),
        shape: &Shape,
        opts: &BatchNorm<'_>,
        stats: &[ColumnStats],
    ) -> Result<Vec<ColumnGrads>, NormError> {
        match self {
            Engine::Cpu(cpu) => cpu.batch_norm_backward_sums(x_dy, shape, opts, stats).await,
            Engine::Gpu(ctx) => ctx.batch_norm_backward_sums(x_dy, shape, opts, stats).await,
        }
    }

    async fn apply_grads(
        &self,
        x_dy: (&[f32], &[f32]),
        dx: &mut [f32],
        shape: &Shape,
        opts: &BatchNorm<'_>,
        merged: (&[ColumnStats], &[ColumnGrads]),
    ) -> Result<(), NormError> {
        match self {
            Engine::Cpu(cpu) => {
                cpu.batch_norm_backward_apply(x_dy, dx, shape, opts, merged)
                    .await
            }
            Engine::Gpu(ctx) => {
                ctx.batch_norm_backward_apply(x_dy, dx, shape, opts, merged)
                    .await
            }
        }
    }
}

/// Checks merged statistics (and sums) against a shard's shape: the same features, and
/// positions counted.
fn check_merged(
    shape: &Shape,
    stats: &PartialStats,
    grads: Option<&PartialGrads>,
) -> Result<(), NormError> {
    let counts = std::iter::once(shape.channels)
        .chain(std::iter::once(stats.features()))
        .chain(grads.map(PartialGrads::features));
    for (part, features) in counts.enumerate().skip(1) {
        if features != shape.channels {
            return Err(NormError::ShardFeatures {
                part,
                features,
                expected: shape.channels,
            });
        }
    }
    if stats.count() == 0 {
        return Err(NormError::InvalidStats {
            problem: "they count no positions; merge every shard's statistics first",
        });
    }
    Ok(())
}

/// Runs `work` to its end on this thread. Natively the GPU's waits poll the device, so this
/// only parks between them. On the web nothing may block: a future that is not done at once
/// (a GPU op, an adapter request) is refused as [`NormError::NeedsAwait`] and dropped.
fn block_on<T>(
    op: &'static str,
    work: impl Future<Output = Result<T, NormError>>,
) -> Result<T, NormError> {
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = op;
        pollster::block_on(work)
    }
    #[cfg(target_arch = "wasm32")]
    {
        let mut work = std::pin::pin!(work);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match work.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(result) => result,
            std::task::Poll::Pending => Err(NormError::NeedsAwait(op)),
        }
    }
}

impl std::fmt::Debug for Normalizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Normalizer")
            .field("backend", &self.describe())
            .finish()
    }
}

impl Normalizer {
    /// The best backend here: the best hardware GPU adapter wgpu finds (high performance), or
    /// the CPU fallback where there is none. A software adapter (Mesa's llvmpipe, WARP: device
    /// type `Cpu`) runs far slower than the fallback on the same cores, so it is passed over;
    /// [`Normalizer::describe`] says so. Errors only when an adapter exists but cannot be opened.
    ///
    /// The environment variable `GPUNORM_BACKEND` overrides the choice: `cpu` for the fallback,
    /// `gpu` for whatever adapter wgpu finds, software ones included (as [`Normalizer::gpu`]).
    pub fn new() -> Result<Normalizer, NormError> {
        block_on("Normalizer::new", Self::new_async())
    }

    /// [`Normalizer::new`], awaited: the adapter and device requests yield instead of blocking.
    /// On the web this is the way to a GPU (WebGPU); the synchronous `new` cannot wait there.
    pub async fn new_async() -> Result<Normalizer, NormError> {
        let forced = std::env::var(BACKEND_ENV).ok();
        match forced.as_deref().map(str::trim) {
            Some("cpu") => return Ok(Self::cpu()),
            Some("gpu") => return Self::gpu_async().await,
            Some("") | Some("auto") | None => {}
            Some(other) => log::warn!(
                "gpunorm: {BACKEND_ENV}={other:?} is not cpu, gpu or auto; choosing as for auto"
            ),
        }
        let adapter = match GpuContext::adapter().await {
            Ok(adapter) => adapter,
            Err(NormError::NoAdapter(why)) => {
                log::warn!("gpunorm: no GPU adapter ({why}); using the CPU fallback");
                return Ok(Self::cpu());
            }
            Err(e) => return Err(e),
        };
        let info = adapter.get_info();
        if info.device_type == wgpu::DeviceType::Cpu {
            let why = format!(
                "the only GPU adapter, {}, is a software one, slower than the fallback; \
                 {BACKEND_ENV}=gpu uses it",
                info.name
            );
            log::info!("gpunorm: CPU fallback: {why}");
            return Ok(Normalizer {
                engine: Engine::Cpu(Cpu {
                    passed_over: Some(why),
                }),
            });
        }
        Self::open(&adapter).await
    }

    /// A GPU, software adapters included, or [`NormError::NoAdapter`] when wgpu finds none.
    pub fn gpu() -> Result<Normalizer, NormError> {
        block_on("Normalizer::gpu", Self::gpu_async())
    }

    /// [`Normalizer::gpu`], awaited.
    pub async fn gpu_async() -> Result<Normalizer, NormError> {
        Self::open(&GpuContext::adapter().await?).await
    }

    async fn open(adapter: &wgpu::Adapter) -> Result<Normalizer, NormError> {
        let ctx = GpuContext::from_adapter(adapter).await?;
        Ok(Normalizer {
            engine: Engine::Gpu(Box::new(ctx)),
        })
    }

    /// Runs one of the `_async` ops, `op`, to its end on this thread: the synchronous API. On
    /// the web a GPU op is refused ([`NormError::NeedsAwait`]) before it starts.
    fn block<T>(
        &self,
        op: &'static str,
        work: impl Future<Output = Result<T, NormError>>,
    ) -> Result<T, NormError> {
        if cfg!(target_arch = "wasm32") && self.is_gpu() {
            return Err(NormError::NeedsAwait(op));
        }
        block_on(op, work)
    }

    /// The CPU fallback: multithreaded (rayon), same algorithm and tolerances as the GPU.
    pub fn cpu() -> Normalizer {
        Normalizer {
            engine: Engine::Cpu(Cpu { passed_over: None }),
        }
    }

    /// A `Normalizer` on a device and queue the caller already has. Pipelines are built on that
    /// device and picked for what it allows: its limits bound the tensors it takes, workgroup sums
    /// use subgroup operations where it was created with `Features::SUBGROUP` (shared memory
    /// otherwise), and kernel times need `Features::TIMESTAMP_QUERY`.
    pub fn from_wgpu(device: wgpu::Device, queue: wgpu::Queue) -> Normalizer {
        Normalizer {
            engine: Engine::Gpu(Box::new(GpuContext::from_device(device, queue))),
        }
    }

    /// True when ops run on a GPU adapter (which may be a software one such as llvmpipe; see
    /// [`Normalizer::adapter_info`]).
    pub fn is_gpu(&self) -> bool {
        matches!(self.engine, Engine::Gpu(_))
    }

    /// The GPU context, or [`NormError::NotGpu`] naming the operation `what`.
    fn context(&self, what: &'static str) -> Result<&GpuContext, NormError> {
        match &self.engine {
            Engine::Gpu(ctx) => Ok(ctx),
            Engine::Cpu(_) => Err(NormError::NotGpu(what)),
        }
    }

    /// The GPU adapter's name, API, device type and driver; `None` on the CPU fallback.
    pub fn adapter_info(&self) -> Option<wgpu::AdapterInfo> {
        self.wgpu().map(|(device, _)| device.adapter_info())
    }

    /// The device and queue this `Normalizer` runs on, to make buffers for
    /// [`Normalizer::encode_layer_norm`] or to run work of one's own beside it; `None` on the CPU
    /// fallback.
    pub fn wgpu(&self) -> Option<(&wgpu::Device, &wgpu::Queue)> {
        let ctx = self.context("wgpu").ok()?;
        Some((ctx.device(), ctx.queue()))
    }

    /// One line for people: "NVIDIA H100 80GB HBM3 (Vulkan, DiscreteGpu, driver …)" or
    /// "CPU fallback (N threads)", with the reason where [`Normalizer::new`] passed over a
    /// software adapter.
    pub fn describe(&self) -> String {
        match &self.engine {
            Engine::Gpu(ctx) => describe_adapter(&ctx.device().adapter_info()),
            Engine::Cpu(cpu) => {
                let threads = rayon::current_num_threads();
                match &cpu.passed_over {
                    Some(why) => format!("CPU fallback ({threads} threads): {why}"),
                    None => format!("CPU fallback ({threads} threads)"),
                }
            }
        }
    }

    /// Frees the GPU buffers kept for reuse. Calls keep their large buffers (input, output,
    /// staging) in a pool of up to 2 GiB so the next call of the same shape allocates nothing;
    /// call this after a one-off huge batch to give that memory back. No-op on the CPU fallback.
    pub fn release_buffers(&self) {
        if let Ok(ctx) = self.context("release_buffers") {
            ctx.release_buffers();
        }
    }

    /// Whether GPU kernel times can be read ([`Timing::kernel`]).
    pub fn has_kernel_timing(&self) -> bool {
        self.context("timing").is_ok_and(|ctx| ctx.timestamps)
    }

    /// LayerNorm of every `features`-long row of `x` (row-major).
    ///
    /// Errors, with nothing computed, when `features` is 0, `x.len()` is not a multiple of it,
    /// gamma or beta does not have `features` values, or eps is NaN, infinite or negative.
    /// An empty `x` gives an empty output. A NaN or infinity in a row makes that row NaN only.
    ///
    /// It returns a new `Vec`; in a loop, [`Normalizer::layer_norm_into`] into a buffer you
    /// reuse is faster: a fresh output costs the operating system a page fault and a zeroed page
    /// for every page of it, every call.
    pub fn layer_norm<T: Element>(
        &self,
        x: &[T],
        features: usize,
        opts: &LayerNorm<'_>,
    ) -> Result<Vec<T>, NormError> {
        self.block("layer_norm", self.layer_norm_async(x, features, opts))
    }

    /// [`Normalizer::layer_norm`], awaited.
    pub async fn layer_norm_async<T: Element>(
        &self,
        x: &[T],
        features: usize,
        opts: &LayerNorm<'_>,
    ) -> Result<Vec<T>, NormError> {
        layer_norm::validate(x.len(), features, opts)?;
        let mut y = new_output(x.len());
        let op = (opts, RowNorm::Layer);
        self.engine
            .layer_norm_of(x, &mut y, features, op, (None, None))
            .await?;
        Ok(y)
    }

    /// [`Normalizer::layer_norm`] into a buffer the caller owns (and may reuse), `y.len() ==
    /// x.len()`; returns where the time went.
    pub fn layer_norm_into<T: Element>(
        &self,
        x: &[T],
        features: usize,
        opts: &LayerNorm<'_>,
        y: &mut [T],
    ) -> Result<Timing, NormError> {
        let work = self.layer_norm_into_async(x, features, opts, y);
        self.block("layer_norm_into", work)
    }

    /// [`Normalizer::layer_norm_into`], awaited.
    pub async fn layer_norm_into_async<T: Element>(
        &self,
        x: &[T],
        features: usize,
        opts: &LayerNorm<'_>,
        y: &mut [T],
    ) -> Result<Timing, NormError> {
        layer_norm::validate(x.len(), features, opts)?;
        check_output(x, y)?;
        let op = (opts, RowNorm::Layer);
        self.engine
            .layer_norm_of(x, y, features, op, (None, None))
            .await
    }

    /// RMSNorm of every `features`-long row of `x` (row-major): y = x / sqrt(mean(x²) + eps) ·
    /// gamma, the mean square in f64 blocks on the CPU and in a fixed-order reduction on the
    /// GPU, with rows whose mean square leaves f32's range redone exactly (as LayerNorm's are).
    ///
    /// Errors, with nothing computed, when `features` is 0, `x.len()` is not a multiple of it,
    /// gamma does not have `features` values, or eps is NaN, infinite or negative. A NaN makes
    /// its row NaN; an infinity makes its own output NaN and the rest of its row 0 (x / ∞);
    /// other rows are untouched. A row of zeros stays zeros.
    ///
    /// ```
    /// use gpunorm::{Normalizer, RmsNorm};
    /// let y = Normalizer::cpu().rms_norm(&[3.0, 4.0], 2, &RmsNorm { eps: 0.0, gamma: None })?;
    /// // mean(x²) = 12.5, so y = x / 3.5355…
    /// assert!((y[0] - 0.8485).abs() < 1e-4 && (y[1] - 1.1314).abs() < 1e-4);
    /// # Ok::<(), gpunorm::NormError>(())
    /// ```
    pub fn rms_norm<T: Element>(
        &self,
        x: &[T],
        features: usize,
        opts: &RmsNorm<'_>,
    ) -> Result<Vec<T>, NormError> {
        self.block("rms_norm", self.rms_norm_async(x, features, opts))
    }

    /// [`Normalizer::rms_norm`], awaited.
    pub async fn rms_norm_async<T: Element>(
        &self,
        x: &[T],
        features: usize,
        opts: &RmsNorm<'_>,
    ) -> Result<Vec<T>, NormError> {
        rms_norm::validate(x.len(), features, opts)?;
        let mut y = new_output(x.len());
        let (opts, kind) = opts.as_row_norm();
        self.engine
            .layer_norm_of(x, &mut y, features, (&opts, kind), (None, None))
            .await?;
        Ok(y)
    }

    /// [`Normalizer::rms_norm`] into a buffer the caller owns (and may reuse), `y.len() ==
    /// x.len()`; returns where the time went.
    pub fn rms_norm_into<T: Element>(
        &self,
        x: &[T],
        features: usize,
        opts: &RmsNorm<'_>,
        y: &mut [T],
    ) -> Result<Timing, NormError> {
        let work = self.rms_norm_into_async(x, features, opts, y);
        self.block("rms_norm_into", work)
    }

    /// [`Normalizer::rms_norm_into`], awaited.
    pub async fn rms_norm_into_async<T: Element>(
        &self,
        x: &[T],
        features: usize,
        opts: &RmsNorm<'_>,
        y: &mut [T],
    ) -> Result<Timing, NormError> {
        rms_norm::validate(x.len(), features, opts)?;
        check_output(x, y)?;
        let (opts, kind) = opts.as_row_norm();
        let op = (&opts, kind);
        self.engine
            .layer_norm_of(x, y, features, op, (None, None))
            .await
    }

    /// The fused residual add of a transformer block: `sum` = x + residual (each value rounded
    /// to f32 once: the new residual stream) and `y` = LayerNorm of `sum`'s rows, in one pass
    /// over memory (each row is added, written and normalized while in cache).
    ///
    /// Errors as [`Normalizer::layer_norm`] does, and when `residual.len() != x.len()`
    /// ([`NormError::OperandLength`]).
    pub fn add_layer_norm<T: Element>(
        &self,
        x: &[T],
        residual: &[T],
        features: usize,
        opts: &LayerNorm<'_>,
    ) -> Result<AddNormOutput<T>, NormError> {
        let work = self.add_layer_norm_async(x, residual, features, opts);
        self.block("add_layer_norm", work)
    }

    /// [`Normalizer::add_layer_norm`], awaited.
    pub async fn add_layer_norm_async<T: Element>(
        &self,
        x: &[T],
        residual: &[T],
        features: usize,
        opts: &LayerNorm<'_>,
    ) -> Result<AddNormOutput<T>, NormError> {
        self.add_norm(x, residual, features, (opts, RowNorm::Layer))
            .await
    }

    /// [`Normalizer::add_layer_norm`] with RMSNorm: `sum` = x + residual and `y` = RMSNorm of
    /// `sum`'s rows, in one pass over memory. Errors as [`Normalizer::rms_norm`] does, and when
    /// `residual.len() != x.len()`.
    pub fn add_rms_norm<T: Element>(
        &self,
        x: &[T],
        residual: &[T],
        features: usize,
        opts: &RmsNorm<'_>,
    ) -> Result<AddNormOutput<T>, NormError> {
        let work = self.add_rms_norm_async(x, residual, features, opts);
        self.block("add_rms_norm", work)
    }

    /// [`Normalizer::add_rms_norm`], awaited.
    pub async fn add_rms_norm_async<T: Element>(
        &self,
        x: &[T],
        residual: &[T],
        features: usize,
        opts: &RmsNorm<'_>,
    ) -> Result<AddNormOutput<T>, NormError> {
        let (opts, kind) = opts.as_row_norm();
        self.add_norm(x, residual, features, (&opts, kind)).await
    }

    async fn add_norm<T: Element>(
        &self,
        x: &[T],
        residual: &[T],
        features: usize,
        op: (&LayerNorm<'_>, RowNorm),
    ) -> Result<AddNormOutput<T>, NormError> {
        layer_norm::validate(x.len(), features, op.0)?;
        crate::ops::check_operand("residual", residual.len(), x.len())?;
        let (mut sum, mut y) = (new_output(x.len()), new_output(x.len()));
        let add = Some((residual, &mut sum[..]));
        self.engine
            .layer_norm_of(x, &mut y, features, op, (add, None))
            .await?;
        Ok(AddNormOutput { sum, y })
    }

    /// The gradients of [`Normalizer::layer_norm`] with respect to x, gamma and beta, given the
    /// upstream gradient `dy` (one value per value of x). The statistics are recomputed from `x`
    /// (shifted, as the forward computes them). With g = dy · gamma and xhat the normalized
    /// row, dx = (g − mean(g) − xhat · mean(g · xhat)) / sqrt(var + eps) per row; `dgamma` and
    /// `dbeta` (always `features` values: the gradients of a gamma of ones and a beta of zeros
    /// where none is given) sum dy · xhat and dy over the rows, in a fixed order, so GPU results
    /// repeat bit for bit.
    ///
    /// Errors as [`Normalizer::layer_norm`] does, and when `dy.len() != x.len()`
    /// ([`NormError::OperandLength`]).
    pub fn layer_norm_backward<T: Element>(
        &self,
        x: &[T],
        dy: &[T],
        features: usize,
        opts: &LayerNorm<'_>,
    ) -> Result<LayerNormGrads<T>, NormError> {
        let work = self.layer_norm_backward_async(x, dy, features, opts);
        self.block("layer_norm_backward", work)
    }

    /// [`Normalizer::layer_norm_backward`], awaited.
    pub async fn layer_norm_backward_async<T: Element>(
        &self,
        x: &[T],
        dy: &[T],
        features: usize,
        opts: &LayerNorm<'_>,
    ) -> Result<LayerNormGrads<T>, NormError> {
        layer_norm::validate_backward(x.len(), dy.len(), features, opts)?;
        let op = (opts, RowNorm::Layer);
        let (dx, ParamGrads { dgamma, dbeta }) = self
            .engine
            .layer_norm_backward_alloc((x, dy), features, op, None)
            .await?;
        Ok(LayerNormGrads { dx, dgamma, dbeta })
    }

    /// [`Normalizer::layer_norm_backward`] with dx written into a buffer the caller owns,
    /// `dx.len() == x.len()`; returns dgamma and dbeta, and where the time went. In a training
    /// loop, one dx buffer reused step after step spares the fresh memory each new dx costs.
    /// Errors as [`Normalizer::layer_norm_backward`] does, and when `dx` has another length; a
    /// refused call leaves `dx` as it was.
    pub fn layer_norm_backward_into<T: Element>(
        &self,
        x: &[T],
        dy: &[T],
        features: usize,
        opts: &LayerNorm<'_>,
        dx: &mut [T],
    ) -> Result<(ParamGrads, Timing), NormError> {
        let work = self.layer_norm_backward_into_async(x, dy, features, opts, dx);
        self.block("layer_norm_backward_into", work)
    }

    /// [`Normalizer::layer_norm_backward_into`], awaited.
    pub async fn layer_norm_backward_into_async<T: Element>(
        &self,
        x: &[T],
        dy: &[T],
        features: usize,
        opts: &LayerNorm<'_>,
        dx: &mut [T],
    ) -> Result<(ParamGrads, Timing), NormError> {
        layer_norm::validate_backward(x.len(), dy.len(), features, opts)?;
        check_output(x, dx)?;
        let op = (opts, RowNorm::Layer);
        self.engine
            .layer_norm_backward_of((x, dy), dx, features, op, None)
            .await
    }

    /// The gradients of [`Normalizer::rms_norm`] with respect to x and gamma, given the upstream
    /// gradient `dy`. With g = dy · gamma and xhat = x / sqrt(mean(x²) + eps),
    /// dx = (g − xhat · mean(g · xhat)) / sqrt(mean(x²) + eps) per row; `dgamma` (always
    /// `features` values) sums dy · xhat over the rows, in a fixed order.
    ///
    /// Errors as [`Normalizer::rms_norm`] does, and when `dy.len() != x.len()`.
    pub fn rms_norm_backward<T: Element>(
        &self,
        x: &[T],
        dy: &[T],
        features: usize,
        opts: &RmsNorm<'_>,
    ) -> Result<RmsNormGrads<T>, NormError> {
        let work = self.rms_norm_backward_async(x, dy, features, opts);
        self.block("rms_norm_backward", work)
    }

    /// [`Normalizer::rms_norm_backward`], awaited.
    pub async fn rms_norm_backward_async<T: Element>(
        &self,
        x: &[T],
        dy: &[T],
        features: usize,
        opts: &RmsNorm<'_>,
    ) -> Result<RmsNormGrads<T>, NormError> {
        let (opts, kind) = opts.as_row_norm();
        layer_norm::validate_backward(x.len(), dy.len(), features, &opts)?;
        let (dx, ParamGrads { dgamma, .. }) = self
            .engine
            .layer_norm_backward_alloc((x, dy), features, (&opts, kind), None)
            .await?;
        Ok(RmsNormGrads { dx, dgamma })
    }

    /// [`Normalizer::rms_norm_backward`] with dx written into a buffer the caller owns, as
    /// [`Normalizer::layer_norm_backward_into`]; returns dgamma, and where the time went.
    pub fn rms_norm_backward_into<T: Element>(
        &self,
        x: &[T],
        dy: &[T],
        features: usize,
        opts: &RmsNorm<'_>,
        dx: &mut [T],
    ) -> Result<(Vec<f32>, Timing), NormError> {
        let work = self.rms_norm_backward_into_async(x, dy, features, opts, dx);
        self.block("rms_norm_backward_into", work)
    }

    /// [`Normalizer::rms_norm_backward_into`], awaited.
    pub async fn rms_norm_backward_into_async<T: Element>(
        &self,
        x: &[T],
        dy: &[T],
        features: usize,
        opts: &RmsNorm<'_>,
        dx: &mut [T],
    ) -> Result<(Vec<f32>, Timing), NormError> {
        let (opts, kind) = opts.as_row_norm();
        layer_norm::validate_backward(x.len(), dy.len(), features, &opts)?;
        check_output(x, dx)?;
        let (grads, timing) = self
            .engine
            .layer_norm_backward_of((x, dy), dx, features, (&opts, kind), None)
            .await?;
        Ok((grads.dgamma, timing))
    }

    /// [`Normalizer::layer_norm`] that also saves each row's statistics for the backward pass
    /// ([`RowStats`]: per row the mean and rstd, kept as the kernels use them). Hand them to
    /// [`Normalizer::layer_norm_backward_saved`], which then reads each row once fewer instead
    /// of recomputing them. `y` is what `layer_norm` gives: the same bits on the CPU; on a GPU,
    /// within a few ulps of them, since the kernel variant that also writes the statistics is
    /// compiled on its own and a driver may fuse its multiply-adds differently (an H100's
    /// differed by 1–3 ulps). Errors as `layer_norm` does.
    ///
    /// ```
    /// use gpunorm::{LayerNorm, Normalizer};
    /// let norm = Normalizer::cpu();
    /// let (x, dy) = ([1.0, 2.0, 3.0, 4.0, 4.0, 6.0], [0.5, -1.0, 0.25, 1.0, 0.0, -1.0]);
    /// let opts = LayerNorm::default();
    /// let out = norm.layer_norm_saving(&x, 3, &opts)?;
    /// assert_eq!(out.stats.mean(), [2.0, 14.0 / 3.0]);
    /// let grads = norm.layer_norm_backward_saved(&x, &dy, 3, &opts, &out.stats)?;
    /// assert_eq!(grads, norm.layer_norm_backward(&x, &dy, 3, &opts)?);
    /// # Ok::<(), gpunorm::NormError>(())
    /// ```
    pub fn layer_norm_saving<T: Element>(
        &self,
        x: &[T],
        features: usize,
        opts: &LayerNorm<'_>,
    ) -> Result<SavedNormOutput<T>, NormError> {
        let work = self.layer_norm_saving_async(x, features, opts);
        self.block("layer_norm_saving", work)
    }

    /// [`Normalizer::layer_norm_saving`], awaited.
    pub async fn layer_norm_saving_async<T: Element>(
        &self,
        x: &[T],
        features: usize,
        opts: &LayerNorm<'_>,
    ) -> Result<SavedNormOutput<T>, NormError> {
        let rows = layer_norm::validate(x.len(), features, opts)?;
        self.saving(x, rows, features, (opts, RowNorm::Layer)).await
    }

    /// [`Normalizer::rms_norm`] that also saves each row's statistics (its 1 / sqrt(mean(x²) +
    /// eps) as [`RowStats::rstd`]) for [`Normalizer::rms_norm_backward_saved`]. Errors as
    /// `rms_norm` does.
    pub fn rms_norm_saving<T: Element>(
        &self,
        x: &[T],
        features: usize,
        opts: &RmsNorm<'_>,
    ) -> Result<SavedNormOutput<T>, NormError> {
        let work = self.rms_norm_saving_async(x, features, opts);
        self.block("rms_norm_saving", work)
    }

    /// [`Normalizer::rms_norm_saving`], awaited.
    pub async fn rms_norm_saving_async<T: Element>(
        &self,
        x: &[T],
        features: usize,
        opts: &RmsNorm<'_>,
    ) -> Result<SavedNormOutput<T>, NormError> {
        let rows = rms_norm::validate(x.len(), features, opts)?;
        let (opts, kind) = opts.as_row_norm();
        self.saving(x, rows, features, (&opts, kind)).await
    }

    /// The forward pass of `op` saving its statistics.
    async fn saving<T: Element>(
        &self,
        x: &[T],
        rows: usize,
        features: usize,
        op: (&LayerNorm<'_>, RowNorm),
    ) -> Result<SavedNormOutput<T>, NormError> {
        let mut y = new_output(x.len());
        let mut stats = RowStats::new(rows, features, op);
        let out = (None, Some(&mut stats.moments[..]));
        self.engine
            .layer_norm_of(x, &mut y, features, op, out)
            .await?;
        Ok(SavedNormOutput { y, stats })
    }

    /// [`Normalizer::layer_norm_backward`] with each row's statistics taken from a forward
    /// pass's [`RowStats`] ([`Normalizer::layer_norm_saving`], on this backend or another)
    /// instead of recomputed from `x`. Errors as `layer_norm_backward` does, and with
    /// [`NormError::InvalidStats`] where the statistics are not those of this call: another
    /// number of rows or features, RMSNorm's, or another eps.
    pub fn layer_norm_backward_saved<T: Element>(
        &self,
        x: &[T],
        dy: &[T],
        features: usize,
        opts: &LayerNorm<'_>,
        stats: &RowStats,
    ) -> Result<LayerNormGrads<T>, NormError> {
        let work = self.layer_norm_backward_saved_async(x, dy, features, opts, stats);
        self.block("layer_norm_backward_saved", work)
    }

    /// [`Normalizer::layer_norm_backward_saved`], awaited.
    pub async fn layer_norm_backward_saved_async<T: Element>(
        &self,
        x: &[T],
        dy: &[T],
        features: usize,
        opts: &LayerNorm<'_>,
        stats: &RowStats,
    ) -> Result<LayerNormGrads<T>, NormError> {
        let rows = layer_norm::validate_backward(x.len(), dy.len(), features, opts)?;
        let op = (opts, RowNorm::Layer);
        stats.check(rows, features, op)?;
        let (dx, ParamGrads { dgamma, dbeta }) = self
            .engine
            .layer_norm_backward_alloc((x, dy), features, op, Some(&stats.moments))
            .await?;
        Ok(LayerNormGrads { dx, dgamma, dbeta })
    }

    /// [`Normalizer::rms_norm_backward`] with each row's statistics taken from
    /// [`Normalizer::rms_norm_saving`]'s [`RowStats`]. Errors as
    /// [`Normalizer::layer_norm_backward_saved`] does.
    pub fn rms_norm_backward_saved<T: Element>(
        &self,
        x: &[T],
        dy: &[T],
        features: usize,
        opts: &RmsNorm<'_>,
        stats: &RowStats,
    ) -> Result<RmsNormGrads<T>, NormError> {
        let work = self.rms_norm_backward_saved_async(x, dy, features, opts, stats);
        self.block("rms_norm_backward_saved", work)
    }

    /// [`Normalizer::rms_norm_backward_saved`], awaited.
    pub async fn rms_norm_backward_saved_async<T: Element>(
        &self,
        x: &[T],
        dy: &[T],
        features: usize,
        opts: &RmsNorm<'_>,
        stats: &RowStats,
    ) -> Result<RmsNormGrads<T>, NormError> {
        let (opts, kind) = opts.as_row_norm();
        let rows = layer_norm::validate_backward(x.len(), dy.len(), features, &opts)?;
        stats.check(rows, features, (&opts, kind))?;
        let (dx, ParamGrads { dgamma, .. }) = self
            .engine
            .layer_norm_backward_alloc((x, dy), features, (&opts, kind), Some(&stats.moments))
            .await?;
        Ok(RmsNormGrads { dx, dgamma })
    }

    /// BatchNorm in training mode on a features-last `[rows, features]` tensor (a transformer's
    /// `[batch, seq, d_model]` flattened): per-feature mean and biased variance over the rows
    /// where `opts.mask` is true, then y = (x − mean) / sqrt(var + eps) · gamma + beta. Masked
    /// rows are left out of the statistics and written as 0.
    ///
    /// Errors, with nothing computed, on zero features, a length that is not a multiple of
    /// `features`, an empty batch, a mask without one entry per row or with every row masked
    /// out, gamma or beta without one value per feature, and eps NaN, infinite or negative.
    pub fn batch_norm_train<T: Element>(
        &self,
        x: &[T],
        features: usize,
        opts: &BatchNorm<'_>,
    ) -> Result<BatchNormOutput<T>, NormError> {
        let work = self.batch_norm_train_async(x, features, opts);
        self.block("batch_norm_train", work)
    }

    /// [`Normalizer::batch_norm_train`], awaited.
    pub async fn batch_norm_train_async<T: Element>(
        &self,
        x: &[T],
        features: usize,
        opts: &BatchNorm<'_>,
    ) -> Result<BatchNormOutput<T>, NormError> {
        let shape = Shape::features_last(x.len(), features)?;
        self.train_alloc(x, &shape, opts).await
    }

    /// [`Normalizer::batch_norm_train`] into a buffer the caller owns, `y.len() == x.len()`;
    /// returns the batch statistics and where the time went.
    pub fn batch_norm_train_into<T: Element>(
        &self,
        x: &[T],
        features: usize,
        opts: &BatchNorm<'_>,
        y: &mut [T],
    ) -> Result<(BatchStats, Timing), NormError> {
        let work = self.batch_norm_train_into_async(x, features, opts, y);
        self.block("batch_norm_train_into", work)
    }

    /// [`Normalizer::batch_norm_train_into`], awaited.
    pub async fn batch_norm_train_into_async<T: Element>(
        &self,
        x: &[T],
        features: usize,
        opts: &BatchNorm<'_>,
        y: &mut [T],
    ) -> Result<(BatchStats, Timing), NormError> {
        let shape = Shape::features_last(x.len(), features)?;
        self.train(x, &shape, opts, y).await
    }

    /// BatchNorm in eval mode on a features-last tensor: one elementwise pass with the running
    /// statistics, y = (x − running_mean) / sqrt(running_var + eps) · gamma + beta; masked rows
    /// are written as 0. Errors as [`Normalizer::batch_norm_train`] does, and when the running
    /// statistics do not have one mean and one variance (>= 0) per feature.
    pub fn batch_norm_eval<T: Element>(
        &self,
        x: &[T],
        features: usize,
        opts: &BatchNorm<'_>,
        stats: &RunningStats,
    ) -> Result<Vec<T>, NormError> {
        let work = self.batch_norm_eval_async(x, features, opts, stats);
        self.block("batch_norm_eval", work)
    }

    /// [`Normalizer::batch_norm_eval`], awaited.
    pub async fn batch_norm_eval_async<T: Element>(
        &self,
        x: &[T],
        features: usize,
        opts: &BatchNorm<'_>,
        stats: &RunningStats,
    ) -> Result<Vec<T>, NormError> {
        let shape = Shape::features_last(x.len(), features)?;
        self.eval_alloc(x, &shape, opts, stats).await
    }

    /// [`Normalizer::batch_norm_eval`] into a buffer the caller owns, `y.len() == x.len()`.
    pub fn batch_norm_eval_into<T: Element>(
        &self,
        x: &[T],
        features: usize,
        opts: &BatchNorm<'_>,
        stats: &RunningStats,
        y: &mut [T],
    ) -> Result<Timing, NormError> {
        let work = self.batch_norm_eval_into_async(x, features, opts, stats, y);
        self.block("batch_norm_eval_into", work)
    }

    /// [`Normalizer::batch_norm_eval_into`], awaited.
    pub async fn batch_norm_eval_into_async<T: Element>(
        &self,
        x: &[T],
        features: usize,
        opts: &BatchNorm<'_>,
        stats: &RunningStats,
        y: &mut [T],
    ) -> Result<Timing, NormError> {
        let shape = Shape::features_last(x.len(), features)?;
        self.eval(x, &shape, opts, stats, y).await
    }

    /// BatchNorm in training mode on a channels-first `[batch, channels, spatial]` tensor (NCHW
    /// with spatial = H·W, or NCL), what CNN users hand to BatchNorm2d: statistics per channel
    /// over batch × spatial. `opts.mask`, if given, has one entry per (batch, spatial) position,
    /// batch-major. Errors as [`Normalizer::batch_norm_train`] does, and on `spatial` 0.
    pub fn batch_norm_train_channels_first<T: Element>(
        &self,
        x: &[T],
        channels: usize,
        spatial: usize,
        opts: &BatchNorm<'_>,
    ) -> Result<BatchNormOutput<T>, NormError> {
        let work = self.batch_norm_train_channels_first_async(x, channels, spatial, opts);
        self.block("batch_norm_train_channels_first", work)
    }

    /// [`Normalizer::batch_norm_train_channels_first`], awaited.
    pub async fn batch_norm_train_channels_first_async<T: Element>(
        &self,
        x: &[T],
        channels: usize,
        spatial: usize,
        opts: &BatchNorm<'_>,
    ) -> Result<BatchNormOutput<T>, NormError> {
        let shape = Shape::channels_first(x.len(), channels, spatial)?;
        self.train_alloc(x, &shape, opts).await
    }

    /// BatchNorm in eval mode on a channels-first `[batch, channels, spatial]` tensor.
    pub fn batch_norm_eval_channels_first<T: Element>(
        &self,
        x: &[T],
        channels: usize,
        spatial: usize,
        opts: &BatchNorm<'_>,
        stats: &RunningStats,
    ) -> Result<Vec<T>, NormError> {
        let work = self.batch_norm_eval_channels_first_async(x, channels, spatial, opts, stats);
        self.block("batch_norm_eval_channels_first", work)
    }

    /// [`Normalizer::batch_norm_eval_channels_first`], awaited.
    pub async fn batch_norm_eval_channels_first_async<T: Element>(
        &self,
        x: &[T],
        channels: usize,
        spatial: usize,
        opts: &BatchNorm<'_>,
        stats: &RunningStats,
    ) -> Result<Vec<T>, NormError> {
        let shape = Shape::channels_first(x.len(), channels, spatial)?;
        self.eval_alloc(x, &shape, opts, stats).await
    }

    /// [`Normalizer::batch_norm_train_channels_first`] with the shape named: each size is
    /// written beside its name, and the batch is checked with the others against `x`
    /// ([`NormError::ShapeLength`] where batch × channels × spatial is not `x.len()`).
    ///
    /// ```
    /// use gpunorm::{BatchNorm, ChannelsFirst, Normalizer};
    /// let x: Vec<f32> = (0..2 * 3 * 4).map(|v| v as f32).collect();
    /// let shape = ChannelsFirst { batch: 2, channels: 3, spatial: 4 };
    /// let out = Normalizer::cpu().batch_norm_train_nchw(&x, shape, &BatchNorm::default())?;
    /// assert_eq!(out.mean.len(), 3);
    /// # Ok::<(), gpunorm::NormError>(())
    /// ```
    pub fn batch_norm_train_nchw<T: Element>(
        &self,
        x: &[T],
        shape: ChannelsFirst,
        opts: &BatchNorm<'_>,
    ) -> Result<BatchNormOutput<T>, NormError> {
        let work = self.batch_norm_train_nchw_async(x, shape, opts);
        self.block("batch_norm_train_nchw", work)
    }

    /// [`Normalizer::batch_norm_train_nchw`], awaited.
    pub async fn batch_norm_train_nchw_async<T: Element>(
        &self,
        x: &[T],
        shape: ChannelsFirst,
        opts: &BatchNorm<'_>,
    ) -> Result<BatchNormOutput<T>, NormError> {
        self.train_alloc(x, &Shape::named(x.len(), shape)?, opts)
            .await
    }

    /// [`Normalizer::batch_norm_eval_channels_first`] with the shape named (see
    /// [`Normalizer::batch_norm_train_nchw`]).
    pub fn batch_norm_eval_nchw<T: Element>(
        &self,
        x: &[T],
        shape: ChannelsFirst,
        opts: &BatchNorm<'_>,
        stats: &RunningStats,
    ) -> Result<Vec<T>, NormError> {
        let work = self.batch_norm_eval_nchw_async(x, shape, opts, stats);
        self.block("batch_norm_eval_nchw", work)
    }

    /// [`Normalizer::batch_norm_eval_nchw`], awaited.
    pub async fn batch_norm_eval_nchw_async<T: Element>(
        &self,
        x: &[T],
        shape: ChannelsFirst,
        opts: &BatchNorm<'_>,
        stats: &RunningStats,
    ) -> Result<Vec<T>, NormError> {
        self.eval_alloc(x, &Shape::named(x.len(), shape)?, opts, stats)
            .await
    }

    /// The gradients of [`Normalizer::batch_norm_train`] on a features-last tensor with respect
    /// to x, gamma and beta, given the upstream gradient `dy` (one value per value of x): the
    /// gradient through the batch statistics (biased variance), as PyTorch's training-mode
    /// BatchNorm computes it. The statistics are recomputed from `x`. Per feature over the N
    /// counted rows, with xhat the normalized x: `dbeta` = Σ dy, `dgamma` = Σ dy · xhat, and
    /// dx = gamma / sqrt(var + eps) · (dy − dbeta / N − xhat · dgamma / N). With a mask, masked
    /// rows get dx = 0 and add nothing to the sums: whatever they hold in x or dy changes no
    /// other output, bit for bit. `dgamma` and `dbeta` always have one value per feature.
    ///
    /// Errors as [`Normalizer::batch_norm_train`] does, and when `dy.len() != x.len()`.
    pub fn batch_norm_backward<T: Element>(
        &self,
        x: &[T],
        dy: &[T],
        features: usize,
        opts: &BatchNorm<'_>,
    ) -> Result<BatchNormGrads<T>, NormError> {
        let work = self.batch_norm_backward_async(x, dy, features, opts);
        self.block("batch_norm_backward", work)
    }

    /// [`Normalizer::batch_norm_backward`], awaited.
    pub async fn batch_norm_backward_async<T: Element>(
        &self,
        x: &[T],
        dy: &[T],
        features: usize,
        opts: &BatchNorm<'_>,
    ) -> Result<BatchNormGrads<T>, NormError> {
        let shape = Shape::features_last(x.len(), features)?;
        self.backward(x, dy, &shape, opts).await
    }

    /// [`Normalizer::batch_norm_backward`] with dx written into a buffer the caller owns,
    /// `dx.len() == x.len()`; returns dgamma and dbeta, and where the time went. In a training
    /// loop, one dx buffer reused step after step spares the fresh memory each new dx costs (on
    /// the CPU fallback, the operating system zeroing its pages). Errors as
    /// [`Normalizer::batch_norm_backward`] does, and when `dx` has another length; a refused call
    /// leaves `dx` as it was.
    pub fn batch_norm_backward_into<T: Element>(
        &self,
        x: &[T],
        dy: &[T],
        features: usize,
        opts: &BatchNorm<'_>,
        dx: &mut [T],
    ) -> Result<(ParamGrads, Timing), NormError> {
        let work = self.batch_norm_backward_into_async(x, dy, features, opts, dx);
        self.block("batch_norm_backward_into", work)
    }

    /// [`Normalizer::batch_norm_backward_into`], awaited.
    pub async fn batch_norm_backward_into_async<T: Element>(
        &self,
        x: &[T],
        dy: &[T],
        features: usize,
        opts: &BatchNorm<'_>,
        dx: &mut [T],
    ) -> Result<(ParamGrads, Timing), NormError> {
        let shape = Shape::features_last(x.len(), features)?;
        self.backward_into(x, dy, &shape, opts, dx).await
    }

    /// [`Normalizer::batch_norm_backward`] on a channels-first `[batch, channels, spatial]`
    /// tensor (as [`Normalizer::batch_norm_train_channels_first`]): per-channel gradients over
    /// batch × spatial.
    pub fn batch_norm_backward_channels_first<T: Element>(
        &self,
        x: &[T],
        dy: &[T],
        channels: usize,
        spatial: usize,
        opts: &BatchNorm<'_>,
    ) -> Result<BatchNormGrads<T>, NormError> {
        let work = self.batch_norm_backward_channels_first_async(x, dy, channels, spatial, opts);
        self.block("batch_norm_backward_channels_first", work)
    }

    /// [`Normalizer::batch_norm_backward_channels_first`], awaited.
    pub async fn batch_norm_backward_channels_first_async<T: Element>(
        &self,
        x: &[T],
        dy: &[T],
        channels: usize,
        spatial: usize,
        opts: &BatchNorm<'_>,
    ) -> Result<BatchNormGrads<T>, NormError> {
        let shape = Shape::channels_first(x.len(), channels, spatial)?;
        self.backward(x, dy, &shape, opts).await
    }

    /// [`Normalizer::batch_norm_backward_channels_first`] with the shape named (see
    /// [`Normalizer::batch_norm_train_nchw`]).
    pub fn batch_norm_backward_nchw<T: Element>(
        &self,
        x: &[T],
        dy: &[T],
        shape: ChannelsFirst,
        opts: &BatchNorm<'_>,
    ) -> Result<BatchNormGrads<T>, NormError> {
        let work = self.batch_norm_backward_nchw_async(x, dy, shape, opts);
        self.block("batch_norm_backward_nchw", work)
    }

    /// [`Normalizer::batch_norm_backward_nchw`], awaited.
    pub async fn batch_norm_backward_nchw_async<T: Element>(
        &self,
        x: &[T],
        dy: &[T],
        shape: ChannelsFirst,
        opts: &BatchNorm<'_>,
    ) -> Result<BatchNormGrads<T>, NormError> {
        self.backward(x, dy, &Shape::named(x.len(), shape)?, opts)
            .await
    }

    async fn backward<T: Element>(
        &self,
        x: &[T],
        dy: &[T],
        shape: &Shape,
        opts: &BatchNorm<'_>,
    ) -> Result<BatchNormGrads<T>, NormError> {
        let mut dx = new_output(x.len());
        let (ParamGrads { dgamma, dbeta }, _) =
            self.backward_into(x, dy, shape, opts, &mut dx).await?;
        Ok(BatchNormGrads { dx, dgamma, dbeta })
    }

    async fn backward_into<T: Element>(
        &self,
        x: &[T],
        dy: &[T],
        shape: &Shape,
        opts: &BatchNorm<'_>,
        dx: &mut [T],
    ) -> Result<(ParamGrads, Timing), NormError> {
        let counted = batch_norm::validate_training(shape, opts)?;
        crate::ops::check_operand("dy", dy.len(), x.len())?;
        check_output(x, dx)?;
        self.engine
            .batch_norm_backward_of((x, dy), shape, opts, counted, dx)
            .await
    }

    async fn train_alloc<T: Element>(
        &self,
        x: &[T],
        shape: &Shape,
        opts: &BatchNorm<'_>,
    ) -> Result<BatchNormOutput<T>, NormError> {
        let counted = batch_norm::validate_training(shape, opts)?;
        let mut y = new_output(x.len());
        let (stats, _) = self
            .engine
            .batch_norm_train_of(x, &mut y, shape, opts, counted)
            .await?;
        Ok(BatchNormOutput {
            y,
            mean: stats.mean,
            var: stats.var,
            count: stats.count,
        })
    }

    async fn train<T: Element>(
        &self,
        x: &[T],
        shape: &Shape,
        opts: &BatchNorm<'_>,
        y: &mut [T],
    ) -> Result<(BatchStats, Timing), NormError> {
        let counted = batch_norm::validate_training(shape, opts)?;
        check_output(x, y)?;
        self.engine
            .batch_norm_train_of(x, y, shape, opts, counted)
            .await
    }

    async fn eval_alloc<T: Element>(
        &self,
        x: &[T],
        shape: &Shape,
        opts: &BatchNorm<'_>,
        stats: &RunningStats,
    ) -> Result<Vec<T>, NormError> {
        batch_norm::validate(shape, opts)?;
        batch_norm::validate_stats(shape, stats)?;
        let mut y = new_output(x.len());
        self.engine
            .batch_norm_eval_of(x, &mut y, shape, opts, stats)
            .await?;
        Ok(y)
    }

    async fn eval<T: Element>(
        &self,
        x: &[T],
        shape: &Shape,
        opts: &BatchNorm<'_>,
        stats: &RunningStats,
        y: &mut [T],
    ) -> Result<Timing, NormError> {
        batch_norm::validate(shape, opts)?;
        batch_norm::validate_stats(shape, stats)?;
        check_output(x, y)?;
        self.engine
            .batch_norm_eval_of(x, y, shape, opts, stats)
            .await
    }

    /// BatchNorm statistics of one shard of a batch (features-last), without normalizing it:
    /// per feature, the count, shift, mean and M2 of its counted rows. Merge every shard's with
    /// [`PartialStats::merge`] (the same order on every shard), then normalize each shard with
    /// [`Normalizer::batch_norm_apply`]: SyncBatchNorm, across GPUs, processes or machines. A
    /// shard whose rows are all masked has count 0 and still takes part.
    ///
    /// Errors as [`Normalizer::batch_norm_train`] does, but for a fully masked shard, which is
    /// allowed; an empty shard (no rows) is an error.
    ///
    /// ```
    /// use gpunorm::{BatchNorm, Normalizer, PartialStats};
    /// let norm = Normalizer::cpu();
    /// let batch: Vec<f32> = (0..8 * 3).map(|v| v as f32).collect();
    /// let (a, b) = batch.split_at(5 * 3); // two shards of one batch
    /// let opts = BatchNorm::default();
    /// let parts = [norm.batch_norm_stats(a, 3, &opts)?, norm.batch_norm_stats(b, 3, &opts)?];
    /// let merged = PartialStats::merge(&parts)?;
    /// let y_a = norm.batch_norm_apply(a, 3, &opts, &merged)?;
    /// let whole = norm.batch_norm_train(&batch, 3, &opts)?;
    /// assert!(y_a.iter().zip(&whole.y).all(|(p, q)| (p - q).abs() < 1e-5));
    /// # Ok::<(), gpunorm::NormError>(())
    /// ```
    pub fn batch_norm_stats<T: Element>(
        &self,
        x: &[T],
        features: usize,
        opts: &BatchNorm<'_>,
    ) -> Result<PartialStats, NormError> {
        self.block(
            "batch_norm_stats",
            self.batch_norm_stats_async(x, features, opts),
        )
    }

    /// [`Normalizer::batch_norm_stats`], awaited.
    pub async fn batch_norm_stats_async<T: Element>(
        &self,
        x: &[T],
        features: usize,
        opts: &BatchNorm<'_>,
    ) -> Result<PartialStats, NormError> {
        let shape = Shape::features_last(x.len(), features)?;
        batch_norm::validate(&shape, opts)?;
        let columns = self.engine.partial_stats(&widen(x), &shape, opts).await?;
        Ok(PartialStats { columns })
    }

    /// BatchNorm's output for one shard with given statistics (merged from every shard's
    /// [`Normalizer::batch_norm_stats`]): y = (x − mean) / sqrt(var + eps) · gamma + beta,
    /// masked rows 0. Errors as [`Normalizer::batch_norm_eval`] does, when the statistics have
    /// another feature count ([`NormError::ShardFeatures`]) or count no position
    /// ([`NormError::InvalidStats`]).
    pub fn batch_norm_apply<T: Element>(
        &self,
        x: &[T],
        features: usize,
        opts: &BatchNorm<'_>,
        stats: &PartialStats,
    ) -> Result<Vec<T>, NormError> {
        let work = self.batch_norm_apply_async(x, features, opts, stats);
        self.block("batch_norm_apply", work)
    }

    /// [`Normalizer::batch_norm_apply`], awaited.
    pub async fn batch_norm_apply_async<T: Element>(
        &self,
        x: &[T],
        features: usize,
        opts: &BatchNorm<'_>,
        stats: &PartialStats,
    ) -> Result<Vec<T>, NormError> {
        let shape = Shape::features_last(x.len(), features)?;
        batch_norm::validate(&shape, opts)?;
        check_merged(&shape, stats, None)?;
        let mut y = new_output(x.len());
        let stats = &stats.columns;
        self.engine
            .apply_stats(&widen(x), &mut y, &shape, opts, stats)
            .await?;
        Ok(narrow(y))
    }

    /// The backward pass's sums for one shard, Σ dy and Σ dy · xhat per feature over its
    /// counted rows, given the merged statistics of the forward. Merge every shard's with
    /// [`PartialGrads::merge`], then [`Normalizer::batch_norm_backward_apply`] gives each
    /// shard's dx. Errors as [`Normalizer::batch_norm_apply`] does, and when `dy.len() !=
    /// x.len()`.
    pub fn batch_norm_backward_sums<T: Element>(
        &self,
        x: &[T],
        dy: &[T],
        features: usize,
        opts: &BatchNorm<'_>,
        stats: &PartialStats,
    ) -> Result<PartialGrads, NormError> {
        let work = self.batch_norm_backward_sums_async(x, dy, features, opts, stats);
        self.block("batch_norm_backward_sums", work)
    }

    /// [`Normalizer::batch_norm_backward_sums`], awaited.
    pub async fn batch_norm_backward_sums_async<T: Element>(
        &self,
        x: &[T],
        dy: &[T],
        features: usize,
        opts: &BatchNorm<'_>,
        stats: &PartialStats,
    ) -> Result<PartialGrads, NormError> {
        let shape = Shape::features_last(x.len(), features)?;
        batch_norm::validate(&shape, opts)?;
        crate::ops::check_operand("dy", dy.len(), x.len())?;
        check_merged(&shape, stats, None)?;
        let (x, dy) = (widen(x), widen(dy));
        let columns = self
            .engine
            .partial_grads((&x, &dy), &shape, opts, &stats.columns)
            .await?;
        Ok(PartialGrads { columns })
    }

    /// One shard's gradients from the merged statistics and sums: its dx (0 on masked rows), and
    /// the whole batch's dgamma (Σ dy · xhat) and dbeta (Σ dy) from `grads`. Errors as
    /// [`Normalizer::batch_norm_backward_sums`] does, and on sums of another feature count.
    pub fn batch_norm_backward_apply<T: Element>(
        &self,
        x: &[T],
        dy: &[T],
        features: usize,
        opts: &BatchNorm<'_>,
        stats: &PartialStats,
        grads: &PartialGrads,
    ) -> Result<BatchNormGrads<T>, NormError> {
        let work = self.batch_norm_backward_apply_async(x, dy, features, opts, stats, grads);
        self.block("batch_norm_backward_apply", work)
    }

    /// [`Normalizer::batch_norm_backward_apply`], awaited.
    pub async fn batch_norm_backward_apply_async<T: Element>(
        &self,
        x: &[T],
        dy: &[T],
        features: usize,
        opts: &BatchNorm<'_>,
        stats: &PartialStats,
        grads: &PartialGrads,
    ) -> Result<BatchNormGrads<T>, NormError> {
        let shape = Shape::features_last(x.len(), features)?;
        batch_norm::validate(&shape, opts)?;
        crate::ops::check_operand("dy", dy.len(), x.len())?;
        check_merged(&shape, stats, Some(grads))?;
        let (x, dy) = (widen(x), widen(dy));
        let mut dx = new_output(x.len());
        let merged = (&stats.columns[..], &grads.columns[..]);
        self.engine
            .apply_grads((&x, &dy), &mut dx, &shape, opts, merged)
            .await?;
        Ok(BatchNormGrads {
            dx: narrow(dx),
            dgamma: grads.columns.iter().map(|g| g.sum_dy_xhat as f32).collect(),
            dbeta: grads.columns.iter().map(|g| g.sum_dy as f32).collect(),
        })
    }

    /// Copies f32 `data` into a new GPU tensor. Errors on the CPU fallback
    /// ([`NormError::NotGpu`]) and when the data exceeds one binding of this device.
    /// [`Normalizer::upload_typed`] uploads f16 and bf16 values as they are.
    pub fn upload(&self, data: &[f32]) -> Result<GpuTensor, NormError> {
        self.block("upload", self.upload_async(data))
    }

    /// [`Normalizer::upload`], awaited.
    pub async fn upload_async(&self, data: &[f32]) -> Result<GpuTensor, NormError> {
        self.upload_typed_async(data).await
    }

    /// [`Normalizer::upload`] of rows `features` wide: the tensor keeps its width, and an op
    /// given another one refuses it ([`NormError::TensorShape`]). Errors as `upload`, and where
    /// `data` is not whole rows.
    pub fn upload_rows(&self, data: &[f32], features: usize) -> Result<GpuTensor, NormError> {
        self.block("upload_rows", self.upload_rows_async(data, features))
    }

    /// [`Normalizer::upload_rows`], awaited.
    pub async fn upload_rows_async(
        &self,
        data: &[f32],
        features: usize,
    ) -> Result<GpuTensor, NormError> {
        self.upload_rows_typed_async(data, features).await
    }

    /// Copies `data` into a new GPU tensor of its own element type ([`GpuTensor::element_type`]):
    /// f32, or f16 and bf16 as they are, half the bytes across the bus and on the device. Ops
    /// on it return tensors of the same type. Errors as [`Normalizer::upload`].
    ///
    /// ```no_run
    /// use gpunorm::half::f16;
    /// use gpunorm::{ElementType, LayerNorm, Normalizer};
    /// # fn main() -> Result<(), gpunorm::NormError> {
    /// let norm = Normalizer::gpu()?;
    /// let x: Vec<f16> = (0..8).map(|i| f16::from_f32(i as f32)).collect();
    /// let t = norm.upload_rows_typed(&x, 4)?;
    /// let y = norm.layer_norm_gpu(&t, 4, &LayerNorm::default())?;
    /// assert_eq!(y.element_type(), ElementType::F16);
    /// let y: Vec<f16> = norm.download_as(&y)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn upload_typed<T: Element>(&self, data: &[T]) -> Result<GpuTensor, NormError> {
        self.block("upload_typed", self.upload_typed_async(data))
    }

    /// [`Normalizer::upload_typed`], awaited.
    pub async fn upload_typed_async<T: Element>(&self, data: &[T]) -> Result<GpuTensor, NormError> {
        let ctx = self.context("upload")?;
        ctx.call(tensor::upload(ctx, data, None)).await
    }

    /// [`Normalizer::upload_typed`] of rows `features` wide, as [`Normalizer::upload_rows`].
    pub fn upload_rows_typed<T: Element>(
        &self,
        data: &[T],
        features: usize,
    ) -> Result<GpuTensor, NormError> {
        let work = self.upload_rows_typed_async(data, features);
        self.block("upload_rows_typed", work)
    }

    /// [`Normalizer::upload_rows_typed`], awaited.
    pub async fn upload_rows_typed_async<T: Element>(
        &self,
        data: &[T],
        features: usize,
    ) -> Result<GpuTensor, NormError> {
        let ctx = self.context("upload_rows")?;
        crate::ops::rows_of(data.len(), features)?;
        ctx.call(tensor::upload(ctx, data, Some(features))).await
    }

    /// Reads a GPU tensor back as f32 (waits for the work that writes it); a half tensor moves
    /// its own bytes and is widened on the host, exactly. [`Normalizer::download_as`] reads it
    /// as its own type.
    pub fn download(&self, tensor: &GpuTensor) -> Result<Vec<f32>, NormError> {
        self.block("download", self.download_async(tensor))
    }

    /// [`Normalizer::download`], awaited.
    pub async fn download_async(&self, tensor: &GpuTensor) -> Result<Vec<f32>, NormError> {
        self.download_as_async(tensor).await
    }

    /// Reads a GPU tensor back as `T` (waits for the work that writes it): its values as they
    /// are where `T` is its [`element_type`](GpuTensor::element_type), else converted on the
    /// host (widened exactly, or rounded once to nearest). See [`Normalizer::upload_typed`].
    pub fn download_as<T: Element>(&self, tensor: &GpuTensor) -> Result<Vec<T>, NormError> {
        self.block("download_as", self.download_as_async(tensor))
    }

    /// [`Normalizer::download_as`], awaited.
    pub async fn download_as_async<T: Element>(
        &self,
        tensor: &GpuTensor,
    ) -> Result<Vec<T>, NormError> {
        let ctx = self.context("download")?;
        ctx.call(tensor::download(ctx, tensor)).await
    }

    /// [`Normalizer::layer_norm`] on a GPU tensor, into a new GPU tensor; nothing crosses to the
    /// host and nothing waits, so ops chain. Same errors as `layer_norm`, plus
    /// [`NormError::NotGpu`] on the CPU fallback.
    pub fn layer_norm_gpu(
        &self,
        x: &GpuTensor,
        features: usize,
        opts: &LayerNorm<'_>,
    ) -> Result<GpuTensor, NormError> {
        let work = self.layer_norm_gpu_async(x, features, opts);
        self.block("layer_norm_gpu", work)
    }

    /// [`Normalizer::layer_norm_gpu`], awaited (for the pipeline's first build and wgpu's
    /// error report; the GPU work itself is not waited for).
    pub async fn layer_norm_gpu_async(
        &self,
        x: &GpuTensor,
        features: usize,
        opts: &LayerNorm<'_>,
    ) -> Result<GpuTensor, NormError> {
        let ctx = self.context("layer_norm_gpu")?;
        let rows = layer_norm::validate(x.len(), features, opts)?;
        let op = (opts, RowNorm::Layer);
        let (y, ..) = ctx
            .call(tensor::layer_norm(
                ctx,
                (x, None),
                (rows, features),
                op,
                false,
            ))
            .await?;
        Ok(y)
    }

    /// [`Normalizer::rms_norm`] on a GPU tensor, into a new GPU tensor; nothing crosses to the
    /// host and nothing waits, so ops chain. Same errors as `rms_norm`, plus
    /// [`NormError::NotGpu`] on the CPU fallback.
    pub fn rms_norm_gpu(
        &self,
        x: &GpuTensor,
        features: usize,
        opts: &RmsNorm<'_>,
    ) -> Result<GpuTensor, NormError> {
        let work = self.rms_norm_gpu_async(x, features, opts);
        self.block("rms_norm_gpu", work)
    }

    /// [`Normalizer::rms_norm_gpu`], awaited (as [`Normalizer::layer_norm_gpu_async`]).
    pub async fn rms_norm_gpu_async(
        &self,
        x: &GpuTensor,
        features: usize,
        opts: &RmsNorm<'_>,
    ) -> Result<GpuTensor, NormError> {
        let ctx = self.context("rms_norm_gpu")?;
        let rows = rms_norm::validate(x.len(), features, opts)?;
        let (opts, kind) = opts.as_row_norm();
        let op = (&opts, kind);
        let (y, ..) = ctx
            .call(tensor::layer_norm(
                ctx,
                (x, None),
                (rows, features),
                op,
                false,
            ))
            .await?;
        Ok(y)
    }

    /// [`Normalizer::add_layer_norm`] on GPU tensors, into new GPU tensors, without waiting.
    /// Same errors as `add_layer_norm`, plus [`NormError::NotGpu`] on the CPU fallback.
    pub fn add_layer_norm_gpu(
        &self,
        x: &GpuTensor,
        residual: &GpuTensor,
        features: usize,
        opts: &LayerNorm<'_>,
    ) -> Result<GpuAddNormOutput, NormError> {
        let work = self.add_layer_norm_gpu_async(x, residual, features, opts);
        self.block("add_layer_norm_gpu", work)
    }

    /// [`Normalizer::add_layer_norm_gpu`], awaited (as [`Normalizer::layer_norm_gpu_async`]).
    pub async fn add_layer_norm_gpu_async(
        &self,
        x: &GpuTensor,
        residual: &GpuTensor,
        features: usize,
        opts: &LayerNorm<'_>,
    ) -> Result<GpuAddNormOutput, NormError> {
        let op = (opts, RowNorm::Layer);
        self.add_norm_gpu("add_layer_norm_gpu", (x, residual), features, op)
            .await
    }

    /// [`Normalizer::add_rms_norm`] on GPU tensors, into new GPU tensors, without waiting.
    /// Same errors as `add_rms_norm`, plus [`NormError::NotGpu`] on the CPU fallback.
    pub fn add_rms_norm_gpu(
        &self,
        x: &GpuTensor,
        residual: &GpuTensor,
        features: usize,
        opts: &RmsNorm<'_>,
    ) -> Result<GpuAddNormOutput, NormError> {
        let work = self.add_rms_norm_gpu_async(x, residual, features, opts);
        self.block("add_rms_norm_gpu", work)
    }

    /// [`Normalizer::add_rms_norm_gpu`], awaited (as [`Normalizer::layer_norm_gpu_async`]).
    pub async fn add_rms_norm_gpu_async(
        &self,
        x: &GpuTensor,
        residual: &GpuTensor,
        features: usize,
        opts: &RmsNorm<'_>,
    ) -> Result<GpuAddNormOutput, NormError> {
        let (opts, kind) = opts.as_row_norm();
        self.add_norm_gpu("add_rms_norm_gpu", (x, residual), features, (&opts, kind))
            .await
    }

    async fn add_norm_gpu(
        &self,
        name: &'static str,
        (x, residual): (&GpuTensor, &GpuTensor),
        features: usize,
        op: (&LayerNorm<'_>, RowNorm),
    ) -> Result<GpuAddNormOutput, NormError> {
        let ctx = self.context(name)?;
        let rows = layer_norm::validate(x.len(), features, op.0)?;
        crate::ops::check_operand("residual", residual.len(), x.len())?;
        let io = (x, Some(residual));
        let (y, sum, _) = ctx
            .call(tensor::layer_norm(ctx, io, (rows, features), op, false))
            .await?;
        let sum = sum.expect("made with a residual");
        Ok(GpuAddNormOutput { sum, y })
    }

    /// [`Normalizer::layer_norm_backward`] on GPU tensors: dx, dgamma and dbeta in new GPU
    /// tensors, recorded in one submission without waiting, so a training step stays on the
    /// device. Same errors as `layer_norm_backward`, plus [`NormError::NotGpu`] on the CPU
    /// fallback.
    pub fn layer_norm_backward_gpu(
        &self,
        x: &GpuTensor,
        dy: &GpuTensor,
        features: usize,
        opts: &LayerNorm<'_>,
    ) -> Result<GpuGrads, NormError> {
        let work = self.layer_norm_backward_gpu_async(x, dy, features, opts);
        self.block("layer_norm_backward_gpu", work)
    }

    /// [`Normalizer::layer_norm_backward_gpu`], awaited (as
    /// [`Normalizer::layer_norm_gpu_async`]).
    pub async fn layer_norm_backward_gpu_async(
        &self,
        x: &GpuTensor,
        dy: &GpuTensor,
        features: usize,
        opts: &LayerNorm<'_>,
    ) -> Result<GpuGrads, NormError> {
        let op = (opts, RowNorm::Layer);
        self.backward_gpu("layer_norm_backward_gpu", (x, dy), features, op)
            .await
    }

    /// [`Normalizer::rms_norm_backward`] on GPU tensors: dx and dgamma in new GPU tensors,
    /// without waiting. Same errors as `rms_norm_backward`, plus [`NormError::NotGpu`].
    pub fn rms_norm_backward_gpu(
        &self,
        x: &GpuTensor,
        dy: &GpuTensor,
        features: usize,
        opts: &RmsNorm<'_>,
    ) -> Result<GpuRmsNormGrads, NormError> {
        let work = self.rms_norm_backward_gpu_async(x, dy, features, opts);
        self.block("rms_norm_backward_gpu", work)
    }

    /// [`Normalizer::rms_norm_backward_gpu`], awaited (as [`Normalizer::layer_norm_gpu_async`]).
    pub async fn rms_norm_backward_gpu_async(
        &self,
        x: &GpuTensor,
        dy: &GpuTensor,
        features: usize,
        opts: &RmsNorm<'_>,
    ) -> Result<GpuRmsNormGrads, NormError> {
        let (opts, kind) = opts.as_row_norm();
        let op = (&opts, kind);
        let grads = self
            .backward_gpu("rms_norm_backward_gpu", (x, dy), features, op)
            .await?;
        Ok(GpuRmsNormGrads {
            dx: grads.dx,
            dgamma: grads.dgamma,
        })
    }

    async fn backward_gpu(
        &self,
        name: &'static str,
        (x, dy): (&GpuTensor, &GpuTensor),
        features: usize,
        op: (&LayerNorm<'_>, RowNorm),
    ) -> Result<GpuGrads, NormError> {
        self.backward_gpu_of(name, (x, dy), features, op, None)
            .await
    }

    /// [`Normalizer::backward_gpu`] through saved statistics where given.
    async fn backward_gpu_of(
        &self,
        name: &'static str,
        x_dy: (&GpuTensor, &GpuTensor),
        features: usize,
        op: (&LayerNorm<'_>, RowNorm),
        saved: Option<&GpuRowStats>,
    ) -> Result<GpuGrads, NormError> {
        let ctx = self.context(name)?;
        let rows = layer_norm::validate_backward(x_dy.0.len(), x_dy.1.len(), features, op.0)?;
        let shape = (rows, features);
        ctx.call(tensor::layer_norm_backward(ctx, x_dy, shape, op, saved))
            .await
    }

    /// [`Normalizer::layer_norm_saving`] on a GPU tensor: y and each row's statistics stay on
    /// the device, for [`Normalizer::layer_norm_backward_gpu_saved`]; nothing waits. Same errors
    /// as `layer_norm_gpu`.
    pub fn layer_norm_gpu_saving(
        &self,
        x: &GpuTensor,
        features: usize,
        opts: &LayerNorm<'_>,
    ) -> Result<GpuSavedNormOutput, NormError> {
        let work = self.layer_norm_gpu_saving_async(x, features, opts);
        self.block("layer_norm_gpu_saving", work)
    }

    /// [`Normalizer::layer_norm_gpu_saving`], awaited (as [`Normalizer::layer_norm_gpu_async`]).
    pub async fn layer_norm_gpu_saving_async(
        &self,
        x: &GpuTensor,
        features: usize,
        opts: &LayerNorm<'_>,
    ) -> Result<GpuSavedNormOutput, NormError> {
        let rows = layer_norm::validate(x.len(), features, opts)?;
        self.saving_gpu(
            "layer_norm_gpu_saving",
            x,
            (rows, features),
            (opts, RowNorm::Layer),
        )
        .await
    }

    /// [`Normalizer::rms_norm_saving`] on a GPU tensor, for
    /// [`Normalizer::rms_norm_backward_gpu_saved`]. Same errors as `rms_norm_gpu`.
    pub fn rms_norm_gpu_saving(
        &self,
        x: &GpuTensor,
        features: usize,
        opts: &RmsNorm<'_>,
    ) -> Result<GpuSavedNormOutput, NormError> {
        let work = self.rms_norm_gpu_saving_async(x, features, opts);
        self.block("rms_norm_gpu_saving", work)
    }

    /// [`Normalizer::rms_norm_gpu_saving`], awaited (as [`Normalizer::layer_norm_gpu_async`]).
    pub async fn rms_norm_gpu_saving_async(
        &self,
        x: &GpuTensor,
        features: usize,
        opts: &RmsNorm<'_>,
    ) -> Result<GpuSavedNormOutput, NormError> {
        let rows = rms_norm::validate(x.len(), features, opts)?;
        let (opts, kind) = opts.as_row_norm();
        self.saving_gpu("rms_norm_gpu_saving", x, (rows, features), (&opts, kind))
            .await
    }

    /// A row op on a GPU tensor, saving its statistics.
    async fn saving_gpu(
        &self,
        name: &'static str,
        x: &GpuTensor,
        shape: (usize, usize),
        op: (&LayerNorm<'_>, RowNorm),
    ) -> Result<GpuSavedNormOutput, NormError> {
        let ctx = self.context(name)?;
        let (y, _, stats) = ctx
            .call(tensor::layer_norm(ctx, (x, None), shape, op, true))
            .await?;
        let stats = stats.expect("made saving");
        Ok(GpuSavedNormOutput { y, stats })
    }

    /// [`Normalizer::layer_norm_backward_saved`] on GPU tensors, with the statistics
    /// [`Normalizer::layer_norm_gpu_saving`] left on the device: no readback, no wait. Same
    /// errors as `layer_norm_backward_saved`, and [`NormError::InvalidBuffer`] for statistics
    /// of another `Normalizer`.
    pub fn layer_norm_backward_gpu_saved(
        &self,
        x: &GpuTensor,
        dy: &GpuTensor,
        features: usize,
        opts: &LayerNorm<'_>,
        stats: &GpuRowStats,
    ) -> Result<GpuGrads, NormError> {
        let work = self.layer_norm_backward_gpu_saved_async(x, dy, features, opts, stats);
        self.block("layer_norm_backward_gpu_saved", work)
    }

    /// [`Normalizer::layer_norm_backward_gpu_saved`], awaited (as
    /// [`Normalizer::layer_norm_gpu_async`]).
    pub async fn layer_norm_backward_gpu_saved_async(
        &self,
        x: &GpuTensor,
        dy: &GpuTensor,
        features: usize,
        opts: &LayerNorm<'_>,
        stats: &GpuRowStats,
    ) -> Result<GpuGrads, NormError> {
        let op = (opts, RowNorm::Layer);
        let name = "layer_norm_backward_gpu_saved";
        self.backward_gpu_of(name, (x, dy), features, op, Some(stats))
            .await
    }

    /// [`Normalizer::rms_norm_backward_saved`] on GPU tensors, with the statistics of
    /// [`Normalizer::rms_norm_gpu_saving`]. Errors as
    /// [`Normalizer::layer_norm_backward_gpu_saved`].
    pub fn rms_norm_backward_gpu_saved(
        &self,
        x: &GpuTensor,
        dy: &GpuTensor,
        features: usize,
        opts: &RmsNorm<'_>,
        stats: &GpuRowStats,
    ) -> Result<GpuRmsNormGrads, NormError> {
        let work = self.rms_norm_backward_gpu_saved_async(x, dy, features, opts, stats);
        self.block("rms_norm_backward_gpu_saved", work)
    }

    /// [`Normalizer::rms_norm_backward_gpu_saved`], awaited (as
    /// [`Normalizer::layer_norm_gpu_async`]).
    pub async fn rms_norm_backward_gpu_saved_async(
        &self,
        x: &GpuTensor,
        dy: &GpuTensor,
        features: usize,
        opts: &RmsNorm<'_>,
        stats: &GpuRowStats,
    ) -> Result<GpuRmsNormGrads, NormError> {
        let (opts, kind) = opts.as_row_norm();
        let name = "rms_norm_backward_gpu_saved";
        let grads = self
            .backward_gpu_of(name, (x, dy), features, (&opts, kind), Some(stats))
            .await?;
        Ok(GpuRmsNormGrads {
            dx: grads.dx,
            dgamma: grads.dgamma,
        })
    }

    /// Saved statistics moved to the device (of any backend's forward pass), for the
    /// `*_backward_gpu_saved` ops. Errors on the CPU fallback ([`NormError::NotGpu`]).
    pub fn upload_row_stats(&self, stats: &RowStats) -> Result<GpuRowStats, NormError> {
        self.block("upload_row_stats", self.upload_row_stats_async(stats))
    }

    /// [`Normalizer::upload_row_stats`], awaited.
    pub async fn upload_row_stats_async(&self, stats: &RowStats) -> Result<GpuRowStats, NormError> {
        let ctx = self.context("upload_row_stats")?;
        ctx.call(tensor::upload_row_stats(ctx, stats)).await
    }

    /// Saved statistics read back from the device (waits for the forward pass that writes
    /// them), for the host's backward passes or for [`RowStats::mean`] and [`RowStats::rstd`].
    pub fn download_row_stats(&self, stats: &GpuRowStats) -> Result<RowStats, NormError> {
        self.block("download_row_stats", self.download_row_stats_async(stats))
    }

    /// [`Normalizer::download_row_stats`], awaited.
    pub async fn download_row_stats_async(
        &self,
        stats: &GpuRowStats,
    ) -> Result<RowStats, NormError> {
        let ctx = self.context("download_row_stats")?;
        ctx.call(tensor::download_row_stats(ctx, stats)).await
    }

    /// [`Normalizer::batch_norm_train`] on a GPU tensor (features-last): the output stays on the
    /// device; the statistics come back (for [`RunningStats::update_with`]), so this call waits
    /// for the GPU. Same errors as `batch_norm_train`, plus [`NormError::NotGpu`].
    pub fn batch_norm_train_gpu(
        &self,
        x: &GpuTensor,
        features: usize,
        opts: &BatchNorm<'_>,
    ) -> Result<(GpuTensor, BatchStats), NormError> {
        let work = self.batch_norm_train_gpu_async(x, features, opts);
        self.block("batch_norm_train_gpu", work)
    }

    /// [`Normalizer::batch_norm_train_gpu`], awaited.
    pub async fn batch_norm_train_gpu_async(
        &self,
        x: &GpuTensor,
        features: usize,
        opts: &BatchNorm<'_>,
    ) -> Result<(GpuTensor, BatchStats), NormError> {
        let ctx = self.context("batch_norm_train_gpu")?;
        let shape = Shape::features_last(x.len(), features)?;
        let counted = batch_norm::validate_training(&shape, opts)?;
        ctx.call(tensor::batch_norm_train(ctx, x, &shape, opts, counted))
            .await
    }

    /// [`Normalizer::batch_norm_backward`] on GPU tensors (features-last): dx, dgamma and dbeta
    /// in new GPU tensors. It waits for the GPU, as `batch_norm_train_gpu` does: the batch
    /// statistics are checked on the host (columns out of f32's range go through the f64 path).
    /// Same errors as `batch_norm_backward`, plus [`NormError::NotGpu`].
    pub fn batch_norm_backward_gpu(
        &self,
        x: &GpuTensor,
        dy: &GpuTensor,
        features: usize,
        opts: &BatchNorm<'_>,
    ) -> Result<GpuGrads, NormError> {
        let work = self.batch_norm_backward_gpu_async(x, dy, features, opts);
        self.block("batch_norm_backward_gpu", work)
    }

    /// [`Normalizer::batch_norm_backward_gpu`], awaited.
    pub async fn batch_norm_backward_gpu_async(
        &self,
        x: &GpuTensor,
        dy: &GpuTensor,
        features: usize,
        opts: &BatchNorm<'_>,
    ) -> Result<GpuGrads, NormError> {
        let ctx = self.context("batch_norm_backward_gpu")?;
        let shape = Shape::features_last(x.len(), features)?;
        let counted = batch_norm::validate_training(&shape, opts)?;
        crate::ops::check_operand("dy", dy.len(), x.len())?;
        let op = tensor::batch_norm_backward(ctx, (x, dy), &shape, opts, counted);
        ctx.call(op).await
    }

    /// Running statistics uploaded to the device, for [`Normalizer::batch_norm_train_gpu_running`]
    /// and [`Normalizer::batch_norm_eval_gpu_running`]. Errors on the CPU fallback
    /// ([`NormError::NotGpu`]) and when the mean and variance differ in length.
    pub fn upload_running_stats(&self, stats: &RunningStats) -> Result<GpuRunningStats, NormError> {
        self.block(
            "upload_running_stats",
            self.upload_running_stats_async(stats),
        )
    }

    /// [`Normalizer::upload_running_stats`], awaited.
    pub async fn upload_running_stats_async(
        &self,
        stats: &RunningStats,
    ) -> Result<GpuRunningStats, NormError> {
        let ctx = self.context("upload_running_stats")?;
        crate::ops::check_param("running var", Some(&stats.var), stats.mean.len())?;
        ctx.call(tensor::upload_running(ctx, stats)).await
    }

    /// Reads running statistics back from the device (waits for the steps that update them).
    pub fn download_running_stats(
        &self,
        stats: &GpuRunningStats,
    ) -> Result<RunningStats, NormError> {
        self.block(
            "download_running_stats",
            self.download_running_stats_async(stats),
        )
    }

    /// [`Normalizer::download_running_stats`], awaited.
    pub async fn download_running_stats_async(
        &self,
        stats: &GpuRunningStats,
    ) -> Result<RunningStats, NormError> {
        let ctx = self.context("download_running_stats")?;
        ctx.call(tensor::download_running(ctx, stats)).await
    }

    /// A BatchNorm training step on a GPU tensor (features-last) that keeps everything on the
    /// device: y in a new GPU tensor, and the batch statistics folded into `running` there
    /// (new = (1 − momentum) · old + momentum · batch, with the unbiased batch variance, as
    /// [`RunningStats::update`] does on the host). Nothing is read back and nothing waits, so a
    /// training loop runs ahead of the GPU. Unlike the waiting forms, columns whose statistics
    /// leave f32's range (spreads past about 1e19) are not redone in f64 here.
    ///
    /// Errors as [`Normalizer::batch_norm_train`] does, when the batch counts fewer than 2
    /// positions ([`NormError::TooFewRows`]), when `running` has another feature count or
    /// belongs to another `Normalizer`, on a momentum outside [0, 1], and on the CPU fallback.
    pub fn batch_norm_train_gpu_running(
        &self,
        x: &GpuTensor,
        features: usize,
        opts: &BatchNorm<'_>,
        running: &GpuRunningStats,
    ) -> Result<GpuTensor, NormError> {
        let work = self.batch_norm_train_gpu_running_async(x, features, opts, running);
        self.block("batch_norm_train_gpu_running", work)
    }

    /// [`Normalizer::batch_norm_train_gpu_running`], awaited (as
    /// [`Normalizer::layer_norm_gpu_async`]).
    pub async fn batch_norm_train_gpu_running_async(
        &self,
        x: &GpuTensor,
        features: usize,
        opts: &BatchNorm<'_>,
        running: &GpuRunningStats,
    ) -> Result<GpuTensor, NormError> {
        let ctx = self.context("batch_norm_train_gpu_running")?;
        let shape = Shape::features_last(x.len(), features)?;
        let counted = batch_norm::validate_training(&shape, opts)?;
        batch_norm::check_fold(running.momentum, counted.count)?;
        let op = tensor::batch_norm_train_running(ctx, x, &shape, (opts, counted), running);
        ctx.call(op).await
    }

    /// [`Normalizer::batch_norm_eval_gpu`] with running statistics on the device, without
    /// waiting. Same errors as `batch_norm_eval_gpu`, but for the checks of the statistics'
    /// values, which are on the device (a negative or NaN variance gives NaN outputs), plus
    /// `running` of another feature count or `Normalizer`.
    pub fn batch_norm_eval_gpu_running(
        &self,
        x: &GpuTensor,
        features: usize,
        opts: &BatchNorm<'_>,
        running: &GpuRunningStats,
    ) -> Result<GpuTensor, NormError> {
        let work = self.batch_norm_eval_gpu_running_async(x, features, opts, running);
        self.block("batch_norm_eval_gpu_running", work)
    }

    /// [`Normalizer::batch_norm_eval_gpu_running`], awaited.
    pub async fn batch_norm_eval_gpu_running_async(
        &self,
        x: &GpuTensor,
        features: usize,
        opts: &BatchNorm<'_>,
        running: &GpuRunningStats,
    ) -> Result<GpuTensor, NormError> {
        let ctx = self.context("batch_norm_eval_gpu_running")?;
        let shape = Shape::features_last(x.len(), features)?;
        batch_norm::validate(&shape, opts)?;
        let op = tensor::batch_norm_eval_running(ctx, x, &shape, opts, running);
        ctx.call(op).await
    }

    /// [`Normalizer::batch_norm_train_nchw`] on a GPU tensor: a channels-first `[batch,
    /// channels, spatial]` tensor into a new GPU tensor (whose row width is one batch item,
    /// channels × spatial), and the batch statistics per channel, which come back (so this
    /// call waits for the GPU). Same errors as `batch_norm_train_nchw`, plus
    /// [`NormError::NotGpu`].
    pub fn batch_norm_train_nchw_gpu(
        &self,
        x: &GpuTensor,
        shape: ChannelsFirst,
        opts: &BatchNorm<'_>,
    ) -> Result<(GpuTensor, BatchStats), NormError> {
        let work = self.batch_norm_train_nchw_gpu_async(x, shape, opts);
        self.block("batch_norm_train_nchw_gpu", work)
    }

    /// [`Normalizer::batch_norm_train_nchw_gpu`], awaited.
    pub async fn batch_norm_train_nchw_gpu_async(
        &self,
        x: &GpuTensor,
        shape: ChannelsFirst,
        opts: &BatchNorm<'_>,
    ) -> Result<(GpuTensor, BatchStats), NormError> {
        let ctx = self.context("batch_norm_train_nchw_gpu")?;
        let shape = Shape::named(x.len(), shape)?;
        let counted = batch_norm::validate_training(&shape, opts)?;
        ctx.call(tensor::batch_norm_train(ctx, x, &shape, opts, counted))
            .await
    }

    /// [`Normalizer::batch_norm_eval_nchw`] on a GPU tensor, into a new GPU tensor, without
    /// waiting. Same errors as `batch_norm_eval_nchw`, plus [`NormError::NotGpu`].
    pub fn batch_norm_eval_nchw_gpu(
        &self,
        x: &GpuTensor,
        shape: ChannelsFirst,
        opts: &BatchNorm<'_>,
        stats: &RunningStats,
    ) -> Result<GpuTensor, NormError> {
        let work = self.batch_norm_eval_nchw_gpu_async(x, shape, opts, stats);
        self.block("batch_norm_eval_nchw_gpu", work)
    }

    /// [`Normalizer::batch_norm_eval_nchw_gpu`], awaited.
    pub async fn batch_norm_eval_nchw_gpu_async(
        &self,
        x: &GpuTensor,
        shape: ChannelsFirst,
        opts: &BatchNorm<'_>,
        stats: &RunningStats,
    ) -> Result<GpuTensor, NormError> {
        let ctx = self.context("batch_norm_eval_nchw_gpu")?;
        let shape = Shape::named(x.len(), shape)?;
        batch_norm::validate(&shape, opts)?;
        batch_norm::validate_stats(&shape, stats)?;
        ctx.call(tensor::batch_norm_eval(ctx, x, &shape, opts, stats))
            .await
    }

    /// [`Normalizer::batch_norm_backward_nchw`] on GPU tensors: dx, and dgamma and dbeta per
    /// channel, in new GPU tensors; waits for the GPU (as `batch_norm_backward_gpu`). Same
    /// errors as `batch_norm_backward_nchw`, plus [`NormError::NotGpu`].
    pub fn batch_norm_backward_nchw_gpu(
        &self,
        x: &GpuTensor,
        dy: &GpuTensor,
        shape: ChannelsFirst,
        opts: &BatchNorm<'_>,
    ) -> Result<GpuGrads, NormError> {
        let work = self.batch_norm_backward_nchw_gpu_async(x, dy, shape, opts);
        self.block("batch_norm_backward_nchw_gpu", work)
    }

    /// [`Normalizer::batch_norm_backward_nchw_gpu`], awaited.
    pub async fn batch_norm_backward_nchw_gpu_async(
        &self,
        x: &GpuTensor,
        dy: &GpuTensor,
        shape: ChannelsFirst,
        opts: &BatchNorm<'_>,
    ) -> Result<GpuGrads, NormError> {
        let ctx = self.context("batch_norm_backward_nchw_gpu")?;
        let shape = Shape::named(x.len(), shape)?;
        let counted = batch_norm::validate_training(&shape, opts)?;
        crate::ops::check_operand("dy", dy.len(), x.len())?;
        let op = tensor::batch_norm_backward(ctx, (x, dy), &shape, opts, counted);
        ctx.call(op).await
    }

    /// [`Normalizer::batch_norm_eval`] on a GPU tensor (features-last), into a new GPU tensor,
    /// without waiting for the GPU. Same errors as `batch_norm_eval`, plus [`NormError::NotGpu`].
    pub fn batch_norm_eval_gpu(
        &self,
        x: &GpuTensor,
        features: usize,
        opts: &BatchNorm<'_>,
        stats: &RunningStats,
    ) -> Result<GpuTensor, NormError> {
        let work = self.batch_norm_eval_gpu_async(x, features, opts, stats);
        self.block("batch_norm_eval_gpu", work)
    }

    /// [`Normalizer::batch_norm_eval_gpu`], awaited (as [`Normalizer::layer_norm_gpu_async`]).
    pub async fn batch_norm_eval_gpu_async(
        &self,
        x: &GpuTensor,
        features: usize,
        opts: &BatchNorm<'_>,
        stats: &RunningStats,
    ) -> Result<GpuTensor, NormError> {
        let ctx = self.context("batch_norm_eval_gpu")?;
        let shape = Shape::features_last(x.len(), features)?;
        batch_norm::validate(&shape, opts)?;
        batch_norm::validate_stats(&shape, stats)?;
        ctx.call(tensor::batch_norm_eval(ctx, x, &shape, opts, stats))
            .await
    }

    /// Records LayerNorm of the first `len` values of `x` (rows of `features`) into `y` as one
    /// compute pass of the caller's `encoder`; the caller submits it. Both buffers need
    /// `BufferUsages::STORAGE` and room for `len` values, `y` must be another buffer than `x`,
    /// and the tensor must fit one binding. A call that fails records nothing.
    ///
    /// The encoder and both buffers must come from this `Normalizer`'s device (the one
    /// [`Normalizer::wgpu`] returns, or the one given to [`Normalizer::from_wgpu`]). wgpu 30
    /// offers no way to ask a buffer or an encoder for its device, so gpunorm cannot check this:
    /// an encoder of another device makes wgpu panic, and buffers of another device may alias
    /// buffers of this one. Make them with `norm.wgpu()`.
    pub fn encode_layer_norm(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        len: usize,
        features: usize,
        opts: &LayerNorm<'_>,
    ) -> Result<(), NormError> {
        let work = self.encode_layer_norm_async(encoder, x, y, len, features, opts);
        self.block("encode_layer_norm", work)
    }

    /// [`Normalizer::encode_layer_norm`], awaited (for the pipeline's first build and wgpu's
    /// error report).
    pub async fn encode_layer_norm_async(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        len: usize,
        features: usize,
        opts: &LayerNorm<'_>,
    ) -> Result<(), NormError> {
        let ctx = self.context("encode_layer_norm")?;
        layer_norm::validate(len, features, opts)?;
        let io = (x, y);
        ctx.call(encode::encode_layer_norm(
            ctx, encoder, io, len, features, opts,
        ))
        .await
    }

    /// Records `op` (any op of the LayerNorm family: forward, fused add or backward; or
    /// BatchNorm training, eval or backward, with its mask and running statistics) into the
    /// caller's `encoder`, on spans of the caller's buffers, with the parameters on the device
    /// too; the caller submits it. Nothing is uploaded but one small uniform, and nothing waits,
    /// so a training loop runs without a host round trip. [`Encode`] lists what each span must
    /// satisfy; a call that fails records nothing.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), gpunorm::NormError> {
    /// use gpunorm::{wgpu, Encode, Normalizer};
    /// let norm = Normalizer::gpu()?;
    /// let (device, queue) = norm.wgpu().unwrap();
    /// let (features, rows) = (4096u64, 8u64);
    /// let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST;
    /// // Activations of two layers in one buffer, the weights in another.
    /// let activations = device.create_buffer(&wgpu::BufferDescriptor {
    ///     label: None, size: 2 * rows * features * 4, usage, mapped_at_creation: false,
    /// });
    /// let out = device.create_buffer(&wgpu::BufferDescriptor {
    ///     label: None, size: rows * features * 4, usage, mapped_at_creation: false,
    /// });
    /// let weights = device.create_buffer(&wgpu::BufferDescriptor {
    ///     label: None, size: features * 4, usage, mapped_at_creation: false,
    /// });
    /// let mut encoder = device.create_command_encoder(&Default::default());
    /// let layer = rows * features * 4;
    /// norm.encode(&mut encoder, &Encode::RmsNorm {
    ///     x: activations.slice(layer..2 * layer),
    ///     y: out.slice(..),
    ///     features: features as usize,
    ///     eps: 1e-6,
    ///     gamma: Some(weights.slice(..)),
    /// })?;
    /// queue.submit([encoder.finish()]);
    /// # Ok(())
    /// # }
    /// ```
    pub fn encode(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        op: &Encode<'_>,
    ) -> Result<(), NormError> {
        self.block("encode", self.encode_async(encoder, op))
    }

    /// [`Normalizer::encode`], awaited (for the pipeline's first build and wgpu's error report).
    pub async fn encode_async(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        op: &Encode<'_>,
    ) -> Result<(), NormError> {
        let ctx = self.context("encode")?;
        ctx.call(encode::encode(ctx, encoder, op)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizer_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Normalizer>();
    }

    /// The `_async` ops can be spawned on a multithreaded executor: their futures are `Send`,
    /// on every backend (the GPU's included, whose scopes never span an await).
    #[test]
    fn async_ops_are_send() {
        fn assert_send<T: Send>(_: T) {}
        let norm = Normalizer::cpu();
        let (x, mut y) = ([1.0f32, 2.0], [0f32; 2]);
        let (ln, bn) = (LayerNorm::default(), BatchNorm::default());
        let stats = RunningStats::new(2);
        assert_send(Normalizer::new_async());
        assert_send(norm.layer_norm_async(&x, 2, &ln));
        assert_send(norm.layer_norm_into_async(&x, 2, &ln, &mut y));
        assert_send(norm.batch_norm_train_async(&x, 1, &bn));
        assert_send(norm.batch_norm_eval_async(&x, 1, &bn, &stats));
        assert_send(norm.upload_async(&x));
    }
}
