//! Migration of older store layouts, run once at open.

use super::codec::{
    decode_v1_state_key, id_key, v1, version_key, CHECKPOINT_PREFIX, HISTORY_PREFIX, META_HEAD,
    META_VERSION, SAVEPOINT_META_PREFIX,
};
use super::legacy::{CheckpointMetaV2, RetainedV2, SavepointMetaV2};
use super::{Retained, SavepointMeta, Store, StoreError};
use crate::checkpoint::history::{CheckpointRecord, Status};
use crate::engine::Entry;

/// Runs every migration from format `found` up to the current one, each in its own atomic
/// batch, flushed.
pub(super) fn upgrade(store: &Store, found: u32) -> Result<(), StoreError> {
    if found <= 1 {
        from_v1(store)?;
    }
    if found <= 2 {
        from_v2(store)?;
    }
    Ok(())
}

/// Format 3 records the input fields in every checkpoint's spec: checkpoint and savepoint
/// metadata are re-encoded, with the input fields marked as not recorded.
fn from_v2(store: &Store) -> Result<(), StoreError> {
    let tree = &store.tree;
    let mut batch = sled::Batch::default();
    for item in tree.scan_prefix(CHECKPOINT_PREFIX) {
        let (k, v) = item?;
        let old: RetainedV2 = store.decode(&v, "format 2 checkpoint metadata")?;
        let id = old.meta.id;
        batch.insert(k, Store::encode(&Retained::from(old), id)?);
    }
    for item in tree.scan_prefix(SAVEPOINT_META_PREFIX) {
        let (k, v) = item?;
        // a damaged savepoint stays damaged (and is reported when used), not a failed migration
        let Ok(old) = store.decode::<SavepointMetaV2>(&v, "format 2 savepoint metadata") else {
            continue;
        };
        let id = old.checkpoint_id;
        batch.insert(k, Store::encode(&SavepointMeta::from(old), id)?);
    }
    batch.insert(META_VERSION, &3u32.to_be_bytes());
    tree.apply_batch(batch)?;
    store.db.flush()?;
    tracing::info!(path = %store.path.display(), "migrated the checkpoint store from format version 2 to 3");
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
        let id = meta.id;
        let mut live = 0u64;
        for item in tree.scan_prefix(v1::STATE_PREFIX) {
            let (k, v) = item?;
            let key = decode_v1_state_key(&k)
                .ok_or_else(|| store.corrupt(format!("undecodable state key {:?}", k.as_ref())))?;
            let entry: Entry = postcard::from_bytes(&v)
                .map_err(|e| store.corrupt(format!("version 1 state entry {key:?}: {e}")))?;
            batch.insert(version_key(&key, id), Store::encode(&Some(entry), id)?);
            batch.remove(k);
            live += 1;
        }
        let retained = RetainedV2 {
            meta,
            live_entries: live,
        };
        batch.insert(id_key(CHECKPOINT_PREFIX, id), Store::encode(&retained, id)?);
        batch.insert(META_HEAD, &id.to_be_bytes());
        batch.remove(v1::META_CURRENT);
    }
    // version 1 history: unsealed metadata of completed checkpoints under the same prefix
    for item in tree.scan_prefix(HISTORY_PREFIX) {
        let (k, v) = item?;
        match postcard::from_bytes::<CheckpointMetaV2>(&v) {
            Ok(meta) => {
                let id = meta.id;
                let record = CheckpointRecord::from_meta(&meta.into(), Status::Completed);
                batch.insert(k, Store::encode(&record, id)?);
            }
            Err(_) => batch.remove(k),
        }
    }
    batch.insert(META_VERSION, &2u32.to_be_bytes());
    tree.apply_batch(batch)?;
    store.db.flush()?;
    tracing::info!(path = %store.path.display(), "migrated the checkpoint store from format version 1 to 2");
    Ok(())
}
