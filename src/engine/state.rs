//! The vocabulary of window state (identities, entries, final windows), and the open session
//! windows of one definition in one key group (fixed windows: see `fixed`). A change reports
//! the end of a window it creates (`note_end`), so that the scope knows when the watermark may
//! close windows in a group; ends only move later otherwise.

use std::cmp::Ordering;
use std::collections::binary_heap::PeekMut;
use std::collections::BinaryHeap;

use foldhash::{HashMap, HashMapExt};

use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

use super::aggregate::Acc;
use crate::position::Partition;

/// Identity of one window instance: the source partition whose records it aggregates (`None`
/// with instance-scoped state, which merges every partition), definition index, start, key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct StateKey {
    pub partition: Option<Partition>,
    pub window: u16,
    pub start: i64,
    pub key: Key,
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

/// A key as the state holds it. A key of up to 23 bytes (most keys) sits in place, so that a
/// lookup compares bytes it has read already and a copy allocates nothing; a longer one sits
/// behind one shared allocation, which every copy of it (open windows, sessions, final
/// windows) shares.
pub type Key = smol_str::SmolStr;

/// The longest key a [`Key`] holds in place.
pub(crate) const INLINE_KEY: usize = 23;

/// Whether two copies of a long key share one allocation.
#[cfg(test)]
pub(crate) fn one_copy(a: &Key, b: &Key) -> bool {
    a.is_heap_allocated() && std::ptr::eq(a.as_str(), b.as_str())
}

/// A key too long to sit in place, for tests of sharing.
#[cfg(test)]
pub(crate) const LONG_KEY: &str = "a key longer than twenty-three bytes";

/// Notes `end` in `earliest`, the earliest end among the windows a change created.
///
/// The scope keeps, per group, a time at or before the group's earliest window end. Window
/// ends only move later (a session grows, a window closes and leaves), so only a window that a
/// change creates can move that time earlier, and a change that creates none reports nothing.
pub(crate) fn note_end(earliest: &mut Option<i64>, end: i64) {
    *earliest = Some(earliest.map_or(end, |e| e.min(end)));
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

/// The open session windows of one definition in one key group (fixed windows: see `fixed`).
///
/// `by_end` holds, for every open session, an entry (end, start, key) whose end is at or
/// before the session's: a session that grows in order keeps its entry, so that the common
/// record (one that extends its key's session) changes no index and allocates nothing. Closing
/// checks each entry it reaches against the session's real end, and puts back the entries of
/// sessions that grew past the limit. A session has one entry: one that merges with the next
/// keeps its start and its entry; the entries of sessions merged into an earlier one are
/// dropped when closing reaches them. A key longer than [`INLINE_KEY`] bytes is one copy
/// shared by the two indexes and the final windows it closes into; a shorter one sits in
/// place in each.
#[derive(Debug, Clone)]
pub struct SessionTable {
    index: u16,
    gap: i64,
    /// A key's sessions, ordered by start; the first held in the table (a key has one session
    /// open most of the time, and a record then follows no pointer to reach it).
    by_key: HashMap<Key, SmallVec<[Session; 1]>>,
    by_end: BinaryHeap<EndBound>,
    open: usize,
}

/// An entry of a session table's index of ends: a time at or before the end of `key`'s
/// session starting at `start`. Ordered so that a `BinaryHeap` gives the earliest time first
/// (then the earliest start); the key is not compared, so that ordering reads no key bytes.
/// A heap keeps its entries in one allocation, where a tree of the few entries of a group
/// would take a node of eleven.
#[derive(Debug, Clone)]
struct EndBound {
    end: i64,
    start: i64,
    key: Key,
}

impl PartialEq for EndBound {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for EndBound {}

impl PartialOrd for EndBound {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for EndBound {
    fn cmp(&self, other: &Self) -> Ordering {
        (other.end, other.start).cmp(&(self.end, self.start))
    }
}

fn is_final(end: i64, limit: Option<i64>) -> bool {
    limit.is_some_and(|l| end <= l)
}

/// Where `ts`, with the session it starts ending at `new_end`, meets a key's sessions: the run
/// of sessions it overlaps (a key's sessions never overlap and are ordered by start, so their
/// ends are ordered too).
fn overlapping(sessions: &[Session], ts: i64, new_end: i64) -> std::ops::Range<usize> {
    sessions.partition_point(|s| s.end <= ts)..sessions.partition_point(|s| s.start < new_end)
}

impl SessionTable {
    pub fn new(index: u16, gap: i64) -> Self {
        SessionTable {
            index,
            gap,
            by_key: HashMap::new(),
            by_end: BinaryHeap::new(),
            open: 0,
        }
    }

    pub fn index(&self) -> u16 {
        self.index
    }

    pub fn open_count(&self) -> usize {
        self.open
    }

    /// A time at or before the end of every open session, if any is open.
    pub fn earliest_end(&self) -> Option<i64> {
        self.by_end.peek().map(|b| b.end)
    }

    /// Adds a record to the session of `key` it falls in (extending or merging sessions) if
    /// that session is not final (`end <= limit` is final), noting in `earliest` the end of a
    /// session it creates (see [`note_end`]). Returns whether a session took it. When the
    /// table has no copy of `key` yet, it takes the one `shared` gives, if any: the group's
    /// fixed windows and sessions share one copy of a key longer than [`INLINE_KEY`] bytes.
    pub fn add(
        &mut self,
        key: &str,
        ts: i64,
        value: Option<f64>,
        limit: Option<i64>,
        earliest: &mut Option<i64>,
        shared: impl FnOnce() -> Option<Key>,
    ) -> bool {
        let new_end = ts.saturating_add(self.gap);
        // the common cases: the record falls inside one session, or extends it in order
        if let Some(sessions) = self.by_key.get_mut(key) {
            let run = overlapping(sessions, ts, new_end);
            if run.len() == 1 {
                let i = run.start;
                let next_start = sessions.get(i + 1).map_or(i64::MAX, |n| n.start);
                let s = &mut sessions[i];
                if ts >= s.start && new_end <= s.end {
                    s.acc.add(value);
                    return true;
                }
                if ts >= s.start && new_end <= next_start && !is_final(new_end, limit) {
                    // the end only grows: the session's entry in `by_end` stays a bound
                    s.end = new_end;
                    s.acc.add(value);
                    return true;
                }
            }
        }
        let name: Key = match self.by_key.get_key_value(key) {
            Some((name, _)) => name.clone(),
            None => shared().unwrap_or_else(|| Key::new(key)),
        };
        let sessions = self.by_key.entry(name.clone()).or_default();
        let run = overlapping(sessions, ts, new_end);
        let mut merged = Session {
            start: ts,
            end: new_end,
            acc: Acc::of(value),
        };
        for s in &sessions[run.clone()] {
            merged.start = merged.start.min(s.start);
            merged.end = merged.end.max(s.end);
            merged.acc.merge(&s.acc);
        }
        if is_final(merged.end, limit) {
            if sessions.is_empty() {
                self.by_key.remove(key);
            }
            return false;
        }
        // a session that keeps its start keeps its entry in `by_end` (a bound still: its end
        // only grew), so that a session has one entry however often it merges; the entries of
        // the sessions merged into another go when closing reaches them
        let kept = sessions[run.clone()]
            .first()
            .is_some_and(|s| s.start == merged.start);
        self.open -= sessions.drain(run).count();
        let pos = sessions.partition_point(|s| s.start < merged.start);
        sessions.insert(pos, merged);
        self.open += 1;
        if !kept {
            self.by_end.push(EndBound {
                end: merged.end,
                start: merged.start,
                key: name,
            });
            note_end(earliest, merged.end);
        }
        true
    }

    /// Removes every session whose end is at or before `limit`, handing each to `f` (window
    /// index, start, end, accumulator, key), in no particular order. Returns
    /// [`SessionTable::earliest_end`] after.
    pub fn close(
        &mut self,
        limit: i64,
        mut f: impl FnMut(u16, i64, i64, Acc, &Key),
    ) -> Option<i64> {
        while let Some(mut top) = self.by_end.peek_mut() {
            if top.end > limit {
                break;
            }
            let start = top.start;
            let found = self.by_key.get_mut(&*top.key).and_then(|sessions| {
                let pos = sessions.partition_point(|s| s.start < start);
                let s = sessions.get(pos).filter(|s| s.start == start).copied()?;
                Some((sessions, pos, s))
            });
            let Some((sessions, pos, s)) = found else {
                // merged into another session, or closed already
                PeekMut::pop(top);
                continue;
            };
            if s.end > limit {
                // it grew since the entry was made: the entry moves to its end in place
                top.end = s.end;
                continue;
            }
            let EndBound { key, .. } = PeekMut::pop(top);
            sessions.remove(pos);
            self.open -= 1;
            if sessions.is_empty() {
                self.by_key.remove(&*key);
            }
            f(self.index, start, s.end, s.acc, &key);
        }
        self.earliest_end()
    }

    /// This table's copy of `key`, if it holds a session of it.
    #[cfg(test)]
    pub fn key(&self, key: &str) -> Option<Key> {
        self.by_key.get_key_value(key).map(|(k, _)| k.clone())
    }

    /// The open session of `key` starting at `start`, if any.
    #[cfg(test)]
    pub fn get(&self, start: i64, key: &str) -> Option<(i64, Acc)> {
        self.by_key
            .get(key)
            .and_then(|ss| ss.iter().find(|s| s.start == start))
            .map(|s| (s.end, s.acc))
    }

    /// Puts back an open session read from a checkpoint; returns its end. `shared` is the
    /// key's copy to share, made here if it has none yet.
    pub fn restore(
        &mut self,
        start: i64,
        key: &str,
        end: i64,
        acc: Acc,
        shared: &mut Option<Key>,
    ) -> i64 {
        let name: Key = match self.by_key.get_key_value(key) {
            Some((name, _)) => name.clone(),
            None => shared.get_or_insert_with(|| Key::new(key)).clone(),
        };
        let sessions = self.by_key.entry(name.clone()).or_default();
        let pos = sessions.partition_point(|s| s.start < start);
        sessions.insert(pos, Session { start, end, acc });
        self.by_end.push(EndBound {
            end,
            start,
            key: name,
        });
        self.open += 1;
        end
    }

    /// Every open session, borrowed: window index, start, key, end, accumulator.
    pub fn for_each_ref<'a>(&'a self, mut f: impl FnMut(u16, i64, &'a str, i64, Acc)) {
        for (key, sessions) in &self.by_key {
            for s in sessions {
                f(self.index, s.start, key, s.end, s.acc);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(store: &mut SessionTable, key: &str, ts: i64, limit: Option<i64>) -> bool {
        store.add(key, ts, Some(1.0), limit, &mut None, || None)
    }

    #[test]
    fn sessions_merge_when_closer_than_gap() {
        let mut s = SessionTable::new(0, 10);
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
    fn both_indexes_share_one_copy_of_a_key() {
        let mut s = SessionTable::new(0, 10);
        for ts in [100, 105, 130, 131] {
            add(&mut s, LONG_KEY, ts, None);
            add(&mut s, "k", ts, None);
        }
        assert_eq!(s.open_count(), 4);
        let (name, _) = s.by_key.get_key_value(LONG_KEY).expect("open");
        // the table's key and the two sessions' entries in the index of ends
        let entries: Vec<&Key> = s.by_end.iter().map(|b| &b.key).collect();
        assert_eq!(entries.iter().filter(|k| one_copy(k, name)).count(), 2);
        // a short key is held in place: nothing to share
        let (short, _) = s.by_key.get_key_value("k").expect("open");
        assert!(!short.is_heap_allocated());
    }

    #[test]
    fn keys_up_to_the_inline_length_sit_in_place() {
        assert!(!Key::new("k".repeat(INLINE_KEY)).is_heap_allocated());
        assert!(Key::new("k".repeat(INLINE_KEY + 1)).is_heap_allocated());
        assert!(LONG_KEY.len() > INLINE_KEY);
    }

    #[test]
    fn a_session_keeps_one_entry_in_the_index_of_ends_however_often_it_merges() {
        let mut s = SessionTable::new(0, 10);
        add(&mut s, "k", 100, None);
        let mut end = 110;
        for _ in 0..50 {
            // a session just past the key's one, then a record bridging the two
            add(&mut s, "k", end + 1, None);
            add(&mut s, "k", end - 1, None);
            end += 11;
            assert_eq!(s.open_count(), 1);
        }
        assert_eq!(
            s.get(100, "k").map(|(e, acc)| (e, acc.count)),
            Some((end, 101))
        );
        // closing short of the session drops the bridged sessions' entries and puts the
        // session's one back at its end: one entry per session is left, and the last
        // bridged session's (its end is the session's)
        assert!(closed(&mut s, end - 1).is_empty());
        assert!(s.by_end.len() <= 2, "{} entries", s.by_end.len());
        assert_eq!(closed(&mut s, end), vec![("k".to_string(), 100, end, 101)]);
        assert!(s.by_end.is_empty());
        assert_eq!(s.open_count(), 0);
    }

    #[test]
    fn out_of_order_record_extends_session_backwards() {
        let mut s = SessionTable::new(0, 10);
        add(&mut s, "k", 100, None);
        add(&mut s, "k", 95, None);
        assert_eq!(s.get(95, "k").map(|(end, _)| end), Some(110));
        assert_eq!(s.get(100, "k"), None);
    }

    fn closed(s: &mut SessionTable, limit: i64) -> Vec<(String, i64, i64, u64)> {
        let mut out = Vec::new();
        s.close(limit, |_, start, end, acc, key| {
            out.push((key.to_string(), start, end, acc.count))
        });
        out.sort();
        out
    }

    #[test]
    fn only_a_new_session_reports_its_end_and_closing_follows_real_ends() {
        let mut s = SessionTable::new(0, 10);
        let mut earliest = None;
        s.add("k", 100, None, None, &mut earliest, || None);
        assert_eq!(earliest, Some(110));
        // in order: the session grows in place and reports nothing
        let mut earliest = None;
        s.add("k", 105, None, None, &mut earliest, || None);
        assert_eq!(earliest, None);
        assert_eq!(
            s.earliest_end(),
            Some(110),
            "a bound at or before the real end"
        );
        assert!(closed(&mut s, 112).is_empty(), "the session grew to 115");
        assert_eq!(s.earliest_end(), Some(115));
        assert_eq!(closed(&mut s, 115), vec![("k".into(), 100, 115, 2)]);
        assert_eq!(s.open_count(), 0);
        assert_eq!(s.earliest_end(), None);
        assert!(s.by_key.is_empty());
    }

    /// A key's sessions, the plain way: merge every session a record comes within the gap of.
    #[derive(Default)]
    struct Model {
        sessions: std::collections::BTreeMap<String, Vec<(i64, i64, u64)>>,
    }

    impl Model {
        fn add(&mut self, key: &str, ts: i64, gap: i64) {
            let list = self.sessions.entry(key.to_string()).or_default();
            let (mut start, mut end, mut count) = (ts, ts + gap, 1);
            list.retain(|&(s, e, c)| {
                let overlaps = e > ts && s < ts + gap;
                if overlaps {
                    start = start.min(s);
                    end = end.max(e);
                    count += c;
                }
                !overlaps
            });
            list.push((start, end, count));
            list.sort();
        }

        fn close(&mut self, limit: i64) -> Vec<(String, i64, i64, u64)> {
            let mut out = Vec::new();
            for (key, list) in &mut self.sessions {
                list.retain(|&(s, e, c)| {
                    let done = e <= limit;
                    if done {
                        out.push((key.clone(), s, e, c));
                    }
                    !done
                });
            }
            out.sort();
            out
        }
    }

    proptest::proptest! {
        #[test]
        fn closing_takes_exactly_the_sessions_that_ended(
            steps in proptest::collection::vec((0u8..4, 0i64..300, proptest::bool::weighted(0.1)), 1..300),
        ) {
            let gap = 20;
            let mut table = SessionTable::new(0, gap);
            let mut model = Model::default();
            let mut limit = 0;
            for (key, at, close) in steps {
                // short keys sit in place, a long one is shared by the table and its index
                let key = if key == 3 { LONG_KEY.to_string() } else { format!("k{key}") };
                // time moves forward with some disorder, as records do
                let ts = limit + at;
                if close {
                    limit += at / 2;
                    proptest::prop_assert_eq!(closed(&mut table, limit), model.close(limit));
                } else {
                    let mut earliest = None;
                    table.add(&key, ts, None, None, &mut earliest, || None);
                    model.add(&key, ts, gap);
                    let open: usize = model.sessions.values().map(Vec::len).sum();
                    proptest::prop_assert_eq!(table.open_count(), open);
                    let first = model.sessions.values().flatten().map(|s| s.1).min();
                    proptest::prop_assert!(
                        table.earliest_end() <= first && first.is_some() == table.earliest_end().is_some(),
                        "the bound {:?} is at or before the earliest end {:?}", table.earliest_end(), first
                    );
                }
            }
            proptest::prop_assert_eq!(closed(&mut table, i64::MAX), model.close(i64::MAX));
        }
    }
}
