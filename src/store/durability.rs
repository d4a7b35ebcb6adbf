//! What a flush of sled 0.34 leaves undone for a checkpoint to survive a machine crash (power
//! loss, a kernel panic, a node that dies), not only a process crash.
//!
//! sled writes a value or tree node larger than a quarter of its log segment to a file of its
//! own under `blobs/` and puts only a pointer to it into its log; it never syncs those files,
//! nor the directory that names them. Its flush syncs the log's bytes (`sync_file_range`) but
//! not the log file's length, which the filesystem records only with its next journal commit
//! (seconds later) when the log grew. A process crash loses neither (the kernel still holds
//! them), but a machine crash right after a checkpoint was reported durable can take the
//! checkpoint back, or leave a pointer in the log to a file whose bytes never reached the
//! disk: a group version, or a tree node holding versions of older checkpoints too.
//!
//! So the store syncs every blob file sled has written since the last time (and the
//! directory) before and after each batch it applies, before anything else is written: the
//! log records that point at those files become durable only with later writes, and a batch
//! whose end is not durable is dropped whole when sled recovers. And after each flush it syncs
//! the log file itself, length included. A new store's configuration file and directory are
//! synced once it is made.
//!
//! A sync that fails fails the write, and every one after it: the kernel may have dropped the
//! pages it could not write, and a later sync of the same file would succeed without them, so
//! the store never again reports a checkpoint durable in this process (a restart opens the
//! store from what is on the disk).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The syncs sled's flush leaves to the store, for the sled database in one directory.
#[derive(Debug)]
pub(super) struct Durability {
    dir: PathBuf,
    state: Mutex<State>,
    /// Tests: how many times the log file was synced.
    #[cfg(test)]
    log_syncs: std::sync::atomic::AtomicUsize,
}

#[derive(Debug, Default)]
struct State {
    /// The names of the blob files synced already (the ones still on disk at the last pass).
    synced: HashSet<u64>,
    /// The first sync that failed, if one did.
    failed: Option<String>,
}

impl Durability {
    /// For the sled database in `dir` (its files `conf`, `db` and `blobs/`).
    pub(super) fn new(dir: &Path) -> Self {
        Durability {
            dir: dir.to_path_buf(),
            state: Mutex::default(),
            #[cfg(test)]
            log_syncs: Default::default(),
        }
    }

    /// Syncs every blob file not synced yet, then the directory naming them; returns how many
    /// files it synced. A file sled removed meanwhile is passed over.
    pub(super) fn sync_new_blobs(&self) -> std::io::Result<usize> {
        self.guarded(|state| {
            let blobs = self.dir.join("blobs");
            let entries = match std::fs::read_dir(&blobs) {
                Ok(entries) => entries,
                // a store sled never wrote a blob file for (sled makes the directory on open)
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
                Err(e) => return Err(e),
            };
            let mut present = HashSet::with_capacity(state.synced.len());
            let mut count = 0;
            for entry in entries {
                let entry = entry?;
                // sled names its blob files by log sequence number; anything else is not sled's
                let name = entry.file_name();
                let Some(lsn) = name.to_str().and_then(|n| n.parse::<u64>().ok()) else {
                    continue;
                };
                if !state.synced.contains(&lsn) {
                    match std::fs::File::open(entry.path()).and_then(|f| f.sync_data()) {
                        Ok(()) => count += 1,
                        // replaced, and deleted by sled since the listing
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(e),
                    }
                }
                present.insert(lsn);
            }
            if count > 0 {
                std::fs::File::open(&blobs)?.sync_all()?;
            }
            state.synced = present;
            Ok(count)
        })
    }

    /// Syncs what sled wrote when it made the database (its configuration file, which it does
    /// not sync) and the directory naming its files.
    pub(super) fn sync_created(&self) -> std::io::Result<()> {
        self.guarded(|_| {
            std::fs::File::open(self.dir.join("conf"))?.sync_all()?;
            std::fs::File::open(&self.dir)?.sync_all()
        })
    }

    /// Syncs sled's log file, its length included.
    pub(super) fn sync_log(&self) -> std::io::Result<()> {
        self.guarded(|_| {
            std::fs::File::open(self.dir.join("db"))?.sync_all()?;
            #[cfg(test)]
            self.log_syncs
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        })
    }

    /// Runs `sync` unless a sync failed before, and remembers its failure.
    fn guarded<T>(
        &self,
        sync: impl FnOnce(&mut State) -> std::io::Result<T>,
    ) -> std::io::Result<T> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(first) = &state.failed {
            return Err(std::io::Error::other(format!(
                "an earlier sync of the store's files failed ({first}); what it was writing may not be on the disk, so no checkpoint counts as durable until the process restarts"
            )));
        }
        let outcome = sync(&mut state);
        if let Err(e) = &outcome {
            state.failed = Some(format!("{e}, in {}", self.dir.display()));
        }
        outcome
    }

    /// How many times the log file was synced.
    #[cfg(test)]
    pub(super) fn log_syncs(&self) -> usize {
        self.log_syncs.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether blob file `lsn` was synced.
    #[cfg(test)]
    pub(super) fn was_synced(&self, lsn: u64) -> bool {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.synced.contains(&lsn)
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
    }

    #[test]
    fn a_failed_sync_fails_every_sync_after_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blobs = dir.path().join("blobs");
        std::fs::create_dir(&blobs).expect("mkdir");
        std::fs::write(dir.path().join("db"), b"log").expect("write");
        let d = Durability::new(dir.path());
        d.sync_log().expect("a log file to sync");
        // a blob name that cannot be opened for a sync (a socket)
        let socket = std::os::unix::net::UnixListener::bind(blobs.join("9")).expect("bind");
        let first = d.sync_new_blobs().expect_err("a socket cannot be synced");
        drop(socket);
        std::fs::remove_file(blobs.join("9")).expect("remove");
        // nothing wrong any more, and still refused: the failure may have lost bytes
        let later = d.sync_log().expect_err("refused after a failure");
        assert!(later.to_string().contains(&first.to_string()), "{later}");
        assert!(d.sync_new_blobs().is_err());
        assert!(d.sync_created().is_err());
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
    fn syncing_the_log_needs_the_log_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("db"), b"log").expect("write");
        let d = Durability::new(dir.path());
        d.sync_log().expect("sync");
        assert_eq!(d.log_syncs(), 1);
        let empty = tempfile::tempdir().expect("tempdir");
        assert!(Durability::new(empty.path()).sync_log().is_err());
    }
}
