//! The CPU fallback: what `Normalizer::cpu()` runs, and what `Normalizer::new()` runs where no
//! GPU exists. One module per shader, computing the same algorithm (shifted two-pass statistics),
//! rows or blocks of positions in parallel with rayon. Results do not depend on the thread count:
//! every reduction has a fixed order.
//!
//! Sums run in f32 across 16 independent lanes (so the compiler vectorises them) over blocks of
//! at most `BLOCK` values, and the block sums are added in f64: the rounding error of a block is at
//! most ~32 ulps of its magnitude, and blocks do not compound.

mod batch_norm;
mod layer_norm;

use crate::ops::batch_norm::{BatchNorm, BatchStats, Counted, RunningStats, Shape};
use crate::ops::layer_norm::{RowNorm, RowOutputs};
use crate::ops::partial::{ColumnGrads, ColumnStats};
use crate::ops::Backend;
use crate::{Element, LayerNorm, NormError, Timing};
pub(crate) use batch_norm::{
    backward as batch_norm_backward, backward_of as batch_norm_backward_of, column_in_f64,
    columns_in_f64, eval as batch_norm_eval_of, redo_columns_in_f64,
    train_of as batch_norm_train_of,
};

/// The CPU fallback as a backend, on rayon's global pool.
pub(crate) struct Cpu {
    /// Why a GPU adapter was passed over for it, for `Normalizer::describe`.
    pub passed_over: Option<String>,
}

impl Backend for Cpu {
    async fn layer_norm<T: Element>(
        &self,
        x: &[T],
        y: &mut [T],
        features: usize,
        op: (&LayerNorm<'_>, RowNorm),
        (add, moments): RowOutputs<'_, T>,
    ) -> Result<Timing, NormError> {
        layer_norm::layer_norm(x, y, features, op, add, moments);
        Ok(Timing::default())
    }

    async fn layer_norm_backward<T: Element>(
        &self,
        x_dy: (&[T], &[T]),
        dx: &mut [T],
        features: usize,
        op: (&LayerNorm<'_>, RowNorm),
        saved: Option<&[[f32; 4]]>,
    ) -> Result<(Vec<f32>, Vec<f32>, Timing), NormError> {
        let (dgamma, dbeta) = layer_norm::backward(x_dy, dx, features, op, saved);
        Ok((dgamma, dbeta, Timing::default()))
    }

    async fn batch_norm_train(
        &self,
        x: &[f32],
        y: &mut [f32],
        shape: &Shape,
        opts: &BatchNorm<'_>,
        counted: Counted,
    ) -> Result<(BatchStats, Timing), NormError> {
        let (mean, var) = batch_norm::train(x, y, shape, opts, counted.first);
        let stats = BatchStats {
            mean,
            var,
            count: counted.count,
        };
        Ok((stats, Timing::default()))
    }

    async fn batch_norm_backward(
        &self,
        x_dy: (&[f32], &[f32]),
        dx: &mut [f32],
        shape: &Shape,
        opts: &BatchNorm<'_>,
        _counted: Counted,
    ) -> Result<(Vec<f32>, Vec<f32>, Timing), NormError> {
        let (dgamma, dbeta) = batch_norm::backward(x_dy, dx, shape, opts);
        Ok((dgamma, dbeta, Timing::default()))
    }

    async fn batch_norm_stats(
        &self,
        x: &[f32],
        shape: &Shape,
        opts: &BatchNorm<'_>,
    ) -> Result<Vec<ColumnStats>, NormError> {
        Ok(batch_norm::partial_stats(x, shape, opts))
    }

    async fn batch_norm_apply(
        &self,
        x: &[f32],
        y: &mut [f32],
        shape: &Shape,
        opts: &BatchNorm<'_>,
        stats: &[ColumnStats],
    ) -> Result<(), NormError> {
        batch_norm::apply_stats(x, y, shape, opts, stats);
        Ok(())
    }

    async fn batch_norm_backward_sums(
        &self,
        x_dy: (&[f32], &[f32]),
        shape: &Shape,
        opts: &BatchNorm<'_>,
        stats: &[ColumnStats],
    ) -> Result<Vec<ColumnGrads>, NormError> {
        Ok(batch_norm::partial_grads(x_dy, shape, opts, stats))
    }

    async fn batch_norm_backward_apply(
        &self,
        x_dy: (&[f32], &[f32]),
        dx: &mut [f32],
        shape: &Shape,
        opts: &BatchNorm<'_>,
        merged: (&[ColumnStats], &[ColumnGrads]),
    ) -> Result<(), NormError> {
        batch_norm::apply_grads(x_dy, dx, shape, opts, merged);
        Ok(())
    }

    async fn batch_norm_eval(
        &self,
        x: &[f32],
        y: &mut [f32],
        shape: &Shape,
        opts: &BatchNorm<'_>,
        stats: &RunningStats,
    ) -> Result<Timing, NormError> {
        batch_norm::eval(x, y, shape, opts, stats);
        Ok(Timing::default())
    }
}

pub(crate) const LANES: usize = 16;
/// Values (16 KiB) between the data a pass reads from memory and the data it prefetches.
pub(crate) const PREFETCH_DISTANCE: usize = 4096;
/// Values summed in f32 before the partial sum moves to f64.
pub(crate) const BLOCK: usize = 512;

/// Defines `$name`, which runs the `#[inline(always)]` function `$body` with the same arguments
/// (and type parameters, if any), compiled for AVX2 with F16C where the CPU has them (detected at
/// run time, cached by std) and for the baseline target elsewhere. Everything `$body` calls on
/// its hot path must be `#[inline(always)]` to be compiled for the wider registers (F16C's
/// conversions are then inlined too). Rust never contracts `a * b + c` into an FMA, so both
/// builds give the same bits.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident $(<$($g:ident: $bound:path),+>)? ($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? => $body:path) => {
        $(#[$meta])*
        $vis fn $name $(<$($g: $bound),+>)? ($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,f16c")]
                fn avx2 $(<$($g: $bound),+>)? ($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("f16c") {
                    // SAFETY: the CPU supports AVX2 and F16C, checked just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// Asks the memory system for `x` ahead of use (into L1), one request per 64-byte line. Rows are
/// often a page or more, and hardware prefetchers stop at page boundaries, so without this each
/// row would start with a stall while the previous row's arithmetic left memory idle. (Into L1
/// rather than L2: half rows ran about a tenth faster so, f32 ops and BatchNorm the same.)
#[inline(always)]
pub(crate) fn prefetch<T>(x: &[T]) {
    #[cfg(target_arch = "x86_64")]
    for line in x.chunks(64 / std::mem::size_of::<T>()) {
        // SAFETY: a prefetch is a hint; it never faults, and the address is inside `x`.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                line.as_ptr().cast(),
            );
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
}

/// Σ (x − shift). `x − shift` is exact in f32 whenever x and shift are within a factor two of
/// each other (Sterbenz), which is the case that matters: offset data with a small spread.
#[inline(always)]
pub(crate) fn sum_shifted(x: &[f32], shift: f32) -> f64 {
    let mut total = 0f64;
    for block in x.chunks(BLOCK) {
        total += lanes_sum(
            block,
            #[inline(always)]
            |v| v - shift,
        ) as f64;
    }
    total
}

/// Σ (x − shift − center): with [`sum_sq_centered`], the corrected two-pass's correction.
#[inline(always)]
pub(crate) fn sum_centered(x: &[f32], shift: f32, center: f32) -> f64 {
    let mut total = 0f64;
    for block in x.chunks(BLOCK) {
        total += lanes_sum(
            block,
            #[inline(always)]
            |v| (v - shift) - center,
        ) as f64;
    }
    total
}

/// Σ (x − shift − center)². While it works on `x` (in cache) it prefetches `ahead` (the data
/// to be read next, of any element type; may be empty), a block of `ahead`'s values for each
/// block of `x`'s, so memory keeps streaming.
#[inline(always)]
pub(crate) fn sum_sq_centered<T>(x: &[f32], shift: f32, center: f32, ahead: &[T]) -> f64 {
    let mut total = 0f64;
    for (b, block) in x.chunks(BLOCK).enumerate() {
        let lo = (b * BLOCK).min(ahead.len());
        let hi = (lo + BLOCK).min(ahead.len());
        prefetch(&ahead[lo..hi]);
        total += lanes_sum(
            block,
            #[inline(always)]
            |v| {
                let d = (v - shift) - center;
                d * d
            },
        ) as f64;
    }
    prefetch(&ahead[x.len().min(ahead.len())..]);
    total
}

#[inline(always)]
fn lanes_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    for (a, &v) in acc.iter_mut().zip(tail) {
        *a += f(v);
    }
    fold(acc)
}

/// The lanes of a sum added pairwise, in a fixed order.
#[inline(always)]
pub(crate) fn fold(mut acc: [f32; LANES]) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            acc[i] += acc[i + width];
        }
        width /= 2;
    }
    acc[0]
}

/// How many rows one rayon task takes: enough values (~64K) to amortise scheduling.
pub(crate) fn rows_per_task(features: usize) -> usize {
    (65536 / features.max(1)).max(1)
}

/// Fills `y` through `fill(part, offset)`, which must write `part` as the elements of `y` starting
/// at `offset` (a plain loop over slices, so it vectorises). With `stream`, the aligned middle of
/// `y` is filled 64 values at a time into a buffer on the stack and sent out with non-temporal
/// stores: they skip the read-for-ownership of each output line (a third of the memory traffic of
/// a streaming op) and leave the caches to the input. Only worth it when the output is far larger
/// than the caches; see [`should_stream`].
///
/// For half outputs, `fill` writes at most [`STAGE`] values at a time into an f32 stage in L1,
/// rounded into `y` from there; streamed stages go out through a second stage of rounded values.
#[inline(always)]
pub(crate) fn write_out<T: Element>(y: &mut [T], stream: bool, fill: impl Fn(&mut [f32], usize)) {
    match T::as_f32(y) {
        Ok(y) => write_f32(y, stream, fill),
        Err(y) => write_narrowed(y, stream, fill),
    }
}

/// Values a stage of [`write_out`] holds: 256 bytes of f32, whole 64-byte lines of any type.
pub(crate) const STAGE: usize = 64;

/// The values of `x` as f32: `x` itself where it is f32, else widened into the front of
/// `scratch` (at least as long; a stage of [`STAGE`] values serves a [`write_out`] fill).
#[inline(always)]
pub(crate) fn staged<'a, T: Element>(x: &'a [T], scratch: &'a mut [f32]) -> &'a [f32] {
    match T::as_f32_ref(x) {
        Some(x) => x,
        None => {
            let wide = &mut scratch[..x.len()];
            T::widen_into(x, wide);
            wide
        }
    }
}

/// [`write_out`] of f32 values.
#[inline(always)]
fn write_f32(y: &mut [f32], stream: bool, fill: impl Fn(&mut [f32], usize)) {
    #[repr(align(64))]
    struct Stage([f32; STAGE]);
    let mut stage = Stage([0.0; STAGE]);
    // Streaming covers whole stages from the first 16-byte-aligned element on; everything else
    // (all of y without streaming) is filled in place. One call site keeps `fill` inlined.
    let head = if stream && cfg!(target_arch = "x86_64") {
        y.as_ptr().align_offset(16).min(y.len())
    } else {
        y.len()
    };
    let body_end = head + (y.len() - head) / STAGE * STAGE;
    let mut off = 0;
    while off < y.len() {
        let streamed = off >= head && off < body_end;
        let end = if off < head {
            head
        } else if streamed {
            off + STAGE
        } else {
            y.len()
        };
        let dst: &mut [f32] = if streamed {
            &mut stage.0
        } else {
            &mut y[off..end]
        };
        fill(dst, off);
        #[cfg(target_arch = "x86_64")]
        if streamed {
            use std::arch::x86_64::{_mm_load_ps, _mm_stream_ps};
            let out = y[off..end].as_mut_ptr();
            for k in (0..STAGE).step_by(4) {
                // SAFETY: out[k..k + 4] is inside y and 16-byte aligned (off − head and k are
                // multiples of 4 values); the stage is 64-byte aligned.
                unsafe { _mm_stream_ps(out.add(k), _mm_load_ps(stage.0.as_ptr().add(k))) };
            }
        }
        off = end;
    }
}

/// [`write_out`] of a half type's values: each stage filled in f32, then rounded into `y` (or, in
/// streamed stages, into a stage of `T` sent out with non-temporal stores).
#[inline(always)]
fn write_narrowed<T: Element>(y: &mut [T], stream: bool, fill: impl Fn(&mut [f32], usize)) {
    #[repr(align(64))]
    struct Wide([f32; STAGE]);
    #[repr(align(64))]
    struct Narrow<T>([T; STAGE]);
    let mut wide = Wide([0.0; STAGE]);
    let mut narrow = Narrow([T::default(); STAGE]);
    // As in `write_f32`: whole stages stream from the first 16-byte-aligned element on.
    let head = if stream && cfg!(target_arch = "x86_64") {
        y.as_ptr().align_offset(16).min(y.len())
    } else {
        y.len()
    };
    let mut off = 0;
    while off < y.len() {
        let end = if off < head { head } else { y.len() }.min(off + STAGE);
        let part = &mut wide.0[..end - off];
        fill(part, off);
        let streamed = off >= head && end - off == STAGE;
        if !streamed {
            T::narrow_into(part, &mut y[off..end]);
            off = end;
            continue;
        }
        T::narrow_into(&wide.0, &mut narrow.0);
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{__m128i, _mm_load_si128, _mm_stream_si128};
            let out = y[off..end].as_mut_ptr().cast::<__m128i>();
            let src = narrow.0.as_ptr().cast::<__m128i>();
            for k in 0..STAGE * std::mem::size_of::<T>() / 16 {
                // SAFETY: y[off..end] is 16-byte aligned (off − head is a multiple of STAGE
                // values) and holds STAGE values, as the 64-byte-aligned stage does.
                unsafe { _mm_stream_si128(out.add(k), _mm_load_si128(src.add(k))) };
            }
        }
        off = end;
    }
}

/// Non-temporal stores pay off only for outputs far larger than the caches: below 32 MiB the
/// output stays in cache for whatever reads it next.
pub(crate) fn should_stream<T>(output: &[T]) -> bool {
    std::mem::size_of_val(output) >= 32 << 20
}

/// Orders this thread's non-temporal stores before whatever it does next (they are weakly
/// ordered); call once at the end of a task that used `write_map` with `stream`.
#[inline(always)]
pub(crate) fn stream_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: sfence has no preconditions.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
}
