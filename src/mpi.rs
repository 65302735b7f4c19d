//! SyncBatchNorm across processes and machines over MPI (feature `mpi`): every rank gathers every
//! rank's partial statistics (32 bytes a column, not the data) and merges them in rank order,
//! so every rank holds the same merged statistics, bit for bit.
//!
//! ```no_run
//! # fn main() -> Result<(), gpunorm::NormError> {
//! use gpunorm::{BatchNorm, Normalizer};
//! let universe = gpunorm::mpi::initialize().expect("MPI");
//! let world = universe.world();
//! let norm = Normalizer::new()?;
//! let shard: Vec<f32> = vec![0.0; 64 * 8]; // this rank's rows
//! let opts = BatchNorm::default();
//! let local = norm.batch_norm_stats(&shard, 8, &opts);
//! let merged = gpunorm::mpi::all_gather_stats(&world, local)?;
//! let y = norm.batch_norm_apply(&shard, 8, &opts, &merged)?;
//! # Ok(())
//! # }
//! ```
//!
//! A rank whose own call failed still takes part, so no rank waits forever: pass its `Err`, and
//! every rank returns [`NormError::RankFailed`] naming it.

use ::mpi::datatype::PartitionMut;
pub use ::mpi::initialize;
use ::mpi::traits::CommunicatorCollectives;
use ::mpi::Count;

use crate::{NormError, PartialGrads, PartialStats};

/// Every rank's statistics, merged in rank order on every rank ([`PartialStats::merge`]).
/// Collective: every rank of `comm` calls it, with its result of
/// [`Normalizer::batch_norm_stats`](crate::Normalizer::batch_norm_stats). Errors, on every rank
/// alike: [`NormError::RankFailed`] where a rank passed an error,
/// [`NormError::ShardFeatures`] where ranks have different feature counts, and
/// [`NormError::InvalidStats`] where a rank sent something else than statistics.
pub fn all_gather_stats<C: CommunicatorCollectives>(
    comm: &C,
    local: Result<PartialStats, NormError>,
) -> Result<PartialStats, NormError> {
    let parts = all_gather_bytes(comm, local.map(|s| s.to_bytes()))?;
    let parts = parts
        .iter()
        .map(|b| PartialStats::from_bytes(b))
        .collect::<Result<Vec<_>, _>>()?;
    PartialStats::merge(&parts)
}

/// Every rank's backward sums, merged in rank order on every rank ([`PartialGrads::merge`]),
/// from each rank's result of
/// [`Normalizer::batch_norm_backward_sums`](crate::Normalizer::batch_norm_backward_sums).
/// Collective, with the errors of [`all_gather_stats`].
pub fn all_gather_grads<C: CommunicatorCollectives>(
    comm: &C,
    local: Result<PartialGrads, NormError>,
) -> Result<PartialGrads, NormError> {
    let parts = all_gather_bytes(comm, local.map(|s| s.to_bytes()))?;
    let parts = parts
        .iter()
        .map(|b| PartialGrads::from_bytes(b))
        .collect::<Result<Vec<_>, _>>()?;
    PartialGrads::merge(&parts)
}

/// Every rank's bytes, in rank order: first their lengths (an error travels as length 0, so the
/// failing rank still takes part in both collectives), then the bytes.
fn all_gather_bytes<C: CommunicatorCollectives>(
    comm: &C,
    local: Result<Vec<u8>, NormError>,
) -> Result<Vec<Vec<u8>>, NormError> {
    let bytes = local.as_deref().unwrap_or(&[]);
    let size = comm.size() as usize;
    let mut lengths = vec![0u64; size];
    comm.all_gather_into(&(bytes.len() as u64), &mut lengths[..]);
    let too_long = || NormError::TooLarge {
        what: "statistics sent over MPI",
        needed: lengths.iter().sum(),
        limit: Count::MAX as u64,
    };
    let counts = lengths
        .iter()
        .map(|&n| Count::try_from(n).map_err(|_| too_long()))
        .collect::<Result<Vec<Count>, _>>()?;
    let displs = counts
        .iter()
        .scan(0 as Count, |at, &n| {
            let start = *at;
            *at = at.checked_add(n)?;
            Some(start)
        })
        .collect::<Vec<Count>>();
    if displs.len() != size {
        return Err(too_long());
    }
    let mut all = vec![0u8; lengths.iter().sum::<u64>() as usize];
    // Every rank sees the same lengths, so all skip an empty gather alike (MPI refuses one).
    if !all.is_empty() {
        let mut partition = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
        comm.all_gather_varcount_into(bytes, &mut partition);
    }
    local?;
    if let Some(rank) = lengths.iter().position(|&n| n == 0) {
        return Err(NormError::RankFailed { rank });
    }
    Ok(counts
        .iter()
        .zip(&displs)
        .map(|(&n, &at)| all[at as usize..(at + n) as usize].to_vec())
        .collect())
}
