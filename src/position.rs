//! Partition identity and the one offset convention of the project: a position is always the
//! *next* offset to read, never the last one read.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A Kafka topic partition.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Partition {
    pub topic: String,
    pub partition: i32,
}

impl Partition {
    pub fn new(topic: impl Into<String>, partition: i32) -> Self {
        Partition {
            topic: topic.into(),
            partition,
        }
    }
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.topic, self.partition)
    }
}

/// The offset of the next record to read from a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NextOffset(pub i64);

impl NextOffset {
    /// The position after having read the record at `offset`.
    pub fn after(offset: i64) -> Self {
        NextOffset(offset.saturating_add(1))
    }

    /// Whether the record at `offset` was already consumed by a reader at this position.
    pub fn covers(self, offset: i64) -> bool {
        offset < self.0
    }
}

impl fmt::Display for NextOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A move of a partition's position that would go backwards.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("position of {partition} would move backwards from {from} to {to}")]
pub struct BackwardsMove {
    pub partition: Partition,
    pub from: NextOffset,
    pub to: NextOffset,
}

/// Checks that moving every partition in `updates` to its new position never goes backwards
/// relative to `current`. Checked for all partitions before anything changes.
pub fn check_forward<'a>(
    current: impl Fn(&Partition) -> Option<NextOffset>,
    updates: impl IntoIterator<Item = (&'a Partition, NextOffset)>,
) -> Result<(), BackwardsMove> {
    for (partition, to) in updates {
        if let Some(from) = current(partition) {
            if to < from {
                return Err(BackwardsMove {
                    partition: partition.clone(),
                    from,
                    to,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn next_offset_after_a_record_is_one_past_it() {
        assert_eq!(NextOffset::after(41), NextOffset(42));
        assert!(NextOffset(42).covers(41));
        assert!(!NextOffset(42).covers(42));
    }

    #[test]
    fn backwards_move_is_a_typed_error_for_any_partition() {
        let p0 = Partition::new("t", 0);
        let p1 = Partition::new("t", 1);
        let current: BTreeMap<Partition, NextOffset> =
            [(p0.clone(), NextOffset(10)), (p1.clone(), NextOffset(5))].into();
        let ok = [(&p0, NextOffset(10)), (&p1, NextOffset(7))];
        assert!(check_forward(|p| current.get(p).copied(), ok).is_ok());
        let bad = [(&p0, NextOffset(11)), (&p1, NextOffset(4))];
        let err = check_forward(|p| current.get(p).copied(), bad).expect_err("backwards");
        assert_eq!(err.partition, p1);
        assert_eq!(err.from, NextOffset(5));
    }
}

/// Where reading a partition starts when the service holds no position for it
/// (`kafka.auto_offset_reset`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OffsetReset {
    #[default]
    Earliest,
    Latest,
}

impl OffsetReset {
    pub fn as_str(self) -> &'static str {
        match self {
            OffsetReset::Earliest => "earliest",
            OffsetReset::Latest => "latest",
        }
    }
}

impl std::fmt::Display for OffsetReset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
