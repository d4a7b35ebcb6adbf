//! Making sled let go of replaced blob files.
//!
//! sled keeps a value (or a tree node) larger than a quarter of its log segment in a file of its
//! own under `blobs/`, and writes only a pointer to it into its log. When a newer write
//! replaces that node, sled deletes the old file only once the segment of the log holding the
//! replacement is retired, and it retires a segment only once the durable end of the log, as a
//! later write records it, has moved past that segment's end. A store whose group versions are blobs writes little else into the
//! log (pointers, metadata), so without help its log can stay in one segment for hundreds of
//! checkpoints while every replaced version and node stays on disk: the store then grows with
//! its write history, and opening it reads every one of those files again.
//!
//! So once checkpoints (and deletions of checkpoints or savepoints, and imports of savepoints)
//! have written or removed [`ADVANCE_EVERY`] bytes since the last advance, counted from the
//! process's start, the store writes [`ADVANCE_BYTES`] of filler into a tree of its own before
//! the next flush, one 64 KiB value at a time, each removed right after it is written. That
//! moves the end of the log past two segments; once the flush has made it durable, sled
//! retires the segments before it and deletes the blob files they replaced. The filler adds at most an eighth to what is written,
//! and a store that writes little is never advanced (its log, holding what it writes, moves on
//! its own). The filler holds one value at a time (two if two advances meet, or after a crash
//! left one; the next advance removes it).

/// sled's log segment, set explicitly on every open (sled's own default, so stores made before
/// it was set open unchanged: sled refuses a segment size other than the one a store was made
/// with).
pub(super) const SEGMENT_SIZE: usize = 512 * 1024;

/// The tree the filler goes into, apart from the checkpoints.
pub(super) const FILLER_TREE: &str = "log-filler";

/// One filler value: well under sled's limit for a value kept inline in the log (a quarter of a
/// segment), so that it is not a blob itself.
const FILLER_VALUE: usize = SEGMENT_SIZE / 8;

/// How far each advance moves the log: two segments and a bit, so that the segment holding the
/// checkpoint's last write is a full segment behind the end.
pub(super) const ADVANCE_BYTES: usize = 2 * SEGMENT_SIZE + 2 * FILLER_VALUE;

/// Bytes written or removed (by checkpoints, deletions of checkpoints or savepoints, imports
/// of savepoints) between two advances: eight times the filler.
pub(super) const ADVANCE_EVERY: u64 = 8 * ADVANCE_BYTES as u64;

/// When the log is next advanced: the bytes written or removed since the last advance.
#[derive(Debug)]
pub(super) struct Advances {
    every: u64,
    since: std::sync::atomic::AtomicU64,
}

impl Advances {
    /// Advances once `every` bytes were written or removed since the last one (0: after every
    /// write).
    pub(super) fn new(every: u64) -> Self {
        Advances {
            every,
            since: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Counts a write or removal of `bytes`; true when the log should be advanced now (the
    /// count then starts again).
    pub(super) fn due(&self, bytes: u64) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let every = self.every;
        // one update, so that two callers at once neither lose a count nor both advance
        let before = self.since.fetch_update(Relaxed, Relaxed, |since| {
            let since = since.saturating_add(bytes);
            Some(if since < every { since } else { 0 })
        });
        let since = before.unwrap_or(0).saturating_add(bytes);
        since >= every
    }
}

impl Default for Advances {
    fn default() -> Self {
        Advances::new(ADVANCE_EVERY)
    }
}

/// Moves sled's log [`ADVANCE_BYTES`] forward (see the module's documentation); durable, and
/// so effective, with the next flush.
pub(super) fn advance_log(db: &sled::Db) -> Result<(), sled::Error> {
    let tree = db.open_tree(FILLER_TREE)?;
    let value = vec![0u8; FILLER_VALUE];
    for i in 0..(ADVANCE_BYTES / FILLER_VALUE) as u16 {
        let key = i.to_be_bytes();
        tree.insert(key, value.as_slice())?;
        tree.remove(key)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_advance_leaves_the_filler_empty_even_after_a_crash_left_a_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::Config::new()
            .path(dir.path())
            .segment_size(SEGMENT_SIZE)
            .open()
            .expect("open");
        let tree = db.open_tree(FILLER_TREE).expect("tree");
        // what a crash between an insert and its removal leaves
        tree.insert(3u16.to_be_bytes(), vec![0u8; FILLER_VALUE])
            .expect("insert");
        advance_log(&db).expect("advance");
        assert!(tree.is_empty());
        db.flush().expect("flush");
        // the filler stays in the log: none of it went to a file of its own
        assert_eq!(crate::store::tests::blob_files(dir.path()), 0);
    }

    #[test]
    fn the_log_is_advanced_once_checkpoints_wrote_enough_since_the_last_time() {
        let a = Advances::new(100);
        assert!(!a.due(60));
        assert!(a.due(50));
        // counted again from nothing
        assert!(!a.due(99));
        assert!(a.due(1));
        assert!(a.due(250));
        let every = Advances::new(0);
        assert!(every.due(0) && every.due(1));
    }
}
