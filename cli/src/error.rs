//! What can go wrong in the `gpunorm` command: a library error, a file it cannot write, or a
//! request it refuses before doing any work (a shape too large to hold, say).

use std::fmt;
use std::path::{Path, PathBuf};

use gpunorm::NormError;

pub type CliResult<T> = Result<T, CliError>;

#[derive(Debug)]
pub enum CliError {
    Norm(NormError),
    File {
        path: PathBuf,
        error: std::io::Error,
    },
    Refused(String),
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Norm(e) => e.fmt(f),
            CliError::File { path, error } => write!(f, "{}: {error}", path.display()),
            CliError::Refused(why) => f.write_str(why),
        }
    }
}

impl From<NormError> for CliError {
    fn from(e: NormError) -> Self {
        CliError::Norm(e)
    }
}

impl CliError {
    pub fn file(path: &Path, error: std::io::Error) -> CliError {
        CliError::File {
            path: path.to_owned(),
            error,
        }
    }
}

/// `rows × features` values, or the refusal that says why not: zero, or more than usize holds.
pub fn values(rows: usize, features: usize) -> CliResult<usize> {
    match rows.checked_mul(features) {
        Some(0) => Err(CliError::Refused(format!(
            "{rows} x {features} holds no values; rows and features must be at least 1"
        ))),
        Some(n) => Ok(n),
        None => Err(CliError::Refused(format!(
            "{rows} x {features} overflows the number of values this machine can address"
        ))),
    }
}

/// A vector of `n` copies of `value`, or a refusal where the memory cannot be had (instead of an
/// abort in the allocator).
pub fn filled<T: Clone>(n: usize, value: T, what: &str) -> CliResult<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| {
        CliError::Refused(format!(
            "cannot allocate {} MiB for {what}; use a smaller shape",
            (n as u128 * std::mem::size_of::<T>() as u128) >> 20
        ))
    })?;
    v.resize(n, value);
    Ok(v)
}
