//! What a flush of sled 0.34 leaves undone for a checkpoint to survive a machine crash (power
//! loss, a kernel panic, a node that dies), not only a process crash.
//!
//! sled writes a value or tree node larger than a quarter of its log segment to a file of its
//! own under `blobs/` and puts only a pointer to it into its log; it never syncs those files,
//! nor the directory that names them. Its flush writes the log's bytes out with
//! `sync_file_range`, which neither records the log file's length (the filesystem does so only
//! with its next journal commit, seconds later, when the log grew) nor flushes the device's
//! volatile write cache, so the bytes may still be lost with the power. A process crash loses
//! none of it (the kernel still holds them), but a machine crash right after a checkpoint was
//! reported durable can take the checkpoint back, or leave a pointer in the log to a file whose
//! bytes never reached the disk: a group version, or a tree node holding versions of older
//! checkpoints too.
//!
//! sled writes a blob file in the thread that makes the change, before the log record pointing
//! at it, and writes each log buffer to the disk as soon as it is sealed; only the tail of a
//! batch waits in the open buffer for the next write or flush, and sled's recovery drops a
//! batch whose end did not reach the disk, whole. So the store syncs every blob file sled has
//! written since the last time (and the directory) before and right after each batch it
//! applies, before anything else is written, and the tail that completes the batch reaches the
//! disk only after the files it points at. One thread in the tree at a time
//! (`Store::exclusive`), reading or writing: another thread's write or flush could seal that
//! tail first, and sled's reads write too. A write leaves the split of a node it made overfull
//! (the merge of one it made underfull) to the next traversal through it, which may be a read,
//! and a split writes a node out, to a blob file when it is large; so a read writes only
//! between two of the store's writes, and as its outermost hold ends the store syncs any blob
//! file written since the store opened that no pass synced (`Durability::sync_blobs_if_new`),
//! before anything else can write the records pointing at it. A record that a read's own
//! later write seals into a full log buffer goes out at once, moments before that sync (a
//! node pointing at a missing file if the machine crashes in between): sled 0.34 gives no way
//! to hold it back. A blob file still being written when a pass lists it (sled's own threads
//! only delete) is synced again on the next pass if its length changed since. After each
//! flush the store syncs the log file itself (`fdatasync`: its bytes and length, through the
//! device's cache). It also flushes and syncs everything written so far before each batch
//! and before it advances the log
//! (`reclaim`): sled reuses a log segment once the writes that replaced what it held passed
//! its own `sync_file_range`, which may leave them in the device's cache, so a batch's or the
//! filler's writes could otherwise overwrite on the disk what the last durable checkpoint
//! needs while its replacement is not yet there. A new store's configuration file and
//! directory are synced once it is made; when the store is dropped it flushes and syncs as
//! after a checkpoint, before sled's own flush.
//!
//! A sync that fails fails the write, and every one after it: the kernel may have dropped the
//! pages it could not write, and a later sync of the same file would succeed without them, so
//! the store never again reports a checkpoint durable in this process
//! (`StoreError::SyncFailed`, which stops the service; a restart opens the store from what is
//! on the disk). A file that cannot be listed or opened fails only that write.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The outcome of an `fsync` of `path`: a failure is [`SyncError::Failed`].
fn sync(outcome: std::io::Result<()>, path: &Path) -> Result<(), SyncError> {
    outcome.map_err(|e| SyncError::Failed(format!("syncing {}: {e}", path.display())))
}

/// The syncs sled's flush leaves to the store, for the sled database in one directory.
#[derive(Debug)]
pub(super) struct Durability {
    dir: PathBuf,
    /// The highest name (log sequence number) of the blob files there when the store opened:
    /// sled names new ones higher. A read syncs only files above it (`sync_blobs_if_new`).
    opened_at: u64,
    state: Mutex<State>,
    /// Tests: how many times the log file was synced.
    #[cfg(test)]
    log_syncs: std::sync::atomic::AtomicUsize,
    /// Tests: how many times `assert_all_synced` checked.
    #[cfg(test)]
    checks: std::sync::atomic::AtomicUsize,
}

#[derive(Debug, Default)]
struct State {
    /// The blob files synced already (the ones still on disk at the last pass), by name, with
    /// their length before the sync.
    synced: HashMap<u64, u64>,
    /// The first sync that failed, if one did.
    failed: Option<String>,
    /// Tests: the log file's length when it was last synced.
    #[cfg(test)]
    log_len: Option<u64>,
}

/// Why a sync did not happen.
#[derive(Debug)]
pub(super) enum SyncError {
    /// A file could not be listed or opened: nothing was lost.
    Io(std::io::Error),
    /// A sync failed (now or earlier in this process): what it was writing may not be on the
    /// disk.
    Failed(String),
}

impl std::fmt::Display for SyncError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SyncError::Io(e) => e.fmt(f),
            SyncError::Failed(first) => f.write_str(first),
        }
    }
}

/// `e` naming what was done to which file.
fn naming(e: std::io::Error, what: &str, path: &Path) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

/// The log sequence number a blob file is named by; `None` for anything that is not sled's.
fn lsn_of(entry: &std::fs::DirEntry) -> Option<u64> {
    entry.file_name().to_str()?.parse::<u64>().ok()
}

/// The log sequence numbers of the blob files in the sled database in `dir`; none when the
/// directory cannot be listed.
fn blob_names(dir: &Path) -> impl Iterator<Item = u64> {
    std::fs::read_dir(dir.join("blobs"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| lsn_of(&entry))
}

/// Opens `path` for a sync.
fn open(path: &Path) -> Result<std::fs::File, SyncError> {
    std::fs::File::open(path).map_err(|e| SyncError::Io(naming(e, "opening", path)))
}

impl Durability {
    /// For the sled database in `dir` (its files `conf`, `db` and `blobs/`).
    pub(super) fn new(dir: &Path) -> Self {
        Durability {
            dir: dir.to_path_buf(),
            opened_at: blob_names(dir).max().unwrap_or(0),
            state: Mutex::default(),
            #[cfg(test)]
            log_syncs: Default::default(),
            #[cfg(test)]
            checks: Default::default(),
        }
    }

    /// Syncs every blob file not synced yet, then the directory naming them; returns how many
    /// files it synced. A file sled removed meanwhile is passed over.
    pub(super) fn sync_new_blobs(&self) -> Result<usize, SyncError> {
        self.guarded(|state| {
            let blobs = self.dir.join("blobs");
            let listing = |e| SyncError::Io(naming(e, "listing", &blobs));
            let entries = match std::fs::read_dir(&blobs) {
                Ok(entries) => entries,
                // a store sled never wrote a blob file for (sled makes the directory on open)
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
                Err(e) => return Err(listing(e)),
            };
            let mut present = HashMap::with_capacity(state.synced.len());
            let mut count = 0;
            for entry in entries {
                let entry = entry.map_err(listing)?;
                let Some(lsn) = lsn_of(&entry) else {
                    continue;
                };
                let path = entry.path();
                // replaced, and deleted by sled since the listing: passed over
                let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
                // the length before the sync: bytes written after it make the file longer
                let len = match entry.metadata() {
                    Ok(m) => m.len(),
                    Err(e) if gone(&e) => continue,
                    Err(e) => return Err(SyncError::Io(naming(e, "reading", &path))),
                };
                if state.synced.get(&lsn) != Some(&len) {
                    let file = match std::fs::File::open(&path) {
                        Ok(file) => file,
                        Err(e) if gone(&e) => continue,
                        Err(e) => return Err(SyncError::Io(naming(e, "opening", &path))),
                    };
                    sync(file.sync_data(), &path)?;
                    count += 1;
                }
                present.insert(lsn, len);
            }
            if count > 0 {
                sync(open(&blobs)?.sync_all(), &blobs)?;
            }
            state.synced = present;
            Ok(count)
        })
    }

    /// [`Durability::sync_new_blobs`] if a blob file is there that was written since the
    /// store opened and not synced by a pass (names listed only, nothing opened): after a
    /// read, which writes only when it splits or merges a node. Files older than the open
    /// wait for the first write's pass, so a process that only reads syncs nothing it did not
    /// write. Returns how many files it synced.
    pub(super) fn sync_blobs_if_new(&self) -> Result<usize, SyncError> {
        let blobs = self.dir.join("blobs");
        let names = match std::fs::read_dir(&blobs) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(SyncError::Io(naming(e, "listing", &blobs))),
        };
        let new = {
            let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            names
                .flatten()
                .filter_map(|entry| lsn_of(&entry))
                .any(|lsn| lsn > self.opened_at && !state.synced.contains_key(&lsn))
        };
        if new {
            self.sync_new_blobs()
        } else {
            Ok(0)
        }
    }

    /// Syncs what sled wrote when it made the database (its configuration file, which it does
    /// not sync) and the directory naming its files.
    pub(super) fn sync_created(&self) -> Result<(), SyncError> {
        self.guarded(|_| {
            let conf = self.dir.join("conf");
            sync(open(&conf)?.sync_all(), &conf)?;
            sync(open(&self.dir)?.sync_all(), &self.dir)
        })
    }

    /// Syncs sled's log file, its length included (`fdatasync`): sled's flush only wrote its
    /// bytes out (`sync_file_range`), which persists neither the length nor past the device's
    /// volatile write cache.
    pub(super) fn sync_log(&self) -> Result<(), SyncError> {
        self.guarded(|_state| {
            let log = self.dir.join("db");
            let file = open(&log)?;
            sync(file.sync_data(), &log)?;
            #[cfg(test)]
            {
                _state.log_len = file.metadata().ok().map(|m| m.len());
                self.log_syncs
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(())
        })
    }

    /// Runs `sync` unless a sync failed before, and remembers a sync that fails.
    fn guarded<T>(
        &self,
        sync: impl FnOnce(&mut State) -> Result<T, SyncError>,
    ) -> Result<T, SyncError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(first) = &state.failed {
            return Err(SyncError::Failed(format!(
                "earlier in this process: {first}"
            )));
        }
        let outcome = sync(&mut state);
        if let Err(SyncError::Failed(first)) = &outcome {
            state.failed = Some(first.clone());
        }
        outcome
    }

    /// Panics if a blob file on disk was not synced (tests: every write checks it where the
    /// order matters).
    #[cfg(test)]
    pub(super) fn assert_all_synced(&self, at: &str) {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let Ok(entries) = std::fs::read_dir(self.dir.join("blobs")) else {
            return;
        };
        for entry in entries.flatten() {
            if let Some(lsn) = lsn_of(&entry) {
                let len = match entry.metadata() {
                    Ok(m) => m.len(),
                    // deleted since the listing (sled removes replaced files from its own
                    // threads): nothing left to sync
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => panic!("reading blob file {lsn}: {e}"),
                };
                assert_eq!(
                    state.synced.get(&lsn).copied(),
                    Some(len),
                    "blob file {lsn} not synced as it is {at}"
                );
            }
        }
        self.checks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// How many times `assert_all_synced` checked.
    #[cfg(test)]
    pub(super) fn checks(&self) -> usize {
        self.checks.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The log file's length when it was last synced.
    #[cfg(test)]
    pub(super) fn log_synced_len(&self) -> Option<u64> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.log_len
    }

    /// How many times the log file was synced.
    #[cfg(test)]
    pub(super) fn log_syncs(&self) -> usize {
        self.log_syncs.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether a sync failed in this process.
    pub(super) fn failed(&self) -> bool {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.failed.is_some()
    }

    /// Tests: as if a sync had failed.
    #[cfg(test)]
    pub(super) fn fail_for_test(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.failed = Some("a failure a test made".into());
    }

    /// Whether blob file `lsn` was synced.
    #[cfg(test)]
    pub(super) fn was_synced(&self, lsn: u64) -> bool {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.synced.contains_key(&lsn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_blob_files_are_synced_once_and_other_files_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blobs = dir.path().join("blobs");
        let d = Durability::new(dir.path());
        // no blob directory yet
        assert_eq!(d.sync_new_blobs().expect("sync"), 0);
        std::fs::create_dir(&blobs).expect("mkdir");
        for name in ["17", "3", "not-a-blob"] {
            std::fs::write(blobs.join(name), b"x").expect("write");
        }
        assert_eq!(d.sync_new_blobs().expect("sync"), 2);
        assert!(d.was_synced(17) && d.was_synced(3));
        // nothing new: nothing synced again
        assert_eq!(d.sync_new_blobs().expect("sync"), 0);
        // one new, one gone (sled removed it): only the new one, and the gone one forgotten
        std::fs::write(blobs.join("40"), b"x").expect("write");
        std::fs::remove_file(blobs.join("3")).expect("remove");
        assert_eq!(d.sync_new_blobs().expect("sync"), 1);
        assert!(d.was_synced(40) && !d.was_synced(3));
        // one synced while it was still being written: synced again once it grew
        std::fs::write(blobs.join("17"), b"xy").expect("write");
        assert_eq!(d.sync_new_blobs().expect("sync"), 1);
        assert_eq!(d.sync_new_blobs().expect("sync"), 0);
    }

    #[test]
    fn a_pass_after_a_read_runs_only_when_a_blob_file_is_new_since_the_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blobs = dir.path().join("blobs");
        assert_eq!(
            Durability::new(dir.path())
                .sync_blobs_if_new()
                .expect("sync"),
            0
        );
        std::fs::create_dir(&blobs).expect("mkdir");
        // there when the store opened: left to the first write's pass
        std::fs::write(blobs.join("3"), b"x").expect("write");
        let d = Durability::new(dir.path());
        assert_eq!(d.sync_blobs_if_new().expect("sync"), 0);
        assert!(!d.was_synced(3));
        // written since: the pass syncs it and the older one
        std::fs::write(blobs.join("5"), b"x").expect("write");
        assert_eq!(d.sync_blobs_if_new().expect("sync"), 2);
        assert!(d.was_synced(5) && d.was_synced(3));
        // nothing new (a longer known file waits for the next full pass): nothing synced
        std::fs::write(blobs.join("5"), b"xy").expect("write");
        std::fs::write(blobs.join("not-a-blob"), b"x").expect("write");
        assert_eq!(d.sync_blobs_if_new().expect("sync"), 0);
        // a new one: the pass syncs it and the longer one
        std::fs::write(blobs.join("9"), b"x").expect("write");
        assert_eq!(d.sync_blobs_if_new().expect("sync"), 2);
    }

    #[test]
    fn a_file_that_cannot_be_opened_fails_only_that_sync() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blobs = dir.path().join("blobs");
        std::fs::create_dir(&blobs).expect("mkdir");
        std::fs::write(dir.path().join("db"), b"log").expect("write");
        let d = Durability::new(dir.path());
        // a blob name that cannot be opened (a socket)
        let socket = std::os::unix::net::UnixListener::bind(blobs.join("9")).expect("bind");
        match d.sync_new_blobs() {
            Err(SyncError::Io(e)) => assert!(e.to_string().contains("opening"), "{e}"),
            other => panic!("{other:?}"),
        }
        drop(socket);
        std::fs::remove_file(blobs.join("9")).expect("remove");
        // nothing was lost: the next syncs go ahead
        d.sync_log().expect("sync after a failed open");
        d.sync_new_blobs().expect("sync after a failed open");
    }

    #[test]
    fn a_failed_sync_fails_every_sync_after_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("db"), b"log").expect("write");
        let d = Durability::new(dir.path());
        let first = d
            .guarded(|_| sync(Err(std::io::Error::other("an I/O error")), Path::new("x")))
            .expect_err("a failed sync");
        assert!(
            first.to_string().contains("syncing x: an I/O error"),
            "{first}"
        );
        assert!(d.failed());
        // nothing wrong any more, and still refused: the failure may have lost bytes
        for later in [
            d.sync_log().expect_err("refused after a failure"),
            d.sync_new_blobs().map(|_| ()).expect_err("refused"),
            d.sync_created().expect_err("refused"),
        ] {
            match later {
                SyncError::Failed(m) => {
                    assert_eq!(m, "earlier in this process: syncing x: an I/O error")
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_new_database_is_synced_with_its_configuration_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("conf"), b"conf").expect("write");
        Durability::new(dir.path()).sync_created().expect("sync");
        // and it needs the file
        let empty = tempfile::tempdir().expect("tempdir");
        assert!(Durability::new(empty.path()).sync_created().is_err());
    }

    #[test]
    fn the_log_file_is_synced_at_every_pass_whether_or_not_it_grew() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("db"), b"log").expect("write");
        let d = Durability::new(dir.path());
        d.sync_log().expect("sync");
        assert_eq!(d.log_syncs(), 1);
        // the same length (sled overwrote a reused segment in place): synced again, since
        // sled's own `sync_file_range` does not reach through the device's cache
        std::fs::write(dir.path().join("db"), b"LOG").expect("write");
        d.sync_log().expect("sync");
        assert_eq!(d.log_syncs(), 2);
        // grown
        std::fs::write(dir.path().join("db"), b"longer log").expect("write");
        d.sync_log().expect("sync");
        assert_eq!(d.log_syncs(), 3);
        assert_eq!(d.log_synced_len(), Some(10));
        let empty = tempfile::tempdir().expect("tempdir");
        assert!(Durability::new(empty.path()).sync_log().is_err());
    }
}
