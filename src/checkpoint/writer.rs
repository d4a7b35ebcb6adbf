//! The background writer: makes checkpoints durable in sled, one at a time and in order, so
//! record processing never waits for a write or a flush. It also persists the records of
//! attempts that failed, in the same order.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::history::CheckpointRecord;
use super::protocol::Checkpoint;
use crate::store::{Store, StoreError, WriteRequest, WriteStats};

pub struct WriteJob {
    pub checkpoint: Checkpoint,
    pub record: CheckpointRecord,
    pub savepoint: Option<String>,
    pub started: Instant,
    /// Set when the checkpoint was abandoned (timeout) before the writer reached it.
    pub abandoned: Arc<AtomicBool>,
}

pub enum Job {
    Write(Box<WriteJob>),
    /// Persist the record of a terminal attempt that did not complete.
    Record(CheckpointRecord),
}

#[derive(Debug)]
pub enum WriteOutcome {
    Durable {
        id: u64,
        stats: Box<WriteStats>,
        duration: Duration,
        /// What was written, for publication to the changelog.
        checkpoint: Box<Checkpoint>,
    },
    Failed {
        id: u64,
        reason: String,
    },
    Skipped {
        id: u64,
    },
    /// A newer owner claimed the store: nothing more may be written.
    Superseded {
        id: u64,
        reason: String,
    },
}

/// Starts the writer task. Jobs are carried out in the order they are sent.
pub fn spawn(
    store: Arc<Store>,
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
                        tokio::task::spawn_blocking(move || store.record_attempt(&record, true))
                            .await;
                    if let Ok(Err(e)) = result {
                        tracing::warn!(checkpoint_id = id, error = %e, "cannot record the failed attempt in the history");
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
                        started,
                        ..
                    } = *job;
                    store
                        .write(&WriteRequest {
                            checkpoint: &checkpoint,
                            record,
                            savepoint,
                            started,
                        })
                        .map(|s| (s, started.elapsed(), checkpoint))
                })
                .await;
                match result {
                    Ok(Ok((stats, duration, checkpoint))) => WriteOutcome::Durable {
                        id,
                        stats: Box::new(stats),
                        duration,
                        checkpoint: Box::new(checkpoint),
                    },
                    Ok(Err(e @ StoreError::Superseded { .. })) => WriteOutcome::Superseded {
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
