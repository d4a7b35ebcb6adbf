use std::collections::BTreeMap;
use std::time::Instant;

use proptest::prelude::*;

use super::portable::{self, Portable};
use super::*;
use crate::checkpoint::history::{CheckpointRecord, Kind, Status};
use crate::checkpoint::protocol::{meta_of, Checkpoint, MaterializedState};
use crate::checkpoint_id::CheckpointId;
use crate::engine::group::group_entries;
use crate::engine::{
    Acc, Entry, EntryStatus, GroupContent, GroupId, GroupLayout, PartitionState, StateDelta,
    StateKey,
};
use crate::event_time::EventTime;
use crate::position::{NextOffset, Partition};
use codec::{GROUP_PREFIX, META_PARTIAL, PARTIAL_FORMAT_OFFSET};

fn key(window: u16, start: i64, k: &str) -> StateKey {
    StateKey {
        partition: None,
        window,
        start,
        key: k.into(),
    }
}

fn entry(status: EntryStatus, v: f64) -> Entry {
    Entry {
        status,
        end: 100,
        acc: Acc::of(Some(v)),
    }
}

/// Checkpoint ids from numbers.
fn ids(ns: &[u64]) -> Vec<CheckpointId> {
    ns.iter().copied().map(CheckpointId).collect()
}

/// So many groups that the few keys of a test each get their own.
const SPREAD: GroupLayout = GroupLayout {
    seed: 0,
    groups: u16::MAX,
};

fn group_of(layout: &GroupLayout, k: &StateKey) -> GroupId {
    GroupId {
        aggregation: 0,
        scope: k.partition.clone(),
        group: layout.group_of(&k.key),
    }
}

/// Builds checkpoints from changes by key as the engine does: every group a change touches is
/// carried whole; a key both upserted and deleted keeps its upsert.
pub(super) struct Line {
    layout: GroupLayout,
    /// The state after the last checkpoint built.
    state: BTreeMap<StateKey, Entry>,
}

impl Line {
    pub(super) fn new(layout: GroupLayout) -> Self {
        Line {
            layout,
            state: BTreeMap::new(),
        }
    }

    /// The groups a checkpoint carries for these changes, and the entries of the state after.
    pub(super) fn changes(
        &mut self,
        full: bool,
        up: Vec<(StateKey, Entry)>,
        del: Vec<StateKey>,
    ) -> (Vec<GroupContent>, u64) {
        if full {
            self.state.clear();
        }
        let mut touched = std::collections::BTreeSet::new();
        for k in del.iter().filter(|k| !up.iter().any(|(u, _)| u == *k)) {
            self.state.remove(k);
            touched.insert(group_of(&self.layout, k));
        }
        for (k, e) in up {
            touched.insert(group_of(&self.layout, &k));
            self.state.insert(k, e);
        }
        let groups = if full {
            group_entries(&self.layout, self.state.clone())
        } else {
            touched
                .into_iter()
                .map(|id| {
                    let entries = self
                        .state
                        .iter()
                        .filter(|(k, _)| group_of(&self.layout, k) == id)
                        .map(|(k, e)| (k.clone(), *e))
                        .collect();
                    GroupContent::new(id, entries)
                })
                .collect()
        };
        (groups, self.state.len() as u64)
    }

    fn cp(
        &mut self,
        id: u64,
        base: Option<u64>,
        full: bool,
        up: Vec<(StateKey, Entry)>,
        del: Vec<StateKey>,
        next: i64,
    ) -> Checkpoint {
        let (groups, entries) = self.changes(full, up, del);
        Checkpoint {
            id: CheckpointId(id),
            base: base.map(CheckpointId),
            trigger_ms: 1_700_000_000_000 + id as i64,
            spec: Default::default(),
            delta: StateDelta {
                full,
                partitions: vec![PartitionState {
                    partition: Partition::new("events", 2),
                    next: Some(NextOffset(next)),
                    max_ts: Some(EventTime(99)),
                }],
                watermark: Some(EventTime(42)),
                groups,
                entries,
                records: 7,
            },
        }
    }
}

/// A checkpoint on an empty state (for full ones, and deltas whose state does not matter).
fn cp(
    id: u64,
    base: Option<u64>,
    full: bool,
    up: Vec<(StateKey, Entry)>,
    del: Vec<StateKey>,
    next: i64,
) -> Checkpoint {
    Line::new(SPREAD).cp(id, base, full, up, del, next)
}

/// Every entry a checkpoint carries.
fn carried(c: &Checkpoint) -> Vec<(StateKey, Entry)> {
    c.delta.groups.iter().flat_map(|g| g.entries()).collect()
}

fn write(store: &Store, c: &Checkpoint, savepoint: Option<&str>) -> Result<WriteStats, StoreError> {
    store.write(&WriteRequest {
        checkpoint: c,
        record: CheckpointRecord::from_meta(&meta_of(c, 0, 0), Status::InProgress),
        savepoint: savepoint.map(String::from),
        started: Instant::now(),
    })
}

/// Flips bits in the last byte of a stored value, as damage from outside would.
fn damage(store: &Store, key: &[u8]) {
    let mut raw = store.tree.get(key).expect("get").expect("present").to_vec();
    let last = raw.len() - 1;
    raw[last] ^= 0x55;
    store.tree.insert(key, raw).expect("insert");
}

fn sorted(mut v: Vec<(StateKey, Entry)>) -> Vec<(StateKey, Entry)> {
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn open(dir: &tempfile::TempDir, retained: usize) -> Store {
    Store::open(dir.path(), super::Open::Create)
        .expect("open")
        .with_retention(Retention {
            checkpoints: retained,
            history: 1000,
        })
}

fn sample() -> Vec<Checkpoint> {
    let mut line = Line::new(SPREAD);
    vec![
        line.cp(
            1,
            None,
            true,
            vec![
                (key(0, 0, "a"), entry(EntryStatus::Open, 1.0)),
                (key(1, -5, "b"), entry(EntryStatus::Open, 2.0)),
            ],
            vec![],
            10,
        ),
        line.cp(
            2,
            Some(1),
            false,
            vec![
                (key(0, 0, "a"), entry(EntryStatus::Closed, 3.0)),
                (key(2, 7, "c/d"), entry(EntryStatus::Open, 4.0)),
            ],
            vec![key(1, -5, "b")],
            20,
        ),
        line.cp(3, Some(2), false, vec![], vec![key(0, 0, "a")], 30),
    ]
}

#[test]
fn every_retained_checkpoint_restores_exactly_after_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut models = BTreeMap::new();
    let mut model = MaterializedState::default();
    {
        let store = open(&dir, 3);
        for c in &sample() {
            assert!(write(&store, c, None).expect("write").bytes > 0);
            model.apply(c, 0, 0).expect("model");
            models.insert(c.id, model.restored());
        }
    }
    let store = open(&dir, 3);
    assert_eq!(store.checkpoint_ids().expect("ids"), ids(&[1, 2, 3]));
    for (id, want) in models {
        let (meta, got) = store.load_checkpoint(id).expect("load");
        assert_eq!(meta.id, id);
        assert_eq!(meta.partitions[0].next, Some(NextOffset(id.0 as i64 * 10)));
        assert_eq!(sorted(got.entries), want.entries, "checkpoint {id}");
    }
    let ids: Vec<u64> = store
        .history(None, 10)
        .expect("history")
        .iter()
        .map(|r| r.id.0)
        .collect();
    assert_eq!(ids, vec![3, 2, 1]);
    assert_eq!(store.next_id().expect("next"), CheckpointId(4));
}

#[test]
fn retention_keeps_the_newest_n_and_reclaims_what_only_older_ones_needed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, 1);
    for c in &sample() {
        write(&store, c, None).expect("write");
        assert_eq!(store.checkpoint_ids().expect("ids"), vec![c.id]);
    }
    // checkpoint 3 holds only c/d: the superseded versions and tombstones are gone
    assert_eq!(store.version_count(), 1);
    let (_, got) = store.load_checkpoint(CheckpointId(3)).expect("load");
    assert_eq!(got.entries.len(), 1);
    assert!(matches!(
        store.load_checkpoint(CheckpointId(2)),
        Err(StoreError::NoSuchCheckpoint {
            checkpoint_id: CheckpointId(2),
            ..
        })
    ));
}

#[test]
fn held_bytes_follow_what_retention_keeps_and_a_copy_holds_the_same_pairs() {
    let held = |retained: usize| {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir, retained);
        for c in &sample() {
            write(&store, c, None).expect("write");
        }
        let pairs: Vec<(Vec<u8>, Vec<u8>)> = store
            .tree
            .iter()
            .map(|i| i.map(|(k, v)| (k.to_vec(), v.to_vec())).expect("item"))
            .collect();
        // a value in a pack counted at its length there
        let sum: u64 = pairs
            .iter()
            .map(|(k, v)| {
                let located = super::packs::Locator::in_value(v);
                (k.len() + located.map_or(v.len(), |at| at.len as usize)) as u64
            })
            .sum();
        assert!(
            pairs
                .iter()
                .any(|(_, v)| super::packs::Locator::in_value(v).is_some()),
            "no value in a pack"
        );
        let held = store.held_bytes().expect("held");
        assert_eq!(held, sum);
        let copy = dir.path().join("copy");
        store.copy_to(&copy).expect("copy");
        // never into a database that is there already
        assert!(store.copy_to(&copy).is_err());
        let db = sled::open(&copy).expect("open the copy");
        let copied: Vec<(Vec<u8>, Vec<u8>)> = db
            .open_tree("checkpoints")
            .expect("tree")
            .iter()
            .map(|i| i.map(|(k, v)| (k.to_vec(), v.to_vec())).expect("item"))
            .collect();
        assert_eq!(copied, pairs);
        // with the packs it points into: the copy restores what the store does
        drop(db);
        let copy = Store::open(&copy, super::Open::Existing).expect("open the copy");
        let newest = store.head().expect("head").expect("a checkpoint");
        assert_eq!(
            sorted(copy.load_checkpoint(newest).expect("copy").1.entries),
            sorted(store.load_checkpoint(newest).expect("store").1.entries)
        );
        held
    };
    // one retained checkpoint lets the versions only older ones needed go
    assert!(held(1) < held(3));
}

#[test]
fn full_checkpoint_drops_entries_it_does_not_list() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, 2);
    let a = vec![(key(0, 0, "a"), entry(EntryStatus::Open, 1.0))];
    let z = vec![(key(0, 0, "z"), entry(EntryStatus::Open, 1.0))];
    write(&store, &cp(1, None, true, a, vec![], 1), None).expect("write");
    write(&store, &cp(2, None, true, z, vec![], 2), None).expect("write");
    let (_, restored) = store.load_checkpoint(CheckpointId(2)).expect("load");
    assert_eq!(restored.entries.len(), 1);
    assert_eq!(restored.entries[0].0.key, "z");
    let (_, older) = store.load_checkpoint(CheckpointId(1)).expect("load");
    assert_eq!(older.entries[0].0.key, "a", "the older one is intact");
}

#[test]
fn a_full_checkpoint_after_restoring_an_older_one_starts_a_new_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, 5);
    for c in &sample() {
        write(&store, c, None).expect("write");
    }
    // restored checkpoint 1 (offset 10), processed a little: offsets below checkpoint 3's
    let (_, one) = store.load_checkpoint(CheckpointId(1)).expect("load");
    let mut up = one.entries.clone();
    up.push((key(0, 5, "new"), entry(EntryStatus::Open, 9.0)));
    write(&store, &cp(4, None, true, up.clone(), vec![], 12), None).expect("new line");
    let (meta, four) = store.load_checkpoint(CheckpointId(4)).expect("load");
    assert_eq!(meta.partitions[0].next, Some(NextOffset(12)));
    assert_eq!(sorted(four.entries), sorted(up));
}

#[test]
fn a_delta_on_the_wrong_base_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, 3);
    write(&store, &cp(1, None, true, vec![], vec![], 1), None).expect("write");
    let up = vec![(key(0, 0, "a"), entry(EntryStatus::Open, 1.0))];
    let err = write(&store, &cp(3, Some(2), false, up, vec![], 5), None).expect_err("wrong base");
    assert!(
        matches!(
            err,
            StoreError::Apply {
                checkpoint_id: CheckpointId(3),
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(store.checkpoint_ids().expect("ids"), ids(&[1]));
    assert_eq!(store.head().expect("head"), Some(CheckpointId(1)));
    assert_eq!(store.version_count(), 0);
}

/// Re-seals the group version at `key` announcing `count` entries, its blob unchanged.
/// Changes the value of group version `key` where it lies (`change` keeps its length): in
/// the version's pack, or in sled.
fn change_value(store: &Store, key: &[u8], change: impl FnOnce(&mut Vec<u8>)) {
    use std::os::unix::fs::FileExt;
    let raw = store.tree.get(key).expect("get").expect("present");
    let (_, version) = codec::decode_group_version_key(key).expect("a group version key");
    match super::packs::Locator::in_value(&raw) {
        Some(at) => {
            let path = store.packs.path_of(at.pack(version.0));
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .expect("pack");
            let mut value = vec![0; at.len as usize];
            file.read_exact_at(&mut value, at.offset).expect("read");
            change(&mut value);
            assert_eq!(value.len(), at.len as usize, "a change of length");
            file.write_all_at(&value, at.offset).expect("write");
        }
        None => {
            let mut value = raw.to_vec();
            change(&mut value);
            store.tree.insert(key, value).expect("insert");
        }
    }
}

/// The pack file of checkpoint `id`'s group versions.
fn pack_path(store: &Store, id: CheckpointId) -> std::path::PathBuf {
    store
        .path
        .join(super::packs::PACKS_DIR)
        .join(id.0.to_string())
}

fn announce(store: &Store, key: &[u8], count: u32) {
    change_value(store, key, |value| {
        let payload = codec::unseal(value).expect("sealed");
        let mut changed = count.to_be_bytes().to_vec();
        changed.extend_from_slice(&payload[4..]);
        *value = codec::seal(&changed);
    });
}

#[test]
fn a_group_holding_other_than_it_announces_is_found_even_when_the_total_agrees() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, 3);
    let first = &sample()[0];
    write(&store, first, None).expect("write");
    // one entry each; announced as two and none, so the checkpoint's total still agrees
    let a = codec::group_version_key(&group_of(&SPREAD, &key(0, 0, "a")), CheckpointId(1));
    let b = codec::group_version_key(&group_of(&SPREAD, &key(1, -5, "b")), CheckpointId(1));
    announce(&store, &a, 2);
    announce(&store, &b, 0);
    for stored in [false, true] {
        let loaded = if stored {
            store.load_checkpoint_stored(CheckpointId(1))
        } else {
            store.load_checkpoint(CheckpointId(1))
        };
        match loaded {
            Err(StoreError::Unreadable(u)) => {
                assert_eq!(u.snapshot, "checkpoint 1");
                assert!(u.detail.contains("entries but"), "{}", u.detail);
                assert!(u.detail.contains("were decoded"), "{}", u.detail);
            }
            other => panic!("stored {stored}: {other:?}"),
        }
    }
}

#[test]
fn damaged_or_missing_versions_make_that_checkpoint_unreadable_not_older_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, 3);
    for c in &sample() {
        write(&store, c, None).expect("write");
    }
    // damage the value of a version written by checkpoint 2
    damage(
        &store,
        &codec::group_version_key(&group_of(&SPREAD, &key(2, 7, "c/d")), CheckpointId(2)),
    );
    for id in [2, 3] {
        match store.load_checkpoint(CheckpointId(id)) {
            Err(StoreError::Unreadable(u)) => {
                assert_eq!(u.snapshot, format!("checkpoint {id}"));
                assert!(u.detail.contains("checksum"), "{}", u.detail);
            }
            other => panic!("checkpoint {id}: {other:?}"),
        }
        // read as stored groups (as a start reads it), the damage is found as it is read too
        match store.load_checkpoint_stored(CheckpointId(id)) {
            Err(StoreError::Unreadable(u)) => {
                assert!(u.detail.contains("checksum"), "{}", u.detail)
            }
            other => panic!("checkpoint {id} stored: {other:?}"),
        }
    }
    assert!(store.load_checkpoint(CheckpointId(1)).is_ok());
    assert!(store.load_checkpoint_stored(CheckpointId(1)).is_ok());
    // a version missing altogether (partly written): the entry count gives it away
    store
        .tree
        .remove(codec::group_version_key(
            &group_of(&SPREAD, &key(1, -5, "b")),
            CheckpointId(1),
        ))
        .expect("remove");
    match store.load_checkpoint(CheckpointId(1)) {
        Err(StoreError::Unreadable(u)) => {
            assert!(u.detail.contains("should hold 2 entries"), "{}", u.detail)
        }
        other => panic!("{other:?}"),
    }
    match store.load_checkpoint_stored(CheckpointId(1)) {
        Err(StoreError::Unreadable(u)) => {
            assert!(u.detail.contains("should hold 2 entries"), "{}", u.detail)
        }
        other => panic!("stored: {other:?}"),
    }
}

#[test]
fn savepoints_outlive_retention_and_travel_through_export_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, 1);
    let cps = sample();
    let mut model = MaterializedState::default();
    model.apply(&cps[0], 0, 0).expect("model");
    write(&store, &cps[0], None).expect("write");
    model.apply(&cps[1], 0, 0).expect("model");
    let stats = write(&store, &cps[1], Some("before-upgrade")).expect("write");
    let sp = stats.savepoint.expect("savepoint made");
    assert_eq!((sp.checkpoint_id, sp.entries), (CheckpointId(2), 2));
    write(&store, &cps[2], None).expect("write");
    assert_eq!(store.checkpoint_ids().expect("ids"), ids(&[3]));
    let (meta, entries) = store.read_savepoint("before-upgrade").expect("read");
    assert_eq!(sorted(entries.clone()), model.restored().entries);
    assert_eq!(meta.meta.partitions[0].next, Some(NextOffset(20)));
    // a name taken by the time of the write: the checkpoint is written, the savepoint not
    let stats = write(
        &store,
        &cp(4, Some(3), false, vec![], vec![], 40),
        Some("before-upgrade"),
    )
    .expect("write");
    assert_eq!(stats.savepoint, None);
    let refused = stats.savepoint_refused.expect("refused");
    assert!(refused.contains("already exists"), "{refused}");
    assert_eq!(store.checkpoint_ids().expect("ids"), ids(&[4]));
    let record = store
        .attempt(CheckpointId(4))
        .expect("attempt")
        .expect("record");
    assert_eq!((record.kind, record.savepoint), (Kind::Checkpoint, None));
    let (kept, _) = store.read_savepoint("before-upgrade").expect("read");
    assert_eq!(
        kept.checkpoint_id,
        CheckpointId(2),
        "the savepoint was replaced"
    );

    let file = dir.path().join("sp.chkpt");
    portable::write_file(
        &file,
        &Portable {
            meta: meta.clone(),
            entries: entries.clone(),
        },
    )
    .expect("export");
    let other = tempfile::tempdir().expect("tempdir");
    let target = open(&other, 3);
    let imported = portable::read_file(&file).expect("read file");
    target
        .import_savepoint(&imported.meta, &imported.entries)
        .expect("import");
    let (_, restored) = target.load_savepoint("before-upgrade").expect("load");
    assert_eq!(sorted(restored.entries), model.restored().entries);
    assert!(matches!(
        target.import_savepoint(&imported.meta, &imported.entries),
        Err(StoreError::SavepointExists { .. })
    ));

    store.delete_savepoint("before-upgrade").expect("delete");
    assert_eq!(store.savepoint_group_count(), 0);
    assert!(matches!(
        store.delete_savepoint("before-upgrade"),
        Err(StoreError::NoSuchSavepoint { .. })
    ));
}

#[test]
fn deleting_checkpoints_keeps_savepoints_history_and_the_id_sequence() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, 3);
    let cps = sample();
    write(&store, &cps[0], Some("keep")).expect("write");
    write(&store, &cps[1], None).expect("write");
    assert_eq!(store.delete_checkpoints().expect("delete"), 2);
    assert!(store.checkpoint_ids().expect("ids").is_empty());
    assert_eq!(store.version_count(), 0);
    assert_eq!(store.head().expect("head"), None);
    assert_eq!(store.savepoints().expect("sp").len(), 1);
    assert_eq!(store.history(None, 10).expect("history").len(), 2);
    assert_eq!(
        store.next_id().expect("next"),
        CheckpointId(3),
        "ids are never reused"
    );
}

#[test]
fn an_abandonment_recorded_after_the_checkpoint_completed_leaves_it_completed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, 3);
    let cps = sample();
    write(&store, &cps[0], None).expect("write");
    // the timeout's record reaches the store after the write it gave up on completed
    let mut abandoned = CheckpointRecord::from_meta(&meta_of(&cps[0], 0, 0), Status::Abandoned);
    abandoned.failure = Some("timed out after 1s".into());
    store.record_attempt(&abandoned, true).expect("record");
    drop(store);
    let store = open(&dir, 3);
    let record = store.attempt(cps[0].id).expect("read").expect("recorded");
    assert_eq!(record.status, Status::Completed);
    assert_eq!(record.failure, None);
    assert!(store.checkpoint_ids().expect("ids").contains(&cps[0].id));
    // an attempt the store does not hold is recorded as it is
    let mut failed = CheckpointRecord::from_meta(&meta_of(&cps[1], 0, 0), Status::Abandoned);
    failed.failure = Some("timed out after 1s".into());
    store.record_attempt(&failed, true).expect("record");
    assert_eq!(
        store.attempt(cps[1].id).expect("read").map(|r| r.status),
        Some(Status::Abandoned)
    );
}

#[test]
fn failed_attempts_are_kept_in_the_paged_history() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, 3);
    let cps = sample();
    write(&store, &cps[0], None).expect("write");
    let mut failed = CheckpointRecord::from_meta(&meta_of(&cps[1], 0, 0), Status::Failed);
    failed.failure = Some("No space left on device".into());
    store.record_attempt(&failed, true).expect("record");
    drop(store);
    let store = open(&dir, 3);
    let page = store.history(None, 1).expect("page");
    assert_eq!(page[0].status, Status::Failed);
    assert_eq!(page[0].failure.as_deref(), Some("No space left on device"));
    let older = store.history(Some(page[0].id), 10).expect("page 2");
    assert_eq!(
        older.iter().map(|r| (r.id.0, r.status)).collect::<Vec<_>>(),
        vec![(1, Status::Completed)]
    );
    assert_eq!(store.next_id().expect("next"), CheckpointId(3));
}

#[test]
fn a_version_1_store_is_migrated_to_one_retained_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = &sample()[0];
    {
        let db = sled::open(dir.path()).expect("sled");
        let tree = db.open_tree("checkpoints").expect("tree");
        tree.insert(codec::META_VERSION, &1u32.to_be_bytes())
            .expect("v");
        let meta = meta_of(c, 5, 50);
        tree.insert(
            codec::v1::META_CURRENT,
            postcard::to_stdvec(&meta).expect("enc"),
        )
        .expect("cur");
        tree.insert(
            codec::id_key(codec::HISTORY_PREFIX, CheckpointId(1)),
            postcard::to_stdvec(&meta).expect("enc"),
        )
        .expect("hist");
        for (k, e) in &carried(c) {
            let mut raw = codec::v1::STATE_PREFIX.to_vec();
            raw.extend_from_slice(&k.window.to_be_bytes());
            raw.extend_from_slice(&((k.start as u64) ^ (1 << 63)).to_be_bytes());
            raw.extend_from_slice(k.key.as_bytes());
            tree.insert(raw, postcard::to_stdvec(e).expect("enc"))
                .expect("state");
        }
        db.flush().expect("flush");
    }
    let store = open(&dir, 3);
    let (meta, restored) = store.load_checkpoint(CheckpointId(1)).expect("migrated");
    assert_eq!(meta.partitions[0].next, Some(NextOffset(10)));
    assert_eq!(sorted(restored.entries), sorted(carried(c)));
    assert_eq!(store.head().expect("head"), Some(CheckpointId(1)));
    assert_eq!(
        store.history(None, 5).expect("history")[0].status,
        Status::Completed
    );
    let c2 = &sample()[1];
    write(&store, c2, None).expect("a delta continues the migrated checkpoint");
}

#[test]
fn a_new_store_records_the_configured_key_groups_and_an_existing_one_keeps_its_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), super::Open::AsIs)
        .expect("open")
        .with_key_groups(7);
    store.upgrade().expect("stamp the new store");
    let created = store.layout().expect("layout");
    assert_eq!(created.groups, 7);
    drop(store);
    // reopened with another setting: the layout keys were filed under stays
    let store = Store::open(dir.path(), super::Open::AsIs)
        .expect("reopen")
        .with_key_groups(4096);
    store.upgrade().expect("upgrade");
    assert_eq!(store.layout().expect("layout"), created);
    // no setting: the default
    let other = tempfile::tempdir().expect("tempdir");
    let store = Store::open(other.path(), super::Open::Create).expect("open");
    assert_eq!(
        store.layout().expect("layout").groups,
        crate::engine::group::DEFAULT_GROUPS
    );
}

#[test]
fn inspecting_a_store_never_stamped_leaves_its_layout_to_the_next_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    // a start that claimed the directory and died before stamping it
    drop(Store::open(dir.path(), super::Open::AsIs).expect("open"));
    let view = Store::open(dir.path(), super::Open::Inspect).expect("inspect");
    assert_eq!(
        view.checkpoint_ids().expect("ids"),
        Vec::<CheckpointId>::new()
    );
    drop(view);
    let store = Store::open(dir.path(), super::Open::AsIs)
        .expect("reopen")
        .with_key_groups(7);
    assert_eq!(
        store.format_version().expect("version"),
        None,
        "still unstamped"
    );
    store.upgrade().expect("stamp");
    assert_eq!(store.layout().expect("layout").groups, 7);
}

#[test]
fn second_opener_gets_a_clear_lock_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _first = Store::open(dir.path(), super::Open::Create).expect("open");
    match Store::open(dir.path(), super::Open::Create) {
        Err(StoreError::Locked { path }) => assert_eq!(path, dir.path()),
        Err(other) => panic!("unexpected error: {other}"),
        Ok(_) => panic!("second open succeeded"),
    }
}

#[test]
fn unknown_format_version_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let db = sled::open(dir.path()).expect("sled");
        let tree = db.open_tree("checkpoints").expect("tree");
        tree.insert(codec::META_VERSION, &99u32.to_be_bytes())
            .expect("insert");
        db.flush().expect("flush");
    }
    match Store::open(dir.path(), super::Open::Create) {
        Err(StoreError::UnsupportedFormat { found: 99, .. }) => {}
        Err(other) => panic!("unexpected error: {other}"),
        Ok(_) => panic!("opened a store of an unknown format"),
    }
}

#[test]
fn offline_open_never_creates_a_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nothing-here");
    assert!(matches!(
        Store::open(&missing, super::Open::Existing),
        Err(StoreError::Missing { .. })
    ));
    assert!(!missing.exists());
}

/// One step of a random checkpoint sequence: a full snapshot or a delta over a small key space.
#[derive(Debug, Clone)]
struct Step {
    full: bool,
    upserts: Vec<(u8, u8)>,
    deletes: Vec<u8>,
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    proptest::collection::vec(
        (
            proptest::bool::weighted(0.15),
            proptest::collection::vec((0u8..12, any::<u8>()), 0..6),
            proptest::collection::vec(0u8..12, 0..4),
        )
            .prop_map(|(full, upserts, deletes)| Step {
                full,
                upserts,
                deletes,
            }),
        1..14,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Whatever the sequence and the retention count, every retained checkpoint restores to
    /// exactly its own state, and no version survives that no retained checkpoint needs.
    #[test]
    fn retained_checkpoints_restore_exactly_and_garbage_is_reclaimed(steps in steps(), retained in 1usize..4, ahead in proptest::bool::ANY) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = open(&dir, retained);
        if ahead {
            // every group version in a batch of its own ahead of the checkpoint's last one
            store.batch_bytes = 1;
        }
        // three groups: keys share them, so a delta rewrites keys it did not change
        let layout = GroupLayout { seed: 5, groups: 3 };
        let mut line = Line::new(layout);
        let mut model = MaterializedState::default();
        let mut states: BTreeMap<u64, Vec<(StateKey, Entry)>> = BTreeMap::new();
        let mut touched: BTreeMap<u64, usize> = BTreeMap::new();
        for (i, step) in steps.iter().enumerate() {
            let id = i as u64 + 1;
            let full = step.full || id == 1;
            let mut up: BTreeMap<StateKey, Entry> = BTreeMap::new();
            if full {
                for (k, e) in model.entries() { up.insert(k, e); }
            }
            for (k, v) in &step.upserts {
                up.insert(key(0, 0, &k.to_string()), entry(EntryStatus::Open, f64::from(*v)));
            }
            let del: Vec<StateKey> = if full { vec![] } else {
                step.deletes.iter().map(|k| key(0, 0, &k.to_string()))
                    .filter(|k| !up.contains_key(k)).collect::<std::collections::BTreeSet<_>>().into_iter().collect()
            };
            if full {
                for k in &step.deletes { up.remove(&key(0, 0, &k.to_string())); }
            }
            let before = model.groups.len();
            let c = line.cp(id, (!full).then_some(id - 1), full, up.into_iter().collect(), del, id as i64);
            model.apply(&c, 0, 0).expect("model");
            write(&store, &c, None).expect("write");
            states.insert(id, model.restored().entries);
            // the versions it wrote: the groups it changed (and emptied), and those it carried
            // out of a pack the others left (`packs`)
            let written = store
                .tree
                .scan_prefix(GROUP_PREFIX)
                .keys()
                .filter(|k| codec::decode_group_version_key(k.as_ref().expect("key")).is_some_and(|(_, v)| v.0 == id))
                .count();
            touched.insert(id, written.max(c.delta.groups.len()) + if full { before } else { 0 });
        }
        let ids = store.checkpoint_ids().expect("ids");
        let n = steps.len();
        prop_assert_eq!(ids.len(), retained.min(n));
        prop_assert_eq!(ids.last().copied(), Some(CheckpointId(n as u64)));
        for id in &ids {
            let (_, got) = store.load_checkpoint(*id).expect("load");
            prop_assert_eq!(&sorted(got.entries), &states[&id.0], "checkpoint {}", id);
            let (_, stored) = store.load_checkpoint_stored(*id).expect("load stored");
            prop_assert_eq!(stored.len(), states[&id.0].len() as u64);
            prop_assert_eq!(&stored.into_entries().expect("decodes"), &states[&id.0], "checkpoint {} stored", id);
        }
        let oldest = ids[0];
        let oldest_groups = group_entries(&layout, states[&oldest.0].clone()).len();
        let bound = oldest_groups + ids[1..].iter().map(|i| touched[&i.0]).sum::<usize>();
        prop_assert!(store.version_count() <= bound, "{} versions, at most {} needed", store.version_count(), bound);
    }
}

/// Entries of twenty keys, each in a group of its own, with values from `v`.
fn twenty(v: f64) -> Vec<(StateKey, Entry)> {
    (0..20)
        .map(|i| {
            (
                key(0, 0, &format!("k{i}")),
                entry(EntryStatus::Open, v + f64::from(i)),
            )
        })
        .collect()
}

#[test]
fn a_checkpoint_whose_last_batch_never_landed_leaves_nothing_a_later_one_restores() {
    for reopen in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = open(&dir, 3);
        store.batch_bytes = 1;
        let mut line = Line::new(SPREAD);
        let one = line.cp(1, None, true, twenty(1.0), vec![], 10);
        write(&store, &one, None).expect("write 1");
        assert!(store.tree.get(META_PARTIAL).expect("get").is_none());
        // checkpoint 2 rewrites every group, and stops after 3 of its batches, as a crash would
        store
            .fail_after_batches
            .store(3, std::sync::atomic::Ordering::Relaxed);
        let two = Line::new(SPREAD).cp(2, None, true, twenty(100.0), vec![], 20);
        assert!(write(&store, &two, None).is_err());
        assert!(store.tree.get(META_PARTIAL).expect("get").is_some());
        // builds that know nothing of versions written ahead refuse the store meanwhile; this
        // one reads it as its own format
        let stamped = |store: &Store| store.stamped_version().expect("version");
        assert_eq!(
            stamped(&store),
            Some(FORMAT_VERSION + PARTIAL_FORMAT_OFFSET)
        );
        assert_eq!(
            store.format_version().expect("version"),
            Some(FORMAT_VERSION)
        );
        let orphans = |store: &Store| {
            store
                .tree
                .scan_prefix(GROUP_PREFIX)
                .keys()
                .filter(|k| {
                    k.as_ref().is_ok_and(|k| {
                        codec::decode_group_version_key(k).is_some_and(|(_, v)| v.0 == 2)
                    })
                })
                .count()
        };
        assert_eq!(orphans(&store), 3, "three versions were written ahead");
        if reopen {
            drop(store);
            store = open(&dir, 3);
        }
        store
            .fail_after_batches
            .store(usize::MAX, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(store.checkpoint_ids().expect("ids"), ids(&[1]));
        // a delta on checkpoint 1 that changes one key: every other group must come from 1
        let next = store.next_id().expect("next");
        let three = line.cp(
            next.0,
            Some(1),
            false,
            vec![(key(0, 0, "k0"), entry(EntryStatus::Open, 7.0))],
            vec![],
            30,
        );
        write(&store, &three, None).expect("write 3");
        // the id of the incomplete checkpoint is not used again
        assert_eq!(next.0, 3);
        assert_eq!(orphans(&store), 0, "reopen {reopen}");
        assert!(store.tree.get(META_PARTIAL).expect("get").is_none());
        assert_eq!(stamped(&store), Some(FORMAT_VERSION));
        let mut expected = twenty(1.0);
        expected[0].1 = entry(EntryStatus::Open, 7.0);
        let (_, got) = store.load_checkpoint(next).expect("load");
        assert_eq!(sorted(got.entries), sorted(expected), "reopen {reopen}");
        let (_, got) = store.load_checkpoint(CheckpointId(1)).expect("load 1");
        assert_eq!(sorted(got.entries), sorted(twenty(1.0)));
    }
}

#[test]
fn a_full_checkpoint_can_be_written_over_a_damaged_version_after_a_fallback() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, 3);
    for c in &sample() {
        write(&store, c, None).expect("write");
    }
    damage(
        &store,
        &codec::group_version_key(&group_of(&SPREAD, &key(2, 7, "c/d")), CheckpointId(2)),
    );
    assert!(store.load_checkpoint(CheckpointId(3)).is_err());
    let (_, one) = store
        .load_checkpoint(CheckpointId(1))
        .expect("fallback target");
    let next = store.next_id().expect("next");
    write(
        &store,
        &cp(next.0, None, true, one.entries.clone(), vec![], 11),
        None,
    )
    .expect("first full after the fallback");
    let (_, got) = store.load_checkpoint(next).expect("load");
    assert_eq!(sorted(got.entries), sorted(one.entries));
}

#[test]
fn a_damaged_savepoint_is_left_out_of_the_list_not_fatal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, 3);
    let cps = sample();
    write(&store, &cps[0], Some("old")).expect("write");
    write(&store, &cps[1], Some("new")).expect("write");
    damage(&store, &codec::savepoint_meta_key("old"));
    let names: Vec<String> = store
        .savepoints()
        .expect("list")
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, vec!["new".to_string()]);
    assert_eq!(
        store.savepoint_names().expect("names"),
        vec!["new".to_string(), "old".to_string()]
    );
    assert!(matches!(
        store.load_savepoint("old"),
        Err(StoreError::Unreadable(_))
    ));
}

#[test]
fn a_key_upserted_and_deleted_in_one_delta_keeps_its_upsert_everywhere() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, 3);
    let a = key(0, 0, "a");
    let mut line = Line::new(SPREAD);
    let c1 = line.cp(
        1,
        None,
        true,
        vec![(a.clone(), entry(EntryStatus::Open, 1.0))],
        vec![],
        1,
    );
    let c2 = line.cp(
        2,
        Some(1),
        false,
        vec![(a.clone(), entry(EntryStatus::Open, 2.0))],
        vec![a.clone()],
        2,
    );
    let mut model = MaterializedState::default();
    model.apply(&c1, 0, 0).expect("model");
    model.apply(&c2, 0, 0).expect("model");
    write(&store, &c1, None).expect("write");
    write(&store, &c2, Some("sp")).expect("write");
    let (_, sp) = store.read_savepoint("sp").expect("savepoint");
    assert_eq!(sorted(sp), model.restored().entries);
    let (_, got) = store.load_checkpoint(CheckpointId(2)).expect("load");
    assert_eq!(sorted(got.entries), model.restored().entries);
}

#[test]
fn imports_refuse_bad_names_and_duplicate_entries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, 3);
    write(&store, &sample()[0], Some("a")).expect("write");
    let (meta, entries) = store.read_savepoint("a").expect("read");
    let mut other = meta.clone();
    other.name = "a/x".into();
    assert!(matches!(
        store.import_savepoint(&other, &entries),
        Err(StoreError::InvalidSavepoint(_))
    ));
    let mut dup = meta.clone();
    dup.name = "b".into();
    dup.entries = 3;
    let mut twice = entries.clone();
    twice.push(entries[0].clone());
    assert!(matches!(
        store.import_savepoint(&dup, &twice),
        Err(StoreError::InvalidSavepoint(_))
    ));
    store.read_savepoint("a").expect("a is intact");
}

#[test]
fn every_claim_has_a_higher_epoch_even_when_the_owner_file_is_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut epochs = Vec::new();
    for round in 0..3 {
        let mut store = open(&dir, 3);
        epochs.push(store.claim("pod-0").expect("claim").epoch);
        store.record_claim().expect("record");
        if round == 1 {
            drop(store);
            std::fs::remove_file(dir.path().join(OWNER_FILE)).expect("remove owner file");
        }
    }
    assert_eq!(epochs, vec![1, 2, 3]);
    let on_file = read_owner_file(dir.path())
        .expect("read")
        .expect("owner file");
    assert_eq!((on_file.epoch, on_file.instance.as_str()), (3, "pod-0"));
}

#[test]
fn a_newer_claim_stops_every_write_and_leaves_the_store_as_it_was() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(&dir, 3);
    let mine = store.claim("pod-0").expect("claim");
    let sample = sample();
    write(&store, &sample[0], None).expect("first checkpoint");
    // another process claims the volume (its sled lock did not keep it out)
    let newer = Owner {
        epoch: mine.epoch + 1,
        instance: "pod-0-replacement".into(),
        pid: mine.pid + 1,
        claimed_at_ms: mine.claimed_at_ms,
    };
    std::fs::write(
        dir.path().join(OWNER_FILE),
        serde_json::to_vec(&newer).expect("json"),
    )
    .expect("write owner file");
    let err = write(&store, &sample[1], None).expect_err("superseded");
    match &err {
        StoreError::Superseded {
            newer: n, mine: m, ..
        } => {
            assert_eq!((**n).clone(), newer);
            assert_eq!((**m).clone(), mine);
        }
        other => panic!("expected Superseded, got {other}"),
    }
    assert!(err.to_string().contains("pod-0-replacement"), "{err}");
    let record = CheckpointRecord::from_meta(&meta_of(&sample[1], 0, 0), Status::Failed);
    assert!(matches!(
        store.record_attempt(&record, true),
        Err(StoreError::Superseded { .. })
    ));
    assert!(matches!(
        store.delete_checkpoints(),
        Err(StoreError::Superseded { .. })
    ));
    assert_eq!(store.head().expect("head"), Some(CheckpointId(1)));
    assert_eq!(store.checkpoint_ids().expect("ids"), ids(&[1]));
    assert_eq!(store.attempt(CheckpointId(2)).expect("attempt"), None);
}

#[test]
fn a_missing_or_older_owner_record_is_written_again_and_writes_go_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(&dir, 3);
    let mine = store.claim("pod-0").expect("claim");
    let sample = sample();
    std::fs::remove_file(dir.path().join(OWNER_FILE)).expect("remove");
    write(&store, &sample[0], None).expect("write with the record missing");
    assert_eq!(
        read_owner_file(dir.path()).expect("read"),
        Some(mine.clone())
    );
    let older = Owner {
        epoch: mine.epoch - 1,
        ..mine.clone()
    };
    std::fs::write(
        dir.path().join(OWNER_FILE),
        serde_json::to_vec(&older).expect("json"),
    )
    .expect("write");
    write(&store, &sample[1], None).expect("write over an older record");
    assert_eq!(read_owner_file(dir.path()).expect("read"), Some(mine));
    assert_eq!(store.head().expect("head"), Some(CheckpointId(2)));
}

#[test]
fn stores_opened_without_a_claim_never_check_the_owner() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut store = open(&dir, 3);
        store.claim("pod-0").expect("claim");
    }
    std::fs::write(dir.path().join(OWNER_FILE), b"{not json").expect("write");
    // offline commands hold the lock and claim nothing
    let store = open(&dir, 3);
    write(&store, &sample()[0], None).expect("offline write");
    assert!(store.owner().is_none());
}

#[test]
fn a_reset_position_moves_one_partition_either_way_keeping_the_state_and_noting_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, 3);
    let mut model = MaterializedState::default();
    for c in &sample() {
        write(&store, c, None).expect("write");
        model.apply(c, 0, 0).expect("model");
    }
    let (meta, _) = store.load().expect("load").expect("checkpoint");
    let partition = meta.partitions[0].partition.clone();
    assert_eq!(meta.partitions[0].next, Some(NextOffset(30)));

    // forward (records deleted), then back (the topic recreated)
    for (to, id) in [(100, 4), (5, 5)] {
        let before = store
            .load()
            .expect("load")
            .expect("checkpoint")
            .0
            .partitions[0]
            .next;
        let (got, held) = store
            .reset_position(&partition, NextOffset(to), &format!("moved to {to}"))
            .expect("reset");
        assert_eq!((got, held), (CheckpointId(id), before));
        let (meta, state) = store.load().expect("load").expect("checkpoint");
        assert_eq!(meta.id, CheckpointId(id));
        assert_eq!(meta.partitions[0].next, Some(NextOffset(to)));
        assert_eq!(
            sorted(state.entries),
            model.restored().entries,
            "the state is unchanged"
        );
        assert_eq!(
            store.note(CheckpointId(id)).expect("note").as_deref(),
            Some(format!("moved to {to}").as_str())
        );
        let record = store
            .attempt(CheckpointId(id))
            .expect("history")
            .expect("recorded");
        assert_eq!(record.status, Status::Completed);
        assert_eq!(record.partitions[0].next_offset, Some(to));
        // offline, the configured retention is not known: nothing is removed
        let all: Vec<u64> = (1..=id).collect();
        assert_eq!(store.checkpoint_ids().expect("ids"), ids(&all));
    }
    // the service's next delta goes on from the moved position, and applies retention
    let mut next = Line::new(SPREAD).cp(6, Some(5), false, vec![], vec![], 9);
    next.delta.entries = model.restored().entries.len() as u64;
    write(&store, &next, None).expect("a delta after a reset");
    assert_eq!(store.checkpoint_ids().expect("ids"), ids(&[4, 5, 6]));
    let (_, state) = store.load().expect("load").expect("checkpoint");
    assert_eq!(sorted(state.entries), model.restored().entries);

    let unknown = crate::position::Partition::new("elsewhere", 9);
    let text = store
        .reset_position(&unknown, NextOffset(1), "x")
        .expect_err("no position held for it")
        .to_string();
    assert!(
        text.contains("elsewhere[9]") && text.contains(&partition.to_string()),
        "{text}"
    );

    let empty = tempfile::tempdir().expect("tempdir");
    let text = open(&empty, 3)
        .reset_position(&partition, NextOffset(1), "x")
        .expect_err("nothing to move")
        .to_string();
    assert!(text.contains("holds no checkpoint"), "{text}");
}

/// Files in a store's `blobs` directory (sled's values and nodes too large for its log).
pub(super) fn blob_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir.join("blobs")).map_or(0, |d| d.count())
}

/// The 20,000 entries of checkpoint `id` of [`write_large_versions`], sorted.
fn large_entries(id: u64) -> Vec<(StateKey, Entry)> {
    let all = (0..20_000u32)
        .map(|i| {
            let v = f64::from(i.wrapping_mul(2_654_435_761) ^ id as u32);
            (key(0, 0, &format!("k{i}")), entry(EntryStatus::Open, v))
        })
        .collect();
    sorted(all)
}

/// Writes `checkpoints` full checkpoints of one group of 20,000 entries (a version far larger
/// than sled keeps in its log) into `store`, and returns the largest bytes one wrote.
fn write_large_versions(store: &Store, checkpoints: u64) -> u64 {
    let mut line = Line::new(GroupLayout { seed: 0, groups: 1 });
    let mut largest = 0u64;
    for id in 1..=checkpoints {
        let up = large_entries(id);
        let base = id.checked_sub(1).filter(|b| *b > 0);
        let c = line.cp(id, base, true, up, vec![], 10);
        let stats = write(store, &c, None).expect("write");
        largest = largest.max(stats.bytes);
    }
    largest
}

#[test]
fn replaced_group_versions_leave_the_disk_instead_of_piling_up_with_history() {
    let checkpoints = 24u64;
    // the blob files once sled has written `checkpoints` large versions, and then until
    // `settled` says the count is final or 30 s passed: sled deletes replaced files from its
    // own threads, some time after the flush that retires their segment (longer on a loaded
    // machine)
    let files_after = |advances: super::reclaim::Advances,
                       settled: &dyn Fn(usize, usize) -> bool| {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = open(&dir, 1);
        store.advances = advances;
        // group versions in sled, as a store migrated from format 5 holds them: large values
        // there are what sled writes to blob files
        store.values_in_sled = true;
        let largest = write_large_versions(&store, checkpoints);
        assert!(
            largest > (super::reclaim::SEGMENT_SIZE / 4) as u64,
            "the versions are not blobs: {largest} bytes"
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut files = blob_files(dir.path());
        while std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(200));
            let now = blob_files(dir.path());
            if settled(files, now) {
                return now;
            }
            files = now;
        }
        files
    };
    // sled alone keeps every version ever written and every node that held them: the count
    // once it stopped changing
    let kept = files_after(super::reclaim::Advances::new(u64::MAX), &|before, now| {
        before == now
    });
    assert!(
        kept >= checkpoints as usize,
        "{kept} blob files without advances"
    );
    // with the log advanced at every checkpoint: the newest version and the nodes pointing at
    // it, once sled's deletions brought the count there
    let files = files_after(super::reclaim::Advances::new(0), &|_, now| now < 8);
    assert!(
        (1..8).contains(&files),
        "{files} blob files after {checkpoints} checkpoints retaining one"
    );
}

/// How many batches `store` applied and how many times it synced sled's log, so far.
fn batches_and_log_syncs(store: &Store) -> (usize, usize) {
    let d = store.durability.as_ref().expect("a store syncs");
    let batches = store.batches.load(std::sync::atomic::Ordering::Relaxed);
    (batches, d.log_syncs())
}

/// The counts of [`batches_and_log_syncs`] between `before` and `after`.
fn since(before: (usize, usize), after: (usize, usize)) -> (usize, usize) {
    (after.0 - before.0, after.1 - before.1)
}

#[test]
fn every_blob_file_is_synced_around_each_batch_and_the_log_after_each_flush() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(&dir, 2);
    // versions written in batches ahead of the last one too
    // group versions in sled, as a store migrated from format 5 holds them: large values
    // there are what sled writes to blob files
    store.values_in_sled = true;
    store.batch_bytes = 64 << 10;
    // no log advances: their own syncs would blur the count below
    store.advances = super::reclaim::Advances::new(u64::MAX);
    let d = store.durability.as_ref().expect("a store syncs");
    let checks = d.checks();
    let before = batches_and_log_syncs(&store);
    // every batch and flush checks, in the test build, that no blob file on disk is unsynced
    // (`Store::check_synced`): before each batch (its flush) and after it, before each flush
    write_large_versions(&store, 4);
    let d = store.durability.as_ref().expect("a store syncs");
    assert!(blob_files(dir.path()) > 0, "the versions are not blobs");
    assert!(d.checks() >= checks + 4 * 3, "{} checks", d.checks());
    // the log synced before every batch (everything before it durable before sled may reuse
    // the segments it frees) and after every checkpoint's flush
    let (batches, log_syncs) = since(before, batches_and_log_syncs(&store));
    assert!(batches > 4, "{batches} batches: none written ahead");
    assert!(
        log_syncs >= batches + 4,
        "{log_syncs} log syncs for {batches} batches and 4 checkpoints"
    );
    // the log file synced at the length it has after the last flush
    let len = std::fs::metadata(dir.path().join("db")).expect("log").len();
    assert_eq!(d.log_synced_len(), Some(len));
}

#[test]
fn the_log_is_synced_before_it_is_advanced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(&dir, 2);
    // advanced at every checkpoint
    // group versions in sled, as a store migrated from format 5 holds them: large values
    // there are what sled writes to blob files
    store.values_in_sled = true;
    store.advances = super::reclaim::Advances::new(0);
    let before = batches_and_log_syncs(&store);
    write_large_versions(&store, 4);
    assert!(advanced(&store), "the log was not advanced");
    let (batches, log_syncs) = since(before, batches_and_log_syncs(&store));
    // before each batch, before each advance (its filler may reuse the segments the batch
    // freed), after each flush
    assert!(
        log_syncs >= batches + 2 * 4,
        "{log_syncs} log syncs for {batches} batches and 4 advanced checkpoints"
    );
}

#[test]
fn after_a_failed_sync_sled_does_not_flush_what_it_holds_when_the_store_closes() {
    for failed in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir, 2);
        write(&store, &sample()[0], None).expect("write");
        // written, not flushed: in sled's buffer only
        store.tree.insert(b"unflushed", b"x").expect("insert");
        if failed {
            store
                .durability
                .as_ref()
                .expect("a store syncs")
                .fail_for_test();
        }
        drop(store);
        // what the disk holds now (a copy: sled's lock stays with the handles left behind)
        let image = tempfile::tempdir().expect("tempdir");
        super::golden::copy_dir(dir.path(), image.path()).expect("copy");
        let db = sled::Config::new()
            .path(image.path())
            .segment_size(super::reclaim::SEGMENT_SIZE)
            .open()
            .expect("reopen");
        let tree = db.open_tree("checkpoints").expect("tree");
        assert_eq!(
            tree.contains_key(b"unflushed").expect("read"),
            !failed,
            "after a failed sync: {failed}"
        );
    }
}

#[test]
fn a_crash_image_taken_after_advances_restores_the_newest_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(&dir, 2);
    store.advances = super::reclaim::Advances::new(0);
    let checkpoints = 6u64;
    // group versions in sled, as a store migrated from format 5 holds them: large values
    // there are what sled writes to blob files
    store.values_in_sled = true;
    write_large_versions(&store, checkpoints);
    // the store still open, as a SIGKILL would leave it
    let image = tempfile::tempdir().expect("tempdir");
    super::golden::copy_dir(dir.path(), image.path()).expect("copy the open store");
    drop(store);
    let store = Store::open(image.path(), super::Open::Existing).expect("reopen the image");
    let (meta, state) = store.load().expect("load").expect("a checkpoint");
    assert_eq!(meta.id, CheckpointId(checkpoints));
    assert!(sorted(state.entries) == large_entries(checkpoints));
    // the older retained checkpoint restores exactly too
    let ids = store.checkpoint_ids().expect("ids");
    assert_eq!(
        ids,
        vec![CheckpointId(checkpoints - 1), CheckpointId(checkpoints)]
    );
    let (_, older) = store
        .load_checkpoint(CheckpointId(checkpoints - 1))
        .expect("load the older");
    assert!(sorted(older.entries) == large_entries(checkpoints - 1));
}

#[test]
fn a_read_that_splits_a_node_a_write_left_overfull_syncs_the_blob_file_it_wrote() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, 2);
    // the tree's one leaf (a new store's few metadata keys) brought to one entry more than
    // sled lets a leaf hold, with keys before every other: the write that added the last one
    // leaves the split to the next traversal, and each half is larger than a blob's threshold
    let held = store.tree.len();
    assert!(held < 8, "{held} keys in a new store: more than one leaf");
    let value = vec![7u8; super::reclaim::SEGMENT_SIZE / 12];
    for i in 0..(17 - held) as u8 {
        store
            .tree
            .insert([b'a', i], value.as_slice())
            .expect("insert");
    }
    store.flush().expect("flush");
    let before = blob_files(dir.path());
    // a read of the metadata passes through that leaf, splits it, and writes a blob file
    assert_eq!(store.checkpoint_ids().expect("ids"), vec![]);
    let after = blob_files(dir.path());
    assert!(
        after > before,
        "the read wrote no blob file ({before} before, {after} after)"
    );
    // synced as the read's hold ended, not left for the next write's pass
    let d = store.durability.as_ref().expect("a store syncs");
    d.assert_all_synced("after a read");
}

#[test]
fn a_store_flushes_and_syncs_what_it_holds_as_it_closes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, 2);
    let d = std::sync::Arc::clone(store.durability.as_ref().expect("a store syncs"));
    // an attempt recorded without a flush: durable only once the store closes
    let record = CheckpointRecord::from_meta(&meta_of(&sample()[0], 0, 0), Status::Failed);
    store.record_attempt(&record, false).expect("record");
    let syncs = d.log_syncs();
    drop(store);
    assert!(
        d.log_syncs() > syncs,
        "the log was not synced as the store closed"
    );
    let len = std::fs::metadata(dir.path().join("db")).expect("log").len();
    assert_eq!(
        d.log_synced_len(),
        Some(len),
        "synced before the log's last write"
    );
    // and the attempt is there when the store opens again
    let store = open(&dir, 2);
    assert!(store.attempt(record.id).expect("attempt").is_some());
}

#[test]
fn a_read_waits_while_another_thread_writes_and_the_gauges_do_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(&dir, 2);
    // group versions in sled, as a store migrated from format 5 holds them: large values
    // there are what sled writes to blob files
    store.values_in_sled = true;
    write_large_versions(&store, 1);
    let held = store.exclusive();
    std::thread::scope(|s| {
        let (started, reading) = std::sync::mpsc::channel();
        let store = &store;
        let reader = s.spawn(move || {
            started.send(()).expect("send");
            store.checkpoint_ids()
        });
        reading.recv().expect("the reader started");
        // the record path's reads give up instead of waiting: the gauges' at once, a
        // savepoint name's check after a short wait
        let now = s.spawn(|| store.checkpoint_ids_now().is_none()).join();
        assert!(
            now.expect("join"),
            "checkpoint_ids_now read while the store was held"
        );
        let now = s.spawn(|| store.savepoint_now("sp").is_none()).join();
        assert!(
            now.expect("join"),
            "savepoint_now read while the store was held"
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(
            !reader.is_finished(),
            "a read ran while another thread held the store"
        );
        drop(held);
        let ids = reader.join().expect("join").expect("ids");
        assert_eq!(ids, vec![CheckpointId(1)]);
    });
    // and a read on the thread that holds the store (a write's own reads) does not wait
    let _held = store.exclusive();
    assert_eq!(store.checkpoint_ids().expect("ids"), vec![CheckpointId(1)]);
    assert!(store.checkpoint_ids_now().is_some());
    assert!(matches!(
        store.savepoint_now("sp"),
        Some(Err(StoreError::NoSuchSavepoint { .. }))
    ));
}

/// Whether `store` ever advanced its log (the filler's tree exists once it did).
fn advanced(store: &Store) -> bool {
    let filler = super::reclaim::FILLER_TREE.as_bytes();
    store.db.tree_names().iter().any(|t| t.as_ref() == filler)
}

#[test]
fn deleting_checkpoints_or_savepoints_and_importing_one_count_toward_the_next_advance() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(&dir, 3);
    let cps = sample();
    write(&store, &cps[0], None).expect("write");
    write(&store, &cps[1], Some("sp")).expect("write");
    assert!(!advanced(&store), "two small checkpoints advanced the log");
    // from here on, any byte counted is enough
    store.advances = super::reclaim::Advances::new(1);
    store.delete_savepoint("sp").expect("delete the savepoint");
    assert!(advanced(&store), "deleting a savepoint was not counted");

    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(&dir, 3);
    write(&store, &cps[0], None).expect("write");
    assert!(!advanced(&store), "a small checkpoint advanced the log");
    store.advances = super::reclaim::Advances::new(1);
    assert_eq!(store.delete_checkpoints().expect("delete"), 1);
    assert!(advanced(&store), "deleting checkpoints was not counted");

    let source = tempfile::tempdir().expect("tempdir");
    let from = open(&source, 3);
    write(&from, &cps[0], Some("sp")).expect("write");
    let (meta, entries) = from.read_savepoint("sp").expect("read");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(&dir, 3);
    assert!(!advanced(&store), "a new store advanced the log");
    store.advances = super::reclaim::Advances::new(1);
    store.import_savepoint(&meta, &entries).expect("import");
    assert!(advanced(&store), "importing a savepoint was not counted");
}

#[test]
fn checkpoints_that_write_little_never_advance_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, 3);
    for c in &sample() {
        write(&store, c, None).expect("write");
    }
    assert!(!advanced(&store), "{:?}", store.db.tree_names());
}

mod packs;
