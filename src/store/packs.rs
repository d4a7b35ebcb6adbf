//! Group versions in pack files beside sled (store format 6).
//!
//! A checkpoint appends the sealed values of the groups it changed, one after another, to a
//! file of its own, `packs/<checkpoint id>`; makes the file durable (`fdatasync`, then the
//! directory's `fsync` for its name); and only then writes the sled batch that points into it:
//! a group version's sled value is a [`Locator`] (offset and length in the pack of the
//! checkpoint that wrote the version), sealed. A pack is never changed once written. Once no
//! group version of a checkpoint is left in sled (retention reclaimed them, or the checkpoint
//! never completed), its pack is deleted, after the batch that removed the last version is
//! durable; a deletion a crash undoes is done again by the next prune.
//!
//! sled then holds small values only (locators, metadata, history), so its log no longer holds
//! the state and the previous images of the leaves that held it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The directory of the packs, inside the store's.
pub(super) const PACKS_DIR: &str = "packs";

/// How many read handles a store keeps open at once.
const OPEN_HANDLES: usize = 64;

/// A pack's buffered writes.
const WRITE_BUFFER: usize = 1 << 20;

/// The first four bytes of a sealed locator's payload: no group value starts with them (they
/// would announce 2^32 - 1 entries, more than a group can hold).
const LOCATOR_MARK: [u8; 4] = [0xFF; 4];

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

/// Where a group version's value lies in its checkpoint's pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Locator {
    pub(super) offset: u64,
    pub(super) len: u32,
}

impl Locator {
    /// The locator as the payload of a sled value (to be sealed).
    pub(super) fn to_payload(self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[0..4].copy_from_slice(&LOCATOR_MARK);
        out[4..12].copy_from_slice(&self.offset.to_be_bytes());
        out[12..16].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    /// The locator an unsealed sled value holds; `None` for a value held in sled itself (a
    /// group's entries, or an emptied group).
    pub(super) fn from_payload(payload: &[u8]) -> Option<Locator> {
        if payload.len() != 16 || payload[0..4] != LOCATOR_MARK {
            return None;
        }
        let offset = u64::from_be_bytes(payload[4..12].try_into().ok()?);
        let len = u32::from_be_bytes(payload[12..16].try_into().ok()?);
        Some(Locator { offset, len })
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
    open: parking_lot::Mutex<HashMap<u64, Arc<File>>>,
}

impl Packs {
    /// The packs of the store at `store_dir` (the directory is made with the first pack).
    pub(super) fn new(store_dir: &Path) -> Packs {
        Packs {
            dir: store_dir.join(PACKS_DIR),
            open: Default::default(),
        }
    }

    fn path_of(&self, id: u64) -> PathBuf {
        self.dir.join(id.to_string())
    }

    /// Starts the pack of checkpoint `id`, replacing what a write of the same id that never
    /// completed left.
    pub(super) fn create(&self, id: u64) -> Result<PackWriter, PackError> {
        let path = self.path_of(id);
        let io = |op, source| PackError::Io {
            op,
            path: path.clone(),
            source,
        };
        if !self.dir.exists() {
            std::fs::create_dir_all(&self.dir).map_err(|e| io("make the directory of", e))?;
            if let Some(parent) = self.dir.parent() {
                sync_dir(parent).map_err(|e| io("sync the store directory for", e))?;
            }
        }
        self.open.lock().remove(&id);
        let file = File::create(&path).map_err(|e| io("create", e))?;
        Ok(PackWriter {
            file: BufWriter::with_capacity(WRITE_BUFFER, file),
            path,
            offset: 0,
        })
    }

    /// The value at `at` in the pack of checkpoint `id`.
    pub(super) fn read(&self, id: u64, at: Locator) -> Result<Read, PackError> {
        let path = self.path_of(id);
        let file = {
            let mut open = self.open.lock();
            match open.get(&id) {
                Some(f) => f.clone(),
                None => match File::open(&path) {
                    Ok(f) => {
                        if open.len() >= OPEN_HANDLES {
                            open.clear();
                        }
                        let f = Arc::new(f);
                        open.insert(id, f.clone());
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

    /// The ids of the packs on disk, in order (files of other names are left alone).
    pub(super) fn ids(&self) -> Result<BTreeSet<u64>, PackError> {
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
        let mut ids = BTreeSet::new();
        for entry in entries {
            let entry = entry.map_err(|e| io("list the directory of", e))?;
            if let Some(id) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
                ids.insert(id);
            }
        }
        Ok(ids)
    }

    /// Deletes every pack not in `needed`; returns how many it deleted.
    pub(super) fn delete_unneeded(&self, needed: &BTreeSet<u64>) -> Result<usize, PackError> {
        let mut deleted = 0;
        for id in self.ids()?.difference(needed) {
            self.open.lock().remove(id);
            let path = self.path_of(*id);
            match std::fs::remove_file(&path) {
                Ok(()) => deleted += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(PackError::Io {
                        op: "delete",
                        path,
                        source,
                    })
                }
            }
        }
        Ok(deleted)
    }

    /// Bytes the packs take on disk.
    pub(super) fn bytes(&self) -> Result<u64, PackError> {
        Ok(self.sizes()?.values().sum())
    }

    /// Each pack's length, by id.
    pub(super) fn sizes(&self) -> Result<BTreeMap<u64, u64>, PackError> {
        let mut sizes = BTreeMap::new();
        for id in self.ids()? {
            let path = self.path_of(id);
            match std::fs::metadata(&path) {
                Ok(m) => {
                    sizes.insert(id, m.len());
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

    /// Links (or, where links cannot be made, copies) every pack into `to`'s packs directory:
    /// packs never change, so a copy of the store shares them.
    pub(super) fn link_into(&self, to: &Path) -> Result<(), PackError> {
        let target = to.join(PACKS_DIR);
        let ids = self.ids()?;
        if ids.is_empty() {
            return Ok(());
        }
        std::fs::create_dir_all(&target).map_err(|source| PackError::Io {
            op: "make the directory of",
            path: target.clone(),
            source,
        })?;
        for id in ids {
            let (from, dest) = (self.path_of(id), target.join(id.to_string()));
            if std::fs::hard_link(&from, &dest).is_err() {
                std::fs::copy(&from, &dest).map_err(|source| PackError::Io {
                    op: "copy",
                    path: from.clone(),
                    source,
                })?;
            }
        }
        Ok(())
    }
}

/// A pack being written.
pub(super) struct PackWriter {
    file: BufWriter<File>,
    path: PathBuf,
    offset: u64,
}

impl PackWriter {
    /// Appends `value` and returns where it lies.
    pub(super) fn append(&mut self, value: &[u8]) -> Result<Locator, PackError> {
        let len = u32::try_from(value.len()).map_err(|_| PackError::Io {
            op: "append to",
            path: self.path.clone(),
            source: std::io::Error::other(format!(
                "a group value of {} bytes, past the 4 GiB a pack locates",
                value.len()
            )),
        })?;
        self.file.write_all(value).map_err(|source| PackError::Io {
            op: "write",
            path: self.path.clone(),
            source,
        })?;
        let at = Locator {
            offset: self.offset,
            len,
        };
        self.offset += u64::from(len);
        Ok(at)
    }

    /// Makes what was appended durable, the file's name included.
    pub(super) fn sync(&mut self) -> Result<(), PackError> {
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
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_locator_round_trips_and_no_group_value_reads_as_one() {
        let at = Locator {
            offset: 1 << 40,
            len: 77,
        };
        assert_eq!(Locator::from_payload(&at.to_payload()), Some(at));
        // a group value: its entry count, then its blob
        let mut group = 3u32.to_be_bytes().to_vec();
        group.extend_from_slice(&[0xFF; 12]);
        assert_eq!(Locator::from_payload(&group), None);
        assert_eq!(Locator::from_payload(&[]), None);
        // one byte more or less is not a locator
        assert_eq!(Locator::from_payload(&at.to_payload()[..15]), None);
    }

    #[test]
    fn values_appended_to_a_pack_read_back_and_a_short_or_missing_pack_is_damage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let packs = Packs::new(dir.path());
        let mut w = packs.create(7).expect("create");
        let a = w.append(b"first value").expect("append");
        let b = w.append(b"second").expect("append");
        w.sync().expect("sync");
        drop(w);
        for (at, want) in [(a, &b"first value"[..]), (b, b"second")] {
            match packs.read(7, at).expect("read") {
                Read::Value(v) => assert_eq!(v, want),
                Read::Damaged(d) => panic!("damaged: {d}"),
            }
        }
        let past = Locator {
            offset: b.offset,
            len: b.len + 1,
        };
        assert!(
            matches!(packs.read(7, past).expect("read"), Read::Damaged(d) if d.contains("ends before"))
        );
        assert!(
            matches!(packs.read(8, a).expect("read"), Read::Damaged(d) if d.contains("missing"))
        );
        assert_eq!(packs.ids().expect("ids"), BTreeSet::from([7]));
        assert_eq!(packs.bytes().expect("bytes"), 17);
    }

    #[test]
    fn unneeded_packs_are_deleted_and_a_rewritten_pack_is_read_afresh() {
        let dir = tempfile::tempdir().expect("tempdir");
        let packs = Packs::new(dir.path());
        for id in [1, 2, 3] {
            let mut w = packs.create(id).expect("create");
            w.append(format!("pack {id}").as_bytes()).expect("append");
            w.sync().expect("sync");
        }
        let at = Locator { offset: 0, len: 6 };
        assert!(matches!(packs.read(2, at).expect("read"), Read::Value(v) if v == b"pack 2"));
        std::fs::write(dir.path().join(PACKS_DIR).join("notes.txt"), "kept").expect("write");
        assert_eq!(
            packs.delete_unneeded(&BTreeSet::from([2])).expect("delete"),
            2
        );
        assert_eq!(packs.ids().expect("ids"), BTreeSet::from([2]));
        assert!(dir.path().join(PACKS_DIR).join("notes.txt").exists());
        // a pack written again under its id (a write that never completed, then retried) is
        // read from the new file, not from a handle to the old one
        let mut w = packs.create(2).expect("create");
        w.append(b"again!").expect("append");
        w.sync().expect("sync");
        assert!(matches!(packs.read(2, at).expect("read"), Read::Value(v) if v == b"again!"));
    }

    #[test]
    fn a_copy_of_the_store_shares_its_packs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let packs = Packs::new(&dir.path().join("a"));
        let mut w = packs.create(4).expect("create");
        let at = w.append(b"shared").expect("append");
        w.sync().expect("sync");
        let copy_dir = dir.path().join("b");
        packs.link_into(&copy_dir).expect("link");
        packs.delete_unneeded(&BTreeSet::new()).expect("delete");
        let copy = Packs::new(&copy_dir);
        assert!(matches!(copy.read(4, at).expect("read"), Read::Value(v) if v == b"shared"));
    }
}
