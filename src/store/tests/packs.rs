//! Group versions in pack files: which packs stay on disk, what is carried out of a pack, and
//! what a damaged or missing pack does.

use std::collections::BTreeSet;

use super::super::packs::tests::{carried as carried_into, changed};
use super::super::packs::{Locator, PackName};
use super::*;

/// The packs on disk.
fn packs_on_disk(store: &Store) -> BTreeSet<PackName> {
    store.packs.names().expect("pack names")
}

/// The packs sled points into.
fn packs_pointed_at(store: &Store) -> BTreeSet<PackName> {
    let mut out = BTreeSet::new();
    for item in store.tree.scan_prefix(GROUP_PREFIX) {
        let (k, v) = item.expect("item");
        let (_, version) = codec::decode_group_version_key(&k).expect("a group version key");
        if let Some(at) = Locator::in_value(&v) {
            out.insert(at.pack(version.0));
        }
    }
    out
}

/// The version of `k`'s group that checkpoint `id` restores.
fn version_of(store: &Store, k: &StateKey, id: u64) -> Option<u64> {
    let g = group_of(&SPREAD, k);
    store
        .latest_version(&g, CheckpointId(id + 1))
        .expect("latest")
        .map(|(v, _)| v.0)
}

/// A pack as a checkpoint that stopped between its pack and its batch leaves it.
fn stray_pack(store: &Store, name: PackName, len: usize) {
    let mut w = store.packs.create(name).expect("create");
    w.append(&vec![0xAB; len], name.carried).expect("append");
    w.sync().expect("sync");
}

fn keys_at(id: u64, names: &[&str]) -> Vec<(StateKey, Entry)> {
    names
        .iter()
        .map(|k| (key(0, 0, k), entry(EntryStatus::Open, id as f64)))
        .collect()
}

/// Keys, each in a group of its own, that every checkpoint of a test changes.
const MOVING: [&str; 8] = ["k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7"];

/// Writes checkpoint `id` of `line` upserting `names` (at `id`): full for the first, else on
/// the one before.
fn write_keys(store: &Store, line: &mut Line, id: u64, names: &[&str]) {
    let base = (id > 1).then(|| id - 1);
    let c = line.cp(id, base, id == 1, keys_at(id, names), vec![], id as i64);
    write(store, &c, None).expect("write");
}

/// The state after the last checkpoint `line` built, sorted.
fn state_of(line: &Line) -> Vec<(StateKey, Entry)> {
    sorted(line.state.clone().into_iter().collect())
}

#[test]
fn a_pack_goes_once_no_version_points_into_it_and_one_a_stopped_write_left_goes_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, 2);
    let mut line = Line::new(SPREAD);
    let names = ["a", "b", "c", "d"];
    // a checkpoint far ahead that stopped after writing its packs
    stray_pack(&store, changed(50), 10);
    stray_pack(&store, carried_into(50), 10);
    // and one of the id the store writes next, longer than what that write puts there
    stray_pack(&store, changed(1), 1 << 16);
    let mut states = BTreeMap::new();
    for id in 1..=7u64 {
        write_keys(&store, &mut line, id, &names);
        states.insert(id, state_of(&line));
        // every pack on disk has versions pointing into it, and every version its pack
        assert_eq!(
            packs_on_disk(&store),
            packs_pointed_at(&store),
            "after {id}"
        );
        if id == 1 {
            let len = std::fs::metadata(pack_path(&store, CheckpointId(1)))
                .expect("pack 1")
                .len();
            assert!(len < 1 << 16, "pack 1 kept the stray bytes: {len}");
        }
    }
    assert_eq!(
        packs_on_disk(&store),
        BTreeSet::from([changed(6), changed(7)])
    );
    for id in [6, 7] {
        let (_, restored) = store.load_checkpoint(CheckpointId(id)).expect("load");
        assert_eq!(sorted(restored.entries), states[&id], "checkpoint {id}");
    }
    // deleting the checkpoints deletes their packs
    store.delete_checkpoints().expect("delete");
    assert_eq!(packs_on_disk(&store), BTreeSet::new());
}

#[test]
fn a_group_that_stops_changing_is_carried_once_out_of_a_pack_the_others_left() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, 1);
    let mut line = Line::new(SPREAD);
    write_keys(&store, &mut line, 1, &[&MOVING[..], &["still"]].concat());
    for id in 2..=6u64 {
        write_keys(&store, &mut line, id, &MOVING);
        // the newest checkpoint alone is retained: on disk, its pack and the one the group that
        // stopped changing was carried into at checkpoint 2 (pack 1, the others left, gone),
        // where it stays while it does not change
        assert_eq!(
            packs_on_disk(&store),
            BTreeSet::from([carried_into(2), changed(id)]),
            "after {id}"
        );
        assert_eq!(version_of(&store, &key(0, 0, "still"), id), Some(2));
        let (_, restored) = store.load_checkpoint(CheckpointId(id)).expect("load");
        assert_eq!(sorted(restored.entries), state_of(&line), "checkpoint {id}");
    }
}

#[test]
fn a_carried_from_pack_goes_once_the_checkpoint_that_carried_out_of_it_is_the_oldest_retained() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, 3);
    let mut line = Line::new(SPREAD);
    write_keys(&store, &mut line, 1, &[&MOVING[..], &["still"]].concat());
    let mut states = BTreeMap::from([(1, state_of(&line))]);
    for id in 2..=5u64 {
        write_keys(&store, &mut line, id, &MOVING);
        states.insert(id, state_of(&line));
        // every retained checkpoint restores, those before the carry from the old pack
        for (retained, want) in states.range(id.saturating_sub(2)..=id) {
            let (_, restored) = store
                .load_checkpoint(CheckpointId(*retained))
                .expect("load");
            assert_eq!(
                &sorted(restored.entries),
                want,
                "checkpoint {retained} after {id}"
            );
        }
        // pack 1 stays while checkpoint 1 is retained, and goes with it (checkpoint 2 carried
        // what it still needed from there)
        assert_eq!(
            packs_on_disk(&store).contains(&changed(1)),
            id < 4,
            "pack 1 after {id}"
        );
        assert_eq!(version_of(&store, &key(0, 0, "still"), id), Some(2));
    }
}

#[test]
fn a_pack_mostly_of_newest_versions_is_left_in_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, 1);
    let mut line = Line::new(SPREAD);
    let names = ["k0", "k1", "k2", "k3"];
    write_keys(&store, &mut line, 1, &names);
    // one group of four changes: three quarters of pack 1 are still the newest versions
    write_keys(&store, &mut line, 2, &["k0"]);
    assert_eq!(
        packs_on_disk(&store),
        BTreeSet::from([changed(1), changed(2)])
    );
    assert_eq!(version_of(&store, &key(0, 0, "k1"), 2), Some(1));
}

#[test]
fn a_damaged_or_missing_pack_makes_the_checkpoints_needing_it_unreadable_not_older_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, 3);
    for c in &sample() {
        write(&store, c, None).expect("write");
    }
    let damaged = key(2, 7, "c/d");
    let version = codec::group_version_key(&group_of(&SPREAD, &damaged), CheckpointId(2));
    // checkpoint 3 restores the version checkpoint 2 wrote (not one it carried)
    assert_eq!(version_of(&store, &damaged, 3), Some(2));
    let unreadable = |store: &Store, want: &str| {
        for id in [2, 3] {
            match store.load_checkpoint(CheckpointId(id)) {
                Err(StoreError::Unreadable(u)) => {
                    assert_eq!(u.snapshot, format!("checkpoint {id}"));
                    assert!(u.detail.contains(want), "{}", u.detail);
                }
                other => panic!("checkpoint {id}: {other:?}"),
            }
        }
        store
            .load_checkpoint(CheckpointId(1))
            .expect("checkpoint 1");
    };
    // a byte of the value in the pack flipped
    change_value(&store, &version, |v| {
        let last = v.len() - 1;
        v[last] ^= 0x55;
    });
    unreadable(&store, "checksum");
    // the pack gone (seen by the next process: one that has the file open reads it still)
    std::fs::remove_file(pack_path(&store, CheckpointId(2))).expect("remove");
    drop(store);
    let store = open(&dir, 3);
    unreadable(&store, "missing");
}

#[test]
fn a_damaged_version_is_carried_as_it_is_and_its_old_pack_goes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, 1);
    let mut line = Line::new(SPREAD);
    write_keys(&store, &mut line, 1, &[&MOVING[..], &["still"]].concat());
    let still = key(0, 0, "still");
    change_value(
        &store,
        &codec::group_version_key(&group_of(&SPREAD, &still), CheckpointId(1)),
        |v| {
            let last = v.len() - 1;
            v[last] ^= 0x55;
        },
    );
    write_keys(&store, &mut line, 2, &MOVING);
    // carried byte for byte, damage and all, so that it does not keep pack 1 on disk; no new
    // seal over it: checkpoint 2's restore reports the damage
    assert_eq!(version_of(&store, &still, 2), Some(2));
    assert_eq!(
        packs_on_disk(&store),
        BTreeSet::from([changed(2), carried_into(2)])
    );
    match store.load_checkpoint(CheckpointId(2)) {
        Err(StoreError::Unreadable(u)) => assert!(u.detail.contains("checksum"), "{}", u.detail),
        other => panic!("{other:?}"),
    }
}

#[test]
fn carried_groups_move_again_only_once_more_than_half_of_their_pack_was_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, 1);
    let mut line = Line::new(SPREAD);
    let moving = ["k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7", "k8", "k9"];
    let idle = ["i1", "i2", "i3", "i4"];
    write_keys(&store, &mut line, 1, &[&moving[..], &idle].concat());
    // checkpoint 2 changes the moving groups: the idle ones are carried into pack 2c
    write_keys(&store, &mut line, 2, &moving);
    for k in idle {
        assert_eq!(version_of(&store, &key(0, 0, k), 2), Some(2), "{k}");
    }
    // then the idle groups change one by one, the moving ones every time
    for (id, changes) in [(3u64, "i1"), (4, "i2"), (5, "i3")] {
        write_keys(&store, &mut line, id, &[&moving[..], &[changes]].concat());
        let (_, restored) = store.load_checkpoint(CheckpointId(id)).expect("load");
        assert_eq!(sorted(restored.entries), state_of(&line), "checkpoint {id}");
        if id == 3 {
            // three quarters of pack 2c still the newest: nothing moves
            assert_eq!(version_of(&store, &key(0, 0, "i4"), id), Some(2));
            assert!(packs_on_disk(&store).contains(&carried_into(2)));
        }
    }
    // a quarter left: the last idle group moved into pack 5c, and 2c gone (each idle group that
    // changed was carried out of its checkpoint's pack at the next one, as the moving groups
    // left it)
    assert_eq!(version_of(&store, &key(0, 0, "i4"), 5), Some(5));
    assert!(!packs_on_disk(&store).contains(&carried_into(2)));
    assert_eq!(packs_on_disk(&store), packs_pointed_at(&store));
}

/// Debug builds (the tests', and the integration tests' binary) check what no test can see
/// otherwise: that no batch lands while a pack it may point into is not yet durable.
#[cfg(debug_assertions)]
#[test]
#[should_panic(expected = "unsynced")]
fn a_batch_is_refused_while_a_pack_holds_an_unsynced_value() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, 2);
    let mut w = store.packs.create(changed(9)).expect("create");
    w.append(b"not yet durable", false).expect("append");
    let mut line = Line::new(SPREAD);
    let _ = write(
        &store,
        &line.cp(1, None, true, keys_at(1, &["a"]), vec![], 1),
        None,
    );
}
