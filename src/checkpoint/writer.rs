//! The background writer: makes checkpoints durable in sled, one at a time and in order, so
//! record processing never waits for a write or a flush.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::protocol::Checkpoint;
use crate::store::{Store, WriteStats};

pub struct WriteJob {
    pub checkpoint: Checkpoint,
    pub started: Instant,
    /// Set when the checkpoint was abandoned (timeout) before the writer reached it.
    pub abandoned: Arc<AtomicBool>,
}

#[derive(Debug)]
pub enum WriteOutcome {
    Durable {
        id: u64,
        stats: WriteStats,
        duration: Duration,
    },
    Failed {
        id: u64,
        reason: String,
    },
    Skipped {
        id: u64,
    },
}

/// Starts the writer task. Jobs are written in the order they are sent.
pub fn spawn(
    store: Arc<Store>,
) -> (
    mpsc::UnboundedSender<WriteJob>,
    mpsc::UnboundedReceiver<WriteOutcome>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<WriteJob>();
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(job) = rx.recv().await {
            let id = job.checkpoint.id;
            let outcome = if job.abandoned.load(Ordering::SeqCst) {
                WriteOutcome::Skipped { id }
            } else {
                let store = store.clone();
                let result = tokio::task::spawn_blocking(move || {
                    store
                        .write(&job.checkpoint, job.started)
                        .map(|s| (s, job.started.elapsed()))
                })
                .await;
                match result {
                    Ok(Ok((stats, duration))) => WriteOutcome::Durable {
                        id,
                        stats,
                        duration,
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
