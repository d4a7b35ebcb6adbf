use super::*;
use crate::engine::{Acc, Entry, PartitionState, StateKey, WindowDef, WindowKind};
use crate::event_time::EventTime;
use crate::position::OffsetReset;
use crate::position::{NextOffset, Partition};

fn tumbling(name: &str, size: i64) -> WindowDef {
    WindowDef {
        name: name.into(),
        kind: WindowKind::Tumbling { size },
    }
}

fn session(name: &str, gap: i64) -> WindowDef {
    WindowDef {
        name: name.into(),
        kind: WindowKind::Session { gap },
    }
}

fn input(key: &str, value: Option<&str>) -> Option<InputSpec> {
    Some(InputSpec {
        key: key.into(),
        timestamp: "/ts".into(),
        value: value.map(String::from),
    })
}

fn spec(windows: Vec<WindowDef>, aggregates: Vec<AggregateKind>) -> StateSpec {
    StateSpec {
        windows,
        aggregates,
        input: input("/user", Some("/amount")),
        retired: Vec::new(),
        partition_scoped: false,
    }
}

fn stored_spec() -> StateSpec {
    spec(
        vec![tumbling("minute", 60_000), session("visits", 30_000)],
        vec![AggregateKind::Count, AggregateKind::Sum],
    )
}

fn entry(window: u16, key: &str, status: EntryStatus) -> (StateKey, Entry) {
    (
        StateKey {
            partition: None,
            window,
            start: 0,
            key: key.into(),
        },
        Entry {
            status,
            end: 60_000,
            acc: Acc::of(Some(2.0)),
        },
    )
}

/// Two open windows in `minute`, one open and one final in `visits`, partitions of `events`
/// and `clicks`.
fn state() -> RestoredState {
    let part = |topic: &str, p: i32| PartitionState {
        partition: Partition::new(topic, p),
        next: Some(NextOffset(10)),
        max_ts: Some(EventTime(5)),
    };
    RestoredState {
        partitions: vec![part("clicks", 0), part("events", 0), part("events", 1)],
        watermark: Some(EventTime(1)),
        entries: vec![
            entry(0, "a", EntryStatus::Open),
            entry(0, "b", EntryStatus::Open),
            entry(1, "a", EntryStatus::Open),
            entry(1, "z", EntryStatus::Closed),
        ],
        stored_bytes: 0,
        ..Default::default()
    }
}

fn topics(t: &[&str]) -> Vec<String> {
    t.iter().map(|s| s.to_string()).collect()
}

fn assess_with(configured: &StateSpec, subscribed: &[&str]) -> Report {
    let subscribed = topics(subscribed);
    assess(
        &stored_spec(),
        &state(),
        Target {
            spec: configured,
            topics: &subscribed,
            auto_offset_reset: OffsetReset::Earliest,
        },
    )
}

/// `assess` with `earliest` as the reset policy.
fn assess_on(
    stored: &StateSpec,
    s: &RestoredState,
    configured: &StateSpec,
    t: &[String],
) -> Report {
    assess(
        stored,
        s,
        Target {
            spec: configured,
            topics: t,
            auto_offset_reset: OffsetReset::Earliest,
        },
    )
}

fn verdict<'a>(lines: &'a [Line], subject: &str) -> &'a Verdict {
    &lines
        .iter()
        .find(|l| l.subject == subject)
        .unwrap_or_else(|| panic!("no line for {subject}"))
        .verdict
}

#[test]
fn the_same_configuration_keeps_everything_unchanged() {
    let report = assess_with(&stored_spec(), &["clicks", "events"]);
    assert!(report.windows.iter().all(|l| l.verdict == Verdict::Kept));
    assert!(report.aggregates.iter().all(|l| l.verdict == Verdict::Kept));
    assert!(!report.refuses());
    assert!(!report.changes_state());
    let applied = report.apply(state());
    assert_eq!(applied.state, state());
    assert_eq!(
        (applied.dropped_entries, applied.dropped_partitions),
        (0, 0)
    );
}

#[test]
fn reordered_windows_are_migrated_to_their_new_positions() {
    let configured = spec(
        vec![session("visits", 30_000), tumbling("minute", 60_000)],
        vec![AggregateKind::Count, AggregateKind::Sum],
    );
    let report = assess_with(&configured, &["clicks", "events"]);
    assert!(matches!(
        verdict(&report.windows, "minute"),
        Verdict::Migrated(_)
    ));
    assert!(!report.refuses());
    assert!(report.changes_state());
    let applied = report.apply(state());
    let windows: Vec<(u16, &str)> = applied
        .state
        .entries
        .iter()
        .map(|(k, _)| (k.window, k.key.as_str()))
        .collect();
    assert_eq!(windows, vec![(1, "a"), (1, "b"), (0, "a"), (0, "z")]);
}

#[test]
fn a_changed_window_with_open_state_is_incompatible_and_keeps_its_final_windows() {
    let configured = spec(
        vec![tumbling("minute", 60_000), session("visits", 10_000)],
        vec![AggregateKind::Count, AggregateKind::Sum],
    );
    let report = assess_with(&configured, &["clicks", "events"]);
    match verdict(&report.windows, "visits") {
        Verdict::Incompatible(why) => assert!(
            why.contains("session gap 30s") && why.contains("session gap 10s"),
            "{why}"
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(verdict(&report.windows, "minute"), &Verdict::Kept);
    assert!(report.refuses());
    assert_eq!(report.incompatible_open_windows(), 1);
    assert!(
        report.changes_state(),
        "dropping makes the next checkpoint a full one"
    );
    let applied = report.apply(state());
    assert_eq!(applied.dropped_entries, 1, "only the open window of visits");
    // the final window is emitted under the old definition's name, past the configured ones
    assert_eq!(report.retired(), [session("visits", 30_000)]);
    assert!(applied
        .state
        .entries
        .iter()
        .any(|(k, e)| k.key == "z" && k.window == 2 && e.status == EntryStatus::Closed));
}

#[test]
fn a_changed_window_without_open_state_does_not_refuse() {
    let mut s = state();
    s.entries.retain(|(k, _)| k.window == 0);
    let configured = spec(
        vec![tumbling("minute", 60_000), session("visits", 10_000)],
        vec![AggregateKind::Count, AggregateKind::Sum],
    );
    let t = topics(&["clicks", "events"]);
    let report = assess(
        &stored_spec(),
        &s,
        Target {
            spec: &configured,
            topics: &t,
            auto_offset_reset: OffsetReset::Latest,
        },
    );
    assert!(matches!(
        verdict(&report.windows, "visits"),
        Verdict::Incompatible(_)
    ));
    assert!(!report.refuses());
}

#[test]
fn new_windows_start_empty_and_removed_windows_with_state_refuse() {
    let configured = spec(
        vec![tumbling("minute", 60_000), tumbling("hour", 3_600_000)],
        vec![AggregateKind::Count, AggregateKind::Sum],
    );
    let report = assess_with(&configured, &["clicks", "events"]);
    assert_eq!(verdict(&report.windows, "hour"), &Verdict::StartedEmpty);
    assert!(matches!(
        verdict(&report.windows, "visits"),
        Verdict::Incompatible(_)
    ));
    assert!(report.refuses());
    let applied = report.apply(state());
    assert_eq!(applied.dropped_entries, 1);
    assert_eq!(report.retired(), [session("visits", 30_000)]);
}

#[test]
fn a_changed_key_or_timestamp_field_invalidates_every_window() {
    for change in ["key", "timestamp"] {
        let mut configured = stored_spec();
        let input = configured.input.as_mut().expect("input");
        match change {
            "key" => input.key = "$key".into(),
            _ => input.timestamp = "$timestamp".into(),
        }
        let report = assess_with(&configured, &["clicks", "events"]);
        for w in ["minute", "visits"] {
            match verdict(&report.windows, w) {
                Verdict::Incompatible(why) => {
                    assert!(why.contains(&format!("input.{change} changed")), "{why}")
                }
                other => panic!("{change}: {w}: {other:?}"),
            }
        }
        assert_eq!(report.incompatible_open_windows(), 3);
        let applied = report.apply(state());
        assert_eq!(applied.dropped_entries, 3);
        assert_eq!(applied.state.entries.len(), 1, "the final window stays");
    }
}

#[test]
fn a_changed_value_field_matters_only_to_aggregates_that_read_it() {
    let mut configured = stored_spec();
    configured.input = input("/user", Some("/price"));
    let report = assess_with(&configured, &["clicks", "events"]);
    assert!(report.refuses(), "sum reads the value");
    configured.aggregates = vec![AggregateKind::Count];
    let report = assess_with(&configured, &["clicks", "events"]);
    assert!(!report.refuses(), "count does not");
    assert!(matches!(
        verdict(&report.aggregates, "sum"),
        Verdict::Dropped(_)
    ));
}

#[test]
fn new_aggregates_derive_from_the_accumulator_when_the_value_was_read() {
    let mut configured = stored_spec();
    configured.aggregates.push(AggregateKind::Mean);
    let report = assess_with(&configured, &["clicks", "events"]);
    assert!(matches!(
        verdict(&report.aggregates, "mean"),
        Verdict::Migrated(_)
    ));
    assert!(!report.refuses());

    // state that never read a value cannot produce a sum
    let mut count_only = stored_spec();
    count_only.aggregates = vec![AggregateKind::Count];
    count_only.input = input("/user", None);
    let t = topics(&["clicks", "events"]);
    let report = assess_on(&count_only, &state(), &stored_spec(), &t);
    assert!(matches!(
        verdict(&report.aggregates, "sum"),
        Verdict::Incompatible(_)
    ));
    assert!(report.refuses());
}

#[test]
fn state_without_recorded_input_fields_is_assumed_unchanged_and_says_so() {
    let mut old = stored_spec();
    old.input = None;
    let t = topics(&["clicks", "events"]);
    let report = assess_on(&old, &state(), &stored_spec(), &t);
    assert!(!report.refuses());
    assert!(report.notes.iter().any(|n| n.contains("format 2")));
}

#[test]
fn removed_topics_are_dropped_and_added_topics_start_empty() {
    let report = assess_with(&stored_spec(), &["events", "orders"]);
    assert!(matches!(
        verdict(&report.topics, "clicks"),
        Verdict::Dropped(_)
    ));
    assert_eq!(verdict(&report.topics, "orders"), &Verdict::StartedEmpty);
    assert_eq!(verdict(&report.topics, "events"), &Verdict::Kept);
    assert!(!report.refuses());
    assert!(report.changes_state());
    let applied = report.apply(state());
    assert_eq!(applied.dropped_partitions, 1);
    assert!(applied
        .state
        .partitions
        .iter()
        .all(|p| p.partition.topic == "events"));
}

#[test]
fn the_report_names_every_window_aggregate_and_topic() {
    let configured = spec(
        vec![tumbling("minute", 30_000), tumbling("hour", 3_600_000)],
        vec![AggregateKind::Count, AggregateKind::Max],
    );
    let text = assess_with(&configured, &["events"]).to_string();
    for needle in [
        "minute",
        "incompatible (was tumbling 1m, now tumbling 30s)",
        "[2 open windows]",
        "hour",
        "started empty",
        "visits",
        "no longer configured",
        "max",
        "migrated (computed from the stored accumulators)",
        "sum",
        "clicks",
        "dropped (no longer subscribed",
        "earliest",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
}

#[test]
fn retired_windows_keep_their_final_windows_across_later_starts() {
    // first start: `visits` is removed; its final window is kept under index 1 (retired)
    let configured = spec(
        vec![tumbling("minute", 60_000)],
        vec![AggregateKind::Count, AggregateKind::Sum],
    );
    let first = assess_with(&configured, &["clicks", "events"]);
    let restored = first.apply(state()).state;
    let mut written = configured.clone();
    written.retired = first.retired().to_vec();
    assert_eq!(written.window_name(1), Some("visits"));
    // a second start before that window was acknowledged still has it
    let t = topics(&["clicks", "events"]);
    let second = assess_on(&written, &restored, &configured, &t);
    assert!(!second.refuses());
    assert!(
        !second.changes_state(),
        "nothing moved since the first start"
    );
    let again = second.apply(restored.clone());
    assert_eq!(again.state, restored);
    assert_eq!(second.retired(), [session("visits", 30_000)]);
    // once it is emitted and gone, the retired definition goes too
    let mut emitted = restored;
    emitted
        .entries
        .retain(|(_, e)| e.status == EntryStatus::Open);
    let third = assess_on(&written, &emitted, &configured, &t);
    assert!(third.retired().is_empty());
    assert!(third.changes_state());
}

#[test]
fn a_changed_state_scope_invalidates_every_open_window() {
    let mut configured = stored_spec();
    configured.partition_scoped = true;
    let report = assess_with(&configured, &["clicks", "events"]);
    for w in ["minute", "visits"] {
        match verdict(&report.windows, w) {
            Verdict::Incompatible(why) => assert!(
                why.contains("state.scope changed from instance to partition"),
                "{why}"
            ),
            other => panic!("{w}: {other:?}"),
        }
    }
    assert_eq!(report.incompatible_open_windows(), 3);
}

#[test]
fn partition_scoped_windows_of_a_removed_topic_are_dropped_with_it() {
    let mut stored = stored_spec();
    stored.partition_scoped = true;
    let mut s = state();
    for (k, _) in &mut s.entries {
        k.partition = Some(Partition::new(
            if k.key == "b" { "clicks" } else { "events" },
            0,
        ));
    }
    let t = topics(&["events"]);
    let report = assess_on(&stored, &s, &stored, &t);
    assert!(!report.refuses(), "a removed topic is dropped, not refused");
    let applied = report.apply(s);
    assert_eq!(applied.dropped_entries, 1, "the window of `clicks`");
    assert_eq!(applied.dropped_partitions, 1);
    assert!(applied
        .state
        .entries
        .iter()
        .all(|(k, _)| k.partition.as_ref().is_some_and(|p| p.topic == "events")));
}

#[test]
fn state_without_recorded_input_that_read_no_value_cannot_grow_a_sum() {
    // format 2, count only: input.value was optional and the accumulators hold no values
    let mut old = stored_spec();
    old.input = None;
    old.aggregates = vec![AggregateKind::Count];
    let t = topics(&["clicks", "events"]);
    let report = assess_on(&old, &state(), &stored_spec(), &t);
    assert!(matches!(
        verdict(&report.aggregates, "sum"),
        Verdict::Incompatible(_)
    ));
    assert!(report.refuses());
}

#[test]
fn stored_groups_are_assessed_and_applied_as_their_decoded_entries_are() {
    let mut scoped = stored_spec();
    scoped.partition_scoped = true;
    let mut partitioned = state();
    for (k, _) in &mut partitioned.entries {
        let topic = if k.key == "b" { "clicks" } else { "events" };
        k.partition = Some(Partition::new(topic, 0));
    }
    let swapped = spec(
        vec![session("visits", 30_000), tumbling("minute", 60_000)],
        vec![AggregateKind::Count, AggregateKind::Sum],
    );
    let changed = spec(
        vec![tumbling("minute", 120_000), session("visits", 30_000)],
        vec![AggregateKind::Count, AggregateKind::Sum],
    );
    let cases = [
        (
            stored_spec(),
            state(),
            stored_spec(),
            topics(&["clicks", "events"]),
        ),
        (
            stored_spec(),
            state(),
            swapped,
            topics(&["clicks", "events"]),
        ),
        (stored_spec(), state(), changed, topics(&["events"])),
        (scoped.clone(), partitioned, scoped, topics(&["events"])),
    ];
    for (stored, decoded, configured, t) in cases {
        let encoded = decoded
            .clone()
            .into_stored(&crate::engine::GroupLayout { seed: 3, groups: 4 });
        assert_eq!(encoded.len(), decoded.entries.len() as u64);
        assert_eq!(encoded.counts(), decoded.counts());
        let report = assess_on(&stored, &decoded, &configured, &t);
        assert_eq!(assess_on(&stored, &encoded, &configured, &t), report);
        let want = report.apply(decoded);
        let got = report.apply(encoded);
        assert_eq!(got.dropped_entries, want.dropped_entries);
        assert_eq!(got.dropped_partitions, want.dropped_partitions);
        assert_eq!(got.state.len(), want.state.entries.len() as u64);
        let mut expected = want.state.entries;
        expected.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(got.state.into_entries().expect("decodes"), expected);
    }
}
