//! The open tumbling and hopping windows of one key group, key by key: each key is stored
//! once for every fixed window definition, with its open windows beside it in one slice. A
//! record looks its key up once, whatever the number of windows it falls in.
//!
//! Both the key and its slice sit behind `Arc`s, so that a copy of the group made on write
//! (while a checkpoint still encodes it) shares them: only the keys written after the copy get
//! a slice of their own, not the whole group.

use std::sync::Arc;

use foldhash::{HashMap, HashMapExt};

use super::aggregate::Acc;
use super::state::note_end;
use super::window::{hopping_starts, tumbling_start, WindowDef, WindowKind};

/// One open window of a key: 40 bytes. The definition index sits in the top 16 bits of the
/// record count, so that a key's four windows fit a 192-byte allocation, not 224: a window
/// counts up to 2^48 - 1 records of a key (281 trillion; it stays there past that), where a
/// separate index would add 8 bytes of padding to every window of every key.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Slot {
    start: i64,
    /// Definition index (top 16 bits) and record count (low 48 bits).
    tag: u64,
    sum: f64,
    min: f64,
    max: f64,
}

/// The most records a slot counts.
const MAX_COUNT: u64 = (1 << 48) - 1;

impl Slot {
    fn new(window: u16, start: i64, acc: Acc) -> Slot {
        Slot {
            start,
            tag: (u64::from(window) << 48) | acc.count.min(MAX_COUNT),
            sum: acc.sum,
            min: acc.min,
            max: acc.max,
        }
    }

    fn window(&self) -> u16 {
        (self.tag >> 48) as u16
    }

    fn acc(&self) -> Acc {
        Acc {
            count: self.tag & MAX_COUNT,
            sum: self.sum,
            min: self.min,
            max: self.max,
        }
    }

    /// [`Acc::add`], in place: the record path's hottest line (going through `acc()` and
    /// `Slot::new` instead cost a quarter of `decode_aggregate`'s throughput). The test below
    /// holds the two to the same result.
    fn add(&mut self, value: Option<f64>) {
        if self.tag & MAX_COUNT < MAX_COUNT {
            self.tag += 1;
        }
        if let Some(v) = value {
            self.sum += v;
            self.min = self.min.min(v);
            self.max = self.max.max(v);
        }
    }
}

/// The fixed window definitions, shared by every group of a scope.
#[derive(Debug)]
struct Defs {
    /// Index and kind of each tumbling or hopping definition.
    fixed: Vec<(u16, WindowKind)>,
    /// Length by window index (0 for sessions).
    sizes: Vec<i64>,
}

impl Defs {
    fn size(&self, window: u16) -> i64 {
        self.sizes.get(usize::from(window)).copied().unwrap_or(0)
    }

    fn end(&self, s: &Slot) -> i64 {
        s.start + self.size(s.window())
    }
}

/// The open fixed windows of one group.
#[derive(Debug, Clone)]
pub(crate) struct FixedWindows {
    defs: Arc<Defs>,
    keys: HashMap<Arc<str>, Arc<[Slot]>>,
    open: usize,
    /// The earliest end of an open window (exact: a window's end never changes, and closing
    /// computes it again).
    earliest: Option<i64>,
    /// Windows a record opens for a key that has some already (always left empty).
    added: Vec<Slot>,
}

/// A key's windows, ordered by window index and start (the order a group's blob lists them in).
fn sorted(slots: impl Iterator<Item = Slot>) -> Arc<[Slot]> {
    let mut out: Arc<[Slot]> = slots.collect();
    if let Some(s) = Arc::get_mut(&mut out) {
        s.sort_unstable_by_key(|s| (s.window(), s.start));
    }
    out
}

fn is_final(end: i64, limit: Option<i64>) -> bool {
    limit.is_some_and(|l| end <= l)
}

impl FixedWindows {
    pub(crate) fn new(windows: &[WindowDef]) -> Self {
        let fixed: Vec<(u16, WindowKind)> = windows
            .iter()
            .enumerate()
            .filter(|(_, w)| w.kind.size().is_some())
            .map(|(i, w)| (i as u16, w.kind))
            .collect();
        let defs = Defs {
            fixed,
            sizes: windows.iter().map(|w| w.kind.size().unwrap_or(0)).collect(),
        };
        FixedWindows {
            defs: Arc::new(defs),
            keys: HashMap::new(),
            open: 0,
            earliest: None,
            added: Vec::new(),
        }
    }

    pub(crate) fn open_count(&self) -> usize {
        self.open
    }

    /// The earliest end of an open window, if any is open.
    pub(crate) fn earliest_end(&self) -> Option<i64> {
        self.earliest
    }

    /// Adds a record to every fixed window that holds `ts` and is not final (`end <= limit`
    /// is final), noting in `earliest` the ends of the windows it opens (see [`note_end`]).
    /// Returns whether any window took it.
    pub(crate) fn add(
        &mut self,
        key: &str,
        ts: i64,
        value: Option<f64>,
        limit: Option<i64>,
        earliest: &mut Option<i64>,
    ) -> bool {
        let defs = &self.defs;
        let mut slots = self.keys.get_mut(key);
        let mut existing = slots.as_mut().map(|s| Arc::make_mut(*s));
        let mut took = false;
        let mut opened = None;
        let mut touch = |window: u16, start: i64, size: i64, added: &mut Vec<Slot>| {
            if is_final(start + size, limit) {
                return;
            }
            took = true;
            let hit = existing.as_mut().and_then(|s| {
                s.iter_mut()
                    .find(|s| s.window() == window && s.start == start)
            });
            match hit {
                Some(s) => s.add(value),
                None => {
                    note_end(&mut opened, start + size);
                    added.push(Slot::new(window, start, Acc::of(value)))
                }
            }
        };
        for &(window, kind) in &defs.fixed {
            match kind {
                WindowKind::Tumbling { size } => {
                    touch(window, tumbling_start(ts, size), size, &mut self.added)
                }
                WindowKind::Hopping { size, hop } => {
                    for start in hopping_starts(ts, size, hop) {
                        touch(window, start, size, &mut self.added);
                    }
                }
                WindowKind::Session { .. } => {}
            }
        }
        if !self.added.is_empty() {
            self.open += self.added.len();
            if let Some(end) = opened {
                note_end(earliest, end);
                note_end(&mut self.earliest, end);
            }
            match slots {
                Some(slots) => {
                    *slots = sorted(slots.iter().copied().chain(self.added.drain(..)));
                }
                None => {
                    let new = sorted(self.added.drain(..));
                    self.keys.insert(Arc::from(key), new);
                }
            }
        }
        took
    }

    /// Removes every window whose end is at or before `limit`, handing each to `f` (window
    /// index, start, end, accumulator, key).
    pub(crate) fn close(&mut self, limit: i64, mut f: impl FnMut(u16, i64, i64, Acc, &Arc<str>)) {
        let defs = &self.defs;
        let mut closed = 0;
        let mut earliest = None;
        self.keys.retain(|key, slots| {
            if slots.iter().all(|s| defs.end(s) > limit) {
                for s in slots.iter() {
                    note_end(&mut earliest, defs.end(s));
                }
                return true;
            }
            let mut keep = Vec::with_capacity(slots.len());
            for s in slots.iter() {
                let end = defs.end(s);
                if end <= limit {
                    f(s.window(), s.start, end, s.acc(), key);
                    closed += 1;
                } else {
                    note_end(&mut earliest, end);
                    keep.push(*s);
                }
            }
            *slots = Arc::from(keep);
            !slots.is_empty()
        });
        self.open -= closed;
        self.earliest = earliest;
    }

    /// Puts back an open window read from a checkpoint; returns its end.
    pub(crate) fn restore(&mut self, window: u16, start: i64, key: &str, acc: Acc) -> i64 {
        let slot = Slot::new(window, start, acc);
        let end = start.saturating_add(self.defs.size(window));
        note_end(&mut self.earliest, end);
        match self.keys.get_mut(key) {
            Some(slots) => {
                match Arc::make_mut(slots)
                    .iter_mut()
                    .find(|s| s.window() == window && s.start == start)
                {
                    Some(s) => *s = slot,
                    None => {
                        *slots = sorted(slots.iter().copied().chain([slot]));
                        self.open += 1;
                    }
                }
            }
            None => {
                self.keys.insert(Arc::from(key), Arc::from([slot]));
                self.open += 1;
            }
        }
        end
    }

    /// Every open window, borrowed, ordered by key, window index and start: window index,
    /// start, key, end, accumulator.
    pub(crate) fn for_each_ref<'a>(&'a self, mut f: impl FnMut(u16, i64, &'a str, i64, Acc)) {
        let mut keys: Vec<(&'a str, &'a [Slot])> = self
            .keys
            .iter()
            .map(|(key, slots)| (&**key, &**slots))
            .collect();
        keys.sort_unstable_by_key(|(key, _)| *key);
        for (key, slots) in keys {
            for s in slots {
                f(s.window(), s.start, key, self.defs.end(s), s.acc());
            }
        }
    }

    /// The open window `window`/`start`/`key`, if any: its end and accumulator.
    #[cfg(test)]
    pub(crate) fn get(&self, window: u16, start: i64, key: &str) -> Option<(i64, Acc)> {
        self.keys
            .get(key)?
            .iter()
            .find(|s| s.window() == window && s.start == start)
            .map(|s| (self.defs.end(s), s.acc()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defs(kinds: &[WindowKind]) -> Vec<WindowDef> {
        kinds
            .iter()
            .enumerate()
            .map(|(i, kind)| WindowDef {
                name: format!("w{i}"),
                kind: *kind,
            })
            .collect()
    }

    fn add(f: &mut FixedWindows, key: &str, ts: i64, limit: Option<i64>) -> bool {
        f.add(key, ts, Some(1.0), limit, &mut None)
    }

    fn closed(f: &mut FixedWindows, limit: i64) -> Vec<(u16, i64, String)> {
        let mut out = Vec::new();
        f.close(limit, |window, start, _, _, key| {
            out.push((window, start, key.to_string()))
        });
        out.sort();
        out
    }

    #[test]
    fn a_slot_is_forty_bytes_and_keeps_its_window_and_accumulator() {
        assert_eq!(std::mem::size_of::<Slot>(), 40);
        let mut acc = Acc::of(Some(-2.5));
        acc.add(Some(7.0));
        for window in [0, 1, 300, u16::MAX] {
            let mut slot = Slot::new(window, -17, acc);
            assert_eq!((slot.window(), slot.start, slot.acc()), (window, -17, acc));
            let mut more = acc;
            for value in [None, Some(-40.0), Some(3.5), Some(100.0)] {
                slot.add(value);
                more.add(value);
                assert_eq!((slot.window(), slot.acc()), (window, more));
            }
        }
        // a count at the bound stays there and leaves the index alone
        let full = Acc {
            count: MAX_COUNT,
            ..Acc::of(None)
        };
        let mut slot = Slot::new(u16::MAX, 0, full);
        slot.add(Some(1.0));
        assert_eq!(slot.window(), u16::MAX);
        assert_eq!(slot.acc().count, MAX_COUNT);
        assert_eq!(slot.acc().sum, 1.0);
    }

    #[test]
    fn final_windows_do_not_take_records() {
        let mut f = FixedWindows::new(&defs(&[WindowKind::Tumbling { size: 10 }]));
        assert!(!add(&mut f, "k", 5, Some(10)));
        assert!(add(&mut f, "k", 15, Some(10)));
        let mut h = FixedWindows::new(&defs(&[WindowKind::Hopping { size: 10, hop: 5 }]));
        // windows [0,10) and [5,15): only the second is still open at limit 10
        assert!(add(&mut h, "k", 7, Some(10)));
        assert_eq!(h.open_count(), 1);
        assert!(h.get(0, 5, "k").is_some());
        assert!(h.get(0, 0, "k").is_none());
    }

    #[test]
    fn close_removes_exactly_the_windows_up_to_limit() {
        let mut f = FixedWindows::new(&defs(&[
            WindowKind::Tumbling { size: 10 },
            WindowKind::Session { gap: 5 },
            WindowKind::Hopping { size: 20, hop: 10 },
        ]));
        for (k, ts) in [("b", 1), ("a", 2), ("a", 12), ("a", 25)] {
            add(&mut f, k, ts, None);
        }
        // tumbling: a@0, b@0, a@10, a@20; hopping (index 2): a,b@-10, a,b@0, a@10, a@20
        assert_eq!(f.open_count(), 10);
        assert_eq!(
            closed(&mut f, 20),
            vec![
                (0, 0, "a".into()),
                (0, 0, "b".into()),
                (0, 10, "a".into()),
                (2, -10, "a".into()),
                (2, -10, "b".into()),
                (2, 0, "a".into()),
                (2, 0, "b".into()),
            ]
        );
        assert_eq!(f.open_count(), 3);
        assert_eq!(
            f.get(0, 20, "a").map(|(end, acc)| (end, acc.count)),
            Some((30, 1))
        );
        // "b" has nothing open any more: it is gone
        assert!(!f.keys.contains_key("b"));
    }

    #[test]
    fn only_the_windows_a_record_opens_report_their_end() {
        let mut f = FixedWindows::new(&defs(&[
            WindowKind::Tumbling { size: 10 },
            WindowKind::Hopping { size: 20, hop: 10 },
        ]));
        let mut earliest = None;
        // opens tumbling [10,20) and hopping [0,20), [10,30)
        assert!(f.add("k", 12, None, None, &mut earliest));
        assert_eq!(earliest, Some(20));
        let mut earliest = None;
        assert!(f.add("k", 13, None, None, &mut earliest));
        assert_eq!(earliest, None, "every window it falls in was open");
        // a final window opens nothing
        assert!(!f.add("j", 5, None, Some(20), &mut earliest));
        assert_eq!(earliest, None);
        assert!(f.add("j", 25, None, Some(20), &mut earliest));
        assert_eq!(earliest, Some(30));
        assert_eq!(f.earliest_end(), Some(20));
        closed(&mut f, 20);
        assert_eq!(f.earliest_end(), Some(30), "closing computes it again");
        closed(&mut f, 40);
        assert_eq!(f.earliest_end(), None);
    }

    #[test]
    fn a_copy_keeps_what_it_saw_while_the_original_changes() {
        let mut f = FixedWindows::new(&defs(&[WindowKind::Hopping { size: 30, hop: 10 }]));
        for ts in [5, 15, 25] {
            add(&mut f, "k", ts, None);
        }
        add(&mut f, "j", 5, None);
        let copy = f.clone();
        add(&mut f, "k", 26, None);
        add(&mut f, "k", 31, None);
        closed(&mut f, 30);
        assert_eq!(copy.get(0, 20, "k").map(|(_, acc)| acc.count), Some(1));
        assert_eq!(copy.get(0, 0, "j").map(|(_, acc)| acc.count), Some(1));
        assert_eq!(copy.open_count(), 8);
        assert_eq!(f.get(0, 20, "k").map(|(_, acc)| acc.count), Some(3));
        assert_eq!(f.get(0, 0, "j"), None);
        // the key that was not written after the copy still shares its windows
        let mut g = copy.clone();
        add(&mut g, "k", 26, None);
        assert!(Arc::ptr_eq(&copy.keys["j"], &g.keys["j"]));
        assert!(!Arc::ptr_eq(&copy.keys["k"], &g.keys["k"]));
    }

    #[test]
    fn windows_are_listed_by_key_window_and_start() {
        let mut f = FixedWindows::new(&defs(&[
            WindowKind::Hopping { size: 30, hop: 10 },
            WindowKind::Tumbling { size: 10 },
        ]));
        for (k, ts) in [("b", 25), ("a", 5), ("b", 3), ("a", 31), ("c", -4)] {
            add(&mut f, k, ts, None);
        }
        f.restore(1, -30, "b", Acc::of(None));
        let mut listed = Vec::new();
        f.for_each_ref(|window, start, key, _, _| listed.push((key.to_string(), window, start)));
        let mut want = listed.clone();
        want.sort();
        want.dedup();
        assert_eq!(listed, want);
        assert_eq!(listed.len(), f.open_count());
    }

    #[test]
    fn restore_puts_back_and_overwrites() {
        let mut f = FixedWindows::new(&defs(&[
            WindowKind::Session { gap: 5 },
            WindowKind::Tumbling { size: 10 },
        ]));
        assert_eq!(f.restore(1, 10, "k", Acc::of(Some(2.0))), 20);
        f.restore(1, 20, "k", Acc::of(Some(3.0)));
        f.restore(1, 10, "k", Acc::of(Some(4.0)));
        assert_eq!(f.open_count(), 2);
        assert_eq!(
            f.get(1, 10, "k").map(|(end, acc)| (end, acc.sum)),
            Some((20, 4.0))
        );
        add(&mut f, "k", 11, None);
        assert_eq!(f.get(1, 10, "k").map(|(_, acc)| acc.count), Some(2));
    }
}
