//! Versioned state by key group: writing a checkpoint, restoring any retained one, and
//! reclaiming versions no retained checkpoint needs.
//!
//! A checkpoint `c` writes `g/<group><c>` for every group it changed, with the group's whole
//! content (in `c`'s pack, `packs`; an empty value for a group that emptied), for every group
//! it carries out of a pack the others left (the same content again, in `c`'s pack of carried
//! groups), and `cp/<c>` with its metadata.
//! Restoring `c` takes, per group, the newest version not after `c`. The versions that
//! checkpoint `c` supersedes are listed in `gc/<c>`: they are garbage once `c` is the oldest
//! retained checkpoint (so are the empty versions `c` wrote). A checkpoint's cost follows the
//! groups that changed (and those it carries, over time at most as many bytes again): a
//! window closing changes one group, not a key per window.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Instant;

use rayon::prelude::*;

use super::codec::{
    decode_group_version_key, decode_id_key, group_prefix, group_version_key, id_key,
    savepoint_meta_key, CHECKPOINT_PREFIX, GC_PREFIX, GROUP_PREFIX, HISTORY_PREFIX, META_HEAD,
    META_PARTIAL, META_VERSION, NOTE_PREFIX,
};
use super::codec::{seal, unseal};
use super::packs::{Locator, PackName, PackWriter, Packs, Read};
use super::partial::Ahead;
use super::FORMAT_VERSION;
use super::{Retained, Store, StoreError, WriteStats};
use crate::checkpoint::history::{CheckpointRecord, Kind, Phases, Status};
use crate::checkpoint::protocol::{
    check_applicable, meta_of, ApplyError, Checkpoint, CheckpointMeta,
};
use crate::checkpoint_id::CheckpointId;
use crate::engine::group::{decode_blob, encode_blob, BlobError};
use crate::engine::GroupContent;
use crate::engine::{Entry, GroupId, RestoredState, StateKey, StoredGroup};
use crate::position::{NextOffset, Partition};

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

/// The newest version of a group: its id and whether it holds entries (not emptied).
type Latest = Option<(CheckpointId, bool)>;

/// Groups' contents, by group.
pub type Groups = BTreeMap<GroupId, Vec<(StateKey, Entry)>>;

/// The most entries a restore reserves room for up front from a checkpoint's metadata (a
/// damaged count must not allocate without bound); past it, or when the room cannot be had,
/// the entries grow as read.
const MAX_PRESIZED_ENTRIES: usize = 1 << 27;

/// A group version's value: the entry count (u32 BE) then the blob, sealed; an emptied group
/// is a sealed empty value.
pub(super) fn encode_group(
    entries: &[(StateKey, Entry)],
    id: CheckpointId,
) -> Result<Vec<u8>, StoreError> {
    seal_group(entries.len(), || encode_blob(entries), id)
}

/// [`encode_group`] of a group as the engine shares it, encoded where it lives.
pub(super) fn encode_content(g: &GroupContent, id: CheckpointId) -> Result<Vec<u8>, StoreError> {
    seal_group(g.len(), || g.blob(), id)
}

/// Groups encoded in parallel at most this many at a time, so that the encoded values waiting
/// for the batch stay a small part of the state.
const ENCODE_AHEAD: usize = 64;

/// Each group with its encoded value ([`encode_content`]; `None` for an emptied group), in
/// order. Groups are encoded [`ENCODE_AHEAD`] at a time on every core rayon has (one per core
/// the process may use): a full checkpoint of millions of keys is mostly encoding.
fn encoded(
    groups: &[GroupContent],
    id: CheckpointId,
) -> impl Iterator<Item = (&GroupContent, Result<Option<Vec<u8>>, StoreError>)> {
    groups.chunks(ENCODE_AHEAD).flat_map(move |chunk| {
        let blobs: Vec<_> = chunk
            .par_iter()
            .map(|g| {
                if g.is_empty() {
                    Ok(None)
                } else {
                    encode_content(g, id).map(Some)
                }
            })
            .collect();
        chunk.iter().zip(blobs)
    })
}

/// A group version's value: its entry count and blob, sealed; an emptied group is sealed empty.
fn seal_group(
    entries: usize,
    blob: impl FnOnce() -> Result<Vec<u8>, BlobError>,
    id: CheckpointId,
) -> Result<Vec<u8>, StoreError> {
    if entries == 0 {
        return Ok(super::codec::seal(&[]));
    }
    let blob = blob().map_err(|e| StoreError::Corrupt {
        path: Default::default(),
        detail: format!("cannot encode a group of checkpoint {id}: {e}"),
    })?;
    let mut payload = Vec::with_capacity(4 + blob.len());
    payload.extend_from_slice(&(entries as u32).to_be_bytes());
    payload.extend_from_slice(&blob);
    Ok(super::codec::seal(&payload))
}

/// The packs a checkpoint writes (`packs`): of the groups it changed, and of those it carried.
#[derive(Default)]
struct NewPacks {
    changed: Option<PackWriter>,
    carried: Option<PackWriter>,
}

impl NewPacks {
    /// Appends the value of a group version of checkpoint `id` to the pack it goes in.
    fn append(
        &mut self,
        packs: &Packs,
        id: CheckpointId,
        value: &[u8],
        carried: bool,
    ) -> Result<Locator, StoreError> {
        let slot = if carried {
            &mut self.carried
        } else {
            &mut self.changed
        };
        let w = match slot {
            Some(w) => w,
            None => slot.insert(packs.create(PackName {
                version: id.0,
                carried,
            })?),
        };
        Ok(w.append(value, carried)?)
    }

    /// Makes both durable, before a batch that points into them.
    fn sync(&mut self) -> Result<(), StoreError> {
        for w in [&mut self.changed, &mut self.carried].into_iter().flatten() {
            w.sync()?;
        }
        Ok(())
    }
}

impl Store {
    /// Decodes a group version's value (`what` names it in the error): its entries, empty for
    /// an emptied group.
    pub(super) fn decode_group(
        &self,
        raw: &[u8],
        group: &GroupId,
        what: &str,
    ) -> Result<Vec<(StateKey, Entry)>, String> {
        let Some((count, blob)) = group_payload(raw).map_err(|e| format!("{what}: {e}"))? else {
            return Ok(Vec::new());
        };
        let entries = decode_blob(blob, &group.scope).map_err(|e| format!("{what}: {e}"))?;
        if entries.len() != count as usize {
            return Err(format!(
                "{what}: it should hold {count} entries but {} were decoded",
                entries.len()
            ));
        }
        Ok(entries)
    }

    /// The newest version of group `g` before checkpoint `before` (one seek, no iterator).
    pub(super) fn latest_version(
        &self,
        g: &GroupId,
        before: CheckpointId,
    ) -> Result<Latest, StoreError> {
        let _reading = self.reading();
        let prefix = group_prefix(g);
        match self.tree.get_lt(group_version_key(g, before))? {
            Some((k, _)) if !k.starts_with(&prefix) => Ok(None),
            None => Ok(None),
            Some((k, v)) => {
                let id = decode_group_version_key(&k)
                    .map(|(_, id)| id)
                    .ok_or_else(|| {
                        self.corrupt(format!("undecodable group version key {:?}", k.as_ref()))
                    })?;
                Ok(Some((id, is_live(&v))))
            }
        }
    }

    /// The newest version of every group, for full snapshots.
    fn all_latest(&self) -> Result<HashMap<GroupId, (CheckpointId, bool)>, StoreError> {
        let _reading = self.reading();
        let mut out = HashMap::new();
        for item in self.tree.scan_prefix(GROUP_PREFIX) {
            let (k, v) = item?;
            let (g, id) = decode_group_version_key(&k).ok_or_else(|| {
                self.corrupt(format!("undecodable group version key {:?}", k.as_ref()))
            })?;
            out.insert(g, (id, is_live(&v)));
        }
        Ok(out)
    }

    /// Applies a checkpoint as one atomic batch (its versions, metadata, history record,
    /// retention and, if asked, its savepoint) and flushes it. Group versions past
    /// `BATCH_BYTES` go in batches ahead of it (see `META_PARTIAL`); what an earlier write
    /// left that way is removed first.
    pub fn write(&self, req: &WriteRequest<'_>) -> Result<WriteStats, StoreError> {
        self.write_with(req, None)
    }

    /// Moves `partition`'s held position to `to` (forward or back), offline: a new
    /// checkpoint on top of the newest one, with the same state and the other positions as
    /// they are, whose history record carries `note` (`checkpointer reset-position`).
    /// Returns the new checkpoint's id and the position held before.
    pub fn reset_position(
        &self,
        partition: &Partition,
        to: NextOffset,
        note: &str,
    ) -> Result<(CheckpointId, Option<NextOffset>), StoreError> {
        let head = self.head()?.ok_or_else(|| {
            StoreError::Position(format!(
                "{} holds no checkpoint: there is no position to move (a start reads per kafka.start_from / auto_offset_reset)",
                self.path.display()
            ))
        })?;
        let base = self.checkpoint(head)?;
        let mut partitions = base.meta.partitions.clone();
        let Some(held) = partitions.iter_mut().find(|p| p.partition == *partition) else {
            let known: Vec<String> = partitions.iter().map(|p| p.partition.to_string()).collect();
            return Err(StoreError::Position(format!(
                "checkpoint {head} holds no position for {partition}; it holds {}",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )));
        };
        let before = held.next;
        held.next = Some(to);
        let id = self.next_id()?;
        let cp = Checkpoint {
            id,
            base: Some(head),
            trigger_ms: crate::clock::epoch_ms(),
            spec: base.meta.spec.clone(),
            delta: crate::engine::StateDelta {
                full: false,
                partitions,
                watermark: base.meta.watermark,
                groups: Vec::new(),
                entries: base.live_entries,
                records: 0,
            },
        };
        let meta = meta_of(&cp, 0, 0);
        let mut record = CheckpointRecord::from_meta(&meta, Status::Completed);
        record.full = false;
        self.write_with(
            &WriteRequest {
                checkpoint: &cp,
                record,
                savepoint: None,
                started: Instant::now(),
            },
            Some(note),
        )?;
        Ok((id, before))
    }

    /// The note an operator's change left on checkpoint `id`'s history record, if any.
    pub fn note(&self, id: CheckpointId) -> Result<Option<String>, StoreError> {
        let _reading = self.reading();
        match self.tree.get(id_key(NOTE_PREFIX, id))? {
            Some(raw) => Ok(Some(
                self.decode(&raw, &format!("note of checkpoint {id}"))?,
            )),
            None => Ok(None),
        }
    }

    /// [`Store::write`]; with an operator's `note` (a position reset, offline): a position may
    /// move back, the note is written in the same batch, and neither retention nor the
    /// history bound is applied (the offline command does not know the configured ones; the
    /// service's next checkpoint applies them).
    fn write_with(
        &self,
        req: &WriteRequest<'_>,
        note: Option<&str>,
    ) -> Result<WriteStats, StoreError> {
        let moves = note.is_some();
        let _one_writer = self.exclusive();
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
        match check_applicable(head_meta.as_ref(), cp) {
            Ok(()) => {}
            Err(ApplyError::Backwards { .. }) if moves => {}
            Err(source) => {
                return Err(StoreError::Apply {
                    checkpoint_id: id,
                    source,
                })
            }
        }
        self.discard_partial()?;
        let t0 = Instant::now();
        let mut batch = sled::Batch::default();
        let mut bytes: u64 = 0;
        // group versions written ahead of the last batch: see BATCH_BYTES and META_PARTIAL
        let mut ahead = Ahead::default();
        // versions that become garbage at `id`: inserted as gc entries, or removed at once if
        // `id` itself ends up the oldest retained checkpoint
        let mut garbage: Vec<Vec<u8>> = Vec::new();
        // the values of the groups it changes and carries, in its packs; sled gets where they lie
        let mut packs = NewPacks::default();
        // bytes of it that went into packs, not into sled
        let mut packed: u64 = 0;
        let mut put = |batch: &mut sled::Batch,
                       k: Vec<u8>,
                       v: Vec<u8>,
                       carried: bool|
         -> Result<(), StoreError> {
            #[cfg(test)]
            if self.values_in_sled {
                let len = k.len() + v.len();
                bytes += len as u64;
                batch.insert(k, v);
                return self.write_ahead(&mut ahead, len, batch, id, || Ok(()));
            }
            let at = packs.append(&self.packs, id, &v, carried)?;
            bytes += (k.len() + v.len()) as u64;
            packed += v.len() as u64;
            let located = seal(&at.to_payload());
            let len = k.len() + located.len();
            batch.insert(k, located);
            // a batch written ahead points into the packs: what it points at is durable first
            self.write_ahead(&mut ahead, len, batch, id, || packs.sync())
        };
        let mut empty: Option<Vec<u8>> = None;
        let mut emptied = |batch: &mut sled::Batch, k: Vec<u8>| -> Result<(), StoreError> {
            let v = match &empty {
                Some(v) => v.clone(),
                None => empty.insert(encode_group(&[], id)?).clone(),
            };
            batch.insert(k, v);
            Ok(())
        };
        if cp.delta.full {
            let mut latest = self.all_latest()?;
            for (g, blob) in encoded(&cp.delta.groups, id) {
                let Some(blob) = blob? else { continue };
                put(&mut batch, group_version_key(&g.id, id), blob, false)?;
                if let Some((prev, _)) = latest.remove(&g.id) {
                    garbage.push(group_version_key(&g.id, prev));
                }
            }
            // whatever the snapshot does not list is empty as of this checkpoint
            for (g, (prev, is_live)) in latest {
                if is_live {
                    let vk = group_version_key(&g, id);
                    emptied(&mut batch, vk.clone())?;
                    garbage.push(vk);
                }
                garbage.push(group_version_key(&g, prev));
            }
        } else {
            let changed: HashSet<&GroupId> = cp.delta.groups.iter().map(|g| &g.id).collect();
            let carried = self.to_carry(id, &changed)?;
            for (g, blob) in encoded(&cp.delta.groups, id) {
                let prev = self.latest_version(&g.id, id)?;
                if let Some(blob) = blob? {
                    put(&mut batch, group_version_key(&g.id, id), blob, false)?;
                    if let Some((prev, _)) = prev {
                        garbage.push(group_version_key(&g.id, prev));
                    }
                } else if let Some((prev, true)) = prev {
                    let vk = group_version_key(&g.id, id);
                    emptied(&mut batch, vk.clone())?;
                    garbage.push(group_version_key(&g.id, prev));
                    garbage.push(vk);
                }
            }
            for (g, version, at) in carried {
                match self.packs.read(at.pack(version.0), at)? {
                    // byte for byte: a damaged value is carried as it is (a restore that needs
                    // it reports the damage either way), so that it does not keep its old pack
                    Read::Value(v) => {
                        if unseal(&v).is_none() {
                            tracing::warn!(
                                checkpoint_id = id.0,
                                group = g.group,
                                version = version.0,
                                "carried a damaged group version as it is: a restore that needs it reports the damage"
                            );
                        }
                        put(&mut batch, group_version_key(&g, id), v, true)?;
                        garbage.push(group_version_key(&g, version));
                    }
                    // nothing to carry: a restore that needs it reports the damage
                    Read::Damaged(detail) => {
                        tracing::warn!(
                            checkpoint_id = id.0,
                            group = g.group,
                            version = version.0,
                            detail,
                            "cannot carry a damaged group version into a new pack"
                        )
                    }
                }
            }
        }
        packs.sync()?;
        if ahead.batches > 0 {
            batch.remove(META_PARTIAL);
            batch.insert(META_VERSION, &FORMAT_VERSION.to_be_bytes());
        }
        // a name taken that the record path could not check (the store was busy): the
        // checkpoint is written without the savepoint
        let (savepoint, savepoint_refused) = match &req.savepoint {
            None => (None, None),
            Some(name) if self.tree.contains_key(savepoint_meta_key(name))? => {
                let refused = StoreError::SavepointExists {
                    name: name.clone(),
                    path: self.path.clone(),
                };
                (None, Some(refused.to_string()))
            }
            Some(name) => {
                let groups = match &base {
                    Some(b) => self.materialize(b)?,
                    None => BTreeMap::new(),
                };
                let meta = self.savepoint_batch(name, cp, groups, &mut batch, &mut bytes)?;
                (Some(meta), None)
            }
        };
        let retained = if moves {
            let mut ids = self.checkpoint_ids()?;
            ids.push(id);
            ids
        } else {
            self.apply_retention(id, &mut batch)?
        };
        if let Some(note) = note {
            batch.insert(
                id_key(NOTE_PREFIX, id),
                Self::encode(&note.to_string(), id)?,
            );
        }
        let oldest = retained.first().copied().unwrap_or(id);
        if oldest >= id {
            for vk in garbage {
                batch.remove(vk);
            }
        } else if !garbage.is_empty() {
            batch.insert(id_key(GC_PREFIX, id), Self::encode(&garbage, id)?);
        }
        let live_entries = cp.delta.entries;
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
        match &savepoint {
            Some(meta) => {
                record.kind = Kind::Savepoint;
                record.savepoint = Some(meta.name.clone());
            }
            None if req.savepoint.is_some() => {
                record.kind = Kind::Checkpoint;
                record.savepoint = None;
            }
            None => {}
        }
        record.bytes = Some(bytes);
        record.phases.write_ms = Some(t0.elapsed().as_millis() as u64);
        record.duration_ms = Some(req.started.elapsed().as_millis() as u64);
        batch.insert(id_key(HISTORY_PREFIX, id), Self::encode(&record, id)?);
        if !moves {
            self.trim_history(id, &mut batch)?;
        }
        self.apply(batch)?;
        // lets sled delete the blob files checkpoints replaced (see `reclaim`): what went into
        // sled counts
        self.advance_log_if_due(bytes - packed, Some(id));
        let write = t0.elapsed();
        let t1 = Instant::now();
        self.flush_synced()?;
        let flush = t1.elapsed();
        self.prune_packs_logged();
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
            savepoint_refused,
        })
    }

    /// Drops the oldest checkpoints beyond the retention count (with `new` counted) and
    /// reclaims the versions only they needed. Returns the retained ids, oldest first.
    fn apply_retention(
        &self,
        new: CheckpointId,
        batch: &mut sled::Batch,
    ) -> Result<Vec<CheckpointId>, StoreError> {
        debug_assert!(self.holding(), "apply_retention without the store's lock");
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
        debug_assert!(self.holding(), "trim_history without the store's lock");
        let keep = self.retention.history.max(1);
        if newest.0 < keep {
            return Ok(());
        }
        let end = id_key(HISTORY_PREFIX, CheckpointId(newest.0 - keep + 1));
        for k in self.tree.range(HISTORY_PREFIX.to_vec()..end).keys() {
            batch.remove(k?);
        }
        let end = id_key(NOTE_PREFIX, CheckpointId(newest.0 - keep + 1));
        for k in self.tree.range(NOTE_PREFIX.to_vec()..end).keys() {
            batch.remove(k?);
        }
        Ok(())
    }

    /// The groups of a retained checkpoint, verified against its metadata.
    pub(super) fn materialize(&self, cp: &Retained) -> Result<Groups, StoreError> {
        let mut out = Groups::new();
        self.visit_groups(cp, |g, content| {
            out.insert(g, content);
        })?;
        Ok(out)
    }

    /// Hands each non-empty group of a retained checkpoint to `sink` as it is read and
    /// decoded (one group in memory at a time), then verifies the entry count against the
    /// checkpoint's metadata; returns the bytes the groups occupy.
    fn visit_groups(
        &self,
        cp: &Retained,
        mut sink: impl FnMut(GroupId, Vec<(StateKey, Entry)>),
    ) -> Result<u64, StoreError> {
        self.visit_stored(cp, |g, blob, _, what| {
            let entries = decode_blob(blob, &g.scope).map_err(|e| format!("{what}: {e}"))?;
            let found = entries.len() as u64;
            sink(g, entries);
            Ok(found)
        })
    }

    /// Hands the blob of each non-empty group of a retained checkpoint to `sink` (with the
    /// entry count its value announces and a name for errors), which returns the entries it
    /// found there; verifies each group's count and the total against the checkpoint's
    /// metadata, and returns the bytes the groups occupy.
    fn visit_stored(
        &self,
        cp: &Retained,
        mut sink: impl FnMut(GroupId, &[u8], u32, &str) -> Result<u64, String>,
    ) -> Result<u64, StoreError> {
        let _reading = self.reading();
        let id = cp.meta.id;
        let unreadable = |detail: String| Unreadable {
            snapshot: format!("checkpoint {id}"),
            detail,
        };
        let mut chosen: Option<(GroupId, CheckpointId, sled::IVec)> = None;
        let mut entries = 0u64;
        let mut bytes = 0u64;
        let mut finish =
            |chosen: Option<(GroupId, CheckpointId, sled::IVec)>| -> Result<(), StoreError> {
                let Some((g, version, raw)) = chosen else {
                    return Ok(());
                };
                let what = format!("group {} of {:?}", g.group, g.scope);
                let raw = self
                    .group_value(version, &raw)?
                    .map_err(|e| unreadable(format!("{what}: {e}")))?;
                bytes += raw.len() as u64;
                let Some((count, blob)) =
                    group_payload(&raw).map_err(|e| unreadable(format!("{what}: {e}")))?
                else {
                    return Ok(());
                };
                let found = sink(g, blob, count, &what).map_err(unreadable)?;
                if found != u64::from(count) {
                    return Err(unreadable(format!(
                        "{what}: it should hold {count} entries but {found} were decoded"
                    ))
                    .into());
                }
                entries += found;
                Ok(())
            };
        for item in self.tree.scan_prefix(GROUP_PREFIX) {
            let (k, v) = item?;
            let (g, version) = decode_group_version_key(&k).ok_or_else(|| {
                unreadable(format!("undecodable group version key {:?}", k.as_ref()))
            })?;
            if chosen.as_ref().is_some_and(|(c, _, _)| *c != g) {
                finish(chosen.take())?;
            }
            if version <= id {
                chosen = Some((g, version, v));
            }
        }
        finish(chosen)?;
        if entries != cp.live_entries {
            return Err(unreadable(format!(
                "it should hold {} entries but {} were found (partly written or damaged)",
                cp.live_entries, entries
            ))
            .into());
        }
        Ok(bytes)
    }

    /// Loads retained checkpoint `id` with its groups as stored, each read once (in parallel)
    /// to count and check it but kept encoded: the engine decodes them as it installs them, a
    /// batch at a time (`Engine::from_state`), so that the whole state is never held decoded.
    pub fn load_checkpoint_stored(
        &self,
        id: CheckpointId,
    ) -> Result<(CheckpointMeta, RestoredState), StoreError> {
        let cp = self.retained_for_restore(id)?;
        // the groups are read (decompressed and counted) on every core, after the scan: the
        // scan takes each group's count on its value's word, and the reads check it
        let mut found = Vec::new();
        let stored_bytes = self.visit_stored(&cp, |g, blob, count, what| {
            found.push((g, blob.to_vec(), count, what.to_owned()));
            Ok(u64::from(count))
        })?;
        let read: Vec<Result<StoredGroup, String>> = found
            .into_par_iter()
            .map(|(g, blob, count, what)| {
                let group = StoredGroup::read(g, blob).map_err(|e| format!("{what}: {e}"))?;
                if group.len() != u64::from(count) {
                    return Err(format!(
                        "{what}: it should hold {count} entries but {} were decoded",
                        group.len()
                    ));
                }
                Ok(group)
            })
            .collect();
        let groups = read
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|detail| Unreadable {
                snapshot: format!("checkpoint {id}"),
                detail,
            })?;
        let restored = RestoredState {
            partitions: cp.meta.partitions.clone(),
            watermark: cp.meta.watermark,
            groups,
            stored_bytes,
            ..Default::default()
        };
        Ok((cp.meta, restored))
    }

    /// Retained checkpoint `id`'s metadata, its damage reported as unreadable.
    fn retained_for_restore(&self, id: CheckpointId) -> Result<Retained, StoreError> {
        self.checkpoint(id).map_err(|e| match e {
            StoreError::Corrupt { detail, .. } => Unreadable {
                snapshot: format!("checkpoint {id}"),
                detail,
            }
            .into(),
            other => other,
        })
    }

    /// Loads retained checkpoint `id` exactly as it was.
    pub fn load_checkpoint(
        &self,
        id: CheckpointId,
    ) -> Result<(CheckpointMeta, RestoredState), StoreError> {
        let cp = self.retained_for_restore(id)?;
        // sized once from the metadata, filled group by group as the groups are read (a
        // million-entry state is never held twice, nor grown step by step); the count is
        // verified after the last group, and no more than MAX_PRESIZED_ENTRIES is reserved
        // on its word
        let room = usize::try_from(cp.live_entries)
            .unwrap_or(usize::MAX)
            .min(MAX_PRESIZED_ENTRIES);
        let mut entries = Vec::new();
        if entries.try_reserve_exact(room).is_err() {
            tracing::debug!(
                checkpoint_id = id.0,
                entries = room,
                "cannot reserve room for the restored entries at once; they grow as read"
            );
        }
        let stored_bytes = self.visit_groups(&cp, |_, content| entries.extend(content))?;
        let restored = RestoredState {
            partitions: cp.meta.partitions.clone(),
            watermark: cp.meta.watermark,
            entries,
            stored_bytes,
            ..Default::default()
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
        let _one_writer = self.exclusive();
        self.check_owner()?;
        let mut batch = sled::Batch::default();
        let (count, mut removed) = self.remove_prefix(CHECKPOINT_PREFIX, &mut batch)?;
        for prefix in [GROUP_PREFIX, GC_PREFIX] {
            removed += self.remove_prefix(prefix, &mut batch)?.1;
        }
        batch.remove(META_HEAD);
        batch.remove(META_PARTIAL);
        batch.insert(META_VERSION, &FORMAT_VERSION.to_be_bytes());
        self.apply(batch)?;
        self.flush_reclaiming(removed)?;
        self.prune_packs_logged();
        Ok(count)
    }

    /// The value of group version `version` as it was encoded: `raw` itself when sled holds
    /// it, else read from the version's pack (`packs`); why it cannot be read when its pack is
    /// damaged.
    fn group_value<'a>(
        &self,
        version: CheckpointId,
        raw: &'a [u8],
    ) -> Result<Result<Cow<'a, [u8]>, String>, StoreError> {
        match Locator::in_value(raw) {
            None => Ok(Ok(Cow::Borrowed(raw))),
            Some(at) => Ok(match self.packs.read(at.pack(version.0), at)? {
                Read::Value(v) => Ok(Cow::Owned(v)),
                Read::Damaged(detail) => Err(detail),
            }),
        }
    }

    /// The newest versions (before checkpoint `id`) of the groups `id` does not change that
    /// lie in a pack less than half of which stays the newest versions once `id` is written
    /// (`changed` are the groups it writes): `id` writes them again into
    /// its own pack, so that the old one goes once the checkpoints before `id` do. Without it,
    /// a group that stops changing would keep a whole pack of otherwise replaced versions on
    /// disk; with it, what the packs hold beyond what the retained checkpoints need is at most
    /// as much again as the newest state.
    fn to_carry(
        &self,
        id: CheckpointId,
        changed: &HashSet<&GroupId>,
    ) -> Result<Vec<(GroupId, CheckpointId, Locator)>, StoreError> {
        let mut newest: Vec<(GroupId, CheckpointId, Option<Locator>)> = Vec::new();
        for item in self.tree.scan_prefix(GROUP_PREFIX) {
            let (k, v) = item?;
            let (g, version) = decode_group_version_key(&k).ok_or_else(|| {
                self.corrupt(format!("undecodable group version key {:?}", k.as_ref()))
            })?;
            if version >= id {
                continue;
            }
            let at = Locator::in_value(&v);
            match newest.last_mut() {
                Some(last) if last.0 == g => *last = (g, version, at),
                _ => newest.push((g, version, at)),
            }
        }
        // what stays the newest once `id` is written
        let mut current: HashMap<PackName, u64> = HashMap::new();
        for (_, version, at) in newest.iter().filter(|(g, _, _)| !changed.contains(g)) {
            if let Some(at) = at {
                *current.entry(at.pack(version.0)).or_default() += u64::from(at.len);
            }
        }
        let sparse: HashSet<PackName> = self
            .packs
            .sizes()?
            .into_iter()
            .filter(|(pack, size)| current.get(pack).copied().unwrap_or(0) * 2 < *size)
            .map(|(pack, _)| pack)
            .collect();
        Ok(newest
            .into_iter()
            .filter(|(g, _, _)| !changed.contains(g))
            .filter_map(|(g, version, at)| at.map(|at| (g, version, at)))
            .filter(|(_, version, at)| sparse.contains(&at.pack(version.0)))
            .collect())
    }

    /// Deletes the packs no group version points into (`packs`), once the write that removed
    /// their last version is durable; a failure costs space only, and is logged (the next
    /// write tries again).
    fn prune_packs_logged(&self) {
        debug_assert!(self.holding(), "prune_packs without the store's lock");
        let needed = || -> Result<BTreeSet<PackName>, StoreError> {
            let mut needed = BTreeSet::new();
            for item in self.tree.scan_prefix(GROUP_PREFIX) {
                let (k, v) = item?;
                let version = decode_group_version_key(&k).map(|(_, version)| version);
                let at = Locator::in_value(&v);
                if let (Some(version), Some(at)) = (version, at) {
                    needed.insert(at.pack(version.0));
                }
            }
            Ok(needed)
        };
        match needed().and_then(|n| Ok(self.packs.delete_unneeded(&n)?)) {
            Ok(0) => {}
            Ok(deleted) => {
                tracing::debug!(deleted, "deleted the packs of reclaimed group versions")
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot delete the packs no checkpoint needs; they stay on disk until the next checkpoint")
            }
        }
    }

    /// Number of stored group versions (all checkpoints), for tests and diagnostics.
    pub fn version_count(&self) -> usize {
        let _reading = self.reading();
        self.tree.scan_prefix(GROUP_PREFIX).count()
    }
}

/// A stored group version's entry count and blob; `None` for an emptied group.
fn group_payload(raw: &[u8]) -> Result<Option<(u32, &[u8])>, String> {
    let payload = super::codec::unseal(raw).ok_or("checksum mismatch")?;
    if payload.is_empty() {
        return Ok(None);
    }
    let count = payload
        .get(0..4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_be_bytes)
        .ok_or("truncated")?;
    Ok(Some((count, &payload[4..])))
}

/// Whether a stored group version holds entries. A damaged one counts as holding some: writing
/// over it (an emptied version, a new version) must stay possible after a restore fell back
/// past it.
fn is_live(raw: &[u8]) -> bool {
    super::codec::unseal(raw).is_none_or(|payload| !payload.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Acc, EntryStatus};

    #[test]
    fn groups_encoded_in_parallel_come_in_order_each_with_its_own_value() {
        // more groups than are encoded at once, every third one emptied
        let groups: Vec<GroupContent> = (0..ENCODE_AHEAD as u16 * 2 + 7)
            .map(|g| {
                let id = GroupId {
                    aggregation: 0,
                    scope: None,
                    group: g,
                };
                let entries = if g % 3 == 0 {
                    Vec::new()
                } else {
                    (0..i64::from(g))
                        .map(|start| {
                            let key = StateKey {
                                partition: None,
                                window: 0,
                                start,
                                key: format!("k{g}").into(),
                            };
                            let entry = Entry {
                                status: EntryStatus::Open,
                                end: start + 10,
                                acc: Acc::of(Some(start as f64)),
                            };
                            (key, entry)
                        })
                        .collect()
                };
                GroupContent::new(id, entries)
            })
            .collect();
        let id = CheckpointId(9);
        let out: Vec<_> = encoded(&groups, id).collect();
        assert_eq!(out.len(), groups.len());
        for ((g, blob), expected) in out.into_iter().zip(&groups) {
            assert_eq!(g.id, expected.id);
            let blob = blob.expect("encodes");
            if expected.is_empty() {
                assert_eq!(blob, None, "group {} emptied", g.id.group);
            } else {
                let one_by_one = encode_content(expected, id).expect("encodes");
                assert_eq!(blob, Some(one_by_one), "group {}", g.id.group);
            }
        }
    }
}
