//! Key groups: every key of a state scope hashes (seeded, stable) into one of a fixed number of
//! groups, and a group is the unit a checkpoint writes, versions and publishes. A window
//! closing or a key updating changes one group; a checkpoint carries the whole content of
//! every group that changed, so its cost follows the changed groups, not the windows.
//!
//! The layout (seed and group count) is fixed when a store is created and recorded in it: a
//! key must land in the same group for as long as the store lives. A group's content travels
//! as one compact blob ([`encode_blob`]): keys sorted and front-coded, each window instance a
//! row of varints (start delta-coded), value aggregates only where the window saw values,
//! compressed with LZ4.

use serde::{Deserialize, Deserializer, Serialize};

use std::sync::Arc;

use super::aggregate::Acc;
use super::scope::GroupState;
use super::state::{Entry, EntryStatus, StateKey};
use crate::position::Partition;

/// Groups per scope in a new store when the configuration does not say (`state.key_groups`).
/// Each group has its own tables, so the record path's working set grows with the groups a
/// scope holds: at 10k keys, 4,096 groups (this build's default before 2026-12-03) read 1.3 to
/// 1.5 times slower than 256 in the turnover benchmark, and 1M keys up to twice as slow
/// (docs/benchmarks.md). Fewer groups make a checkpoint that changed few keys of a large
/// state rewrite more of it.
pub const DEFAULT_GROUPS: u16 = 256;

/// How keys map to groups: fixed for the life of a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupLayout {
    /// Seed of the hash, random per store, so that no input can be crafted offline to crowd
    /// one group.
    pub seed: u64,
    /// Groups per scope (at least 1).
    pub groups: u16,
}

impl Default for GroupLayout {
    fn default() -> Self {
        GroupLayout {
            seed: 0,
            groups: DEFAULT_GROUPS,
        }
    }
}

impl GroupLayout {
    /// A layout with a fresh random seed and `groups` groups (at least 1).
    pub fn random(groups: u16) -> Self {
        let state = std::collections::hash_map::RandomState::new();
        let seed = std::hash::BuildHasher::hash_one(&state, std::time::SystemTime::now());
        GroupLayout {
            seed,
            groups: groups.max(1),
        }
    }

    /// The group of `key` (XXH3, seeded).
    pub fn group_of(&self, key: &str) -> u16 {
        let h = xxhash_rust::xxh3::xxh3_64_with_seed(key.as_bytes(), self.seed);
        (h % u64::from(self.groups.max(1))) as u16
    }
}

/// One group of one state scope. `aggregation` leaves room for several named aggregations over
/// the same input; it is 0 for the single one configured today.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GroupId {
    pub aggregation: u16,
    pub scope: Option<Partition>,
    pub group: u16,
}

/// The whole content of one group at a snapshot; empty when the group emptied. A snapshot
/// shares the engine's group (copy on write) rather than copying it: its entries are made when
/// asked for, by the writer, off the processing loop.
#[derive(Debug, Clone)]
pub struct GroupContent {
    pub id: GroupId,
    content: Content,
}

#[derive(Debug, Clone)]
enum Content {
    Entries(Vec<(StateKey, Entry)>),
    Shared(Arc<GroupState>),
}

impl GroupContent {
    /// A group holding `entries` (sorted here).
    pub fn new(id: GroupId, mut entries: Vec<(StateKey, Entry)>) -> Self {
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        GroupContent {
            id,
            content: Content::Entries(entries),
        }
    }

    pub(crate) fn shared(id: GroupId, state: Arc<GroupState>) -> Self {
        GroupContent {
            id,
            content: Content::Shared(state),
        }
    }

    /// Its entries, sorted by key.
    pub fn entries(&self) -> Vec<(StateKey, Entry)> {
        match &self.content {
            Content::Entries(e) => e.clone(),
            Content::Shared(state) => state.entries(),
        }
    }

    /// Its blob ([`encode_blob`]), encoded from the group where it lives, without copying
    /// its entries.
    pub fn blob(&self) -> Result<Vec<u8>, BlobError> {
        match &self.content {
            Content::Entries(e) => encode_blob(e),
            Content::Shared(state) => encode_rows(&state.rows()),
        }
    }

    pub fn len(&self) -> usize {
        match &self.content {
            Content::Entries(e) => e.len(),
            Content::Shared(state) => state.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl PartialEq for GroupContent {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id && self.entries() == other.entries()
    }
}

/// LZ4 expands a block at most about 255 times.
const MAX_LZ4_RATIO: u64 = 256;

/// Layout of the blob this build writes (first byte of every blob).
const BLOB_VERSION: u8 = 1;

#[derive(Serialize, Deserialize)]
struct Row {
    /// Index into `keys`.
    key: u32,
    window: u16,
    /// Start minus the previous row's start.
    start_delta: i64,
    /// End minus start.
    len: i64,
    closed: bool,
    count: u64,
    /// Sum, min and max, absent while the window saw no value.
    values: Option<(f64, f64, f64)>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlobError {
    #[error("group blob of layout {0}, written by a newer build")]
    Newer(u8),
    #[error("empty group blob")]
    Empty,
    #[error("group blob does not decompress: {0}")]
    Decompress(String),
    #[error("group blob does not decode: {0}")]
    Decode(String),
    #[error("group blob is inconsistent: {0}")]
    Inconsistent(&'static str),
}

fn values_of(acc: &Acc) -> Option<(f64, f64, f64)> {
    let untouched =
        acc.sum.to_bits() == 0 && acc.min == f64::INFINITY && acc.max == f64::NEG_INFINITY;
    (!untouched).then_some((acc.sum, acc.min, acc.max))
}

/// One entry of a group, borrowed from wherever it lives, as a blob encodes it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EntryRef<'a> {
    pub key: &'a str,
    pub window: u16,
    pub start: i64,
    pub end: i64,
    pub acc: Acc,
    pub closed: bool,
}

/// A group's blob before compression: its distinct keys, sorted, front-coded (bytes shared
/// with the previous key, then the rest), and its rows. Blobs are written by [`body`]; the
/// tests check that postcard writes the same bytes from this.
#[cfg(test)]
#[derive(Serialize)]
struct BlobRef<'a> {
    keys: Vec<(u32, &'a [u8])>,
    rows: Vec<Row>,
}

/// Encodes one group's entries (all of one scope) as a compressed blob. The order of
/// `entries` does not matter; the blob is the same for the same set.
pub fn encode_blob(entries: &[(StateKey, Entry)]) -> Result<Vec<u8>, BlobError> {
    let rows: Vec<EntryRef<'_>> = entries
        .iter()
        .map(|(k, e)| EntryRef {
            key: &k.key,
            window: k.window,
            start: k.start,
            end: e.end,
            acc: e.acc,
            closed: e.status == EntryStatus::Closed,
        })
        .collect();
    encode_rows(&rows)
}

/// [`encode_blob`] of borrowed entries (in any order).
pub(crate) fn encode_rows(entries: &[EntryRef<'_>]) -> Result<Vec<u8>, BlobError> {
    // sorted by key, window and start. A key's first 16 bytes, read once per row as a number,
    // order almost every pair without a byte comparison (a group's final windows come in the
    // order they closed, by window and start, so most pairs are of different keys); keys at
    // the same address (a key's rows borrowing one copy) need none either
    let mut order: Vec<(u128, &EntryRef<'_>)> =
        entries.iter().map(|e| (key_prefix(e.key), e)).collect();
    order.sort_by(|(pa, a), (pb, b)| {
        prefixed_order((*pa, a.key), (*pb, b.key))
            .then_with(|| (a.window, a.start).cmp(&(b.window, b.start)))
    });
    let mut keys: Vec<(u32, &[u8])> = Vec::new();
    // the rows written as they come (about 30 bytes a row), the keys put before them at the end
    let mut rows = Vec::with_capacity(30 * order.len());
    let mut last_key: Option<(u128, &str)> = None;
    let mut last_start = 0i64;
    for &(prefix, e) in &order {
        // a new key where the prefixes differ, without a byte comparison (a call to `bcmp`
        // per key, a thirtieth of a 10M-key run's CPU)
        let new_key = last_key.is_none_or(|last| prefixed_order(last, (prefix, e.key)).is_ne());
        if new_key {
            let prev = last_key.map_or("", |(_, last)| last).as_bytes();
            let shared = prev
                .iter()
                .zip(e.key.as_bytes())
                .take_while(|(a, b)| a == b)
                .count();
            keys.push((shared as u32, &e.key.as_bytes()[shared..]));
            last_key = Some((prefix, e.key));
        }
        put_row(
            &mut rows,
            &Row {
                key: (keys.len() - 1) as u32,
                window: e.window,
                start_delta: e.start.wrapping_sub(last_start),
                len: e.end.wrapping_sub(e.start),
                closed: e.closed,
                count: e.acc.count,
                values: values_of(&e.acc),
            },
        );
        last_start = e.start;
    }
    let body = body(&keys, order.len(), &rows);
    let mut out = vec![BLOB_VERSION];
    out.extend_from_slice(&lz4_flex::compress_prepend_size(&body));
    Ok(out)
}

/// A blob's body as postcard writes a struct of `keys` then `count` rows (`BlobRef`, which the
/// tests encode with postcard to check these bytes), the rows already written by [`put_row`]
/// into `rows`: written here field by field (serde's calls per field were as much of a large
/// checkpoint's encoding as the rest of it).
fn body(keys: &[(u32, &[u8])], count: usize, rows: &[u8]) -> Vec<u8> {
    let key_bytes: usize = keys.iter().map(|(_, rest)| rest.len() + 6).sum();
    let mut out = Vec::with_capacity(20 + key_bytes + rows.len());
    put_varint(&mut out, keys.len() as u64);
    for &(shared, rest) in keys {
        put_varint(&mut out, u64::from(shared));
        put_varint(&mut out, rest.len() as u64);
        out.extend_from_slice(rest);
    }
    put_varint(&mut out, count as u64);
    out.extend_from_slice(rows);
    out
}

/// A row as postcard writes a [`Row`]: unsigned integers as varints, signed ones zigzagged
/// first, a bool as one byte, an `Option` as a byte 0 or 1 before its value, an `f64` as its
/// 8 bytes, little-endian.
fn put_row(out: &mut Vec<u8>, row: &Row) {
    put_varint(out, u64::from(row.key));
    put_varint(out, u64::from(row.window));
    put_varint(out, zigzag(row.start_delta));
    put_varint(out, zigzag(row.len));
    out.push(u8::from(row.closed));
    put_varint(out, row.count);
    match row.values {
        None => out.push(0),
        Some((sum, min, max)) => {
            out.push(1);
            out.extend_from_slice(&sum.to_le_bytes());
            out.extend_from_slice(&min.to_le_bytes());
            out.extend_from_slice(&max.to_le_bytes());
        }
    }
}

/// postcard's varint: seven bits a byte, lowest first, the high bit set on every byte but the
/// last.
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// postcard's zigzag mapping of a signed integer to an unsigned one.
fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

/// A key's first 16 bytes as a big-endian number, zeros past its end: of two keys, the one
/// with the smaller number sorts first (equal numbers say nothing: the keys are compared).
pub(crate) fn key_prefix(key: &str) -> u128 {
    let bytes = key.as_bytes();
    let mut head = [0u8; 16];
    let n = bytes.len().min(16);
    head[..n].copy_from_slice(&bytes[..n]);
    u128::from_be_bytes(head)
}

/// Two keys' order, each with its [`key_prefix`]: by the prefixes, and by the bytes only where
/// those are equal.
pub(crate) fn prefixed_order((pa, a): (u128, &str), (pb, b): (u128, &str)) -> std::cmp::Ordering {
    pa.cmp(&pb).then_with(|| key_order(a, b))
}

/// Two keys' order, without reading their bytes when both borrow the same copy.
fn key_order(a: &str, b: &str) -> std::cmp::Ordering {
    if std::ptr::eq(a, b) {
        std::cmp::Ordering::Equal
    } else {
        a.cmp(b)
    }
}

/// The decompressed body of a blob, checked against what its header announces.
fn body_of(raw: &[u8]) -> Result<Vec<u8>, BlobError> {
    let (&version, compressed) = raw.split_first().ok_or(BlobError::Empty)?;
    if version != BLOB_VERSION {
        return Err(BlobError::Newer(version));
    }
    // the size it announces bounds what is allocated: never more than LZ4 can expand to
    let announced = compressed
        .get(..4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_le_bytes)
        .ok_or(BlobError::Inconsistent("no size"))?;
    if u64::from(announced) > (compressed.len() as u64).saturating_mul(MAX_LZ4_RATIO) {
        return Err(BlobError::Inconsistent(
            "announces more than its compressed size can hold",
        ));
    }
    lz4_flex::decompress_size_prepended(compressed)
        .map_err(|e| BlobError::Decompress(e.to_string()))
}

/// One entry of a blob as [`visit_blob`] hands it over: key, window, start, end, accumulator
/// and whether the window is final.
pub type BlobEntry<'a> = (&'a str, u16, i64, i64, Acc, bool);

/// Reads a blob entry by entry, in key order, each key borrowed (no entry is allocated, and
/// the rows are read as they are handed over, never listed); returns the number of entries.
pub fn visit_blob(raw: &[u8], f: impl FnMut(BlobEntry<'_>)) -> Result<usize, BlobError> {
    let body = body_of(raw)?;
    let mut found = None;
    let mut de = postcard::Deserializer::from_bytes(&body);
    let visitor = BlobVisitor {
        f,
        found: &mut found,
    };
    let read = de.deserialize_struct("BlobView", &["keys", "rows"], visitor);
    match (read, found) {
        (Ok(rows), _) => Ok(rows),
        (Err(_), Some(e)) => Err(e),
        (Err(e), None) => Err(BlobError::Decode(e.to_string())),
    }
}

/// Reads a blob's body (see [`body`]): its keys, then each row as it comes. What is wrong
/// with the blob beyond its encoding goes to `found` (serde's errors cannot carry it).
struct BlobVisitor<'e, F> {
    f: F,
    found: &'e mut Option<BlobError>,
}

impl<'de, F: FnMut(BlobEntry<'_>)> serde::de::Visitor<'de> for BlobVisitor<'_, F> {
    type Value = usize;

    fn expecting(&self, out: &mut std::fmt::Formatter) -> std::fmt::Result {
        out.write_str("a group blob's keys and rows")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
        use serde::de::Error;
        let BlobVisitor { f, found } = self;
        let keys: Vec<(u32, &'de [u8])> = seq
            .next_element()?
            .ok_or_else(|| A::Error::custom("no keys"))?;
        let (text, ends) = match keys_of(keys) {
            Ok(k) => k,
            Err(e) => {
                *found = Some(e);
                return Err(A::Error::custom("inconsistent keys"));
            }
        };
        let rows = RowsSeed {
            text: &text,
            ends: &ends,
            f,
            found,
        };
        seq.next_element_seed(rows)?
            .ok_or_else(|| A::Error::custom("no rows"))
    }
}

/// The keys of a blob, rebuilt from their shared prefixes into one text: key i is
/// `ends[i-1]..ends[i]`.
fn keys_of(keys: Vec<(u32, &[u8])>) -> Result<(String, Vec<usize>), BlobError> {
    let mut bytes: Vec<u8> = Vec::new();
    let mut ends: Vec<usize> = Vec::with_capacity(keys.len());
    let mut prev = 0..0;
    for (shared, rest) in keys {
        let shared = shared as usize;
        if shared > prev.len() {
            return Err(BlobError::Inconsistent(
                "key shares more than the previous key holds",
            ));
        }
        let start = bytes.len();
        bytes.extend_from_within(prev.start..prev.start + shared);
        bytes.extend_from_slice(rest);
        if std::str::from_utf8(&bytes[start..]).is_err() {
            return Err(BlobError::Inconsistent("key is not UTF-8"));
        }
        prev = start..bytes.len();
        ends.push(bytes.len());
    }
    // every key is UTF-8 on its own, so each one's bounds are character boundaries
    let text = String::from_utf8(bytes).map_err(|_| BlobError::Inconsistent("key is not UTF-8"))?;
    Ok((text, ends))
}

/// Hands each row of a blob over as an entry, as it is read.
struct RowsSeed<'k, 'e, F> {
    text: &'k str,
    ends: &'k [usize],
    f: F,
    found: &'e mut Option<BlobError>,
}

impl<'de, F: FnMut(BlobEntry<'_>)> serde::de::DeserializeSeed<'de> for RowsSeed<'_, '_, F> {
    type Value = usize;

    fn deserialize<D: serde::Deserializer<'de>>(self, de: D) -> Result<usize, D::Error> {
        de.deserialize_seq(self)
    }
}

impl<'de, F: FnMut(BlobEntry<'_>)> serde::de::Visitor<'de> for RowsSeed<'_, '_, F> {
    type Value = usize;

    fn expecting(&self, out: &mut std::fmt::Formatter) -> std::fmt::Result {
        out.write_str("a group blob's rows")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(mut self, mut seq: A) -> Result<usize, A::Error> {
        let mut start = 0i64;
        let mut rows = 0;
        while let Some(row) = seq.next_element::<Row>()? {
            let k = row.key as usize;
            let from = k
                .checked_sub(1)
                .map_or(Some(0), |i| self.ends.get(i).copied());
            let Some(key) = from
                .zip(self.ends.get(k).copied())
                .and_then(|(from, to)| self.text.get(from..to))
            else {
                *self.found = Some(BlobError::Inconsistent(
                    "row names a key the blob does not hold",
                ));
                return Err(serde::de::Error::custom("unknown key"));
            };
            start = start.wrapping_add(row.start_delta);
            let (sum, min, max) = row
                .values
                .unwrap_or((0.0, f64::INFINITY, f64::NEG_INFINITY));
            let acc = Acc {
                count: row.count,
                sum,
                min,
                max,
            };
            (self.f)((
                key,
                row.window,
                start,
                start.wrapping_add(row.len),
                acc,
                row.closed,
            ));
            rows += 1;
        }
        Ok(rows)
    }
}

/// Decodes a blob of scope `scope` into its entries, sorted by key.
pub fn decode_blob(
    raw: &[u8],
    scope: &Option<Partition>,
) -> Result<Vec<(StateKey, Entry)>, BlobError> {
    let mut out = Vec::new();
    visit_blob(raw, |e| out.push(entry_of(scope, e)))?;
    Ok(out)
}

/// A blob entry of scope `scope` as an identity and an entry of its own.
pub(crate) fn entry_of(
    scope: &Option<Partition>,
    (key, window, start, end, acc, closed): BlobEntry<'_>,
) -> (StateKey, Entry) {
    let status = if closed {
        EntryStatus::Closed
    } else {
        EntryStatus::Open
    };
    let id = StateKey {
        partition: scope.clone(),
        window,
        start,
        key: key.into(),
    };
    (id, Entry { status, end, acc })
}

/// Which groups of one scope changed since the last snapshot: one bit per group.
#[derive(Debug, Clone, Default)]
pub struct DirtyGroups {
    bits: Vec<u64>,
    any: bool,
}

impl DirtyGroups {
    pub fn mark(&mut self, group: u16) {
        let (word, bit) = (usize::from(group / 64), group % 64);
        if word >= self.bits.len() {
            self.bits.resize(word + 1, 0);
        }
        self.bits[word] |= 1 << bit;
        self.any = true;
    }

    pub fn is_empty(&self) -> bool {
        !self.any
    }

    /// The marked groups, ascending, leaving none marked.
    pub fn take(&mut self) -> Vec<u16> {
        let mut out = Vec::new();
        for (w, word) in self.bits.iter_mut().enumerate() {
            let mut bits = std::mem::take(word);
            while bits != 0 {
                let b = bits.trailing_zeros() as u16;
                out.push(w as u16 * 64 + b);
                bits &= bits - 1;
            }
        }
        self.any = false;
        out
    }
}

/// Splits entries into their groups under `layout`, with aggregation 0, sorted by group; every
/// group's entries sorted by key.
pub fn group_entries(
    layout: &GroupLayout,
    entries: impl IntoIterator<Item = (StateKey, Entry)>,
) -> Vec<GroupContent> {
    let mut by: std::collections::BTreeMap<GroupId, Vec<(StateKey, Entry)>> = Default::default();
    for (k, e) in entries {
        let id = GroupId {
            aggregation: 0,
            scope: k.partition.clone(),
            group: layout.group_of(&k.key),
        };
        by.entry(id).or_default().push((k, e));
    }
    by.into_iter()
        .map(|(id, entries)| GroupContent::new(id, entries))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry_strategy() -> impl Strategy<Value = (StateKey, Entry)> {
        (
            "[a-cé]{0,6}",
            0u16..3,
            -1_000_000i64..1_000_000,
            0i64..100_000,
            any::<bool>(),
            1u64..1000,
            proptest::option::of((-1e9f64..1e9, -1e9f64..1e9, -1e9f64..1e9)),
        )
            .prop_map(|(key, window, start, len, closed, count, values)| {
                let (sum, min, max) = values.unwrap_or((0.0, f64::INFINITY, f64::NEG_INFINITY));
                (
                    StateKey {
                        partition: Some(Partition::new("t", 3)),
                        window,
                        start,
                        key: key.into(),
                    },
                    Entry {
                        status: if closed {
                            EntryStatus::Closed
                        } else {
                            EntryStatus::Open
                        },
                        end: start + len,
                        acc: Acc {
                            count,
                            sum,
                            min,
                            max,
                        },
                    },
                )
            })
    }

    proptest! {
        #[test]
        fn blobs_round_trip_exactly(entries in proptest::collection::vec(entry_strategy(), 0..60)) {
            // one entry per key, as in a group
            let entries: Vec<(StateKey, Entry)> = entries
                .into_iter()
                .collect::<std::collections::BTreeMap<_, _>>()
                .into_iter()
                .collect();
            let raw = encode_blob(&entries).expect("encode");
            let back = decode_blob(&raw, &Some(Partition::new("t", 3))).expect("decode");
            let mut expected = entries.clone();
            expected.sort_by(|a, b| (&a.0.key, a.0.window, a.0.start).cmp(&(&b.0.key, b.0.window, b.0.start)));
            prop_assert_eq!(back, expected);
        }

        #[test]
        fn a_key_prefix_orders_keys_as_their_bytes_do(a in "[a\\x00\\u{7f}é]{0,20}", b in "[a\\x00\\u{7f}é]{0,20}") {
            let (pa, pb) = (key_prefix(&a), key_prefix(&b));
            if pa != pb {
                prop_assert_eq!(pa.cmp(&pb), a.cmp(&b));
            }
        }

        #[test]
        fn a_blob_lists_long_keys_in_order_whatever_the_order_given(
            entries in proptest::collection::vec(entry_strategy(), 0..60),
            shared in "[a-c]{14,18}",
            seed in any::<u64>(),
        ) {
            // keys that share their first 16 bytes or differ only past them
            let mut entries: Vec<(StateKey, Entry)> = entries
                .into_iter()
                .map(|(mut k, e)| {
                    k.key = format!("{shared}{}", k.key).as_str().into();
                    (k, e)
                })
                .collect::<std::collections::BTreeMap<_, _>>()
                .into_iter()
                .collect();
            let sorted = encode_blob(&entries).expect("encode");
            // a shuffle (xorshift from the seed)
            let mut x = seed | 1;
            for i in (1..entries.len()).rev() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                entries.swap(i, (x % (i as u64 + 1)) as usize);
            }
            prop_assert_eq!(&encode_blob(&entries).expect("encode"), &sorted);
            let back = decode_blob(&sorted, &Some(Partition::new("t", 3))).expect("decode");
            let order: Vec<(String, u16, i64)> = back.iter().map(|(k, _)| (k.key.to_string(), k.window, k.start)).collect();
            let mut expected = order.clone();
            expected.sort();
            prop_assert_eq!(order, expected);
        }

        #[test]
        fn the_blob_body_is_what_postcard_writes(
            keys in proptest::collection::vec((any::<u32>(), proptest::collection::vec(any::<u8>(), 0..300)), 0..20),
            rows in proptest::collection::vec((any::<u32>(), any::<u16>(), any::<i64>(), any::<i64>(), any::<bool>(), any::<u64>(), any::<Option<(f64, f64, f64)>>()), 0..20),
        ) {
            let keys: Vec<(u32, &[u8])> = keys.iter().map(|(shared, rest)| (*shared, &rest[..])).collect();
            let rows: Vec<Row> = rows
                .into_iter()
                .map(|(key, window, start_delta, len, closed, count, values)| Row { key, window, start_delta, len, closed, count, values })
                .collect();
            let mut written = Vec::new();
            for row in &rows {
                put_row(&mut written, row);
            }
            let ours = body(&keys, rows.len(), &written);
            let blob = BlobRef { keys, rows };
            prop_assert_eq!(ours, postcard::to_stdvec(&blob).expect("encode"));
        }

        #[test]
        fn a_key_always_lands_in_the_same_group_within_range(key in ".{0,20}", seed in any::<u64>(), groups in 1u16..5000) {
            let layout = GroupLayout { seed, groups };
            let g = layout.group_of(&key);
            prop_assert!(g < groups);
            prop_assert_eq!(g, layout.group_of(&key));
        }
    }

    #[test]
    fn the_hash_is_stable_across_builds() {
        // a key's group is recorded nowhere: it must never change for a given layout
        let layout = GroupLayout {
            seed: 42,
            groups: 4096,
        };
        assert_eq!(
            [
                layout.group_of("user-1"),
                layout.group_of("user-2"),
                layout.group_of("")
            ],
            STABLE
        );
    }
    const STABLE: [u16; 3] = [2119, 1911, 1234];

    #[test]
    fn keys_spread_over_the_groups() {
        let layout = GroupLayout::random(4096);
        let mut counts = vec![0u32; usize::from(layout.groups)];
        for i in 0..409_600 {
            counts[usize::from(layout.group_of(&format!("user-{i}")))] += 1;
        }
        let (min, max) = (counts.iter().min(), counts.iter().max());
        // 100 per group on average; a fair hash stays far inside these bounds
        assert!(min >= Some(&40) && max <= Some(&180), "{min:?}..{max:?}");
    }

    #[test]
    fn damaged_blobs_are_errors_not_panics() {
        let raw = encode_blob(&[]).expect("encode");
        assert_eq!(decode_blob(&raw, &None), Ok(vec![]));
        assert_eq!(decode_blob(&[], &None), Err(BlobError::Empty));
        assert_eq!(decode_blob(&[9, 1, 2], &None), Err(BlobError::Newer(9)));
        assert!(decode_blob(&[1, 200, 0, 0, 0, 1], &None).is_err());
        // a size far beyond what the compressed bytes can hold is refused before allocating
        assert_eq!(
            decode_blob(&[1, 0xff, 0xff, 0xff, 0xff, 0, 0], &None),
            Err(BlobError::Inconsistent(
                "announces more than its compressed size can hold"
            ))
        );
    }

    /// A blob around a body made by hand.
    fn blob_of(keys: Vec<(u32, &[u8])>, rows: Vec<Row>) -> Vec<u8> {
        let body = postcard::to_stdvec(&BlobRef { keys, rows }).expect("encode");
        let mut out = vec![BLOB_VERSION];
        out.extend_from_slice(&lz4_flex::compress_prepend_size(&body));
        out
    }

    fn row(key: u32, start_delta: i64) -> Row {
        Row {
            key,
            window: 0,
            start_delta,
            len: 10,
            closed: false,
            count: 1,
            values: None,
        }
    }

    #[test]
    fn damage_inside_a_blob_body_is_an_error_naming_it() {
        let visit = |raw: &[u8]| {
            let mut seen = Vec::new();
            let read = visit_blob(raw, |e| seen.push((e.0.to_string(), e.2)));
            (read, seen)
        };
        // sound: two keys, the second sharing one byte with the first
        let sound = blob_of(vec![(0, b"ab"), (1, b"c")], vec![row(0, 5), row(1, 5)]);
        let (read, seen) = visit(&sound);
        assert_eq!(read, Ok(2));
        assert_eq!(seen, vec![("ab".to_string(), 5), ("ac".to_string(), 10)]);
        // a key sharing more than the previous key holds
        let raw = blob_of(vec![(0, b"ab"), (3, b"c")], vec![row(0, 5)]);
        assert_eq!(
            visit(&raw),
            (
                Err(BlobError::Inconsistent(
                    "key shares more than the previous key holds"
                )),
                vec![]
            )
        );
        // a key that is not UTF-8
        let raw = blob_of(vec![(0, &[0xff, 0xfe])], vec![row(0, 5)]);
        assert_eq!(
            visit(&raw).0,
            Err(BlobError::Inconsistent("key is not UTF-8"))
        );
        // a row naming a key the blob does not hold, after a sound row
        let raw = blob_of(vec![(0, b"ab")], vec![row(0, 5), row(7, 5)]);
        let (read, seen) = visit(&raw);
        assert_eq!(
            read,
            Err(BlobError::Inconsistent(
                "row names a key the blob does not hold"
            ))
        );
        assert_eq!(seen.len(), 1, "rows are handed over as they are read");
        // a body cut short in its rows
        let body = postcard::to_stdvec(&BlobRef {
            keys: vec![(0, b"ab")],
            rows: vec![row(0, 5), row(0, 5)],
        })
        .expect("encode");
        let mut raw = vec![BLOB_VERSION];
        raw.extend_from_slice(&lz4_flex::compress_prepend_size(&body[..body.len() - 3]));
        assert!(matches!(visit(&raw).0, Err(BlobError::Decode(_))));
        // decode_blob, which lists a blob, says the same
        assert_eq!(
            decode_blob(&raw, &None).map(|e| e.len()),
            visit(&raw).0.map(|_| 0)
        );
    }
}
