//! Golden fixtures: a small store and savepoint file written by each released format, with the
//! exact state they must restore to. `fixtures/state/v<N>/` holds format N's; every build must
//! restore all of them. A format change adds a migration and (with the generator below) a new
//! fixture directory; the old ones stay.
//!
//! Regenerate the current format's fixture with
//! `CHECKPOINTER_WRITE_FIXTURES=1 cargo test --lib store::golden -- --ignored`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Value};

use super::portable::{self, Portable};
use super::{Retention, Store, WriteRequest, FORMAT_VERSION};
use crate::checkpoint::history::{CheckpointRecord, Status};
use crate::checkpoint::protocol::{meta_of, Checkpoint, StateSpec};
use crate::checkpoint_id::CheckpointId;
use crate::engine::{
    Acc, AggregateKind, Entry, EntryStatus, GroupLayout, PartitionState, RestoredState, StateDelta,
    StateKey, WindowDef, WindowKind,
};
use crate::event_time::EventTime;
use crate::position::{NextOffset, Partition};

fn fixtures_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/state")
}

/// Copies a directory tree (the fixture is never opened in place: opening migrates; the
/// store's tests take crash images with it).
pub(super) fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for item in std::fs::read_dir(from)? {
        let item = item?;
        let target = to.join(item.file_name());
        if item.file_type()?.is_dir() {
            copy_dir(&item.path(), &target)?;
        } else {
            std::fs::copy(item.path(), &target)?;
        }
    }
    Ok(())
}

/// The format-independent description of restored state the fixtures record: windows by name,
/// every accumulator field, offsets and watermark.
fn describe(spec: &StateSpec, state: &RestoredState) -> Value {
    let mut entries: Vec<Value> = state
        .entries
        .iter()
        .map(|(k, e)| {
            let window = spec.window_name(k.window).unwrap_or("?");
            let mut v = json!({
                "window": window,
                "start": k.start,
                "key": k.key,
                "status": match e.status { EntryStatus::Open => "open", EntryStatus::Closed => "closed" },
                "end": e.end,
                "count": e.acc.count,
                "sum": e.acc.sum,
                "min": if e.acc.count > 0 { json!(e.acc.min) } else { Value::Null },
                "max": if e.acc.count > 0 { json!(e.acc.max) } else { Value::Null },
            });
            // formats 1 to 3 knew only instance scope: their expectations have no partition
            if let Some(p) = &k.partition {
                v["partition"] = json!(p.to_string());
            }
            v
        })
        .collect();
    entries.sort_by_key(|v| v.to_string());
    let partitions: Vec<Value> = state
        .partitions
        .iter()
        .map(|p| {
            json!({
                "topic": p.partition.topic,
                "partition": p.partition.partition,
                "next_offset": p.next.map(|n| n.0),
                "max_ts": p.max_ts,
            })
        })
        .collect();
    json!({
        "partitions": partitions,
        "watermark": state.watermark,
        "entries": entries,
    })
}

fn spec() -> StateSpec {
    StateSpec {
        windows: vec![
            WindowDef {
                name: "per_minute".into(),
                kind: WindowKind::Tumbling { size: 60_000 },
            },
            WindowDef {
                name: "sessions".into(),
                kind: WindowKind::Session { gap: 30_000 },
            },
        ],
        aggregates: vec![AggregateKind::Count, AggregateKind::Sum, AggregateKind::Max],
        input: Some(crate::checkpoint::InputSpec {
            key: "/user".into(),
            timestamp: "/ts".into(),
            value: Some("/amount".into()),
        }),
        retired: Vec::new(),
        partition_scoped: true,
    }
}

fn acc(values: &[f64]) -> Acc {
    let mut acc = Acc::default();
    for v in values {
        acc.add(Some(*v));
    }
    acc
}

/// Partition-scoped keys (format 4 on): each user's records are on one partition of `events`.
fn key(window: u16, start: i64, k: &str) -> StateKey {
    let partition = if k == "bob" { 1 } else { 0 };
    StateKey {
        partition: Some(Partition::new("events", partition)),
        window,
        start,
        key: k.into(),
    }
}

fn open(end: i64, values: &[f64]) -> Entry {
    Entry {
        status: EntryStatus::Open,
        end,
        acc: acc(values),
    }
}

const T0: i64 = 1_700_000_040_000;

/// Three checkpoints (full, delta, delta with a delete and a closed window) and a savepoint
/// of the second.
fn checkpoints(layout: GroupLayout) -> Vec<(Checkpoint, Option<&'static str>)> {
    let mut line = super::tests::Line::new(layout);
    let mut delta = |full: bool,
                     partitions: Vec<PartitionState>,
                     watermark: Option<EventTime>,
                     up: Vec<(StateKey, Entry)>,
                     del: Vec<StateKey>,
                     records: u64| {
        let (groups, entries) = line.changes(full, up, del);
        StateDelta {
            full,
            partitions,
            watermark,
            groups,
            entries,
            records,
        }
    };
    let parts = |a: i64, b: i64, max: i64| {
        vec![
            PartitionState {
                partition: Partition::new("events", 0),
                next: Some(NextOffset(a)),
                max_ts: Some(EventTime(max)),
            },
            PartitionState {
                partition: Partition::new("events", 1),
                next: Some(NextOffset(b)),
                max_ts: Some(EventTime(max - 500)),
            },
        ]
    };
    let cp = |id: u64, base: Option<u64>, delta: StateDelta| Checkpoint {
        id: CheckpointId(id),
        base: base.map(CheckpointId),
        trigger_ms: 1_763_000_000_000 + id as i64 * 10_000,
        spec: spec(),
        delta,
    };
    vec![
        (
            cp(
                1,
                None,
                delta(
                    true,
                    parts(4, 3, T0 + 5_000),
                    Some(EventTime(T0)),
                    vec![
                        (key(0, T0 - 40_000, "alice"), open(T0 + 20_000, &[3.0, 4.5])),
                        (key(0, T0 - 40_000, "bob"), open(T0 + 20_000, &[-2.0])),
                        (key(1, T0 + 1_000, "alice"), open(T0 + 35_000, &[3.0, 4.5])),
                        (key(1, T0 + 2_000, "bob"), open(T0 + 32_000, &[-2.0])),
                    ],
                    vec![],
                    7,
                ),
            ),
            None,
        ),
        (
            cp(
                2,
                Some(1),
                delta(
                    false,
                    parts(9, 6, T0 + 12_000),
                    Some(EventTime(T0 + 7_000)),
                    vec![
                        (
                            key(0, T0 - 40_000, "alice"),
                            open(T0 + 20_000, &[3.0, 4.5, 10.0]),
                        ),
                        (key(0, T0 - 40_000, "carol/ü"), open(T0 + 20_000, &[7.25])),
                        (
                            key(1, T0 + 1_000, "alice"),
                            open(T0 + 42_000, &[3.0, 4.5, 10.0]),
                        ),
                    ],
                    vec![],
                    8,
                ),
            ),
            Some("before-upgrade"),
        ),
        (
            cp(
                3,
                Some(2),
                delta(
                    false,
                    parts(15, 11, T0 + 26_000),
                    Some(EventTime(T0 + 21_000)),
                    vec![(
                        key(0, T0 - 40_000, "alice"),
                        Entry {
                            status: EntryStatus::Closed,
                            end: T0 + 20_000,
                            acc: acc(&[3.0, 4.5, 10.0, 1.0]),
                        },
                    )],
                    vec![key(0, T0 - 40_000, "bob")],
                    11,
                ),
            ),
            None,
        ),
    ]
}

/// Writes this build's fixture: `store/`, `savepoint.chkpt` and `expected.json`.
#[test]
#[ignore = "writes the golden fixture of the current format; run on a format change"]
fn write_golden_fixtures() {
    if std::env::var_os("CHECKPOINTER_WRITE_FIXTURES").is_none() {
        return;
    }
    let dir = fixtures_root().join(format!("v{FORMAT_VERSION}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create fixture dir");
    let store = Store::open(&dir.join("store"), super::Open::Create)
        .expect("open")
        .with_retention(Retention {
            checkpoints: 2,
            history: 10,
        });
    for (c, savepoint) in checkpoints(store.layout().expect("layout")) {
        store
            .write(&WriteRequest {
                checkpoint: &c,
                record: CheckpointRecord::from_meta(&meta_of(&c, 5, 100), Status::InProgress),
                savepoint: savepoint.map(String::from),
                started: Instant::now(),
            })
            .expect("write");
    }
    let mut checkpoints = BTreeMap::new();
    for id in store.checkpoint_ids().expect("ids") {
        let (meta, state) = store.load_checkpoint(id).expect("load");
        checkpoints.insert(id.to_string(), describe(&meta.spec, &state));
    }
    let (sp, entries) = store.read_savepoint("before-upgrade").expect("savepoint");
    let file = dir.join("savepoint.chkpt");
    portable::write_file(
        &file,
        &Portable {
            meta: sp.clone(),
            entries,
        },
    )
    .expect("export");
    let (_, sp_state) = store
        .load_savepoint("before-upgrade")
        .expect("load savepoint");
    let expected = json!({
        "format_version": FORMAT_VERSION,
        "file_version": portable::FILE_VERSION,
        "checkpoints": checkpoints,
        "savepoint": { "name": sp.name, "checkpoint_id": sp.checkpoint_id, "state": describe(&sp.meta.spec, &sp_state) },
    });
    let text = serde_json::to_string_pretty(&expected).expect("json");
    std::fs::write(dir.join("expected.json"), text + "\n").expect("write expected");
}

/// Every fixture directory (`v1`, `v2`, ...) under `fixtures/state`.
fn fixture_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures_root())
        .expect("fixtures/state exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("expected.json").is_file())
        .collect();
    dirs.sort();
    dirs
}

#[test]
fn the_current_format_has_a_fixture() {
    let names: Vec<String> = fixture_dirs()
        .iter()
        .filter_map(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    assert!(
        names.contains(&format!("v{FORMAT_VERSION}")),
        "no golden fixture for format {FORMAT_VERSION} in fixtures/state (found {names:?}); generate one"
    );
}

/// The recorded state of the fixture in `dir`.
fn expected_of(dir: &Path) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(dir.join("expected.json")).expect("read expected"),
    )
    .expect("expected.json")
}

/// Asserts that `store` (opened from the fixture in `dir`) retains the checkpoints `expected`
/// records, each restoring to its recorded state, read whole and as a start reads it.
fn assert_checkpoints_restore(dir: &Path, store: &Store, expected: &Value) {
    let recorded = expected["checkpoints"]
        .as_object()
        .expect("checkpoints object");
    let ids = store.checkpoint_ids().expect("ids");
    assert_eq!(
        ids.iter().map(ToString::to_string).collect::<Vec<_>>(),
        recorded.keys().cloned().collect::<Vec<_>>(),
        "{}: retained checkpoints",
        dir.display()
    );
    for (id, want) in recorded {
        let id: u64 = id.parse().expect("id");
        let (meta, state) = store
            .load_checkpoint(CheckpointId(id))
            .unwrap_or_else(|e| panic!("{}: checkpoint {id}: {e}", dir.display()));
        assert_eq!(
            &describe(&meta.spec, &state),
            want,
            "{}: checkpoint {id}",
            dir.display()
        );
        // as a start reads it: groups kept encoded, decoded as installed
        let (_, stored) = store
            .load_checkpoint_stored(CheckpointId(id))
            .unwrap_or_else(|e| panic!("{}: checkpoint {id} stored: {e}", dir.display()));
        let decoded = RestoredState {
            entries: stored.clone().into_entries().expect("decodes"),
            groups: Vec::new(),
            ..stored
        };
        assert_eq!(
            &describe(&meta.spec, &decoded),
            want,
            "{}: checkpoint {id} stored",
            dir.display()
        );
    }
}

#[test]
fn a_format_4_store_migrates_into_the_configured_key_groups_with_its_recorded_state() {
    let dir = fixtures_root().join("v4");
    let expected = expected_of(&dir);
    let tmp = tempfile::tempdir().expect("tempdir");
    copy_dir(&dir.join("store"), tmp.path()).expect("copy fixture store");
    let store = Store::open(tmp.path(), super::Open::AsIs)
        .expect("open")
        .with_key_groups(5);
    store.upgrade().expect("migrate");
    let layout = store.layout().expect("layout");
    assert_eq!(layout.groups, 5);
    assert_checkpoints_restore(&dir, &store, &expected);
    // every key filed in the group the recorded layout gives it
    for id in store.checkpoint_ids().expect("ids") {
        let (_, stored) = store.load_checkpoint_stored(id).expect("stored");
        assert!(!stored.groups.is_empty(), "checkpoint {id} holds groups");
        for g in &stored.groups {
            let mut keys = 0;
            crate::engine::group::visit_blob(&g.blob, |e| {
                keys += 1;
                assert_eq!(layout.group_of(e.0), g.id.group, "{id}: key {:?}", e.0);
            })
            .expect("blob reads");
            assert!(keys > 0, "{id}: group {} holds keys", g.id.group);
        }
    }
}

#[test]
fn every_fixture_store_restores_its_recorded_state() {
    for dir in fixture_dirs() {
        let expected = expected_of(&dir);
        let tmp = tempfile::tempdir().expect("tempdir");
        copy_dir(&dir.join("store"), tmp.path()).expect("copy fixture store");
        let store = Store::open(tmp.path(), super::Open::Create)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        assert_checkpoints_restore(&dir, &store, &expected);
        let ids = store.checkpoint_ids().expect("ids");
        // a restarted build keeps counting from the fixture's ids
        assert!(store.next_id().expect("next id") > ids.last().copied().unwrap_or(CheckpointId(0)));
        // format 1 had no savepoints
        let sp = &expected["savepoint"];
        let Some(name) = sp["name"].as_str() else {
            continue;
        };
        let (meta, state) = store
            .load_savepoint(name)
            .unwrap_or_else(|e| panic!("{}: savepoint {name}: {e}", dir.display()));
        assert_eq!(
            describe(&meta.meta.spec, &state),
            sp["state"],
            "{}",
            dir.display()
        );
    }
}

#[test]
fn a_format_5_store_writes_new_versions_into_packs_and_still_restores_those_it_held() {
    let dir = fixtures_root().join("v5");
    let expected = expected_of(&dir);
    let tmp = tempfile::tempdir().expect("tempdir");
    copy_dir(&dir.join("store"), tmp.path()).expect("copy fixture store");
    let store = Store::open(tmp.path(), super::Open::Create).expect("open");
    assert_eq!(
        store.format_version().expect("version"),
        Some(FORMAT_VERSION)
    );
    // a checkpoint on top of the newest that writes one of its groups again, unchanged: its
    // restore reads that group from its pack and every other from sled
    let head = store.head().expect("head").expect("a checkpoint");
    let (meta, state) = store.load_checkpoint(head).expect("load");
    let live = state.entries.len() as u64;
    let group =
        crate::engine::group::group_entries(&store.layout().expect("layout"), state.entries)
            .into_iter()
            .next()
            .expect("a group");
    let id = store.next_id().expect("next id");
    let c = Checkpoint {
        id,
        base: Some(head),
        trigger_ms: 1_700_000_000_000,
        spec: meta.spec.clone(),
        delta: StateDelta {
            full: false,
            partitions: meta.partitions.clone(),
            watermark: meta.watermark,
            groups: vec![group],
            entries: live,
            records: 0,
        },
    };
    store
        .write(&WriteRequest {
            checkpoint: &c,
            record: CheckpointRecord::from_meta(&meta_of(&c, 5, 100), Status::InProgress),
            savepoint: None,
            started: Instant::now(),
        })
        .expect("write");
    assert!(
        tmp.path()
            .join(super::packs::PACKS_DIR)
            .join(id.0.to_string())
            .is_file(),
        "no pack for checkpoint {id}"
    );
    let (new_meta, restored) = store.load_checkpoint(id).expect("load the new checkpoint");
    let want = &expected["checkpoints"][head.to_string()];
    assert_eq!(&describe(&new_meta.spec, &restored), want);
    // the checkpoints the fixture recorded restore as they did
    let recorded = expected["checkpoints"].as_object().expect("checkpoints");
    for (old, want) in recorded {
        let (m, s) = store
            .load_checkpoint(CheckpointId(old.parse().expect("id")))
            .expect("load");
        assert_eq!(&describe(&m.spec, &s), want, "checkpoint {old}");
    }
}

#[test]
fn every_fixture_savepoint_file_imports_and_restores_its_recorded_state() {
    for dir in fixture_dirs() {
        let expected: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("expected.json")).expect("read expected"),
        )
        .expect("expected.json");
        let path = dir.join("savepoint.chkpt");
        if expected["savepoint"].is_null() {
            assert!(
                !path.exists(),
                "{}: savepoint file without expectation",
                dir.display()
            );
            continue;
        }
        let file = portable::read_file(&path).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = Store::open(tmp.path(), super::Open::Create).expect("open empty store");
        store
            .import_savepoint(&file.meta, &file.entries)
            .unwrap_or_else(|e| panic!("{}: import: {e}", dir.display()));
        let (meta, state) = store.load_savepoint(&file.meta.name).expect("load");
        assert_eq!(
            describe(&meta.meta.spec, &state),
            expected["savepoint"]["state"],
            "{}",
            dir.display()
        );
    }
}

#[test]
fn inspecting_an_older_store_leaves_it_in_its_format() {
    let v2 = fixtures_root().join("v2/store");
    let tmp = tempfile::tempdir().expect("tempdir");
    copy_dir(&v2, tmp.path()).expect("copy");
    let view = Store::open(tmp.path(), super::Open::Inspect).expect("inspect");
    assert_eq!(
        view.checkpoint_ids().expect("ids"),
        vec![CheckpointId(2), CheckpointId(3)]
    );
    let (meta, _) = view
        .load_checkpoint(CheckpointId(3))
        .expect("load through the migrated view");
    assert_eq!(
        meta.spec.input, None,
        "format 2 did not record input fields"
    );
    drop(view);
    match Store::open(tmp.path(), super::Open::NoMigration) {
        Err(super::StoreError::NeedsMigration { found: 2, .. }) => {}
        Err(e) => panic!("expected the store still at format 2, got {e}"),
        Ok(_) => panic!("expected the store still at format 2, it opened as current"),
    }
    // an open that may migrate does, once
    drop(Store::open(tmp.path(), super::Open::Create).expect("migrate"));
    assert!(Store::open(tmp.path(), super::Open::NoMigration).is_ok());
}

#[test]
fn a_damaged_checkpoint_does_not_block_the_migration_of_the_others() {
    let tmp = tempfile::tempdir().expect("tempdir");
    copy_dir(&fixtures_root().join("v2/store"), tmp.path()).expect("copy");
    {
        let raw = Store::open(tmp.path(), super::Open::AsIs).expect("open as it is");
        let key = super::codec::id_key(super::codec::CHECKPOINT_PREFIX, CheckpointId(3));
        let mut value = raw.tree.get(&key).expect("get").expect("cp/3").to_vec();
        let last = value.len() - 1;
        value[last] ^= 0x55;
        raw.tree.insert(&key, value).expect("damage");
        raw.flush().expect("flush");
    }
    let store = Store::open(tmp.path(), super::Open::Create)
        .expect("migrates despite the damaged checkpoint");
    assert!(
        store.load_checkpoint(CheckpointId(3)).is_err(),
        "still damaged, still refused"
    );
    let (meta, _) = store
        .load_checkpoint(CheckpointId(2))
        .expect("the older one restores");
    assert_eq!(meta.id, CheckpointId(2));
}
