//! The open tumbling and hopping windows of one key group, key by key: each key is stored
//! once for every fixed window definition, with its open windows beside it in one slice. A
//! record looks its key up once, whatever the number of windows it falls in.
//!
//! A hopping window whose size is 2 to 16 times its hop is kept as panes: one accumulator per
//! hop (`[start, start + hop)`), combined into each window holding it when that window closes
//! or is checkpointed. A record updates one pane instead of `size / hop` windows, and a key
//! seen once holds one pane instead of `size / hop` windows. A pane is made only while every
//! window holding it is still open, so that it counts in all of them. A record later than
//! that (its first windows already final) goes, as for every other hopping definition, to the
//! windows still open one by one, and so do the windows a checkpoint restores; a window's
//! value is its own accumulator, if it has one, combined with the panes it holds. Panes live
//! in memory only: a checkpoint lists windows, so the store format does not know of them.
//!
//! The table is also where a group's open sessions live (see [`KeyWindows`]): a record finds
//! its key's fixed windows and sessions with one lookup.
//!
//! A key's slice sits behind an `Arc`, so that a copy of the group made on write (while a
//! checkpoint still encodes it) shares it: only the keys written after the copy get a slice of
//! their own, not the whole group. The key itself is a [`Key`]: in place when short, else
//! shared by every copy.

use std::sync::Arc;

use hashbrown::HashMap;

use super::aggregate::Acc;
use super::group::{key_prefix, prefixed_order};
use super::slots::{head, Bound, Defs, Fixed, Slot, Span};
use super::state::{note_end, Key, KeySessions};
use super::window::{hopping_starts, tumbling_start, WindowDef};

/// What a group's table holds of one key: its open fixed windows and panes, behind an `Arc`
/// that a copy of the group shares, and whatever else the group keeps per key. A key is in
/// the table while it holds anything.
pub(crate) trait TableEntry: std::fmt::Debug + Clone + Default {
    fn slots(&self) -> Option<&Arc<[Slot]>>;
    fn slots_mut(&mut self) -> &mut Option<Arc<[Slot]>>;
    /// Whether the key holds nothing (and so leaves the table).
    fn is_empty(&self) -> bool;
    /// [`prefetch`]es what a record of the key reads past the entry's first line.
    fn prefetch(&self) {
        if let Some(slots) = self.slots() {
            prefetch_slots(slots);
        }
    }
}

/// The entry of a key in a group without session definitions: its fixed windows alone (16
/// bytes: a group's table takes no room for sessions it does not have).
#[derive(Debug, Clone, Default)]
pub(crate) struct FixedOnly(Option<Arc<[Slot]>>);

impl TableEntry for FixedOnly {
    fn slots(&self) -> Option<&Arc<[Slot]>> {
        self.0.as_ref()
    }

    fn slots_mut(&mut self) -> &mut Option<Arc<[Slot]>> {
        &mut self.0
    }

    fn is_empty(&self) -> bool {
        self.0.is_none()
    }
}

/// The entry of a key in a group with session definitions: its fixed windows and its open
/// sessions (see `SessionTable`), so that a record finds both with one lookup; its first
/// session sits in the entry itself.
#[derive(Debug, Clone, Default)]
pub(crate) struct KeyWindows {
    slots: Option<Arc<[Slot]>>,
    pub(crate) sessions: KeySessions,
}

impl TableEntry for KeyWindows {
    fn slots(&self) -> Option<&Arc<[Slot]>> {
        self.slots.as_ref()
    }

    fn slots_mut(&mut self) -> &mut Option<Arc<[Slot]>> {
        &mut self.slots
    }

    fn is_empty(&self) -> bool {
        self.slots.is_none() && self.sessions.is_empty()
    }

    fn prefetch(&self) {
        if let Some(slots) = &self.slots {
            prefetch_slots(slots);
        }
        // the entry's two lines (the first session's, where it sits in the entry) or the
        // sessions' own allocation
        if let (Some(first), Some(last)) = (self.sessions.first(), self.sessions.last()) {
            first.prefetch();
            last.prefetch();
        }
    }
}

/// The keys of a group with session definitions and what each holds.
pub(crate) type KeyTable = HashMap<Key, KeyWindows>;

/// The open fixed windows of one group, in its table of keys (whose entries are `E`).
#[derive(Debug, Clone)]
pub(crate) struct FixedWindows<E: TableEntry = FixedOnly> {
    defs: Arc<Defs>,
    keys: HashMap<Key, E>,
    /// Open windows (a window held by panes and its own slot counts once).
    open: usize,
    /// The earliest end of an open window (exact: a window's end never changes, and closing
    /// computes it again).
    earliest: Option<i64>,
    /// Every window ending at or before this has closed (the last `close` limit).
    closed: Option<i64>,
    /// [`Defs::bounds`] of `closed`, without an end.
    open_bounds: Vec<Bound>,
    /// Room for the bounds of a close (left as the last close made them).
    due_bounds: Vec<Bound>,
    /// Windows and panes a record opens for a key, or a key's windows a close keeps (always
    /// left empty).
    added: Vec<Slot>,
    /// Scratch room for a key's windows as spans.
    spans: Vec<Span>,
}

/// A key's windows and panes, ordered by window index, windows before panes, and start (for a
/// key without panes, the order a group's blob lists its windows in).
fn sorted(slots: impl Iterator<Item = Slot>) -> Arc<[Slot]> {
    let mut out: Arc<[Slot]> = slots.collect();
    if let Some(s) = Arc::get_mut(&mut out) {
        s.sort_unstable_by_key(|s| (s.head(), s.start));
    }
    out
}

/// The most keys of a group whose slots closing reads ahead: two cache lines each, half a
/// MiB, which stay in the cache until the closing pass reaches them (a million keys in 256
/// groups is about 120 live keys a group; 10M live keys, 39,000, which read none ahead).
const READ_AHEAD_KEYS: usize = 4096;

/// How many keys ahead of the listing of a checkpoint (`for_each_ref`) their slots are read.
const LISTING_AHEAD: usize = 8;

/// Asks the processor to bring the cache line holding the start of `value` into the cache,
/// without waiting for it (a hint that never faults: nothing on targets without the
/// instruction).
pub(super) fn prefetch<T>(value: &T) {
    #[cfg(all(target_arch = "x86_64", target_feature = "sse"))]
    safe_arch::prefetch_t0(value);
    #[cfg(not(all(target_arch = "x86_64", target_feature = "sse")))]
    let _ = value;
}

/// [`prefetch`]es a key's first and last slot (the line of the first holds the count of
/// references `Arc::make_mut` reads, in most layouts; a key's slots span two or three lines).
fn prefetch_slots(slots: &[Slot]) {
    if let (Some(first), Some(last)) = (slots.first(), slots.last()) {
        prefetch(first);
        prefetch(last);
    }
}

/// Reads the first and the last of a key's slots (their cache lines, with the count of
/// references before them; a middle slot's line is not read), for a pass over many keys to
/// read each key's slots before it works on any: see `FixedWindows::close`. (The listing of
/// a checkpoint, `for_each_ref`, measured no gain from such loads and [`prefetch`]es
/// instead.)
fn read_ahead(slots: &[Slot]) -> u64 {
    slots.first().map_or(0, |s| s.tag) ^ slots.last().map_or(0, |s| s.tag)
}

fn is_final(end: i64, limit: Option<i64>) -> bool {
    limit.is_some_and(|l| end <= l)
}

/// Adds a record's `value` to a key's window `(head, start)`, or, if the key has none, to a new
/// one in `added` (its end `end` noted in `opened`).
fn touch(
    existing: &mut Option<&mut [Slot]>,
    (head, start, end): (u64, i64, i64),
    value: Option<f64>,
    opened: &mut Option<i64>,
    added: &mut Vec<Slot>,
) {
    let hit = existing
        .as_deref_mut()
        .and_then(|s| s.iter_mut().find(|s| s.head() == head && s.start == start));
    match hit {
        Some(s) => s.add(value),
        None => {
            note_end(opened, end);
            added.push(Slot::new((head >> 1) as u16, start, Acc::of(value)));
        }
    }
}

impl<E: TableEntry> FixedWindows<E> {
    pub(crate) fn new(windows: &[WindowDef]) -> Self {
        let defs = Defs::new(windows);
        FixedWindows {
            defs: Arc::new(defs),
            keys: HashMap::new(),
            open: 0,
            earliest: None,
            closed: None,
            open_bounds: Vec::new(),
            due_bounds: Vec::new(),
            added: Vec::new(),
            spans: Vec::new(),
        }
    }

    pub(crate) fn open_count(&self) -> usize {
        self.open
    }

    /// The earliest end of an open window, if any is open.
    pub(crate) fn earliest_end(&self) -> Option<i64> {
        self.earliest
    }

    /// The table of keys, for what else its entries hold.
    pub(crate) fn keys(&self) -> &HashMap<Key, E> {
        &self.keys
    }

    pub(crate) fn keys_mut(&mut self) -> &mut HashMap<Key, E> {
        &mut self.keys
    }

    /// The entry of `key`, made (empty, with the copy of the key in `shared`, made here if
    /// there is none yet) if it has none; `shared` is left holding the table's copy. For
    /// restores: an entry must not stay empty.
    pub(crate) fn entry(&mut self, key: &str, shared: &mut Option<Key>) -> (&Key, &mut E) {
        Self::entry_in(&mut self.keys, key, shared)
    }

    fn entry_in<'a>(
        keys: &'a mut HashMap<Key, E>,
        key: &str,
        shared: &mut Option<Key>,
    ) -> (&'a Key, &'a mut E) {
        use hashbrown::hash_map::RawEntryMut;
        let (name, entry) = match keys.raw_entry_mut().from_key(key) {
            RawEntryMut::Occupied(o) => o.into_key_value(),
            RawEntryMut::Vacant(v) => {
                let name = shared.get_or_insert_with(|| Key::new(key)).clone();
                v.insert(name, E::default())
            }
        };
        *shared = Some(name.clone());
        (name, entry)
    }

    /// Adds a record to every fixed window that holds `ts` and is not final (`end <= limit`
    /// is final), noting in `earliest` the ends of the windows it opens (see [`note_end`]),
    /// then hands the key's entry and the table's copy of the key to `rest` (which adds the
    /// record to what else the entry holds and returns whether anything took it), all with
    /// one lookup. Returns whether any window took it.
    pub(crate) fn add(
        &mut self,
        key: &str,
        ts: i64,
        value: Option<f64>,
        limit: Option<i64>,
        earliest: &mut Option<i64>,
        rest: impl FnOnce(&mut E, &Key, &mut Option<i64>) -> bool,
    ) -> bool {
        let defs = &self.defs;
        let mut fresh = None;
        let (name, entry) = match self.keys.get_key_value_mut(key) {
            Some((name, entry)) => (name, entry),
            None => {
                let (name, entry) = fresh.insert((Key::new(key), E::default()));
                (&*name, entry)
            }
        };
        let mut existing = entry.slots_mut().as_mut().map(Arc::make_mut);
        let mut took = false;
        let mut opened = None;
        let added = &mut self.added;
        for &(window, kind) in &defs.fixed {
            let windows = |size: i64, hop: i64| {
                hopping_starts(ts, size, hop).filter(move |s| !is_final(s + size, limit))
            };
            let mut take = |existing: &mut Option<&mut [Slot]>, start: i64, end: i64| {
                let slot = (head(window, false), start, end);
                touch(existing, slot, value, &mut opened, added)
            };
            match kind {
                Fixed::Tumbling { size } => {
                    let start = tumbling_start(ts, size);
                    if !is_final(start + size, limit) {
                        took = true;
                        take(&mut existing, start, start + size);
                    }
                }
                Fixed::Hopping { size, hop } => {
                    for start in windows(size, hop) {
                        took = true;
                        take(&mut existing, start, start + size);
                    }
                }
                Fixed::Panes { size, hop } => {
                    let pane = tumbling_start(ts, hop);
                    if is_final(pane + size, limit) {
                        // every window holding it is final
                        continue;
                    }
                    took = true;
                    let h = head(window, true);
                    // a key's newest pane is its last slot: looked for from the end, the
                    // search reads one cache line of the slots, not all of them
                    let hit = existing.as_deref_mut().and_then(|s| {
                        s.iter_mut()
                            .rev()
                            .find(|s| s.head() == h && s.start == pane)
                    });
                    if let Some(s) = hit {
                        s.add(value);
                    } else if !is_final(pane + hop, limit) {
                        // its first window ends with it
                        note_end(&mut opened, pane + hop);
                        added.push(Slot::pane(window, pane, Acc::of(value)));
                    } else {
                        // too late for the first windows holding it: the others take it one
                        // by one
                        for start in windows(size, hop) {
                            take(&mut existing, start, start + size);
                        }
                    }
                }
            }
        }
        if !self.added.is_empty() {
            if let Some(end) = opened {
                note_end(earliest, end);
                note_end(&mut self.earliest, end);
            }
            let slots = entry.slots().map_or(&[][..], |s| &s[..]);
            self.open += self
                .added
                .iter()
                .map(|a| defs.opened_by(slots, a))
                .sum::<usize>();
            let all = sorted(slots.iter().copied().chain(self.added.drain(..)));
            *entry.slots_mut() = Some(all);
        }
        took |= rest(entry, name, earliest);
        if let Some((name, entry)) = fresh.filter(|(_, entry)| !entry.is_empty()) {
            self.keys.insert(name, entry);
        }
        took
    }

    /// Removes every window whose end is at or before `limit`, handing each to `f` (window
    /// index, start, end, accumulator, key); a pane goes once the last window holding it
    /// closes.
    pub(crate) fn close(&mut self, limit: i64, mut f: impl FnMut(u16, i64, i64, Acc, &Key)) {
        let defs = &self.defs;
        let mut due = std::mem::take(&mut self.due_bounds);
        defs.bounds(self.closed, Some(limit), &mut due);
        let closed = Some(self.closed.map_or(limit, |c| c.max(limit)));
        let mut after = std::mem::take(&mut self.open_bounds);
        defs.bounds(closed, None, &mut after);
        // each key's first and last slot read once ahead of the pass that closes them: in a
        // loop whose reads do not wait on one another, their cache misses overlap, where the
        // pass below, which decides what to do with each key from its slots, waits for each
        // in turn
        if self.keys.len() <= READ_AHEAD_KEYS {
            let ahead = self
                .keys
                .values()
                .filter_map(|entry| entry.slots())
                .fold(0, |sum, slots| sum ^ read_ahead(slots));
            std::hint::black_box(ahead);
        }
        let spans = &mut self.spans;
        let keep = &mut self.added;
        let mut count = 0;
        let mut earliest = None;
        self.keys.retain(|key, entry| {
            let Some(slots) = entry.slots_mut().as_mut() else {
                // it holds something else only
                return true;
            };
            let first = slots.iter().map(|s| defs.first_end(s, &due)).min();
            if let Some(first) = first.filter(|&end| end > limit) {
                note_end(&mut earliest, first);
                return true;
            }
            if slots.iter().any(Slot::is_pane) {
                defs.spans(slots, &due, spans);
                defs.each_window(slots, spans, |window, start, end, acc| {
                    f(window, start, end, acc, key);
                    count += 1;
                });
            } else {
                for s in slots.iter().filter(|s| defs.last_end(s) <= limit) {
                    f(s.window(), s.start, defs.last_end(s), s.acc(), key);
                    count += 1;
                }
            }
            for s in slots.iter().filter(|s| defs.last_end(s) > limit) {
                note_end(&mut earliest, defs.first_end(s, &after));
                keep.push(*s);
            }
            // a key whose windows all stay (panes whose later windows are open) keeps its
            // slots as they are, one that lost some gets the others, one that lost all has
            // none (and goes unless it holds sessions)
            if keep.is_empty() {
                *entry.slots_mut() = None;
            } else if keep.len() < slots.len() {
                *slots = Arc::from(&keep[..]);
            }
            keep.clear();
            !entry.is_empty()
        });
        self.open = self.open.saturating_sub(count);
        self.earliest = earliest;
        self.closed = closed;
        self.open_bounds = after;
        self.due_bounds = due;
    }

    /// Puts back open windows of `key` read from a checkpoint (each window index, start and
    /// accumulator; one that is open already is overwritten), in one allocation; `shared`
    /// is the key's copy to share, made here if it has none yet. Returns the earliest end
    /// among them.
    pub(crate) fn restore(
        &mut self,
        key: &str,
        shared: &mut Option<Key>,
        windows: &[(u16, i64, Acc)],
    ) -> Option<i64> {
        let defs = &self.defs;
        let earliest = windows
            .iter()
            .map(|&(w, start, _)| start.saturating_add(defs.size(w)))
            .min()?;
        note_end(&mut self.earliest, earliest);
        let (open_bounds, spans) = (&self.open_bounds, &mut self.spans);
        let (_, entry) = Self::entry_in(&mut self.keys, key, shared);
        let mut all: Vec<Slot> = entry.slots().map_or_else(Vec::new, |s| s.to_vec());
        let before = defs.open_windows(&all, open_bounds, spans);
        for &(window, start, acc) in windows {
            let slot = Slot::new(window, start, acc);
            match all
                .iter_mut()
                .find(|s| s.head() == slot.head() && s.start == start)
            {
                Some(s) => *s = slot,
                None => all.push(slot),
            }
        }
        let all = sorted(all.into_iter());
        self.open += defs
            .open_windows(&all, open_bounds, spans)
            .saturating_sub(before);
        *entry.slots_mut() = Some(all);
        Some(earliest)
    }

    /// Asks the processor to bring `key`'s entry and what it points to (its slots, its
    /// sessions) into the cache, where a record of it will read them, without waiting for
    /// them. The lookup waits for the table's own lines; called for several records before
    /// the first is added, those waits overlap, and the adds find what they read in the cache.
    /// A hint: nothing changes.
    pub(crate) fn prefetch(&self, key: &str) {
        if let Some(entry) = self.keys.get(key) {
            entry.prefetch();
        }
    }

    /// The copy of `key` this group holds, and how many windows and panes it holds.
    #[cfg(test)]
    pub(crate) fn key(&self, key: &str) -> Option<(usize, Key)> {
        self.keys
            .get_key_value(key)
            .map(|(k, entry)| (entry.slots().map_or(0, |s| s.len()), k.clone()))
    }

    /// Every open window, ordered by key, window index and start: window index, start, key,
    /// end, accumulator (a window held by panes combined from them).
    pub(crate) fn for_each_ref<'a>(&'a self, mut f: impl FnMut(u16, i64, &'a str, i64, Acc)) {
        // sorted by each key's first 16 bytes read once as a number, and by its bytes only
        // where those are equal: a call to `memcmp` per comparison was most of the sort
        let mut keys: Vec<(u128, &'a str, &'a [Slot])> = self
            .keys
            .iter()
            .filter_map(|(key, entry)| {
                let slots = entry.slots()?;
                Some((key_prefix(key), &**key, &**slots))
            })
            .collect();
        keys.sort_unstable_by(|a, b| prefixed_order((a.0, a.1), (b.0, b.1)));
        let mut spans = Vec::new();
        // each key's slots read a few keys ahead of the pass (its first read of them, a cache
        // miss per key where a group's keys are many, waited for one key after another)
        for (i, &(_, key, slots)) in keys.iter().enumerate() {
            if let Some(first) = keys.get(i + LISTING_AHEAD).and_then(|&(_, _, s)| s.first()) {
                prefetch(first);
            }
            if slots.iter().any(Slot::is_pane) {
                self.defs.spans(slots, &self.open_bounds, &mut spans);
                self.defs
                    .each_window(slots, &spans, |window, start, end, acc| {
                        f(window, start, key, end, acc)
                    });
            } else {
                for s in slots {
                    f(s.window(), s.start, key, self.defs.last_end(s), s.acc());
                }
            }
        }
    }

    /// The open window `window`/`start`/`key`, if any: its end and accumulator.
    #[cfg(test)]
    pub(crate) fn get(&self, window: u16, start: i64, key: &str) -> Option<(i64, Acc)> {
        let slots = self.keys.get(key)?.slots()?;
        let mut spans = Vec::new();
        self.defs.spans(slots, &self.open_bounds, &mut spans);
        let mut found = None;
        self.defs.each_window(slots, &spans, |w, s, end, acc| {
            if (w, s) == (window, start) {
                found = Some((end, acc));
            }
        });
        found
    }
}

#[cfg(test)]
mod tests {
    use super::super::window::WindowKind;
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

    /// No session definitions: nothing else in a key's entry to take a record.
    fn no_sessions(_: &mut FixedOnly, _: &Key, _: &mut Option<i64>) -> bool {
        false
    }

    /// The slots of `key`.
    fn slots<'a>(f: &'a FixedWindows, key: &str) -> &'a Arc<[Slot]> {
        f.keys[key].slots().expect("the key holds fixed windows")
    }

    fn add(f: &mut FixedWindows, key: &str, ts: i64, limit: Option<i64>) -> bool {
        f.add(key, ts, Some(1.0), limit, &mut None, no_sessions)
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
    fn a_key_takes_no_room_for_sessions_where_none_is_defined() {
        // a key and its slots: a group's table holds 40 bytes per key (and its control
        // bytes) without session definitions, as before sessions shared it
        assert_eq!(std::mem::size_of::<(Key, FixedOnly)>(), 40);
        // with them, the key's first session sits in its entry: 96 bytes, two cache lines
        // in a table that starts at a line (see the next test)
        assert_eq!(std::mem::size_of::<(Key, KeyWindows)>(), 96);
    }

    #[test]
    fn every_entry_of_a_key_with_sessions_spans_two_cache_lines() {
        // the table lays its 96-byte entries out at a 96-byte stride from an allocation the
        // binary's allocator (jemalloc) puts at a cache-line boundary: each entry starts at
        // the start or the middle of a line, so it spans two (hashbrown itself asks for 16)
        for n in [1, 3, 7, 40, 100, 1_000, 5_000] {
            let mut table = KeyTable::default();
            for i in 0..n {
                table.insert(Key::new(format!("k{i}")), KeyWindows::default());
            }
            for (key, entry) in &table {
                let start = (key as *const Key as usize).min(entry as *const KeyWindows as usize);
                assert_eq!(start % 32, 0, "{n} keys: an entry starts at {start:#x}");
            }
        }
    }

    #[test]
    fn a_key_whose_slots_all_stay_open_keeps_them_where_they_are() {
        let mut f = FixedWindows::new(&defs(&[
            WindowKind::Hopping { size: 30, hop: 10 },
            WindowKind::Tumbling { size: 10 },
        ]));
        // pane [0,10) counts in [-20,10), [-10,20) and [0,30); the tumbling window is [0,10)
        add(&mut f, "k", 5, None);
        let at = |f: &FixedWindows| {
            f.keys
                .get("k")
                .and_then(TableEntry::slots)
                .map(|s| (Arc::as_ptr(s).cast::<Slot>(), s.len()))
        };
        let (first, n) = at(&f).expect("the key holds its pane and window");
        assert_eq!(n, 2);
        // the tumbling window closes: the key keeps the pane alone, in a new allocation
        assert_eq!(
            closed(&mut f, 10),
            vec![(0, -20, "k".into()), (1, 0, "k".into())]
        );
        let (second, n) = at(&f).expect("the pane stays");
        assert_eq!(n, 1);
        assert_ne!(second, first);
        // a window of the pane closes, the pane stays: nothing is copied
        assert_eq!(closed(&mut f, 20), vec![(0, -10, "k".into())]);
        assert_eq!(at(&f), Some((second, 1)));
        // the pane's last window closes: the key goes
        assert_eq!(closed(&mut f, 30), vec![(0, 0, "k".into())]);
        assert_eq!(at(&f), None);
        assert_eq!(f.open_count(), 0);
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
        assert!(f.add("k", 12, None, None, &mut earliest, no_sessions));
        assert_eq!(earliest, Some(20));
        let mut earliest = None;
        assert!(f.add("k", 13, None, None, &mut earliest, no_sessions));
        assert_eq!(earliest, None, "every window it falls in was open");
        // a final window opens nothing
        assert!(!f.add("j", 5, None, Some(20), &mut earliest, no_sessions));
        assert_eq!(earliest, None);
        assert!(f.add("j", 25, None, Some(20), &mut earliest, no_sessions));
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
        assert!(Arc::ptr_eq(slots(&copy, "j"), slots(&g, "j")));
        assert!(!Arc::ptr_eq(slots(&copy, "k"), slots(&g, "k")));
    }

    #[test]
    fn windows_are_listed_by_key_window_and_start() {
        let mut f = FixedWindows::new(&defs(&[
            WindowKind::Hopping { size: 30, hop: 10 },
            WindowKind::Tumbling { size: 10 },
        ]));
        // keys the first 16 bytes order, and keys equal in them (a NUL byte past the end of
        // one, bytes past the sixteenth) that only their bytes order: eight of them, which the
        // table's order (seeded at random) leaves in byte order once in 40,320 runs
        for (k, ts) in [
            ("b", 25),
            ("a", 5),
            ("b", 3),
            ("a\0", 7),
            ("a", 31),
            ("c", -4),
            ("0123456789abcdefZ", 2),
            ("0123456789abcdef", 4),
            ("0123456789abcdefA", 6),
            ("0123456789abcdeg", 8),
            ("0123456789abcdefAA", 3),
            ("0123456789abcdefB", 9),
            ("0123456789abcdef\0", 11),
            ("0123456789abcdefa", 12),
            ("0123456789abcdefC", 13),
            ("é", 1),
        ] {
            add(&mut f, k, ts, None);
        }
        f.restore("b", &mut None, &[(1, -30, Acc::of(None))]);
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
        assert_eq!(
            f.restore("k", &mut None, &[(1, 10, Acc::of(Some(2.0)))]),
            Some(20)
        );
        f.restore("k", &mut None, &[(1, 20, Acc::of(Some(3.0)))]);
        f.restore("k", &mut None, &[(1, 10, Acc::of(Some(4.0)))]);
        assert_eq!(f.open_count(), 2);
        assert_eq!(
            f.get(1, 10, "k").map(|(end, acc)| (end, acc.sum)),
            Some((20, 4.0))
        );
        add(&mut f, "k", 11, None);
        assert_eq!(f.get(1, 10, "k").map(|(_, acc)| acc.count), Some(2));
    }

    /// The windows of a key as each record adding to every open window holding it would keep
    /// them: what panes must be indistinguishable from.
    #[derive(Default)]
    struct Model {
        windows: std::collections::BTreeMap<(String, u16, i64), (i64, Acc)>,
    }

    impl Model {
        fn add(
            &mut self,
            defs: &[WindowDef],
            key: &str,
            ts: i64,
            value: Option<f64>,
            limit: Option<i64>,
        ) -> bool {
            let mut took = false;
            for (i, d) in defs.iter().enumerate() {
                let starts: Vec<i64> = match d.kind {
                    WindowKind::Tumbling { size } => vec![tumbling_start(ts, size)],
                    WindowKind::Hopping { size, hop } => hopping_starts(ts, size, hop).collect(),
                    WindowKind::Session { .. } => continue,
                };
                let size = d.kind.size().unwrap_or(0);
                for start in starts.into_iter().filter(|s| !is_final(s + size, limit)) {
                    took = true;
                    self.windows
                        .entry((key.to_string(), i as u16, start))
                        .or_insert((start + size, Acc::default()))
                        .1
                        .add(value);
                }
            }
            took
        }

        fn close(&mut self, limit: i64) -> Vec<(u16, i64, String, i64, Acc)> {
            let mut out = Vec::new();
            self.windows.retain(|(key, window, start), (end, acc)| {
                if *end <= limit {
                    out.push((*window, *start, key.clone(), *end, *acc));
                }
                *end > limit
            });
            out.sort_by(|a, b| (a.0, a.1, &a.2).cmp(&(b.0, b.1, &b.2)));
            out
        }

        fn list(&self) -> Vec<(String, u16, i64, i64, Acc)> {
            self.windows
                .iter()
                .map(|((key, window, start), (end, acc))| {
                    (key.clone(), *window, *start, *end, *acc)
                })
                .collect()
        }
    }

    fn list(f: &FixedWindows) -> Vec<(String, u16, i64, i64, Acc)> {
        let mut out = Vec::new();
        f.for_each_ref(|window, start, key, end, acc| {
            out.push((key.to_string(), window, start, end, acc))
        });
        out
    }

    fn restored(f: &FixedWindows, windows: &[WindowDef]) -> FixedWindows {
        let mut g = FixedWindows::new(windows);
        f.for_each_ref(|window, start, key, _, acc| {
            g.restore(key, &mut None, &[(window, start, acc)]);
        });
        g
    }

    #[test]
    fn a_hopping_window_whose_size_is_a_multiple_of_its_hop_keeps_one_pane_per_hop() {
        let windows = defs(&[WindowKind::Hopping { size: 30, hop: 10 }]);
        let mut f = FixedWindows::new(&windows);
        for ts in [1, 2, 3] {
            add(&mut f, "k", ts, None);
        }
        // one pane, three windows
        assert_eq!(slots(&f, "k").len(), 1);
        assert_eq!(f.open_count(), 3);
        add(&mut f, "k", 14, None);
        assert_eq!(slots(&f, "k").len(), 2);
        assert_eq!(f.open_count(), 4);
        assert_eq!(
            f.get(0, 0, "k").map(|(end, acc)| (end, acc.count)),
            Some((30, 4))
        );
        assert_eq!(f.get(0, -20, "k").map(|(_, acc)| acc.count), Some(3));
        assert_eq!(f.get(0, 10, "k").map(|(_, acc)| acc.count), Some(1));
        // a record too late for the first windows of its pane goes to the others one by one
        assert_eq!(closed(&mut f, 10).len(), 1);
        assert!(add(&mut f, "j", 5, Some(10)));
        assert_eq!(slots(&f, "j").iter().filter(|s| s.is_pane()).count(), 0);
        assert_eq!(f.get(0, -10, "j").map(|(_, acc)| acc.count), Some(1));
        assert_eq!(f.get(0, -20, "j"), None);
        assert_eq!(f.open_count(), 3 + 2);
        // a pane goes once its last window has closed
        assert_eq!(closed(&mut f, 30).len(), 4);
        assert_eq!(slots(&f, "k").len(), 1);
        assert_eq!(f.open_count(), 1);
    }

    #[test]
    fn past_sixteen_hops_a_window_a_hopping_window_keeps_a_slot_per_window() {
        let windows = defs(&[
            WindowKind::Hopping { size: 32, hop: 2 },
            WindowKind::Hopping { size: 34, hop: 2 },
        ]);
        let mut f = FixedWindows::new(&windows);
        add(&mut f, "k", 1, None);
        let slots = slots(&f, "k");
        assert_eq!(slots.iter().filter(|s| s.is_pane()).count(), 1);
        assert_eq!(slots.iter().filter(|s| !s.is_pane()).count(), 17);
        assert_eq!(f.open_count(), 16 + 17);
    }

    proptest::proptest! {
        /// Under any records (late ones included), closes as the scope makes them (only once
        /// the earliest end is reached) and restores of what a checkpoint lists, the windows
        /// equal those of adding every record to every open window holding it.
        #[test]
        fn panes_are_indistinguishable_from_a_window_per_hop(
            shape in 0usize..4,
            steps in proptest::collection::vec((0u8..8, 0u8..4, -45i64..45, -3i8..4), 1..250),
        ) {
            let kinds = [
                vec![WindowKind::Tumbling { size: 10 }, WindowKind::Hopping { size: 30, hop: 10 }],
                vec![WindowKind::Hopping { size: 20, hop: 5 }, WindowKind::Hopping { size: 25, hop: 10 }],
                vec![WindowKind::Session { gap: 5 }, WindowKind::Hopping { size: 40, hop: 10 }, WindowKind::Tumbling { size: 7 }],
                // 16 panes a window, and past the most panes a window is combined from
                vec![WindowKind::Hopping { size: 32, hop: 2 }, WindowKind::Hopping { size: 34, hop: 2 }],
            ];
            let windows = defs(&kinds[shape]);
            let mut f = FixedWindows::new(&windows);
            let mut model = Model::default();
            let mut limit: Option<i64> = None;
            let mut newest = 0i64;
            for (op, key, dt, v) in steps {
                match op {
                    0..=4 => {
                        let key = format!("k{key}");
                        let ts = newest + dt;
                        newest = newest.max(ts);
                        let value = (v >= 0).then_some(f64::from(v));
                        let want = model.add(&windows, &key, ts, value, limit);
                        proptest::prop_assert_eq!(f.add(&key, ts, value, limit, &mut None, no_sessions), want);
                    }
                    5 | 6 => {
                        let l = newest - i64::from(key) * 4;
                        if limit.is_some_and(|old| l <= old) {
                            continue;
                        }
                        limit = Some(l);
                        let want = model.close(l);
                        if f.earliest_end().is_some_and(|end| end <= l) {
                            let mut got = Vec::new();
                            f.close(l, |window, start, end, acc, key| got.push((window, start, key.to_string(), end, acc)));
                            got.sort_by(|a, b| (a.0, a.1, &a.2).cmp(&(b.0, b.1, &b.2)));
                            proptest::prop_assert_eq!(got, want);
                        } else {
                            proptest::prop_assert!(want.is_empty(), "windows due that the earliest end did not tell of");
                        }
                    }
                    _ => f = restored(&f, &windows),
                }
                let want = model.list();
                proptest::prop_assert_eq!(f.open_count(), want.len());
                proptest::prop_assert_eq!(list(&f), want.clone());
                proptest::prop_assert_eq!(f.earliest_end(), want.iter().map(|w| w.3).min());
            }
        }
    }
}
