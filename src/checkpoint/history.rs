//! Recent checkpoint attempts as operators see them on `/api/checkpoints`.

use std::collections::{BTreeMap, VecDeque};

use serde::Serialize;

use super::protocol::CheckpointMeta;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    InProgress,
    Completed,
    Failed,
    Abandoned,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckpointRecord {
    pub id: u64,
    pub status: Status,
    /// Epoch milliseconds.
    pub trigger_time: i64,
    pub duration_ms: Option<u64>,
    pub bytes: Option<u64>,
    pub full: bool,
    pub records: u64,
    /// `"topic/partition"` -> next offset to read.
    pub offsets: BTreeMap<String, i64>,
    pub watermark: Option<i64>,
    pub failure: Option<String>,
}

impl CheckpointRecord {
    pub fn from_meta(meta: &CheckpointMeta, status: Status) -> Self {
        CheckpointRecord {
            id: meta.id,
            status,
            trigger_time: meta.trigger_ms,
            duration_ms: (status == Status::Completed).then_some(meta.duration_ms),
            bytes: (status == Status::Completed).then_some(meta.bytes),
            full: meta.full,
            records: meta.records,
            offsets: meta
                .partitions
                .iter()
                .filter_map(|p| {
                    p.next.map(|n| {
                        (
                            format!("{}/{}", p.partition.topic, p.partition.partition),
                            n.0,
                        )
                    })
                })
                .collect(),
            watermark: meta.watermark,
            failure: None,
        }
    }
}

/// A bounded, newest-last list of checkpoint attempts.
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

    pub fn update(&mut self, id: u64, f: impl FnOnce(&mut CheckpointRecord)) {
        if let Some(r) = self.records.iter_mut().rev().find(|r| r.id == id) {
            f(r);
        }
    }

    /// Newest first.
    pub fn recent(&self, limit: usize) -> Vec<CheckpointRecord> {
        self.records.iter().rev().take(limit).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: u64) -> CheckpointRecord {
        CheckpointRecord {
            id,
            status: Status::InProgress,
            trigger_time: 0,
            duration_ms: None,
            bytes: None,
            full: false,
            records: 0,
            offsets: BTreeMap::new(),
            watermark: None,
            failure: None,
        }
    }

    #[test]
    fn keeps_the_newest_up_to_cap() {
        let mut h = History::new(2);
        h.push(rec(1));
        h.push(rec(2));
        h.push(rec(3));
        h.update(3, |r| r.status = Status::Completed);
        let ids: Vec<(u64, Status)> = h.recent(10).iter().map(|r| (r.id, r.status)).collect();
        assert_eq!(ids, vec![(3, Status::Completed), (2, Status::InProgress)]);
    }
}
