//! The vocabulary of window state (identities, entries, final windows), and the open session
//! windows of one definition in one key group (fixed windows: see `fixed`). Every change
//! reports the window ends it adds or removes, so that the scope knows which groups the
//! watermark closes windows in.

use std::collections::BTreeSet;
use std::sync::Arc;

use foldhash::{HashMap, HashMapExt};

use serde::{Deserialize, Serialize};

use super::aggregate::Acc;
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

/// The open session windows of one definition in one key group (fixed windows: see `fixed`).
/// Keys are shared between the two indexes and with the final windows they close into, so
/// that a record extending its session in order allocates nothing.
#[derive(Debug, Clone)]
pub struct SessionTable {
    index: u16,
    gap: i64,
    by_key: HashMap<Arc<str>, Vec<Session>>,
    by_end: BTreeSet<(i64, Arc<str>, i64)>,
    open: usize,
}

fn is_final(end: i64, limit: Option<i64>) -> bool {
    limit.is_some_and(|l| end <= l)
}

impl SessionTable {
    pub fn new(index: u16, gap: i64) -> Self {
        SessionTable {
            index,
            gap,
            by_key: HashMap::new(),
            by_end: BTreeSet::new(),
            open: 0,
        }
    }

    pub fn index(&self) -> u16 {
        self.index
    }

    pub fn open_count(&self) -> usize {
        self.open
    }

    /// Adds a record to the session of `key` it falls in (extending or merging sessions) if
    /// that session is not final (`end <= limit` is final), reporting the session ends it adds
    /// and removes in `ends`. Returns whether a session took it.
    pub fn add(
        &mut self,
        key: &str,
        ts: i64,
        value: Option<f64>,
        limit: Option<i64>,
        ends: &mut Vec<EndChange>,
    ) -> bool {
        let name: Arc<str> = match self.by_key.get_key_value(key) {
            Some((name, _)) => Arc::clone(name),
            None => Arc::from(key),
        };
        let (by_key, by_end) = (&mut self.by_key, &mut self.by_end);
        let new_end = ts.saturating_add(self.gap);
        let sessions = by_key.entry(Arc::clone(&name)).or_default();
        let mut merged = Session {
            start: ts,
            end: new_end,
            acc: Acc::of(value),
        };
        // a key's sessions never overlap and are ordered by start, so their ends are ordered
        // too: the sessions the record overlaps are one run of them
        let overlapping = sessions.partition_point(|s| s.end <= ts)
            ..sessions.partition_point(|s| s.start < new_end);
        // the common cases: the record falls inside one session, or extends it in order
        if overlapping.len() == 1 {
            let i = overlapping.start;
            let s = &mut sessions[i];
            if ts >= s.start && new_end <= s.end {
                s.acc.add(value);
                return true;
            }
            let next_start = sessions.get(i + 1).map_or(i64::MAX, |n| n.start);
            let s = &mut sessions[i];
            if ts >= s.start && new_end <= next_start && !is_final(new_end, limit) {
                by_end.remove(&(s.end, Arc::clone(&name), s.start));
                ends.push(EndChange::SessionRemoved(s.end));
                s.end = new_end;
                s.acc.add(value);
                by_end.insert((s.end, name, s.start));
                ends.push(EndChange::SessionAdded(s.end));
                return true;
            }
        }
        for s in &sessions[overlapping.clone()] {
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
        for old in sessions.drain(overlapping.clone()).rev() {
            by_end.remove(&(old.end, Arc::clone(&name), old.start));
            ends.push(EndChange::SessionRemoved(old.end));
            self.open -= 1;
        }
        let pos = sessions.partition_point(|s| s.start < merged.start);
        sessions.insert(pos, merged);
        by_end.insert((merged.end, name, merged.start));
        ends.push(EndChange::SessionAdded(merged.end));
        self.open += 1;
        true
    }

    /// Removes every session whose end is at or before `limit`, handing each to `f` (window
    /// index, start, end, accumulator, key), in the order of their ends.
    pub fn close(&mut self, limit: i64, mut f: impl FnMut(u16, i64, i64, Acc, &Arc<str>)) {
        while let Some((end, key, start)) = self.by_end.first().cloned() {
            if end > limit {
                break;
            }
            self.by_end.pop_first();
            let Some(sessions) = self.by_key.get_mut(&*key) else {
                continue;
            };
            if let Some(pos) = sessions.iter().position(|s| s.start == start) {
                let s = sessions.remove(pos);
                self.open -= 1;
                f(self.index, start, s.end, s.acc, &key);
            }
            if sessions.is_empty() {
                self.by_key.remove(&*key);
            }
        }
    }

    /// The open session of `key` starting at `start`, if any.
    #[cfg(test)]
    pub fn get(&self, start: i64, key: &str) -> Option<(i64, Acc)> {
        self.by_key
            .get(key)
            .and_then(|ss| ss.iter().find(|s| s.start == start))
            .map(|s| (s.end, s.acc))
    }

    /// Puts back an open session read from a checkpoint; returns its end as registered.
    pub fn restore(&mut self, start: i64, key: &str, end: i64, acc: Acc) -> EndChange {
        let name: Arc<str> = match self.by_key.get_key_value(key) {
            Some((name, _)) => Arc::clone(name),
            None => Arc::from(key),
        };
        let sessions = self.by_key.entry(Arc::clone(&name)).or_default();
        let pos = sessions.partition_point(|s| s.start < start);
        sessions.insert(pos, Session { start, end, acc });
        self.by_end.insert((end, name, start));
        self.open += 1;
        EndChange::SessionAdded(end)
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
        store.add(key, ts, Some(1.0), limit, &mut Vec::new())
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
            add(&mut s, "k", ts, None);
        }
        assert_eq!(s.open_count(), 2);
        let (name, _) = s.by_key.get_key_value("k").expect("k is open");
        // the table's key and the two sessions' entries in the index of ends
        assert_eq!(Arc::strong_count(name), 3);
        assert!(s.by_end.iter().all(|(_, k, _)| Arc::ptr_eq(k, name)));
    }

    #[test]
    fn out_of_order_record_extends_session_backwards() {
        let mut s = SessionTable::new(0, 10);
        add(&mut s, "k", 100, None);
        add(&mut s, "k", 95, None);
        assert_eq!(s.get(95, "k").map(|(end, _)| end), Some(110));
        assert_eq!(s.get(100, "k"), None);
    }

    #[test]
    fn session_changes_report_the_ends_they_add_and_remove() {
        let mut s = SessionTable::new(0, 10);
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
