//! CPU mirror of `shaders/layer_norm.wgsl`: per row, shift by the first value, mean of the
//! shifted values, variance around it, then one output pass. A row is read from memory once;
//! the second and third passes run over it in cache. RMSNorm ([`RowNorm::Rms`]) takes the same
//! path with no shift and no mean: the mean square, then the output.

use rayon::prelude::*;

use super::{
    fold, multiversion, rows_per_task, should_stream, staged, stream_fence, sum_shifted,
    sum_sq_centered, write_out, BLOCK, LANES, PREFETCH_DISTANCE,
};
use crate::ops::layer_norm::{FusedAdd, RowNorm};
use crate::ops::stats_out_of_range;
use crate::{Element, LayerNorm};

/// Normalizes every `features`-long row of `x` into `y` (same length; input already validated).
/// With `add` (the residual and the sum's output), each row is x + residual, written to the sum
/// and normalized while in cache: one pass over memory. With `moments`, each row's statistics
/// are saved there ([`RowStats`](crate::RowStats)'s layout).
///
/// Half tensors take the same passes row by row: each row is widened into f32 scratch of the
/// task's own (in L1), its statistics and outputs computed there with the same f32 arithmetic
/// as f32 rows, and each output rounded to `T` as it is written: no f32 copy of any tensor, and
/// one pass over memory as for f32.
pub(crate) fn layer_norm<T: Element>(
    x: &[T],
    y: &mut [T],
    features: usize,
    op: (&LayerNorm<'_>, RowNorm),
    add: FusedAdd<'_, T>,
    moments: Option<&mut [[f32; 4]]>,
) {
    let block_rows = rows_per_task(features);
    let block = block_rows * features;
    let stream = should_stream(y);
    let moments = block_moments(moments, x.len().div_ceil(block), block_rows);
    let task = |xb: &[T], yb: &mut [T], add: FusedAdd<'_, T>, mb| {
        // f32 rows need no scratch; a half row needs its f32 copy (and the residual's).
        let width = if T::IS_F32 {
            0
        } else {
            features * (1 + add.is_some() as usize)
        };
        SCRATCH.with_borrow_mut(|scratch| {
            if scratch.len() < width {
                scratch.resize(width, 0.0);
            }
            rows(
                xb,
                yb,
                features,
                op,
                (stream, add),
                mb,
                &mut scratch[..width],
            );
        });
        stream_fence();
    };
    match add {
        None => y
            .par_chunks_mut(block)
            .zip(x.par_chunks(block))
            .zip(moments)
            .for_each(|((yb, xb), mb)| task(xb, yb, None, mb)),
        Some((residual, sum)) => y
            .par_chunks_mut(block)
            .zip(x.par_chunks(block))
            .zip(residual.par_chunks(block).zip(sum.par_chunks_mut(block)))
            .zip(moments)
            .for_each(|(((yb, xb), (rb, sb)), mb)| task(xb, yb, Some((rb, sb)), mb)),
    }
}

/// The saved statistics' share of each of `blocks` blocks of `block_rows` rows (None for each
/// where nothing is saved), to zip with the blocks.
fn block_moments(
    moments: Option<&mut [[f32; 4]]>,
    blocks: usize,
    block_rows: usize,
) -> Vec<Option<&mut [[f32; 4]]>> {
    match moments {
        Some(m) => m.chunks_mut(block_rows).map(Some).collect(),
        None => (0..blocks).map(|_| None).collect(),
    }
}

thread_local! {
    /// A task's f32 copies of half rows ([`layer_norm`], [`backward`]).
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

multiversion! {
    fn rows<T: Element>(x: &[T], y: &mut [T], features: usize, op: (&LayerNorm<'_>, RowNorm), out: (bool, FusedAdd<'_, T>), moments: Option<&mut [[f32; 4]]>, scratch: &mut [f32]) => rows_body
}

#[inline(always)]
fn rows_body<T: Element>(
    x: &[T],
    y: &mut [T],
    features: usize,
    op: (&LayerNorm<'_>, RowNorm),
    (stream, mut add): (bool, FusedAdd<'_, T>),
    mut moments: Option<&mut [[f32; 4]]>,
    scratch: &mut [f32],
) {
    // Prefetch a row's worth of values at least PREFETCH_DISTANCE ahead: one row is too close
    // when rows are short.
    let distance = features.max(PREFETCH_DISTANCE);
    for (r, (yr, xr)) in y
        .chunks_exact_mut(features)
        .zip(x.chunks_exact(features))
        .enumerate()
    {
        let lo = (r * features + distance).min(x.len());
        let hi = (lo + features).min(x.len());
        let span = r * features..(r + 1) * features;
        let add = add
            .as_mut()
            .map(|(residual, sum)| (&residual[span.clone()], &mut sum[span]));
        let xr = source_row(xr, add, &mut *scratch);
        let m = row(xr, yr, op, &x[lo..hi], stream);
        if let Some(moments) = &mut moments {
            moments[r] = m;
        }
    }
}

/// The f32 row that a row op normalizes: `x` itself where it is f32, else widened into
/// `scratch`. With the fused add (the row of the residual and of the sum's output), the row is
/// x + residual, written to the sum rounded once: in place for f32, else in `scratch` (which
/// then holds two rows) and rounded into the sum, the row normalized being the unrounded sum.
#[inline(always)]
fn source_row<'a, T: Element>(
    x: &'a [T],
    add: Option<(&[T], &'a mut [T])>,
    scratch: &'a mut [f32],
) -> &'a [f32] {
    let n = x.len();
    let Some((residual, sum)) = add else {
        return staged(x, scratch);
    };
    match T::as_f32(sum) {
        Ok(out) => {
            let f32s = |v| T::as_f32_ref(v).expect("the sum is f32, so are x and the residual");
            for ((o, &a), &b) in out.iter_mut().zip(f32s(x)).zip(f32s(residual)) {
                *o = a + b;
            }
            out
        }
        Err(sum) => {
            let (wide, rest) = scratch.split_at_mut(n);
            let residual_wide = &mut rest[..n];
            T::widen_into(x, wide);
            T::widen_into(residual, residual_wide);
            for (a, &b) in wide.iter_mut().zip(&*residual_wide) {
                *a += b;
            }
            T::narrow_into(wide, sum);
            wide
        }
    }
}

/// One row of LayerNorm, or of RMSNorm (the mean square alone: no shift, no mean); `ahead`
/// (data read later, or empty) is prefetched while this row is in cache, and `stream` sends the
/// output past the caches. Returns the row's statistics as [`RowStats`](crate::RowStats) keeps
/// them.
#[inline(always)]
fn row<T: Element>(
    x: &[f32],
    y: &mut [T],
    (opts, kind): (&LayerNorm<'_>, RowNorm),
    ahead: &[T],
    stream: bool,
) -> [f32; 4] {
    let (shift, mean_d, var) = shifted_moments(x, kind, ahead);
    if stats_out_of_range(mean_d as f64, var, opts.eps) {
        return row_in_f64(x, y, opts, kind);
    }
    let rstd = (1.0 / (var + opts.eps as f64).sqrt()) as f32;
    normalize(x, y, (shift, mean_d, rstd), opts, stream);
    [shift, mean_d, rstd, 1.0]
}

/// A row's shift (its first value), the mean of x − shift and the variance about it, by the
/// shifted two-pass; for RMSNorm 0, 0 and the mean square. `ahead` is prefetched during the
/// second pass.
#[inline(always)]
fn shifted_moments<T>(x: &[f32], kind: RowNorm, ahead: &[T]) -> (f32, f32, f64) {
    let n = x.len() as f64;
    let (shift, mean_d) = match kind {
        RowNorm::Layer => (x[0], (sum_shifted(x, x[0]) / n) as f32),
        RowNorm::Rms => (0.0, 0.0),
    };
    (shift, mean_d, sum_sq_centered(x, shift, mean_d, ahead) / n)
}

/// y = ((x − shift) − mean_d) · rstd · gamma + beta over one row (RMSNorm: shift and mean_d 0,
/// which leaves x exactly).
#[inline(always)]
fn normalize<T: Element>(
    x: &[f32],
    y: &mut [T],
    (shift, mean_d, rstd): (f32, f32, f32),
    opts: &LayerNorm<'_>,
    stream: bool,
) {
    let (gamma, beta) = (opts.gamma, opts.beta);
    write_out(
        y,
        stream,
        #[inline(always)]
        |out, off| {
            let span = off..off + out.len();
            let xs = &x[span.clone()];
            match (
                gamma.map(|g| &g[span.clone()]),
                beta.map(|b| &b[span.clone()]),
            ) {
                (None, None) => {
                    for (o, &v) in out.iter_mut().zip(xs) {
                        *o = ((v - shift) - mean_d) * rstd;
                    }
                }
                (Some(g), None) => {
                    for ((o, &v), &g) in out.iter_mut().zip(xs).zip(g) {
                        *o = ((v - shift) - mean_d) * rstd * g;
                    }
                }
                (None, Some(b)) => {
                    for ((o, &v), &b) in out.iter_mut().zip(xs).zip(b) {
                        *o = ((v - shift) - mean_d) * rstd + b;
                    }
                }
                (Some(g), Some(b)) => {
                    for (((o, &v), &g), &b) in out.iter_mut().zip(xs).zip(g).zip(b) {
                        *o = ((v - shift) - mean_d) * rstd * g + b;
                    }
                }
            }
        },
    );
}

/// A row whose f32 statistics went out of range, normalized in f64 throughout: its squares range
/// over 1e-90..1e77, well inside f64. Rare, so plain loops. A row holding NaN or infinity gets
/// what the same f64 arithmetic gives in the reference: NaN throughout for LayerNorm; for RMSNorm
/// NaN where the row holds a NaN, and with an infinity, NaN there and 0 elsewhere.
#[cold]
fn row_in_f64<T: Element>(x: &[f32], y: &mut [T], opts: &LayerNorm<'_>, kind: RowNorm) -> [f32; 4] {
    let n = x.len() as f64;
    let mean = match kind {
        RowNorm::Layer => x.iter().map(|&v| v as f64).sum::<f64>() / n,
        RowNorm::Rms => 0.0,
    };
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    let rstd = 1.0 / (var + opts.eps as f64).sqrt();
    write_out(y, false, |out, off| {
        for (c, o) in (off..).zip(out.iter_mut()) {
            let g = opts.gamma.map_or(1.0, |g| g[c] as f64);
            let b = opts.beta.map_or(0.0, |b| b[c] as f64);
            *o = ((x[c] as f64 - mean) * rstd * g + b) as f32;
        }
    });
    let shift = match kind {
        RowNorm::Layer => x[0] as f64,
        RowNorm::Rms => 0.0,
    };
    scaled_moments(shift, mean, rstd)
}

/// A row's statistics computed in f64 (shift, mean, rstd), as [`RowStats`](crate::RowStats)
/// keeps them: scaled by the power of two that brings rstd near 1, so that all three fit f32
/// whatever the row's range (the scale 1 where rstd is 0, infinite or NaN).
fn scaled_moments(shift: f64, mean: f64, rstd: f64) -> [f32; 4] {
    let k = if rstd.is_finite() && rstd > 0.0 {
        rstd.log2().round().clamp(-126.0, 126.0) as i32
    } else {
        0
    };
    let s = 2f64.powi(k);
    [
        (shift * s) as f32,
        ((mean - shift) * s) as f32,
        (rstd / s) as f32,
        s as f32,
    ]
}

/// At most this many blocks of rows in a backward pass: each keeps its own f64 partial sums of
/// dgamma and dbeta, added in block order at the end.
const MAX_BACKWARD_BLOCKS: usize = 64;

/// The backward pass of LayerNorm (or RMSNorm, as `kind` says) over every row: `dx` (same
/// length as `x`), and the column sums (dgamma, dbeta). Rows run in parallel in blocks whose
/// size depends on the shape alone, and the blocks' partial sums are added in order, so the
/// result does not depend on the thread count. A half row's x and dy are widened into f32
/// scratch of the task's own (in L1) and its dx rounded back from there: no f32 copy of any
/// tensor, and the same f32 arithmetic and the same blocks as f32 tensors. With `saved` (a
/// forward pass's [`RowStats`](crate::RowStats) moments), each row's statistics are taken from
/// there.
pub(crate) fn backward<T: Element>(
    (x, dy): (&[T], &[T]),
    dx: &mut [T],
    features: usize,
    (opts, kind): (&LayerNorm<'_>, RowNorm),
    saved: Option<&[[f32; 4]]>,
) -> (Vec<f32>, Vec<f32>) {
    let rows = x.len() / features;
    let block_rows = rows_per_task(features).max(rows.div_ceil(MAX_BACKWARD_BLOCKS));
    let block = block_rows * features;
    let op = (opts, kind);
    let saved: Vec<Option<&[[f32; 4]]>> = match saved {
        Some(m) => m.chunks(block_rows).map(Some).collect(),
        None => vec![None; x.len().div_ceil(block)],
    };
    // f32 rows need no scratch; a half row needs x, dy and dx in f32.
    let width = if T::IS_F32 { 0 } else { 3 * features };
    let partials: Vec<(Vec<f64>, Vec<f64>)> = dx
        .par_chunks_mut(block)
        .zip(x.par_chunks(block).zip(dy.par_chunks(block)))
        .zip(saved)
        .map(|((dxb, x_dy), mb)| {
            let mut sums = (vec![0f64; features], vec![0f64; features]);
            SCRATCH.with_borrow_mut(|scratch| {
                if scratch.len() < width {
                    scratch.resize(width, 0.0);
                }
                let sums = (&mut sums.0[..], &mut sums.1[..]);
                backward_rows(x_dy, dxb, features, op, sums, mb, &mut scratch[..width]);
            });
            sums
        })
        .collect();
    let (mut dgamma, mut dbeta) = (vec![0f64; features], vec![0f64; features]);
    for (g, b) in partials {
        dgamma.iter_mut().zip(g).for_each(|(t, v)| *t += v);
        dbeta.iter_mut().zip(b).for_each(|(t, v)| *t += v);
    }
    let f32s = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect();
    (f32s(dgamma), f32s(dbeta))
}

multiversion! {
    fn backward_rows<T: Element>(x_dy: (&[T], &[T]), dx: &mut [T], features: usize, op: (&LayerNorm<'_>, RowNorm), sums: (&mut [f64], &mut [f64]), saved: Option<&[[f32; 4]]>, scratch: &mut [f32]) => backward_rows_body
}

#[inline(always)]
fn backward_rows_body<T: Element>(
    (x, dy): (&[T], &[T]),
    dx: &mut [T],
    features: usize,
    op: (&LayerNorm<'_>, RowNorm),
    (dgamma, dbeta): (&mut [f64], &mut [f64]),
    saved: Option<&[[f32; 4]]>,
    scratch: &mut [f32],
) {
    for (r, (dxr, (xr, dyr))) in dx
        .chunks_exact_mut(features)
        .zip(x.chunks_exact(features).zip(dy.chunks_exact(features)))
        .enumerate()
    {
        let m = saved.map(|m| m[r]);
        let sums = (&mut *dgamma, &mut *dbeta);
        match T::as_f32(dxr) {
            Ok(dxr) => {
                let f32s = |v| T::as_f32_ref(v).expect("dx is f32, so are x and dy");
                backward_row((f32s(xr), f32s(dyr)), dxr, op, sums, m);
            }
            Err(dxr) => {
                let (xw, rest) = scratch.split_at_mut(features);
                let (dyw, rest) = rest.split_at_mut(features);
                let dxw = &mut rest[..features];
                T::widen_into(xr, xw);
                T::widen_into(dyr, dyw);
                backward_row((xw, dyw), dxw, op, sums, m);
                T::narrow_into(dxw, dxr);
            }
        }
    }
}

/// One row's dx, and its dy · xhat and dy added to the column sums. The statistics are the
/// forward's (shifted, f64 blocks); with g = dy · gamma, dx = (g − mean(g) − xhat · mean(g ·
/// xhat)) · rstd, where RMSNorm has no shift, no mean and no mean(g) term. Two passes over the
/// row in cache after the statistics: the sums, then dx and the column sums.
#[inline(always)]
fn backward_row(
    (x, dy): (&[f32], &[f32]),
    dx: &mut [f32],
    (opts, kind): (&LayerNorm<'_>, RowNorm),
    (dgamma, dbeta): (&mut [f64], &mut [f64]),
    saved: Option<[f32; 4]>,
) {
    let n = x.len() as f64;
    let (shift, mean_d, rstd) = match saved {
        Some([shift, mean_d, rstd, 1.0]) => (shift, mean_d, rstd),
        // A row the forward pass scaled (its statistics leave f32's range) goes the rare way.
        Some(_) => return backward_row_in_f64((x, dy), dx, (opts, kind), (dgamma, dbeta)),
        None => {
            let (shift, mean_d, var) = shifted_moments::<f32>(x, kind, &[]);
            if stats_out_of_range(mean_d as f64, var, opts.eps) {
                return backward_row_in_f64((x, dy), dx, (opts, kind), (dgamma, dbeta));
            }
            (shift, mean_d, (1.0 / (var + opts.eps as f64).sqrt()) as f32)
        }
    };
    let xhat = |v: f32| ((v - shift) - mean_d) * rstd;
    // Σ g and Σ g · xhat: f32 in 16 lanes over blocks of 512, f64 across blocks.
    let (mut sum_g, mut sum_gx) = (0f64, 0f64);
    for start in (0..x.len()).step_by(BLOCK) {
        let span = start..(start + BLOCK).min(x.len());
        let gamma = opts.gamma.map(|g| &g[span.clone()]);
        let (a, b) = sums_g_gx(&x[span.clone()], &dy[span], gamma, xhat);
        sum_g += a as f64;
        sum_gx += b as f64;
    }
    let mean_g = match kind {
        RowNorm::Layer => (sum_g / n) as f32,
        RowNorm::Rms => 0.0,
    };
    let mean_gx = (sum_gx / n) as f32;
    let columns = dgamma.iter_mut().zip(dbeta.iter_mut());
    let out = dx.iter_mut().zip(x.iter().zip(dy)).zip(columns);
    match opts.gamma {
        None => {
            for ((d, (&v, &dy)), (dg, db)) in out {
                let h = xhat(v);
                *d = (dy - mean_g - h * mean_gx) * rstd;
                *dg += (dy * h) as f64;
                *db += dy as f64;
            }
        }
        Some(gamma) => {
            for (((d, (&v, &dy)), (dg, db)), &gm) in out.zip(gamma) {
                let h = xhat(v);
                *d = (dy * gm - mean_g - h * mean_gx) * rstd;
                *dg += (dy * h) as f64;
                *db += dy as f64;
            }
        }
    }
}

/// (Σ g, Σ g · xhat(x)) over one block of at most `BLOCK` values, g = dy · gamma, in 16
/// independent f32 lanes (so they vectorise) folded pairwise in a fixed order.
#[inline(always)]
fn sums_g_gx(
    x: &[f32],
    dy: &[f32],
    gamma: Option<&[f32]>,
    xhat: impl Fn(f32) -> f32,
) -> (f32, f32) {
    let mut scaled = [0f32; BLOCK];
    let g: &[f32] = match gamma {
        None => dy,
        Some(gamma) => {
            for ((s, &d), &gm) in scaled.iter_mut().zip(dy).zip(gamma) {
                *s = d * gm;
            }
            &scaled[..dy.len()]
        }
    };
    let (mut a, mut b) = ([0f32; LANES], [0f32; LANES]);
    let mut add = |xs: &[f32], gs: &[f32]| {
        for ((a, b), (&v, &g)) in a.iter_mut().zip(b.iter_mut()).zip(xs.iter().zip(gs)) {
            *a += g;
            *b += g * xhat(v);
        }
    };
    let (xs, gs) = (x.chunks_exact(LANES), g.chunks_exact(LANES));
    let tail = (xs.remainder(), gs.remainder());
    for (xs, gs) in xs.zip(gs) {
        add(xs, gs);
    }
    add(tail.0, tail.1);
    (fold(a), fold(b))
}

/// [`backward_row`] for a row whose f32 statistics leave f32's range, in f64 throughout (as
/// [`row_in_f64`]).
#[cold]
fn backward_row_in_f64(
    (x, dy): (&[f32], &[f32]),
    dx: &mut [f32],
    (opts, kind): (&LayerNorm<'_>, RowNorm),
    (dgamma, dbeta): (&mut [f64], &mut [f64]),
) {
    let n = x.len() as f64;
    let mean = match kind {
        RowNorm::Layer => x.iter().map(|&v| v as f64).sum::<f64>() / n,
        RowNorm::Rms => 0.0,
    };
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    let rstd = 1.0 / (var + opts.eps as f64).sqrt();
    let xhat = |c: usize| (x[c] as f64 - mean) * rstd;
    let g = |c: usize| dy[c] as f64 * opts.gamma.map_or(1.0, |g| g[c] as f64);
    let mean_g = match kind {
        RowNorm::Layer => (0..x.len()).map(g).sum::<f64>() / n,
        RowNorm::Rms => 0.0,
    };
    let mean_gx = (0..x.len()).map(|c| g(c) * xhat(c)).sum::<f64>() / n;
    for c in 0..x.len() {
        dx[c] = ((g(c) - mean_g - xhat(c) * mean_gx) * rstd) as f32;
        dgamma[c] += dy[c] as f64 * xhat(c);
        dbeta[c] += dy[c] as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The build for wider registers (AVX2 and F16C where this CPU has them) and the baseline
    /// build of the same code give the same bits, with and without streaming stores and the
    /// fused add, for every element type.
    #[test]
    fn every_build_gives_the_same_bits() {
        same_bits::<f32>();
        same_bits::<half::f16>();
        same_bits::<half::bf16>();
    }

    fn same_bits<T: Element>() {
        let values = |n: usize, salt: usize| -> Vec<T> {
            crate::element::narrow(
                (0..n)
                    .map(|i| ((i * 7919 + salt) % 1013) as f32 * 0.37 - 90.0)
                    .collect(),
            )
        };
        let bits = |v: &[T]| bytemuck::cast_slice::<T, u8>(v).to_vec();
        for &features in &[1usize, 5, 64, 1027] {
            let x = values(features * 37, 0);
            let residual = values(x.len(), 11);
            let gamma: Vec<f32> = (0..features).map(|i| 1.0 + (i % 7) as f32 * 0.1).collect();
            let opts = LayerNorm {
                gamma: Some(&gamma),
                ..Default::default()
            };
            let mut scratch = vec![0f32; 2 * features];
            for (kind, add) in [
                (RowNorm::Layer, false),
                (RowNorm::Rms, false),
                (RowNorm::Layer, true),
                (RowNorm::Rms, true),
            ] {
                let op = (&opts, kind);
                // Both builds, without and with streaming stores: four times the same bits.
                let mut outs = Vec::new();
                for (stream, wide) in [(false, true), (true, true), (false, false), (true, false)] {
                    let (mut y, mut sum) = (vec![T::default(); x.len()], x.clone());
                    let out = (stream, add.then_some((&residual[..], &mut sum[..])));
                    if wide {
                        rows(&x, &mut y, features, op, out, None, &mut scratch);
                    } else {
                        rows_body(&x, &mut y, features, op, out, None, &mut scratch);
                    }
                    crate::cpu::stream_fence();
                    outs.push((bits(&y), bits(&sum), stream, wide));
                }
                for (y, sum, stream, wide) in &outs[1..] {
                    let what = format!(
                        "{} {features} features, {kind:?}, add {add}, stream {stream}, wide {wide}",
                        T::NAME
                    );
                    assert_eq!(y, &outs[0].0, "y of {what}");
                    assert_eq!(sum, &outs[0].1, "sum of {what}");
                }
            }
        }
    }
}
