use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::checkpoint_id::CheckpointId;
use crate::engine::group::{encode_blob, group_entries};
use crate::engine::{Acc, EntryStatus, GroupLayout};
use crate::event_time::EventTime;
use crate::position::NextOffset;

fn part(n: i32) -> Partition {
    Partition::new("events", n)
}

fn key(p: i32, k: &str) -> StateKey {
    StateKey {
        partition: Some(part(p)),
        window: 0,
        start: 0,
        key: k.into(),
    }
}

fn entry(v: f64) -> Entry {
    Entry {
        status: EntryStatus::Open,
        end: 60_000,
        acc: Acc::of(Some(v)),
    }
}

fn pos(p: i32, next: i64) -> PartitionState {
    PartitionState {
        partition: part(p),
        next: Some(NextOffset(next)),
        max_ts: Some(EventTime(next * 10)),
    }
}

fn tag(run: u64, checkpoint: u64) -> Tag {
    Tag {
        run,
        checkpoint: CheckpointId(checkpoint),
    }
}

/// Keys spread so thinly that the few keys of a test each get a group of their own.
const THIN: GroupLayout = GroupLayout {
    seed: 0,
    groups: u16::MAX,
};

/// The groups holding `entries`, each whole, under `layout`.
fn groups(layout: &GroupLayout, entries: Vec<(StateKey, Entry)>) -> Vec<GroupChange> {
    group_entries(layout, entries)
        .into_iter()
        .map(|g| GroupChange {
            group: g.id.group,
            blob: encode_blob(&g.entries()).expect("blob"),
        })
        .collect()
}

fn publish(t: Tag, kind: Kind, next: i64, entries: Vec<(StateKey, Entry)>) -> Vec<Chunk> {
    chunks(
        "g",
        t,
        kind,
        pos(0, next),
        Some(EventTime(next)),
        groups(&THIN, entries),
        2,
        MAX_CHUNK_BYTES,
        MAX_WHOLE_GROUP_BYTES,
    )
}

#[test]
fn records_round_trip_and_damage_is_refused() {
    let c = publish(tag(7, 3), Kind::Full, 5, vec![(key(0, "a"), entry(1.0))]).remove(0);
    let raw = encode(&c).expect("encode");
    assert_eq!(decode(&raw), Ok(c));
    for i in 0..raw.len() {
        let mut bad = raw.clone();
        bad[i] ^= 0x10;
        assert!(decode(&bad).is_err(), "byte {i} altered and accepted");
    }
    let mut newer = raw.clone();
    newer[7] = 9;
    assert_eq!(decode(&newer), Err(DecodeError::Newer(9)));
    assert_eq!(decode(b"{}"), Err(DecodeError::Foreign));
}

#[test]
fn record_keys_are_unique_per_chunk() {
    let cs = publish(
        tag(1, 2),
        Kind::Full,
        5,
        (0..5)
            .map(|i| (key(0, &i.to_string()), entry(1.0)))
            .collect(),
    );
    let keys: std::collections::BTreeSet<String> = cs.iter().map(Chunk::record_key).collect();
    assert_eq!(keys.len(), cs.len());
    assert_eq!(cs.len(), 3, "5 changes in chunks of 2");
}

#[test]
fn an_unfinished_publication_is_ignored() {
    let mut r = Replay::default();
    for c in publish(tag(1, 1), Kind::Full, 10, vec![(key(0, "a"), entry(1.0))]) {
        r.push(c);
    }
    let mut partial = publish(
        tag(1, 2),
        Kind::Delta { base: tag(1, 1) },
        20,
        (0..4)
            .map(|i| (key(0, &format!("b{i}")), entry(2.0)))
            .collect(),
    );
    partial.pop(); // the writer died before its last chunk
    for c in partial {
        r.push(c);
    }
    let c = r.into_committed(&part(0)).expect("committed");
    assert_eq!(c.tag, Some(tag(1, 1)));
    assert_eq!(c.next_offset(), Some(10));
    assert_eq!(c.entries.len(), 1);
    // every record read is named, the unfinished ones too: a new full publication tombstones
    // them all
    assert_eq!(c.record_keys.len(), 1 + 1);
    assert!(c.record_keys.iter().all(|k| k.starts_with("g/events/0/")));
}

#[test]
fn a_stale_writer_never_mixes_into_the_line() {
    let full = publish(tag(1, 1), Kind::Full, 10, vec![(key(0, "a"), entry(1.0))]);
    // the new owner (run 2) restored (1,1) and continues; the old owner (run 1) publishes late
    let new_owner = publish(
        tag(2, 1),
        Kind::Delta { base: tag(1, 1) },
        30,
        vec![(key(0, "a"), entry(3.0))],
    );
    let stale = publish(
        tag(1, 2),
        Kind::Delta { base: tag(1, 1) },
        20,
        vec![(key(0, "a"), entry(2.0))],
    );
    // either order: the result is one consistent line, never a mix
    for (first, second, want) in [
        (&new_owner, &stale, (tag(2, 1), 30, 3.0)),
        (&stale, &new_owner, (tag(1, 2), 20, 2.0)),
    ] {
        let mut r = Replay::default();
        for c in full.iter().chain(first).chain(second) {
            r.push(c.clone());
        }
        let c = r.committed(&part(0)).expect("committed");
        assert_eq!(c.tag, Some(want.0));
        assert_eq!(c.next_offset(), Some(want.1));
        assert_eq!(c.entries[&key(0, "a")].acc.sum, want.2);
        assert_eq!(r.ignored.len(), 1, "the other one is ignored");
    }
}

#[test]
fn partitions_replay_independently() {
    let mut r = Replay::default();
    let a = chunks(
        "g",
        tag(1, 1),
        Kind::Full,
        pos(0, 5),
        None,
        groups(&THIN, vec![(key(0, "a"), entry(1.0))]),
        10,
        MAX_CHUNK_BYTES,
        MAX_WHOLE_GROUP_BYTES,
    );
    let b = chunks(
        "g",
        tag(1, 1),
        Kind::Full,
        pos(1, 7),
        None,
        groups(&THIN, vec![(key(1, "b"), entry(2.0))]),
        10,
        MAX_CHUNK_BYTES,
        MAX_WHOLE_GROUP_BYTES,
    );
    for c in a.into_iter().chain(b) {
        r.push(c);
    }
    assert_eq!(
        r.committed(&part(0)).and_then(Committed::next_offset),
        Some(5)
    );
    assert_eq!(
        r.committed(&part(1)).and_then(Committed::next_offset),
        Some(7)
    );
    assert!(r.committed(&part(2)).is_none());
}

proptest! {
    /// A writer's line of publications (a full, then deltas of whole groups; a new full now and
    /// then), cut into chunks of any size, replays to exactly the state and position of the last
    /// one, with several keys sharing a group.
    #[test]
    fn replay_yields_the_last_publication_exactly(
        steps in prop::collection::vec((prop::collection::vec((0u8..8, prop::option::of(0u8..50)), 0..12), any::<bool>()), 1..20),
        max in 1usize..6,
    ) {
        let layout = GroupLayout { seed: 3, groups: 3 };
        let mut model: BTreeMap<StateKey, Entry> = BTreeMap::new();
        let mut r = Replay::default();
        let mut prev: Option<Tag> = None;
        let mut next = 0;
        for (i, (changes, full)) in steps.into_iter().enumerate() {
            let t = tag(9, i as u64 + 1);
            let full = full || prev.is_none();
            if full {
                model.clear();
            }
            let mut changed = std::collections::BTreeSet::new();
            for (k, v) in changes {
                let k = key(0, &k.to_string());
                changed.insert(layout.group_of(&k.key));
                match v {
                    Some(v) => { model.insert(k, entry(f64::from(v))); }
                    None => { model.remove(&k); }
                }
            }
            let published: Vec<GroupChange> = if full {
                groups(&layout, model.clone().into_iter().collect())
            } else {
                changed
                    .into_iter()
                    .map(|g| {
                        let members: Vec<(StateKey, Entry)> = model
                            .iter()
                            .filter(|(k, _)| layout.group_of(&k.key) == g)
                            .map(|(k, e)| (k.clone(), *e))
                            .collect();
                        GroupChange { group: g, blob: encode_blob(&members).expect("blob") }
                    })
                    .collect()
            };
            let kind = match (full, prev) { (false, Some(base)) => Kind::Delta { base }, _ => Kind::Full };
            next += 3;
            for c in chunks("g", t, kind, pos(0, next), Some(EventTime(next)), published, max, MAX_CHUNK_BYTES, MAX_WHOLE_GROUP_BYTES) {
                r.push(c);
            }
            prev = Some(t);
        }
        let c = r.into_committed(&part(0)).expect("committed");
        prop_assert_eq!(c.tag, prev);
        prop_assert_eq!(c.next_offset(), Some(next));
        prop_assert_eq!(c.entries, model);
    }
}

#[test]
fn records_of_version_1_are_still_read_and_replayed() {
    #[derive(serde::Serialize)]
    struct V1<'a> {
        group: &'a str,
        tag: Tag,
        kind: Kind,
        index: u32,
        count: u32,
        position: PartitionState,
        watermark: Option<EventTime>,
        upserts: Vec<(StateKey, Entry)>,
        deletes: Vec<StateKey>,
    }
    let v1 = |t: Tag, kind: Kind, upserts, deletes| {
        let body = postcard::to_stdvec(&V1 {
            group: "g",
            tag: t,
            kind,
            index: 0,
            count: 1,
            position: pos(0, 5),
            watermark: None,
            upserts,
            deletes,
        })
        .expect("encode");
        let mut raw = b"CKCL".to_vec();
        raw.extend_from_slice(&1u32.to_be_bytes());
        raw.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
        raw.extend_from_slice(&body);
        decode(&raw).expect("a version 1 record decodes")
    };
    let mut r = Replay::default();
    r.push(v1(
        tag(1, 1),
        Kind::Full,
        vec![(key(0, "a"), entry(1.0)), (key(0, "b"), entry(2.0))],
        vec![],
    ));
    r.push(v1(
        tag(1, 2),
        Kind::Delta { base: tag(1, 1) },
        vec![(key(0, "c"), entry(3.0))],
        vec![key(0, "a")],
    ));
    let c = r.into_committed(&part(0)).expect("committed");
    let keys: Vec<&str> = c.entries.keys().map(|k| k.key.as_str()).collect();
    assert_eq!(keys, vec!["b", "c"]);
}

#[test]
fn a_damaged_group_leaves_the_line_as_it_was() {
    let mut r = Replay::default();
    for c in publish(tag(1, 1), Kind::Full, 10, vec![(key(0, "a"), entry(1.0))]) {
        r.push(c);
    }
    let mut bad = publish(
        tag(1, 2),
        Kind::Delta { base: tag(1, 1) },
        20,
        vec![(key(0, "a"), entry(5.0))],
    );
    if let Changes::Groups(gs) = &mut bad[0].changes {
        gs[0].blob.truncate(3);
    }
    for c in bad {
        r.push(c);
    }
    assert_eq!(r.ignored.len(), 1);
    let c = r.into_committed(&part(0)).expect("committed");
    assert_eq!(c.tag, Some(tag(1, 1)));
    assert_eq!(c.entries[&key(0, "a")].acc.sum, 1.0);
}

#[test]
fn chunks_stay_small_in_bytes_whatever_the_key_length() {
    // long keys that do not compress: 2,000 pseudo-random letters each
    let noise = |i: u64| -> String {
        (0..2_000u64)
            .map(|j| {
                char::from(
                    b'a' + (xxhash_rust::xxh3::xxh3_64(&(i * 4_096 + j).to_be_bytes()) % 26) as u8,
                )
            })
            .collect()
    };
    let ups: Vec<(StateKey, Entry)> = (0..1_000)
        .map(|i| (key(0, &noise(i)), entry(1.0)))
        .collect();
    let cs = chunks(
        "g",
        tag(1, 1),
        Kind::Full,
        pos(0, 1),
        None,
        groups(&GroupLayout::default(), ups),
        2_000,
        MAX_CHUNK_BYTES,
        MAX_WHOLE_GROUP_BYTES,
    );
    assert!(cs.len() > 1);
    for c in &cs {
        let raw = encode(c).expect("encode");
        assert!(
            raw.len() <= MAX_CHUNK_BYTES + 4_096,
            "chunk of {} bytes",
            raw.len()
        );
        assert_eq!(c.count as usize, cs.len());
    }
    let total: usize = cs
        .iter()
        .map(|c| match &c.changes {
            Changes::Groups(gs) => gs
                .iter()
                .map(|g| decode_blob(&g.blob, &Some(part(0))).expect("blob").len())
                .sum(),
            Changes::Keys { .. } | Changes::Piece(_) => 0,
        })
        .sum();
    assert_eq!(total, 1_000);
}

#[test]
fn a_delta_is_published_only_on_the_publication_it_was_computed_from() {
    let last = Some(tag(7, 4));
    assert_eq!(
        publication_kind(true, Some(CheckpointId(3)), last, 7),
        Some(Kind::Full)
    );
    assert_eq!(
        publication_kind(false, Some(CheckpointId(4)), last, 7),
        Some(Kind::Delta { base: tag(7, 4) })
    );
    // checkpoint 4 was never published (abandoned after its timeout): 5's delta on 4 cannot
    // go on top of the publication of 3
    assert_eq!(
        publication_kind(false, Some(CheckpointId(4)), Some(tag(7, 3)), 7),
        None
    );
    // nothing published yet by this run, or by another run
    assert_eq!(
        publication_kind(false, Some(CheckpointId(4)), None, 7),
        None
    );
    assert_eq!(
        publication_kind(false, Some(CheckpointId(4)), Some(tag(6, 4)), 7),
        None
    );
}

/// `n` keys of `len` pseudo-random letters each (they do not compress).
fn noisy_keys(n: u64, len: u64) -> Vec<String> {
    (0..n)
        .map(|i| {
            (0..len)
                .map(|j| {
                    let h = xxhash_rust::xxh3::xxh3_64(&(i * 65_536 + j).to_be_bytes());
                    char::from(b'a' + (h % 26) as u8)
                })
                .collect()
        })
        .collect()
}

/// The version field of an encoded record.
fn version_of(raw: &[u8]) -> u32 {
    u32::from_be_bytes([raw[4], raw[5], raw[6], raw[7]])
}

/// A group holding `n` keys of 2,000 letters that do not compress (about 2 KB a key).
fn wide_group(
    group: u16,
    n: u64,
    tag_key: &str,
    value: f64,
) -> (Vec<(StateKey, Entry)>, GroupChange) {
    let one = GroupLayout { seed: 0, groups: 1 };
    let entries: Vec<(StateKey, Entry)> = noisy_keys(n, 2_000)
        .iter()
        .map(|k| (key(0, &format!("{tag_key}{k}")), entry(value)))
        .collect();
    let mut g = groups(&one, entries.clone());
    assert_eq!(g.len(), 1);
    g[0].group = group;
    (entries, g.remove(0))
}

fn small(g: u16, k: &str, v: f64) -> GroupChange {
    GroupChange {
        group: g,
        blob: encode_blob(&[(key(0, k), entry(v))]).expect("blob"),
    }
}

fn publish_groups(t: Tag, kind: Kind, changed: Vec<GroupChange>) -> Vec<Chunk> {
    chunks(
        "g",
        t,
        kind,
        pos(0, 10 * t.checkpoint.0 as i64),
        None,
        changed,
        2_000,
        MAX_CHUNK_BYTES,
        MAX_WHOLE_GROUP_BYTES,
    )
}

/// Each chunk's pieces as (group, index, count), `None` for a chunk of whole groups.
fn pieces_of(cs: &[Chunk]) -> Vec<Option<(u16, u32, u32)>> {
    cs.iter()
        .map(|c| match &c.changes {
            Changes::Piece(p) => Some((p.group, p.index, p.count)),
            _ => None,
        })
        .collect()
}

/// Encodes and decodes every chunk into a replay, checking each record's size and version
/// (3 for a piece, else 2).
fn replay_records(r: &mut Replay, cs: &[Chunk]) {
    for c in cs {
        let raw = encode(c).expect("encode");
        let piece = matches!(c.changes, Changes::Piece(_));
        let limit = if piece {
            MAX_CHUNK_BYTES
        } else {
            MAX_WHOLE_GROUP_BYTES
        };
        assert!(raw.len() <= limit + 4_096, "record of {} bytes", raw.len());
        assert_eq!(
            version_of(&raw),
            if piece { 3 } else { 2 },
            "chunk {}",
            c.index
        );
        r.push(decode(&raw).expect("decode"));
    }
}

#[test]
fn a_group_larger_than_a_record_travels_in_pieces_and_restores_exactly() {
    // 500 keys: about 1 MB, past what a record may carry whole; 60 keys: about 120 KB, and 200:
    // about 400 KB, past a chunk's share but carried whole (as builds before pieces did)
    let (big, big_group) = wide_group(5, 500, "big", 1.0);
    let (first, first_group) = wide_group(2, 500, "first", 4.0);
    let (mid, mid_group) = wide_group(7, 200, "mid", 5.0);
    assert!(big_group.blob.len() > MAX_WHOLE_GROUP_BYTES);
    assert!(mid_group.blob.len() > MAX_CHUNK_BYTES && mid_group.blob.len() < MAX_WHOLE_GROUP_BYTES);
    let count = |g: &GroupChange| g.blob.len().div_ceil(MAX_CHUNK_BYTES) as u32;
    let (nb, nf) = (count(&big_group), count(&first_group));
    // a group in pieces first, then a small one, two in pieces in a row, a large whole one
    let changed = vec![
        first_group,
        small(1, "before", 1.0),
        big_group.clone(),
        GroupChange {
            group: 6,
            ..big_group
        },
        mid_group,
        small(9, "after", 2.0),
    ];
    let cs = publish_groups(tag(1, 1), Kind::Full, changed);
    let mut want_pieces: Vec<Option<(u16, u32, u32)>> = (0..nf).map(|i| Some((2, i, nf))).collect();
    want_pieces.push(None);
    want_pieces.extend((0..nb).map(|i| Some((5, i, nb))));
    want_pieces.extend((0..nb).map(|i| Some((6, i, nb))));
    want_pieces.extend([None, None]);
    assert_eq!(pieces_of(&cs), want_pieces);
    assert!(cs.iter().all(|c| c.count as usize == cs.len()));
    let mut r = Replay::default();
    replay_records(&mut r, &cs);
    assert!(r.ignored.is_empty(), "{:?}", r.ignored);
    let c = r.committed(&part(0)).expect("committed").clone();
    let mut want: BTreeMap<StateKey, Entry> = BTreeMap::new();
    want.extend(first.iter().cloned());
    want.extend(big.iter().cloned());
    want.extend(mid.iter().cloned());
    want.insert(key(0, "before"), entry(1.0));
    want.insert(key(0, "after"), entry(2.0));
    assert_eq!(c.entries, want);
    assert_eq!(c.tag, Some(tag(1, 1)));

    // a delta in which group 5 shrank to one key: its whole record replaces every key the
    // pieces had carried
    let delta = Kind::Delta { base: tag(1, 1) };
    replay_records(
        &mut r,
        &publish_groups(tag(1, 2), delta, vec![small(5, "big-left", 3.0)]),
    );
    assert!(r.ignored.is_empty(), "{:?}", r.ignored);
    let c = r.into_committed(&part(0)).expect("committed");
    for (k, _) in &big {
        want.remove(k);
    }
    want.insert(key(0, "big-left"), entry(3.0));
    assert_eq!(c.entries, want);
}

#[test]
fn pieces_that_do_not_join_leave_the_line_as_it_was() {
    let (big, big_group) = wide_group(0, 500, "k", 3.0);
    let publication = |checkpoint: u64, kind: Kind| {
        publish_groups(tag(1, checkpoint), kind, vec![big_group.clone()])
    };
    let first = publication(1, Kind::Full);
    assert!(first.len() > 1, "the group is cut into pieces");
    let delta = Kind::Delta { base: tag(1, 1) };
    let mut swapped = publication(2, delta);
    // the pieces' contents in another order
    let (a, b) = swapped.split_at_mut(1);
    std::mem::swap(&mut a[0].changes, &mut b[0].changes);
    let mut cut = publication(2, delta);
    // a piece replaced by a group: the group ends before its last piece
    cut[1].changes = Changes::Groups(Vec::new());
    let mut damaged = publication(2, delta);
    if let Changes::Piece(p) = &mut damaged[0].changes {
        p.bytes[20] ^= 0xff;
    }
    for bad in [swapped, cut, damaged] {
        let mut r = Replay::default();
        for c in first.iter().chain(&bad) {
            r.push(decode(&encode(c).expect("encode")).expect("decode"));
        }
        assert_eq!(r.ignored.len(), 1, "{:?}", r.ignored);
        assert_eq!(r.ignored[0].tag, tag(1, 2));
        let c = r.into_committed(&part(0)).expect("committed");
        assert_eq!(
            c.tag,
            Some(tag(1, 1)),
            "the line keeps the full publication"
        );
        assert_eq!(c.entries.len(), big.len());
    }
}
