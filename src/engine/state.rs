//! Open window state per window definition (of one key group, see `scope`). Every change
//! reports the window ends it adds or removes, so that the scope knows which groups the
//! watermark closes windows in.

use std::collections::{BTreeMap, BTreeSet};

use foldhash::{HashMap, HashMapExt};

use serde::{Deserialize, Serialize};

use super::aggregate::Acc;
use super::window::{hopping_starts, tumbling_start, WindowKind};
use crate::position::Partition;

/// Identity of one window instance: the source partition whose records it aggregates (`None`
/// with instance-scoped state, which merges every partition), definition index, start, key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct StateKey {
    pub partition: Option<Partition>,
    pub window: u16,
    pub start: i64,
    pub key: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryStatus {
    /// Still accumulating.
    Open,
    /// Final, waiting to be emitted (exactly-once mode keeps these in the checkpoint).
    Closed,
}

/// What a checkpoint stores for one window instance.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub status: EntryStatus,
    pub end: i64,
    pub acc: Acc,
}

/// A window end a change added or removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndChange {
    /// A fixed window ends here (reported on every record; repeats are harmless).
    Fixed(i64),
    /// A session now ends here.
    SessionAdded(i64),
    /// A session that ended here is gone (merged or extended).
    SessionRemoved(i64),
}

/// A final window.
#[derive(Debug, Clone, PartialEq)]
pub struct ClosedWindow {
    pub id: StateKey,
    pub end: i64,
    pub acc: Acc,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Session {
    start: i64,
    end: i64,
    acc: Acc,
}

#[derive(Debug, Clone)]
enum Slots {
    Fixed {
        kind: WindowKind,
        by_start: BTreeMap<i64, HashMap<String, Acc>>,
        /// Keys of the window that closed last: a new window's table starts that large, so
        /// that it does not grow step by step as its keys arrive.
        hint: usize,
    },
    Session {
        gap: i64,
        by_key: HashMap<String, Vec<Session>>,
        by_end: BTreeSet<(i64, String, i64)>,
    },
}

/// The open windows of one definition in one state scope.
#[derive(Debug, Clone)]
pub struct WindowTable {
    index: u16,
    scope: Option<Partition>,
    slots: Slots,
    open: usize,
}

fn key_of(scope: &Option<Partition>, window: u16, start: i64, key: &str) -> StateKey {
    StateKey {
        partition: scope.clone(),
        window,
        start,
        key: key.to_string(),
    }
}

fn is_final(end: i64, limit: Option<i64>) -> bool {
    limit.is_some_and(|l| end <= l)
}

impl WindowTable {
    pub fn new(index: u16, kind: WindowKind, scope: Option<Partition>) -> Self {
        let slots = match kind {
            WindowKind::Session { gap } => Slots::Session {
                gap,
                by_key: HashMap::new(),
                by_end: BTreeSet::new(),
            },
            other => Slots::Fixed {
                hint: 0,
                kind: other,
                by_start: BTreeMap::new(),
            },
        };
        WindowTable {
            index,
            scope,
            slots,
            open: 0,
        }
    }

    pub fn open_count(&self) -> usize {
        self.open
    }

    /// Adds a record to every window of this definition that holds `ts` and is not final
    /// (`end <= limit` is final), reporting the ends of the windows it touched in `ends`.
    /// Returns whether any window took it.
    pub fn add(
        &mut self,
        key: &str,
        ts: i64,
        value: Option<f64>,
        limit: Option<i64>,
        ends: &mut Vec<EndChange>,
    ) -> bool {
        match &mut self.slots {
            Slots::Fixed {
                kind,
                by_start,
                hint,
            } => {
                let mut took = false;
                let mut touch = |start: i64, size: i64, open: &mut usize| {
                    if is_final(start + size, limit) {
                        return;
                    }
                    ends.push(EndChange::Fixed(start + size));
                    // sized like the last closed window only when it opens the newest start
                    // (not for a start reopened by a late record)
                    let newest = by_start
                        .last_key_value()
                        .is_none_or(|(last, _)| start > *last);
                    let size_hint = if newest { *hint } else { 0 };
                    let keys = by_start
                        .entry(start)
                        .or_insert_with(|| HashMap::with_capacity(size_hint));
                    match keys.get_mut(key) {
                        Some(acc) => acc.add(value),
                        None => {
                            keys.insert(key.to_string(), Acc::of(value));
                            *open += 1;
                        }
                    }
                    took = true;
                };
                match *kind {
                    WindowKind::Tumbling { size } => {
                        touch(tumbling_start(ts, size), size, &mut self.open)
                    }
                    WindowKind::Hopping { size, hop } => {
                        for start in hopping_starts(ts, size, hop) {
                            touch(start, size, &mut self.open);
                        }
                    }
                    WindowKind::Session { .. } => {}
                }
                took
            }
            Slots::Session {
                gap,
                by_key,
                by_end,
            } => {
                let new_end = ts.saturating_add(*gap);
                let sessions = by_key.entry(key.to_string()).or_default();
                let mut merged = Session {
                    start: ts,
                    end: new_end,
                    acc: Acc::of(value),
                };
                let overlapping: Vec<usize> = sessions
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| ts < s.end && s.start < new_end)
                    .map(|(i, _)| i)
                    .collect();
                // the common cases: the record falls inside one session, or extends it in order
                if let [i] = overlapping[..] {
                    let s = &mut sessions[i];
                    if ts >= s.start && new_end <= s.end {
                        s.acc.add(value);
                        return true;
                    }
                    let next_start = sessions.get(i + 1).map_or(i64::MAX, |n| n.start);
                    let s = &mut sessions[i];
                    if ts >= s.start && new_end <= next_start && !is_final(new_end, limit) {
                        by_end.remove(&(s.end, key.to_string(), s.start));
                        ends.push(EndChange::SessionRemoved(s.end));
                        s.end = new_end;
                        s.acc.add(value);
                        by_end.insert((s.end, key.to_string(), s.start));
                        ends.push(EndChange::SessionAdded(s.end));
                        return true;
                    }
                }
                for &i in &overlapping {
                    let s = sessions[i];
                    merged.start = merged.start.min(s.start);
                    merged.end = merged.end.max(s.end);
                    merged.acc.merge(&s.acc);
                }
                if is_final(merged.end, limit) {
                    if sessions.is_empty() {
                        by_key.remove(key);
                    }
                    return false;
                }
                for &i in overlapping.iter().rev() {
                    let old = sessions.remove(i);
                    by_end.remove(&(old.end, key.to_string(), old.start));
                    ends.push(EndChange::SessionRemoved(old.end));
                    self.open -= 1;
                }
                let pos = sessions.partition_point(|s| s.start < merged.start);
                sessions.insert(pos, merged);
                by_end.insert((merged.end, key.to_string(), merged.start));
                ends.push(EndChange::SessionAdded(merged.end));
                self.open += 1;
                true
            }
        }
    }

    /// Removes and returns every window whose end is at or before `limit`.
    pub fn close(&mut self, limit: i64, out: &mut Vec<ClosedWindow>) {
        let (index, scope) = (self.index, &self.scope);
        match &mut self.slots {
            Slots::Fixed {
                kind,
                by_start,
                hint,
            } => {
                let size = kind.size().unwrap_or(0);
                while let Some(entry) = by_start.first_entry() {
                    let start = *entry.key();
                    if start + size > limit {
                        break;
                    }
                    let keys = entry.remove();
                    self.open -= keys.len();
                    *hint = keys.len();
                    let mut closed: Vec<ClosedWindow> = keys
                        .into_iter()
                        .map(|(key, acc)| ClosedWindow {
                            id: StateKey {
                                partition: scope.clone(),
                                window: index,
                                start,
                                key,
                            },
                            end: start + size,
                            acc,
                        })
                        .collect();
                    closed.sort_by(|a, b| a.id.cmp(&b.id));
                    out.extend(closed);
                }
            }
            Slots::Session { by_key, by_end, .. } => {
                while let Some((end, key, start)) = by_end.first().cloned() {
                    if end > limit {
                        break;
                    }
                    by_end.pop_first();
                    let Some(sessions) = by_key.get_mut(&key) else {
                        continue;
                    };
                    if let Some(pos) = sessions.iter().position(|s| s.start == start) {
                        let s = sessions.remove(pos);
                        self.open -= 1;
                        out.push(ClosedWindow {
                            id: key_of(scope, index, start, &key),
                            end: s.end,
                            acc: s.acc,
                        });
                    }
                    if sessions.is_empty() {
                        by_key.remove(&key);
                    }
                }
            }
        }
    }

    /// The open entry for `start`/`key`, if any.
    #[cfg(test)]
    pub fn get(&self, start: i64, key: &str) -> Option<(i64, Acc)> {
        match &self.slots {
            Slots::Fixed { kind, by_start, .. } => {
                let size = kind.size().unwrap_or(0);
                by_start
                    .get(&start)
                    .and_then(|keys| keys.get(key))
                    .map(|acc| (start + size, *acc))
            }
            Slots::Session { by_key, .. } => by_key
                .get(key)
                .and_then(|ss| ss.iter().find(|s| s.start == start))
                .map(|s| (s.end, s.acc)),
        }
    }

    /// Puts back an open entry read from a checkpoint; returns its end as registered.
    pub fn restore(&mut self, start: i64, key: String, end: i64, acc: Acc) -> EndChange {
        match &mut self.slots {
            Slots::Fixed { by_start, kind, .. } => {
                if by_start
                    .entry(start)
                    .or_default()
                    .insert(key, acc)
                    .is_none()
                {
                    self.open += 1;
                }
                EndChange::Fixed(start.saturating_add(kind.size().unwrap_or(0)))
            }
            Slots::Session { by_key, by_end, .. } => {
                let sessions = by_key.entry(key.clone()).or_default();
                let pos = sessions.partition_point(|s| s.start < start);
                sessions.insert(pos, Session { start, end, acc });
                by_end.insert((end, key, start));
                self.open += 1;
                EndChange::SessionAdded(end)
            }
        }
    }

    /// Every open entry, borrowed: window index, start, key, end, accumulator.
    pub fn for_each_ref<'a>(&'a self, mut f: impl FnMut(u16, i64, &'a str, i64, Acc)) {
        match &self.slots {
            Slots::Fixed { kind, by_start, .. } => {
                let size = kind.size().unwrap_or(0);
                for (start, keys) in by_start {
                    for (key, acc) in keys {
                        f(self.index, *start, key, start + size, *acc);
                    }
                }
            }
            Slots::Session { by_key, .. } => {
                for (key, sessions) in by_key {
                    for s in sessions {
                        f(self.index, s.start, key, s.end, s.acc);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(store: &mut WindowTable, key: &str, ts: i64, limit: Option<i64>) -> bool {
        store.add(key, ts, Some(1.0), limit, &mut Vec::new())
    }

    #[test]
    fn sessions_merge_when_closer_than_gap() {
        let mut s = WindowTable::new(0, WindowKind::Session { gap: 10 }, None);
        add(&mut s, "k", 100, None);
        add(&mut s, "k", 109, None); // 9 < 10: same session
        add(&mut s, "k", 119, None); // exactly gap after 109: new session
        assert_eq!(s.open_count(), 2);
        assert_eq!(
            s.get(100, "k").map(|(end, acc)| (end, acc.count)),
            Some((119, 2))
        );
        // a record between the two sessions bridges them
        add(&mut s, "k", 112, None);
        assert_eq!(s.open_count(), 1);
        assert_eq!(
            s.get(100, "k").map(|(end, acc)| (end, acc.count)),
            Some((129, 4))
        );
    }

    #[test]
    fn out_of_order_record_extends_session_backwards() {
        let mut s = WindowTable::new(0, WindowKind::Session { gap: 10 }, None);
        add(&mut s, "k", 100, None);
        add(&mut s, "k", 95, None);
        assert_eq!(s.get(95, "k").map(|(end, _)| end), Some(110));
        assert_eq!(s.get(100, "k"), None);
    }

    #[test]
    fn final_windows_do_not_take_records() {
        let mut s = WindowTable::new(0, WindowKind::Tumbling { size: 10 }, None);
        assert!(!add(&mut s, "k", 5, Some(10)));
        assert!(add(&mut s, "k", 15, Some(10)));
        let mut h = WindowTable::new(0, WindowKind::Hopping { size: 10, hop: 5 }, None);
        // windows [0,10) and [5,15): only the second is still open at limit 10
        assert!(add(&mut h, "k", 7, Some(10)));
        assert_eq!(h.open_count(), 1);
        assert!(h.get(5, "k").is_some());
    }

    #[test]
    fn close_returns_windows_up_to_limit_in_order() {
        let mut s = WindowTable::new(1, WindowKind::Tumbling { size: 10 }, None);
        for (k, ts) in [("b", 1), ("a", 2), ("a", 12), ("a", 25)] {
            add(&mut s, k, ts, None);
        }
        let mut out = Vec::new();
        s.close(20, &mut out);
        let ids: Vec<(i64, &str)> = out
            .iter()
            .map(|c| (c.id.start, c.id.key.as_str()))
            .collect();
        assert_eq!(ids, vec![(0, "a"), (0, "b"), (10, "a")]);
        assert_eq!(s.open_count(), 1);
    }

    #[test]
    fn changes_report_the_window_ends_they_add_and_remove() {
        let mut s = WindowTable::new(2, WindowKind::Tumbling { size: 10 }, None);
        let mut ends = Vec::new();
        assert!(s.add("k", 12, None, None, &mut ends));
        assert!(!s.add("j", 5, None, Some(10), &mut ends));
        assert_eq!(ends, vec![EndChange::Fixed(20)]);
        let mut s = WindowTable::new(0, WindowKind::Session { gap: 10 }, None);
        let mut ends = Vec::new();
        s.add("k", 100, None, None, &mut ends);
        // in order: the session is extended in place
        s.add("k", 105, None, None, &mut ends);
        assert_eq!(
            ends,
            vec![
                EndChange::SessionAdded(110),
                EndChange::SessionRemoved(110),
                EndChange::SessionAdded(115)
            ]
        );
        assert_eq!(
            s.get(100, "k").map(|(end, acc)| (end, acc.count)),
            Some((115, 2))
        );
        assert_eq!(s.open_count(), 1);
    }
}
