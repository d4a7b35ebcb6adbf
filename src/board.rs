//! The status board: what the running service shows of itself, written by its components and
//! the consumer, read by HTTP. One owner of readiness, event-time progress, the partitions held
//! with their positions and lags, the brokers' reachability and the recent checkpoint attempts;
//! each behind a small API, none as a field anyone can lock.

use std::collections::HashMap;
use std::sync::Mutex;

use prometheus::IntGauge;

use crate::checkpoint::history::History;
use crate::event_time::EventTime;
use crate::lock::lock;
use crate::position::{NextOffset, Partition};

/// Event-time progress, refreshed by the processing loop about every second.
#[derive(Debug, Clone, Default)]
pub struct EventTimeProgress {
    pub watermark: Option<EventTime>,
    pub max_event_time: HashMap<Partition, EventTime>,
}

/// A partition as the board shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldPartition {
    pub partition: Partition,
    pub next: Option<NextOffset>,
    pub lag: Option<i64>,
}

struct Readiness {
    ready: bool,
    reason: String,
}

#[derive(Default)]
struct Partitions {
    assigned: Vec<Partition>,
    /// The next offset of every partition whose state this instance holds.
    positions: HashMap<Partition, NextOffset>,
    lags: HashMap<Partition, i64>,
    /// High watermarks last measured (by the lag probe).
    highs: HashMap<Partition, i64>,
}

pub struct StatusBoard {
    readiness: Mutex<Readiness>,
    /// Mirrors readiness as `checkpointer_ready`.
    ready_gauge: IntGauge,
    progress: Mutex<EventTimeProgress>,
    partitions: Mutex<Partitions>,
    broker_error: Mutex<Option<String>>,
    history: Mutex<History>,
}

impl StatusBoard {
    /// A board that says "starting"; `history` holds this run's attempts.
    pub fn new(ready_gauge: IntGauge, history: History) -> Self {
        ready_gauge.set(0);
        StatusBoard {
            readiness: Mutex::new(Readiness {
                ready: false,
                reason: "starting".to_string(),
            }),
            ready_gauge,
            progress: Mutex::new(EventTimeProgress::default()),
            partitions: Mutex::new(Partitions::default()),
            broker_error: Mutex::new(None),
            history: Mutex::new(history),
        }
    }

    pub fn set_ready(&self, ready: bool, reason: &str) {
        self.ready_gauge.set(i64::from(ready));
        let mut r = lock(&self.readiness);
        r.ready = ready;
        if r.reason != reason {
            r.reason = reason.to_string();
        }
    }

    /// Whether the service is ready, and why.
    pub fn readiness(&self) -> (bool, String) {
        let r = lock(&self.readiness);
        (r.ready, r.reason.clone())
    }

    pub fn set_progress(&self, progress: EventTimeProgress) {
        *lock(&self.progress) = progress;
    }

    pub fn progress(&self) -> EventTimeProgress {
        lock(&self.progress).clone()
    }

    /// The next offset to read of `p` (called per record).
    pub fn set_position(&self, p: &Partition, next: NextOffset) {
        let mut parts = lock(&self.partitions);
        match parts.positions.get_mut(p) {
            Some(v) => *v = next,
            None => {
                parts.positions.insert(p.clone(), next);
            }
        }
    }

    /// Forgets the positions of partitions whose state this instance no longer holds: they
    /// must not be resumed from there with an empty state.
    pub fn clear_positions(&self, partitions: &[Partition]) {
        let mut parts = lock(&self.partitions);
        for p in partitions {
            parts.positions.remove(p);
        }
    }

    /// Every held position.
    pub fn positions(&self) -> HashMap<Partition, NextOffset> {
        lock(&self.partitions).positions.clone()
    }

    pub fn set_assigned(&self, partitions: &[Partition]) {
        lock(&self.partitions).assigned = partitions.to_vec();
    }

    pub fn assigned(&self) -> Vec<Partition> {
        lock(&self.partitions).assigned.clone()
    }

    /// The lags last measured; returns the partitions no longer measured.
    pub fn set_lags(&self, lags: &[(Partition, i64)]) -> Vec<Partition> {
        let measured: HashMap<Partition, i64> = lags.iter().cloned().collect();
        let mut parts = lock(&self.partitions);
        let old = std::mem::replace(&mut parts.lags, measured);
        old.into_keys()
            .filter(|p| !parts.lags.contains_key(p))
            .collect()
    }

    /// The high watermarks last measured.
    pub fn set_highs(&self, highs: &[(Partition, i64)]) {
        lock(&self.partitions).highs = highs.iter().cloned().collect();
    }

    /// The high watermark of `p` last measured, if any.
    pub fn high(&self, p: &Partition) -> Option<i64> {
        lock(&self.partitions).highs.get(p).copied()
    }

    /// Assigned partitions with their next offset and last measured lag, in order.
    pub fn partitions(&self) -> Vec<HeldPartition> {
        let parts = lock(&self.partitions);
        let mut out: Vec<HeldPartition> = parts
            .assigned
            .iter()
            .map(|p| HeldPartition {
                partition: p.clone(),
                next: parts.positions.get(p).copied(),
                lag: parts.lags.get(p).copied(),
            })
            .collect();
        out.sort_by(|a, b| a.partition.cmp(&b.partition));
        out
    }

    /// The client reported the brokers unreachable (`Some`) or the consumer received again.
    pub fn set_broker_error(&self, error: Option<String>) {
        *lock(&self.broker_error) = error;
    }

    pub fn broker_error(&self) -> Option<String> {
        lock(&self.broker_error).clone()
    }

    /// This run's checkpoint attempts.
    pub fn history(&self) -> std::sync::MutexGuard<'_, History> {
        lock(&self.history)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: i32) -> Partition {
        Partition::new("events", n)
    }

    fn board() -> StatusBoard {
        let gauge = IntGauge::new("ready", "ready").expect("gauge");
        StatusBoard::new(gauge, History::new(10))
    }

    #[test]
    fn readiness_is_mirrored_in_the_gauge() {
        let b = board();
        assert_eq!(b.readiness(), (false, "starting".to_string()));
        b.set_ready(true, "2 partitions assigned");
        assert_eq!(b.readiness(), (true, "2 partitions assigned".to_string()));
        assert_eq!(b.ready_gauge.get(), 1);
        b.set_ready(false, "stopping");
        assert_eq!(b.ready_gauge.get(), 0);
    }

    #[test]
    fn partitions_show_assigned_ones_with_their_position_and_lag() {
        let b = board();
        b.set_assigned(&[p(1), p(0)]);
        b.set_position(&p(0), NextOffset(5));
        b.set_position(&p(2), NextOffset(9)); // held, not assigned: not shown
        assert!(b.set_lags(&[(p(1), 3)]).is_empty());
        assert_eq!(
            b.partitions(),
            vec![
                HeldPartition {
                    partition: p(0),
                    next: Some(NextOffset(5)),
                    lag: None
                },
                HeldPartition {
                    partition: p(1),
                    next: None,
                    lag: Some(3)
                },
            ]
        );
        assert_eq!(b.set_lags(&[(p(0), 0)]), vec![p(1)]);
        b.clear_positions(&[p(0)]);
        assert_eq!(b.positions().len(), 1);
    }
}
