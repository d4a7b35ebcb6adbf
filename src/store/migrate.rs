//! Migration of older store layouts, run once at open.

use super::codec::{
    decode_v1_state_key, id_key, v1, version_key, CHECKPOINT_PREFIX, HISTORY_PREFIX, META_HEAD,
    META_VERSION,
};
use super::{Retained, Store, StoreError, FORMAT_VERSION};
use crate::checkpoint::history::{CheckpointRecord, Status};
use crate::checkpoint::protocol::CheckpointMeta;
use crate::engine::Entry;

/// Version 1 kept one materialized state (`state/`) and its metadata (`meta/current`), with
/// unsealed values. It becomes the single retained checkpoint of version 2, and its completed
/// checkpoints the first history records.
pub(super) fn from_v1(store: &Store) -> Result<(), StoreError> {
    let tree = &store.tree;
    let mut batch = sled::Batch::default();
    if let Some(raw) = tree.get(v1::META_CURRENT)? {
        let meta: CheckpointMeta = postcard::from_bytes(&raw)
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
        let retained = Retained {
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
        match postcard::from_bytes::<CheckpointMeta>(&v) {
            Ok(meta) => {
                let record = CheckpointRecord::from_meta(&meta, Status::Completed);
                batch.insert(k, Store::encode(&record, meta.id)?);
            }
            Err(_) => batch.remove(k),
        }
    }
    batch.insert(META_VERSION, &FORMAT_VERSION.to_be_bytes());
    tree.apply_batch(batch)?;
    store.db.flush()?;
    tracing::info!(path = %store.path.display(), "migrated the checkpoint store from format version 1 to {FORMAT_VERSION}");
    Ok(())
}
