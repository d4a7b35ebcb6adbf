//! What to do about a held position the broker no longer has (`kafka.on_offset_out_of_range`).
//! Pure: the pipeline asks the broker for each assigned partition's offsets off the loop and
//! hands them here.

use crate::config::OnOutOfRange;
use crate::position::{NextOffset, Partition};

/// One assigned partition: the position the service holds and the offsets the broker has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Probed {
    pub partition: Partition,
    pub held: Option<NextOffset>,
    /// The earliest offset the broker has (log start).
    pub low: i64,
    /// The offset the next record will get (high watermark).
    pub high: i64,
}

/// The decision for one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// The held position is one the broker has (or none is held): nothing to do.
    InRange,
    /// Stop: the policy is `fail`.
    Fail,
    /// Read on from `to`; `skipped` offsets between the held position and it are never read.
    Move { to: i64, skipped: u64 },
}

impl Probed {
    pub(crate) fn out_of_range(&self) -> bool {
        self.held
            .is_some_and(|NextOffset(n)| n < self.low || n > self.high)
    }

    pub(crate) fn decide(&self, policy: OnOutOfRange) -> Decision {
        let Some(NextOffset(held)) = self.held else {
            return Decision::InRange;
        };
        if !self.out_of_range() {
            return Decision::InRange;
        }
        let to = match policy {
            OnOutOfRange::Fail => return Decision::Fail,
            OnOutOfRange::Earliest => self.low,
            OnOutOfRange::Latest => self.high,
        };
        // moving back (the topic was recreated or truncated below the held position) skips
        // nothing; moving forward skips what lies between
        let skipped = u64::try_from(to.saturating_sub(held)).unwrap_or(0);
        Decision::Move { to, skipped }
    }

    /// The error a `fail` stops with.
    pub(crate) fn failure(&self) -> String {
        let held = self.held.map_or(-1, |n| n.0);
        let why = if held < self.low {
            "the records before it were deleted (retention, or delete-records)"
        } else {
            "the partition ends before it (the topic was recreated or truncated)"
        };
        format!(
            "partition {}: the held position {held} is out of range: the broker has offsets {} to {} and {why}; kafka.on_offset_out_of_range is fail, so the service stops with its checkpoint as it is. To go on, stop the service and move the position (checkpointer reset-position --dir DIR --topic {} --partition {} --to earliest|latest|OFFSET), or set kafka.on_offset_out_of_range: earliest or latest",
            self.partition,
            self.low,
            self.high,
            self.partition.topic,
            self.partition.partition
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probed(held: Option<i64>, low: i64, high: i64) -> Probed {
        Probed {
            partition: Partition::new("events", 3),
            held: held.map(NextOffset),
            low,
            high,
        }
    }

    #[test]
    fn a_position_the_broker_has_is_left_alone_whatever_the_policy() {
        for policy in [
            OnOutOfRange::Fail,
            OnOutOfRange::Earliest,
            OnOutOfRange::Latest,
        ] {
            for held in [100, 150, 200] {
                assert_eq!(
                    probed(Some(held), 100, 200).decide(policy),
                    Decision::InRange
                );
            }
            assert_eq!(probed(None, 100, 200).decide(policy), Decision::InRange);
        }
    }

    #[test]
    fn deleted_records_fail_or_move_forward_counting_what_is_skipped() {
        let p = probed(Some(50), 100, 180);
        assert!(p.out_of_range());
        assert_eq!(p.decide(OnOutOfRange::Fail), Decision::Fail);
        assert_eq!(
            p.decide(OnOutOfRange::Earliest),
            Decision::Move {
                to: 100,
                skipped: 50
            }
        );
        assert_eq!(
            p.decide(OnOutOfRange::Latest),
            Decision::Move {
                to: 180,
                skipped: 130
            }
        );
        let text = p.failure();
        for part in [
            "events[3]",
            "held position 50",
            "offsets 100 to 180",
            "deleted",
            "reset-position",
        ] {
            assert!(text.contains(part), "{part}: {text}");
        }
    }

    #[test]
    fn a_position_past_the_end_moves_back_skipping_nothing() {
        let p = probed(Some(500), 0, 20);
        assert!(p.out_of_range());
        assert_eq!(
            p.decide(OnOutOfRange::Earliest),
            Decision::Move { to: 0, skipped: 0 }
        );
        assert_eq!(
            p.decide(OnOutOfRange::Latest),
            Decision::Move { to: 20, skipped: 0 }
        );
        assert!(p.failure().contains("recreated"));
    }
}
