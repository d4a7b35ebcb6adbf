//! The savepoint export file: portable between machines and directories, versioned and
//! checksummed so that a truncated or altered file is refused rather than restored.
//!
//! Layout: `CHKPTSAV` magic, format version (u32 BE), body length (u64 BE), the body (postcard:
//! savepoint metadata with offsets, watermark and state spec, then the state as compressed
//! group blobs, see `engine::group`), and a CRC-32 (u32 BE) of everything before it. Versions 1
//! to 3 (store formats 2 to 4, entries one by one) are read and converted; newer versions are
//! refused. The groups of a file are only its packaging: an import regroups the entries with the
//! store's own key-group layout.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::legacy::{PortableV1, PortableV2, SavepointMetaV3};
use super::SavepointMeta;
use crate::engine::group::{decode_blob, encode_blob, group_entries};
use crate::engine::{Entry, GroupLayout, StateKey};
use crate::position::Partition;

const MAGIC: &[u8; 8] = b"CHKPTSAV";
/// Version of the file format this build writes; it reads this one and every earlier one.
pub const FILE_VERSION: u32 = 4;
const HEADER: usize = 8 + 4 + 8;

#[derive(Debug, thiserror::Error)]
pub enum PortableError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a checkpointer savepoint file")]
    NotASavepoint { path: PathBuf },
    #[error("{path} is a savepoint file of format version {found}, written by a newer build; this build reads versions up to {FILE_VERSION}")]
    UnsupportedVersion { path: PathBuf, found: u32 },
    #[error("{path} is truncated: {found} bytes, the header announces {expected}")]
    Truncated {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("{path} is damaged or was altered: checksum mismatch")]
    Checksum { path: PathBuf },
    #[error("{path} has a valid checksum but cannot be decoded: {source}")]
    Decode {
        path: PathBuf,
        #[source]
        source: postcard::Error,
    },
    #[error("cannot encode savepoint: {0}")]
    Encode(#[source] postcard::Error),
    #[error("savepoint state is damaged: {0}")]
    Blob(String),
}

/// A savepoint as carried in an export file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Portable {
    pub meta: SavepointMeta,
    pub entries: Vec<(StateKey, Entry)>,
}

/// Version 3's body: the entries one by one.
#[derive(Deserialize)]
struct PortableV3 {
    meta: SavepointMeta,
    entries: Vec<(StateKey, Entry)>,
}

/// Version 4's body: the entries as group blobs, each with its scope.
#[derive(Serialize, Deserialize)]
struct Body {
    meta: SavepointMeta,
    groups: Vec<(Option<Partition>, Vec<u8>)>,
}

pub fn encode(sp: &Portable) -> Result<Vec<u8>, PortableError> {
    let mut groups = Vec::new();
    for g in group_entries(&GroupLayout::default(), sp.entries.iter().cloned()) {
        let blob = encode_blob(&g.entries()).map_err(|e| PortableError::Blob(e.to_string()))?;
        groups.push((g.id.scope, blob));
    }
    let body = postcard::to_stdvec(&Body {
        meta: sp.meta.clone(),
        groups,
    })
    .map_err(PortableError::Encode)?;
    let mut out = Vec::with_capacity(HEADER + body.len() + 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FILE_VERSION.to_be_bytes());
    out.extend_from_slice(&(body.len() as u64).to_be_bytes());
    out.extend_from_slice(&body);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    Ok(out)
}

pub fn decode(raw: &[u8], path: &Path) -> Result<Portable, PortableError> {
    let path = path.to_path_buf();
    if raw.len() < 8 || &raw[..8] != MAGIC {
        return Err(PortableError::NotASavepoint { path });
    }
    let found = raw.len() as u64;
    let truncated = |expected: u64| PortableError::Truncated {
        path: path.clone(),
        expected,
        found,
    };
    let header = raw
        .get(..HEADER)
        .ok_or_else(|| truncated(HEADER as u64 + 4))?;
    let version = u32::from_be_bytes([header[8], header[9], header[10], header[11]]);
    if version == 0 || version > FILE_VERSION {
        return Err(PortableError::UnsupportedVersion {
            path,
            found: version,
        });
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&header[12..20]);
    let body_len = u64::from_be_bytes(len);
    let expected = (HEADER as u64).saturating_add(body_len).saturating_add(4);
    if found != expected {
        return Err(truncated(expected));
    }
    let end = raw.len() - 4;
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&raw[end..]);
    if crc32fast::hash(&raw[..end]) != u32::from_be_bytes(crc) {
        return Err(PortableError::Checksum { path });
    }
    let body = &raw[HEADER..end];
    let decoded = match version {
        1 => postcard::from_bytes::<PortableV1>(body).map(|old| Portable {
            meta: SavepointMetaV3::from(old.meta).into(),
            entries: old
                .entries
                .into_iter()
                .map(|(k, e)| (k.into(), e))
                .collect(),
        }),
        2 => postcard::from_bytes::<PortableV2>(body).map(|old| Portable {
            meta: old.meta.into(),
            entries: old
                .entries
                .into_iter()
                .map(|(k, e)| (k.into(), e))
                .collect(),
        }),
        3 => postcard::from_bytes::<PortableV3>(body).map(|old| Portable {
            meta: old.meta,
            entries: old.entries,
        }),
        _ => {
            let body: Body =
                postcard::from_bytes(body).map_err(|source| PortableError::Decode {
                    path: path.clone(),
                    source,
                })?;
            let mut entries = Vec::new();
            for (scope, blob) in &body.groups {
                entries.extend(
                    decode_blob(blob, scope)
                        .map_err(|e| PortableError::Blob(format!("{}: {e}", path.display())))?,
                );
            }
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            return Ok(Portable {
                meta: body.meta,
                entries,
            });
        }
    };
    decoded.map_err(|source| PortableError::Decode { path, source })
}

/// Writes the file atomically: a temporary file in the same directory, synced, then renamed.
pub fn write_file(path: &Path, sp: &Portable) -> Result<u64, PortableError> {
    let raw = encode(sp)?;
    let err = |source| PortableError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(&dir).map_err(err)?;
    tmp.write_all(&raw).map_err(err)?;
    tmp.as_file().sync_all().map_err(err)?;
    tmp.persist(path).map_err(|e| err(e.error))?;
    Ok(raw.len() as u64)
}

pub fn read_file(path: &Path) -> Result<Portable, PortableError> {
    let raw = std::fs::read(path).map_err(|source| PortableError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    decode(&raw, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::protocol::CheckpointMeta;
    use crate::checkpoint_id::CheckpointId;
    use crate::engine::{Acc, EntryStatus};
    use crate::event_time::EventTime;

    fn sample() -> Portable {
        Portable {
            meta: SavepointMeta {
                name: "before-upgrade".into(),
                checkpoint_id: CheckpointId(9),
                created_ms: 1_700_000_000_000,
                meta: CheckpointMeta {
                    id: CheckpointId(9),
                    trigger_ms: 1_700_000_000_000,
                    duration_ms: 3,
                    bytes: 10,
                    full: false,
                    records: 5,
                    partitions: vec![],
                    watermark: Some(EventTime(7)),
                    spec: Default::default(),
                },
                entries: 1,
            },
            entries: vec![(
                StateKey {
                    partition: None,
                    window: 0,
                    start: 60_000,
                    key: "user-1".into(),
                },
                Entry {
                    status: EntryStatus::Open,
                    end: 120_000,
                    acc: Acc::of(Some(2.5)),
                },
            )],
        }
    }

    #[test]
    fn round_trips_through_a_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sp.chkpt");
        write_file(&path, &sample()).expect("write");
        assert_eq!(read_file(&path).expect("read"), sample());
    }

    #[test]
    fn every_truncation_is_refused() {
        let raw = encode(&sample()).expect("encode");
        let p = Path::new("sp.chkpt");
        for len in 0..raw.len() {
            let err = decode(&raw[..len], p).expect_err("truncated");
            assert!(
                matches!(
                    err,
                    PortableError::Truncated { .. } | PortableError::NotASavepoint { .. }
                ),
                "len {len}: {err}"
            );
        }
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let raw = encode(&sample()).expect("encode");
        let p = Path::new("sp.chkpt");
        for i in 0..raw.len() {
            let mut bad = raw.clone();
            bad[i] ^= 0x20;
            assert!(decode(&bad, p).is_err(), "byte {i} altered and accepted");
        }
    }

    #[test]
    fn errors_name_the_problem() {
        let p = Path::new("/tmp/x.chkpt");
        let mut raw = encode(&sample()).expect("encode");
        let n = raw.len();
        raw[n - 10] ^= 1;
        let text = decode(&raw, p).expect_err("tampered").to_string();
        assert_eq!(
            text,
            "/tmp/x.chkpt is damaged or was altered: checksum mismatch"
        );
        let text = decode(b"{\"json\": true}", p)
            .expect_err("other")
            .to_string();
        assert!(text.contains("not a checkpointer savepoint file"), "{text}");
        let mut raw = encode(&sample()).expect("encode");
        raw[11] = 9;
        let text = decode(&raw, p).expect_err("version").to_string();
        assert!(
            text.contains("format version 9, written by a newer build"),
            "{text}"
        );
    }
}
