//! Migration of older store layouts, run once at open.

use super::codec::{
    decode_v1_state_key, id_key, v1, v3_version_key, CHECKPOINT_PREFIX, HISTORY_PREFIX, META_HEAD,
    META_VERSION, SAVEPOINT_META_PREFIX,
};
use super::codec::{GC_PREFIX, SAVEPOINT_ENTRY_PREFIX, VERSION_PREFIX};
use super::legacy::{
    CheckpointMetaV2, CheckpointMetaV3, RetainedV2, RetainedV3, SavepointMetaV2, SavepointMetaV3,
};
use super::{Retained, SavepointMeta, Store, StoreError};
use crate::checkpoint::history::{CheckpointRecord, Status};
use crate::checkpoint::protocol::CheckpointMeta;
use crate::checkpoint_id::CheckpointId;
use crate::engine::Entry;

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
    tree.apply_batch(batch)?;
    store.db.flush()?;
    store.log_migration(3, 4);
    Ok(())
}

/// Format 3 records the input fields in every checkpoint's spec: checkpoint and savepoint
/// metadata are re-encoded (in the format 3 shape), with the input fields marked as not
/// recorded.
fn from_v2(store: &Store) -> Result<(), StoreError> {
    let tree = &store.tree;
    let mut batch = sled::Batch::default();
    reencode_metadata::<RetainedV2, RetainedV3, SavepointMetaV2, SavepointMetaV3>(
        store,
        2,
        &mut batch,
        |r| CheckpointId(r.meta.id),
        |s| CheckpointId(s.checkpoint_id),
    )?;
    batch.insert(META_VERSION, &3u32.to_be_bytes());
    tree.apply_batch(batch)?;
    store.db.flush()?;
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
    tree.apply_batch(batch)?;
    store.db.flush()?;
    store.log_migration(1, 2);
    Ok(())
}
