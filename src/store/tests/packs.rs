//! Group versions in pack files: which packs stay on disk, what is carried out of a pack, and
//! what a damaged or missing pack does.

use std::collections::BTreeSet;

use super::*;

/// The packs on disk.
fn pack_ids(store: &Store) -> BTreeSet<u64> {
    store.packs.ids().expect("pack ids")
}

/// The checkpoints whose group versions sled points into their pack for.
fn located_versions(store: &Store) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for item in store.tree.scan_prefix(GROUP_PREFIX) {
        let (k, v) = item.expect("item");
        let (_, version) = codec::decode_group_version_key(&k).expect("a group version key");
        if codec::unseal(&v)
            .and_then(super::super::packs::Locator::from_payload)
            .is_some()
        {
            out.insert(version.0);
        }
    }
    out
}

/// A pack as a checkpoint that stopped between its pack and its batch leaves it.
fn stray_pack(store: &Store, id: u64) {
    let mut w = store.packs.create(id).expect("create");
    w.append(b"a checkpoint that never completed")
        .expect("append");
    w.sync().expect("sync");
}

fn keys_at(id: u64, names: &[&str]) -> Vec<(StateKey, Entry)> {
    names
        .iter()
        .map(|k| (key(0, 0, k), entry(EntryStatus::Open, id as f64)))
        .collect()
}

#[test]
fn a_pack_goes_once_no_version_points_into_it_and_one_a_stopped_write_left_goes_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, 2);
    let mut line = Line::new(SPREAD);
    let names = ["a", "b", "c", "d"];
    // a checkpoint far ahead that stopped after writing its pack
    stray_pack(&store, 50);
    // and one of the id the store writes next
    stray_pack(&store, 7);
    let mut states = BTreeMap::new();
    for id in 1..=7u64 {
        let base = (id > 1).then(|| id - 1);
        let c = line.cp(id, base, id == 1, keys_at(id, &names), vec![], id as i64);
        write(&store, &c, None).expect("write");
        states.insert(id, sorted(line.state.clone().into_iter().collect()));
        // every pack on disk has versions pointing into it, and every version its pack
        assert_eq!(pack_ids(&store), located_versions(&store), "after {id}");
    }
    assert_eq!(pack_ids(&store), BTreeSet::from([6, 7]));
    for id in [6, 7] {
        let (_, restored) = store.load_checkpoint(CheckpointId(id)).expect("load");
        assert_eq!(sorted(restored.entries), states[&id], "checkpoint {id}");
    }
    // deleting the checkpoints deletes their packs
    store.delete_checkpoints().expect("delete");
    assert_eq!(pack_ids(&store), BTreeSet::new());
}

#[test]
fn a_group_that_stops_changing_is_carried_out_of_a_pack_the_others_left() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, 1);
    let mut line = Line::new(SPREAD);
    let moving = ["k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7"];
    let mut first = keys_at(1, &moving);
    first.extend(keys_at(1, &["still"]));
    write(&store, &line.cp(1, None, true, first, vec![], 1), None).expect("write");
    for id in 2..=6u64 {
        let c = line.cp(
            id,
            Some(id - 1),
            false,
            keys_at(id, &moving),
            vec![],
            id as i64,
        );
        write(&store, &c, None).expect("write");
        // the newest checkpoint alone is retained: its pack alone is on disk, the group that
        // stopped changing carried into it from the pack the others left
        assert_eq!(pack_ids(&store), BTreeSet::from([id]), "after {id}");
        let (_, restored) = store.load_checkpoint(CheckpointId(id)).expect("load");
        assert_eq!(
            sorted(restored.entries),
            sorted(line.state.clone().into_iter().collect()),
            "checkpoint {id}"
        );
    }
    assert!(line.state.contains_key(&key(0, 0, "still")));
}

#[test]
fn a_pack_mostly_of_newest_versions_is_left_in_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, 1);
    let mut line = Line::new(SPREAD);
    let names = ["k0", "k1", "k2", "k3"];
    write(
        &store,
        &line.cp(1, None, true, keys_at(1, &names), vec![], 1),
        None,
    )
    .expect("write");
    // one group of four changes: three quarters of pack 1 are still the newest versions
    let c = line.cp(2, Some(1), false, keys_at(2, &["k0"]), vec![], 2);
    write(&store, &c, None).expect("write");
    assert_eq!(pack_ids(&store), BTreeSet::from([1, 2]));
    assert_eq!(located_versions(&store), BTreeSet::from([1, 2]));
}

#[test]
fn a_damaged_or_missing_pack_makes_the_checkpoints_needing_it_unreadable_not_older_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, 3);
    for c in &sample() {
        write(&store, c, None).expect("write");
    }
    let version = codec::group_version_key(&group_of(&SPREAD, &key(2, 7, "c/d")), CheckpointId(2));
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
