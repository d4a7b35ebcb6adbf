//! Engine properties: snapshot/restore round trips, split processing equals whole, and bounded
//! disorder changes nothing.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::checkpoint::protocol::{Checkpoint, MaterializedState};
use crate::checkpoint_id::CheckpointId;
use crate::event_time::EventTime;

fn p(n: i32) -> Partition {
    Partition::new("t", n)
}

fn config(hold: bool) -> EngineConfig {
    scoped_config(hold, false)
}

fn scoped_config(hold: bool, partition_scoped: bool) -> EngineConfig {
    EngineConfig {
        windows: vec![
            WindowDef {
                name: "tumble".into(),
                kind: WindowKind::Tumbling { size: 1000 },
            },
            WindowDef {
                name: "hop".into(),
                kind: WindowKind::Hopping {
                    size: 1000,
                    hop: 500,
                },
            },
            WindowDef {
                name: "sess".into(),
                kind: WindowKind::Session { gap: 300 },
            },
        ],
        max_out_of_orderness: 200,
        allowed_lateness: 0,
        hold_until_checkpoint: hold,
        partition_scoped,
        // few groups: many keys share one, as in a large state
        groups: GroupLayout { seed: 1, groups: 4 },
    }
}

fn rec(key: &str, ts: i64, v: f64) -> Result<Record<'_>, InvalidReason> {
    Ok(Record {
        key: key.into(),
        value: Some(v),
        ts: EventTime(ts),
    })
}

/// Emitted windows keyed by identity; a re-emission must carry identical values.
type Emitted = BTreeMap<StateKey, (i64, Acc)>;

fn collect(engine: &mut Engine, out: &mut Emitted) {
    let windows = engine.take_emittable();
    let ids: Vec<StateKey> = windows.iter().map(|w| w.id.clone()).collect();
    for w in windows {
        if let Some(prev) = out.insert(w.id.clone(), (w.end, w.acc)) {
            assert_eq!(
                prev,
                (w.end, w.acc),
                "re-emitted {:?} with different values",
                w.id
            );
        }
    }
    engine.emitted(ids);
}

/// A checkpoint cycle as the service runs it: snapshot, make durable, emit what it released.
fn checkpoint(engine: &mut Engine, store: &mut MaterializedState, id: u64, out: &mut Emitted) {
    let base = store.meta.as_ref().map(|m| m.id);
    let delta = engine.snapshot(CheckpointId(id), base.is_none());
    let cp = Checkpoint {
        id: CheckpointId(id),
        base,
        trigger_ms: 0,
        spec: Default::default(),
        delta,
    };
    store.apply(&cp, 0, 0).expect("apply");
    engine.checkpoint_completed(CheckpointId(id));
    collect(engine, out);
}

/// Interleaved partition streams: (partition, key, ts, value).
fn stream_strategy() -> impl Strategy<Value = Vec<(i32, String, i64, f64)>> {
    // per partition, event time advances by 0..150ms with jitter up to 150ms backwards (< 200)
    streams(5, 150, 300)
}

/// Streams of fewer than `len` records over `keys` keys, event time advancing by less than
/// `step` ms a record per partition, with jitter of less than 150 ms backwards.
fn streams(
    keys: usize,
    step: i64,
    len: usize,
) -> impl Strategy<Value = Vec<(i32, String, i64, f64)>> {
    prop::collection::vec((0i32..3, 0..keys, 0..step, 0i64..150, 1u8..50), 1..len).prop_map(
        |steps| {
            let mut clock = [10_000i64; 3];
            steps
                .into_iter()
                .map(|(part, key, step, back, v)| {
                    let i = part as usize;
                    clock[i] += step;
                    (part, format!("k{key}"), clock[i] - back, f64::from(v))
                })
                .collect()
        },
    )
}

/// Sentinels far ahead on every partition so that every real window closes.
fn flush(engine: &mut Engine, offsets: &mut [i64; 3]) {
    for part in 0..3 {
        let o = offsets[part as usize];
        offsets[part as usize] += 1;
        engine.process(&p(part), o, rec("~flush", 1_000_000, 0.0));
    }
}

fn run_whole(stream: &[(i32, String, i64, f64)], hold: bool) -> (Emitted, u64) {
    run_whole_with(stream, config(hold))
}

fn run_whole_with(stream: &[(i32, String, i64, f64)], cfg: EngineConfig) -> (Emitted, u64) {
    let mut engine = Engine::new(cfg);
    engine.assign(&[p(0), p(1), p(2)]);
    let mut out = Emitted::new();
    let mut store = MaterializedState::default();
    let mut offsets = [0i64; 3];
    let mut late = 0;
    for (i, (part, key, ts, v)) in stream.iter().enumerate() {
        // as the service asks for the state of records it holds ahead: a hint that must
        // change nothing of what follows
        if let Some((part, key, ..)) = stream.get(i + 3) {
            engine.prefetch(&p(*part), key);
        }
        let o = offsets[*part as usize];
        offsets[*part as usize] += 1;
        if engine.process(&p(*part), o, rec(key, *ts, *v)) == Outcome::Late {
            late += 1;
        }
        collect(&mut engine, &mut out);
    }
    flush(&mut engine, &mut offsets);
    checkpoint(&mut engine, &mut store, 1, &mut out);
    collect(&mut engine, &mut out);
    (out, late)
}

/// Streams over up to 400 keys: with [`wide_config`], more groups than a restore rebuilds at
/// once ([`INSTALL_BATCH`]).
fn wide_stream_strategy() -> impl Strategy<Value = Vec<(i32, String, i64, f64)>> {
    streams(400, 60, 400)
}

fn wide_config(partition_scoped: bool) -> EngineConfig {
    EngineConfig {
        groups: GroupLayout {
            seed: 1,
            groups: 150,
        },
        ..scoped_config(true, partition_scoped)
    }
}

/// `decoded`'s entries split three ways by group: a third listed decoded, a third half decoded
/// and half stored (the engine holds the group when its stored half comes), a third stored in
/// two halves (a group listed twice).
fn mixed(decoded: RestoredState, layout: &GroupLayout) -> RestoredState {
    let (mut entries, mut groups) = (Vec::new(), Vec::new());
    for g in group::group_entries(layout, decoded.entries.clone()) {
        let stored = |list: Vec<(StateKey, Entry)>| {
            let blob = GroupContent::new(g.id.clone(), list).blob().expect("blob");
            StoredGroup::read(g.id.clone(), blob).expect("read")
        };
        let mut first = g.entries();
        let second = first.split_off(first.len() / 2);
        match g.id.group % 3 {
            0 => entries.extend(first.into_iter().chain(second)),
            1 => {
                entries.extend(first);
                groups.push(stored(second));
            }
            _ => {
                groups.push(stored(first));
                groups.push(stored(second));
            }
        }
    }
    RestoredState {
        entries,
        groups,
        ..decoded
    }
}

/// Every entry of `d`, sorted.
fn flat(d: StateDelta) -> Vec<(StateKey, Entry)> {
    let mut v: Vec<(StateKey, Entry)> = d.groups.into_iter().flat_map(|g| g.entries()).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// A snapshot shares the engine's groups (copy on write): whatever the engine does after it
    /// (more records, windows closing, acknowledgements), the snapshot still holds exactly the
    /// state it was taken at.
    #[test]
    fn a_snapshot_is_not_changed_by_what_the_engine_does_after_it(stream in stream_strategy(), cut in 0usize..300, scoped in any::<bool>(), full in any::<bool>()) {
        let mut engine = Engine::new(scoped_config(true, scoped));
        engine.assign(&[p(0), p(1), p(2)]);
        let cut = cut.min(stream.len());
        let mut offsets = [0i64; 3];
        let mut feed = |engine: &mut Engine, part: i32, key: &str, ts: i64, v: f64| {
            let o = offsets[part as usize];
            offsets[part as usize] += 1;
            engine.process(&p(part), o, rec(key, ts, v));
        };
        for (part, key, ts, v) in &stream[..cut] {
            feed(&mut engine, *part, key, *ts, *v);
        }
        let _ = engine.snapshot(CheckpointId(1), true);
        for (part, key, ts, v) in &stream[cut..cut + (stream.len() - cut) / 2] {
            feed(&mut engine, *part, key, *ts, *v);
        }
        let snap = engine.snapshot(CheckpointId(2), full);
        let at_snapshot: Vec<Vec<(StateKey, Entry)>> = snap.groups.iter().map(|g| g.entries()).collect();
        engine.checkpoint_completed(CheckpointId(2));
        let released: Vec<StateKey> = engine.take_emittable().into_iter().map(|w| w.id).collect();
        engine.emitted(released);
        for (part, key, ts, v) in &stream[cut + (stream.len() - cut) / 2..] {
            feed(&mut engine, *part, key, *ts, *v);
        }
        engine.revoke(&[p(0), p(1), p(2)]);
        let later: Vec<Vec<(StateKey, Entry)>> = snap.groups.iter().map(|g| g.entries()).collect();
        prop_assert_eq!(later, at_snapshot);
    }

    #[test]
    fn restore_of_snapshot_equals_state(stream in stream_strategy(), scoped in any::<bool>()) {
        let mut engine = Engine::new(scoped_config(true, scoped));
        engine.assign(&[p(0), p(1), p(2)]);
        for (i, (part, key, ts, v)) in stream.iter().enumerate() {
            engine.process(&p(*part), i as i64, rec(key, *ts, *v));
        }
        let snap = engine.snapshot(CheckpointId(1), true);
        let mut store = MaterializedState::default();
        store.apply(&Checkpoint { id: CheckpointId(1), base: None, trigger_ms: 0, spec: Default::default(), delta: snap.clone() }, 0, 0).expect("apply");
        let mut restored = Engine::from_state(scoped_config(true, scoped), store.restored()).expect("restore");
        let again = restored.snapshot(CheckpointId(2), true);
        let flat = |d: StateDelta| { let mut v: Vec<(StateKey, Entry)> = d.groups.into_iter().flat_map(|g| g.entries()).collect(); v.sort_by(|a, b| a.0.cmp(&b.0)); v };
        prop_assert_eq!(snap.entries, again.entries);
        prop_assert_eq!(snap.entries as usize, flat(snap.clone()).len());
        prop_assert_eq!(flat(snap.clone()), flat(again.clone()));
        prop_assert_eq!(snap.partitions, again.partitions);
        prop_assert_eq!(snap.watermark, again.watermark);
    }

    /// A restore rebuilds the stored groups on every core, each apart from the engine, and puts
    /// each in whole; a group the engine holds already (entries installed before it, or a group
    /// listed twice) goes in key by key. Every way restores the state the snapshot held, open
    /// and final windows, and emits the same windows once everything closes.
    #[test]
    fn groups_rebuilt_on_every_core_restore_what_key_by_key_restores(stream in wide_stream_strategy(), scoped in any::<bool>()) {
        let mut engine = Engine::new(wide_config(scoped));
        engine.assign(&[p(0), p(1), p(2)]);
        for (i, (part, key, ts, v)) in stream.iter().enumerate() {
            engine.process(&p(*part), i as i64, rec(key, *ts, *v));
        }
        // exactly-once without a checkpoint: the windows that closed wait in their groups
        let snap = engine.snapshot(CheckpointId(1), true);
        let mut store = MaterializedState::default();
        store.apply(&Checkpoint { id: CheckpointId(1), base: None, trigger_ms: 0, spec: Default::default(), delta: snap.clone() }, 0, 0).expect("apply");
        let layout = wide_config(scoped).groups;
        let decoded = store.restored();
        let ways = [decoded.clone(), decoded.clone().into_stored(&layout), mixed(decoded.clone(), &layout)];
        prop_assert!(ways[1].entries.is_empty());
        // a remap through the groups rebuilt apart: open sessions left out (their definition
        // gone), the fixed windows re-numbered as they are
        let mut remapped = decoded.into_stored(&layout);
        remapped.remap = Some(Remap {
            open: [(0, 0), (1, 1)].into(),
            closed: [(0, 0), (1, 1), (2, 2)].into(),
            dropped_topics: Default::default(),
        });
        let kept: Vec<(StateKey, Entry)> = flat(snap.clone())
            .into_iter()
            .filter(|(k, e)| k.window != 2 || e.status == EntryStatus::Closed)
            .collect();
        let mut engine = Engine::from_state(wide_config(scoped), remapped).expect("restore");
        prop_assert_eq!(flat(engine.snapshot(CheckpointId(2), true)), kept);
        let mut outs = Vec::new();
        for (way, restored) in ways.into_iter().enumerate() {
            let mut engine = Engine::from_state(wide_config(scoped), restored).expect("restore");
            let again = engine.snapshot(CheckpointId(2), true);
            prop_assert_eq!(again.entries, snap.entries, "way {}", way);
            prop_assert_eq!(flat(again), flat(snap.clone()), "way {}", way);
            prop_assert_eq!(engine.pending_emissions() + engine.open_windows(), snap.entries as usize, "way {}", way);
            // everything closes: the windows restored final, then every open one
            engine.assign(&[p(0), p(1), p(2)]);
            let mut out = Emitted::new();
            collect(&mut engine, &mut out);
            let mut offsets = [1_000_000i64; 3];
            flush(&mut engine, &mut offsets);
            checkpoint(&mut engine, &mut MaterializedState::default(), 3, &mut out);
            // no record came for them after the snapshot: each window emits what it held
            for (id, e) in flat(snap.clone()) {
                prop_assert_eq!(out.get(&id), Some(&(e.end, e.acc)), "way {} {:?}", way, id);
            }
            outs.push(out);
        }
        prop_assert_eq!(&outs[1], &outs[0]);
        prop_assert_eq!(&outs[2], &outs[0]);
    }

    #[test]
    fn deltas_applied_in_order_equal_a_full_snapshot(stream in stream_strategy(), every in 1usize..40, scoped in any::<bool>()) {
        let mut engine = Engine::new(scoped_config(true, scoped));
        engine.assign(&[p(0), p(1), p(2)]);
        let mut store = MaterializedState::default();
        let mut out = Emitted::new();
        let mut id = 0;
        for (i, (part, key, ts, v)) in stream.iter().enumerate() {
            engine.process(&p(*part), i as i64, rec(key, *ts, *v));
            if i % every == 0 {
                id += 1;
                checkpoint(&mut engine, &mut store, id, &mut out);
            }
        }
        // the last delta and a full snapshot taken at the same instant must agree
        id += 1;
        let delta = engine.snapshot(CheckpointId(id), false);
        store.apply(&Checkpoint { id: CheckpointId(id), base: Some(CheckpointId(id - 1)), trigger_ms: 0, spec: Default::default(), delta }, 0, 0).expect("apply");
        let full = engine.snapshot(CheckpointId(id + 1), true);
        let mut expected: Vec<(StateKey, Entry)> = full.groups.into_iter().flat_map(|g| g.entries()).collect();
        expected.sort_by(|a, b| a.0.cmp(&b.0));
        prop_assert_eq!(full.entries as usize, expected.len());
        prop_assert_eq!(store.restored().entries, expected);
    }

    #[test]
    fn two_halves_with_checkpoint_restore_equal_the_whole(stream in stream_strategy(), cut in 0usize..300, hold in any::<bool>(), scoped in any::<bool>(), encoded in any::<bool>()) {
        let (whole, _) = run_whole_with(&stream, scoped_config(hold, scoped));
        let cut = cut.min(stream.len());
        let mut engine = Engine::new(scoped_config(hold, scoped));
        engine.assign(&[p(0), p(1), p(2)]);
        let mut out = Emitted::new();
        let mut store = MaterializedState::default();
        let mut offsets = [0i64; 3];
        for (part, key, ts, v) in &stream[..cut] {
            let o = offsets[*part as usize];
            offsets[*part as usize] += 1;
            engine.process(&p(*part), o, rec(key, *ts, *v));
            collect(&mut engine, &mut out);
        }
        checkpoint(&mut engine, &mut store, 1, &mut out);
        // a crash right after the checkpoint: everything after it is lost, state comes back
        // (decoded, or as stored groups decoded as they are installed)
        let cfg = scoped_config(hold, scoped);
        let restored = if encoded { store.restored().into_stored(&cfg.groups) } else { store.restored() };
        let mut engine = Engine::from_state(cfg, restored).expect("restore");
        engine.assign(&[p(0), p(1), p(2)]);
        collect(&mut engine, &mut out);
        for (part, key, ts, v) in &stream[cut..] {
            let o = offsets[*part as usize];
            offsets[*part as usize] += 1;
            prop_assert_eq!(engine.position(&p(*part)).map_or(0, |n| n.0).max(0) <= o, true);
            engine.process(&p(*part), o, rec(key, *ts, *v));
            collect(&mut engine, &mut out);
        }
        flush(&mut engine, &mut offsets);
        checkpoint(&mut engine, &mut store, 2, &mut out);
        collect(&mut engine, &mut out);
        prop_assert_eq!(out, whole);
    }

    #[test]
    fn partition_scoped_windows_each_aggregate_one_partition_alone(stream in stream_strategy()) {
        let (scoped, late) = run_whole_with(&stream, scoped_config(true, true));
        prop_assert_eq!(late, 0);
        // each partition's records through an engine that sees nothing else
        let mut expected = Emitted::new();
        for part in 0..3 {
            let mut engine = Engine::new(config(true));
            engine.assign(&[p(part)]);
            let mut out = Emitted::new();
            let mut offset = 0;
            for (_, key, ts, v) in stream.iter().filter(|r| r.0 == part) {
                engine.process(&p(part), offset, rec(key, *ts, *v));
                offset += 1;
                collect(&mut engine, &mut out);
            }
            engine.process(&p(part), offset, rec("~flush", 1_000_000, 0.0));
            let mut store = MaterializedState::default();
            checkpoint(&mut engine, &mut store, 1, &mut out);
            for (mut id, w) in out {
                id.partition = Some(p(part));
                expected.insert(id, w);
            }
        }
        prop_assert_eq!(scoped, expected);
    }

    #[test]
    fn disorder_within_the_bound_changes_nothing(stream in stream_strategy(), seed in any::<u64>()) {
        let (ordered_out, _) = run_whole(&{
            let mut s = stream.clone();
            // per partition, sort by time: the in-order version of the same records
            let mut by_part: BTreeMap<i32, Vec<(i32, String, i64, f64)>> = BTreeMap::new();
            for r in s.drain(..) { by_part.entry(r.0).or_default().push(r); }
            let mut merged = Vec::new();
            for (_, mut v) in by_part { v.sort_by_key(|r| r.2); merged.extend(v); }
            merged
        }, true);
        // a different interleaving of the partitions, each keeping its own (disordered) order
        let mut rng = seed;
        let mut queues: Vec<std::collections::VecDeque<_>> = (0..3).map(|_| Default::default()).collect();
        for r in &stream { queues[r.0 as usize].push_back(r.clone()); }
        let mut shuffled = Vec::new();
        while queues.iter().any(|q| !q.is_empty()) {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let i = (rng >> 33) as usize % 3;
            if let Some(r) = queues[i].pop_front() { shuffled.push(r); }
        }
        let (out, late) = run_whole(&shuffled, true);
        prop_assert_eq!(late, 0);
        prop_assert_eq!(out, ordered_out);
    }
}

#[test]
fn exactly_once_holds_windows_until_their_checkpoint_is_durable() {
    let mut engine = Engine::new(config(true));
    engine.assign(&[p(0)]);
    engine.process(&p(0), 0, rec("a", 100, 1.0));
    engine.process(&p(0), 1, rec("a", 5_000, 1.0));
    assert!(
        engine.take_emittable().is_empty(),
        "closed but not checkpointed"
    );
    assert!(engine.pending_emissions() > 0);
    let _ = engine.snapshot(CheckpointId(7), true);
    engine.checkpoint_failed(CheckpointId(7));
    engine.checkpoint_completed(CheckpointId(7));
    assert!(
        engine.take_emittable().is_empty(),
        "a failed checkpoint releases nothing"
    );
    let _ = engine.snapshot(CheckpointId(8), true);
    engine.checkpoint_completed(CheckpointId(8));
    let released = engine.take_emittable();
    assert!(released
        .iter()
        .any(|w| w.id.key == "a" && w.id.start == 0 && w.acc.count == 1));
}

#[test]
fn at_least_once_emits_as_soon_as_windows_close() {
    let mut engine = Engine::new(config(false));
    engine.assign(&[p(0)]);
    engine.process(&p(0), 0, rec("a", 100, 1.0));
    engine.process(&p(0), 1, rec("a", 5_000, 1.0));
    assert!(!engine.take_emittable().is_empty());
}

#[test]
fn a_record_from_the_far_future_is_invalid_and_moves_no_watermark() {
    let mut engine = Engine::new(config(false));
    engine.assign(&[p(0)]);
    engine.set_not_after(Some(10_000));
    assert_eq!(
        engine.process(&p(0), 0, rec("a", 1_000, 1.0)),
        Outcome::Accepted
    );
    let before = engine.watermark();
    // stamped after the bound: skipped, its offset consumed, the watermark where it was
    assert_eq!(
        engine.process(&p(0), 1, rec("a", 4_102_444_800_000, 1.0)),
        Outcome::Invalid(InvalidReason::FutureTimestamp)
    );
    assert_eq!(engine.watermark(), before);
    assert_eq!(engine.position(&p(0)).map(|n| n.0), Some(2));
    assert!(engine.take_emittable().is_empty(), "no window closed");
    // at the bound is on time, and later records are not late
    assert_eq!(
        engine.process(&p(0), 2, rec("a", 10_000, 1.0)),
        Outcome::Accepted
    );
    assert_eq!(
        engine.process(&p(0), 3, rec("b", 9_900, 1.0)),
        Outcome::Accepted
    );
    // without a bound, the same record is accepted
    engine.set_not_after(None);
    assert_eq!(
        engine.process(&p(0), 4, rec("a", 4_102_444_800_000, 1.0)),
        Outcome::Accepted
    );
}

#[test]
fn late_records_are_counted_and_dropped() {
    let mut engine = Engine::new(config(false));
    engine.assign(&[p(0)]);
    engine.process(&p(0), 0, rec("a", 10_000, 1.0));
    assert_eq!(engine.process(&p(0), 1, rec("a", 100, 1.0)), Outcome::Late);
    // a record late for its tumbling window but still inside an open session/hop is accepted
    assert_eq!(
        engine.process(&p(0), 2, rec("a", 9_700, 1.0)),
        Outcome::Accepted
    );
}

#[test]
fn invalid_records_advance_the_offset() {
    let mut engine = Engine::new(config(false));
    engine.assign(&[p(0)]);
    assert_eq!(
        engine.process(&p(0), 5, Err(InvalidReason::InvalidJson)),
        Outcome::Invalid(InvalidReason::InvalidJson)
    );
    assert_eq!(engine.position(&p(0)), Some(NextOffset(6)));
    assert_eq!(
        engine.process(&p(0), 5, rec("a", 1, 1.0)),
        Outcome::Duplicate
    );
}

#[test]
fn restored_closed_windows_are_emitted_again_identically() {
    let mut engine = Engine::new(config(true));
    engine.assign(&[p(0)]);
    engine.process(&p(0), 0, rec("a", 100, 2.0));
    engine.process(&p(0), 1, rec("a", 5_000, 1.0));
    let delta = engine.snapshot(CheckpointId(1), true);
    let mut store = MaterializedState::default();
    store
        .apply(
            &Checkpoint {
                id: CheckpointId(1),
                base: None,
                trigger_ms: 0,
                spec: Default::default(),
                delta,
            },
            0,
            0,
        )
        .expect("apply");
    engine.checkpoint_completed(CheckpointId(1));
    let first = engine.take_emittable();
    // crash before the acknowledgement was checkpointed: restored decoded, or as stored groups
    let mut first_sorted = first;
    first_sorted.sort_by(|a, b| a.id.cmp(&b.id));
    let layout = config(true).groups;
    for restored in [store.restored(), store.restored().into_stored(&layout)] {
        let mut again = Engine::from_state(config(true), restored).expect("restore");
        let mut second = again.take_emittable();
        second.sort_by(|a, b| a.id.cmp(&b.id));
        assert!(!second.is_empty());
        assert_eq!(first_sorted, second);
    }
}

#[test]
fn restore_refuses_state_of_unknown_windows() {
    let state = RestoredState {
        partitions: vec![],
        watermark: None,
        entries: vec![(
            StateKey {
                partition: None,
                window: 9,
                start: 0,
                key: "a".into(),
            },
            Entry {
                status: EntryStatus::Open,
                end: 1,
                acc: Acc::of(None),
            },
        )],
        stored_bytes: 0,
        ..Default::default()
    };
    assert!(matches!(
        Engine::from_state(config(true), state),
        Err(StateError::UnknownWindow { window: 9, .. })
    ));
}

#[test]
fn a_partition_taken_over_later_is_judged_by_its_own_event_time() {
    // an instance far ahead on partition 0 takes over partition 1, which is behind
    let run = |scoped: bool| {
        let mut engine = Engine::new(scoped_config(true, scoped));
        engine.assign(&[p(0)]);
        engine.process(&p(0), 0, rec("a", 1_000_000, 1.0));
        engine.assign(&[p(1)]);
        engine.process(&p(1), 0, rec("b", 1_000, 1.0))
    };
    assert_eq!(
        run(true),
        Outcome::Accepted,
        "partition scope: its own stream time"
    );
    assert_eq!(
        run(false),
        Outcome::Late,
        "instance scope: the service watermark"
    );
}

#[test]
fn the_service_watermark_moves_with_records_in_both_scopes() {
    for scoped in [false, true] {
        let mut engine = Engine::new(scoped_config(false, scoped));
        engine.assign(&[p(0), p(1)]);
        engine.process(&p(0), 0, rec("a", 10_000, 1.0));
        engine.process(&p(1), 0, rec("b", 12_000, 1.0));
        let first = engine.watermark();
        assert_eq!(first, Some(EventTime(10_000 - 200)), "scoped: {scoped}");
        engine.process(&p(0), 1, rec("a", 20_000, 1.0));
        engine.process(&p(1), 1, rec("b", 21_000, 1.0));
        assert_eq!(
            engine.watermark(),
            Some(EventTime(20_000 - 200)),
            "scoped: {scoped}"
        );
    }
}

#[test]
fn an_idle_partition_lets_the_others_close_their_windows_and_its_next_record_holds_again() {
    let mut engine = Engine::new(config(false));
    engine.assign(&[p(0), p(1)]);
    engine.process(&p(0), 0, rec("a", 100, 1.0));
    engine.process(&p(1), 0, rec("b", 150, 1.0));
    // partition 0 moves on, partition 1 is quiet: its 150 holds the watermark at -50
    engine.process(&p(0), 1, rec("a", 5_000, 1.0));
    assert!(
        engine.take_emittable().is_empty(),
        "held back by partition 1"
    );
    engine.set_idle(&p(1), true);
    let closed: Vec<String> = engine
        .take_emittable()
        .iter()
        .map(|w| w.id.key.to_string())
        .collect();
    assert!(
        closed.contains(&"a".to_string()) && closed.contains(&"b".to_string()),
        "{closed:?}"
    );
    assert_eq!(engine.watermark(), Some(EventTime(4_800)));
    // its next record: late where the windows closed, and it holds the watermark again
    assert!(matches!(
        engine.process(&p(1), 1, rec("b", 200, 1.0)),
        Outcome::Late
    ));
    engine.process(&p(0), 2, rec("a", 9_000, 1.0));
    assert_eq!(engine.watermark(), Some(EventTime(4_800)), "held at 4,800");
}

#[test]
fn with_partition_scope_an_idle_partition_can_follow_the_wall_clock() {
    let mut engine = Engine::new(scoped_config(false, true));
    engine.assign(&[p(0)]);
    engine.process(&p(0), 0, rec("a", 100, 1.0));
    assert!(engine.take_emittable().is_empty());
    // not idle: the wall clock does not move it
    engine.advance_idle(&p(0), 10_000);
    assert!(engine.take_emittable().is_empty());
    engine.set_idle(&p(0), true);
    engine.advance_idle(&p(0), 10_000);
    let closed = engine.take_emittable();
    assert!(
        closed.iter().any(|w| w.id.key.as_str() == "a"),
        "{closed:?}"
    );
    // the wall clock stands as the partition's event time: older records are late
    assert!(matches!(
        engine.process(&p(0), 1, rec("a", 500, 1.0)),
        Outcome::Late
    ));
}

#[test]
fn a_group_whose_every_entry_a_remap_leaves_out_is_not_made() {
    let cfg = || scoped_config(true, true);
    let mut engine = Engine::new(cfg());
    engine.assign(&[p(0)]);
    for (i, key) in ["k1", "k2", "k3", "k4", "k5"].into_iter().enumerate() {
        engine.process(&p(0), i as i64, rec(key, 10_000, 1.0));
    }
    let snap = engine.snapshot(CheckpointId(1), true);
    assert!(!snap.groups.is_empty());
    let mut store = MaterializedState::default();
    let cp = Checkpoint {
        id: CheckpointId(1),
        base: None,
        trigger_ms: 0,
        spec: Default::default(),
        delta: snap.clone(),
    };
    store.apply(&cp, 0, 0).expect("apply");
    let same: BTreeMap<u16, u16> = (0..3).map(|w| (w, w)).collect();
    let remap = |dropped: &[&str]| Remap {
        open: same.clone(),
        closed: same.clone(),
        dropped_topics: dropped.iter().map(|t| t.to_string()).collect(),
    };
    let restore = |r: Remap| {
        let mut state = store.restored().into_stored(&cfg().groups);
        state.remap = Some(r);
        Engine::from_state(cfg(), state).expect("restore")
    };
    // the same remap without the topic dropped makes every group
    let kept = restore(remap(&[]));
    assert_eq!(kept.open_windows() as u64, snap.entries);
    for g in &snap.groups {
        assert!(kept.holds(&g.id.scope, g.id.group), "{:?}", g.id);
    }
    let dropped = restore(remap(&["t"]));
    assert_eq!(dropped.open_windows(), 0);
    for g in &snap.groups {
        assert!(!dropped.holds(&g.id.scope, g.id.group), "{:?}", g.id);
    }
}

/// One stored group per group of [`wide_config`]'s layout, two keys each, every entry an open
/// tumbling window; `bad` adds an entry of window `w` at `start` to the group at a position.
fn stored_groups(bad: &[(usize, u16, i64)]) -> Vec<StoredGroup> {
    let layout = wide_config(false).groups;
    let mut keys: BTreeMap<u16, Vec<String>> = BTreeMap::new();
    let mut i = 0;
    while keys.len() < usize::from(layout.groups) || keys.values().any(|k| k.len() < 2) {
        let key = format!("k{i}");
        let list = keys.entry(layout.group_of(&key)).or_default();
        if list.len() < 2 {
            list.push(key);
        }
        i += 1;
    }
    let entry = |key: &str, window: u16, start: i64| {
        let id = StateKey {
            partition: None,
            window,
            start,
            key: key.into(),
        };
        let e = Entry {
            status: EntryStatus::Open,
            end: start + 1000,
            acc: Acc::of(Some(1.0)),
        };
        (id, e)
    };
    keys.into_iter()
        .enumerate()
        .map(|(at, (group, keys))| {
            let mut list: Vec<(StateKey, Entry)> =
                keys.iter().map(|k| entry(k, 0, 10_000)).collect();
            for &(_, window, start) in bad.iter().filter(|b| b.0 == at) {
                list.push(entry(&keys[0], window, start));
            }
            let id = GroupId {
                aggregation: 0,
                scope: None,
                group,
            };
            let blob = GroupContent::new(id.clone(), list).blob().expect("blob");
            StoredGroup::read(id, blob).expect("read")
        })
        .collect()
}

#[test]
fn a_restore_that_fails_names_the_first_group_in_order_that_fails() {
    let restore = |groups: Vec<StoredGroup>| {
        let state = RestoredState {
            groups,
            ..Default::default()
        };
        Engine::from_state(wide_config(false), state).err()
    };
    // in a batch after the first, and across batches; the earlier failure wins either way
    let unknown_first = restore(stored_groups(&[(70, 7, 10_000), (100, 0, 10_001)]));
    assert!(
        matches!(
            unknown_first,
            Some(StateError::UnknownWindow { window: 7, .. })
        ),
        "{unknown_first:?}"
    );
    let misaligned_first = restore(stored_groups(&[(70, 0, 10_001), (75, 7, 10_000)]));
    assert!(
        matches!(
            misaligned_first,
            Some(StateError::MisalignedWindow { start: 10_001, .. })
        ),
        "{misaligned_first:?}"
    );
    // a damaged group before one of an unknown window
    let mut groups = stored_groups(&[(90, 7, 10_000)]);
    let half = groups[80].blob.len() / 2;
    groups[80].blob.truncate(half);
    let damaged = groups[80].id.group;
    let first = restore(groups);
    assert!(
        matches!(first, Some(StateError::Damaged { group, .. }) if group == damaged),
        "{first:?}"
    );
    assert!(restore(stored_groups(&[])).is_none());
}

#[test]
fn a_group_listed_twice_far_apart_restores_both_halves() {
    let whole = stored_groups(&[]);
    assert!(whole.len() > 2 * INSTALL_BATCH);
    let expected = Engine::from_state(
        wide_config(false),
        RestoredState {
            groups: whole.clone(),
            ..Default::default()
        },
    )
    .expect("restore")
    .snapshot(CheckpointId(1), true);
    assert_eq!(expected.entries, 2 * whole.len() as u64);
    // group 3's keys split in two listings, the second in the last batch: by then the engine
    // holds the group, and the second half goes in key by key beside the first
    let halves: Vec<Vec<(StateKey, Entry)>> = {
        let g = &whole[3];
        let mut entries = Vec::new();
        group::visit_blob(&g.blob, |e| {
            let (key, window, start, end, acc, _) = e;
            let id = StateKey {
                partition: None,
                window,
                start,
                key: key.into(),
            };
            let entry = Entry {
                status: EntryStatus::Open,
                end,
                acc,
            };
            entries.push((id, entry));
        })
        .expect("read");
        let second = entries.split_off(1);
        vec![entries, second]
    };
    let listing = |list: Vec<(StateKey, Entry)>| {
        let id = whole[3].id.clone();
        let blob = GroupContent::new(id.clone(), list).blob().expect("blob");
        StoredGroup::read(id, blob).expect("read")
    };
    let mut groups = whole.clone();
    let [first, second]: [Vec<(StateKey, Entry)>; 2] = halves.try_into().expect("two halves");
    groups[3] = listing(first);
    groups.push(listing(second));
    let mut engine = Engine::from_state(
        wide_config(false),
        RestoredState {
            groups,
            ..Default::default()
        },
    )
    .expect("restore");
    let again = engine.snapshot(CheckpointId(1), true);
    assert_eq!(again.entries, expected.entries);
    assert_eq!(flat(again), flat(expected));
}
