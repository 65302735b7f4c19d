//! Moving f32 tensors between host slices and the GPU: through pooled staging buffers that are
//! already mapped, copied in pieces on every core when large.

use std::sync::mpsc;

use rayon::prelude::*;

use super::context::{gpu_err, GpuContext};
use super::pool::{Lifetime, Pooled};
use crate::NormError;

/// Copies of at least this many bytes into and out of mapped staging buffers are spread over the
/// rayon threads in pieces of `COPY_PIECE`: one thread cannot fill a host's memory bandwidth, and
/// uploads and readbacks of big tensors are such copies.
const PARALLEL_COPY: usize = 4 << 20;
const COPY_PIECE: usize = 1 << 20;

/// Records a copy of `data` into `dst` (from offset 0) into `encoder`, through a pooled staging
/// buffer that is mapped already or mapped now: no fresh host allocation per call. The returned
/// guard must live until the encoder's work has been submitted; whoever takes the buffer next maps
/// it first, and wgpu maps a buffer only once the GPU is done with it.
pub(crate) fn upload<'a, T: bytemuck::Pod>(
    ctx: &'a GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    dst: &wgpu::Buffer,
    data: &[T],
) -> Result<Pooled<'a>, NormError> {
    use wgpu::BufferUsages as U;
    let bytes = std::mem::size_of_val(data) as u64;
    let staging = ctx.buffer(
        "gpunorm upload",
        bytes,
        U::MAP_WRITE | U::COPY_SRC,
        Lifetime::Call,
    );
    if !staging.is_new {
        map(
            ctx,
            &staging,
            wgpu::MapMode::Write,
            "mapping an upload buffer",
        )?;
    }
    write_mapped(&staging, bytemuck::cast_slice(data))?;
    staging.unmap();
    if bytes > 0 {
        encoder.copy_buffer_to_buffer(&staging, 0, dst, 0, bytes);
    }
    Ok(staging)
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

/// Copies the first `out.len()` f32 of the device buffer `src` into `out`, waiting for the work
/// that writes it.
pub(crate) fn download(
    ctx: &GpuContext,
    src: &wgpu::Buffer,
    out: &mut [f32],
) -> Result<(), NormError> {
    let bytes = std::mem::size_of_val(out) as u64;
    let staging = readback_buffer(ctx, bytes);
    let mut encoder = ctx.encoder("gpunorm download");
    if bytes > 0 {
        encoder.copy_buffer_to_buffer(src, 0, &staging, 0, bytes);
    }
    ctx.queue().submit([encoder.finish()]);
    read_into(ctx, &staging, out)
}

/// Waits for all submitted work and copies the first `out.len()` values of the mappable
/// `staging` buffer into `out`.
pub(crate) fn read_into<T: bytemuck::Pod>(
    ctx: &GpuContext,
    staging: &wgpu::Buffer,
    out: &mut [T],
) -> Result<(), NormError> {
    let bytes = std::mem::size_of_val(out) as u64;
    if bytes == 0 {
        return Ok(());
    }
    let slice = staging.slice(..bytes);
    map_slice(ctx, slice, wgpu::MapMode::Read, "reading back")?;
    {
        let view = slice
            .get_mapped_range()
            .map_err(|e| gpu_err("reading back", e))?;
        read_mapped(bytemuck::cast_slice_mut(out), &view);
    }
    staging.unmap();
    Ok(())
}

fn map(
    ctx: &GpuContext,
    buffer: &wgpu::Buffer,
    mode: wgpu::MapMode,
    op: &'static str,
) -> Result<(), NormError> {
    map_slice(ctx, buffer.slice(..), mode, op)
}

/// Maps `slice`, waiting for the GPU to finish the work that uses it.
fn map_slice(
    ctx: &GpuContext,
    slice: wgpu::BufferSlice<'_>,
    mode: wgpu::MapMode,
    op: &'static str,
) -> Result<(), NormError> {
    let (tx, rx) = mpsc::channel();
    slice.map_async(mode, move |r| {
        let _ = tx.send(r);
    });
    ctx.wait()?;
    rx.recv()
        .map_err(|e| gpu_err(op, e))?
        .map_err(|e| gpu_err(op, e))
}

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
