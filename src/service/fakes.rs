//! In-memory implementations of the edge traits, for in-process tests of the components: a
//! consumer that records what it was asked, an output that records and acknowledges windows,
//! and a changelog that holds publications until the test completes them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use tokio::sync::{mpsc, oneshot};

use super::edge::{Assignments, ChangelogIo, Output};
use crate::changelog::kafka::{Batch, ChangelogError, OnProgress};
use crate::changelog::protocol::{Chunk, Committed};
use crate::engine::{ClosedWindow, Emission, StateKey};
use crate::lock::lock;
use crate::position::{NextOffset, Partition};
use crate::source::SourceError;

/// What the pipeline asked of the consumer.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Call {
    Assign(Vec<Partition>),
    Release(Vec<Partition>),
    Commit(Vec<(Partition, NextOffset)>),
    Pause(Vec<Partition>),
    Resume(Vec<Partition>),
    Seek(Partition, i64),
    Reassign(Vec<Partition>),
}

#[derive(Default)]
pub(crate) struct FakeConsumer {
    calls: Mutex<Vec<Call>>,
    /// What `watermarks` answers, per partition (None when absent).
    offsets: Mutex<HashMap<Partition, (i64, i64)>>,
}

impl FakeConsumer {
    /// The low and high watermarks the broker would report for `partition`.
    pub(crate) fn set_watermarks(&self, partition: &Partition, low: i64, high: i64) {
        lock(&self.offsets).insert(partition.clone(), (low, high));
    }

    pub(crate) fn calls(&self) -> Vec<Call> {
        lock(&self.calls).clone()
    }

    /// Every partition released so far, in order.
    pub(crate) fn released(&self) -> Vec<Partition> {
        self.calls()
            .into_iter()
            .flat_map(|c| match c {
                Call::Release(ps) => ps,
                _ => Vec::new(),
            })
            .collect()
    }
}

impl Assignments for FakeConsumer {
    fn assign(&self, partitions: &[Partition]) -> Result<(), SourceError> {
        lock(&self.calls).push(Call::Assign(partitions.to_vec()));
        Ok(())
    }
    fn release(&self, partitions: &[Partition]) {
        lock(&self.calls).push(Call::Release(partitions.to_vec()));
    }
    fn commit(&self, positions: &[(Partition, NextOffset)]) {
        lock(&self.calls).push(Call::Commit(positions.to_vec()));
    }
    fn watermarks(&self, partition: &Partition) -> Option<(i64, i64)> {
        lock(&self.offsets).get(partition).copied()
    }
    fn restart_at(&self, moves: &[(Partition, i64)]) -> Result<(), SourceError> {
        let mut calls = lock(&self.calls);
        for (p, offset) in moves {
            calls.push(Call::Seek(p.clone(), *offset));
        }
        Ok(())
    }
    fn reassign(&self, partitions: &[Partition]) -> Result<(), SourceError> {
        lock(&self.calls).push(Call::Reassign(partitions.to_vec()));
        Ok(())
    }
    fn pause(&self, partitions: &[Partition]) {
        lock(&self.calls).push(Call::Pause(partitions.to_vec()));
    }
    fn resume(&self, partitions: &[Partition]) {
        lock(&self.calls).push(Call::Resume(partitions.to_vec()));
    }
}

/// Records every window it is handed and acknowledges it at once.
pub(crate) struct FakeOutput {
    pub emitted: std::sync::Arc<Mutex<Vec<ClosedWindow>>>,
    pub acks: mpsc::UnboundedSender<Vec<StateKey>>,
}

impl Output for FakeOutput {
    fn emit(&self, windows: Emission) {
        if windows.is_empty() {
            return;
        }
        let windows: Vec<ClosedWindow> = windows.into_windows().collect();
        let ids = windows.iter().map(|w| w.id.clone()).collect();
        lock(&self.emitted).extend(windows);
        let _ = self.acks.send(ids);
    }
}

/// Keeps every publication; their `done` answers wait for [`FakeChangelog::complete`]. Reads
/// find nothing, and wait while [`FakeChangelog::hold_reads`] holds them.
#[derive(Default)]
pub(crate) struct FakeChangelog {
    published: Mutex<Vec<Vec<Chunk>>>,
    waiting: Mutex<Vec<oneshot::Sender<Result<(), String>>>>,
    held: AtomicBool,
    reading: AtomicBool,
}

impl FakeChangelog {
    /// The chunks of every publication so far.
    pub(crate) fn chunks(&self) -> Vec<Chunk> {
        lock(&self.published).iter().flatten().cloned().collect()
    }

    /// Answers every publication waiting for its acknowledgement with `result`.
    pub(crate) fn complete(&self, result: Result<(), String>) -> usize {
        let waiting: Vec<_> = lock(&self.waiting).drain(..).collect();
        let n = waiting.len();
        for done in waiting {
            let _ = done.send(result.clone());
        }
        n
    }
}

impl FakeChangelog {
    /// Reads from now on wait until `hold_reads(false)` (or their cancellation).
    pub(crate) fn hold_reads(&self, hold: bool) {
        self.held.store(hold, Ordering::SeqCst);
    }

    /// Whether a read is waiting on [`FakeChangelog::hold_reads`].
    pub(crate) fn reading(&self) -> bool {
        self.reading.load(Ordering::SeqCst)
    }
}

impl ChangelogIo for FakeChangelog {
    fn publish(&self, batch: Batch) {
        lock(&self.published).push(batch.chunks);
        if let Some(done) = batch.done {
            lock(&self.waiting).push(done);
        }
    }
    fn read(
        &self,
        _group: &str,
        _partitions: &[Partition],
        _on_progress: OnProgress<'_>,
        cancel: &AtomicBool,
    ) -> Result<HashMap<Partition, Committed>, ChangelogError> {
        self.reading.store(true, Ordering::SeqCst);
        while self.held.load(Ordering::SeqCst) && !cancel.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        self.reading.store(false, Ordering::SeqCst);
        if cancel.load(Ordering::SeqCst) {
            return Err(ChangelogError::Cancelled {
                topic: "fake".to_string(),
            });
        }
        Ok(HashMap::new())
    }
}

/// A resident set the test sets (0: unknown).
#[derive(Default)]
pub(crate) struct FakeMemory(std::sync::atomic::AtomicU64);

impl FakeMemory {
    pub(crate) fn set(&self, bytes: u64) {
        self.0.store(bytes, std::sync::atomic::Ordering::SeqCst);
    }
}

impl crate::memory::Resident for FakeMemory {
    fn resident_bytes(&self) -> Option<u64> {
        Some(self.0.load(std::sync::atomic::Ordering::SeqCst)).filter(|b| *b > 0)
    }
}
