//! A large checkpoint in several batches: its group versions past `BATCH_BYTES` are written
//! ahead of its last batch (the one that makes it a checkpoint), marked by `META_PARTIAL` and a
//! format version stamped `PARTIAL_FORMAT_OFFSET` higher until that batch lands; what a stop
//! or a failure leaves that way is removed before the next write.

use super::codec::{
    decode_group_version_key, GROUP_PREFIX, META_PARTIAL, META_VERSION, PARTIAL_FORMAT_OFFSET,
};
use super::{Store, StoreError, FORMAT_VERSION};
use crate::checkpoint_id::CheckpointId;

/// Once the group versions of a checkpoint pass this many bytes, they are written in a batch
/// of their own ahead of the checkpoint's last one, which makes them part of a checkpoint: a
/// full checkpoint of a large state is then several moderate batches, not one holding every
/// group's blob at once (sled takes longer and holds more memory for a very large batch).
/// 16 MiB: at 10k keys every checkpoint rewrites most groups, and a batch of 64 MiB was a
/// tenth of the service's peak heap.
pub(super) const BATCH_BYTES: usize = 16 << 20;

/// Group versions of the checkpoint being written that were written ahead of its last batch.
#[derive(Debug, Default)]
pub(super) struct Ahead {
    /// Batches written ahead.
    pub(super) batches: usize,
    /// Bytes gathered since the last one.
    pending: usize,
}

impl Store {
    /// Writes the group versions gathered in `batch` ahead of the checkpoint's last batch once
    /// they pass `batch_bytes` (`before` runs first), the first time with the marker that they
    /// belong to no checkpoint yet (`META_PARTIAL`).
    pub(super) fn write_ahead(
        &self,
        ahead: &mut Ahead,
        len: usize,
        batch: &mut sled::Batch,
        id: CheckpointId,
        before: impl FnOnce() -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        ahead.pending += len;
        if ahead.pending < self.batch_bytes {
            return Ok(());
        }
        before()?;
        #[cfg(test)]
        if ahead.batches
            == self
                .fail_after_batches
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Err(StoreError::Io(sled::Error::Unsupported(
                "a failure injected by a test".into(),
            )));
        }
        if ahead.batches == 0 {
            batch.insert(META_PARTIAL, &id.0.to_be_bytes());
            let stamped = FORMAT_VERSION + PARTIAL_FORMAT_OFFSET;
            batch.insert(META_VERSION, &stamped.to_be_bytes());
        }
        self.apply(std::mem::take(batch))?;
        ahead.batches += 1;
        ahead.pending = 0;
        Ok(())
    }

    /// The id of a checkpoint whose versions were written ahead of a last batch that has not
    /// landed, if any.
    pub(super) fn partial_id(&self) -> Result<Option<CheckpointId>, StoreError> {
        let _reading = self.reading();
        let Some(raw) = self.tree.get(META_PARTIAL)? else {
            return Ok(None);
        };
        <[u8; 8]>::try_from(raw.as_ref())
            .map(|b| Some(CheckpointId(u64::from_be_bytes(b))))
            .map_err(|_| self.corrupt(format!("undecodable {META_PARTIAL:?} {:?}", raw.as_ref())))
    }

    /// Removes the group versions of a checkpoint whose last batch never landed (the process
    /// stopped, or the write failed, after versions were written ahead of it): they belong to
    /// no checkpoint, and a later one would otherwise restore them as its own.
    pub(super) fn discard_partial(&self) -> Result<(), StoreError> {
        debug_assert!(self.holding(), "discard_partial without the store's lock");
        let Some(id) = self.partial_id()? else {
            return Ok(());
        };
        let mut batch = sled::Batch::default();
        let mut versions = 0usize;
        for k in self.tree.scan_prefix(GROUP_PREFIX).keys() {
            let k = k?;
            if decode_group_version_key(&k).is_some_and(|(_, v)| v == id) {
                batch.remove(k);
                versions += 1;
            }
        }
        batch.remove(META_PARTIAL);
        batch.insert(META_VERSION, &FORMAT_VERSION.to_be_bytes());
        self.apply(batch)?;
        tracing::warn!(
            checkpoint_id = id.0,
            versions,
            "removed the group versions of a checkpoint that was not completed"
        );
        Ok(())
    }
}
