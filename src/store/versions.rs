//! Versioned state: writing a checkpoint, restoring any retained one, and reclaiming versions no
//! retained checkpoint needs.
//!
//! A checkpoint `c` writes `ver/<key><c>` for every key it changed (a tombstone for a removed
//! key) and `cp/<c>` with its metadata. Restoring `c` takes, per key, the newest version not
//! after `c`. The versions that checkpoint `c` supersedes are listed in `gc/<c>`: they are
//! garbage once `c` is the oldest retained checkpoint (so are the tombstones `c` wrote).

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use super::codec::{
    decode_id_key, decode_version_key, id_key, version_key, version_prefix, CHECKPOINT_PREFIX,
    GC_PREFIX, HISTORY_PREFIX, META_HEAD, VERSION_PREFIX,
};
use super::{Retained, Store, StoreError, WriteStats};
use crate::checkpoint::history::{CheckpointRecord, Kind, Phases, Status};
use crate::checkpoint::protocol::{check_applicable, meta_of, Checkpoint, CheckpointMeta};
use crate::checkpoint_id::CheckpointId;
use crate::engine::{Entry, RestoredState, StateKey};

/// A checkpoint that cannot be restored: damaged or incomplete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{snapshot} is unreadable: {detail}")]
pub struct Unreadable {
    /// "checkpoint 7" or "savepoint before-upgrade".
    pub snapshot: String,
    pub detail: String,
}

/// One checkpoint for the writer, with the record of its attempt so far.
pub struct WriteRequest<'a> {
    pub checkpoint: &'a Checkpoint,
    /// The attempt as recorded at trigger time (snapshot phase filled in).
    pub record: CheckpointRecord,
    /// Also keep this checkpoint's state as a savepoint of this name.
    pub savepoint: Option<String>,
    pub started: Instant,
}

/// The newest version of a key: its id and whether it holds an entry (not a tombstone).
type Latest = Option<(CheckpointId, bool)>;

impl Store {
    /// The newest version of `key` before checkpoint `before` (one seek, no iterator).
    fn latest_version(&self, key: &StateKey, before: CheckpointId) -> Result<Latest, StoreError> {
        let prefix = version_prefix(key);
        match self.tree.get_lt(version_key(key, before))? {
            Some((k, _)) if !k.starts_with(&prefix) => Ok(None),
            None => Ok(None),
            Some((k, v)) => {
                let id = decode_version_key(&k).map(|(_, id)| id).ok_or_else(|| {
                    self.corrupt(format!("undecodable version key {:?}", k.as_ref()))
                })?;
                Ok(Some((id, self.is_live(&v))))
            }
        }
    }

    /// Whether a stored version holds an entry. A damaged one counts as an entry: writing over
    /// it (a tombstone, a new version) must stay possible after a restore fell back past it.
    fn is_live(&self, raw: &[u8]) -> bool {
        self.decode::<Option<Entry>>(raw, "state version")
            .map_or(true, |e| e.is_some())
    }

    /// The newest version of every key, for full snapshots.
    fn all_latest(&self) -> Result<HashMap<StateKey, (CheckpointId, bool)>, StoreError> {
        let mut out = HashMap::new();
        for item in self.tree.scan_prefix(VERSION_PREFIX) {
            let (k, v) = item?;
            let (key, id) = decode_version_key(&k)
                .ok_or_else(|| self.corrupt(format!("undecodable version key {:?}", k.as_ref())))?;
            let live = self.is_live(&v);
            out.insert(key, (id, live));
        }
        Ok(out)
    }

    /// Applies a checkpoint as one atomic batch (its versions, metadata, history record,
    /// retention and, if asked, its savepoint) and flushes it.
    pub fn write(&self, req: &WriteRequest<'_>) -> Result<WriteStats, StoreError> {
        self.check_owner()?;
        let cp = req.checkpoint;
        let id = cp.id;
        let head = self.head()?;
        let base = match (cp.delta.full, head) {
            (false, Some(h)) if cp.base == Some(h) => Some(self.checkpoint(h)?),
            _ => None,
        };
        let head_meta = base
            .as_ref()
            .map(|b| b.meta.clone())
            .or(head.map(|h| CheckpointMeta {
                id: h,
                ..meta_of(cp, 0, 0)
            }));
        check_applicable(head_meta.as_ref(), cp).map_err(|source| StoreError::Apply {
            checkpoint_id: id,
            source,
        })?;
        let t0 = Instant::now();
        let mut batch = sled::Batch::default();
        let mut bytes: u64 = 0;
        // versions that become garbage at `id`: inserted as gc entries, or removed at once if
        // `id` itself ends up the oldest retained checkpoint
        let mut garbage: Vec<Vec<u8>> = Vec::new();
        let mut live = base.as_ref().map_or(0, |b| b.live_entries as i64);
        let mut put = |batch: &mut sled::Batch, k: Vec<u8>, v: Vec<u8>| {
            bytes += (k.len() + v.len()) as u64;
            batch.insert(k, v);
        };
        if cp.delta.full {
            let mut latest = self.all_latest()?;
            for (key, entry) in &cp.delta.upserts {
                let vk = version_key(key, id);
                put(&mut batch, vk, Self::encode(&Some(*entry), id)?);
                if let Some((prev, _)) = latest.remove(key) {
                    garbage.push(version_key(key, prev));
                }
                live += 1;
            }
            // whatever the snapshot does not list is gone as of this checkpoint
            for (key, (prev, is_live)) in latest {
                if is_live {
                    let vk = version_key(&key, id);
                    put(&mut batch, vk.clone(), Self::encode(&None::<Entry>, id)?);
                    garbage.push(vk);
                }
                garbage.push(version_key(&key, prev));
            }
        } else {
            for (key, entry) in &cp.delta.upserts {
                put(
                    &mut batch,
                    version_key(key, id),
                    Self::encode(&Some(*entry), id)?,
                );
                match self.latest_version(key, id)? {
                    Some((prev, was_live)) => {
                        garbage.push(version_key(key, prev));
                        live += i64::from(!was_live);
                    }
                    None => live += 1,
                }
            }
            // a key both upserted and deleted keeps its upsert, as in the protocol's model
            let upserted: std::collections::HashSet<&StateKey> = if cp.delta.deletes.is_empty() {
                Default::default()
            } else {
                cp.delta.upserts.iter().map(|(k, _)| k).collect()
            };
            for key in cp.delta.deletes.iter().filter(|k| !upserted.contains(k)) {
                if let Some((prev, was_live)) = self.latest_version(key, id)? {
                    let vk = version_key(key, id);
                    put(&mut batch, vk.clone(), Self::encode(&None::<Entry>, id)?);
                    garbage.push(version_key(key, prev));
                    garbage.push(vk);
                    live -= i64::from(was_live);
                }
            }
        }
        let savepoint = match &req.savepoint {
            None => None,
            Some(name) => {
                let entries = match &base {
                    Some(b) => self.materialize(b)?,
                    None => BTreeMap::new(),
                };
                Some(self.savepoint_batch(name, cp, entries, &mut batch, &mut bytes)?)
            }
        };
        let retained = self.apply_retention(id, &mut batch)?;
        let oldest = retained.first().copied().unwrap_or(id);
        if oldest >= id {
            for vk in garbage {
                batch.remove(vk);
            }
        } else if !garbage.is_empty() {
            batch.insert(id_key(GC_PREFIX, id), Self::encode(&garbage, id)?);
        }
        let live_entries = u64::try_from(live).map_err(|_| {
            self.corrupt(format!(
                "checkpoint {id} would hold {live} entries; the stored versions are inconsistent"
            ))
        })?;
        let mut stored = Retained {
            meta: meta_of(cp, req.started.elapsed().as_millis() as u64, bytes),
            live_entries,
        };
        let meta_raw = Self::encode(&stored, id)?;
        bytes += meta_raw.len() as u64;
        stored.meta.bytes = bytes;
        batch.insert(id_key(CHECKPOINT_PREFIX, id), Self::encode(&stored, id)?);
        batch.insert(META_HEAD, &id.0.to_be_bytes());
        let mut record = req.record.clone();
        record.status = Status::Completed;
        if let Some(name) = &req.savepoint {
            record.kind = Kind::Savepoint;
            record.savepoint = Some(name.clone());
        }
        record.bytes = Some(bytes);
        record.phases.write_ms = Some(t0.elapsed().as_millis() as u64);
        record.duration_ms = Some(req.started.elapsed().as_millis() as u64);
        batch.insert(id_key(HISTORY_PREFIX, id), Self::encode(&record, id)?);
        self.trim_history(id, &mut batch)?;
        self.tree.apply_batch(batch)?;
        let write = t0.elapsed();
        let t1 = Instant::now();
        self.db.flush()?;
        let flush = t1.elapsed();
        // metadata only, made durable by the next flush; the checkpoint is durable already, so
        // a failure here is logged, not reported as a failed checkpoint
        stored.meta.duration_ms = req.started.elapsed().as_millis() as u64;
        record.duration_ms = Some(stored.meta.duration_ms);
        record.phases = Phases {
            write_ms: Some(write.as_millis() as u64),
            flush_ms: Some(flush.as_millis() as u64),
            ..record.phases
        };
        let rewrite = Self::encode(&stored, id).and_then(|raw| {
            self.tree.insert(id_key(CHECKPOINT_PREFIX, id), raw)?;
            self.tree
                .insert(id_key(HISTORY_PREFIX, id), Self::encode(&record, id)?)?;
            Ok(())
        });
        if let Err(e) = rewrite {
            tracing::warn!(checkpoint_id = id.0, error = %e, "cannot record the final duration of a durable checkpoint");
        }
        Ok(WriteStats {
            bytes,
            write,
            flush,
            savepoint,
        })
    }

    /// Drops the oldest checkpoints beyond the retention count (with `new` counted) and
    /// reclaims the versions only they needed. Returns the retained ids, oldest first.
    fn apply_retention(
        &self,
        new: CheckpointId,
        batch: &mut sled::Batch,
    ) -> Result<Vec<CheckpointId>, StoreError> {
        let mut ids: Vec<CheckpointId> = Vec::new();
        for k in self.tree.scan_prefix(CHECKPOINT_PREFIX).keys() {
            if let Some(id) = decode_id_key(CHECKPOINT_PREFIX, &k?) {
                ids.push(id);
            }
        }
        ids.push(new);
        let keep = self.retention.checkpoints.max(1);
        let drop = ids.len().saturating_sub(keep);
        for id in ids.drain(..drop) {
            batch.remove(id_key(CHECKPOINT_PREFIX, id));
        }
        let oldest = ids.first().copied().unwrap_or(new);
        let end = id_key(GC_PREFIX, CheckpointId(oldest.0.saturating_add(1)));
        for item in self.tree.range(GC_PREFIX.to_vec()..end) {
            let (k, v) = item?;
            match self.decode::<Vec<Vec<u8>>>(&v, "garbage list") {
                Ok(list) => {
                    for vk in list {
                        batch.remove(vk);
                    }
                }
                // costs space, never correctness: those versions are shadowed by newer ones
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read a garbage list; its versions stay on disk")
                }
            }
            batch.remove(k);
        }
        Ok(ids)
    }

    fn trim_history(
        &self,
        newest: CheckpointId,
        batch: &mut sled::Batch,
    ) -> Result<(), StoreError> {
        let keep = self.retention.history.max(1);
        if newest.0 < keep {
            return Ok(());
        }
        let end = id_key(HISTORY_PREFIX, CheckpointId(newest.0 - keep + 1));
        for k in self.tree.range(HISTORY_PREFIX.to_vec()..end).keys() {
            batch.remove(k?);
        }
        Ok(())
    }

    /// The entries of a retained checkpoint, verified against its metadata.
    fn materialize(&self, cp: &Retained) -> Result<BTreeMap<StateKey, Entry>, StoreError> {
        let id = cp.meta.id;
        let unreadable = |detail: String| Unreadable {
            snapshot: format!("checkpoint {id}"),
            detail,
        };
        let mut out = BTreeMap::new();
        let mut chosen: Option<(StateKey, sled::IVec)> = None;
        let mut finish = |chosen: Option<(StateKey, sled::IVec)>| -> Result<(), StoreError> {
            if let Some((key, raw)) = chosen {
                let entry: Option<Entry> = self
                    .decode(&raw, &format!("state of {key:?}"))
                    .map_err(|e| unreadable(e.to_string()))?;
                if let Some(e) = entry {
                    out.insert(key, e);
                }
            }
            Ok(())
        };
        for item in self.tree.scan_prefix(VERSION_PREFIX) {
            let (k, v) = item?;
            let (key, version) = decode_version_key(&k)
                .ok_or_else(|| unreadable(format!("undecodable version key {:?}", k.as_ref())))?;
            if chosen.as_ref().is_some_and(|(c, _)| *c != key) {
                finish(chosen.take())?;
            }
            if version <= id {
                chosen = Some((key, v));
            }
        }
        finish(chosen)?;
        if out.len() as u64 != cp.live_entries {
            return Err(unreadable(format!(
                "it should hold {} entries but {} were found (partly written or damaged)",
                cp.live_entries,
                out.len()
            ))
            .into());
        }
        Ok(out)
    }

    /// Loads retained checkpoint `id` exactly as it was.
    pub fn load_checkpoint(
        &self,
        id: CheckpointId,
    ) -> Result<(CheckpointMeta, RestoredState), StoreError> {
        let cp = self.checkpoint(id).map_err(|e| match e {
            StoreError::Corrupt { detail, .. } => Unreadable {
                snapshot: format!("checkpoint {id}"),
                detail,
            }
            .into(),
            other => other,
        })?;
        let entries = self.materialize(&cp)?;
        let restored = RestoredState {
            partitions: cp.meta.partitions.clone(),
            watermark: cp.meta.watermark,
            entries: entries.into_iter().collect(),
        };
        Ok((cp.meta, restored))
    }

    /// Loads the newest retained checkpoint, if any (no fallback: see `service::restore`).
    pub fn load(&self) -> Result<Option<(CheckpointMeta, RestoredState)>, StoreError> {
        match self.checkpoint_ids()?.last() {
            Some(id) => self.load_checkpoint(*id).map(Some),
            None => Ok(None),
        }
    }

    /// Deletes every checkpoint and its state (savepoints and history stay), for
    /// `on_cancel: delete`.
    pub fn delete_checkpoints(&self) -> Result<usize, StoreError> {
        self.check_owner()?;
        let mut batch = sled::Batch::default();
        let mut count = 0;
        for prefix in [CHECKPOINT_PREFIX, VERSION_PREFIX, GC_PREFIX] {
            for k in self.tree.scan_prefix(prefix).keys() {
                count += usize::from(prefix == CHECKPOINT_PREFIX);
                batch.remove(k?);
            }
        }
        batch.remove(META_HEAD);
        self.tree.apply_batch(batch)?;
        self.db.flush()?;
        Ok(count)
    }

    /// Number of stored state versions (all checkpoints), for tests and diagnostics.
    pub fn version_count(&self) -> usize {
        self.tree.scan_prefix(VERSION_PREFIX).count()
    }
}
