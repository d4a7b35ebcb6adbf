//! The vocabulary of window state (identities, entries, final windows), and the open session
//! windows of one definition in one key group (they sit in the group's table of keys beside
//! the fixed windows: see `fixed`). A change reports
//! the end of a window it creates (`note_end`), so that the scope knows when the watermark may
//! close windows in a group; ends only move later otherwise.

use std::cmp::Ordering;
use std::collections::binary_heap::PeekMut;
use std::collections::BinaryHeap;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use super::aggregate::Acc;
use super::fixed::{prefetch, KeyTable, TableEntry};
use super::slots::Slot;
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
#[cfg(test)]
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

/// An open session of a key: 48 bytes, a fixed window's slot (definition index, start and
/// accumulator, the index in the top bits of the record count) and an end. With a separate
/// index it took 56, and a key's entry in its group's table 104 bytes: laid out at that
/// stride, half of the entries spanned three cache lines; at 96 bytes, in a table that
/// jemalloc puts at a cache-line boundary, each spans two. A session counts up to
/// 2^47 - 1 records, as a fixed window does. Laid out in field order, so that its first and
/// last lines are those of `self` and `end` (see [`Session::prefetch`]).
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub(crate) struct Session {
    slot: Slot,
    end: i64,
}

impl Session {
    /// Asks the processor to bring the session's lines into the cache (see
    /// [`super::fixed::prefetch`]).
    pub(super) fn prefetch(&self) {
        prefetch(self);
        prefetch(&self.end);
    }

    fn new(window: u16, start: i64, end: i64, acc: Acc) -> Session {
        Session {
            slot: Slot::new(window, start, acc),
            end,
        }
    }

    /// Its definition's index.
    fn window(&self) -> u16 {
        self.slot.window()
    }

    fn start(&self) -> i64 {
        self.slot.start
    }

    fn acc(&self) -> Acc {
        self.slot.acc()
    }
}

/// A key's open sessions of every session definition, ordered by definition index and start;
/// empty when it has none. They sit in the key's entry of its group's table
/// (`fixed::KeyWindows`), beside its fixed windows, so that a record finds both with one
/// lookup. One session sits in the entry itself (a key has one session open most of the time,
/// and a record then follows no pointer to reach it); a key with more (of one definition or
/// of several) keeps them all in one allocation.
pub(crate) type KeySessions = smallvec::SmallVec<[Session; 1]>;

/// The sessions of definition `index` among a key's: their run in the list.
fn run_of(all: &[Session], index: u16) -> Range<usize> {
    all.partition_point(|s| s.window() < index)..all.partition_point(|s| s.window() <= index)
}

/// The open session windows of one definition in one key group: their count and index of
/// ends; the sessions themselves sit in the keys' entries of the group's table (see
/// [`KeySessions`]).
///
/// `by_end` holds, for every open session, an entry (end, start, key) whose end is at or
/// before the session's: a session that grows in order keeps its entry, so that the common
/// record (one that extends its key's session) changes no index and allocates nothing. Closing
/// checks each entry it reaches against the session's real end, and puts back the entries of
/// sessions that grew past the limit. A session has one entry: one that merges with the next
/// keeps its start and its entry; the entries of sessions merged into an earlier one are
/// dropped when closing reaches them. A key longer than 23 bytes is one copy
/// shared by the table, this index and the final windows it closes into; a shorter one sits
/// in place in each.
#[derive(Debug, Clone)]
pub struct SessionTable {
    index: u16,
    gap: i64,
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

/// Where `ts`, with the session it starts ending at `new_end`, meets a key's sessions of one
/// definition: the run of sessions it overlaps (a key's sessions of one definition never
/// overlap and are ordered by start, so their ends are ordered too).
fn overlapping(sessions: &[Session], ts: i64, new_end: i64) -> std::ops::Range<usize> {
    sessions.partition_point(|s| s.end <= ts)..sessions.partition_point(|s| s.start() < new_end)
}

impl SessionTable {
    pub fn new(index: u16, gap: i64) -> Self {
        SessionTable {
            index,
            gap,
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

    /// Adds a record of the key named `key` (the table's copy), whose sessions are `sessions`,
    /// to the session it falls in (extending or merging sessions) if that session is not
    /// final (`end <= limit` is final), noting in `earliest` the end of a session it creates
    /// (see [`note_end`]). Returns whether a session took it.
    pub(crate) fn add(
        &mut self,
        sessions: &mut KeySessions,
        key: &Key,
        ts: i64,
        value: Option<f64>,
        limit: Option<i64>,
        earliest: &mut Option<i64>,
    ) -> bool {
        let new_end = ts.saturating_add(self.gap);
        let all: &[Session] = &sessions[..];
        let mine = run_of(all, self.index);
        let run = {
            let r = overlapping(&all[mine.clone()], ts, new_end);
            mine.start + r.start..mine.start + r.end
        };
        // the common cases: the record falls inside one session, or extends it in order
        if run.len() == 1 {
            let i = run.start;
            let next_start = all[i + 1..mine.end].first().map_or(i64::MAX, |n| n.start());
            let s = all[i];
            let inside = ts >= s.start() && new_end <= s.end;
            // the end only grows: the session's entry in `by_end` stays a bound
            let extends = ts >= s.start() && new_end <= next_start && !is_final(new_end, limit);
            if inside || extends {
                if let Some(s) = sessions.get_mut(i) {
                    s.end = s.end.max(new_end);
                    s.slot.add(value);
                }
                return true;
            }
        }
        let (mut start, mut end, mut acc) = (ts, new_end, Acc::of(value));
        for s in &all[run.clone()] {
            start = start.min(s.start());
            end = end.max(s.end);
            acc.merge(&s.acc());
        }
        if is_final(end, limit) {
            return false;
        }
        let merged = Session::new(self.index, start, end, acc);
        // a session that keeps its start keeps its entry in `by_end` (a bound still: its end
        // only grew), so that a session has one entry however often it merges; the entries of
        // the sessions merged into another go when closing reaches them
        let kept = all[run.clone()].first().is_some_and(|s| s.start() == start);
        self.open = self.open - run.len() + 1;
        // the sessions it overlaps sit where it goes: those before end by `ts`, those after
        // start at `new_end` or later
        if run.is_empty() {
            sessions.insert(run.start, merged);
        } else {
            sessions[run.start] = merged;
            sessions.drain(run.start + 1..run.end);
        }
        if !kept {
            self.by_end.push(EndBound {
                end,
                start,
                key: key.clone(),
            });
            note_end(earliest, end);
        }
        true
    }

    /// Removes every session whose end is at or before `limit` from the keys of `keys`
    /// (a key left with nothing leaves the table), handing each to `f` (window index, start,
    /// end, accumulator, key), in no particular order. Returns
    /// [`SessionTable::earliest_end`] after.
    pub(crate) fn close(
        &mut self,
        keys: &mut KeyTable,
        limit: i64,
        mut f: impl FnMut(u16, i64, i64, Acc, &Key),
    ) -> Option<i64> {
        let index = self.index;
        while let Some(mut top) = self.by_end.peek_mut() {
            if top.end > limit {
                break;
            }
            let start = top.start;
            let found = keys.get_mut(&*top.key).and_then(|entry| {
                let all = &entry.sessions[..];
                let mine = run_of(all, index);
                let pos = mine.start + all[mine.clone()].partition_point(|s| s.start() < start);
                let s = all[pos..mine.end]
                    .first()
                    .filter(|s| s.start() == start)
                    .copied()?;
                Some((entry, pos, s))
            });
            let Some((entry, pos, s)) = found else {
                // merged into another session, or closed already
                PeekMut::pop(top);
                continue;
            };
            if s.end > limit {
                // it grew since the entry was made: the entry moves to its end in place
                top.end = s.end;
                continue;
            }
            entry.sessions.remove(pos);
            let gone = entry.is_empty();
            let EndBound { key, .. } = PeekMut::pop(top);
            self.open -= 1;
            if gone {
                keys.remove(&*key);
            }
            f(index, start, s.end, s.acc(), &key);
        }
        self.earliest_end()
    }

    /// The keys of the entries in the index of ends.
    #[cfg(test)]
    pub(crate) fn bound_keys(&self) -> impl Iterator<Item = &Key> {
        self.by_end.iter().map(|b| &b.key)
    }

    /// The open session of `key` starting at `start`, if any.
    #[cfg(test)]
    pub(crate) fn get(&self, keys: &KeyTable, start: i64, key: &str) -> Option<(i64, Acc)> {
        let all = &keys.get(key)?.sessions[..];
        all[run_of(all, self.index)]
            .iter()
            .find(|s| s.start() == start)
            .map(|s| (s.end, s.acc()))
    }

    /// Puts back an open session of the key named `key` (the table's copy), whose sessions
    /// are `sessions`, read from a checkpoint; returns its end, or `None` (and puts nothing
    /// back) if it overlaps one of the key's sessions of its definition: a damaged checkpoint,
    /// which a record must never meet.
    pub(crate) fn restore(
        &mut self,
        sessions: &mut KeySessions,
        key: &Key,
        start: i64,
        end: i64,
        acc: Acc,
    ) -> Option<i64> {
        let at = (self.index, start);
        let pos = sessions.partition_point(|s| (s.window(), s.start()) < at);
        let mine = run_of(sessions, self.index);
        let before = pos.checked_sub(1).filter(|&p| p >= mine.start);
        let overlaps = before.is_some_and(|p| sessions[p].end > start)
            || sessions[pos..mine.end]
                .first()
                .is_some_and(|s| s.start() < end);
        if overlaps {
            return None;
        }
        sessions.insert(pos, Session::new(self.index, start, end, acc));
        self.by_end.push(EndBound {
            end,
            start,
            key: key.clone(),
        });
        self.open += 1;
        Some(end)
    }

    /// Every open session among `keys`, borrowed: window index, start, key, end,
    /// accumulator.
    pub(crate) fn for_each_ref<'a>(
        &self,
        keys: &'a KeyTable,
        mut f: impl FnMut(u16, i64, &'a str, i64, Acc),
    ) {
        for (key, entry) in keys {
            let all = &entry.sessions[..];
            for s in &all[run_of(all, self.index)] {
                f(self.index, s.start(), key, s.end, s.acc());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session table with its table of keys.
    struct Sessions {
        t: SessionTable,
        keys: KeyTable,
    }

    impl Sessions {
        fn new(index: u16, gap: i64) -> Self {
            Sessions {
                t: SessionTable::new(index, gap),
                keys: KeyTable::new(),
            }
        }

        /// As a group adds a record: the table's copy of the key, no entry left empty.
        fn add(
            &mut self,
            key: &str,
            ts: i64,
            value: Option<f64>,
            limit: Option<i64>,
            earliest: &mut Option<i64>,
        ) -> bool {
            let name = self
                .keys
                .get_key_value(key)
                .map_or_else(|| Key::new(key), |(k, _)| k.clone());
            let entry = self.keys.entry(name.clone()).or_default();
            let took = self
                .t
                .add(&mut entry.sessions, &name, ts, value, limit, earliest);
            if entry.is_empty() {
                self.keys.remove(key);
            }
            took
        }

        fn get(&self, start: i64, key: &str) -> Option<(i64, Acc)> {
            self.t.get(&self.keys, start, key)
        }

        fn open_count(&self) -> usize {
            self.t.open_count()
        }

        fn earliest_end(&self) -> Option<i64> {
            self.t.earliest_end()
        }
    }

    fn add(store: &mut Sessions, key: &str, ts: i64, limit: Option<i64>) -> bool {
        store.add(key, ts, Some(1.0), limit, &mut None)
    }

    #[test]
    fn sessions_merge_when_closer_than_gap() {
        let mut s = Sessions::new(0, 10);
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
    fn a_session_counts_up_to_a_slots_limit_and_stays_there() {
        use super::super::slots::MAX_COUNT;
        let mut s = Sessions::new(1, 10);
        let key = Key::new("k");
        let full = |count| Acc {
            count,
            ..Acc::of(Some(1.0))
        };
        // a session put back with more than a slot counts keeps the most it counts
        let entry = s.keys.entry(key.clone()).or_default();
        assert_eq!(
            s.t.restore(&mut entry.sessions, &key, 100, 110, full(u64::MAX)),
            Some(110)
        );
        assert_eq!(s.get(100, "k").map(|(_, acc)| acc.count), Some(MAX_COUNT));
        // one short of it: a record in place reaches it, the next stays there
        let entry = s.keys.entry(key.clone()).or_default();
        assert_eq!(
            s.t.restore(&mut entry.sessions, &key, 115, 125, full(MAX_COUNT - 1)),
            Some(125)
        );
        add(&mut s, "k", 118, None);
        assert_eq!(s.get(115, "k").map(|(_, a)| a.count), Some(MAX_COUNT));
        add(&mut s, "k", 119, None);
        assert_eq!(s.get(115, "k").map(|(_, a)| a.count), Some(MAX_COUNT));
        // a record between them merges the two: the count stays there, and the merged
        // session keeps its definition, the first start, the last end and every sum
        add(&mut s, "k", 109, None);
        assert_eq!(s.open_count(), 1);
        let (end, acc) = s.get(100, "k").expect("one session from 100");
        assert_eq!((end, acc.count, acc.sum), (129, MAX_COUNT, 5.0));
        let all = &s.keys["k"].sessions;
        assert_eq!(all[0].window(), 1);
    }

    #[test]
    fn both_indexes_share_one_copy_of_a_key() {
        let mut s = Sessions::new(0, 10);
        for ts in [100, 105, 130, 131] {
            add(&mut s, LONG_KEY, ts, None);
            add(&mut s, "k", ts, None);
        }
        assert_eq!(s.open_count(), 4);
        let (name, _) = s.keys.get_key_value(LONG_KEY).expect("open");
        // the table's key and the two sessions' entries in the index of ends
        let entries: Vec<&Key> = s.t.by_end.iter().map(|b| &b.key).collect();
        assert_eq!(entries.iter().filter(|k| one_copy(k, name)).count(), 2);
        // a short key is held in place: nothing to share
        let (short, _) = s.keys.get_key_value("k").expect("open");
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
        let mut s = Sessions::new(0, 10);
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
        assert!(s.t.by_end.len() <= 2, "{} entries", s.t.by_end.len());
        assert_eq!(closed(&mut s, end), vec![("k".to_string(), 100, end, 101)]);
        assert!(s.t.by_end.is_empty());
        assert_eq!(s.open_count(), 0);
    }

    #[test]
    fn out_of_order_record_extends_session_backwards() {
        let mut s = Sessions::new(0, 10);
        add(&mut s, "k", 100, None);
        add(&mut s, "k", 95, None);
        assert_eq!(s.get(95, "k").map(|(end, _)| end), Some(110));
        assert_eq!(s.get(100, "k"), None);
    }

    fn closed(s: &mut Sessions, limit: i64) -> Vec<(String, i64, i64, u64)> {
        let mut out = Vec::new();
        s.t.close(&mut s.keys, limit, |_, start, end, acc, key| {
            out.push((key.to_string(), start, end, acc.count))
        });
        out.sort();
        out
    }

    #[test]
    fn only_a_new_session_reports_its_end_and_closing_follows_real_ends() {
        let mut s = Sessions::new(0, 10);
        let mut earliest = None;
        s.add("k", 100, None, None, &mut earliest);
        assert_eq!(earliest, Some(110));
        // in order: the session grows in place and reports nothing
        let mut earliest = None;
        s.add("k", 105, None, None, &mut earliest);
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
        assert!(s.keys.is_empty());
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
        /// Two session definitions (indexes 1 and 3, as between fixed ones) keep their
        /// sessions in one list per key: each closes exactly what it would alone, lists
        /// exactly its own, and no key stays in the table with nothing.
        #[test]
        fn two_session_definitions_share_a_key_s_entry_and_each_closes_as_alone(
            steps in proptest::collection::vec(
                (0u8..3, 0usize..2, 0i64..300, proptest::bool::weighted(0.1)),
                1..300,
            ),
        ) {
            let gaps = [20, 35];
            let mut tables = [SessionTable::new(1, gaps[0]), SessionTable::new(3, gaps[1])];
            let mut keys = KeyTable::new();
            let mut models = [Model::default(), Model::default()];
            let mut limit = 0;
            let close = |tables: &mut [SessionTable; 2],
                             keys: &mut KeyTable,
                             models: &mut [Model; 2],
                             limit: i64|
             -> Result<(), proptest::test_runner::TestCaseError> {
                for (t, m) in tables.iter_mut().zip(models.iter_mut()) {
                    let mut out = Vec::new();
                    t.close(keys, limit, |window, start, end, acc, key| {
                        out.push((window, key.to_string(), start, end, acc.count))
                    });
                    out.sort();
                    let want: Vec<_> = m
                        .close(limit)
                        .into_iter()
                        .map(|(key, start, end, count)| (t.index(), key, start, end, count))
                        .collect();
                    proptest::prop_assert_eq!(out, want);
                }
                Ok(())
            };
            for (key, def, at, closing) in steps {
                let key = if key == 2 { LONG_KEY.to_string() } else { format!("k{key}") };
                let ts = limit + at;
                if closing {
                    limit += at / 2;
                    close(&mut tables, &mut keys, &mut models, limit)?;
                } else {
                    let name = keys
                        .get_key_value(key.as_str())
                        .map_or_else(|| Key::new(&key), |(k, _)| k.clone());
                    let entry = keys.entry(name.clone()).or_default();
                    proptest::prop_assert!(
                        tables[def].add(&mut entry.sessions, &name, ts, None, None, &mut None)
                    );
                    models[def].add(&key, ts, gaps[def]);
                }
                proptest::prop_assert!(keys.values().all(|e| !e.is_empty()));
                for (t, m) in tables.iter().zip(&models) {
                    let open: usize = m.sessions.values().map(Vec::len).sum();
                    proptest::prop_assert_eq!(t.open_count(), open);
                    let mut listed = 0;
                    t.for_each_ref(&keys, |window, _, _, _, _| {
                        assert_eq!(window, t.index());
                        listed += 1;
                    });
                    proptest::prop_assert_eq!(listed, open);
                }
            }
            close(&mut tables, &mut keys, &mut models, i64::MAX)?;
            proptest::prop_assert!(keys.is_empty());
        }

        #[test]
        fn closing_takes_exactly_the_sessions_that_ended(
            steps in proptest::collection::vec((0u8..4, 0i64..300, proptest::bool::weighted(0.1)), 1..300),
        ) {
            let gap = 20;
            let mut table = Sessions::new(0, gap);
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
                    table.add(&key, ts, None, None, &mut earliest);
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
