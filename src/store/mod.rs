//! The sled store: one tree of checkpoints, key prefixes (see `codec`), and one atomic batch
//! per checkpoint (its group versions past `partial::BATCH_BYTES` written ahead of it) followed
//! by a flush. A checkpoint is complete only once the flush returned. Once checkpoints have
//! written enough since the last time, sled's log is advanced before the flush (with filler in
//! a tree of its own), so that sled deletes the files of what they replaced (`reclaim`).
//!
//! State is kept as versions of key groups: every checkpoint writes the groups it changed under
//! its own id, so each retained checkpoint can be restored exactly (`versions`). Savepoints are
//! full copies that retention never touches (`savepoints`); `portable` is their export file format.

mod codec;
mod durability;
mod legacy;
#[cfg(test)]
pub(crate) mod memory;
mod migrate;
mod owner;
mod packs;
mod partial;
pub mod portable;
mod reclaim;
mod savepoints;
mod versions;
pub mod writer;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::checkpoint::history::{CheckpointRecord, Status};
use crate::checkpoint::protocol::{ApplyError, CheckpointMeta};
use crate::checkpoint_id::CheckpointId;
use crate::engine::group::DEFAULT_GROUPS;
use crate::engine::GroupLayout;
pub use codec::FORMAT_VERSION;
use codec::{
    decode_id_key, id_key, seal, unseal, CHECKPOINT_PREFIX, HISTORY_PREFIX, META_GROUPS, META_HEAD,
    META_VERSION,
};
pub use owner::{read_owner_file, Owner, OWNER_FILE};
pub use savepoints::SavepointMeta;
pub use versions::{Unreadable, WriteRequest};
pub use writer::Checkpoints;

/// sled's page cache when the configuration does not say (`checkpoint.cache_capacity`).
pub const DEFAULT_CACHE_CAPACITY: u64 = 64 << 20;

/// How long an open waits for a lock that is being released.
const LOCK_GRACE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("checkpoint directory {path} is in use by another checkpointer process (sled lock held); stop it, or use the running instance's HTTP API")]
    Locked { path: PathBuf },
    #[error("checkpoint directory {path} stayed locked by another process for {waited:?} (checkpoint.lock_wait); if no other instance uses this volume, find the process holding it")]
    LockTimeout { path: PathBuf, waited: Duration },
    #[error("cannot open checkpoint store at {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("checkpoint store at {path} was claimed by a newer owner, {newer}, after this process ({mine}) claimed it; this process stops writing to it. Two instances use one volume: stop this one (the volume's file locks are not reliable, see docs/upgrades.md)")]
    Superseded {
        path: PathBuf,
        mine: Box<Owner>,
        newer: Box<Owner>,
    },
    #[error("a sync of checkpoint store {path}'s files failed ({detail}); this process writes no more checkpoints to it, since the failed sync may have dropped what it was writing. Check the volume, then restart: the store opens from what is on the disk")]
    SyncFailed { path: PathBuf, detail: String },
    #[error("no checkpoint store at {path}")]
    Missing { path: PathBuf },
    #[error("checkpoint store at {path} has format version {found}, written by a newer build; this build reads versions up to {supported} and will not guess at a newer layout. Run the newer build, or restore a savepoint exported before the upgrade (docs/upgrades.md)")]
    UnsupportedFormat {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("checkpoint store at {path} has format version {found} and needs a migration to {FORMAT_VERSION}")]
    NeedsMigration { path: PathBuf, found: u32 },
    #[error("checkpoint store I/O failed: {0}")]
    Io(#[from] sled::Error),
    #[error("checkpoint store I/O failed: {0}")]
    Pack(#[from] packs::PackError),
    #[error("checkpoint {checkpoint_id} cannot be applied: {source}")]
    Apply {
        checkpoint_id: CheckpointId,
        #[source]
        source: ApplyError,
    },
    #[error("corrupted checkpoint store at {path}: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error(transparent)]
    Unreadable(#[from] Unreadable),
    #[error("cannot encode checkpoint {checkpoint_id}: {source}")]
    Encode {
        checkpoint_id: CheckpointId,
        #[source]
        source: postcard::Error,
    },
    #[error("checkpoint {checkpoint_id} is not retained in {path}")]
    NoSuchCheckpoint {
        checkpoint_id: CheckpointId,
        path: PathBuf,
    },
    #[error("no savepoint named {name:?} in {path}")]
    NoSuchSavepoint { name: String, path: PathBuf },
    #[error("a savepoint named {name:?} already exists in {path}")]
    SavepointExists { name: String, path: PathBuf },
    #[error("invalid savepoint: {0}")]
    InvalidSavepoint(String),
    #[error("cannot move the held position: {0}")]
    Position(String),
}

/// Timings and size of one durable checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteStats {
    pub bytes: u64,
    pub write: Duration,
    pub flush: Duration,
    /// The savepoint made from this checkpoint, if one was asked for.
    pub savepoint: Option<SavepointMeta>,
    /// Why the savepoint asked for was not made (its name was taken by the time of the
    /// write); the checkpoint is durable all the same.
    pub savepoint_refused: Option<String>,
}

/// A complete checkpoint the store can restore.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Retained {
    pub meta: CheckpointMeta,
    /// Entries its state holds; checked on restore.
    pub live_entries: u64,
}

/// How [`Store::open`] opens a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    /// Open it, or create it; migrate an older format in place (then earlier builds can no
    /// longer read it).
    Create,
    /// Open it, or create it; an older format is reported as `NeedsMigration` and left as it
    /// is.
    NoMigration,
    /// Open it, or create it, without looking at its format: the caller checks a
    /// `scratch_copy` and/or calls `upgrade`, holding the lock throughout (the service's
    /// start).
    AsIs,
    /// It must exist (never created); migrate an older format in place (offline commands
    /// that change it).
    Existing,
    /// It must exist, and is never changed: a store of an older format is read through a
    /// migrated scratch copy, so it stays readable by the build that wrote it (offline reads,
    /// pre-flight checks).
    Inspect,
}

/// What checking the format of a store of an older format does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Migrate {
    /// Migrate it to the current format (then earlier builds can no longer read it).
    InPlace,
    /// Leave it as it is and report `NeedsMigration`.
    Refuse,
}

/// How much the store keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Complete checkpoints kept restorable.
    pub checkpoints: usize,
    /// Attempt records kept in the history.
    pub history: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            checkpoints: 3,
            history: 1000,
        }
    }
}

pub struct Store {
    path: PathBuf,
    db: sled::Db,
    tree: sled::Tree,
    retention: Retention,
    /// Key groups per scope of the layout recorded when this store is created, or migrated
    /// from a format without one (`state.key_groups`); an existing layout is never changed.
    new_groups: u16,
    /// Set for a migrated copy made for inspection: the directory it lives in, removed when
    /// the copy is dropped (after the database, which is declared before it).
    scratch: Option<tempfile::TempDir>,
    /// This process's claim (`claim`); every write checks it first.
    owner: Option<Owner>,
    /// Group versions a checkpoint writes ahead of its last batch once they pass this many
    /// bytes (`partial::BATCH_BYTES`; smaller in tests).
    batch_bytes: usize,
    /// When writes and removals advance sled's log (`reclaim`).
    advances: reclaim::Advances,
    /// The files the group versions' values are in (`packs`).
    packs: packs::Packs,
    /// The syncs sled's flush leaves undone (`durability`); none for a migrated copy made for
    /// inspection, which is thrown away.
    durability: Option<std::sync::Arc<durability::Durability>>,
    /// Held by every write and every read, so that one thread uses the tree at a time: sled's
    /// reads write too (`durability`). Reentrant: a write reads under the same hold; the count
    /// is how deep the holding thread's holds are nested.
    writes: parking_lot::ReentrantMutex<std::cell::Cell<u32>>,
    /// Tests: a write fails after this many batches written ahead, as a crash would leave it.
    #[cfg(test)]
    fail_after_batches: std::sync::atomic::AtomicUsize,
    /// Tests: how many batches `apply` applied.
    #[cfg(test)]
    batches: std::sync::atomic::AtomicUsize,
    /// Tests: group versions written into sled, as formats before 6 did (a store migrated
    /// from one holds them so until its groups are written again), not into packs.
    #[cfg(test)]
    values_in_sled: bool,
}

/// How long the record path waits for the store to check that a savepoint's name is free
/// ([`Store::savepoint_now`]): a checkpoint's write holds it for seconds at millions of keys.
pub const SAVEPOINT_CHECK_WAIT: Duration = Duration::from_millis(50);

/// A hold of the store's lock ([`Store::exclusive`]); a read's hold ([`Store::reading`]) syncs
/// the blob files the read wrote when it is the outermost one.
struct Hold<'a> {
    depth: parking_lot::ReentrantMutexGuard<'a, std::cell::Cell<u32>>,
    after_read: Option<&'a durability::Durability>,
}

impl<'a> Hold<'a> {
    fn new(
        depth: parking_lot::ReentrantMutexGuard<'a, std::cell::Cell<u32>>,
        after_read: Option<&'a durability::Durability>,
    ) -> Self {
        depth.set(depth.get() + 1);
        Hold { depth, after_read }
    }
}

impl Drop for Hold<'_> {
    /// Runs before the lock is released. A sync that fails is remembered and fails the next
    /// write (`durability`); a file that cannot be listed or opened is retried by the next pass.
    fn drop(&mut self) {
        let depth = self.depth.get().saturating_sub(1);
        self.depth.set(depth);
        if let (0, Some(d)) = (depth, self.after_read) {
            if d.failed() {
                return;
            }
            if let Err(e) = d.sync_blobs_if_new() {
                tracing::error!(error = %e, "cannot sync what a read of the checkpoint store wrote");
            }
        }
    }
}

impl Drop for Store {
    /// sled flushes its log when the database is dropped: the store flushes it first, the
    /// blob files its records point at before it and the log file after it (`durability`).
    fn drop(&mut self) {
        let _one_writer = self.exclusive();
        if !self.durability.as_ref().is_some_and(|d| d.failed()) {
            if let Err(e) = self.flush_synced() {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot sync the store's files as it closes");
            }
        }
        if self.durability.as_ref().is_some_and(|d| d.failed()) {
            // after a failed sync, sled must not flush what it holds on its way out (a batch
            // pointing at files whose sync failed): its handles are left for the process's end
            std::mem::forget(self.db.clone());
            std::mem::forget(self.tree.clone());
        }
    }
}

impl Store {
    /// Opens the store at `path` as `mode` says (creating it, migrating it, or only reading
    /// it). Fails fast with `Locked` if another process holds it.
    pub fn open(path: &Path, mode: Open) -> Result<Store, StoreError> {
        Self::open_with_cache(path, mode, DEFAULT_CACHE_CAPACITY)
    }

    /// [`Store::open`] with sled's page cache bounded to `cache_capacity` bytes.
    pub fn open_with_cache(
        path: &Path,
        mode: Open,
        cache_capacity: u64,
    ) -> Result<Store, StoreError> {
        match mode {
            Open::Create | Open::NoMigration | Open::AsIs => std::fs::create_dir_all(path)
                .map_err(|e| StoreError::Open {
                    path: path.to_path_buf(),
                    source: sled::Error::Io(e),
                })?,
            Open::Existing | Open::Inspect => Self::require_existing(path)?,
        }
        let store = Self::open_existing_dir(path, cache_capacity)?;
        match mode {
            Open::Create | Open::Existing => store.check_version(Migrate::InPlace)?,
            Open::NoMigration => store.check_version(Migrate::Refuse)?,
            Open::AsIs => {}
            Open::Inspect => {
                // an older format, or none yet (a start that died before stamping its new
                // store): the copy is migrated or stamped, the store left for the next start
                if store
                    .format_version()?
                    .is_none_or(|found| found < FORMAT_VERSION)
                {
                    return store.scratch_copy();
                }
                store.check_version(Migrate::Refuse)?;
            }
        }
        Ok(store)
    }

    /// [`Open::Existing`] for a change made offline: a store of a format before key groups is
    /// migrated with `key_groups` groups per scope (`state.key_groups`) instead of the
    /// default; a store that has a layout keeps it.
    pub fn open_migrating(path: &Path, key_groups: u16) -> Result<Store, StoreError> {
        Self::require_existing(path)?;
        let store =
            Self::open_existing_dir(path, DEFAULT_CACHE_CAPACITY)?.with_key_groups(key_groups);
        store.check_version(Migrate::InPlace)?;
        Ok(store)
    }

    /// Migrates an older format in place (then earlier builds can no longer read it), refuses
    /// a newer one, and stamps a new store with the current format.
    pub fn upgrade(&self) -> Result<(), StoreError> {
        self.check_version(Migrate::InPlace)
    }

    /// The format version the store records; `None` for a new, empty store.
    pub fn format_version(&self) -> Result<Option<u32>, StoreError> {
        Ok(self.stamped_version()?.map(base_format))
    }

    /// The format version as stamped (`PARTIAL_FORMAT_OFFSET` higher while versions of an
    /// incomplete checkpoint are on disk).
    fn stamped_version(&self) -> Result<Option<u32>, StoreError> {
        let _reading = self.reading();
        match self.tree.get(META_VERSION)? {
            None => Ok(None),
            Some(raw) => <[u8; 4]>::try_from(raw.as_ref())
                .map(|b| Some(u32::from_be_bytes(b)))
                .map_err(|_| self.corrupt("format version key is malformed")),
        }
    }

    /// A copy of this store migrated to the current format, in a temporary directory next to
    /// the store's (`.checkpointer-check-*`, removed when the copy is dropped). This store is
    /// not changed.
    pub fn scratch_copy(&self) -> Result<Store, StoreError> {
        let io = |e: std::io::Error| StoreError::Open {
            path: self.path.clone(),
            source: sled::Error::Io(e),
        };
        let builder = || {
            let mut b = tempfile::Builder::new();
            b.prefix(".checkpointer-check-");
            b
        };
        let scratch = match self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            Some(parent) => builder()
                .tempdir_in(parent)
                .or_else(|_| builder().tempdir()),
            None => builder().tempdir(),
        }
        .map_err(io)?;
        let copy_dir = scratch.path().join("store");
        let (db, tree) = self.copied(&copy_dir)?;
        let copy = Store {
            path: self.path.clone(),
            db,
            tree,
            packs: packs::Packs::new(&copy_dir),
            retention: self.retention,
            new_groups: self.new_groups,
            scratch: Some(scratch),
            owner: None,
            batch_bytes: partial::BATCH_BYTES,
            advances: reclaim::Advances::default(),
            durability: None,
            writes: parking_lot::ReentrantMutex::default(),
            #[cfg(test)]
            fail_after_batches: std::sync::atomic::AtomicUsize::new(usize::MAX),
            #[cfg(test)]
            batches: std::sync::atomic::AtomicUsize::new(0),
            #[cfg(test)]
            values_in_sled: false,
        };
        copy.check_version(Migrate::InPlace)?;
        Ok(copy)
    }

    /// Whether this is a migrated copy made for inspection (`scratch_copy`).
    pub fn is_scratch(&self) -> bool {
        self.scratch.is_some()
    }

    fn require_existing(path: &Path) -> Result<(), StoreError> {
        if !path.join("conf").exists() && !path.join("db").exists() {
            return Err(StoreError::Missing {
                path: path.to_path_buf(),
            });
        }
        Ok(())
    }

    fn open_existing_dir(path: &Path, cache_capacity: u64) -> Result<Store, StoreError> {
        // a process that just exited (or a store just dropped) may hold the lock for a moment
        let deadline = std::time::Instant::now() + LOCK_GRACE;
        let db = loop {
            let config = sled::Config::new()
                .path(path)
                .cache_capacity(cache_capacity)
                .segment_size(reclaim::SEGMENT_SIZE)
                .flush_every_ms(None);
            match config.open() {
                Ok(db) => break db,
                Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                    if std::time::Instant::now() >= deadline {
                        return Err(StoreError::Locked {
                            path: path.to_path_buf(),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(source) => {
                    return Err(StoreError::Open {
                        path: path.to_path_buf(),
                        source,
                    })
                }
            }
        };
        let tree = db.open_tree("checkpoints")?;
        Ok(Store {
            path: path.to_path_buf(),
            db,
            tree,
            packs: packs::Packs::new(path),
            retention: Retention::default(),
            new_groups: DEFAULT_GROUPS,
            scratch: None,
            owner: None,
            batch_bytes: partial::BATCH_BYTES,
            advances: reclaim::Advances::default(),
            durability: Some(std::sync::Arc::new(durability::Durability::new(path))),
            writes: parking_lot::ReentrantMutex::default(),
            #[cfg(test)]
            fail_after_batches: std::sync::atomic::AtomicUsize::new(usize::MAX),
            #[cfg(test)]
            batches: std::sync::atomic::AtomicUsize::new(0),
            #[cfg(test)]
            values_in_sled: false,
        })
    }

    pub fn with_retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    /// The key groups per scope recorded if this store gets its layout now: when it is new
    /// (at [`Store::upgrade`]; a store opened with [`Open::Create`] is stamped at open) or is
    /// migrated from a format without groups. A store that has a layout keeps it.
    pub fn with_key_groups(mut self, groups: u16) -> Self {
        self.new_groups = groups.max(1);
        self
    }

    /// The layout this store records when it gets one (see [`Store::with_key_groups`]).
    fn new_layout(&self) -> GroupLayout {
        GroupLayout::random(self.new_groups)
    }

    fn check_version(&self, migrate: Migrate) -> Result<(), StoreError> {
        let _one_writer = self.exclusive();
        match self.stamped_version()?.map(base_format) {
            Some(found) => match found {
                FORMAT_VERSION => {}
                1..FORMAT_VERSION if migrate == Migrate::Refuse => {
                    return Err(StoreError::NeedsMigration {
                        path: self.path.clone(),
                        found,
                    })
                }
                1..FORMAT_VERSION => migrate::upgrade(self, found)?,
                _ => {
                    return Err(StoreError::UnsupportedFormat {
                        path: self.path.clone(),
                        found,
                        supported: FORMAT_VERSION,
                    })
                }
            },
            None => {
                let mut batch = sled::Batch::default();
                batch.insert(META_VERSION, &FORMAT_VERSION.to_be_bytes());
                batch.insert(
                    META_GROUPS,
                    Self::encode(&self.new_layout(), CheckpointId(0))?,
                );
                self.apply(batch)?;
                self.flush_synced()?;
                if let Some(d) = &self.durability {
                    d.sync_created().map_err(|e| self.sync_failed(e))?;
                }
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

    /// Decodes a sealed value; `what` names it in the error.
    fn decode<T: DeserializeOwned>(&self, raw: &[u8], what: &str) -> Result<T, StoreError> {
        let payload =
            unseal(raw).ok_or_else(|| self.corrupt(format!("{what}: checksum mismatch")))?;
        postcard::from_bytes(payload).map_err(|e| self.corrupt(format!("{what}: {e}")))
    }

    fn encode<T: Serialize>(value: &T, checkpoint_id: CheckpointId) -> Result<Vec<u8>, StoreError> {
        postcard::to_stdvec(value)
            .map(|payload| seal(&payload))
            .map_err(|source| StoreError::Encode {
                checkpoint_id,
                source,
            })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How keys map to groups in this store (recorded at creation).
    pub fn layout(&self) -> Result<GroupLayout, StoreError> {
        let _reading = self.reading();
        match self.tree.get(META_GROUPS)? {
            Some(raw) => self.decode(&raw, "key-group layout"),
            None => Err(self.corrupt("the key-group layout (meta/groups) is missing")),
        }
    }

    /// Id of the newest checkpoint written, which the next delta must build on.
    pub fn head(&self) -> Result<Option<CheckpointId>, StoreError> {
        let _reading = self.reading();
        match self.tree.get(META_HEAD)? {
            None => Ok(None),
            Some(raw) => <[u8; 8]>::try_from(raw.as_ref())
                .map(|b| Some(CheckpointId(u64::from_be_bytes(b))))
                .map_err(|_| self.corrupt("head checkpoint id is malformed")),
        }
    }

    /// The first id not used by any checkpoint, attempt or head: ids are never reused, even
    /// after the checkpoints were deleted.
    pub fn next_id(&self) -> Result<CheckpointId, StoreError> {
        let _reading = self.reading();
        let last = |prefix: &[u8]| -> Result<CheckpointId, StoreError> {
            Ok(match self.tree.scan_prefix(prefix).keys().next_back() {
                Some(k) => decode_id_key(prefix, &k?).unwrap_or_default(),
                None => CheckpointId::default(),
            })
        };
        // nor the id of a checkpoint that stopped after writing versions ahead (they are
        // removed before the next write, but the id stays used)
        let max = last(CHECKPOINT_PREFIX)?
            .max(last(HISTORY_PREFIX)?)
            .max(self.head()?.unwrap_or_default())
            .max(self.partial_id()?.unwrap_or_default());
        Ok(max.next())
    }

    /// Ids of the retained checkpoints, oldest first.
    pub fn checkpoint_ids(&self) -> Result<Vec<CheckpointId>, StoreError> {
        let _reading = self.reading();
        let mut out = Vec::new();
        for k in self.tree.scan_prefix(CHECKPOINT_PREFIX).keys() {
            if let Some(id) = decode_id_key(CHECKPOINT_PREFIX, &k?) {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Retained checkpoints, oldest first.
    pub fn retained(&self) -> Result<Vec<Retained>, StoreError> {
        let _reading = self.reading();
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(CHECKPOINT_PREFIX) {
            let (k, v) = item?;
            let id = decode_id_key(CHECKPOINT_PREFIX, &k).unwrap_or_default();
            out.push(self.decode(&v, &format!("metadata of checkpoint {id}"))?);
        }
        Ok(out)
    }

    /// A retained checkpoint's metadata.
    pub fn checkpoint(&self, id: CheckpointId) -> Result<Retained, StoreError> {
        let _reading = self.reading();
        match self.tree.get(id_key(CHECKPOINT_PREFIX, id))? {
            Some(raw) => self.decode(&raw, &format!("metadata of checkpoint {id}")),
            None => Err(StoreError::NoSuchCheckpoint {
                checkpoint_id: id,
                path: self.path.clone(),
            }),
        }
    }

    /// The newest retained checkpoint's metadata.
    pub fn current(&self) -> Result<Option<CheckpointMeta>, StoreError> {
        let _reading = self.reading();
        match self
            .tree
            .scan_prefix(CHECKPOINT_PREFIX)
            .values()
            .next_back()
        {
            None => Ok(None),
            Some(raw) => Ok(Some(
                self.decode::<Retained>(&raw?, "newest checkpoint")?.meta,
            )),
        }
    }

    /// Records an attempt (failed, abandoned, or a correction) in the history. Durable at the
    /// next flush; flushed now when `flush`. A record that is not `completed` never replaces
    /// the record of a checkpoint the store holds complete: a checkpoint abandoned at its
    /// timeout whose write completed before the abandonment reached the store is restorable,
    /// and its history says so (even if the process dies before the correction that follows).
    pub fn record_attempt(&self, record: &CheckpointRecord, flush: bool) -> Result<(), StoreError> {
        let _one_writer = self.exclusive();
        self.check_owner()?;
        if record.status != Status::Completed
            && self
                .tree
                .contains_key(id_key(CHECKPOINT_PREFIX, record.id))?
        {
            return Ok(());
        }
        let raw = Self::encode(record, record.id)?;
        self.tree.insert(id_key(HISTORY_PREFIX, record.id), raw)?;
        if flush {
            self.flush_synced()?;
        }
        Ok(())
    }

    /// Attempt records with ids below `before` (all if `None`), newest first, at most `limit`.
    pub fn history(
        &self,
        before: Option<CheckpointId>,
        limit: usize,
    ) -> Result<Vec<CheckpointRecord>, StoreError> {
        let _reading = self.reading();
        let start = id_key(HISTORY_PREFIX, CheckpointId(0));
        let end = match before {
            Some(b) => id_key(HISTORY_PREFIX, b),
            None => {
                let mut e = HISTORY_PREFIX.to_vec();
                e.push(0xff);
                e
            }
        };
        let mut out = Vec::new();
        for item in self.tree.range(start..end).rev().take(limit) {
            let (k, v) = item?;
            let id = decode_id_key(HISTORY_PREFIX, &k).unwrap_or_default();
            out.push(self.decode(&v, &format!("history record {id}"))?);
        }
        Ok(out)
    }

    /// One attempt record.
    pub fn attempt(&self, id: CheckpointId) -> Result<Option<CheckpointRecord>, StoreError> {
        let _reading = self.reading();
        match self.tree.get(id_key(HISTORY_PREFIX, id))? {
            None => Ok(None),
            Some(raw) => Ok(Some(self.decode(&raw, &format!("history record {id}"))?)),
        }
    }

    /// Bytes the store occupies on disk.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.db.size_on_disk()? + self.packs.bytes()?)
    }

    /// Bytes of every key and value the store holds (the retained checkpoints' group versions,
    /// metadata, history and savepoints; a value in a pack counted at its length there): what
    /// a copy into a new store would hold. Reads every value.
    pub fn held_bytes(&self) -> Result<u64, StoreError> {
        let _reading = self.reading();
        let mut bytes = 0u64;
        for item in self.tree.iter() {
            let (k, v) = item?;
            let located = packs::Locator::in_value(&v);
            bytes += (k.len() + located.map_or(v.len(), |at| at.len as usize)) as u64;
        }
        Ok(bytes)
    }

    /// Copies every key and value into a new sled database made at `path` (refused if one is
    /// there already) and returns its size on disk right after the copy is flushed (the
    /// turnover benchmark's `--fresh-copy`, which also reopens it). A copy that fails leaves
    /// what it wrote.
    pub fn copy_to(&self, path: &Path) -> Result<u64, StoreError> {
        let (db, _) = self.copied(path)?;
        db.flush()?;
        Ok(db.size_on_disk()? + packs::Packs::new(path).bytes()?)
    }

    /// A new sled database made at `path` (an error if one is there) holding every key and
    /// value of this store, not flushed, with the packs linked beside it.
    fn copied(&self, path: &Path) -> Result<(sled::Db, sled::Tree), StoreError> {
        let _reading = self.reading();
        let db = sled::Config::new()
            .path(path)
            .create_new(true)
            .segment_size(reclaim::SEGMENT_SIZE)
            .cache_capacity(DEFAULT_CACHE_CAPACITY)
            .flush_every_ms(None)
            .open()?;
        let tree = db.open_tree("checkpoints")?;
        for item in self.tree.iter() {
            let (k, v) = item?;
            tree.insert(k, v)?;
        }
        self.packs.link_into(path)?;
        Ok((db, tree))
    }

    /// Bytes `entries` occupy as stored in this store's groups (keys and sealed values): the
    /// size of a restored state.
    pub fn state_bytes(
        &self,
        entries: &[(crate::engine::StateKey, crate::engine::Entry)],
    ) -> Result<u64, StoreError> {
        let groups = crate::engine::group::group_entries(&self.layout()?, entries.iter().cloned());
        let mut bytes = 0u64;
        for g in groups {
            let key = codec::group_version_key(&g.id, CheckpointId(0)).len();
            let value = versions::encode_content(&g, CheckpointId(0))?.len();
            bytes += (key + value) as u64;
        }
        Ok(bytes)
    }

    /// Makes everything written so far durable, also across a machine crash (`durability`).
    pub fn flush(&self) -> Result<(), StoreError> {
        let _one_writer = self.exclusive();
        self.flush_synced()
    }

    /// [`Store::flush`] for a caller holding [`Store::exclusive`].
    fn flush_synced(&self) -> Result<(), StoreError> {
        debug_assert!(self.holding(), "flush_synced without the store's lock");
        self.sync_blobs()?;
        #[cfg(test)]
        self.check_synced("before a flush");
        self.db.flush()?;
        self.sync_log()
    }

    /// Applies `batch` atomically, syncing the blob files sled wrote before and for it, so
    /// that no record of the log points at a file not on the disk once the log is, and with
    /// everything written before it flushed and synced first: sled reuses a log segment once
    /// the writes that replaced what it held passed its own `sync_file_range`, which may still
    /// sit in the device's cache, so the batch's writes could otherwise overwrite what the
    /// last durable checkpoint needs before its replacement is durable (`durability`). The
    /// caller holds [`Store::exclusive`].
    fn apply(&self, batch: sled::Batch) -> Result<(), StoreError> {
        debug_assert!(self.holding(), "apply without the store's lock");
        debug_assert_eq!(
            self.packs.unsynced(),
            0,
            "a batch applied while a pack it may point into is unsynced"
        );
        self.flush_synced()?;
        #[cfg(test)]
        self.batches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.tree.apply_batch(batch)?;
        self.sync_blobs()?;
        #[cfg(test)]
        self.check_synced("after a batch");
        Ok(())
    }

    /// One thread in the tree at a time: held by every method that writes, from its first
    /// write to its last sync, and by every method that reads (`Store::reading`). Reentrant:
    /// a write reads under its own hold.
    fn exclusive(&self) -> Hold<'_> {
        Hold::new(self.writes.lock(), None)
    }

    /// Whether this thread holds [`Store::exclusive`] (what writes assume, checked in debug
    /// builds).
    fn holding(&self) -> bool {
        self.writes.is_owned_by_current_thread()
    }

    /// [`Store::exclusive`] for a read: sled's reads split and merge the nodes writes left
    /// over- or underfull, writing them out, so once the outermost hold ends the blob files a
    /// read wrote are synced (`durability`).
    fn reading(&self) -> Hold<'_> {
        Hold::new(self.writes.lock(), self.durability.as_deref())
    }

    /// Savepoint `name`, or `None` if another thread still reads or writes the store after
    /// [`SAVEPOINT_CHECK_WAIT`]: the record path's check that a name is free.
    pub fn savepoint_now(&self, name: &str) -> Option<Result<SavepointMeta, StoreError>> {
        let held = self.writes.try_lock_for(SAVEPOINT_CHECK_WAIT)?;
        let _reading = Hold::new(held, self.durability.as_deref());
        Some(self.savepoint(name))
    }

    /// Ids of the retained checkpoints, or `None` while another thread reads or writes the
    /// store (a checkpoint's write takes seconds at millions of keys): for callers that must
    /// not wait, such as the gauges published on the record path's tick.
    pub fn checkpoint_ids_now(&self) -> Option<Result<Vec<CheckpointId>, StoreError>> {
        let _reading = Hold::new(self.writes.try_lock()?, self.durability.as_deref());
        Some(self.checkpoint_ids())
    }

    /// Syncs the blob files sled wrote since the last time (`durability`).
    fn sync_blobs(&self) -> Result<(), StoreError> {
        if let Some(d) = &self.durability {
            d.sync_new_blobs().map_err(|e| self.sync_failed(e))?;
        }
        Ok(())
    }

    /// Syncs sled's log file, its length included (`durability`).
    fn sync_log(&self) -> Result<(), StoreError> {
        if let Some(d) = &self.durability {
            d.sync_log().map_err(|e| self.sync_failed(e))?;
        }
        Ok(())
    }

    /// The error of a sync that did not happen.
    fn sync_failed(&self, e: durability::SyncError) -> StoreError {
        match e {
            durability::SyncError::Io(e) => StoreError::Io(sled::Error::Io(e)),
            durability::SyncError::Failed(detail) => StoreError::SyncFailed {
                path: self.path.clone(),
                detail,
            },
        }
    }

    /// Tests: panics if a blob file on disk is not synced at `at`.
    #[cfg(test)]
    fn check_synced(&self, at: &str) {
        if let Some(d) = &self.durability {
            d.assert_all_synced(at);
        }
    }

    /// Puts the removal of every key under `prefix` in `batch`; returns how many keys and
    /// their bytes (keys and values).
    fn remove_prefix(
        &self,
        prefix: &[u8],
        batch: &mut sled::Batch,
    ) -> Result<(usize, u64), StoreError> {
        debug_assert!(self.holding(), "remove_prefix without the store's lock");
        let (mut keys, mut bytes) = (0usize, 0u64);
        for item in self.tree.scan_prefix(prefix) {
            let (k, v) = item?;
            keys += 1;
            bytes += (k.len() + v.len()) as u64;
            batch.remove(k);
        }
        Ok((keys, bytes))
    }

    /// A flush after writes or removals of `bytes` outside a checkpoint (deleting checkpoints,
    /// deleting or importing a savepoint), with sled's log advanced first if they bring the
    /// count since the last advance to [`reclaim::ADVANCE_EVERY`] (see `reclaim`).
    fn flush_reclaiming(&self, bytes: u64) -> Result<(), StoreError> {
        debug_assert!(self.holding(), "flush_reclaiming without the store's lock");
        self.advance_log_if_due(bytes, None);
        self.flush_synced()
    }

    /// Counts `bytes` written or removed (by checkpoint `id`, if one) and advances sled's log
    /// when they are due (see `reclaim`). A failure is logged, not returned: the advance only
    /// lets sled delete files sooner, and the flush that follows reports a store that cannot
    /// be written.
    fn advance_log_if_due(&self, bytes: u64, id: Option<CheckpointId>) {
        debug_assert!(
            self.holding(),
            "advance_log_if_due without the store's lock"
        );
        if !self.advances.due(bytes) {
            return;
        }
        let checkpoint_id = id.map(|id| id.0);
        // the filler's writes may reuse segments the batch just freed: the batch durable first
        // (see `apply`)
        if let Err(e) = self.flush_synced() {
            tracing::warn!(?checkpoint_id, error = %e, "cannot sync the store before advancing its log; not advanced");
            return;
        }
        match reclaim::advance_log(&self.db) {
            Ok(()) => tracing::debug!(
                ?checkpoint_id,
                bytes = reclaim::ADVANCE_BYTES,
                "advanced the store's log so that sled deletes the files it replaced"
            ),
            Err(e) => tracing::warn!(
                ?checkpoint_id,
                error = %e,
                "cannot advance the store's log; sled keeps the files it replaced a while longer"
            ),
        }
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod golden;

/// The format a stamped version stands for (see `codec::PARTIAL_FORMAT_OFFSET`).
fn base_format(stamped: u32) -> u32 {
    if stamped >= codec::PARTIAL_FORMAT_OFFSET {
        stamped - codec::PARTIAL_FORMAT_OFFSET
    } else {
        stamped
    }
}
