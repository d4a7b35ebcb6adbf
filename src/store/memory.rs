//! An in-memory [`Checkpoints`] for in-process tests of the service's components: it keeps
//! what was written, can be told to fail writes, and holds savepoints by name.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use super::{Checkpoints, SavepointMeta, StoreError, WriteRequest, WriteStats};
use crate::checkpoint::history::CheckpointRecord;
use crate::checkpoint::protocol::{meta_of, Checkpoint};
use crate::checkpoint_id::CheckpointId;
use crate::lock::lock;

/// One durable write, as the store saw it.
#[derive(Debug, Clone)]
pub struct Written {
    pub checkpoint: Checkpoint,
    pub savepoint: Option<String>,
}

#[derive(Default)]
struct Inner {
    written: Vec<Written>,
    attempts: Vec<CheckpointRecord>,
    savepoints: BTreeMap<String, SavepointMeta>,
    /// Writes asked for so far.
    writes: usize,
    /// Writes to fail (by number, the first being 1), with the reason and whether as a failed
    /// sync of the store's files (which stops the writer's user) rather than a write error.
    failing: BTreeMap<usize, (String, bool)>,
    /// How long every write takes (a slow disk).
    delay: Duration,
    /// The checks that must not wait find the store busy (as while a checkpoint is written).
    busy: bool,
}

#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

impl MemoryStore {
    /// From now on, the checks that must not wait (`savepoint_now`, `checkpoint_ids_now`)
    /// find the store busy, or no longer.
    pub fn set_busy(&self, busy: bool) {
        lock(&self.inner).busy = busy;
    }

    /// The next write fails with `reason`.
    pub fn fail_next_write(&self, reason: &str) {
        self.fail_write_after(0, reason);
    }

    /// The write after the next `successes` ones fails with `reason`.
    pub fn fail_write_after(&self, successes: usize, reason: &str) {
        let mut inner = lock(&self.inner);
        let n = inner.writes + successes + 1;
        inner.failing.insert(n, (reason.to_string(), false));
    }

    /// The next write fails as a failed sync of the store's files does.
    pub fn fail_next_sync(&self, detail: &str) {
        let mut inner = lock(&self.inner);
        let n = inner.writes + 1;
        inner.failing.insert(n, (detail.to_string(), true));
    }

    /// Every write from now on takes `delay` (a slow disk).
    pub fn delay_writes(&self, delay: Duration) {
        lock(&self.inner).delay = delay;
    }

    /// Every durable write so far, in order.
    pub fn written(&self) -> Vec<Written> {
        lock(&self.inner).written.clone()
    }

    /// Records of attempts that did not complete.
    pub fn attempts(&self) -> Vec<CheckpointRecord> {
        lock(&self.inner).attempts.clone()
    }

    fn path() -> PathBuf {
        PathBuf::from("memory")
    }
}

impl Checkpoints for MemoryStore {
    fn write(&self, req: &WriteRequest<'_>) -> Result<WriteStats, StoreError> {
        let delay = lock(&self.inner).delay;
        std::thread::sleep(delay);
        let mut inner = lock(&self.inner);
        inner.writes += 1;
        let n = inner.writes;
        match inner.failing.remove(&n) {
            Some((detail, true)) => {
                return Err(StoreError::SyncFailed {
                    path: Self::path(),
                    detail,
                })
            }
            Some((detail, false)) => {
                return Err(StoreError::Corrupt {
                    path: Self::path(),
                    detail,
                })
            }
            None => {}
        }
        let cp = req.checkpoint;
        // a name taken: the checkpoint is written without the savepoint, as the store does
        let taken = req
            .savepoint
            .as_ref()
            .filter(|name| inner.savepoints.contains_key(name.as_str()));
        let savepoint_refused = taken.map(|name| {
            StoreError::SavepointExists {
                name: name.clone(),
                path: Self::path(),
            }
            .to_string()
        });
        let savepoint = req
            .savepoint
            .as_ref()
            .filter(|_| taken.is_none())
            .map(|name| SavepointMeta {
                name: name.clone(),
                checkpoint_id: cp.id,
                created_ms: cp.trigger_ms,
                meta: meta_of(cp, 0, 0),
                entries: cp.delta.entries,
            });
        if let Some(meta) = &savepoint {
            inner.savepoints.insert(meta.name.clone(), meta.clone());
        }
        inner.written.push(Written {
            checkpoint: cp.clone(),
            savepoint: savepoint.as_ref().map(|s| s.name.clone()),
        });
        Ok(WriteStats {
            bytes: 1,
            write: Duration::ZERO,
            flush: Duration::ZERO,
            savepoint,
            savepoint_refused,
        })
    }

    fn record_attempt(&self, record: &CheckpointRecord) -> Result<(), StoreError> {
        lock(&self.inner).attempts.push(record.clone());
        Ok(())
    }

    fn savepoint_now(&self, name: &str) -> Option<Result<SavepointMeta, StoreError>> {
        let inner = lock(&self.inner);
        if inner.busy {
            return None;
        }
        Some(
            inner
                .savepoints
                .get(name)
                .cloned()
                .ok_or_else(|| StoreError::NoSuchSavepoint {
                    name: name.to_string(),
                    path: Self::path(),
                }),
        )
    }

    fn savepoints(&self) -> Result<Vec<SavepointMeta>, StoreError> {
        Ok(lock(&self.inner).savepoints.values().cloned().collect())
    }

    fn delete_savepoint(&self, name: &str) -> Result<SavepointMeta, StoreError> {
        lock(&self.inner)
            .savepoints
            .remove(name)
            .ok_or_else(|| StoreError::NoSuchSavepoint {
                name: name.to_string(),
                path: Self::path(),
            })
    }

    fn delete_checkpoints(&self) -> Result<usize, StoreError> {
        let mut inner = lock(&self.inner);
        let n = inner.written.len();
        inner.written.clear();
        Ok(n)
    }

    fn checkpoint_ids_now(&self) -> Option<Result<Vec<CheckpointId>, StoreError>> {
        let inner = lock(&self.inner);
        if inner.busy {
            return None;
        }
        Some(Ok(inner.written.iter().map(|w| w.checkpoint.id).collect()))
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(0)
    }
}
