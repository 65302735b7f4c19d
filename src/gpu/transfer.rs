//! Moving tensors between host slices and the GPU: through pooled staging buffers that are
//! already mapped, copied in pieces on every core when large.
//!
//! [`map_slice`] is the one place gpunorm waits for the GPU: every readback, every reused upload
//! buffer and every timestamp goes through it.

use rayon::prelude::*;

use super::context::{gpu_err, GpuContext};
use super::pool::{Lifetime, Pooled};
use crate::NormError;

/// Copies of at least this many bytes into and out of mapped staging buffers are spread over the
/// rayon threads in pieces of `COPY_PIECE`: one thread cannot fill a host's memory bandwidth, and
/// uploads and readbacks of big tensors are such copies.
const PARALLEL_COPY: usize = 4 << 20;
const COPY_PIECE: usize = 1 << 20;

/// A pooled staging buffer holding a copy of `data`, ready for [`Staged::record`]: mapped
/// already (new) or mapped now (reused, once the GPU is done with it). No fresh host allocation
/// per call. The copy moves whole 4-byte words (as wgpu's copies must): an odd count of half
/// values carries two bytes of padding after them.
pub(crate) async fn stage<'a, T: bytemuck::Pod>(
    ctx: &'a GpuContext,
    data: &[T],
) -> Result<Staged<'a>, NormError> {
    use wgpu::BufferUsages as U;
    let bytes = words(std::mem::size_of_val(data));
    let buffer = ctx
        .scoped("staging an upload", || {
            ctx.buffer(
                "gpunorm upload",
                bytes,
                U::MAP_WRITE | U::COPY_SRC,
                Lifetime::Call,
            )
        })
        .await?;
    if !buffer.is_new {
        let slice = buffer.slice(..);
        map_slice(ctx, slice, wgpu::MapMode::Write, "mapping an upload buffer").await?;
    }
    write_mapped(&buffer, bytemuck::cast_slice(data))?;
    buffer.unmap();
    Ok(Staged { buffer, bytes })
}

/// Data on its way to the device, in a staging buffer ([`stage`]).
pub(crate) struct Staged<'a> {
    buffer: Pooled<'a>,
    bytes: u64,
}

impl Staged<'_> {
    /// Records the copy of the staged data to the start of `dst` into `encoder`. The staging
    /// buffer must live until the encoder's work has been submitted; whoever takes it from the
    /// pool next maps it first, and wgpu maps a buffer only once the GPU is done with it.
    pub fn record(&self, encoder: &mut wgpu::CommandEncoder, dst: &wgpu::Buffer) {
        if self.bytes > 0 {
            encoder.copy_buffer_to_buffer(&self.buffer, 0, dst, 0, self.bytes);
        }
    }
}

/// A `MAP_READ` staging buffer for reading back `bytes` bytes.
pub(crate) fn readback_buffer(ctx: &GpuContext, bytes: u64) -> Pooled<'_> {
    use wgpu::BufferUsages as U;
    ctx.buffer(
        "gpunorm readback",
        bytes,
        U::MAP_READ | U::COPY_DST,
        Lifetime::Call,
    )
}

/// Bytes of whole 4-byte words that hold `bytes`.
fn words(bytes: usize) -> u64 {
    bytes.next_multiple_of(4) as u64
}

/// Copies the first `out.len()` values of the device buffer `src` into `out`, once the work
/// that writes it is done.
pub(crate) async fn download<T: bytemuck::Pod>(
    ctx: &GpuContext,
    src: &wgpu::Buffer,
    out: &mut [T],
) -> Result<(), NormError> {
    let bytes = words(std::mem::size_of_val(out));
    let staging = ctx
        .scoped("download", || {
            let staging = readback_buffer(ctx, bytes);
            let mut encoder = ctx.encoder("gpunorm download");
            if bytes > 0 {
                encoder.copy_buffer_to_buffer(src, 0, &staging, 0, bytes);
            }
            ctx.queue().submit([encoder.finish()]);
            staging
        })
        .await?;
    read_into(ctx, &staging, out).await
}

/// Copies the first `out.len()` values of the mappable `staging` buffer into `out`, once the
/// work submitted before is done.
pub(crate) async fn read_into<T: bytemuck::Pod>(
    ctx: &GpuContext,
    staging: &wgpu::Buffer,
    out: &mut [T],
) -> Result<(), NormError> {
    let out: &mut [u8] = bytemuck::cast_slice_mut(out);
    if out.is_empty() {
        return Ok(());
    }
    // Mapped in whole words; the padding after an odd count of half values stays behind.
    let slice = staging.slice(..words(out.len()));
    map_slice(ctx, slice, wgpu::MapMode::Read, "reading back").await?;
    {
        let view = slice
            .get_mapped_range()
            .map_err(|e| gpu_err("reading back", e))?;
        let len = out.len();
        read_mapped(out, &view[..len]);
    }
    staging.unmap();
    Ok(())
}

/// Maps `slice` once the GPU has finished the work that uses it: the one wait of gpunorm.
///
/// wgpu reports the mapping through a callback, which sends its result down a oneshot channel
/// that this awaits. On the web the browser runs the callback when the GPU is done, and the
/// await yields to its event loop meanwhile. Natively wgpu runs callbacks only when the device is
/// polled, so this polls it until the queue is idle first, holding the calling thread while the
/// GPU works, and the channel then holds the result already.
pub(crate) async fn map_slice(
    ctx: &GpuContext,
    slice: wgpu::BufferSlice<'_>,
    mode: wgpu::MapMode,
    op: &'static str,
) -> Result<(), NormError> {
    let (tx, rx) = futures_intrusive::channel::shared::oneshot_channel();
    // A buffer that cannot be mapped (a lost device) is a validation error, caught here.
    ctx.scoped(op, || {
        slice.map_async(mode, move |r| {
            let _ = tx.send(r);
        })
    })
    .await?;
    #[cfg(not(target_arch = "wasm32"))]
    ctx.device()
        .poll(wgpu::PollType::wait_indefinitely())
        .map_err(|e| gpu_err("waiting for the GPU", e))?;
    #[cfg(target_arch = "wasm32")]
    let _ = ctx;
    match rx.receive().await {
        Some(mapped) => mapped.map_err(|e| gpu_err(op, e)),
        None => Err(gpu_err(
            op,
            "wgpu dropped the mapping callback without calling it",
        )),
    }
}

/// Copies `src` to the start of the mapped buffer `dst` (at least [`words`]`(src.len())` long), in pieces of `COPY_PIECE` on the rayon
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
            // Views cover whole words: the last piece of an odd count of half values is two
            // bytes short of one.
            let mut view = dst
                .slice(at..at + words(s.len()))
                .get_mapped_range_mut()
                .map_err(|e| gpu_err("writing an upload buffer", e))?;
            view.slice(..s.len()).copy_from_slice(s);
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
