//! When to trigger a checkpoint, which ones are abandoned, and when failures become fatal.
//! Pure: time is passed in as the duration since the service started. Semantics follow
//! Flink's checkpoint config: interval, min pause between checkpoints, max concurrent,
//! timeout, tolerable consecutive failures.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::checkpoint_id::CheckpointId;

#[derive(Debug, Clone)]
pub struct SchedulerSettings {
    pub interval: Duration,
    pub min_pause: Duration,
    pub timeout: Duration,
    pub max_concurrent: u32,
    pub tolerable_failures: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{failures} consecutive checkpoints failed (tolerable: {tolerable}); last failure: {last}")]
pub struct TooManyFailures {
    pub failures: u32,
    pub tolerable: u32,
    pub last: String,
}

/// A checkpoint to take now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trigger {
    pub id: CheckpointId,
    /// The checkpoint the delta builds on; `None` means take a full snapshot.
    pub base: Option<CheckpointId>,
}

#[derive(Debug)]
pub struct Scheduler {
    settings: SchedulerSettings,
    next_id: CheckpointId,
    head: Option<CheckpointId>,
    /// In-flight checkpoints: trigger time and whether it is a delta.
    in_flight: BTreeMap<CheckpointId, (Duration, bool)>,
    /// Deltas in flight behind a failed checkpoint: they fail too, as a consequence only.
    doomed: BTreeSet<CheckpointId>,
    last_trigger: Option<Duration>,
    last_end: Option<Duration>,
    consecutive_failures: u32,
}

impl Scheduler {
    /// `next_id`: the first id the store has not used. `head`: the checkpoint the next delta
    /// may build on (the restored one, if it is also the newest in the store); `None` makes the
    /// first checkpoint a full snapshot.
    pub fn new(
        settings: SchedulerSettings,
        next_id: CheckpointId,
        head: Option<CheckpointId>,
    ) -> Self {
        Scheduler {
            settings,
            next_id: next_id.max(head.map_or(CheckpointId(1), CheckpointId::next)),
            head,
            in_flight: BTreeMap::new(),
            doomed: BTreeSet::new(),
            last_trigger: None,
            last_end: None,
            consecutive_failures: 0,
        }
    }

    /// The next checkpoint starts a new line (a full snapshot): the state changed in a way a
    /// delta cannot express (partitions taken over or handed off).
    pub fn restart_line(&mut self) {
        self.head = None;
    }

    /// The id the next trigger will use.
    pub fn peek_next_id(&self) -> CheckpointId {
        self.next_id
    }

    /// The checkpoint interval.
    pub fn interval(&self) -> Duration {
        self.settings.interval
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether another checkpoint may start now (`max_concurrent`).
    pub fn has_room(&self) -> bool {
        self.in_flight.len() < self.settings.max_concurrent as usize
    }

    /// Whether a periodic checkpoint is due at `now`.
    pub fn due(&self, now: Duration) -> bool {
        let s = &self.settings;
        if self.in_flight.len() >= s.max_concurrent as usize {
            return false;
        }
        let interval_ok = self.last_trigger.is_none_or(|t| now >= t + s.interval);
        let pause_ok = self.last_end.is_none_or(|t| now >= t + s.min_pause);
        interval_ok && pause_ok
    }

    /// How long until `due` may turn true (a hint for timers).
    pub fn next_due_in(&self, now: Duration) -> Duration {
        let s = &self.settings;
        let by_interval = self
            .last_trigger
            .map_or(Duration::ZERO, |t| (t + s.interval).saturating_sub(now));
        let by_pause = self
            .last_end
            .map_or(Duration::ZERO, |t| (t + s.min_pause).saturating_sub(now));
        by_interval.max(by_pause)
    }

    /// Starts a checkpoint at `now`, whether due or forced (shutdown).
    pub fn trigger(&mut self, now: Duration) -> Trigger {
        let id = self.next_id;
        self.next_id = self.next_id.next();
        let base = self.head;
        self.head = Some(id);
        self.in_flight.insert(id, (now, base.is_some()));
        self.last_trigger = Some(now);
        Trigger { id, base }
    }

    /// Checkpoint `id` is durable. Returns false if it was no longer in flight (abandoned).
    pub fn completed(&mut self, id: CheckpointId, now: Duration) -> bool {
        if self.in_flight.remove(&id).is_none() {
            return false;
        }
        self.doomed.remove(&id);
        self.last_end = Some(now);
        self.consecutive_failures = 0;
        true
    }

    /// Checkpoint `id` failed. Later checkpoints were built on it, so the next one is full.
    /// Returns whether it was in flight (a result arriving after abandonment is ignored).
    pub fn failed(
        &mut self,
        id: CheckpointId,
        now: Duration,
        reason: &str,
    ) -> Result<bool, TooManyFailures> {
        if self.in_flight.remove(&id).is_none() {
            return Ok(false);
        }
        self.last_end = Some(now);
        // a delta in flight behind a failed checkpoint fails as a consequence: not counted again
        if self.doomed.remove(&id) {
            return Ok(true);
        }
        self.head = None;
        for (later, (_, delta)) in self.in_flight.range(id.next()..) {
            if *delta {
                self.doomed.insert(*later);
            }
        }
        self.consecutive_failures += 1;
        if self.consecutive_failures > self.settings.tolerable_failures {
            return Err(TooManyFailures {
                failures: self.consecutive_failures,
                tolerable: self.settings.tolerable_failures,
                last: reason.to_string(),
            });
        }
        Ok(true)
    }

    /// Checkpoints in flight for longer than the timeout; the caller fails each of them.
    pub fn expired(&self, now: Duration) -> Vec<CheckpointId> {
        self.in_flight
            .iter()
            .filter(|(_, (started, _))| now.saturating_sub(*started) > self.settings.timeout)
            .map(|(id, _)| *id)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> SchedulerSettings {
        SchedulerSettings {
            interval: Duration::from_secs(10),
            min_pause: Duration::from_secs(4),
            timeout: Duration::from_secs(30),
            max_concurrent: 1,
            tolerable_failures: 1,
        }
    }
    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn first_checkpoint_is_full_then_deltas_chain() {
        let mut sch = Scheduler::new(settings(), CheckpointId(1), None);
        assert!(sch.due(s(0)));
        let t1 = sch.trigger(s(0));
        assert_eq!(
            t1,
            Trigger {
                id: CheckpointId(1),
                base: None
            }
        );
        assert!(sch.completed(CheckpointId(1), s(1)));
        let t2 = sch.trigger(s(10));
        assert_eq!(
            t2,
            Trigger {
                id: CheckpointId(2),
                base: Some(CheckpointId(1))
            }
        );
    }

    #[test]
    fn restored_store_continues_its_ids_and_chain() {
        let mut sch = Scheduler::new(settings(), CheckpointId(42), Some(CheckpointId(41)));
        assert_eq!(
            sch.trigger(s(0)),
            Trigger {
                id: CheckpointId(42),
                base: Some(CheckpointId(41))
            }
        );
    }

    #[test]
    fn a_restore_that_is_not_the_newest_starts_with_a_full_snapshot_after_every_used_id() {
        let mut sch = Scheduler::new(settings(), CheckpointId(12), None);
        assert_eq!(
            sch.trigger(s(0)),
            Trigger {
                id: CheckpointId(12),
                base: None
            }
        );
    }

    #[test]
    fn interval_min_pause_and_max_concurrent_gate_triggers() {
        let mut sch = Scheduler::new(settings(), CheckpointId(1), None);
        sch.trigger(s(0));
        assert!(!sch.due(s(20)), "max_concurrent 1 with one in flight");
        sch.completed(CheckpointId(1), s(8));
        assert!(!sch.due(s(10)), "min pause: ended at 8, needs 12");
        assert_eq!(sch.next_due_in(s(10)), s(2));
        assert!(sch.due(s(12)));
        sch.trigger(s(12));
        sch.completed(CheckpointId(2), s(12));
        assert!(!sch.due(s(21)), "interval from last trigger");
        assert!(sch.due(s(22)));
    }

    #[test]
    fn failure_forces_a_full_snapshot_and_too_many_stop() {
        let mut sch = Scheduler::new(settings(), CheckpointId(1), None);
        sch.trigger(s(0));
        sch.completed(CheckpointId(1), s(0));
        sch.trigger(s(10));
        assert_eq!(sch.failed(CheckpointId(2), s(11), "disk"), Ok(true));
        let t = sch.trigger(s(20));
        assert_eq!(t.base, None, "after a failure the next checkpoint is full");
        let err = sch
            .failed(t.id, s(21), "disk again")
            .expect_err("2 > tolerable 1");
        assert_eq!(err.failures, 2);
    }

    #[test]
    fn success_resets_consecutive_failures() {
        let mut sch = Scheduler::new(settings(), CheckpointId(1), None);
        let a = sch.trigger(s(0));
        sch.failed(a.id, s(1), "x").expect("tolerable");
        let b = sch.trigger(s(10));
        sch.completed(b.id, s(11));
        let c = sch.trigger(s(20));
        assert_eq!(sch.failed(c.id, s(21), "y"), Ok(true));
    }

    #[test]
    fn deltas_behind_a_failure_are_not_counted_again() {
        let mut cfg = settings();
        cfg.max_concurrent = 4;
        cfg.tolerable_failures = 1;
        let mut sch = Scheduler::new(cfg, CheckpointId(2), Some(CheckpointId(1)));
        let a = sch.trigger(s(0));
        let b = sch.trigger(s(10));
        let c = sch.trigger(s(20));
        assert_eq!(sch.failed(a.id, s(21), "disk"), Ok(true));
        assert_eq!(sch.failed(b.id, s(21), "base mismatch"), Ok(true));
        assert_eq!(sch.failed(c.id, s(21), "base mismatch"), Ok(true));
        let d = sch.trigger(s(30));
        assert_eq!(d.base, None);
        assert!(
            sch.failed(d.id, s(31), "disk").is_err(),
            "the second real failure exceeds 1"
        );
    }

    #[test]
    fn slow_checkpoints_expire_and_late_results_are_ignored() {
        let mut sch = Scheduler::new(settings(), CheckpointId(1), None);
        let a = sch.trigger(s(0));
        assert!(sch.expired(s(30)).is_empty());
        assert_eq!(sch.expired(s(31)), vec![a.id]);
        sch.failed(a.id, s(31), "timeout").expect("tolerable");
        assert!(!sch.completed(a.id, s(40)), "abandoned result ignored");
    }
}
