//! Byte layout of the store. Fixed-width big-endian integers so that keys sort by window,
//! then start time, then key, then checkpoint id; signed values have their sign bit flipped to
//! sort correctly. Every value is sealed with a CRC-32 so that a damaged one is detected, not
//! decoded into wrong state.

use crate::checkpoint_id::CheckpointId;
use crate::engine::{GroupId, StateKey};
use crate::position::Partition;

/// `g/<aggregation><scope><group><checkpoint id>` -> the group's whole content as of that
/// checkpoint (entry count, u32 BE, then the group blob), sealed, in the checkpoint's pack
/// file, and here where it lies there (`packs::Locator`, sealed); or an empty value for a group
/// that emptied there. Formats before 6 held the content here, and a store migrated from one
/// keeps it so until a checkpoint writes the group again.
pub const GROUP_PREFIX: &[u8] = b"g/";
/// `gc/<id>` -> the group version keys that become garbage once checkpoint `id` is the oldest
/// retained one.
pub const GC_PREFIX: &[u8] = b"gc/";
/// `spg/<name>/<aggregation><scope><group>` -> a savepoint's group (as a group version).
pub const SAVEPOINT_GROUP_PREFIX: &[u8] = b"spg/";
/// The key-group layout (seed and group count), fixed at creation.
pub const META_GROUPS: &[u8] = b"meta/groups";
/// `cp/<id>` -> metadata of a complete, restorable checkpoint.
pub const CHECKPOINT_PREFIX: &[u8] = b"cp/";
/// `hist/<id>` -> the record of an attempt (completed, failed or abandoned).
pub const HISTORY_PREFIX: &[u8] = b"hist/";
/// `note/<id>`: an operator's note on a checkpoint's history record (a position reset);
/// older builds ignore the prefix.
pub const NOTE_PREFIX: &[u8] = b"note/";
/// `spm/<name>` -> savepoint metadata.
pub const SAVEPOINT_META_PREFIX: &[u8] = b"spm/";
/// Id of the newest checkpoint written: the one a delta must build on.
pub const META_HEAD: &[u8] = b"meta/head";
pub const META_VERSION: &[u8] = b"meta/version";
/// Id of a checkpoint whose group versions are being written ahead of its last batch (set by
/// the first batch that writes some, removed by the last): versions under that id belong to
/// no checkpoint until the last batch lands, and are removed before the next write if it
/// never does. While it is set, the format version is stamped `PARTIAL_FORMAT_OFFSET` higher.
pub const META_PARTIAL: &[u8] = b"meta/partial";
/// Added to the stored format version while `META_PARTIAL` is set (5 becomes 1005): a build
/// that does not know about versions written ahead (every build before this one) refuses such
/// a store as newer, rather than write a checkpoint that would later restore them; this build
/// reads it as its base format and removes them before it writes. A store is stamped back
/// when the checkpoint's last batch lands or the versions are removed.
pub const PARTIAL_FORMAT_OFFSET: u32 = 1000;
/// The newest claim of the store (`owner`); not part of the state, so no format change.
pub const META_OWNER: &[u8] = b"meta/owner";

/// Layout of format version 1, read only to migrate it.
pub mod v1 {
    pub const STATE_PREFIX: &[u8] = b"state/";
    pub const META_CURRENT: &[u8] = b"meta/current";
}

/// Layout of formats 2 to 4 (one key per window instance), read only to migrate it.
pub mod v4 {
    /// `ver/<state key><checkpoint id>` -> the entry as of that checkpoint, or a tombstone.
    pub const VERSION_PREFIX: &[u8] = b"ver/";
    /// `spe/<name>/<state key>` -> a savepoint's entries.
    pub const SAVEPOINT_ENTRY_PREFIX: &[u8] = b"spe/";
}
use v4::VERSION_PREFIX;

/// Version of everything this build writes. Bump with a migration when the layout changes.
pub const FORMAT_VERSION: u32 = 6;

fn i64_sortable(v: i64) -> [u8; 8] {
    ((v as u64) ^ (1 << 63)).to_be_bytes()
}

fn i64_from_sortable(b: [u8; 8]) -> i64 {
    (u64::from_be_bytes(b) ^ (1 << 63)) as i64
}

fn u64_at(raw: &[u8], at: usize) -> Option<u64> {
    let b: [u8; 8] = raw.get(at..at + 8)?.try_into().ok()?;
    Some(u64::from_be_bytes(b))
}

#[cfg(test)]
/// The state key alone: its scope (0 for instance scope; 1, then the length-prefixed topic and
/// the partition for partition scope), so that one partition's state is one prefix; then window,
/// start and the length-prefixed key, so that a key is never a prefix of another.
pub fn encode_state_key(k: &StateKey, out: &mut Vec<u8>) {
    match &k.partition {
        None => out.push(0),
        Some(p) => out.extend_from_slice(&scope_prefix(p)),
    }
    encode_v3_state_key(k, out);
}

/// The prefix every state key of partition `p` starts with.
pub fn scope_prefix(p: &Partition) -> Vec<u8> {
    let mut out = Vec::with_capacity(7 + p.topic.len());
    out.push(1);
    out.extend_from_slice(&(p.topic.len() as u16).to_be_bytes());
    out.extend_from_slice(p.topic.as_bytes());
    out.extend_from_slice(&((p.partition as u32) ^ (1 << 31)).to_be_bytes());
    out
}

/// Decodes a scope (see [`scope_prefix`]; 0 for instance scope) at the start of `raw`; returns
/// it and the bytes that follow.
fn decode_scope(raw: &[u8]) -> Option<(Option<Partition>, &[u8])> {
    Some(match raw.first()? {
        0 => (None, &raw[1..]),
        1 => {
            let len = usize::from(u16::from_be_bytes(raw.get(1..3)?.try_into().ok()?));
            let topic = std::str::from_utf8(raw.get(3..3 + len)?).ok()?.to_string();
            let at = 3 + len;
            let p = u32::from_be_bytes(raw.get(at..at + 4)?.try_into().ok()?) ^ (1 << 31);
            (Some(Partition::new(topic, p as i32)), &raw[at + 4..])
        }
        _ => return None,
    })
}

/// Decodes a state key at the start of `raw`; returns it and the bytes that follow.
pub fn decode_state_key(raw: &[u8]) -> Option<(StateKey, &[u8])> {
    let (partition, rest) = decode_scope(raw)?;
    let (mut key, rest) = decode_v3_state_key(rest)?;
    key.partition = partition;
    Some((key, rest))
}

/// Formats 2 and 3: window, start, length-prefixed key (no scope).
pub fn encode_v3_state_key(k: &StateKey, out: &mut Vec<u8>) {
    out.extend_from_slice(&k.window.to_be_bytes());
    out.extend_from_slice(&i64_sortable(k.start));
    out.extend_from_slice(&(k.key.len() as u32).to_be_bytes());
    out.extend_from_slice(k.key.as_bytes());
}

/// Decodes a format 2/3 state key at the start of `raw` (instance scope).
pub fn decode_v3_state_key(raw: &[u8]) -> Option<(StateKey, &[u8])> {
    let window = u16::from_be_bytes(raw.get(0..2)?.try_into().ok()?);
    let start = i64_from_sortable(raw.get(2..10)?.try_into().ok()?);
    let len = u32::from_be_bytes(raw.get(10..14)?.try_into().ok()?) as usize;
    let key = std::str::from_utf8(raw.get(14..14 + len)?)
        .ok()?
        .to_string();
    Some((
        StateKey {
            partition: None,
            window,
            start,
            key: key.into(),
        },
        &raw[14 + len..],
    ))
}

#[cfg(test)]
pub fn version_prefix(k: &StateKey) -> Vec<u8> {
    let mut out = VERSION_PREFIX.to_vec();
    encode_state_key(k, &mut out);
    out
}

#[cfg(test)]
pub fn version_key(k: &StateKey, id: CheckpointId) -> Vec<u8> {
    let mut out = version_prefix(k);
    out.extend_from_slice(&id.0.to_be_bytes());
    out
}

/// A version key of formats 2 and 3 (written only by the migration from format 1).
pub fn v3_version_key(k: &StateKey, id: CheckpointId) -> Vec<u8> {
    let mut out = VERSION_PREFIX.to_vec();
    encode_v3_state_key(k, &mut out);
    out.extend_from_slice(&id.0.to_be_bytes());
    out
}

pub fn decode_version_key(raw: &[u8]) -> Option<(StateKey, CheckpointId)> {
    let (k, rest) = decode_state_key(raw.strip_prefix(VERSION_PREFIX)?)?;
    (rest.len() == 8).then(|| u64_at(rest, 0).map(|id| (k, CheckpointId(id))))?
}

/// The group's identity as a key part: aggregation, scope (as in state keys), group.
fn encode_group_id(g: &GroupId, out: &mut Vec<u8>) {
    out.extend_from_slice(&g.aggregation.to_be_bytes());
    match &g.scope {
        None => out.push(0),
        Some(p) => out.extend_from_slice(&scope_prefix(p)),
    }
    out.extend_from_slice(&g.group.to_be_bytes());
}

fn decode_group_id(raw: &[u8]) -> Option<(GroupId, &[u8])> {
    let aggregation = u16::from_be_bytes(raw.get(0..2)?.try_into().ok()?);
    let raw = &raw[2..];
    let (scope, rest) = decode_scope(raw)?;
    let group = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?);
    Some((
        GroupId {
            aggregation,
            scope,
            group,
        },
        &rest[2..],
    ))
}

/// Every version of group `g` starts with this.
pub fn group_prefix(g: &GroupId) -> Vec<u8> {
    let mut out = GROUP_PREFIX.to_vec();
    encode_group_id(g, &mut out);
    out
}

pub fn group_version_key(g: &GroupId, id: CheckpointId) -> Vec<u8> {
    let mut out = group_prefix(g);
    out.extend_from_slice(&id.0.to_be_bytes());
    out
}

pub fn decode_group_version_key(raw: &[u8]) -> Option<(GroupId, CheckpointId)> {
    let (g, rest) = decode_group_id(raw.strip_prefix(GROUP_PREFIX)?)?;
    (rest.len() == 8).then(|| u64_at(rest, 0).map(|id| (g, CheckpointId(id))))?
}

pub fn savepoint_groups_prefix(name: &str) -> Vec<u8> {
    let mut out = SAVEPOINT_GROUP_PREFIX.to_vec();
    out.extend_from_slice(name.as_bytes());
    out.push(b'/');
    out
}

pub fn savepoint_group_key(name: &str, g: &GroupId) -> Vec<u8> {
    let mut out = savepoint_groups_prefix(name);
    encode_group_id(g, &mut out);
    out
}

pub fn decode_savepoint_group_key(name: &str, raw: &[u8]) -> Option<GroupId> {
    let rest = raw.strip_prefix(savepoint_groups_prefix(name).as_slice())?;
    match decode_group_id(rest)? {
        (g, []) => Some(g),
        _ => None,
    }
}

pub fn id_key(prefix: &[u8], id: CheckpointId) -> Vec<u8> {
    let mut out = prefix.to_vec();
    out.extend_from_slice(&id.0.to_be_bytes());
    out
}

pub fn decode_id_key(prefix: &[u8], raw: &[u8]) -> Option<CheckpointId> {
    let rest = raw.strip_prefix(prefix)?;
    (rest.len() == 8).then(|| u64_at(rest, 0).map(CheckpointId))?
}

pub fn savepoint_meta_key(name: &str) -> Vec<u8> {
    let mut out = SAVEPOINT_META_PREFIX.to_vec();
    out.extend_from_slice(name.as_bytes());
    out
}

/// Format 4's savepoint entries of `name` start with this.
pub fn v4_savepoint_entries_prefix(name: &str) -> Vec<u8> {
    let mut out = v4::SAVEPOINT_ENTRY_PREFIX.to_vec();
    out.extend_from_slice(name.as_bytes());
    out.push(b'/');
    out
}

/// CRC-32 of the payload, then the payload.
pub fn seal(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 4);
    out.extend_from_slice(&crc32fast::hash(payload).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// The payload of a sealed value, if its checksum matches.
pub fn unseal(raw: &[u8]) -> Option<&[u8]> {
    let crc = u32::from_be_bytes(raw.get(0..4)?.try_into().ok()?);
    let payload = &raw[4..];
    (crc32fast::hash(payload) == crc).then_some(payload)
}

/// v1 state keys: window, start, then the key bytes to the end.
pub fn decode_v1_state_key(raw: &[u8]) -> Option<StateKey> {
    let rest = raw.strip_prefix(v1::STATE_PREFIX)?;
    let window = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?);
    let start = i64_from_sortable(rest.get(2..10)?.try_into().ok()?);
    let key = std::str::from_utf8(rest.get(10..)?).ok()?.to_string();
    Some(StateKey {
        partition: None,
        window,
        start,
        key: key.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn group_version_keys_round_trip(aggregation in any::<u16>(), scope in proptest::option::of(("[a-z.]{0,8}", any::<i32>())), group in any::<u16>(), id in any::<u64>()) {
            let g = GroupId { aggregation, scope: scope.map(|(t, p)| Partition::new(t, p)), group };
            prop_assert_eq!(decode_group_version_key(&group_version_key(&g, CheckpointId(id))), Some((g.clone(), CheckpointId(id))));
            prop_assert_eq!(decode_savepoint_group_key("sp", &savepoint_group_key("sp", &g)), Some(g));
        }

        #[test]
        fn versions_of_one_group_sort_by_id_and_no_group_prefixes_another(a in any::<u16>(), b in any::<u16>(), i in any::<u64>(), j in any::<u64>()) {
            let ga = GroupId { aggregation: 0, scope: None, group: a };
            let gb = GroupId { aggregation: 0, scope: None, group: b };
            prop_assert_eq!(group_version_key(&ga, CheckpointId(i)).cmp(&group_version_key(&ga, CheckpointId(j))), i.cmp(&j));
            prop_assert_eq!(group_version_key(&gb, CheckpointId(j)).starts_with(&group_prefix(&ga)), a == b);
        }

        #[test]
        fn version_keys_round_trip(scope in proptest::option::of(("[a-z.]{0,8}", any::<i32>())), window in any::<u16>(), start in any::<i64>(), key in ".*", id in any::<u64>()) {
            let partition = scope.map(|(t, p)| Partition::new(t, p));
            let k = StateKey { partition, window, start, key: key.into() };
            prop_assert_eq!(decode_version_key(&version_key(&k, CheckpointId(id))), Some((k, CheckpointId(id))));
        }

        #[test]
        fn versions_of_one_key_sort_by_id_and_keys_by_start(a in any::<i64>(), b in any::<i64>(), i in any::<u64>(), j in any::<u64>()) {
            let ka = StateKey { partition: None, window: 1, start: a, key: "k".into() };
            let kb = StateKey { partition: None, window: 1, start: b, key: "k".into() };
            prop_assert_eq!(version_key(&ka, CheckpointId(i)).cmp(&version_key(&kb, CheckpointId(j))), (a, i).cmp(&(b, j)));
        }

        #[test]
        fn no_key_prefixes_another_keys_versions(a in "[a-c]{0,4}", b in "[a-c]{0,4}") {
            prop_assume!(a != b);
            let ka = StateKey { partition: None, window: 0, start: 0, key: a.into() };
            let kb = StateKey { partition: None, window: 0, start: 0, key: b.into() };
            prop_assert!(!version_key(&kb, CheckpointId(7)).starts_with(&version_prefix(&ka)));
        }

        #[test]
        fn one_partitions_state_is_one_prefix(t in "[a-c]{1,3}", p in any::<i32>(), q in any::<i32>(), key in "[a-c]{0,3}") {
            let k = StateKey { partition: Some(Partition::new(t.clone(), q)), window: 0, start: 0, key: key.into() };
            let mut raw = Vec::new();
            encode_state_key(&k, &mut raw);
            prop_assert_eq!(raw.starts_with(&scope_prefix(&Partition::new(t, p))), p == q);
        }

        #[test]
        fn sealed_values_detect_any_flipped_byte(payload in proptest::collection::vec(any::<u8>(), 1..64), at in any::<usize>(), bit in 0u8..8) {
            let mut sealed = seal(&payload);
            prop_assert_eq!(unseal(&sealed), Some(payload.as_slice()));
            let i = at % sealed.len();
            sealed[i] ^= 1 << bit;
            prop_assert_eq!(unseal(&sealed), None);
        }
    }
}
