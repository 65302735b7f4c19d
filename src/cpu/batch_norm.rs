//! CPU mirror of `shaders/batch_norm.wgsl`: per-column statistics of the shifted values over
//! fixed blocks of positions (a two-pass inside each block, which is in cache), merged in block
//! order with Chan's formula, then one elementwise pass. Blocks depend on the shape only, so the
//! result does not depend on the number of threads.

use rayon::prelude::*;

use crate::batch_norm::Shape;
use crate::{BatchNorm, RunningStats};

/// Values per rayon task (statistics and apply): large enough to amortise scheduling, small
/// enough that a block's second pass finds it in L2.
const TASK_VALUES: usize = 65536;
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
    let mean = shift
        .iter()
        .zip(&mean_d)
        .map(|(&s, &m)| (s as f64 + m) as f32)
        .collect();
    let center = mean_d.iter().map(|&m| m as f32).collect();
    apply(
        x,
        y,
        shape,
        opts.mask,
        &Columns::new(shift, center, &var, opts),
    );
    (mean, var.iter().map(|&v| v as f32).collect())
}

/// Eval: one elementwise pass with the running statistics.
pub(crate) fn eval(
    x: &[f32],
    y: &mut [f32],
    shape: &Shape,
    opts: &BatchNorm<'_>,
    stats: &RunningStats,
) {
    let var: Vec<f64> = stats.var.iter().map(|&v| v as f64).collect();
    let cols = Columns::new(vec![0.0; shape.channels], stats.mean.clone(), &var, opts);
    apply(x, y, shape, opts.mask, &cols);
}

/// Count, mean and sum of squared deviations of one column's shifted values over some positions.
#[derive(Debug, Clone, Copy, Default)]
struct Moments {
    n: f64,
    mean: f64,
    m2: f64,
}

impl Moments {
    /// Chan et al.'s parallel merge.
    fn merge(self, o: Moments) -> Moments {
        if o.n == 0.0 {
            return self;
        }
        if self.n == 0.0 {
            return o;
        }
        let n = self.n + o.n;
        let delta = o.mean - self.mean;
        Moments {
            n,
            mean: self.mean + delta * (o.n / n),
            m2: self.m2 + o.m2 + delta * delta * (self.n * o.n / n),
        }
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

/// Batch statistics: (shift, mean of x − shift, biased var) per column, each column shifted by
/// its value at position `first` (a counted one).
fn stats(
    x: &[f32],
    shape: &Shape,
    mask: Option<&[bool]>,
    first: usize,
) -> (Vec<f32>, Vec<f64>, Vec<f64>) {
    let c = shape.channels;
    let s = shape.spatial;
    let shift: Vec<f32> = (0..c)
        .map(|ch| x[((first / s) * c + ch) * s + first % s])
        .collect();
    let blocks: Vec<Vec<Moments>> = if s == 1 {
        let rows = (TASK_VALUES / c).max(1);
        x.par_chunks(rows * c)
            .enumerate()
            .map(|(b, xb)| {
                let m = mask.map(|m| &m[b * rows..b * rows + xb.len() / c]);
                features_last_block(xb, c, m, &shift)
            })
            .collect()
    } else {
        x.par_chunks(c * s)
            .enumerate()
            .map(|(n, plane)| {
                let m = mask.map(|m| &m[n * s..(n + 1) * s]);
                channels_first_plane(plane, s, m, &shift)
            })
            .collect()
    };
    let mut total = vec![Moments::default(); c];
    for block in blocks {
        for (t, b) in total.iter_mut().zip(block) {
            *t = t.merge(b);
        }
    }
    let mean_d = total.iter().map(|m| m.mean).collect();
    let var = total.iter().map(|m| m.m2 / m.n).collect();
    (shift, mean_d, var)
}

/// A block of whole rows, two passes over it. Sums run along rows so the inner loop over columns
/// vectorises; each column sums at most `SUB_ROWS` values in f32 before adding them in f64.
fn features_last_block(xb: &[f32], c: usize, mask: Option<&[bool]>, shift: &[f32]) -> Vec<Moments> {
    let counted = |r: usize| mask.is_none_or(|m| m[r]);
    let n = (0..xb.len() / c).filter(|&r| counted(r)).count();
    if n == 0 {
        return vec![Moments::default(); c];
    }
    let mut sum = vec![0f64; c];
    column_sums(xb, c, &counted, &mut sum, |v, ch| v - shift[ch]);
    let mean: Vec<f32> = sum.iter().map(|s| (s / n as f64) as f32).collect();
    let mut m2 = vec![0f64; c];
    column_sums(xb, c, &counted, &mut m2, |v, ch| {
        let d = (v - shift[ch]) - mean[ch];
        d * d
    });
    mean.into_iter()
        .zip(m2)
        .map(|(mean, m2)| Moments {
            n: n as f64,
            mean: mean as f64,
            m2,
        })
        .collect()
}

/// acc[ch] += Σ over counted rows of f(x[row, ch], ch), in f32 runs of `SUB_ROWS` rows.
#[inline(always)]
fn column_sums(
    xb: &[f32],
    c: usize,
    counted: &impl Fn(usize) -> bool,
    acc: &mut [f64],
    f: impl Fn(f32, usize) -> f32,
) {
    let mut part = vec![0f32; c];
    for (sub, rows) in xb.chunks(SUB_ROWS * c).enumerate() {
        part.fill(0.0);
        for (r, row) in rows.chunks_exact(c).enumerate() {
            if counted(sub * SUB_ROWS + r) {
                for (ch, (p, &v)) in part.iter_mut().zip(row).enumerate() {
                    *p += f(v, ch);
                }
            }
        }
        for (a, &p) in acc.iter_mut().zip(&part) {
            *a += p as f64;
        }
    }
}

/// One batch item of a channels-first tensor: each channel is a contiguous run of `s` values.
fn channels_first_plane(
    plane: &[f32],
    s: usize,
    mask: Option<&[bool]>,
    shift: &[f32],
) -> Vec<Moments> {
    plane
        .chunks_exact(s)
        .zip(shift)
        .map(|(run, &sh)| match mask {
            None => {
                let mean = (super::sum_shifted(run, sh) / s as f64) as f32;
                Moments {
                    n: s as f64,
                    mean: mean as f64,
                    m2: super::sum_sq_centered(run, sh, mean),
                }
            }
            Some(m) => {
                let kept = || run.iter().zip(m).filter(|(_, &k)| k).map(|(&v, _)| v);
                let n = m.iter().filter(|&&k| k).count() as f64;
                if n == 0.0 {
                    return Moments::default();
                }
                let mean = kept().map(|v| (v - sh) as f64).sum::<f64>() / n;
                let m2 = kept().map(|v| ((v - sh) as f64 - mean).powi(2)).sum();
                Moments { n, mean, m2 }
            }
        })
        .collect()
}

/// y = ((x − shift) − center) · scale + offset per column; masked positions are 0.
fn apply(x: &[f32], y: &mut [f32], shape: &Shape, mask: Option<&[bool]>, cols: &Columns) {
    let c = shape.channels;
    let s = shape.spatial;
    let masked_out = |p: usize| mask.is_some_and(|m| !m[p]);
    if s == 1 {
        let rows = (TASK_VALUES / c).max(1);
        y.par_chunks_mut(rows * c)
            .zip(x.par_chunks(rows * c))
            .enumerate()
            .for_each(|(b, (yb, xb))| {
                for (r, (yr, xr)) in yb.chunks_exact_mut(c).zip(xb.chunks_exact(c)).enumerate() {
                    if masked_out(b * rows + r) {
                        yr.fill(0.0);
                        continue;
                    }
                    let params = cols
                        .shift
                        .iter()
                        .zip(&cols.center)
                        .zip(cols.scale.iter().zip(&cols.offset));
                    for ((o, &v), ((&sh, &ce), (&sc, &of))) in yr.iter_mut().zip(xr).zip(params) {
                        *o = ((v - sh) - ce) * sc + of;
                    }
                }
            });
    } else {
        y.par_chunks_mut(c * s)
            .zip(x.par_chunks(c * s))
            .enumerate()
            .for_each(|(n, (yp, xp))| {
                for (ch, (yr, xr)) in yp.chunks_exact_mut(s).zip(xp.chunks_exact(s)).enumerate() {
                    let (sh, ce, sc, of) = (
                        cols.shift[ch],
                        cols.center[ch],
                        cols.scale[ch],
                        cols.offset[ch],
                    );
                    for (i, (o, &v)) in yr.iter_mut().zip(xr).enumerate() {
                        *o = if masked_out(n * s + i) {
                            0.0
                        } else {
                            ((v - sh) - ce) * sc + of
                        };
                    }
                }
            });
    }
}
