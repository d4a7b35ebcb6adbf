//! What the changelog topic holds and how a new owner of a partition rebuilds its state from
//! it. Pure: the publisher and the reader around it do the Kafka I/O.
//!
//! Every durable checkpoint publishes, per source partition it changed, one or more chunks
//! tagged with the writer's run and checkpoint id: the partition's changed key groups, each
//! whole (the group blob of `engine::group`), and the position (next offset, highest event
//! time) they match. A publication is either `Full`
//! (the partition's whole state: it starts a new line) or a `Delta` on the publication it names
//! as its base. A reader replays the changelog partition in log order and accepts a publication
//! only once all of its chunks are there and only if it continues the line it holds, so it
//! always ends on a state that matches exactly the offsets it resumes from: an unfinished
//! publication (a writer that crashed mid-way) or one from a stale writer is ignored, never
//! mixed in. Record keys are unique, so compaction removes only what a writer tombstoned.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::checkpoint_id::CheckpointId;
use crate::engine::group::{decode_blob, BlobError};
use crate::engine::{Entry, PartitionState, StateKey};
use crate::event_time::EventTime;
use crate::position::Partition;

/// Version of the record layout; a reader refuses records of a newer one. Version 1 carried
/// changes by key (upserts and deletes); it is still read. Version 3 adds the piece of a group
/// too large for one record ([`Changes::Piece`]); a record without one is written as version
/// 2, which builds before version 3 read.
pub const RECORD_VERSION: u32 = 3;
/// The version of a record carrying whole groups.
const GROUPS_VERSION: u32 = 2;
const MAGIC: &[u8; 4] = b"CKCL";

/// One publication: a writer's run (random per process start) and its checkpoint id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Tag {
    pub run: u64,
    pub checkpoint: CheckpointId,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// The partition's whole state.
    Full,
    /// The changes since the publication `base`.
    Delta { base: Tag },
}

/// One key group of the partition, whole: the blob of `engine::group` (without entries for a
/// group that emptied).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupChange {
    pub group: u16,
    pub blob: Vec<u8>,
}

/// One piece of a group whose blob is larger than a record may carry: a group's pieces travel
/// in consecutive chunks of one publication, each in a chunk of its own, and are joined in
/// order before the blob is decoded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupPiece {
    pub group: u16,
    /// Position of this piece among the group's, and how many there are.
    pub index: u32,
    pub count: u32,
    pub bytes: Vec<u8>,
}

/// What a chunk changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Changes {
    /// Key groups replaced whole (records of version 2).
    Groups(Vec<GroupChange>),
    /// Entries set and removed by key (records of version 1).
    Keys {
        upserts: Vec<(StateKey, Entry)>,
        deletes: Vec<StateKey>,
    },
    /// One piece of a group replaced whole (records of version 3).
    Piece(GroupPiece),
}

/// A record of version 1, read only to convert it.
#[derive(Deserialize)]
struct ChunkV1 {
    group: String,
    tag: Tag,
    kind: Kind,
    index: u32,
    count: u32,
    position: PartitionState,
    watermark: Option<EventTime>,
    upserts: Vec<(StateKey, Entry)>,
    deletes: Vec<StateKey>,
}

/// One changelog record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chunk {
    /// The consumer group whose state it is: a changelog topic shared by mistake never mixes
    /// two deployments' states.
    pub group: String,
    pub tag: Tag,
    pub kind: Kind,
    /// Position of this chunk in its publication, and the publication's chunk count.
    pub index: u32,
    pub count: u32,
    /// The partition's position the state matches (also names the partition).
    pub position: PartitionState,
    pub watermark: Option<EventTime>,
    pub changes: Changes,
}

impl Chunk {
    pub fn source(&self) -> &Partition {
        &self.position.partition
    }

    /// The record's Kafka key: unique per chunk.
    pub fn record_key(&self) -> String {
        let p = self.source();
        format!(
            "{}/{}/{}/{:016x}/{}/{}",
            self.group, p.topic, p.partition, self.tag.run, self.tag.checkpoint, self.index
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("not a changelog record")]
    Foreign,
    #[error("changelog record of version {0}, written by a newer build; this build reads up to {RECORD_VERSION}")]
    Newer(u32),
    #[error("damaged changelog record: checksum mismatch")]
    Checksum,
    #[error("undecodable changelog record: {0}")]
    Undecodable(String),
}

/// `CKCL`, version (u32 BE), CRC-32 of the body (u32 BE), body (postcard). The version is the
/// oldest that can carry the chunk, so that builds before version 3 read every record that
/// holds no piece of a group.
pub fn encode(chunk: &Chunk) -> Result<Vec<u8>, postcard::Error> {
    let body = postcard::to_stdvec(chunk)?;
    let version = match chunk.changes {
        Changes::Piece(_) => RECORD_VERSION,
        Changes::Groups(_) | Changes::Keys { .. } => GROUPS_VERSION,
    };
    let mut out = Vec::with_capacity(12 + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

pub fn decode(raw: &[u8]) -> Result<Chunk, DecodeError> {
    if raw.len() < 12 || &raw[..4] != MAGIC {
        return Err(DecodeError::Foreign);
    }
    let version = u32::from_be_bytes([raw[4], raw[5], raw[6], raw[7]]);
    if version > RECORD_VERSION {
        return Err(DecodeError::Newer(version));
    }
    let crc = u32::from_be_bytes([raw[8], raw[9], raw[10], raw[11]]);
    let body = &raw[12..];
    if crc32fast::hash(body) != crc {
        return Err(DecodeError::Checksum);
    }
    let undecodable = |e: postcard::Error| DecodeError::Undecodable(e.to_string());
    if version == 1 {
        let old: ChunkV1 = postcard::from_bytes(body).map_err(undecodable)?;
        return Ok(Chunk {
            group: old.group,
            tag: old.tag,
            kind: old.kind,
            index: old.index,
            count: old.count,
            position: old.position,
            watermark: old.watermark,
            changes: Changes::Keys {
                upserts: old.upserts,
                deletes: old.deletes,
            },
        });
    }
    postcard::from_bytes(body).map_err(undecodable)
}

/// How a durable checkpoint is published for one partition, given what the writer last
/// published for it: `Full` for a full checkpoint; a `Delta` only on the publication of the
/// checkpoint the delta was computed from (`base`), by this run; else `None`: that partition
/// waits for the next full checkpoint (publishing the delta would make it apply to a state it
/// was not computed from).
pub fn publication_kind(
    full: bool,
    base: Option<CheckpointId>,
    last: Option<Tag>,
    run: u64,
) -> Option<Kind> {
    match (full, last) {
        (true, _) => Some(Kind::Full),
        (false, Some(last)) if last.run == run && Some(last.checkpoint) == base => {
            Some(Kind::Delta { base: last })
        }
        (false, _) => None,
    }
}

/// Upper bound on the encoded changes of one chunk: far below Kafka's 1 MB default message
/// size, whatever the keys' lengths.
pub const MAX_CHUNK_BYTES: usize = 256 * 1024;

/// A group's blob up to this size travels whole, in a chunk of its own when it is larger than
/// a chunk's share: builds before version 3 published such a record (under the producer's 1 MB
/// default) and read it. Only a larger group, which they could not publish at all, is cut into
/// pieces, so a record of version 3 appears only where an older build had failed.
pub const MAX_WHOLE_GROUP_BYTES: usize = 900_000;

/// Splits one partition's publication into chunks of at most `max_groups` groups and about
/// `max_bytes` of group blobs each (at least one chunk, so that a publication without changes
/// still records the position). A group larger than that goes whole in a chunk of its own, and
/// one larger than `max_whole` is cut into pieces of at most `max_bytes`, each in a chunk of
/// its own, in order.
#[allow(clippy::too_many_arguments)]
pub fn chunks(
    group: &str,
    tag: Tag,
    kind: Kind,
    position: PartitionState,
    watermark: Option<EventTime>,
    groups: Vec<GroupChange>,
    max_groups: usize,
    max_bytes: usize,
    max_whole: usize,
) -> Vec<Chunk> {
    let max = max_groups.max(1);
    let empty = |index: u32| Chunk {
        group: group.to_string(),
        tag,
        kind,
        index,
        count: 0,
        position: position.clone(),
        watermark,
        changes: Changes::Groups(Vec::new()),
    };
    let mut out = vec![empty(0)];
    let (mut fill, mut bytes) = (0usize, 0usize);
    // the last chunk holds a piece: nothing joins it
    let mut sealed = false;
    for g in groups {
        let size = g.blob.len() + 8;
        if size > max_whole.max(max_bytes) {
            let pieces: Vec<&[u8]> = g.blob.chunks(max_bytes.max(1)).collect();
            let count = pieces.len() as u32;
            for (index, piece) in (0u32..).zip(pieces) {
                if fill > 0 || sealed {
                    let next = out.len() as u32;
                    out.push(empty(next));
                }
                if let Some(last) = out.last_mut() {
                    last.changes = Changes::Piece(GroupPiece {
                        group: g.group,
                        index,
                        count,
                        bytes: piece.to_vec(),
                    });
                }
                (fill, bytes, sealed) = (0, 0, true);
            }
            continue;
        }
        if sealed || (fill > 0 && (fill >= max || bytes + size > max_bytes)) {
            let next = out.len() as u32;
            out.push(empty(next));
            (fill, bytes, sealed) = (0, 0, false);
        }
        fill += 1;
        bytes += size;
        if let Some(Chunk {
            changes: Changes::Groups(list),
            ..
        }) = out.last_mut()
        {
            list.push(g);
        }
    }
    let count = out.len() as u32;
    for c in &mut out {
        c.count = count;
    }
    out
}

/// The state of one partition as the changelog holds it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Committed {
    /// The publication it is as of; `None` before any.
    pub tag: Option<Tag>,
    pub position: Option<PartitionState>,
    pub watermark: Option<EventTime>,
    pub entries: BTreeMap<StateKey, Entry>,
    /// The keys of `entries` by the group that carried them, so that a group replaced whole
    /// drops what it no longer holds.
    members: HashMap<u16, Vec<StateKey>>,
    /// Keys of every record of the partition read, to tombstone once a newer full
    /// publication supersedes them (so that compaction can remove them).
    pub record_keys: Vec<String>,
}

impl Committed {
    /// The next offset the state matches.
    pub fn next_offset(&self) -> Option<i64> {
        self.position.as_ref().and_then(|p| p.next).map(|n| n.0)
    }
}

/// Why a complete publication was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ignored {
    pub tag: Tag,
    pub reason: String,
}

/// Rebuilds partitions' states from their changelog records, in log order.
#[derive(Debug, Default)]
pub struct Replay {
    parts: HashMap<Partition, PartReplay>,
    /// Publications complete but not continuing the line: stale or forked writers.
    pub ignored: Vec<Ignored>,
}

#[derive(Debug, Default)]
struct PartReplay {
    committed: Committed,
    pending: HashMap<Tag, Vec<Option<Chunk>>>,
    record_keys: Vec<String>,
}

impl Replay {
    /// Takes the next record of the changelog partition.
    pub fn push(&mut self, chunk: Chunk) {
        let part = self.parts.entry(chunk.source().clone()).or_default();
        part.record_keys.push(chunk.record_key());
        let count = chunk.count.max(1) as usize;
        let tag = chunk.tag;
        let slots = part.pending.entry(tag).or_insert_with(|| vec![None; count]);
        if slots.len() != count || chunk.index as usize >= count {
            self.ignored.push(Ignored {
                tag,
                reason: "inconsistent chunk count".into(),
            });
            part.pending.remove(&tag);
            return;
        }
        let index = chunk.index as usize;
        slots[index] = Some(chunk);
        if slots.iter().any(Option::is_none) {
            return;
        }
        let chunks: Vec<Chunk> = part
            .pending
            .remove(&tag)
            .unwrap_or_default()
            .into_iter()
            .flatten()
            .collect();
        let Some(first) = chunks.first() else { return };
        let kind = first.kind;
        // every group blob is decoded before anything changes: a damaged one, or a group
        // whose pieces do not join, leaves the line as it was
        let mut decoded = Vec::with_capacity(chunks.len());
        let mut joining = None;
        let mut failed = None;
        for c in &chunks {
            match decode_changes(c, &mut joining) {
                Ok(d) => decoded.push(d),
                Err(reason) => {
                    failed = Some(reason);
                    break;
                }
            }
        }
        if let (None, Some(Joining { group, .. })) = (&failed, &joining) {
            failed = Some(format!("group {group} ends before its last piece"));
        }
        if let Some(reason) = failed {
            self.ignored.push(Ignored { tag, reason });
            return;
        }
        match kind {
            Kind::Full => part.committed = Committed::default(),
            Kind::Delta { base } if part.committed.tag == Some(base) => {}
            Kind::Delta { base } => {
                self.ignored.push(Ignored {
                    tag,
                    reason: format!(
                        "builds on {base:?}, but the line holds {:?}",
                        part.committed.tag
                    ),
                });
                return;
            }
        }
        let next = &mut part.committed;
        for (c, changes) in chunks.into_iter().zip(decoded) {
            match changes {
                Decoded::Groups(groups) => {
                    for (g, entries) in groups {
                        for k in next.members.remove(&g).unwrap_or_default() {
                            next.entries.remove(&k);
                        }
                        if !entries.is_empty() {
                            next.members
                                .insert(g, entries.iter().map(|(k, _)| k.clone()).collect());
                        }
                        next.entries.extend(entries);
                    }
                }
                Decoded::Keys { upserts, deletes } => {
                    for k in &deletes {
                        next.entries.remove(k);
                    }
                    next.entries.extend(upserts);
                }
            }
            next.position = Some(c.position);
            next.watermark = c.watermark;
        }
        next.tag = Some(tag);
    }

    /// The state of `p` as of the last publication accepted.
    pub fn committed(&self, p: &Partition) -> Option<&Committed> {
        self.parts
            .get(p)
            .map(|r| &r.committed)
            .filter(|c| c.tag.is_some())
    }

    pub fn into_committed(mut self, p: &Partition) -> Option<Committed> {
        self.take_committed(p)
    }

    /// Takes the state of `p` (with every record key read for it) out of the replay.
    pub fn take_committed(&mut self, p: &Partition) -> Option<Committed> {
        self.parts
            .remove(p)
            .map(|r| Committed {
                record_keys: r.record_keys,
                ..r.committed
            })
            .filter(|c| c.tag.is_some())
    }
}

/// A chunk's changes, decoded.
enum Decoded {
    Groups(Vec<(u16, Vec<(StateKey, Entry)>)>),
    Keys {
        upserts: Vec<(StateKey, Entry)>,
        deletes: Vec<StateKey>,
    },
}

/// The pieces of a group read so far: the next piece must continue them.
struct Joining {
    group: u16,
    next: u32,
    count: u32,
    bytes: Vec<u8>,
}

/// Decodes a chunk's changes; a piece of a group is joined to the pieces before it in
/// `joining`, and the group decoded with its last piece. Why it cannot, if it cannot.
fn decode_changes(c: &Chunk, joining: &mut Option<Joining>) -> Result<Decoded, String> {
    let scope = Some(c.source().clone());
    let undecodable = |e: BlobError| format!("undecodable group: {e}");
    if let (Some(j), false) = (&joining, matches!(c.changes, Changes::Piece(_))) {
        return Err(format!("group {} ends before its last piece", j.group));
    }
    match &c.changes {
        Changes::Groups(groups) => {
            let mut out = Vec::with_capacity(groups.len());
            for g in groups {
                out.push((g.group, decode_blob(&g.blob, &scope).map_err(undecodable)?));
            }
            Ok(Decoded::Groups(out))
        }
        Changes::Keys { upserts, deletes } => Ok(Decoded::Keys {
            upserts: upserts.clone(),
            deletes: deletes.clone(),
        }),
        Changes::Piece(p) => {
            let mut j = match joining.take() {
                None if p.index == 0 => Joining {
                    group: p.group,
                    next: 0,
                    count: p.count,
                    bytes: Vec::new(),
                },
                Some(j) if j.group == p.group && j.next == p.index && j.count == p.count => j,
                _ => {
                    return Err(format!(
                        "piece {} of {} of group {} out of order",
                        p.index, p.count, p.group
                    ))
                }
            };
            j.bytes.extend_from_slice(&p.bytes);
            j.next += 1;
            if j.next < j.count {
                *joining = Some(j);
                return Ok(Decoded::Groups(Vec::new()));
            }
            let entries = decode_blob(&j.bytes, &scope).map_err(undecodable)?;
            Ok(Decoded::Groups(vec![(j.group, entries)]))
        }
    }
}

#[cfg(test)]
mod tests;
