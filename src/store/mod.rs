//! The sled store: one tree, key prefixes, and one atomic batch per checkpoint followed by a
//! flush. A checkpoint is complete only once the flush returned.

mod codec;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::checkpoint::protocol::{
    check_applicable, meta_of, ApplyError, Checkpoint, CheckpointMeta,
};
use crate::engine::{Entry, RestoredState};
pub use codec::FORMAT_VERSION;
use codec::{
    decode_state_key, history_key, state_key, HISTORY_PREFIX, META_CURRENT, META_VERSION,
    STATE_PREFIX,
};

/// How many completed checkpoints the store remembers for `/api/checkpoints`.
const HISTORY_KEEP: u64 = 100;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("checkpoint directory {path} is in use by another checkpointer process (sled lock held); stop it or point checkpoint.dir elsewhere")]
    Locked { path: PathBuf },
    #[error("cannot open checkpoint store at {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("checkpoint store at {path} has format version {found}; this build reads version {supported} only")]
    UnsupportedFormat {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("checkpoint store I/O failed: {0}")]
    Io(#[from] sled::Error),
    #[error("checkpoint {checkpoint_id} cannot be applied: {source}")]
    Apply {
        checkpoint_id: u64,
        #[source]
        source: ApplyError,
    },
    #[error("corrupted checkpoint store at {path}: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("cannot encode checkpoint {checkpoint_id}: {source}")]
    Encode {
        checkpoint_id: u64,
        #[source]
        source: postcard::Error,
    },
}

/// Timings and size of one durable checkpoint.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WriteStats {
    pub bytes: u64,
    pub write: Duration,
    pub flush: Duration,
}

pub struct Store {
    path: PathBuf,
    db: sled::Db,
    tree: sled::Tree,
}

impl Store {
    /// Opens (or creates) the store at `path`. Fails fast with `Locked` if another process
    /// holds it.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(path).map_err(|e| StoreError::Open {
            path: path.to_path_buf(),
            source: sled::Error::Io(e),
        })?;
        let db = sled::Config::new()
            .path(path)
            .flush_every_ms(None)
            .open()
            .map_err(|source| match &source {
                sled::Error::Io(e) if e.to_string().contains("could not acquire lock") => {
                    StoreError::Locked {
                        path: path.to_path_buf(),
                    }
                }
                _ => StoreError::Open {
                    path: path.to_path_buf(),
                    source,
                },
            })?;
        let tree = db.open_tree("checkpoints")?;
        let store = Store {
            path: path.to_path_buf(),
            db,
            tree,
        };
        store.check_version()?;
        Ok(store)
    }

    fn check_version(&self) -> Result<(), StoreError> {
        match self.tree.get(META_VERSION)? {
            Some(raw) => {
                let found = <[u8; 4]>::try_from(raw.as_ref())
                    .map(u32::from_be_bytes)
                    .map_err(|_| self.corrupt("format version key is malformed"))?;
                if found != FORMAT_VERSION {
                    return Err(StoreError::UnsupportedFormat {
                        path: self.path.clone(),
                        found,
                        supported: FORMAT_VERSION,
                    });
                }
            }
            None => {
                self.tree
                    .insert(META_VERSION, &FORMAT_VERSION.to_be_bytes())?;
                self.db.flush()?;
            }
        }
        Ok(())
    }

    fn corrupt(&self, detail: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            detail: detail.into(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The latest complete checkpoint's metadata.
    pub fn current(&self) -> Result<Option<CheckpointMeta>, StoreError> {
        match self.tree.get(META_CURRENT)? {
            None => Ok(None),
            Some(raw) => postcard::from_bytes(&raw)
                .map(Some)
                .map_err(|e| self.corrupt(format!("current checkpoint metadata: {e}"))),
        }
    }

    /// Loads the latest complete checkpoint.
    pub fn load(&self) -> Result<Option<(CheckpointMeta, RestoredState)>, StoreError> {
        let Some(meta) = self.current()? else {
            return Ok(None);
        };
        let mut entries = Vec::new();
        for item in self.tree.scan_prefix(STATE_PREFIX) {
            let (k, v) = item?;
            let key = decode_state_key(&k)
                .ok_or_else(|| self.corrupt(format!("undecodable state key {:?}", k.as_ref())))?;
            let entry: Entry = postcard::from_bytes(&v)
                .map_err(|e| self.corrupt(format!("state entry {key:?}: {e}")))?;
            entries.push((key, entry));
        }
        let restored = RestoredState {
            partitions: meta.partitions.clone(),
            watermark: meta.watermark,
            entries,
        };
        Ok(Some((meta, restored)))
    }

    /// Applies `cp` as one atomic batch and flushes it. `started` is when it was triggered
    /// (its duration runs from there to the end of the flush).
    pub fn write(&self, cp: &Checkpoint, started: Instant) -> Result<WriteStats, StoreError> {
        let current = self.current()?;
        check_applicable(current.as_ref(), cp).map_err(|source| StoreError::Apply {
            checkpoint_id: cp.id,
            source,
        })?;
        let t0 = Instant::now();
        let encode_err = |source| StoreError::Encode {
            checkpoint_id: cp.id,
            source,
        };
        let mut batch = sled::Batch::default();
        let mut bytes: u64 = 0;
        if cp.delta.full {
            for item in self.tree.scan_prefix(STATE_PREFIX).keys() {
                batch.remove(item?);
            }
        }
        for key in &cp.delta.deletes {
            let k = state_key(key);
            bytes += k.len() as u64;
            batch.remove(k);
        }
        for (key, entry) in &cp.delta.upserts {
            let k = state_key(key);
            let v = postcard::to_stdvec(entry).map_err(encode_err)?;
            bytes += (k.len() + v.len()) as u64;
            batch.insert(k, v);
        }
        // the duration is only known after the flush: recorded as trigger-to-write here and
        // corrected below, once durable. The bytes are exact.
        let provisional = meta_of(cp, started.elapsed().as_millis() as u64, bytes);
        let meta_raw = postcard::to_stdvec(&provisional).map_err(encode_err)?;
        bytes += meta_raw.len() as u64;
        batch.insert(META_CURRENT, meta_raw.clone());
        batch.insert(history_key(cp.id), meta_raw);
        if cp.id > HISTORY_KEEP {
            batch.remove(history_key(cp.id - HISTORY_KEEP));
        }
        self.tree.apply_batch(batch)?;
        let write = t0.elapsed();
        let t1 = Instant::now();
        self.db.flush()?;
        let mut done = provisional;
        done.duration_ms = started.elapsed().as_millis() as u64;
        // metadata only, made durable by the next checkpoint's flush; the checkpoint is
        // durable already, so a failure here is logged, not reported as a failed checkpoint
        let rewrite = postcard::to_stdvec(&done)
            .map_err(encode_err)
            .and_then(|raw| {
                self.tree.insert(META_CURRENT, raw.clone())?;
                self.tree.insert(history_key(cp.id), raw)?;
                Ok(())
            });
        if let Err(e) = rewrite {
            tracing::warn!(checkpoint_id = cp.id, error = %e, "cannot record the final duration of a durable checkpoint");
        }
        Ok(WriteStats {
            bytes,
            write,
            flush: t1.elapsed(),
        })
    }

    /// Completed checkpoints, newest first, at most `limit`.
    pub fn history(&self, limit: usize) -> Result<Vec<CheckpointMeta>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(HISTORY_PREFIX).rev().take(limit) {
            let (_, v) = item?;
            out.push(
                postcard::from_bytes(&v)
                    .map_err(|e| self.corrupt(format!("history entry: {e}")))?,
            );
        }
        Ok(out)
    }

    /// Bytes the store occupies on disk.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.db.size_on_disk()?)
    }
}

#[cfg(test)]
mod tests;
