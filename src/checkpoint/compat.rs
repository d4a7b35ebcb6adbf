//! What a retained snapshot becomes under a changed configuration: per window, aggregate and
//! topic, whether its state is kept, migrated, started empty, dropped or incompatible. Pure:
//! `check-restore` prints the report, the service applies it at start.
//!
//! Only open windows carry state that a change can invalidate. Final windows waiting for
//! emission are results already; they are always emitted, under the name they were made with.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::protocol::{InputSpec, StateSpec};
use crate::engine::{AggregateKind, EntryStatus, Remap, RestoredState, WindowDef};
use crate::position::OffsetReset;

/// The configuration a snapshot is about to be restored under.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub spec: &'a StateSpec,
    pub topics: &'a [String],
    /// `earliest` or `latest`: where partitions without a stored offset start.
    pub auto_offset_reset: OffsetReset,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Restored as it is.
    Kept,
    /// Restored after a change that keeps its meaning.
    Migrated(String),
    /// New: no stored state.
    StartedEmpty,
    /// Left behind on purpose (a removed aggregate or topic); not an error.
    Dropped(String),
    /// Stored state that no longer means the same thing. Refuses the start when it holds open
    /// windows, unless `checkpoint.allow_non_restored_state` drops them.
    Incompatible(String),
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Kept => write!(f, "kept"),
            Verdict::Migrated(how) => write!(f, "migrated ({how})"),
            Verdict::StartedEmpty => write!(f, "started empty"),
            Verdict::Dropped(why) => write!(f, "dropped ({why})"),
            Verdict::Incompatible(why) => write!(f, "incompatible ({why})"),
        }
    }
}

/// One window, aggregate or topic of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub subject: String,
    pub verdict: Verdict,
    /// Open windows (windows) or partitions (topics) of stored state it concerns.
    pub stored: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub windows: Vec<Line>,
    pub aggregates: Vec<Line>,
    pub topics: Vec<Line>,
    pub notes: Vec<String>,
    /// Stored window index -> configured index, for windows whose open state is restored.
    open_map: BTreeMap<u16, u16>,
    /// Stored window index -> index its final windows are emitted under.
    closed_map: BTreeMap<u16, u16>,
    /// Definitions for indices past the configured windows: windows removed or redefined whose
    /// final windows are still to be emitted under their old name.
    retired: Vec<WindowDef>,
    dropped_topics: BTreeSet<String>,
    identity: bool,
}

/// The state to restore after applying a report, and what it left out.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub state: RestoredState,
    pub dropped_entries: u64,
    pub dropped_partitions: u64,
}

fn input_changes(stored: &InputSpec, configured: &InputSpec, target: &StateSpec) -> Vec<String> {
    let mut out = Vec::new();
    if stored.key != configured.key {
        out.push(format!(
            "input.key changed from {} to {}",
            stored.key, configured.key
        ));
    }
    if stored.timestamp != configured.timestamp {
        out.push(format!(
            "input.timestamp changed from {} to {}",
            stored.timestamp, configured.timestamp
        ));
    }
    let reads_value = target.aggregates.iter().any(|a| a.needs_value());
    if reads_value && stored.value != configured.value {
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "(none)".into());
        out.push(format!(
            "input.value changed from {} to {}",
            show(&stored.value),
            show(&configured.value)
        ));
    }
    out
}

fn aggregate_name(a: AggregateKind) -> String {
    format!("{a:?}").to_lowercase()
}

/// Compares the stored snapshot (`stored` spec and `state`) with the configured target.
pub fn assess(stored: &StateSpec, state: &RestoredState, target: Target<'_>) -> Report {
    let mut open_per_window: BTreeMap<u16, u64> = BTreeMap::new();
    let mut closed_per_window: BTreeMap<u16, u64> = BTreeMap::new();
    for ((_, window, closed), n) in state.counts() {
        let counts = if closed {
            &mut closed_per_window
        } else {
            &mut open_per_window
        };
        *counts.entry(window).or_default() += n;
    }
    let mut notes = Vec::new();
    // a change of what feeds the accumulators invalidates every open window
    let input_reasons = match (&stored.input, &target.spec.input) {
        (Some(s), Some(c)) => input_changes(s, c, target.spec),
        (None, _) => {
            notes.push("the snapshot does not record its input fields (written by format 2 or earlier); input.key, input.timestamp and input.value are assumed unchanged".into());
            Vec::new()
        }
        (Some(_), None) => Vec::new(),
    };
    // whether the stored accumulators hold values; state that did not record its input fields
    // read one only if one of its aggregates needed it (input.value was optional otherwise)
    let stored_value = match &stored.input {
        Some(i) => i.value.is_some(),
        None => stored.aggregates.iter().any(|a| a.needs_value()),
    };
    let mut aggregates = Vec::new();
    let mut aggregate_reasons = Vec::new();
    for a in &target.spec.aggregates {
        let verdict = if stored.aggregates.contains(a) {
            Verdict::Kept
        } else if a.needs_value() && !stored_value {
            let why = format!(
                "{} needs input.value, which the stored windows did not read",
                aggregate_name(*a)
            );
            aggregate_reasons.push(why.clone());
            Verdict::Incompatible(why)
        } else {
            Verdict::Migrated("computed from the stored accumulators".into())
        };
        aggregates.push(Line {
            subject: aggregate_name(*a),
            verdict,
            stored: 0,
        });
    }
    for a in &stored.aggregates {
        if !target.spec.aggregates.contains(a) {
            aggregates.push(Line {
                subject: aggregate_name(*a),
                verdict: Verdict::Dropped("no longer configured".into()),
                stored: 0,
            });
        }
    }
    let scope_reason = (stored.partition_scoped != target.spec.partition_scoped).then(|| {
        let name = |scoped: bool| if scoped { "partition" } else { "instance" };
        format!(
            "state.scope changed from {} to {}",
            name(stored.partition_scoped),
            name(target.spec.partition_scoped)
        )
    });
    let global: Vec<String> = input_reasons
        .into_iter()
        .chain(aggregate_reasons)
        .chain(scope_reason)
        .collect();

    let mut windows = Vec::new();
    let mut open_map = BTreeMap::new();
    let mut closed_map = BTreeMap::new();
    let mut retired: Vec<WindowDef> = Vec::new();
    let configured_len = target.spec.windows.len();
    // final windows of a window that no longer applies keep being emitted under its old name
    let mut retire = |old_index: u16, def: &WindowDef, closed_map: &mut BTreeMap<u16, u16>| {
        if closed_per_window.get(&old_index).copied().unwrap_or(0) > 0 {
            closed_map.insert(old_index, (configured_len + retired.len()) as u16);
            retired.push(def.clone());
        }
    };
    for (new_index, w) in target.spec.windows.iter().enumerate() {
        let new_index = new_index as u16;
        let old = stored
            .windows
            .iter()
            .position(|s| s.name == w.name)
            .map(|i| (i as u16, &stored.windows[i]));
        let (verdict, open) = match old {
            None => (Verdict::StartedEmpty, 0),
            Some((old_index, def)) => {
                let open = open_per_window.get(&old_index).copied().unwrap_or(0);
                let verdict = if def.kind != w.kind {
                    Verdict::Incompatible(format!(
                        "was {}, now {}",
                        def.kind.describe(),
                        w.kind.describe()
                    ))
                } else if !global.is_empty() {
                    Verdict::Incompatible(global.join("; "))
                } else if old_index != new_index {
                    Verdict::Migrated(format!(
                        "moved from position {} to {}",
                        old_index + 1,
                        new_index + 1
                    ))
                } else {
                    Verdict::Kept
                };
                if matches!(verdict, Verdict::Kept | Verdict::Migrated(_)) {
                    open_map.insert(old_index, new_index);
                    closed_map.insert(old_index, new_index);
                } else {
                    retire(old_index, def, &mut closed_map);
                }
                (verdict, open)
            }
        };
        windows.push(Line {
            subject: w.name.clone(),
            verdict,
            stored: open,
        });
    }
    for (old_index, def) in stored.windows.iter().enumerate() {
        if target.spec.windows.iter().any(|w| w.name == def.name) {
            continue;
        }
        let old_index = old_index as u16;
        retire(old_index, def, &mut closed_map);
        windows.push(Line {
            subject: def.name.clone(),
            verdict: Verdict::Incompatible("no longer configured".into()),
            stored: open_per_window.get(&old_index).copied().unwrap_or(0),
        });
    }

    // windows retired by an earlier start, still holding final windows
    let first_retired = stored.windows.len();
    for (i, def) in stored.retired.iter().enumerate() {
        retire((first_retired + i) as u16, def, &mut closed_map);
    }

    let mut per_topic: BTreeMap<&str, u64> = BTreeMap::new();
    for p in &state.partitions {
        *per_topic.entry(p.partition.topic.as_str()).or_default() += 1;
    }
    let mut topics = Vec::new();
    let mut dropped_topics = BTreeSet::new();
    for t in target.topics {
        let stored_parts = per_topic.get(t.as_str()).copied().unwrap_or(0);
        let verdict = if stored_parts == 0 {
            Verdict::StartedEmpty
        } else {
            Verdict::Kept
        };
        topics.push(Line {
            subject: t.clone(),
            verdict,
            stored: stored_parts,
        });
    }
    for (t, n) in &per_topic {
        if !target.topics.iter().any(|c| c == t) {
            dropped_topics.insert(t.to_string());
            topics.push(Line {
                subject: t.to_string(),
                verdict: Verdict::Dropped(
                    "no longer subscribed: its offsets (and partition-scoped windows) are not resumed"
                        .into(),
                ),
                stored: *n,
            });
        }
    }
    notes.push(format!(
        "partitions without a stored offset start at {} (kafka.auto_offset_reset), except, with state.scope: instance, partitions added to a topic this state knows, which are read from their beginning",
        target.auto_offset_reset
    ));

    // anything restored differently from how it is stored, or left behind, makes the restored
    // state a new line: its first checkpoint must be full
    let leaves_behind = open_per_window.keys().any(|w| !open_map.contains_key(w))
        || closed_per_window
            .keys()
            .any(|w| !closed_map.contains_key(w));
    let identity = dropped_topics.is_empty()
        && !leaves_behind
        && closed_map.iter().all(|(a, b)| a == b)
        && open_map.iter().all(|(a, b)| a == b)
        && stored.windows.len() == configured_len
        && retired == stored.retired;
    Report {
        windows,
        aggregates,
        topics,
        notes,
        open_map,
        closed_map,
        retired,
        dropped_topics,
        identity,
    }
}

impl Report {
    /// Open windows that a start would have to drop.
    pub fn incompatible_open_windows(&self) -> u64 {
        self.windows
            .iter()
            .filter(|l| matches!(l.verdict, Verdict::Incompatible(_)))
            .map(|l| l.stored)
            .sum()
    }

    /// Whether a start without `allow_non_restored_state` is refused.
    pub fn refuses(&self) -> bool {
        self.incompatible_open_windows() > 0
    }

    /// Whether restoring changes the state (re-numbered, dropped or retired windows, dropped
    /// topics): the next checkpoint must then be a full one.
    pub fn changes_state(&self) -> bool {
        !self.identity
    }

    /// Windows no longer configured whose final windows are still to be emitted, in the order
    /// of the indices after the configured ones: the `retired` part of the spec the restored
    /// state is checkpointed under.
    pub fn retired(&self) -> &[WindowDef] {
        &self.retired
    }

    /// What applying the report changes in each restored entry.
    fn remap(&self) -> Remap {
        Remap {
            open: self.open_map.clone(),
            closed: self.closed_map.clone(),
            dropped_topics: self.dropped_topics.clone(),
        }
    }

    /// Applies the report: re-numbers windows, drops incompatible open windows and the
    /// partitions of topics no longer subscribed. Decoded entries change at once; stored
    /// groups carry the change to their install (nothing is decoded here).
    pub fn apply(&self, state: RestoredState) -> Applied {
        let remap = self.remap();
        let before = state.len();
        // in place: a restored state of millions of entries is not copied
        let mut entries = state.entries;
        entries.retain_mut(|(k, e)| {
            match remap.window(&k.partition, k.window, e.status == EntryStatus::Closed) {
                Some(index) => {
                    k.window = index;
                    true
                }
                None => false,
            }
        });
        let parts_before = state.partitions.len();
        let partitions: Vec<_> = state
            .partitions
            .into_iter()
            .filter(|p| !self.dropped_topics.contains(&p.partition.topic))
            .collect();
        let applied = RestoredState {
            partitions,
            watermark: state.watermark,
            entries,
            remap: (!state.groups.is_empty()).then_some(remap),
            groups: state.groups,
            stored_bytes: state.stored_bytes,
        };
        Applied {
            dropped_partitions: (parts_before - applied.partitions.len()) as u64,
            dropped_entries: before - applied.len(),
            state: applied,
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let section = |f: &mut fmt::Formatter<'_>, title: &str, lines: &[Line], unit: &str| {
            writeln!(f, "{title}:")?;
            for l in lines {
                if l.stored > 0 {
                    writeln!(f, "  {:<24} {} [{} {unit}]", l.subject, l.verdict, l.stored)?;
                } else {
                    writeln!(f, "  {:<24} {}", l.subject, l.verdict)?;
                }
            }
            Ok(())
        };
        section(f, "windows", &self.windows, "open windows")?;
        section(f, "aggregates", &self.aggregates, "")?;
        section(f, "topics", &self.topics, "partitions")?;
        for n in &self.notes {
            writeln!(f, "note: {n}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
