//! Idle partitions (`watermark.idle_timeout`): a partition that is caught up (its position at
//! the high watermark the consumer last saw) and has not moved for the timeout no longer holds
//! the service watermark back, until its next record (the engine clears the mark then). Quiet
//! is judged from the partition's position as the engine holds it, on the tick, so the record
//! path pays nothing. Pure: the pipeline gives it positions, high watermarks and a clock, and
//! carries out its decisions on the engine.

use std::collections::HashMap;
use std::time::Duration;

use crate::position::{NextOffset, Partition};

/// A partition's last position, and since when it has not moved.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Quiet {
    position: Option<NextOffset>,
    since: Duration,
    idle: bool,
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
    /// The high watermark the consumer last saw for it (no request to the broker).
    pub high: Option<i64>,
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
            });
            if q.position != s.position {
                q.position = s.position;
                q.since = now;
                if q.idle {
                    q.idle = false;
                    changes.active.push(s.partition.clone());
                }
            }
            let caught_up = match (s.position, s.high) {
                (Some(next), Some(high)) => next.0 >= high,
                _ => false,
            };
            if !q.idle && caught_up && now.saturating_sub(q.since) >= self.timeout {
                q.idle = true;
                changes.idle.push(s.partition.clone());
            }
            seen.insert(s.partition.clone(), q);
        }
        self.parts = seen;
        changes
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
        };
        assert!(idle.evaluate([unknown], s(20)).idle.is_empty());
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
