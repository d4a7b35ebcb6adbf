//! Group versions in pack files beside sled (store format 6).
//!
//! A checkpoint appends the sealed values of the groups it changed, one after another, to a
//! file of its own, `packs/<checkpoint id>`, and those of the groups it carries (`versions`:
//! unchanged groups moved out of a pack the others left) to a second one,
//! `packs/<checkpoint id>c`, so that groups which stopped changing sit together and are moved
//! again only once more than half of that pack was replaced. Each file is made durable (`fdatasync`, then the
//! directory's `fsync` for its name) before the sled batch that points into it: a group
//! version's sled value is then a [`Locator`] (which of the two files, offset and length),
//! sealed. A pack is never changed once written. Once no group version points into a pack any
//! more (retention reclaimed them, or the checkpoint never completed), it is deleted, after the
//! batch that removed the last one is durable; a deletion a crash undoes is done again by the
//! next prune.
//!
//! sled then holds small values only (locators, metadata, history), so its log no longer holds
//! the state and the previous images of the leaves that held it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// The directory of the packs, inside the store's.
pub(super) const PACKS_DIR: &str = "packs";

/// How many read handles a store keeps open at once.
const OPEN_HANDLES: usize = 64;

/// A pack's buffered writes.
const WRITE_BUFFER: usize = 1 << 20;

/// The first four bytes of a sealed locator's payload, for a value in the pack of the groups
/// its checkpoint changed and in that of the groups it carried: no group value starts with
/// either (they would announce 2^32 - 1 or 2^32 - 2 entries, more than a group can hold).
const LOCATOR_MARK: [u8; 4] = [0xFF; 4];
const CARRIED_MARK: [u8; 4] = [0xFF, 0xFF, 0xFF, 0xFE];

/// One pack file: of the groups checkpoint `version` changed, or of those it carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct PackName {
    pub(super) version: u64,
    pub(super) carried: bool,
}

impl PackName {
    fn file_name(self) -> String {
        if self.carried {
            format!("{}c", self.version)
        } else {
            self.version.to_string()
        }
    }

    fn parse(name: &str) -> Option<PackName> {
        let (digits, carried) = match name.strip_suffix('c') {
            Some(digits) => (digits, true),
            None => (name, false),
        };
        // digits only: "+7" or "07" are not pack names
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let version: u64 = digits.parse().ok()?;
        (version.to_string() == digits).then_some(PackName { version, carried })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("cannot {op} pack file {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where a group version's value lies in its checkpoint's packs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Locator {
    /// In the pack of the groups the checkpoint carried, not of those it changed.
    pub(super) carried: bool,
    pub(super) offset: u64,
    pub(super) len: u32,
}

impl Locator {
    /// The pack it points into, for a version of checkpoint `version`.
    pub(super) fn pack(self, version: u64) -> PackName {
        PackName {
            version,
            carried: self.carried,
        }
    }

    /// The locator as the payload of a sled value (to be sealed).
    pub(super) fn to_payload(self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[0..4].copy_from_slice(if self.carried {
            &CARRIED_MARK
        } else {
            &LOCATOR_MARK
        });
        out[4..12].copy_from_slice(&self.offset.to_be_bytes());
        out[12..16].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    /// The locator a sled value holds, sealed; `None` for a value held in sled itself (a
    /// group's entries, or an emptied group) and for a damaged one.
    pub(super) fn in_value(raw: &[u8]) -> Option<Locator> {
        super::codec::unseal(raw).and_then(Locator::from_payload)
    }

    /// The locator an unsealed sled value holds; `None` for a value held in sled itself (a
    /// group's entries, or an emptied group).
    pub(super) fn from_payload(payload: &[u8]) -> Option<Locator> {
        if payload.len() != 16 {
            return None;
        }
        let carried = match payload[0..4].try_into().ok()? {
            LOCATOR_MARK => false,
            CARRIED_MARK => true,
            _ => return None,
        };
        let offset = u64::from_be_bytes(payload[4..12].try_into().ok()?);
        let len = u32::from_be_bytes(payload[12..16].try_into().ok()?);
        Some(Locator {
            carried,
            offset,
            len,
        })
    }
}

/// A value read from a pack, or why it cannot be.
#[derive(Debug)]
pub(super) enum Read {
    Value(Vec<u8>),
    /// The pack is missing or shorter than the locator says: the version is damaged.
    Damaged(String),
}

/// The packs of one store: writes new ones, reads values, deletes those no version needs.
pub(super) struct Packs {
    dir: PathBuf,
    /// Read handles by pack, dropped when the pack is rewritten or deleted.
    open: parking_lot::Mutex<HashMap<PackName, Arc<File>>>,
    /// Whether the store's directory was synced since the packs directory was made (or found),
    /// so that the directory's name is durable before anything points into it.
    dir_synced: AtomicBool,
    /// Packs being written that hold appended values not yet synced: no batch may be applied
    /// while there are any (`Store::apply` checks it in debug builds).
    unsynced: Arc<AtomicUsize>,
}

impl Packs {
    /// The packs of the store at `store_dir` (the directory is made with the first pack).
    pub(super) fn new(store_dir: &Path) -> Packs {
        Packs {
            dir: store_dir.join(PACKS_DIR),
            open: Default::default(),
            dir_synced: AtomicBool::new(false),
            unsynced: Default::default(),
        }
    }

    pub(super) fn path_of(&self, name: PackName) -> PathBuf {
        self.dir.join(name.file_name())
    }

    /// Packs being written with values appended since their last sync.
    pub(super) fn unsynced(&self) -> usize {
        self.unsynced.load(Ordering::SeqCst)
    }

    /// Makes the packs directory if it is not there, and its name durable.
    fn make_dir(&self) -> Result<(), PackError> {
        if self.dir_synced.load(Ordering::SeqCst) {
            return Ok(());
        }
        let io = |op, source| PackError::Io {
            op,
            path: self.dir.clone(),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(|e| io("make the directory of", e))?;
        if let Some(parent) = self.dir.parent() {
            sync_dir(parent).map_err(|e| io("sync the store directory for", e))?;
        }
        self.dir_synced.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Starts pack `name`, replacing what a write of the same checkpoint that never completed
    /// left (a new file: a copy of the store that links the old one keeps it).
    pub(super) fn create(&self, name: PackName) -> Result<PackWriter, PackError> {
        self.make_dir()?;
        let path = self.path_of(name);
        let io = |op, source| PackError::Io {
            op,
            path: path.clone(),
            source,
        };
        self.open.lock().remove(&name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("replace", e)),
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| io("create", e))?;
        Ok(PackWriter {
            file: BufWriter::with_capacity(WRITE_BUFFER, file),
            path,
            offset: 0,
            dirty: false,
            unsynced: self.unsynced.clone(),
        })
    }

    /// The value at `at` in pack `name`.
    pub(super) fn read(&self, name: PackName, at: Locator) -> Result<Read, PackError> {
        let path = self.path_of(name);
        let file = {
            let mut open = self.open.lock();
            match open.get(&name) {
                Some(f) => f.clone(),
                None => match File::open(&path) {
                    Ok(f) => {
                        if open.len() >= OPEN_HANDLES {
                            open.clear();
                        }
                        let f = Arc::new(f);
                        open.insert(name, f.clone());
                        f
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Ok(Read::Damaged(format!(
                            "its pack file {} is missing",
                            path.display()
                        )))
                    }
                    Err(source) => {
                        return Err(PackError::Io {
                            op: "open",
                            path,
                            source,
                        })
                    }
                },
            }
        };
        let mut value = vec![0u8; at.len as usize];
        match file.read_exact_at(&mut value, at.offset) {
            Ok(()) => Ok(Read::Value(value)),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(Read::Damaged(format!(
                "its pack file {} ends before byte {} of the value the store points at",
                path.display(),
                at.offset + u64::from(at.len)
            ))),
            Err(source) => Err(PackError::Io {
                op: "read",
                path,
                source,
            }),
        }
    }

    /// The packs on disk, in order (files of other names are left alone).
    pub(super) fn names(&self) -> Result<BTreeSet<PackName>, PackError> {
        let io = |op, source| PackError::Io {
            op,
            path: self.dir.clone(),
            source,
        };
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
            Err(e) => return Err(io("list the directory of", e)),
        };
        let mut names = BTreeSet::new();
        for entry in entries {
            let entry = entry.map_err(|e| io("list the directory of", e))?;
            if let Some(name) = entry.file_name().to_str().and_then(PackName::parse) {
                names.insert(name);
            }
        }
        Ok(names)
    }

    /// Deletes every pack not in `needed`; returns how many it deleted (or the first failure,
    /// once every one was tried).
    pub(super) fn delete_unneeded(&self, needed: &BTreeSet<PackName>) -> Result<usize, PackError> {
        let mut deleted = 0;
        // every one tried; the first failure reported
        let mut failed = None;
        for name in self.names()?.difference(needed) {
            self.open.lock().remove(name);
            let path = self.path_of(*name);
            match std::fs::remove_file(&path) {
                Ok(()) => deleted += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    failed.get_or_insert(PackError::Io {
                        op: "delete",
                        path,
                        source,
                    });
                }
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(deleted),
        }
    }

    /// Bytes the packs take on disk.
    pub(super) fn bytes(&self) -> Result<u64, PackError> {
        Ok(self.sizes()?.values().sum())
    }

    /// Each pack's length.
    pub(super) fn sizes(&self) -> Result<BTreeMap<PackName, u64>, PackError> {
        let mut sizes = BTreeMap::new();
        for name in self.names()? {
            let path = self.path_of(name);
            match std::fs::metadata(&path) {
                Ok(m) => {
                    sizes.insert(name, m.len());
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(PackError::Io {
                        op: "measure",
                        path,
                        source,
                    })
                }
            }
        }
        Ok(sizes)
    }

    /// Links (or, where links cannot be made, copies) every pack into `to`'s packs directory,
    /// synced: packs never change once written (a rewrite makes a new file), so a copy of the
    /// store shares them.
    pub(super) fn link_into(&self, to: &Path) -> Result<(), PackError> {
        let names = self.names()?;
        if names.is_empty() {
            return Ok(());
        }
        let target = Packs::new(to);
        target.make_dir()?;
        for name in names {
            let (from, dest) = (self.path_of(name), target.path_of(name));
            if std::fs::hard_link(&from, &dest).is_err() {
                std::fs::copy(&from, &dest).map_err(|source| PackError::Io {
                    op: "copy",
                    path: from.clone(),
                    source,
                })?;
                File::open(&dest)
                    .and_then(|f| f.sync_all())
                    .map_err(|source| PackError::Io {
                        op: "sync",
                        path: dest.clone(),
                        source,
                    })?;
            }
        }
        sync_dir(&target.dir).map_err(|source| PackError::Io {
            op: "sync the directory of",
            path: target.dir.clone(),
            source,
        })
    }
}

/// A pack being written.
pub(super) struct PackWriter {
    file: BufWriter<File>,
    path: PathBuf,
    offset: u64,
    /// Values appended since the last sync (counted in `unsynced`).
    dirty: bool,
    unsynced: Arc<AtomicUsize>,
}

impl PackWriter {
    /// Appends `value` and returns where it lies (`carried`: in the pack of carried groups).
    pub(super) fn append(&mut self, value: &[u8], carried: bool) -> Result<Locator, PackError> {
        let len = u32::try_from(value.len()).map_err(|_| PackError::Io {
            op: "append to",
            path: self.path.clone(),
            source: std::io::Error::other(format!(
                "a group value of {} bytes, past the 4 GiB a pack locates",
                value.len()
            )),
        })?;
        if !self.dirty {
            self.dirty = true;
            self.unsynced.fetch_add(1, Ordering::SeqCst);
        }
        self.file.write_all(value).map_err(|source| PackError::Io {
            op: "write",
            path: self.path.clone(),
            source,
        })?;
        let at = Locator {
            carried,
            offset: self.offset,
            len,
        };
        self.offset += u64::from(len);
        Ok(at)
    }

    /// Makes what was appended durable, the file's name included.
    pub(super) fn sync(&mut self) -> Result<(), PackError> {
        if !self.dirty {
            return Ok(());
        }
        let io = |op, source| PackError::Io {
            op,
            path: self.path.clone(),
            source,
        };
        self.file.flush().map_err(|e| io("write", e))?;
        self.file.get_ref().sync_data().map_err(|e| io("sync", e))?;
        if let Some(dir) = self.path.parent() {
            sync_dir(dir).map_err(|e| io("sync the directory of", e))?;
        }
        self.dirty = false;
        self.unsynced.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
}

impl Drop for PackWriter {
    /// A pack given up unsynced (its write failed) is no longer one a batch could point into.
    fn drop(&mut self) {
        if self.dirty {
            self.unsynced.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::store) fn changed(version: u64) -> PackName {
        PackName {
            version,
            carried: false,
        }
    }

    pub(in crate::store) fn carried(version: u64) -> PackName {
        PackName {
            version,
            carried: true,
        }
    }

    #[test]
    fn a_locator_round_trips_and_no_group_value_reads_as_one() {
        for carried in [false, true] {
            let at = Locator {
                carried,
                offset: 1 << 40,
                len: 77,
            };
            assert_eq!(Locator::from_payload(&at.to_payload()), Some(at));
            // one byte more or less is not a locator
            assert_eq!(Locator::from_payload(&at.to_payload()[..15]), None);
        }
        // a group value: its entry count, then its blob
        let mut group = 3u32.to_be_bytes().to_vec();
        group.extend_from_slice(&[0xFF; 12]);
        assert_eq!(Locator::from_payload(&group), None);
        assert_eq!(Locator::from_payload(&[]), None);
    }

    #[test]
    fn pack_names_are_the_checkpoint_id_and_a_c_for_carried_groups() {
        for name in [changed(0), changed(42), carried(42), carried(u64::MAX)] {
            assert_eq!(PackName::parse(&name.file_name()), Some(name));
        }
        for other in [
            "",
            "c",
            "+7",
            "07",
            "7cc",
            "x7",
            "18446744073709551616",
            "notes.txt",
        ] {
            assert_eq!(PackName::parse(other), None, "{other:?}");
        }
    }

    #[test]
    fn values_appended_to_a_pack_read_back_and_a_short_or_missing_pack_is_damage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let packs = Packs::new(dir.path());
        let mut w = packs.create(changed(7)).expect("create");
        let a = w.append(b"first value", false).expect("append");
        let b = w.append(b"second", false).expect("append");
        w.sync().expect("sync");
        drop(w);
        for (at, want) in [(a, &b"first value"[..]), (b, b"second")] {
            match packs.read(changed(7), at).expect("read") {
                Read::Value(v) => assert_eq!(v, want),
                Read::Damaged(d) => panic!("damaged: {d}"),
            }
        }
        let past = Locator {
            len: b.len + 1,
            ..b
        };
        assert!(
            matches!(packs.read(changed(7), past).expect("read"), Read::Damaged(d) if d.contains("ends before"))
        );
        assert!(
            matches!(packs.read(carried(7), a).expect("read"), Read::Damaged(d) if d.contains("missing"))
        );
        assert_eq!(packs.names().expect("names"), BTreeSet::from([changed(7)]));
        assert_eq!(packs.bytes().expect("bytes"), 17);
    }

    #[test]
    fn a_pack_counts_as_unsynced_from_its_first_value_until_its_sync_or_its_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        let packs = Packs::new(dir.path());
        let mut w = packs.create(changed(1)).expect("create");
        assert_eq!(packs.unsynced(), 0, "nothing appended yet");
        w.append(b"v", false).expect("append");
        w.append(b"w", false).expect("append");
        assert_eq!(packs.unsynced(), 1);
        w.sync().expect("sync");
        assert_eq!(packs.unsynced(), 0);
        w.append(b"x", false).expect("append");
        let mut other = packs.create(carried(1)).expect("create");
        other.append(b"y", true).expect("append");
        assert_eq!(packs.unsynced(), 2);
        // a write given up
        drop(other);
        assert_eq!(packs.unsynced(), 1);
        w.sync().expect("sync");
        assert_eq!(packs.unsynced(), 0);
    }

    #[test]
    fn unneeded_packs_are_deleted_and_a_rewritten_pack_is_read_afresh() {
        let dir = tempfile::tempdir().expect("tempdir");
        let packs = Packs::new(dir.path());
        for name in [changed(1), changed(2), carried(2), changed(3)] {
            let mut w = packs.create(name).expect("create");
            w.append(
                format!("pack {}", name.file_name()).as_bytes(),
                name.carried,
            )
            .expect("append");
            w.sync().expect("sync");
        }
        let at = Locator {
            carried: false,
            offset: 0,
            len: 6,
        };
        assert!(
            matches!(packs.read(changed(2), at).expect("read"), Read::Value(v) if v == b"pack 2")
        );
        std::fs::write(dir.path().join(PACKS_DIR).join("notes.txt"), "kept").expect("write");
        let needed = BTreeSet::from([changed(2), carried(2)]);
        assert_eq!(packs.delete_unneeded(&needed).expect("delete"), 2);
        assert_eq!(packs.names().expect("names"), needed);
        assert!(dir.path().join(PACKS_DIR).join("notes.txt").exists());
        // a pack written again under its name (a write that never completed, then retried) is
        // read from the new file, not from a handle to the old one
        let mut w = packs.create(changed(2)).expect("create");
        w.append(b"again!", false).expect("append");
        w.sync().expect("sync");
        assert!(
            matches!(packs.read(changed(2), at).expect("read"), Read::Value(v) if v == b"again!")
        );
    }

    #[test]
    fn a_copy_of_the_store_shares_its_packs_and_a_rewrite_of_one_leaves_the_copy_its_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        let packs = Packs::new(&dir.path().join("a"));
        let mut w = packs.create(changed(4)).expect("create");
        let at = w.append(b"shared", false).expect("append");
        w.sync().expect("sync");
        let copy_dir = dir.path().join("b");
        packs.link_into(&copy_dir).expect("link");
        let copy = Packs::new(&copy_dir);
        // the store writes checkpoint 4 again: the copy keeps what it linked
        let mut w = packs.create(changed(4)).expect("create");
        w.append(b"REWRITTEN", false).expect("append");
        w.sync().expect("sync");
        assert!(
            matches!(copy.read(changed(4), at).expect("read"), Read::Value(v) if v == b"shared")
        );
        packs.delete_unneeded(&BTreeSet::new()).expect("delete");
        assert!(
            matches!(copy.read(changed(4), at).expect("read"), Read::Value(v) if v == b"shared")
        );
    }
}
