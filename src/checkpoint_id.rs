//! The identity of a checkpoint: ids grow by one per attempt, never reused within a store
//! (savepoints name the checkpoint they were made from). A newtype so that an id is never
//! mistaken for a count, an offset or an epoch; it encodes exactly as the `u64` it wraps
//! (serde transparent), so stores, savepoint files, changelog records and the HTTP API keep
//! their formats.

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CheckpointId(pub u64);

impl CheckpointId {
    /// The id after this one.
    pub fn next(self) -> CheckpointId {
        CheckpointId(self.0 + 1)
    }
}

/// Shown as the bare number, in messages as in `Debug` output (`Some(3)`).
impl fmt::Debug for CheckpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for CheckpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::str::FromStr for CheckpointId {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(CheckpointId)
    }
}

impl From<u64> for CheckpointId {
    fn from(id: u64) -> Self {
        CheckpointId(id)
    }
}
