//! The record of every checkpoint and savepoint attempt, as operators see it on the web page,
//! `/api/checkpoints` and `checkpointer checkpoints list`. Terminal records are persisted by the
//! store; this module holds the type and the in-memory view of attempts still in flight.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::protocol::CheckpointMeta;
use crate::checkpoint_id::CheckpointId;
use crate::event_time::EventTime;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    InProgress,
    Completed,
    Failed,
    Abandoned,
}

impl Status {
    pub fn label(self) -> &'static str {
        match self {
            Status::InProgress => "in_progress",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Abandoned => "abandoned",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Checkpoint,
    Savepoint,
}

/// Where the time of one attempt went, milliseconds. `None` for phases not reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Phases {
    /// Processing paused while the engine captured its changes.
    pub snapshot_ms: Option<u64>,
    /// Encoding and applying the batch to the store.
    pub write_ms: Option<u64>,
    /// Making the batch durable on disk.
    pub flush_ms: Option<u64>,
}

/// Position and event time of one partition at a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionRecord {
    pub topic: String,
    pub partition: i32,
    /// Next offset to read.
    pub next_offset: Option<i64>,
    /// Highest event time seen, epoch milliseconds.
    pub max_event_time: Option<EventTime>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    pub id: CheckpointId,
    pub kind: Kind,
    /// The savepoint's name, for savepoints.
    pub savepoint: Option<String>,
    pub status: Status,
    /// Epoch milliseconds.
    pub trigger_time: i64,
    /// Trigger to durable (completed) or to failure.
    pub duration_ms: Option<u64>,
    pub phases: Phases,
    /// Bytes written to the store.
    pub bytes: Option<u64>,
    pub full: bool,
    /// Records processed since the previous checkpoint.
    pub records: u64,
    pub partitions: Vec<PartitionRecord>,
    /// Service watermark, epoch milliseconds.
    pub watermark: Option<EventTime>,
    pub failure: Option<String>,
}

impl CheckpointRecord {
    pub fn from_meta(meta: &CheckpointMeta, status: Status) -> Self {
        CheckpointRecord {
            id: meta.id,
            kind: Kind::Checkpoint,
            savepoint: None,
            status,
            trigger_time: meta.trigger_ms,
            duration_ms: (status == Status::Completed).then_some(meta.duration_ms),
            phases: Phases::default(),
            bytes: (status == Status::Completed).then_some(meta.bytes),
            full: meta.full,
            records: meta.records,
            partitions: meta
                .partitions
                .iter()
                .map(|p| PartitionRecord {
                    topic: p.partition.topic.clone(),
                    partition: p.partition.partition,
                    next_offset: p.next.map(|n| n.0),
                    max_event_time: p.max_ts,
                })
                .collect(),
            watermark: meta.watermark,
            failure: None,
        }
    }

    pub fn is_terminal(&self) -> bool {
        self.status != Status::InProgress
    }
}

/// Attempts of this run, newest last, bounded: in-flight ones and the most recent terminal
/// ones (the persisted history is the store's).
#[derive(Debug)]
pub struct History {
    records: VecDeque<CheckpointRecord>,
    cap: usize,
}

impl History {
    pub fn new(cap: usize) -> Self {
        History {
            records: VecDeque::new(),
            cap,
        }
    }

    pub fn push(&mut self, record: CheckpointRecord) {
        if self.records.len() == self.cap {
            self.records.pop_front();
        }
        self.records.push_back(record);
    }

    /// Changes record `id`; returns the changed record.
    pub fn update(
        &mut self,
        id: CheckpointId,
        f: impl FnOnce(&mut CheckpointRecord),
    ) -> Option<CheckpointRecord> {
        let r = self.records.iter_mut().rev().find(|r| r.id == id)?;
        f(r);
        Some(r.clone())
    }

    /// Newest first.
    pub fn recent(&self, limit: usize) -> Vec<CheckpointRecord> {
        self.records.iter().rev().take(limit).cloned().collect()
    }
}

/// One page of history, newest first: `persisted` (from the store, already limited to ids below
/// the cursor) overlaid with this run's records, which are fresher for the same id.
pub fn merge_page(
    persisted: Vec<CheckpointRecord>,
    live: Vec<CheckpointRecord>,
    before: Option<CheckpointId>,
    limit: usize,
) -> Vec<CheckpointRecord> {
    let mut by_id: std::collections::BTreeMap<CheckpointId, CheckpointRecord> =
        persisted.into_iter().map(|r| (r.id, r)).collect();
    for r in live {
        if before.is_none_or(|b| r.id < b) {
            by_id.insert(r.id, r);
        }
    }
    by_id.into_values().rev().take(limit).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: u64, status: Status) -> CheckpointRecord {
        CheckpointRecord {
            id: CheckpointId(id),
            kind: Kind::Checkpoint,
            savepoint: None,
            status,
            trigger_time: 0,
            duration_ms: None,
            phases: Phases::default(),
            bytes: None,
            full: false,
            records: 0,
            partitions: Vec::new(),
            watermark: None,
            failure: None,
        }
    }

    #[test]
    fn keeps_the_newest_up_to_cap() {
        let mut h = History::new(2);
        h.push(rec(1, Status::InProgress));
        h.push(rec(2, Status::InProgress));
        h.push(rec(3, Status::InProgress));
        let changed = h.update(CheckpointId(3), |r| r.status = Status::Completed);
        assert_eq!(changed.map(|r| r.status), Some(Status::Completed));
        let ids: Vec<(u64, Status)> = h.recent(10).iter().map(|r| (r.id.0, r.status)).collect();
        assert_eq!(ids, vec![(3, Status::Completed), (2, Status::InProgress)]);
        assert!(
            h.update(CheckpointId(1), |_| {}).is_none(),
            "dropped past the cap"
        );
    }

    #[test]
    fn pages_overlay_live_records_and_respect_the_cursor() {
        let persisted = vec![rec(4, Status::Completed), rec(3, Status::Failed)];
        let live = vec![rec(5, Status::InProgress), rec(4, Status::Abandoned)];
        let page = merge_page(persisted.clone(), live.clone(), None, 10);
        let got: Vec<(u64, Status)> = page.iter().map(|r| (r.id.0, r.status)).collect();
        assert_eq!(
            got,
            vec![
                (5, Status::InProgress),
                (4, Status::Abandoned),
                (3, Status::Failed)
            ]
        );
        let page = merge_page(vec![rec(3, Status::Failed)], live, Some(CheckpointId(4)), 1);
        assert_eq!(page.iter().map(|r| r.id.0).collect::<Vec<_>>(), vec![3]);
    }
}
