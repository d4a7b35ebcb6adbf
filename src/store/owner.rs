//! The owner epoch: which start of the service may write to the store.
//!
//! Each start claims the store, as soon as it holds sled's lock and before it migrates or
//! restores anything, with an epoch one above every earlier one. The claim is written to
//! `owner.json` next to sled's own files (a running process cannot see another process's sled
//! writes, each caches its own pages, but it can read a small file) and, once the start goes
//! ahead, to sled (`meta/owner`, so epochs only grow). Before every write the owner reads that
//! file; finding a newer claim there it stops with `StoreError::Superseded`.
//!
//! This is a fence, not a lease: a write already past its check completes, and two processes
//! that keep restarting on one volume keep superseding each other.
//!
//! With sled's exclusive lock a second process cannot open the store while the first holds
//! it, so on a local disk this fence never fires. It is there for volumes whose file locks are
//! not reliable (some network filesystems), where the lock alone would let an old instance that
//! is still shutting down and its replacement interleave writes.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::codec::META_OWNER;
use super::{Store, StoreError};
use crate::checkpoint_id::CheckpointId;

/// The file holding the current owner, inside the store directory.
pub const OWNER_FILE: &str = "owner.json";

/// One claim of the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// Grows by one with every claim.
    pub epoch: u64,
    /// Who claimed it: `kafka.instance_id`, else the host name.
    pub instance: String,
    pub pid: u32,
    /// Unix milliseconds.
    pub claimed_at_ms: u64,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "epoch {} ({}, pid {})",
            self.epoch, self.instance, self.pid
        )
    }
}

pub(super) fn owner_path(dir: &Path) -> PathBuf {
    dir.join(OWNER_FILE)
}

/// The owner recorded in `dir`'s file, if there is one.
pub fn read_owner_file(dir: &Path) -> Result<Option<Owner>, StoreError> {
    let path = owner_path(dir);
    let raw = match std::fs::read(&path) {
        Ok(raw) => raw,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(owner_io(&path, e)),
    };
    serde_json::from_slice(&raw)
        .map(Some)
        .map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            detail: format!("owner record is unreadable: {e}"),
        })
}

/// Replaces `dir`'s owner file atomically (write, sync, rename, sync the directory).
fn write_owner_file(dir: &Path, owner: &Owner) -> Result<(), StoreError> {
    let path = owner_path(dir);
    let io = |e: std::io::Error| owner_io(&path, e);
    let mut tmp = tempfile::Builder::new()
        .prefix(".owner-")
        .tempfile_in(dir)
        .map_err(io)?;
    let body = serde_json::to_vec_pretty(owner).map_err(|e| io(e.into()))?;
    tmp.write_all(&body).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(&path).map_err(|e| io(e.error))?;
    // the rename is durable once the directory is
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn owner_io(path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Open {
        path: path.to_path_buf(),
        source: sled::Error::Io(e),
    }
}

/// The file holding the store's identity, inside the store directory.
pub const IDENTITY_FILE: &str = "store.id";

impl Store {
    /// The store's identity: a random id written to `store.id` the first time it is asked
    /// for, the same for every later start on this directory. It tags the offsets this
    /// instance commits, so another instance on the same group can be told apart from an
    /// earlier run of this one.
    pub fn identity(&self) -> Result<String, StoreError> {
        let path = self.path.join(IDENTITY_FILE);
        match std::fs::read_to_string(&path) {
            Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_string()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(owner_io(&path, e)),
        }
        use std::hash::{BuildHasher, Hasher};
        let mut id = String::new();
        for round in 0..2u64 {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(round);
            h.write_u32(std::process::id());
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0),
            );
            id.push_str(&format!("{:016x}", h.finish()));
        }
        let io = |e: std::io::Error| owner_io(&path, e);
        let mut tmp = tempfile::Builder::new()
            .prefix(".store-id-")
            .tempfile_in(&self.path)
            .map_err(io)?;
        tmp.write_all(id.as_bytes()).map_err(io)?;
        tmp.as_file().sync_all().map_err(io)?;
        tmp.persist(&path).map_err(|e| io(e.error))?;
        Ok(id)
    }

    /// Claims the store for this process: the epoch is one above any recorded in sled or in
    /// the owner file. Only the owner file is written, so that a start that is then refused
    /// leaves the store itself as it was; `record_claim` keeps the epoch in sled once the start
    /// goes ahead. From now on every write first checks that no newer claim exists.
    pub fn claim(&mut self, instance: &str) -> Result<Owner, StoreError> {
        let stored = match self.tree.get(META_OWNER)? {
            Some(raw) => Some(self.decode::<Owner>(&raw, "owner record")?),
            None => None,
        };
        let file = read_owner_file(&self.path).unwrap_or(None);
        let last = stored
            .iter()
            .chain(file.iter())
            .map(|o| o.epoch)
            .max()
            .unwrap_or(0);
        let owner = Owner {
            epoch: last + 1,
            instance: instance.to_string(),
            pid: std::process::id(),
            claimed_at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        };
        write_owner_file(&self.path, &owner)?;
        self.owner = Some(owner.clone());
        Ok(owner)
    }

    /// Keeps this process's claim in sled too, so that epochs keep growing even if the owner
    /// file is lost.
    pub fn record_claim(&self) -> Result<(), StoreError> {
        let Some(owner) = &self.owner else {
            return Ok(());
        };
        let _one_writer = self.exclusive();
        self.check_owner()?;
        self.tree
            .insert(META_OWNER, Self::encode(owner, CheckpointId(0))?)?;
        self.flush_synced()
    }

    /// This process's claim, if it made one.
    pub fn owner(&self) -> Option<&Owner> {
        self.owner.as_ref()
    }

    /// Fails with `Superseded` when a newer claim than ours is on record. A missing owner file
    /// (removed by hand) is written again: whoever removed it did not claim the store.
    pub(super) fn check_owner(&self) -> Result<(), StoreError> {
        let Some(mine) = &self.owner else {
            return Ok(());
        };
        match read_owner_file(&self.path)? {
            Some(found) if found == *mine => Ok(()),
            // an equal epoch with another owner: a claim made at the same time, which won
            Some(found) if found.epoch >= mine.epoch => Err(StoreError::Superseded {
                path: self.path.clone(),
                mine: Box::new(mine.clone()),
                newer: Box::new(found),
            }),
            Some(found) => {
                tracing::warn!(dir = %self.path.display(), found = %found, ours = %mine, "the owner record holds an older claim than ours; writing ours again");
                write_owner_file(&self.path, mine)
            }
            None => {
                tracing::warn!(dir = %self.path.display(), ours = %mine, "the owner record is missing; writing it again");
                write_owner_file(&self.path, mine)
            }
        }
    }
}
