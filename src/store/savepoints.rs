//! Savepoints: named full copies of a checkpoint's state, group by group, that retention never
//! removes. Only an explicit delete (HTTP or CLI) does.

use serde::{Deserialize, Serialize};

use super::codec::{
    decode_savepoint_group_key, savepoint_group_key, savepoint_groups_prefix, savepoint_meta_key,
    SAVEPOINT_GROUP_PREFIX, SAVEPOINT_META_PREFIX,
};
use super::versions::{encode_group, Groups};
use super::{Store, StoreError, Unreadable};
use crate::checkpoint::choice::validate_savepoint_name;
use crate::checkpoint::protocol::{meta_of, Checkpoint, CheckpointMeta};
use crate::checkpoint_id::CheckpointId;
use crate::engine::group::group_entries;
use crate::engine::{Entry, RestoredState, StateKey};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavepointMeta {
    pub name: String,
    /// The checkpoint it was made from (in the store that made it).
    pub checkpoint_id: CheckpointId,
    /// When its checkpoint was triggered, epoch milliseconds.
    pub created_ms: i64,
    /// Offsets, watermark and window/aggregate spec of its state.
    pub meta: CheckpointMeta,
    pub entries: u64,
}

impl Store {
    /// Adds to `batch` a savepoint of the state `base` with `cp` applied.
    pub(super) fn savepoint_batch(
        &self,
        name: &str,
        cp: &Checkpoint,
        mut groups: Groups,
        batch: &mut sled::Batch,
        bytes: &mut u64,
    ) -> Result<SavepointMeta, StoreError> {
        debug_assert!(self.holding(), "savepoint_batch without the store's lock");
        if self.tree.contains_key(savepoint_meta_key(name))? {
            return Err(StoreError::SavepointExists {
                name: name.to_string(),
                path: self.path.clone(),
            });
        }
        if cp.delta.full {
            groups.clear();
        }
        for g in &cp.delta.groups {
            if g.is_empty() {
                groups.remove(&g.id);
            } else {
                groups.insert(g.id.clone(), g.entries());
            }
        }
        let before = *bytes;
        let mut meta = SavepointMeta {
            name: name.to_string(),
            checkpoint_id: cp.id,
            created_ms: cp.trigger_ms,
            meta: meta_of(cp, 0, 0),
            entries: groups.values().map(|g| g.len() as u64).sum(),
        };
        self.put_savepoint(&meta, &groups, batch, bytes)?;
        // its size: what the copy wrote (the checkpoint's own bytes are counted apart)
        meta.meta.bytes = *bytes - before;
        self.put_savepoint_meta(&meta, batch)?;
        Ok(meta)
    }

    pub(super) fn put_savepoint(
        &self,
        meta: &SavepointMeta,
        groups: &Groups,
        batch: &mut sled::Batch,
        bytes: &mut u64,
    ) -> Result<(), StoreError> {
        let id = meta.checkpoint_id;
        for (g, entries) in groups.iter().filter(|(_, e)| !e.is_empty()) {
            let k = savepoint_group_key(&meta.name, g);
            let v = encode_group(entries, id)?;
            *bytes += (k.len() + v.len()) as u64;
            batch.insert(k, v);
        }
        *bytes += self.put_savepoint_meta(meta, batch)?;
        Ok(())
    }

    fn put_savepoint_meta(
        &self,
        meta: &SavepointMeta,
        batch: &mut sled::Batch,
    ) -> Result<u64, StoreError> {
        let v = Self::encode(meta, meta.checkpoint_id)?;
        let len = v.len() as u64;
        batch.insert(savepoint_meta_key(&meta.name), v);
        Ok(len)
    }

    /// Names of all savepoints, readable or not.
    pub fn savepoint_names(&self) -> Result<Vec<String>, StoreError> {
        let _reading = self.reading();
        let mut out = Vec::new();
        for k in self.tree.scan_prefix(SAVEPOINT_META_PREFIX).keys() {
            let k = k?;
            out.push(String::from_utf8_lossy(&k[SAVEPOINT_META_PREFIX.len()..]).to_string());
        }
        Ok(out)
    }

    /// All readable savepoints, by name; a damaged one is logged and left out (restoring it
    /// by name reports it unreadable).
    pub fn savepoints(&self) -> Result<Vec<SavepointMeta>, StoreError> {
        let _reading = self.reading();
        let mut out = Vec::new();
        for name in self.savepoint_names()? {
            match self.savepoint(&name) {
                Ok(meta) => out.push(meta),
                Err(StoreError::Corrupt { detail, .. }) => {
                    tracing::warn!(savepoint = %name, %detail, "savepoint metadata is unreadable");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    pub fn savepoint(&self, name: &str) -> Result<SavepointMeta, StoreError> {
        let _reading = self.reading();
        match self.tree.get(savepoint_meta_key(name))? {
            Some(raw) => self.decode(&raw, &format!("metadata of savepoint {name}")),
            None => Err(StoreError::NoSuchSavepoint {
                name: name.to_string(),
                path: self.path.clone(),
            }),
        }
    }

    /// A savepoint's metadata and entries, verified.
    pub fn read_savepoint(
        &self,
        name: &str,
    ) -> Result<(SavepointMeta, Vec<(StateKey, Entry)>), StoreError> {
        let _reading = self.reading();
        let unreadable = |detail: String| Unreadable {
            snapshot: format!("savepoint {name}"),
            detail,
        };
        let meta = self.savepoint(name).map_err(|e| match e {
            StoreError::Corrupt { detail, .. } => unreadable(detail).into(),
            other => other,
        })?;
        let mut entries = Vec::new();
        for item in self.tree.scan_prefix(savepoint_groups_prefix(name)) {
            let (k, v) = item?;
            let g = decode_savepoint_group_key(name, &k)
                .ok_or_else(|| unreadable(format!("undecodable key {:?}", k.as_ref())))?;
            let content = self
                .decode_group(&v, &g, &format!("group {} of {:?}", g.group, g.scope))
                .map_err(unreadable)?;
            entries.extend(content);
        }
        if entries.len() as u64 != meta.entries {
            return Err(unreadable(format!(
                "it should hold {} entries but {} were found (partly written or damaged)",
                meta.entries,
                entries.len()
            ))
            .into());
        }
        Ok((meta, entries))
    }

    /// Loads savepoint `name` for a restore.
    pub fn load_savepoint(&self, name: &str) -> Result<(SavepointMeta, RestoredState), StoreError> {
        let (meta, entries) = self.read_savepoint(name)?;
        let restored = RestoredState {
            partitions: meta.meta.partitions.clone(),
            watermark: meta.meta.watermark,
            entries,
            // what the savepoint's copy occupies
            stored_bytes: meta.meta.bytes,
            ..Default::default()
        };
        Ok((meta, restored))
    }

    /// Stores an imported savepoint under `meta.name`; refuses to overwrite one.
    pub fn import_savepoint(
        &self,
        meta: &SavepointMeta,
        entries: &[(StateKey, Entry)],
    ) -> Result<(), StoreError> {
        let _one_writer = self.exclusive();
        self.check_owner()?;
        validate_savepoint_name(&meta.name).map_err(StoreError::InvalidSavepoint)?;
        let keys: std::collections::BTreeSet<&StateKey> = entries.iter().map(|(k, _)| k).collect();
        if keys.len() != entries.len() || entries.len() as u64 != meta.entries {
            return Err(StoreError::InvalidSavepoint(format!(
                "savepoint {} should hold {} distinct entries; it has {} entries, {} distinct",
                meta.name,
                meta.entries,
                entries.len(),
                keys.len()
            )));
        }
        if self.tree.contains_key(savepoint_meta_key(&meta.name))? {
            return Err(StoreError::SavepointExists {
                name: meta.name.clone(),
                path: self.path.clone(),
            });
        }
        let mut batch = sled::Batch::default();
        let mut bytes = 0;
        let groups: Groups = group_entries(&self.layout()?, entries.iter().cloned())
            .into_iter()
            .map(|g| (g.id.clone(), g.entries()))
            .collect();
        self.put_savepoint(meta, &groups, &mut batch, &mut bytes)?;
        self.apply(batch)?;
        self.flush_reclaiming(bytes)?;
        Ok(())
    }

    /// Removes savepoint `name` and its entries.
    pub fn delete_savepoint(&self, name: &str) -> Result<SavepointMeta, StoreError> {
        let _one_writer = self.exclusive();
        self.check_owner()?;
        let meta = self.savepoint(name)?;
        let mut batch = sled::Batch::default();
        let (_, removed) = self.remove_prefix(&savepoint_groups_prefix(name), &mut batch)?;
        batch.remove(savepoint_meta_key(name));
        self.apply(batch)?;
        self.flush_reclaiming(removed)?;
        Ok(meta)
    }

    /// Number of savepoint groups stored (all savepoints), for tests and diagnostics.
    pub fn savepoint_group_count(&self) -> usize {
        let _reading = self.reading();
        self.tree.scan_prefix(SAVEPOINT_GROUP_PREFIX).count()
    }
}
