//! Idle partitions (`watermark.idle_timeout`): a partition that is caught up and has not moved
//! for the timeout no longer holds the service watermark back, until its next record (the
//! engine clears the mark then). Caught up: the consumer reported the end of the partition at
//! its current position, or its position is at the high watermark the lag probe last measured
//! (every few seconds). Quiet is judged from the partition's position as the engine holds it,
//! on the tick, so the record path pays nothing; while consumption is paused nothing becomes
//! idle, and the quiet time starts again after the pause. Pure: the pipeline gives it
//! positions, ends, high watermarks, the engine's marks and a clock, and carries out its
//! decisions on the engine.

use std::collections::HashMap;
use std::time::Duration;

use crate::position::{NextOffset, Partition};

/// A partition's last position, and since when it has not moved.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Quiet {
    position: Option<NextOffset>,
    since: Duration,
    idle: bool,
    /// The position at which the consumer last reported the end of the partition.
    end_at: Option<NextOffset>,
}

#[derive(Debug)]
pub(crate) struct Idleness {
    timeout: Duration,
    parts: HashMap<Partition, Quiet>,
}

/// What a partition is at an evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Seen<'a> {
    pub partition: &'a Partition,
    /// The next offset the engine holds for it.
    pub position: Option<NextOffset>,
    /// The high watermark the lag probe last measured for it.
    pub high: Option<i64>,
    /// Whether the engine holds it idle (a record clears that; a new assignment too).
    pub engine_idle: bool,
}

/// What changed at an evaluation.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Changes {
    /// Partitions that became idle.
    pub idle: Vec<Partition>,
    /// Partitions that moved again after being idle.
    pub active: Vec<Partition>,
}

impl Idleness {
    pub(crate) fn new(timeout: Duration) -> Self {
        Idleness {
            timeout,
            parts: HashMap::new(),
        }
    }

    /// Looks at every assigned partition at `now`; partitions not among them are forgotten.
    pub(crate) fn evaluate<'a>(
        &mut self,
        assigned: impl IntoIterator<Item = Seen<'a>>,
        now: Duration,
    ) -> Changes {
        let mut changes = Changes::default();
        let mut seen = HashMap::with_capacity(self.parts.len());
        for s in assigned {
            let mut q = self.parts.remove(s.partition).unwrap_or(Quiet {
                position: s.position,
                since: now,
                idle: false,
                end_at: None,
            });
            // moved, or no longer idle for the engine (a record, an assignment anew)
            if q.position != s.position || (q.idle && !s.engine_idle) {
                q.position = s.position;
                q.since = now;
                if q.idle {
                    q.idle = false;
                    changes.active.push(s.partition.clone());
                }
            }
            let at_end = q.end_at.is_some() && q.end_at == s.position;
            let at_high = match (s.position, s.high) {
                (Some(next), Some(high)) => next.0 >= high,
                _ => false,
            };
            let caught_up = at_end || at_high;
            if !q.idle && caught_up && now.saturating_sub(q.since) >= self.timeout {
                q.idle = true;
                changes.idle.push(s.partition.clone());
            }
            seen.insert(s.partition.clone(), q);
        }
        self.parts = seen;
        changes
    }

    /// The consumer reported the end of `partition` with the engine at `position` (transaction
    /// markers keep a position below the high watermark: the end says it is caught up).
    pub(crate) fn end_reached(
        &mut self,
        partition: &Partition,
        position: Option<NextOffset>,
        now: Duration,
    ) {
        self.parts
            .entry(partition.clone())
            .or_insert(Quiet {
                position,
                since: now,
                idle: false,
                end_at: None,
            })
            .end_at = position;
    }

    /// Consumption is paused at `now`: nothing is quiet for being paused, so every partition
    /// not idle yet starts its quiet time again.
    pub(crate) fn paused(&mut self, now: Duration) {
        for q in self.parts.values_mut().filter(|q| !q.idle) {
            q.since = now;
        }
    }

    /// The idle partitions.
    pub(crate) fn idle(&self) -> impl Iterator<Item = &Partition> {
        self.parts.iter().filter(|(_, q)| q.idle).map(|(p, _)| p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: i32) -> Partition {
        Partition::new("t", n)
    }

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    fn seen(p: &Partition, next: i64, high: i64) -> Seen<'_> {
        Seen {
            partition: p,
            position: Some(NextOffset(next)),
            high: Some(high),
            // as the engine holds it once the tracker said so
            engine_idle: true,
        }
    }

    #[test]
    fn a_caught_up_partition_quiet_for_the_timeout_is_idle_until_it_moves() {
        let (a, b) = (p(0), p(1));
        let mut idle = Idleness::new(s(3));
        assert_eq!(
            idle.evaluate([seen(&a, 10, 10), seen(&b, 5, 5)], s(0)),
            Changes::default()
        );
        // a keeps moving, b does not
        idle.evaluate([seen(&a, 20, 20), seen(&b, 5, 5)], s(2));
        let changes = idle.evaluate([seen(&a, 30, 30), seen(&b, 5, 5)], s(3));
        assert_eq!(changes.idle, vec![b.clone()]);
        assert_eq!(idle.idle().count(), 1);
        // reported once
        assert_eq!(
            idle.evaluate([seen(&a, 40, 40), seen(&b, 5, 5)], s(4)),
            Changes::default()
        );
        // b's next record
        let changes = idle.evaluate([seen(&a, 50, 50), seen(&b, 6, 6)], s(5));
        assert_eq!(changes.active, vec![b.clone()]);
        assert_eq!(idle.idle().count(), 0);
    }

    #[test]
    fn a_quiet_partition_with_records_left_to_read_is_not_idle() {
        let a = p(0);
        let mut idle = Idleness::new(s(1));
        idle.evaluate([seen(&a, 5, 9)], s(0));
        // paused by back-pressure, or slow: records wait, so it must hold the watermark
        assert!(idle.evaluate([seen(&a, 5, 9)], s(10)).idle.is_empty());
        // nothing known of its end: not idle either
        let unknown = Seen {
            partition: &a,
            position: Some(NextOffset(5)),
            high: None,
            engine_idle: false,
        };
        assert!(idle.evaluate([unknown], s(20)).idle.is_empty());
    }

    #[test]
    fn the_end_of_the_partition_counts_as_caught_up_below_the_high_watermark() {
        let a = p(0);
        let mut idle = Idleness::new(s(1));
        // a transaction's commit marker: the position stays one below the high watermark
        idle.evaluate([seen(&a, 9, 10)], s(0));
        assert!(idle.evaluate([seen(&a, 9, 10)], s(5)).idle.is_empty());
        idle.end_reached(&a, Some(NextOffset(9)), s(5));
        assert_eq!(idle.evaluate([seen(&a, 9, 10)], s(6)).idle, vec![a.clone()]);
    }

    #[test]
    fn the_quiet_time_starts_again_after_a_pause() {
        let a = p(0);
        let mut idle = Idleness::new(s(3));
        idle.evaluate([seen(&a, 5, 5)], s(0));
        idle.paused(s(10));
        // records waited during the pause; the high watermark measured before them says
        // caught up, but the partition must be quiet for the timeout after the pause
        assert!(idle.evaluate([seen(&a, 5, 5)], s(11)).idle.is_empty());
        assert_eq!(idle.evaluate([seen(&a, 5, 5)], s(13)).idle, vec![a.clone()]);
    }

    #[test]
    fn a_partition_the_engine_no_longer_holds_idle_is_active_again() {
        let a = p(0);
        let mut idle = Idleness::new(s(1));
        idle.evaluate([seen(&a, 5, 5)], s(0));
        assert_eq!(idle.evaluate([seen(&a, 5, 5)], s(2)).idle, vec![a.clone()]);
        // assigned anew, or an invalid record at the same position: the engine cleared it
        let cleared = Seen {
            engine_idle: false,
            ..seen(&a, 5, 5)
        };
        assert_eq!(idle.evaluate([cleared], s(3)).active, vec![a.clone()]);
        // and it may become idle again after the timeout
        assert_eq!(idle.evaluate([seen(&a, 5, 5)], s(4)).idle, vec![a.clone()]);
    }

    #[test]
    fn a_partition_no_longer_assigned_is_forgotten() {
        let (a, b) = (p(0), p(1));
        let mut idle = Idleness::new(s(1));
        idle.evaluate([seen(&a, 1, 1), seen(&b, 1, 1)], s(0));
        idle.evaluate([seen(&a, 1, 1), seen(&b, 1, 1)], s(2));
        assert_eq!(idle.idle().count(), 2);
        idle.evaluate([seen(&a, 1, 1)], s(3));
        assert_eq!(idle.idle().collect::<Vec<_>>(), vec![&a]);
    }
}
