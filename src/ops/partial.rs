//! BatchNorm split across shards of a batch (several GPUs, processes or machines): the partial
//! statistics each shard computes, merged exactly in a fixed order, and the partial gradient
//! sums of the backward pass. They travel as plain bytes, so any transport (MPI, a socket, a
//! channel between threads) can carry them.

use crate::ops::batch_norm::BatchStats;
use crate::NormError;

/// One column's statistics over the counted positions of a shard: how many, a shift (the
/// column's value at the shard's first counted position, so offset data stays exact), the mean's
/// offset from the shift, and M2, the sum of squared deviations from the mean. All f64.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ColumnStats {
    /// Positions counted.
    pub count: f64,
    /// The value the others are taken relative to.
    pub shift: f64,
    /// mean − shift.
    pub mean_d: f64,
    /// Σ (x − mean)².
    pub m2: f64,
}

impl ColumnStats {
    /// The mean of the counted values.
    pub fn mean(&self) -> f64 {
        self.shift + self.mean_d
    }

    /// The biased variance, M2 / count (NaN where nothing was counted).
    pub fn var(&self) -> f64 {
        self.m2 / self.count
    }

    /// Chan et al.'s merge of `o` into `self`, at `self`'s shift. An empty side leaves the
    /// other as it is.
    fn merge(&mut self, o: &ColumnStats) {
        if o.count == 0.0 {
            return;
        }
        if self.count == 0.0 {
            *self = *o;
            return;
        }
        let n = self.count + o.count;
        let delta = (o.shift - self.shift) + o.mean_d - self.mean_d;
        self.mean_d += delta * (o.count / n);
        self.m2 += o.m2 + delta * delta * (self.count * o.count / n);
        self.count = n;
    }
}

/// BatchNorm statistics of one shard of a batch, per column
/// ([`Normalizer::batch_norm_stats`](crate::Normalizer::batch_norm_stats)). Merge the shards'
/// with [`PartialStats::merge`], in the same order everywhere, then normalize each shard with
/// the merged statistics ([`Normalizer::batch_norm_apply`](crate::Normalizer::batch_norm_apply)):
/// the result does not depend on how the batch was split, but for float rounding. A shard whose
/// positions are all padding has count 0 and still takes part.
#[derive(Debug, Clone, PartialEq)]
pub struct PartialStats {
    /// One entry per column (feature).
    pub columns: Vec<ColumnStats>,
}

/// The gradient sums of one column over the counted positions of a shard, given the merged
/// statistics: Σ dy (dbeta) and Σ dy · xhat (dgamma).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ColumnGrads {
    /// Positions counted.
    pub count: f64,
    /// Σ dy.
    pub sum_dy: f64,
    /// Σ dy · xhat.
    pub sum_dy_xhat: f64,
    /// Zero: keeps a column 32 bytes, as [`ColumnStats`].
    pub pad: f64,
}

/// The backward pass's sums of one shard
/// ([`Normalizer::batch_norm_backward_sums`](crate::Normalizer::batch_norm_backward_sums)),
/// merged with [`PartialGrads::merge`] and handed to
/// [`Normalizer::batch_norm_backward_apply`](crate::Normalizer::batch_norm_backward_apply).
#[derive(Debug, Clone, PartialEq)]
pub struct PartialGrads {
    /// One entry per column (feature).
    pub columns: Vec<ColumnGrads>,
}

/// The first bytes of serialized statistics, then the kind, so bytes of one kind are never read
/// as the other.
const MAGIC: [u8; 4] = *b"gnBN";
const STATS: u32 = 1;
const GRADS: u32 = 2;
/// Magic, kind, then the column count as a little-endian u64.
const HEADER: usize = 16;

/// Plain bytes of a header and 32-byte columns.
fn to_bytes<C: bytemuck::Pod>(kind: u32, columns: &[C]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER + std::mem::size_of_val(columns));
    bytes.extend_from_slice(&MAGIC);
    bytes.extend_from_slice(&kind.to_le_bytes());
    bytes.extend_from_slice(&(columns.len() as u64).to_le_bytes());
    bytes.extend_from_slice(bytemuck::cast_slice(columns));
    bytes
}

/// Columns of `kind` back from [`to_bytes`]'s form, refusing anything else.
fn from_bytes<C: bytemuck::Pod>(kind: u32, bytes: &[u8]) -> Result<Vec<C>, NormError> {
    let bad = |problem| Err(NormError::InvalidStats { problem });
    if bytes.len() < HEADER || bytes[..4] != MAGIC {
        return bad("they are not gpunorm BatchNorm statistics");
    }
    let found = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
    if found != kind {
        return bad(if kind == STATS {
            "they are gradient sums (PartialGrads), not statistics"
        } else {
            "they are statistics (PartialStats), not gradient sums"
        });
    }
    let columns = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let body = &bytes[HEADER..];
    let size = std::mem::size_of::<C>() as u64;
    if columns.checked_mul(size) != Some(body.len() as u64) {
        return bad("their length does not match their column count");
    }
    Ok(body
        .chunks_exact(size as usize)
        .map(bytemuck::pod_read_unaligned)
        .collect())
}

/// Refuses an empty list and parts with differing column counts.
fn check_parts(counts: impl Iterator<Item = usize>) -> Result<usize, NormError> {
    let mut features = None;
    for (part, n) in counts.enumerate() {
        match features {
            None => features = Some(n),
            Some(f) if f != n => {
                return Err(NormError::ShardFeatures {
                    part,
                    features: n,
                    expected: f,
                })
            }
            _ => {}
        }
    }
    features.ok_or(NormError::InvalidStats {
        problem: "there are none to merge",
    })
}

impl PartialStats {
    /// Number of columns.
    pub fn features(&self) -> usize {
        self.columns.len()
    }

    /// Positions counted (the same in every column).
    pub fn count(&self) -> usize {
        self.columns.first().map_or(0, |c| c.count as usize)
    }

    /// The statistics of the union of `parts`, merged in order with Chan's formula in f64 (the
    /// first part's shifts kept). Errors on an empty list and on parts of different feature
    /// counts.
    pub fn merge(parts: &[PartialStats]) -> Result<PartialStats, NormError> {
        let features = check_parts(parts.iter().map(|p| p.features()))?;
        let mut columns = vec![ColumnStats::default(); features];
        for part in parts {
            for (total, c) in columns.iter_mut().zip(&part.columns) {
                total.merge(c);
            }
        }
        Ok(PartialStats { columns })
    }

    /// Mean and biased variance per column, in f32, and the count: what
    /// [`RunningStats::update_with`](crate::RunningStats::update_with) folds in.
    pub fn batch_stats(&self) -> BatchStats {
        BatchStats {
            mean: self.columns.iter().map(|c| c.mean() as f32).collect(),
            var: self.columns.iter().map(|c| c.var() as f32).collect(),
            count: self.count(),
        }
    }

    /// Plain bytes for any transport: a 16-byte header, then 32 bytes per column.
    pub fn to_bytes(&self) -> Vec<u8> {
        to_bytes(STATS, &self.columns)
    }

    /// Statistics back from [`PartialStats::to_bytes`]. Errors
    /// ([`NormError::InvalidStats`]) on bytes of anything else, gradient sums included.
    pub fn from_bytes(bytes: &[u8]) -> Result<PartialStats, NormError> {
        Ok(PartialStats {
            columns: from_bytes(STATS, bytes)?,
        })
    }
}

impl PartialGrads {
    /// Number of columns.
    pub fn features(&self) -> usize {
        self.columns.len()
    }

    /// The sums of the union of `parts`, added in order in f64. Errors as
    /// [`PartialStats::merge`].
    pub fn merge(parts: &[PartialGrads]) -> Result<PartialGrads, NormError> {
        let features = check_parts(parts.iter().map(|p| p.features()))?;
        let mut columns = vec![ColumnGrads::default(); features];
        for part in parts {
            for (total, c) in columns.iter_mut().zip(&part.columns) {
                total.count += c.count;
                total.sum_dy += c.sum_dy;
                total.sum_dy_xhat += c.sum_dy_xhat;
            }
        }
        Ok(PartialGrads { columns })
    }

    /// Plain bytes for any transport (as [`PartialStats::to_bytes`]).
    pub fn to_bytes(&self) -> Vec<u8> {
        to_bytes(GRADS, &self.columns)
    }

    /// Sums back from [`PartialGrads::to_bytes`]; errors on bytes of anything else.
    pub fn from_bytes(bytes: &[u8]) -> Result<PartialGrads, NormError> {
        Ok(PartialGrads {
            columns: from_bytes(GRADS, bytes)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats_of(values: &[f64]) -> ColumnStats {
        let n = values.len() as f64;
        let shift = values[0];
        let mean_d = values.iter().map(|v| v - shift).sum::<f64>() / n;
        let m2 = values.iter().map(|v| (v - shift - mean_d).powi(2)).sum();
        ColumnStats {
            count: n,
            shift,
            mean_d,
            m2,
        }
    }

    /// Merging the statistics of the pieces of a column gives those of the whole, whatever the
    /// split, empty pieces included.
    #[test]
    fn merged_pieces_give_the_whole() {
        let values: Vec<f64> = (0..100)
            .map(|i| 1e4 + ((i * 37) % 17) as f64 * 0.01)
            .collect();
        let whole = stats_of(&values);
        for cuts in [vec![0, 100], vec![0, 1, 50, 100], vec![0, 30, 30, 99, 100]] {
            let parts: Vec<PartialStats> = cuts
                .windows(2)
                .map(|w| PartialStats {
                    columns: vec![if w[0] == w[1] {
                        ColumnStats::default()
                    } else {
                        stats_of(&values[w[0]..w[1]])
                    }],
                })
                .collect();
            let merged = PartialStats::merge(&parts).unwrap().columns[0];
            assert_eq!(merged.count, whole.count);
            assert!((merged.mean() - whole.mean()).abs() < 1e-12, "{cuts:?}");
            assert!((merged.m2 - whole.m2).abs() < 1e-9 * whole.m2, "{cuts:?}");
        }
    }

    #[test]
    fn bytes_round_trip_and_refuse_the_other_kind() {
        let stats = PartialStats {
            columns: vec![stats_of(&[1.0, 2.0, 4.0]); 3],
        };
        assert_eq!(PartialStats::from_bytes(&stats.to_bytes()).unwrap(), stats);
        let grads = PartialGrads {
            columns: vec![ColumnGrads::default(); 2],
        };
        assert_eq!(PartialGrads::from_bytes(&grads.to_bytes()).unwrap(), grads);
        assert!(matches!(
            PartialStats::from_bytes(&grads.to_bytes()),
            Err(NormError::InvalidStats { .. })
        ));
        let mut cut = stats.to_bytes();
        cut.pop();
        assert!(PartialStats::from_bytes(&cut).is_err());
        assert!(PartialStats::from_bytes(b"not statistics at all").is_err());
        let other = PartialStats {
            columns: vec![ColumnStats::default(); 2],
        };
        assert!(matches!(
            PartialStats::merge(&[stats, other]),
            Err(NormError::ShardFeatures {
                part: 1,
                features: 2,
                expected: 3
            })
        ));
        assert!(PartialStats::merge(&[]).is_err());
    }
}
