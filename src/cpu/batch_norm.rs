//! CPU mirror of `shaders/batch_norm.wgsl`: per-column statistics of the shifted values over
//! fixed blocks of positions (a two-pass over each tile of a block, the second in cache), merged
//! in block order with Chan's formula, then one elementwise pass. Blocks depend on the shape only, so the
//! result does not depend on the number of threads.

use std::ops::Range;

use rayon::prelude::*;

use super::{multiversion, should_stream, staged, stream_fence, write_out, STAGE};
use crate::element::{narrow_all, widen_all};
use crate::ops::batch_norm::{BatchNorm, BatchStats, RunningStats, Shape};
use crate::ops::partial::{ColumnGrads, ColumnStats, PartialStats};
use crate::ops::stats_out_of_range;
use crate::Element;

/// Values per rayon task (statistics and apply): large enough to amortise scheduling, small
/// enough that a block's second pass finds it in L2.
const TASK_VALUES: usize = 65536;
/// Fewest rows per statistics block: each block pays a flush and a merge per column, which many
/// columns and few rows would make a large share of the work.
const MIN_STATS_ROWS: usize = 64;
/// Rows whose column sums run in f32 before they move to f64.
const SUB_ROWS: usize = 256;

/// Training: batch statistics into the output, then normalization. Returns (mean, biased var).
pub(crate) fn train(
    x: &[f32],
    y: &mut [f32],
    shape: &Shape,
    opts: &BatchNorm<'_>,
    first: usize,
) -> (Vec<f32>, Vec<f32>) {
    let (shift, mean_d, var) = stats(x, shape, opts.mask, first);
    let mut mean: Vec<f32> = shift
        .iter()
        .zip(&mean_d)
        .map(|(&s, &m)| (s as f64 + m) as f32)
        .collect();
    let center = mean_d.iter().map(|&m| m as f32).collect();
    let out_of_range: Vec<usize> = (0..shape.channels)
        .filter(|&c| stats_out_of_range(mean_d[c], var[c], opts.eps))
        .collect();
    apply(
        x,
        y,
        shape,
        opts.mask,
        &Columns::new(shift, center, &var, opts),
    );
    let mut var: Vec<f32> = var.iter().map(|&v| v as f32).collect();
    redo_columns_in_f64(x, y, shape, opts, (&mut mean, &mut var), &out_of_range);
    (mean, var)
}

/// The backward pass of training: dx into `dx` (0 on masked positions) and the per-channel sums
/// (dgamma = Σ dy · xhat, dbeta = Σ dy) over the counted positions. The statistics are the
/// forward's, and the sums are taken with them ([`stats_and_sums`]), so x and dy are read twice
/// in all, once for the statistics and sums and once for dx. Blocks of positions are fixed by the
/// shape and added in block order, so the result does not depend on the thread count. Masked
/// positions are skipped, never multiplied by 0: whatever they hold changes nothing else.
pub(crate) fn backward(
    x_dy: (&[f32], &[f32]),
    dx: &mut [f32],
    shape: &Shape,
    opts: &BatchNorm<'_>,
) -> (Vec<f32>, Vec<f32>) {
    let (stats, grads) = merged_grads(vec![stats_and_sums(x_dy, shape, opts)], opts.eps);
    apply_grads(x_dy, dx, shape, opts, (&stats, &grads));
    grads_of(&grads)
}

/// (dgamma, dbeta) of merged sums, as f32.
fn grads_of(grads: &[ColumnGrads]) -> (Vec<f32>, Vec<f32>) {
    (
        grads.iter().map(|g| g.sum_dy_xhat as f32).collect(),
        grads.iter().map(|g| g.sum_dy as f32).collect(),
    )
}

/// A shard's statistics per column, and its (Σ dy, Σ dy · (x − shift)) per column.
type ShardSums = (Vec<ColumnStats>, Vec<(f64, f64)>);

/// One shard's statistics per column, and its (Σ dy, Σ dy · (x − shift)) around the column's
/// shift, in f64, taken while each statistics tile of x is in cache (x is read once for both).
/// Columns whose f32 sums leave f32's range are taken in f64 straight from x and dy, around their
/// mean. All zero where nothing is counted.
fn stats_and_sums((x, dy): (&[f32], &[f32]), shape: &Shape, opts: &BatchNorm<'_>) -> ShardSums {
    let c = shape.channels;
    let Some(first) = (0..shape.positions).find(|&p| opts.mask.is_none_or(|m| m[p])) else {
        return (vec![ColumnStats::default(); c], vec![(0.0, 0.0); c]);
    };
    let (shift, m) = moments(x, Some(dy), shape, opts.mask, first);
    (0..c)
        .map(|ch| {
            let (mean_d, var) = (m.mean[ch], m.m2[ch] / m.n);
            if stats_out_of_range(mean_d, var, opts.eps) {
                let (mean, var) = column_in_f64(x, shape, opts.mask, ch);
                let stats = ColumnStats {
                    count: m.n,
                    shift: mean,
                    mean_d: 0.0,
                    m2: var * m.n,
                };
                return (
                    stats,
                    column_sums_in_f64((x, dy), shape, opts.mask, ch, mean),
                );
            }
            let stats = ColumnStats {
                count: m.n,
                shift: shift[ch] as f64,
                mean_d,
                m2: m.m2[ch],
            };
            (stats, (m.grads.0[ch], m.grads.1[ch]))
        })
        .unzip()
}

/// The whole batch's statistics and backward sums from its shards' [`stats_and_sums`], in shard
/// order: Σ dy · xhat = rstd · Σ over shards of (Σ dy · (x − shift) − (mean − shift) · Σ dy),
/// with each shard's own shift. A shift is one of the column's values, so |mean − shift| ≤
/// sqrt(N) · spread: each difference errs at most sqrt(N) times a sum taken around the mean, 16
/// of f64's 53 bits for 2^32 positions.
fn merged_grads(parts: Vec<ShardSums>, eps: f32) -> (Vec<ColumnStats>, Vec<ColumnGrads>) {
    let (stats, sums): (Vec<_>, Vec<_>) = parts.into_iter().unzip();
    let shards: Vec<PartialStats> = stats
        .iter()
        .map(|s| PartialStats { columns: s.clone() })
        .collect();
    let merged = PartialStats::merge(&shards)
        .expect("shards of one tensor share their features")
        .columns;
    let grads = merged
        .iter()
        .enumerate()
        .map(|(ch, total)| {
            let (mean, rstd) = (total.mean(), 1.0 / (total.var() + eps as f64).sqrt());
            let (mut sum_dy, mut centred) = (0.0, 0.0);
            for (shard, shard_sums) in stats.iter().zip(&sums) {
                let (s1, s2) = shard_sums[ch];
                sum_dy += s1;
                centred += s2 - (mean - shard[ch].shift) * s1;
            }
            ColumnGrads {
                count: total.count,
                sum_dy,
                sum_dy_xhat: centred * rstd,
                pad: 0.0,
            }
        })
        .collect();
    (merged, grads)
}

/// (Σ dy, Σ dy · (x − mean)) of channel `ch` over the counted positions, in f64 straight from x
/// and dy: for the rare columns out of f32's range (see [`backward`]).
#[cold]
fn column_sums_in_f64(
    (x, dy): (&[f32], &[f32]),
    shape: &Shape,
    mask: Option<&[bool]>,
    ch: usize,
    mean: f64,
) -> (f64, f64) {
    let (c, s) = (shape.channels, shape.spatial);
    let counted = (0..shape.positions).filter(|&p| mask.is_none_or(|m| m[p]));
    counted.fold((0.0, 0.0), |(a, b), p| {
        let i = ((p / s) * c + ch) * s + p % s;
        let g = dy[i] as f64;
        (a + g, b + g * (x[i] as f64 - mean))
    })
}

/// (Σ dy, Σ dy · xhat) per channel over the counted positions, xhat from each channel's (mean,
/// rstd): over blocks of batch items fixed by the shape, added in block order.
fn sums(
    (x, dy): (&[f32], &[f32]),
    shape: &Shape,
    mask: Option<&[bool]>,
    (mean, rstd): (&[f64], &[f64]),
) -> (Vec<f64>, Vec<f64>) {
    let (c, s) = (shape.channels, shape.spatial);
    let item = c * s;
    let block = (TASK_VALUES / item).max(1) * item;
    let partials: Vec<(Vec<f64>, Vec<f64>)> = x
        .par_chunks(block)
        .zip(dy.par_chunks(block))
        .enumerate()
        .map(|(b, (xb, db))| {
            let mut sums = (vec![0f64; c], vec![0f64; c]);
            let p0 = b * block / item * s;
            let m = mask.map(|m| &m[p0..p0 + xb.len() / c]);
            backward_sums(
                (xb, db),
                (shape, m),
                (mean, rstd),
                (&mut sums.0, &mut sums.1),
            );
            sums
        })
        .collect();
    let (mut dbeta, mut dgamma) = (vec![0f64; c], vec![0f64; c]);
    for (s1, s2) in partials {
        dbeta.iter_mut().zip(s1).for_each(|(t, v)| *t += v);
        dgamma.iter_mut().zip(s2).for_each(|(t, v)| *t += v);
    }
    (dbeta, dgamma)
}

/// dx from each channel's (mean, rstd) and the sums over the `count` counted positions:
/// dx = a · (dy − m1 − (x − mean) · b) per channel, a = gamma · rstd, m1 = dbeta / N,
/// b = rstd · dgamma / N; 0 on masked positions.
fn backward_dx_pass(
    (x, dy): (&[f32], &[f32]),
    dx: &mut [f32],
    shape: &Shape,
    opts: &BatchNorm<'_>,
    (mean, rstd): (&[f64], &[f64]),
    (dbeta, dgamma, count): (&[f64], &[f64], usize),
) {
    let (c, s) = (shape.channels, shape.spatial);
    let item = c * s;
    let block = (TASK_VALUES / item).max(1) * item;
    let mask = opts.mask;
    let n_counted = count as f64;
    let coef: Vec<[f64; 4]> = (0..c)
        .map(|ch| {
            let g = opts.gamma.map_or(1.0, |g| g[ch] as f64);
            let m2 = dgamma[ch] / n_counted;
            [mean[ch], g * rstd[ch], dbeta[ch] / n_counted, rstd[ch] * m2]
        })
        .collect();
    let stream = should_stream(dx);
    dx.par_chunks_mut(block)
        .zip(x.par_chunks(block).zip(dy.par_chunks(block)))
        .enumerate()
        .for_each(|(b, (dxb, (xb, db)))| {
            let p0 = b * block / item * s;
            let m = mask.map(|m| &m[p0..p0 + xb.len() / c]);
            backward_dx((xb, db), dxb, (shape, m), &coef, stream);
            stream_fence();
        });
}

/// A shard's statistics per column: (count, shift, mean − shift, M2) over its counted
/// positions, each column shifted by its value at the first of them; all zero where none is
/// counted. Columns whose f32 sums leave f32's range are taken in f64 straight from x.
pub(crate) fn partial_stats(x: &[f32], shape: &Shape, opts: &BatchNorm<'_>) -> Vec<ColumnStats> {
    let Some(first) = (0..shape.positions).find(|&p| opts.mask.is_none_or(|m| m[p])) else {
        return vec![ColumnStats::default(); shape.channels];
    };
    let n = opts
        .mask
        .map_or(shape.positions, |m| m.iter().filter(|&&k| k).count()) as f64;
    let (shift, mean_d, var) = stats(x, shape, opts.mask, first);
    (0..shape.channels)
        .map(|c| {
            let (shift, mean_d, var) = if stats_out_of_range(mean_d[c], var[c], opts.eps) {
                let (mean, var) = column_in_f64(x, shape, opts.mask, c);
                (mean, 0.0, var)
            } else {
                (shift[c] as f64, mean_d[c], var[c])
            };
            ColumnStats {
                count: n,
                shift,
                mean_d,
                m2: var * n,
            }
        })
        .collect()
}

/// Normalization with given statistics per column (a merge of shards'): y = ((x − shift) −
/// mean_d) · rstd · gamma + beta, masked positions 0. Columns out of f32's range run in f64.
pub(crate) fn apply_stats<T: Element>(
    x: &[T],
    y: &mut [T],
    shape: &Shape,
    opts: &BatchNorm<'_>,
    stats: &[ColumnStats],
) {
    let shift = stats.iter().map(|c| c.shift as f32).collect();
    let center = stats.iter().map(|c| c.mean_d as f32).collect();
    let var: Vec<f64> = stats.iter().map(ColumnStats::var).collect();
    apply(
        x,
        y,
        shape,
        opts.mask,
        &Columns::new(shift, center, &var, opts),
    );
    columns_in_f64(x, y, shape, opts, stats);
}

/// Rewrites, in f64, the outputs of the columns whose given statistics leave f32's range (the
/// f32 apply pass cannot normalize them). Rare.
pub(crate) fn columns_in_f64<T: Element>(
    x: &[T],
    y: &mut [T],
    shape: &Shape,
    opts: &BatchNorm<'_>,
    stats: &[ColumnStats],
) {
    let (c, s) = (shape.channels, shape.spatial);
    for (ch, st) in stats.iter().enumerate() {
        if !stats_out_of_range(st.mean_d, st.var(), opts.eps) {
            continue;
        }
        let rstd = 1.0 / (st.var() + opts.eps as f64).sqrt();
        let (g, b) = (
            opts.gamma.map_or(1.0, |g| g[ch] as f64),
            opts.beta.map_or(0.0, |b| b[ch] as f64),
        );
        for p in (0..shape.positions).filter(|&p| opts.mask.is_none_or(|m| m[p])) {
            let i = ((p / s) * c + ch) * s + p % s;
            let mut v = [0.0];
            T::widen_into(&x[i..=i], &mut v);
            v[0] = ((v[0] as f64 - st.mean()) * rstd * g + b) as f32;
            T::narrow_into(&v, &mut y[i..=i]);
        }
    }
}

/// Each channel's (mean, rstd) from given statistics, in f64.
fn mean_rstd(stats: &[ColumnStats], eps: f32) -> (Vec<f64>, Vec<f64>) {
    let mean = stats.iter().map(ColumnStats::mean).collect();
    let rstd = stats
        .iter()
        .map(|c| 1.0 / (c.var() + eps as f64).sqrt())
        .collect();
    (mean, rstd)
}

/// A shard's backward sums per column, given the (merged) statistics.
pub(crate) fn partial_grads(
    (x, dy): (&[f32], &[f32]),
    shape: &Shape,
    opts: &BatchNorm<'_>,
    stats: &[ColumnStats],
) -> Vec<ColumnGrads> {
    let (mean, rstd) = mean_rstd(stats, opts.eps);
    let (dbeta, dgamma) = sums((x, dy), shape, opts.mask, (&mean, &rstd));
    let n = opts
        .mask
        .map_or(shape.positions, |m| m.iter().filter(|&&k| k).count()) as f64;
    dbeta
        .iter()
        .zip(&dgamma)
        .map(|(&sum_dy, &sum_dy_xhat)| ColumnGrads {
            count: n,
            sum_dy,
            sum_dy_xhat,
            pad: 0.0,
        })
        .collect()
}

/// dx of a shard from the (merged) statistics and (merged) sums.
pub(crate) fn apply_grads(
    (x, dy): (&[f32], &[f32]),
    dx: &mut [f32],
    shape: &Shape,
    opts: &BatchNorm<'_>,
    (stats, grads): (&[ColumnStats], &[ColumnGrads]),
) {
    let (mean, rstd) = mean_rstd(stats, opts.eps);
    let dbeta: Vec<f64> = grads.iter().map(|g| g.sum_dy).collect();
    let dgamma: Vec<f64> = grads.iter().map(|g| g.sum_dy_xhat).collect();
    let count = stats.first().map_or(0.0, |c| c.count) as usize;
    backward_dx_pass(
        (x, dy),
        dx,
        shape,
        opts,
        (&mean, &rstd),
        (&dbeta, &dgamma, count),
    );
}

multiversion! {
    fn backward_sums(x_dy: (&[f32], &[f32]), layout: (&Shape, Option<&[bool]>), stats: (&[f64], &[f64]), sums: (&mut [f64], &mut [f64])) => backward_sums_body
}

/// (Σ dy, Σ dy · xhat) per channel over the counted positions of whole batch items, added onto
/// `sums`: features-last row by row across the columns, channels-first channel run by run, so
/// the inner loop runs over contiguous values either way.
#[inline(always)]
fn backward_sums_body(
    (x, dy): (&[f32], &[f32]),
    (shape, mask): (&Shape, Option<&[bool]>),
    (mean, rstd): (&[f64], &[f64]),
    (s1, s2): (&mut [f64], &mut [f64]),
) {
    let (c, s) = (shape.channels, shape.spatial);
    let counted = |p: usize| mask.is_none_or(|m| m[p]);
    if s == 1 {
        for (r, (xr, dr)) in x.chunks_exact(c).zip(dy.chunks_exact(c)).enumerate() {
            if !counted(r) {
                continue;
            }
            let sums = s1.iter_mut().zip(s2.iter_mut());
            let stats = mean.iter().zip(rstd);
            for ((a, b), ((&v, &d), (&m, &r))) in sums.zip(xr.iter().zip(dr).zip(stats)) {
                let d = d as f64;
                *a += d;
                *b += d * ((v as f64 - m) * r);
            }
        }
        return;
    }
    for (n, (xi, di)) in x
        .chunks_exact(c * s)
        .zip(dy.chunks_exact(c * s))
        .enumerate()
    {
        for ch in 0..c {
            let run = ch * s..(ch + 1) * s;
            let (m, r) = (mean[ch], rstd[ch]);
            let (mut a, mut b) = (0f64, 0f64);
            for (sp, (&v, &d)) in xi[run.clone()].iter().zip(&di[run]).enumerate() {
                if counted(n * s + sp) {
                    let d = d as f64;
                    a += d;
                    b += d * ((v as f64 - m) * r);
                }
            }
            s1[ch] += a;
            s2[ch] += b;
        }
    }
}

multiversion! {
    fn backward_dx(x_dy: (&[f32], &[f32]), dx: &mut [f32], layout: (&Shape, Option<&[bool]>), coef: &[[f64; 4]], stream: bool) => backward_dx_body
}

/// dx of whole batch items from each channel's (mean, a, m1, b): a · (dy − m1 − (x − mean) · b)
/// on counted positions, 0 on masked ones; with `stream`, through non-temporal stores.
#[inline(always)]
fn backward_dx_body(
    (x, dy): (&[f32], &[f32]),
    dx: &mut [f32],
    (shape, mask): (&Shape, Option<&[bool]>),
    coef: &[[f64; 4]],
    stream: bool,
) {
    let (c, s) = (shape.channels, shape.spatial);
    if s == 1 {
        write_out(
            dx,
            stream,
            #[inline(always)]
            |out, off| {
                let (x, dy) = (&x[off..], &dy[off..]);
                dx_rows(out, (x, dy), off % c, mask.map(|m| (m, off / c)), coef)
            },
        );
        return;
    }
    let runs = dx
        .chunks_exact_mut(s)
        .zip(x.chunks_exact(s).zip(dy.chunks_exact(s)));
    for (run, (out, (xr, dr))) in runs.enumerate() {
        let (k, m) = (coef[run % c], mask.map(|m| &m[run / c * s..][..s]));
        write_out(
            out,
            stream,
            #[inline(always)]
            |out, off| {
                let values = xr[off..].iter().zip(&dr[off..]);
                for (i, (o, (&v, &d))) in out.iter_mut().zip(values).enumerate() {
                    *o = if m.is_none_or(|m| m[off + i]) {
                        dx_of(v, d, k)
                    } else {
                        0.0
                    };
                }
            },
        );
    }
}

/// One value of dx from its channel's (mean, a, m1, b).
#[inline(always)]
fn dx_of(v: f32, d: f32, [m, a, m1, b]: [f64; 4]) -> f32 {
    (a * ((d as f64 - m1) - (v as f64 - m) * b)) as f32
}

/// Features-last dx starting at column `ch0` of a row; `mask` is (the block's mask, the row
/// `out` starts in).
#[inline(always)]
fn dx_rows(
    out: &mut [f32],
    (x, dy): (&[f32], &[f32]),
    ch0: usize,
    mask: Option<(&[bool], usize)>,
    coef: &[[f64; 4]],
) {
    row_pieces(
        out,
        (coef.len(), ch0),
        mask,
        #[inline(always)]
        |part, done, span| {
            let values = x[done..].iter().zip(&dy[done..]);
            for ((o, (&v, &d)), &k) in part.iter_mut().zip(values).zip(&coef[span]) {
                *o = dx_of(v, d, k);
            }
        },
    );
}

/// Walks features-last output `out` of rows of `c` values, starting at column `ch0` of a row,
/// one piece of a row at a time, so each inner loop is a plain zip over columns:
/// `fill(part, done, columns)` writes each piece of a counted row (`done` values of `out` before
/// it); a masked row's pieces are 0. `mask` is (the block's mask, the row `out` starts in).
#[inline(always)]
fn row_pieces(
    out: &mut [f32],
    (c, ch0): (usize, usize),
    mask: Option<(&[bool], usize)>,
    fill: impl Fn(&mut [f32], usize, Range<usize>),
) {
    let (mut done, mut ch, mut row) = (0, ch0, mask.map_or(0, |m| m.1));
    while done < out.len() {
        let len = (c - ch).min(out.len() - done);
        let part = &mut out[done..done + len];
        if mask.is_some_and(|(m, _)| !m[row]) {
            part.fill(0.0);
        } else {
            fill(part, done, ch..ch + len);
        }
        done += len;
        ch = 0;
        row += 1;
    }
}

/// The mean and biased variance of channel `ch` over the counted positions, in f64 straight
/// from x: for the rare columns whose f32 statistics leave f32's range.
#[cold]
pub(crate) fn column_in_f64(
    x: &[f32],
    shape: &Shape,
    mask: Option<&[bool]>,
    ch: usize,
) -> (f64, f64) {
    let (c, s) = (shape.channels, shape.spatial);
    let values = || {
        (0..shape.positions)
            .filter(move |&p| mask.is_none_or(|m| m[p]))
            .map(move |p| x[((p / s) * c + ch) * s + p % s] as f64)
    };
    let n = values().count() as f64;
    let mean = values().sum::<f64>() / n;
    let var = values().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    (mean, var)
}

/// Redoes `columns`, whose f32 statistics went out of f32's range (see [`stats_out_of_range`]),
/// in f64 over the counted positions: their mean and biased variance (as f32: a variance past
/// f32's range is inf) and their outputs in `y`. Rare, so plain strided loops. Used by both
/// backends: the GPU's statistics go out of range for the same data.
#[cold]
pub(crate) fn redo_columns_in_f64(
    x: &[f32],
    y: &mut [f32],
    shape: &Shape,
    opts: &BatchNorm<'_>,
    (mean, var): (&mut [f32], &mut [f32]),
    columns: &[usize],
) {
    let (channels, s) = (shape.channels, shape.spatial);
    let index = |p: usize, c: usize| ((p / s) * channels + c) * s + p % s;
    let counted = |p: &usize| opts.mask.is_none_or(|m| m[*p]);
    for &c in columns {
        let n = (0..shape.positions).filter(counted).count() as f64;
        let value = |p: usize| x[index(p, c)] as f64;
        let m = (0..shape.positions).filter(counted).map(value).sum::<f64>() / n;
        let v = (0..shape.positions)
            .filter(counted)
            .map(|p| (value(p) - m).powi(2))
            .sum::<f64>()
            / n;
        let scale = opts.gamma.map_or(1.0, |g| g[c] as f64) / (v + opts.eps as f64).sqrt();
        let offset = opts.beta.map_or(0.0, |b| b[c] as f64);
        for p in 0..shape.positions {
            y[index(p, c)] = if counted(&p) {
                ((value(p) - m) * scale + offset) as f32
            } else {
                0.0
            };
        }
        mean[c] = m as f32;
        var[c] = v as f32;
    }
}

/// Eval: one elementwise pass with the running statistics.
pub(crate) fn eval<T: Element>(
    x: &[T],
    y: &mut [T],
    shape: &Shape,
    opts: &BatchNorm<'_>,
    stats: &RunningStats,
) {
    let var: Vec<f64> = stats.var.iter().map(|&v| v as f64).collect();
    let cols = Columns::new(vec![0.0; shape.channels], stats.mean.clone(), &var, opts);
    apply(x, y, shape, opts.mask, &cols);
}

/// Count, mean and sum of squared deviations of every column's shifted values over some
/// positions. The mask applies to whole positions, so every column counts the same `n`.
#[derive(Debug, Clone)]
struct Moments {
    n: f64,
    mean: Vec<f64>,
    m2: Vec<f64>,
    /// With the backward pass's dy: (Σ dy, Σ dy · (x − shift)) per column, in f64 (else empty).
    /// Every block shifts a column by the same value, so these merge by addition.
    grads: (Vec<f64>, Vec<f64>),
}

impl Moments {
    fn empty(columns: usize) -> Moments {
        Moments {
            n: 0.0,
            mean: vec![0.0; columns],
            m2: vec![0.0; columns],
            grads: (Vec::new(), Vec::new()),
        }
    }

    /// Empty, with gradient sums of `columns` values where `dy` is taken.
    fn empty_for(columns: usize, dy: bool) -> Moments {
        let zeros = || vec![0.0; if dy { columns } else { 0 }];
        Moments {
            grads: (zeros(), zeros()),
            ..Moments::empty(columns)
        }
    }

    /// Chan et al.'s parallel merge of `o` into `self`; the weights are shared by every column.
    fn merge(&mut self, o: &Moments) {
        if o.n == 0.0 {
            return;
        }
        if self.n == 0.0 {
            self.clone_from(o);
            return;
        }
        let n = self.n + o.n;
        let (w, v) = (o.n / n, self.n * o.n / n);
        for ((mean, m2), (&om, &om2)) in self
            .mean
            .iter_mut()
            .zip(&mut self.m2)
            .zip(o.mean.iter().zip(&o.m2))
        {
            let delta = om - *mean;
            *mean += delta * w;
            *m2 += om2 + delta * delta * v;
        }
        for (sums, other) in [
            (&mut self.grads.0, &o.grads.0),
            (&mut self.grads.1, &o.grads.1),
        ] {
            sums.iter_mut().zip(other).for_each(|(a, b)| *a += b);
        }
        self.n = n;
    }
}

/// Per-column normalization constants: y = ((x − shift) − center) · scale + offset.
struct Columns {
    shift: Vec<f32>,
    center: Vec<f32>,
    scale: Vec<f32>,
    offset: Vec<f32>,
}

impl Columns {
    /// From per-column (shift, center, variance) and the options' eps, gamma and beta.
    fn new(shift: Vec<f32>, center: Vec<f32>, var: &[f64], opts: &BatchNorm<'_>) -> Columns {
        let scale = var
            .iter()
            .enumerate()
            .map(|(c, &v)| {
                let rstd = 1.0 / (v + opts.eps as f64).sqrt();
                (rstd * opts.gamma.map_or(1.0, |g| g[c] as f64)) as f32
            })
            .collect();
        let offset = match opts.beta {
            Some(b) => b.to_vec(),
            None => vec![0.0; var.len()],
        };
        Columns {
            shift,
            center,
            scale,
            offset,
        }
    }
}

/// Blocks are merged in order inside each of at most this many groups, then the groups in order:
/// a fixed partition, so the bits do not depend on the thread count, and memory for partial
/// statistics stays at `GROUPS × columns`.
const GROUPS: usize = 64;

/// Batch statistics: (shift, mean of x − shift, biased var) per column, each column shifted by
/// its value at position `first` (a counted one).
fn stats(
    x: &[f32],
    shape: &Shape,
    mask: Option<&[bool]>,
    first: usize,
) -> (Vec<f32>, Vec<f64>, Vec<f64>) {
    let (shift, total) = moments(x, None, shape, mask, first);
    let var = total.m2.iter().map(|m2| m2 / total.n).collect();
    (shift, total.mean, var)
}

/// Each column's shift (its value at position `first`, a counted one) and the moments of the
/// shifted values over the counted positions; with `dy`, also the backward pass's sums, taken
/// while each tile of x is in cache: x is read from memory once for both.
fn moments(
    x: &[f32],
    dy: Option<&[f32]>,
    shape: &Shape,
    mask: Option<&[bool]>,
    first: usize,
) -> (Vec<f32>, Moments) {
    let c = shape.channels;
    let s = shape.spatial;
    let shift: Vec<f32> = (0..c)
        .map(|ch| x[((first / s) * c + ch) * s + first % s])
        .collect();
    // A block: whole rows (features-last) or one batch item (channels-first).
    let block = if s == 1 {
        (TASK_VALUES / c).max(MIN_STATS_ROWS) * c
    } else {
        c * s
    };
    let blocks = x.len().div_ceil(block);
    let per_group = blocks.div_ceil(GROUPS).max(1) * block;
    let groups: Vec<Moments> = x
        .par_chunks(per_group)
        .enumerate()
        .map(|(g, xg)| {
            let dg = dy.map(|d| &d[g * per_group..][..xg.len()]);
            let mut acc = Moments::empty_for(c, dy.is_some());
            // Scratch reused by every block of the group: a block is small, columns may be many.
            let mut block_moments = Moments::empty_for(c, dy.is_some());
            let mut scratch = vec![0f32; 3 * c];
            for (b, xb) in xg.chunks(block).enumerate() {
                let p0 = (g * per_group + b * block) / c / s * s;
                let m = mask.map(|m| &m[p0..p0 + xb.len() / c]);
                let db = dg.map(|d| &d[b * block..][..xb.len()]);
                if s == 1 {
                    // The block after this one, in this group: its first tile is prefetched
                    // while the last tile of this one is read.
                    let next =
                        &xg[((b + 1) * block).min(xg.len())..((b + 2) * block).min(xg.len())];
                    let io = ((xb, db), next);
                    features_last_block(io, c, m, &shift, &mut block_moments, &mut scratch);
                } else {
                    channels_first_plane((xb, db), s, m, &shift, &mut block_moments);
                }
                acc.merge(&block_moments);
            }
            acc
        })
        .collect();
    let mut total = Moments::empty_for(c, dy.is_some());
    for g in &groups {
        total.merge(g);
    }
    (shift, total)
}

/// Columns per statistics tile. A block's rows are read one tile (the block's rows × `STRIP`
/// columns) at a time, twice: from memory, then from L2. A tile stays small even when rows are
/// long, and its f32 partial sums, shifts and centres (3 × 4 KiB) stay in L1.
const STRIP: usize = 1024;

/// A rectangle of a features-last tensor: the rows of `data` (row length `stride`), columns
/// `cols` of each.
struct Tile<'a> {
    data: &'a [f32],
    stride: usize,
    cols: Range<usize>,
}

impl Tile<'_> {
    #[inline(always)]
    fn rows(&self) -> usize {
        self.data.len() / self.stride
    }

    #[inline(always)]
    fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.stride..][self.cols.clone()]
    }
}

/// A block of x, with the backward pass's dy over the same positions where given, and the block
/// of x read after it (for prefetching; may be empty).
type BlockIo<'a> = ((&'a [f32], Option<&'a [f32]>), &'a [f32]);

multiversion! {
    /// A block of whole rows x (with the backward pass's dy where given), into `out`, one tile
    /// of `STRIP` columns after another; `next` is the block of x read after this one (may be
    /// empty), whose first tile is prefetched during the last tile of this one. Sums run along
    /// rows so the inner loop over columns vectorises; each column sums at most `SUB_ROWS`
    /// values in f32 before adding them in f64. `scratch` holds 3 × columns values.
    fn features_last_block(
        io: BlockIo<'_>, c: usize, mask: Option<&[bool]>, shift: &[f32],
        out: &mut Moments, scratch: &mut [f32],
    ) => features_last_block_body
}

#[inline(always)]
fn features_last_block_body(
    ((xb, db), next): BlockIo<'_>,
    c: usize,
    mask: Option<&[bool]>,
    shift: &[f32],
    out: &mut Moments,
    scratch: &mut [f32],
) {
    let counted = |r: usize| mask.is_none_or(|m| m[r]);
    let n = (0..xb.len() / c).filter(|&r| counted(r)).count();
    out.n = n as f64;
    out.mean.fill(0.0);
    out.m2.fill(0.0);
    out.grads.0.fill(0.0);
    out.grads.1.fill(0.0);
    if n == 0 {
        return;
    }
    let (part, rest) = scratch.split_at_mut(c);
    let (part_lin, mean) = rest.split_at_mut(c);
    let strip = |k: usize| k..(k + STRIP).min(c);
    for k in (0..c).step_by(STRIP) {
        let cols = strip(k);
        let tile = Tile {
            data: xb,
            stride: c,
            cols: cols.clone(),
        };
        // Pass one reads the tile from memory while the next tile comes in; pass two finds the
        // tile in cache.
        let ahead = if cols.end < c {
            Tile {
                data: xb,
                stride: c,
                cols: strip(cols.end),
            }
        } else {
            Tile {
                data: next,
                stride: c,
                cols: strip(0),
            }
        };
        let (sh, ce) = (&shift[cols.clone()], &mut mean[cols.clone()]);
        let sums = &mut out.mean[cols.clone()];
        column_pass::<false>(
            &tile,
            &counted,
            (sh, &[]),
            (part, &mut []),
            (sums, &mut []),
            Some(&ahead),
        );
        for (m, s) in ce.iter_mut().zip(sums.iter_mut()) {
            *m = (*s / n as f64) as f32;
            *s = 0.0;
        }
        // The corrected two-pass: Σ e and Σ e² of e = d − center give the mean as center +
        // Σ e / n, in f64, however far the shift lies from it (an f32 center alone is a rounding
        // of |mean − shift| off), and M2 = Σ e² − (Σ e)² / n.
        let (m2, lin) = (&mut out.m2[cols.clone()], &mut out.mean[cols.clone()]);
        column_pass::<true>(&tile, &counted, (sh, ce), (part, part_lin), (m2, lin), None);
        for ((m2, mean), &ce) in m2.iter_mut().zip(lin.iter_mut()).zip(ce.iter()) {
            *m2 -= *mean * *mean / n as f64;
            *mean = ce as f64 + *mean / n as f64;
        }
        if let Some(db) = db {
            let dy = Tile {
                data: db,
                stride: c,
                cols: cols.clone(),
            };
            let sums = (&mut out.grads.0[cols.clone()], &mut out.grads.1[cols]);
            gradient_pass((&tile, &dy), &counted, sh, sums);
        }
    }
}

/// (Σ dy, Σ dy · (x − shift)) over the tile's counted rows, in f64, added onto `sums`: x from
/// cache (the statistics have just read it), dy from memory, two rows at a time so one load
/// and store of the sums serves both. x − shift is exact in f64.
#[inline(always)]
fn gradient_pass(
    (x, dy): (&Tile<'_>, &Tile<'_>),
    counted: &impl Fn(usize) -> bool,
    shift: &[f32],
    (s1, s2): (&mut [f64], &mut [f64]),
) {
    let term = |v: f32, sh: f32, g: f32| (g as f64, g as f64 * (v as f64 - sh as f64));
    let mut rows = (0..x.rows()).filter(|&r| counted(r));
    while let Some(first) = rows.next() {
        // dy's rows of a tile are apart in memory when rows are long, where the hardware's
        // prefetcher stops at each page: ask for the rows four ahead before use.
        for r in (first + 4..first + 6).filter(|&r| r < x.rows()) {
            super::prefetch(dy.row(r));
        }
        let (xa, da) = (x.row(first), dy.row(first));
        if let Some(r) = rows.next() {
            let (xb, db) = (x.row(r), dy.row(r));
            let values = xa.iter().zip(da).zip(xb.iter().zip(db)).zip(shift);
            for ((a, b), (((&va, &ga), (&vb, &gb)), &sh)) in s1.iter_mut().zip(&mut *s2).zip(values)
            {
                let ((g1, p1), (g2, p2)) = (term(va, sh, ga), term(vb, sh, gb));
                *a += g1 + g2;
                *b += p1 + p2;
            }
        } else {
            let values = xa.iter().zip(da).zip(shift);
            for ((a, b), ((&v, &g), &sh)) in s1.iter_mut().zip(&mut *s2).zip(values) {
                let (g, p) = term(v, sh, g);
                *a += g;
                *b += p;
            }
        }
    }
}

/// acc[ch] += Σ over the tile's counted rows of d (SQUARE = false), or acc[ch] += Σ e² and
/// lin[ch] += Σ e, e = d − center[ch] (SQUARE = true), d = x[row, ch] − shift[ch]; in f32 runs
/// of `SUB_ROWS` rows (in `part` and `part_lin`) that are then added in f64. `ahead` (a tile read
/// later, with at most as many rows) is prefetched in step, row by row and segment by segment,
/// one 64-byte line per 16 values, so requests go out evenly instead of in bursts. Without
/// SQUARE, `center`, `part_lin` and `lin` are unused (may be empty).
#[inline(always)]
fn column_pass<const SQUARE: bool>(
    tile: &Tile<'_>,
    counted: &impl Fn(usize) -> bool,
    (shift, center): (&[f32], &[f32]),
    (part, part_lin): (&mut [f32], &mut [f32]),
    (acc, lin): (&mut [f64], &mut [f64]),
    ahead: Option<&Tile<'_>>,
) {
    const SEGMENT: usize = 256;
    let (rows, width) = (tile.rows(), tile.cols.len());
    let part = &mut part[..width];
    let part_lin = &mut part_lin[..if SQUARE { width } else { 0 }];
    let next = |r: usize| match ahead {
        Some(a) if r < a.rows() => a.row(r),
        _ => &[],
    };
    for r0 in (0..rows).step_by(SUB_ROWS) {
        part.fill(0.0);
        part_lin.fill(0.0);
        let end_r = (r0 + SUB_ROWS).min(rows);
        // Two rows at a time: one load and store of the partial sums serve both.
        for r in (r0..end_r).step_by(2) {
            let pair = r + 1 < end_r;
            let (a, b) = (tile.row(r), if pair { tile.row(r + 1) } else { &[] });
            let (na, nb) = (next(r), if pair { next(r + 1) } else { &[] });
            let live = (counted(r), pair && counted(r + 1));
            for k in (0..width).step_by(SEGMENT) {
                for n in [na, nb] {
                    super::prefetch(&n[k.min(n.len())..(k + SEGMENT).min(n.len())]);
                }
                let end = k + SEGMENT.min(width - k);
                let (p, sh) = (&mut part[k..end], &shift[k..end]);
                let rows = match live {
                    (true, true) => [Some(&a[k..end]), Some(&b[k..end])],
                    (true, false) => [Some(&a[k..end]), None],
                    (false, true) => [Some(&b[k..end]), None],
                    (false, false) => [None, None],
                };
                if SQUARE {
                    let (q, ce) = (&mut part_lin[k..end], &center[k..end]);
                    add_centered(p, q, rows, sh, ce);
                } else {
                    add_shifted(p, rows, sh);
                }
            }
        }
        for (a, &p) in acc.iter_mut().zip(part.iter()) {
            *a += p as f64;
        }
        for (a, &p) in lin.iter_mut().zip(part_lin.iter()) {
            *a += p as f64;
        }
    }
}

/// p += v − sh of one or two rows (the two added to each other first).
#[inline(always)]
fn add_shifted(p: &mut [f32], rows: [Option<&[f32]>; 2], sh: &[f32]) {
    match rows {
        [Some(a), Some(b)] => {
            for (((p, &a), &b), &sh) in p.iter_mut().zip(a).zip(b).zip(sh) {
                *p += (a - sh) + (b - sh);
            }
        }
        [Some(a), None] => {
            for ((p, &a), &sh) in p.iter_mut().zip(a).zip(sh) {
                *p += a - sh;
            }
        }
        _ => {}
    }
}

/// p += e² and q += e, e = (v − sh) − ce, of one or two rows (the two added to each other
/// first).
#[inline(always)]
fn add_centered(p: &mut [f32], q: &mut [f32], rows: [Option<&[f32]>; 2], sh: &[f32], ce: &[f32]) {
    let e = |v: f32, sh: f32, ce: f32| (v - sh) - ce;
    match rows {
        [Some(a), Some(b)] => {
            let values = a.iter().zip(b).zip(sh.iter().zip(ce));
            for ((p, q), ((&a, &b), (&sh, &ce))) in p.iter_mut().zip(q).zip(values) {
                let (ea, eb) = (e(a, sh, ce), e(b, sh, ce));
                *p += ea * ea + eb * eb;
                *q += ea + eb;
            }
        }
        [Some(a), None] => {
            let values = a.iter().zip(sh.iter().zip(ce));
            for ((p, q), (&a, (&sh, &ce))) in p.iter_mut().zip(q).zip(values) {
                let ea = e(a, sh, ce);
                *p += ea * ea;
                *q += ea;
            }
        }
        _ => {}
    }
}

/// One batch item of a channels-first tensor, into `out`: each channel is a contiguous run of
/// `s` values, and the mask holds the item's `s` positions.
fn channels_first_plane(
    (plane, dy): (&[f32], Option<&[f32]>),
    s: usize,
    mask: Option<&[bool]>,
    shift: &[f32],
    out: &mut Moments,
) {
    out.n = mask.map_or(s, |m| m.iter().filter(|&&k| k).count()) as f64;
    if out.n == 0.0 {
        return;
    }
    if let Some(dy) = dy {
        // Each channel's run is in cache when its statistics below read it again.
        let runs = plane.chunks_exact(s).zip(dy.chunks_exact(s)).zip(shift);
        let sums = out.grads.0.iter_mut().zip(&mut out.grads.1);
        for (((run, grads), &sh), (a, b)) in runs.zip(sums) {
            let kept = run.iter().zip(grads).enumerate();
            let kept = kept.filter(|(p, _)| mask.is_none_or(|m| m[*p]));
            (*a, *b) = (0.0, 0.0);
            for (_, (&v, &g)) in kept {
                *a += g as f64;
                *b += g as f64 * (v as f64 - sh as f64);
            }
        }
    }
    for ((run, &sh), (mean, m2)) in plane
        .chunks_exact(s)
        .zip(shift)
        .zip(out.mean.iter_mut().zip(&mut out.m2))
    {
        match mask {
            None => {
                // The corrected two-pass, as for features-last tiles.
                let m = (super::sum_shifted(run, sh) / s as f64) as f32;
                let lin = super::sum_centered(run, sh, m);
                *mean = m as f64 + lin / s as f64;
                *m2 = super::sum_sq_centered::<f32>(run, sh, m, &[]) - lin * lin / s as f64;
            }
            Some(mk) => {
                let kept = || run.iter().zip(mk).filter(|(_, &k)| k).map(|(&v, _)| v);
                *mean = kept().map(|v| (v - sh) as f64).sum::<f64>() / out.n;
                *m2 = kept().map(|v| ((v - sh) as f64 - *mean).powi(2)).sum();
            }
        }
    }
}

/// y = ((x − shift) − center) · scale + offset per column; masked positions are 0. Blocks run
/// in reverse order: after the statistics pass the end of x is the part most likely in cache.
fn apply<T: Element>(x: &[T], y: &mut [T], shape: &Shape, mask: Option<&[bool]>, cols: &Columns) {
    let c = shape.channels;
    let s = shape.spatial;
    let stream = should_stream(y);
    let block = if s == 1 {
        (TASK_VALUES / c).max(1) * c
    } else {
        c * s
    };
    y.par_chunks_mut(block)
        .zip(x.par_chunks(block))
        .enumerate()
        .rev()
        .for_each(|(b, (yb, xb))| {
            let first = b * block / c / s * s;
            let m = mask.map(|m| &m[first..first + yb.len() / c]);
            apply_block(xb, yb, c, s, m, cols, stream);
            stream_fence();
        });
}

multiversion! {
    fn apply_block<T: Element>(x: &[T], y: &mut [T], c: usize, s: usize, mask: Option<&[bool]>, cols: &Columns, stream: bool)
        => apply_block_body
}

/// One block of whole rows (features-last) or whole batch items (channels-first); `mask` holds
/// the block's positions. A half block is widened and rounded a stage at a time as it is
/// written.
#[inline(always)]
fn apply_block_body<T: Element>(
    x: &[T],
    y: &mut [T],
    c: usize,
    s: usize,
    mask: Option<&[bool]>,
    cols: &Columns,
    stream: bool,
) {
    if s == 1 {
        write_out(
            y,
            stream,
            #[inline(always)]
            |out, off| {
                let mut stage = [0.0; STAGE];
                let xs = staged(&x[off..off + out.len()], &mut stage);
                fill_rows(out, xs, off % c, mask.map(|m| (m, off / c)), cols);
            },
        );
    } else {
        for (ch, (yr, xr)) in y.chunks_exact_mut(s).zip(x.chunks_exact(s)).enumerate() {
            let k = [
                cols.shift[ch],
                cols.center[ch],
                cols.scale[ch],
                cols.offset[ch],
            ];
            write_out(
                yr,
                stream,
                #[inline(always)]
                |out, off| {
                    let mut stage = [0.0; STAGE];
                    let xs = staged(&xr[off..off + out.len()], &mut stage);
                    fill_run(out, xs, k, mask.map(|m| &m[off..]));
                },
            );
        }
    }
}

/// Features-last output starting at column `ch0` of a row; `mask` is (the block's mask, the row
/// `out` starts in).
#[inline(always)]
fn fill_rows(
    out: &mut [f32],
    x: &[f32],
    ch0: usize,
    mask: Option<(&[bool], usize)>,
    cols: &Columns,
) {
    row_pieces(
        out,
        (cols.shift.len(), ch0),
        mask,
        #[inline(always)]
        |part, done, span| {
            let (sh, ce) = (&cols.shift[span.clone()], &cols.center[span.clone()]);
            let (sc, of) = (&cols.scale[span.clone()], &cols.offset[span]);
            for (((o, &v), (&sh, &ce)), (&sc, &of)) in part
                .iter_mut()
                .zip(&x[done..])
                .zip(sh.iter().zip(ce))
                .zip(sc.iter().zip(of))
            {
                *o = ((v - sh) - ce) * sc + of;
            }
        },
    );
}

/// Channels-first output for part of one channel's run: constants k = (shift, center, scale,
/// offset); `mask` holds the positions of `out`.
#[inline(always)]
fn fill_run(out: &mut [f32], x: &[f32], k: [f32; 4], mask: Option<&[bool]>) {
    let [sh, ce, sc, of] = k;
    match mask {
        None => {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = ((v - sh) - ce) * sc + of;
            }
        }
        Some(m) => {
            for ((o, &v), &keep) in out.iter_mut().zip(x).zip(m) {
                *o = if keep { ((v - sh) - ce) * sc + of } else { 0.0 };
            }
        }
    }
}

// ---- Half tensors ------------------------------------------------------------------------------
//
// A half tensor's statistics (and the backward's sums) are taken in pieces of whole batch items,
// each widened into f32 scratch of about `HALF_PIECE` values when it is read, and merged in
// order with Chan's formula in f64 (the pieces are shards of one batch, as SyncBatchNorm's).
// The output passes of training and eval are generic over the element type (`apply`): each
// stage of x widened and each output rounded as it is written. The backward's dx pass runs
// piece by piece. No full-size f32 copy of any tensor; the f32 arithmetic is that of f32
// tensors.

/// Values of one piece of a half tensor, about: 4 MiB of f32 scratch per tensor read.
const HALF_PIECE: usize = 1 << 20;

/// One piece of a half tensor: its values, its positions (for the mask) and its shape.
struct Piece {
    values: Range<usize>,
    positions: Range<usize>,
    shape: Shape,
}

impl Piece {
    /// `opts` with the mask cut to the piece's positions.
    fn opts<'a>(&self, opts: &BatchNorm<'a>) -> BatchNorm<'a> {
        BatchNorm {
            mask: opts.mask.map(|m| &m[self.positions.clone()]),
            ..*opts
        }
    }
}

/// `shape`'s pieces of whole batch items, in order.
fn pieces(shape: &Shape) -> Vec<Piece> {
    let (item, s) = (shape.row_width(), shape.spatial);
    let items = shape.positions / s;
    let per = (HALF_PIECE / item).max(1);
    (0..items)
        .step_by(per)
        .map(|first| {
            let k = per.min(items - first);
            Piece {
                values: first * item..(first + k) * item,
                positions: first * s..(first + k) * s,
                shape: Shape {
                    channels: shape.channels,
                    spatial: s,
                    positions: k * s,
                },
            }
        })
        .collect()
}

/// The values of `src` as f32 in `scratch` (resized to fit).
fn widened<'s, T: Element>(src: &[T], scratch: &'s mut Vec<f32>) -> &'s mut [f32] {
    let wide = output(src.len(), scratch);
    widen_all(src, wide);
    wide
}

/// `len` values of `scratch` (resized to fit) for an output.
fn output(len: usize, scratch: &mut Vec<f32>) -> &mut [f32] {
    scratch.resize(len, 0.0);
    scratch
}

/// Statistics of a half tensor, piece by piece, merged in order.
fn merged_stats<T: Element>(
    x: &[T],
    pieces: &[Piece],
    opts: &BatchNorm<'_>,
    scratch: &mut Vec<f32>,
) -> PartialStats {
    let parts: Vec<PartialStats> = pieces
        .iter()
        .map(|p| PartialStats {
            columns: partial_stats(
                widened(&x[p.values.clone()], scratch),
                &p.shape,
                &p.opts(opts),
            ),
        })
        .collect();
    PartialStats::merge(&parts).expect("pieces of one tensor share their features")
}

/// Training on a half tensor (see the section's head): y, and the batch statistics.
pub(crate) fn train_of<T: Element>(
    x: &[T],
    y: &mut [T],
    shape: &Shape,
    opts: &BatchNorm<'_>,
) -> BatchStats {
    let mut scratch = Vec::new();
    let merged = merged_stats(x, &pieces(shape), opts, &mut scratch);
    drop(scratch);
    apply_stats(x, y, shape, opts, &merged.columns);
    merged.batch_stats()
}

/// Training's backward pass on half tensors, piece by piece: each piece's statistics and sums
/// (x and dy widened once for both), merged as shards are, then dx. Returns (dgamma, dbeta).
pub(crate) fn backward_of<T: Element>(
    (x, dy): (&[T], &[T]),
    dx: &mut [T],
    shape: &Shape,
    opts: &BatchNorm<'_>,
) -> (Vec<f32>, Vec<f32>) {
    let pieces = pieces(shape);
    let (mut xs, mut ds, mut dxs) = (Vec::new(), Vec::new(), Vec::new());
    let parts = pieces
        .iter()
        .map(|p| {
            let xw = widened(&x[p.values.clone()], &mut xs);
            let dyw = widened(&dy[p.values.clone()], &mut ds);
            stats_and_sums((xw, dyw), &p.shape, &p.opts(opts))
        })
        .collect();
    let (stats, grads) = merged_grads(parts, opts.eps);
    for p in &pieces {
        let xw = widened(&x[p.values.clone()], &mut xs);
        let dyw = widened(&dy[p.values.clone()], &mut ds);
        let dxw = output(p.values.len(), &mut dxs);
        apply_grads((xw, dyw), dxw, &p.shape, &p.opts(opts), (&stats, &grads));
        narrow_all(dxw, &mut dx[p.values.clone()]);
    }
    grads_of(&grads)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The build for wider registers and the baseline build give the same bits.
    #[test]
    fn every_build_gives_the_same_bits() {
        for &c in &[1usize, 3, 33, 100, 1500] {
            let x: Vec<f32> = (0..c * 300)
                .map(|i| ((i * 7919) % 1013) as f32 * 0.37 + 1e3)
                .collect();
            let mask: Vec<bool> = (0..300).map(|r| r % 5 != 2).collect();
            let shift: Vec<f32> = x[..c].to_vec();
            let dy: Vec<f32> = x.iter().map(|v| v.sin()).collect();
            let (mut a, mut b) = (Moments::empty_for(c, true), Moments::empty_for(c, true));
            let mut scratch = vec![0f32; 3 * c];
            let io = ((&x[..], Some(&dy[..])), &[][..]);
            features_last_block(io, c, Some(&mask), &shift, &mut a, &mut scratch);
            features_last_block_body(io, c, Some(&mask), &shift, &mut b, &mut scratch);
            assert_eq!((a.n, &a.mean, &a.m2), (b.n, &b.mean, &b.m2), "{c} columns");
            assert_eq!(a.grads, b.grads, "{c} columns");

            let var: Vec<f64> = (0..c).map(|i| 1.0 + i as f64).collect();
            let cols = Columns::new(shift.clone(), vec![0.5; c], &var, &BatchNorm::default());
            for stream in [false, true] {
                let mut wide = vec![0f32; x.len()];
                let mut base = vec![1f32; x.len()];
                apply_block(&x, &mut wide, c, 1, Some(&mask), &cols, stream);
                apply_block_body(&x, &mut base, c, 1, Some(&mask), &cols, stream);
                crate::cpu::stream_fence();
                assert!(
                    wide.iter()
                        .zip(&base)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{c} columns, stream {stream}"
                );
            }

            // The dx pass, features-last and (the same values as 3 channels of 100 positions)
            // channels-first, with and without streaming stores.
            let coef: Vec<[f64; 4]> = (0..c)
                .map(|i| [1e3 + i as f64, 0.5, 0.1 * i as f64, 0.01])
                .collect();
            let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            let layouts = [
                (Shape::features_last(x.len(), c).unwrap(), Some(&mask[..])),
                (Shape::channels_first(x.len(), c, 100).unwrap(), None),
            ];
            for (shape, m) in layouts {
                let mut want = vec![0f32; x.len()];
                backward_dx_body((&x, &dy), &mut want, (&shape, m), &coef, false);
                for stream in [false, true] {
                    let mut wide = vec![1f32; x.len()];
                    backward_dx((&x, &dy), &mut wide, (&shape, m), &coef, stream);
                    crate::cpu::stream_fence();
                    assert_eq!(bits(&wide), bits(&want), "{c} columns, stream {stream}");
                }
            }
        }
    }

    /// The output pass on half tensors gives the same bits in both builds, with and without
    /// streaming stores, features-last (masked) and channels-first, as on the f32 values of the
    /// same tensor rounded once.
    #[test]
    fn half_outputs_round_the_f32_pass() {
        half_outputs::<half::f16>();
        half_outputs::<half::bf16>();
    }

    fn half_outputs<T: Element>() {
        for &c in &[1usize, 3, 33, 100] {
            let wide: Vec<f32> = (0..c * 300)
                .map(|i| ((i * 7919) % 1013) as f32 * 0.37 + 1e2)
                .collect();
            let x: Vec<T> = crate::element::narrow(wide.clone());
            let x32 = crate::element::widen(&x).into_owned();
            let mask: Vec<bool> = (0..300).map(|r| r % 5 != 2).collect();
            let bits = |v: &[T]| bytemuck::cast_slice::<T, u8>(v).to_vec();
            // Features-last with c columns, and channels-first: one batch item (a block) of 3
            // channels of 100 positions.
            for (s, m) in [(1, Some(&mask[..])), (100, None)] {
                let (c, x, x32) = if s == 1 {
                    (c, &x[..], &x32[..])
                } else {
                    (3, &x[..300], &x32[..300])
                };
                let var: Vec<f64> = (0..c).map(|i| 1.0 + i as f64).collect();
                let cols =
                    Columns::new(x32[..c].to_vec(), vec![0.5; c], &var, &BatchNorm::default());
                let mut f32_out = vec![0f32; x.len()];
                apply_block_body(x32, &mut f32_out, c, s, m, &cols, false);
                let want = bits(&crate::element::narrow::<T>(f32_out));
                for stream in [false, true] {
                    let (mut wide_out, mut base) = (vec![T::default(); x.len()], x.to_vec());
                    apply_block(x, &mut wide_out, c, s, m, &cols, stream);
                    apply_block_body(x, &mut base, c, s, m, &cols, stream);
                    crate::cpu::stream_fence();
                    let what = format!("{} {c} columns, spatial {s}, stream {stream}", T::NAME);
                    assert_eq!(bits(&wide_out), want, "{what}");
                    assert_eq!(bits(&base), want, "{what}");
                }
            }
        }
    }
}
