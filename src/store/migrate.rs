//! Migration of older store layouts, run once at open.

use super::codec::v4::{SAVEPOINT_ENTRY_PREFIX, VERSION_PREFIX};
use super::codec::{
    decode_state_key, decode_version_key, group_version_key, savepoint_group_key,
    v4_savepoint_entries_prefix, GC_PREFIX, META_GROUPS, SAVEPOINT_GROUP_PREFIX,
};
use super::codec::{
    decode_v1_state_key, id_key, v1, v3_version_key, CHECKPOINT_PREFIX, HISTORY_PREFIX, META_HEAD,
    META_VERSION, SAVEPOINT_META_PREFIX,
};
use super::legacy::{
    CheckpointMetaV2, CheckpointMetaV3, RetainedV2, RetainedV3, SavepointMetaV2, SavepointMetaV3,
};
use super::versions::{encode_group, Groups};
use super::{Retained, SavepointMeta, Store, StoreError};
use crate::checkpoint::history::{CheckpointRecord, Status};
use crate::checkpoint::protocol::CheckpointMeta;
use crate::checkpoint_id::CheckpointId;
use crate::engine::group::group_entries;
use crate::engine::{Entry, GroupLayout, StateKey};

impl Store {
    fn log_migration(&self, from: u32, to: u32) {
        if self.is_scratch() {
            tracing::info!(path = %self.path.display(), from, to, "migrated a temporary copy of the checkpoint store to check it; the store itself is unchanged");
        } else {
            tracing::info!(path = %self.path.display(), from, to, "migrated the checkpoint store; builds that read only older formats can no longer open it");
        }
    }
}

/// Re-encodes checkpoint and savepoint metadata from one shape to the next, into `batch`. A
/// damaged value stays as it is: a restore skips it for an older one, as the build that wrote it
/// would have; it must not block the migration of the others.
fn reencode_metadata<OldCp, NewCp, OldSp, NewSp>(
    store: &Store,
    from: u32,
    batch: &mut sled::Batch,
    cp_id: fn(&OldCp) -> CheckpointId,
    sp_id: fn(&OldSp) -> CheckpointId,
) -> Result<(), StoreError>
where
    OldCp: serde::de::DeserializeOwned,
    NewCp: serde::Serialize + From<OldCp>,
    OldSp: serde::de::DeserializeOwned,
    NewSp: serde::Serialize + From<OldSp>,
{
    let tree = &store.tree;
    for item in tree.scan_prefix(CHECKPOINT_PREFIX) {
        let (k, v) = item?;
        let what = format!("format {from} checkpoint metadata");
        let Ok(old) = store.decode::<OldCp>(&v, &what) else {
            tracing::warn!(checkpoint_id = ?super::codec::decode_id_key(CHECKPOINT_PREFIX, &k), "leaving damaged checkpoint metadata as it is: restores skip it");
            continue;
        };
        let id = cp_id(&old);
        batch.insert(k, Store::encode(&NewCp::from(old), id)?);
    }
    for item in tree.scan_prefix(SAVEPOINT_META_PREFIX) {
        let (k, v) = item?;
        // a damaged savepoint stays damaged (and is reported when used)
        let what = format!("format {from} savepoint metadata");
        let Ok(old) = store.decode::<OldSp>(&v, &what) else {
            continue;
        };
        let id = sp_id(&old);
        batch.insert(k, Store::encode(&NewSp::from(old), id)?);
    }
    Ok(())
}

/// Runs every migration from format `found` up to the current one, each in its own atomic
/// batch, flushed.
pub(super) fn upgrade(store: &Store, found: u32) -> Result<(), StoreError> {
    if found <= 1 {
        from_v1(store)?;
    }
    if found <= 2 {
        from_v2(store)?;
    }
    if found <= 3 {
        from_v3(store)?;
    }
    if found <= 4 {
        from_v4(store)?;
    }
    if found <= 5 {
        from_v5(store)?;
    }
    Ok(())
}

/// Format 5 to 6: the group versions' values move to pack files as checkpoints write them
/// (`packs`); those sled holds are read as before, so only the stamp changes (a build that
/// reads format 5 would take a value in a pack for a damaged group).
fn from_v5(store: &Store) -> Result<(), StoreError> {
    let mut batch = sled::Batch::default();
    batch.insert(META_VERSION, &6u32.to_be_bytes());
    store.apply(batch)?;
    store.flush_synced()?;
    store.log_migration(5, 6);
    Ok(())
}

/// The state of format 4 checkpoint `id`: per key, the newest version not after `id`.
fn v4_state(store: &Store, id: CheckpointId) -> Result<Vec<(StateKey, Entry)>, String> {
    let mut out = Vec::new();
    let mut chosen: Option<(StateKey, sled::IVec)> = None;
    let mut finish = |chosen: Option<(StateKey, sled::IVec)>| -> Result<(), String> {
        if let Some((key, raw)) = chosen {
            let entry: Option<Entry> = store
                .decode(&raw, &format!("state of {key:?}"))
                .map_err(|e| e.to_string())?;
            if let Some(e) = entry {
                out.push((key, e));
            }
        }
        Ok(())
    };
    for item in store.tree.scan_prefix(VERSION_PREFIX) {
        let (k, v) = item.map_err(|e| e.to_string())?;
        let (key, version) = decode_version_key(&k)
            .ok_or_else(|| format!("undecodable version key {:?}", k.as_ref()))?;
        if chosen.as_ref().is_some_and(|(c, _)| *c != key) {
            finish(chosen.take())?;
        }
        if version <= id {
            chosen = Some((key, v));
        }
    }
    finish(chosen)?;
    Ok(out)
}

fn by_group(layout: &GroupLayout, entries: Vec<(StateKey, Entry)>) -> Groups {
    group_entries(layout, entries)
        .into_iter()
        .map(|g| (g.id.clone(), g.entries()))
        .collect()
}

/// Format 5 keeps state by key group: each retained checkpoint's state (one key per window
/// instance in format 4) is rewritten as versions of the groups that changed at it, with the
/// garbage lists that go with them; savepoints become groups; a new key-group layout is
/// recorded. A retained checkpoint whose state is damaged cannot be rewritten: it is dropped
/// from the retained ones (its history record stays), as a restore would have skipped it.
fn from_v4(store: &Store) -> Result<(), StoreError> {
    let tree = &store.tree;
    let mut batch = sled::Batch::default();
    let layout = match tree.get(META_GROUPS)? {
        Some(raw) => store.decode(&raw, "key-group layout")?,
        None => {
            let layout = store.new_layout();
            batch.insert(META_GROUPS, Store::encode(&layout, CheckpointId(0))?);
            layout
        }
    };
    // format 4's versions and garbage lists (which name format 4 keys) go; removed first, as a
    // batch keeps the last write of a key and the new garbage lists reuse their keys
    for item in tree.scan_prefix(VERSION_PREFIX).keys() {
        batch.remove(item?);
    }
    for item in tree.scan_prefix(GC_PREFIX).keys() {
        batch.remove(item?);
    }
    let mut previous: Groups = Groups::new();
    let mut last_version: std::collections::HashMap<crate::engine::GroupId, CheckpointId> =
        Default::default();
    for item in tree.scan_prefix(CHECKPOINT_PREFIX) {
        let (_, v) = item?;
        // damaged metadata stays as it is: restores skip that checkpoint
        let Ok(retained) = store.decode::<Retained>(&v, "format 4 checkpoint metadata") else {
            continue;
        };
        let id = retained.meta.id;
        let state = match v4_state(store, id) {
            Ok(state) if state.len() as u64 == retained.live_entries => state,
            Ok(state) => {
                tracing::warn!(
                    checkpoint_id = id.0,
                    expected = retained.live_entries,
                    found = state.len(),
                    "format 4 checkpoint is incomplete; dropping it from the retained checkpoints"
                );
                batch.remove(id_key(CHECKPOINT_PREFIX, id));
                continue;
            }
            Err(detail) => {
                tracing::warn!(checkpoint_id = id.0, %detail, "format 4 checkpoint is damaged; dropping it from the retained checkpoints");
                batch.remove(id_key(CHECKPOINT_PREFIX, id));
                continue;
            }
        };
        let groups = by_group(&layout, state);
        // the version a changed group had before `id` is garbage once `id` is the oldest
        // retained checkpoint; so is a version that empties a group
        let mut garbage: Vec<Vec<u8>> = Vec::new();
        for (g, entries) in &groups {
            if previous.get(g) != Some(entries) {
                batch.insert(group_version_key(g, id), encode_group(entries, id)?);
                if let Some(prev) = last_version.insert(g.clone(), id) {
                    garbage.push(group_version_key(g, prev));
                }
            }
        }
        for g in previous.keys().filter(|g| !groups.contains_key(*g)) {
            let vk = group_version_key(g, id);
            batch.insert(vk.clone(), encode_group(&[], id)?);
            garbage.push(vk);
            if let Some(prev) = last_version.insert(g.clone(), id) {
                garbage.push(group_version_key(g, prev));
            }
        }
        if !garbage.is_empty() {
            batch.insert(id_key(GC_PREFIX, id), Store::encode(&garbage, id)?);
        }
        previous = groups;
    }
    for name in store.savepoint_names()? {
        let prefix = v4_savepoint_entries_prefix(&name);
        let mut entries = Vec::new();
        for item in tree.scan_prefix(&prefix) {
            let (k, v) = item?;
            batch.remove(k.clone());
            let key = match decode_state_key(&k[prefix.len()..]) {
                Some((key, [])) => key,
                _ => {
                    tracing::warn!(savepoint = %name, "undecodable format 4 savepoint key left out: the savepoint reads as damaged");
                    continue;
                }
            };
            match store.decode::<Entry>(&v, "savepoint entry") {
                Ok(entry) => entries.push((key, entry)),
                Err(e) => {
                    tracing::warn!(savepoint = %name, error = %e, "damaged format 4 savepoint entry left out: the savepoint reads as damaged")
                }
            }
        }
        let id = store
            .savepoint(&name)
            .map(|m| m.checkpoint_id)
            .unwrap_or_default();
        for (g, entries) in by_group(&layout, entries) {
            batch.insert(savepoint_group_key(&name, &g), encode_group(&entries, id)?);
        }
    }
    debug_assert!(SAVEPOINT_GROUP_PREFIX != SAVEPOINT_ENTRY_PREFIX);
    batch.insert(META_VERSION, &5u32.to_be_bytes());
    store.apply(batch)?;
    store.flush_synced()?;
    store.log_migration(4, 5);
    Ok(())
}

/// Format 4 scopes state keys (a leading scope byte; everything before was instance scope, 0)
/// and records the scope in the spec: state versions, savepoint entries and garbage lists are
/// re-keyed, checkpoint and savepoint metadata re-encoded.
fn from_v3(store: &Store) -> Result<(), StoreError> {
    let tree = &store.tree;
    let mut batch = sled::Batch::default();
    let rekey = |k: &[u8], prefix_len: usize| -> Vec<u8> {
        let mut out = Vec::with_capacity(k.len() + 1);
        out.extend_from_slice(&k[..prefix_len]);
        out.push(0);
        out.extend_from_slice(&k[prefix_len..]);
        out
    };
    for item in tree.scan_prefix(VERSION_PREFIX) {
        let (k, v) = item?;
        batch.remove(k.clone());
        batch.insert(rekey(&k, VERSION_PREFIX.len()), v);
    }
    for item in tree.scan_prefix(SAVEPOINT_ENTRY_PREFIX) {
        let (k, v) = item?;
        // `spe/<name>/<state key>`; names contain no `/`
        let Some(slash) = k[SAVEPOINT_ENTRY_PREFIX.len()..]
            .iter()
            .position(|b| *b == b'/')
        else {
            return Err(store.corrupt(format!("undecodable savepoint entry key {:?}", k.as_ref())));
        };
        batch.remove(k.clone());
        batch.insert(rekey(&k, SAVEPOINT_ENTRY_PREFIX.len() + slash + 1), v);
    }
    for item in tree.scan_prefix(GC_PREFIX) {
        let (k, v) = item?;
        let id = super::codec::decode_id_key(GC_PREFIX, &k).unwrap_or_default();
        match store.decode::<Vec<Vec<u8>>>(&v, "garbage list") {
            Ok(list) => {
                let list: Vec<Vec<u8>> = list
                    .iter()
                    .map(|vk| rekey(vk, VERSION_PREFIX.len()))
                    .collect();
                batch.insert(k, Store::encode(&list, id)?);
            }
            // a damaged list only ever cost space; it cannot name format 4 keys
            Err(_) => batch.remove(k),
        }
    }
    reencode_metadata::<RetainedV3, Retained, SavepointMetaV3, SavepointMeta>(
        store,
        3,
        &mut batch,
        |r| CheckpointId(r.meta.id),
        |s| CheckpointId(s.checkpoint_id),
    )?;
    batch.insert(META_VERSION, &4u32.to_be_bytes());
    store.apply(batch)?;
    store.flush_synced()?;
    store.log_migration(3, 4);
    Ok(())
}

/// Format 3 records the input fields in every checkpoint's spec: checkpoint and savepoint
/// metadata are re-encoded (in the format 3 shape), with the input fields marked as not
/// recorded.
fn from_v2(store: &Store) -> Result<(), StoreError> {
    let mut batch = sled::Batch::default();
    reencode_metadata::<RetainedV2, RetainedV3, SavepointMetaV2, SavepointMetaV3>(
        store,
        2,
        &mut batch,
        |r| CheckpointId(r.meta.id),
        |s| CheckpointId(s.checkpoint_id),
    )?;
    batch.insert(META_VERSION, &3u32.to_be_bytes());
    store.apply(batch)?;
    store.flush_synced()?;
    store.log_migration(2, 3);
    Ok(())
}

/// Version 1 kept one materialized state (`state/`) and its metadata (`meta/current`), with
/// unsealed values. It becomes the single retained checkpoint of version 2, and its completed
/// checkpoints the first history records.
fn from_v1(store: &Store) -> Result<(), StoreError> {
    let tree = &store.tree;
    let mut batch = sled::Batch::default();
    if let Some(raw) = tree.get(v1::META_CURRENT)? {
        let meta: CheckpointMetaV2 = postcard::from_bytes(&raw)
            .map_err(|e| store.corrupt(format!("version 1 checkpoint metadata: {e}")))?;
        let id = CheckpointId(meta.id);
        let mut live = 0u64;
        for item in tree.scan_prefix(v1::STATE_PREFIX) {
            let (k, v) = item?;
            let key = decode_v1_state_key(&k)
                .ok_or_else(|| store.corrupt(format!("undecodable state key {:?}", k.as_ref())))?;
            let entry: Entry = postcard::from_bytes(&v)
                .map_err(|e| store.corrupt(format!("version 1 state entry {key:?}: {e}")))?;
            batch.insert(v3_version_key(&key, id), Store::encode(&Some(entry), id)?);
            batch.remove(k);
            live += 1;
        }
        let retained = RetainedV2 {
            meta,
            live_entries: live,
        };
        batch.insert(id_key(CHECKPOINT_PREFIX, id), Store::encode(&retained, id)?);
        batch.insert(META_HEAD, &id.0.to_be_bytes());
        batch.remove(v1::META_CURRENT);
    }
    // version 1 history: unsealed metadata of completed checkpoints under the same prefix
    for item in tree.scan_prefix(HISTORY_PREFIX) {
        let (k, v) = item?;
        match postcard::from_bytes::<CheckpointMetaV2>(&v) {
            Ok(meta) => {
                let id = CheckpointId(meta.id);
                let meta = CheckpointMeta::from(CheckpointMetaV3::from(meta));
                let record = CheckpointRecord::from_meta(&meta, Status::Completed);
                batch.insert(k, Store::encode(&record, id)?);
            }
            Err(_) => batch.remove(k),
        }
    }
    batch.insert(META_VERSION, &2u32.to_be_bytes());
    store.apply(batch)?;
    store.flush_synced()?;
    store.log_migration(1, 2);
    Ok(())
}
