//! CPU mirror of `shaders/batch_norm.wgsl`: per-column statistics of the shifted values over
//! fixed blocks of positions (a two-pass inside each block, which is in cache), merged in block
//! order with Chan's formula, then one elementwise pass. Blocks depend on the shape only, so
//! the result does not depend on the number of threads.

use rayon::prelude::*;

use crate::batch_norm::Shape;
use crate::BatchNorm;

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
pub(crate) struct Columns {
    pub shift: Vec<f32>,
    pub center: Vec<f32>,
    pub scale: Vec<f32>,
    pub offset: Vec<f32>,
}

impl Columns {
    /// From per-column (shift, center, variance) and the options' eps, gamma and beta.
    pub fn new(shift: Vec<f32>, center: Vec<f32>, var: &[f64], opts: &BatchNorm<'_>) -> Columns {
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

/// Batch statistics of a validated tensor: (shift, mean of x − shift, biased var) per column,
/// with each column shifted by its value at position `first` (a counted one).
pub(crate) fn stats(
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
        let rows = (16384 / c).max(1);
        x.par_chunks(rows * c)
            .enumerate()
            .map(|(b, xb)| {
                let m = mask.map(|m| &m[b * rows..(b * rows + xb.len() / c)]);
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

/// A block of whole rows: the sums run along rows so the inner loop over columns vectorises.
fn features_last_block(xb: &[f32], c: usize, mask: Option<&[bool]>, shift: &[f32]) -> Vec<Moments> {
    let counted = |r: usize| mask.is_none_or(|m| m[r]);
    let mut sum = vec![0f64; c];
    let mut n = 0usize;
    for (r, row) in xb.chunks_exact(c).enumerate() {
        if counted(r) {
            n += 1;
            for ((a, &v), &sh) in sum.iter_mut().zip(row).zip(shift) {
                *a += (v - sh) as f64;
            }
        }
    }
    if n == 0 {
        return vec![Moments::default(); c];
    }
    let mean: Vec<f64> = sum.iter().map(|s| s / n as f64).collect();
    let mut m2 = vec![0f64; c];
    for (r, row) in xb.chunks_exact(c).enumerate() {
        if counted(r) {
            for (((a, &v), &sh), &mu) in m2.iter_mut().zip(row).zip(shift).zip(&mean) {
                let d = (v - sh) as f64 - mu;
                *a += d * d;
            }
        }
    }
    mean.into_iter()
        .zip(m2)
        .map(|(mean, m2)| Moments {
            n: n as f64,
            mean,
            m2,
        })
        .collect()
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
                let mean = super::sum_shifted(run, sh) / s as f64;
                Moments {
                    n: s as f64,
                    mean,
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
pub(crate) fn apply(
    x: &[f32],
    y: &mut [f32],
    shape: &Shape,
    mask: Option<&[bool]>,
    cols: &Columns,
) {
    let c = shape.channels;
    let s = shape.spatial;
    let write = |xs: &[f32], ys: &mut [f32], ch: usize| {
        let (sh, ce, sc, of) = (
            cols.shift[ch],
            cols.center[ch],
            cols.scale[ch],
            cols.offset[ch],
        );
        for (o, &v) in ys.iter_mut().zip(xs) {
            *o = ((v - sh) - ce) * sc + of;
        }
    };
    if s == 1 {
        let rows = (16384 / c).max(1);
        y.par_chunks_mut(rows * c)
            .zip(x.par_chunks(rows * c))
            .enumerate()
            .for_each(|(b, (yb, xb))| {
                for (r, (yr, xr)) in yb.chunks_exact_mut(c).zip(xb.chunks_exact(c)).enumerate() {
                    if mask.is_some_and(|m| !m[b * rows + r]) {
                        yr.fill(0.0);
                        continue;
                    }
                    for (ch, (o, &v)) in yr.iter_mut().zip(xr).enumerate() {
                        *o = ((v - cols.shift[ch]) - cols.center[ch]) * cols.scale[ch]
                            + cols.offset[ch];
                    }
                }
            });
    } else {
        y.par_chunks_mut(c * s)
            .zip(x.par_chunks(c * s))
            .enumerate()
            .for_each(|(n, (yp, xp))| {
                for (ch, (yr, xr)) in yp.chunks_exact_mut(s).zip(xp.chunks_exact(s)).enumerate() {
                    write(xr, yr, ch);
                    if let Some(m) = mask {
                        for (o, &k) in yr.iter_mut().zip(&m[n * s..(n + 1) * s]) {
                            if !k {
                                *o = 0.0;
                            }
                        }
                    }
                }
            });
    }
}
