use super::*;
use crate::checkpoint::protocol::MaterializedState;
use crate::engine::{Acc, EntryStatus, PartitionState, StateDelta, StateKey};
use crate::position::{NextOffset, Partition};

fn key(window: u16, start: i64, k: &str) -> StateKey {
    StateKey {
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

fn cp(
    id: u64,
    base: Option<u64>,
    full: bool,
    up: Vec<(StateKey, Entry)>,
    del: Vec<StateKey>,
    next: i64,
) -> Checkpoint {
    Checkpoint {
        id,
        base,
        trigger_ms: 1_700_000_000_000 + id as i64,
        spec: Default::default(),
        delta: StateDelta {
            full,
            partitions: vec![PartitionState {
                partition: Partition::new("events", 2),
                next: Some(NextOffset(next)),
                max_ts: Some(99),
            }],
            watermark: Some(42),
            upserts: up,
            deletes: del,
            records: 7,
        },
    }
}

#[test]
fn checkpoints_survive_reopen_and_equal_the_protocol_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cps = vec![
        cp(
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
        cp(
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
        cp(3, Some(2), false, vec![], vec![key(0, 0, "a")], 30),
    ];
    let mut model = MaterializedState::default();
    {
        let store = Store::open(dir.path()).expect("open");
        for c in &cps {
            let stats = store.write(c, Instant::now()).expect("write");
            assert!(stats.bytes > 0);
            model.apply(c, 0, 0).expect("model");
        }
    }
    let store = Store::open(dir.path()).expect("reopen");
    let (meta, restored) = store.load().expect("load").expect("has checkpoint");
    assert_eq!(meta.id, 3);
    assert_eq!(meta.partitions[0].next, Some(NextOffset(30)));
    assert_eq!(meta.watermark, Some(42));
    let mut got = restored.entries.clone();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(got, model.restored().entries);
    assert_eq!(got.len(), 1);
    assert_eq!(
        store
            .history(10)
            .expect("history")
            .iter()
            .map(|m| m.id)
            .collect::<Vec<_>>(),
        vec![3, 2, 1]
    );
}

#[test]
fn full_checkpoint_drops_entries_it_does_not_list() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    store
        .write(
            &cp(
                1,
                None,
                true,
                vec![(key(0, 0, "a"), entry(EntryStatus::Open, 1.0))],
                vec![],
                1,
            ),
            Instant::now(),
        )
        .expect("write");
    store
        .write(
            &cp(
                2,
                None,
                true,
                vec![(key(0, 0, "z"), entry(EntryStatus::Open, 1.0))],
                vec![],
                2,
            ),
            Instant::now(),
        )
        .expect("write");
    let (_, restored) = store.load().expect("load").expect("some");
    assert_eq!(restored.entries.len(), 1);
    assert_eq!(restored.entries[0].0.key, "z");
}

#[test]
fn a_delta_on_the_wrong_base_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    store
        .write(&cp(1, None, true, vec![], vec![], 1), Instant::now())
        .expect("write");
    let err = store
        .write(
            &cp(
                3,
                Some(2),
                false,
                vec![(key(0, 0, "a"), entry(EntryStatus::Open, 1.0))],
                vec![],
                5,
            ),
            Instant::now(),
        )
        .expect_err("wrong base");
    assert!(
        matches!(
            err,
            StoreError::Apply {
                checkpoint_id: 3,
                ..
            }
        ),
        "{err}"
    );
    let (meta, restored) = store.load().expect("load").expect("some");
    assert_eq!(meta.id, 1);
    assert!(restored.entries.is_empty());
}

#[test]
fn second_opener_gets_a_clear_lock_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _first = Store::open(dir.path()).expect("open");
    match Store::open(dir.path()) {
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
    match Store::open(dir.path()) {
        Err(StoreError::UnsupportedFormat { found: 99, .. }) => {}
        Err(other) => panic!("unexpected error: {other}"),
        Ok(_) => panic!("opened a store of an unknown format"),
    }
}

#[test]
fn empty_store_has_no_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    assert!(store.load().expect("load").is_none());
}
