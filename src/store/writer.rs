//! The background writer: makes checkpoints durable in the store, one at a time and in order,
//! so record processing never waits for a write or a flush. It also persists the records of
//! attempts that failed, in the same order.
//!
//! It writes through [`Checkpoints`], the narrow part of the store the service needs while
//! running; `memory::MemoryStore` implements it for in-process
//! tests.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::{SavepointMeta, Store, StoreError, WriteRequest, WriteStats};
use crate::checkpoint::history::CheckpointRecord;
use crate::checkpoint::protocol::Checkpoint;
use crate::checkpoint::savepoints::unnamed_to_drop;
use crate::checkpoint_id::CheckpointId;

/// What the running service asks of the checkpoint store: write a checkpoint, record a failed
/// attempt, look up and clear what it holds.
pub trait Checkpoints: Send + Sync + 'static {
    /// Makes `req` durable (with its savepoint, if one is asked for).
    fn write(&self, req: &WriteRequest<'_>) -> Result<WriteStats, StoreError>;
    /// Persists the record of an attempt that did not complete.
    fn record_attempt(&self, record: &CheckpointRecord) -> Result<(), StoreError>;
    /// The savepoint of this name, if there is one; `None` if the store stayed busy for
    /// [`super::SAVEPOINT_CHECK_WAIT`] (the record path does not wait for a checkpoint's write).
    fn savepoint_now(&self, name: &str) -> Option<Result<SavepointMeta, StoreError>>;
    /// The savepoints held (damaged ones left out).
    fn savepoints(&self) -> Result<Vec<SavepointMeta>, StoreError>;
    /// Deletes a savepoint.
    fn delete_savepoint(&self, name: &str) -> Result<SavepointMeta, StoreError>;
    /// Deletes every checkpoint (savepoints stay); returns how many.
    fn delete_checkpoints(&self) -> Result<usize, StoreError>;
    /// Ids of the retained checkpoints, or `None` while the store is busy (for the gauges,
    /// which must not wait for a checkpoint's write).
    fn checkpoint_ids_now(&self) -> Option<Result<Vec<CheckpointId>, StoreError>>;
    /// Bytes the store takes on disk.
    fn size_on_disk(&self) -> Result<u64, StoreError>;
}

impl Checkpoints for Store {
    fn write(&self, req: &WriteRequest<'_>) -> Result<WriteStats, StoreError> {
        Store::write(self, req)
    }
    fn record_attempt(&self, record: &CheckpointRecord) -> Result<(), StoreError> {
        Store::record_attempt(self, record, true)
    }
    fn savepoint_now(&self, name: &str) -> Option<Result<SavepointMeta, StoreError>> {
        Store::savepoint_now(self, name)
    }
    fn savepoints(&self) -> Result<Vec<SavepointMeta>, StoreError> {
        Store::savepoints(self)
    }
    fn delete_savepoint(&self, name: &str) -> Result<SavepointMeta, StoreError> {
        Store::delete_savepoint(self, name)
    }
    fn delete_checkpoints(&self) -> Result<usize, StoreError> {
        Store::delete_checkpoints(self)
    }
    fn checkpoint_ids_now(&self) -> Option<Result<Vec<CheckpointId>, StoreError>> {
        Store::checkpoint_ids_now(self)
    }
    fn size_on_disk(&self) -> Result<u64, StoreError> {
        Store::size_on_disk(self)
    }
}

pub struct WriteJob {
    pub checkpoint: Checkpoint,
    pub record: CheckpointRecord,
    pub savepoint: Option<String>,
    /// For an unnamed savepoint: which unnamed savepoints to keep once it is durable (the
    /// oldest others are deleted).
    pub prune: Option<Prune>,
    pub started: Instant,
    /// Set when the checkpoint was abandoned (timeout) before the writer reached it.
    pub abandoned: Arc<AtomicBool>,
}

/// The unnamed savepoints to keep after an unnamed one is durable.
#[derive(Debug, Clone)]
pub struct Prune {
    /// How many (`checkpoint.retained_unnamed_savepoints`).
    pub keep: usize,
    /// Never deleted: the savepoint just taken, the one `checkpoint.restore_from` names.
    pub protected: Vec<String>,
}

pub enum Job {
    Write(Box<WriteJob>),
    /// Persist the record of a terminal attempt that did not complete.
    Record(CheckpointRecord),
}

#[derive(Debug)]
pub enum WriteOutcome {
    Durable {
        id: CheckpointId,
        stats: Box<WriteStats>,
        duration: Duration,
        /// What was written, for publication to the changelog.
        checkpoint: Box<Checkpoint>,
    },
    Failed {
        id: CheckpointId,
        reason: String,
    },
    Skipped {
        id: CheckpointId,
    },
    /// Nothing more may be written: a newer owner claimed the store, or a sync of its files
    /// failed.
    Stopped {
        id: CheckpointId,
        reason: String,
    },
}

/// Deletes the oldest unnamed savepoints beyond the newest `prune.keep`
/// (`checkpoint.retained_unnamed_savepoints`), never a protected one; a failure is logged and
/// retried with the next unnamed savepoint.
fn drop_unnamed_savepoints(store: &dyn Checkpoints, prune: &Prune) {
    let held: Vec<(String, i64)> = match store.savepoints() {
        Ok(s) => s.into_iter().map(|m| (m.name, m.created_ms)).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list savepoints to remove the oldest unnamed ones");
            return;
        }
    };
    let keep = prune.keep;
    for name in unnamed_to_drop(&held, keep, &prune.protected) {
        match store.delete_savepoint(&name) {
            Ok(_) => tracing::info!(
                savepoint = %name,
                retained_unnamed_savepoints = keep,
                "removed the oldest unnamed savepoint"
            ),
            Err(e) => {
                tracing::warn!(savepoint = %name, error = %e, "cannot remove an unnamed savepoint")
            }
        }
    }
}

/// Starts the writer task. Jobs are carried out in the order they are sent.
pub fn spawn(
    store: Arc<dyn Checkpoints>,
) -> (
    mpsc::UnboundedSender<Job>,
    mpsc::UnboundedReceiver<WriteOutcome>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(job) = rx.recv().await {
            let job = match job {
                Job::Record(record) => {
                    let store = store.clone();
                    let id = record.id;
                    let result =
                        tokio::task::spawn_blocking(move || store.record_attempt(&record)).await;
                    if let Ok(Err(e)) = result {
                        tracing::warn!(checkpoint_id = id.0, error = %e, "cannot record the failed attempt in the history");
                    }
                    continue;
                }
                Job::Write(job) => job,
            };
            let id = job.checkpoint.id;
            let outcome = if job.abandoned.load(Ordering::SeqCst) {
                WriteOutcome::Skipped { id }
            } else {
                let store = store.clone();
                let result = tokio::task::spawn_blocking(move || {
                    let WriteJob {
                        checkpoint,
                        record,
                        savepoint,
                        prune,
                        started,
                        ..
                    } = *job;
                    let written = store
                        .write(&WriteRequest {
                            checkpoint: &checkpoint,
                            record,
                            savepoint,
                            started,
                        })
                        .map(|s| (s, started.elapsed(), checkpoint));
                    // only once a new unnamed savepoint was made (its name may have been taken)
                    if let (Ok((stats, ..)), Some(prune)) = (&written, prune) {
                        if stats.savepoint.is_some() {
                            drop_unnamed_savepoints(&*store, &prune);
                        }
                    }
                    written
                })
                .await;
                match result {
                    Ok(Ok((stats, duration, checkpoint))) => WriteOutcome::Durable {
                        id,
                        stats: Box::new(stats),
                        duration,
                        checkpoint: Box::new(checkpoint),
                    },
                    Ok(Err(
                        e @ (StoreError::Superseded { .. } | StoreError::SyncFailed { .. }),
                    )) => WriteOutcome::Stopped {
                        id,
                        reason: e.to_string(),
                    },
                    Ok(Err(e)) => WriteOutcome::Failed {
                        id,
                        reason: e.to_string(),
                    },
                    Err(e) => WriteOutcome::Failed {
                        id,
                        reason: format!("writer task ended abnormally: {e}"),
                    },
                }
            };
            if out_tx.send(outcome).is_err() {
                return;
            }
        }
    });
    (tx, out_rx)
}
