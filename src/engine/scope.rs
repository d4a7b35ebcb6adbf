//! The state of one scope (the instance, or one source partition) by key group. Each group owns
//! its windows per definition and its final windows waiting for their acknowledgement, behind
//! an `Arc`: a snapshot shares the changed groups instead of copying the state, and a group
//! changed while a checkpoint still writes it is copied then (copy on write: one group, never
//! the state). A time per group, at or before the end of each of its windows (`due`), tells
//! which groups the watermark closes windows in, so that closing never scans every group. A group's
//! final windows sit in chunks, one per epoch they closed in, behind `Arc`s of their own: final
//! windows never change, they only leave, so a group copied on write shares them, and
//! acknowledgements are marked beside them. A chunk keeps its final windows packed, 48 bytes each,
//! each run of them with the keys its rows refer to (a key once per run while a group's keys are
//! few; at a million keys, where a group closes a key's windows far apart, about one key per row).

use std::sync::Arc;

use fixedbitset::FixedBitSet;

use super::aggregate::Acc;
use super::due::Due;
use super::fixed::{FixedOnly, FixedWindows, KeyWindows};
use super::group::{DirtyGroups, EntryRef, GroupContent, GroupId};
use super::state::{note_end, ClosedWindow, Entry, EntryStatus, Key, SessionTable, StateKey};
use super::window::{WindowDef, WindowKind};
use super::StateError;
use crate::position::Partition;

/// One entry of a key as a restore puts it back: window index, start, end, accumulator and
/// whether the window is final.
pub(crate) type KeyEntry = (u16, i64, i64, Acc, bool);

/// Final windows ready for the output: some as they are, most read from the chunks they were
/// held in as they are sent (a release of a million windows is never copied out whole).
#[derive(Debug, Default)]
pub struct Emission {
    windows: Vec<ClosedWindow>,
    parts: Vec<ReleasedChunk>,
    len: usize,
}

/// A chunk's final windows released, with the scope they belong to.
#[derive(Debug)]
struct ReleasedChunk {
    scope: Option<Partition>,
    rows: Runs,
    /// Rows acknowledged before the release (skipped).
    acked: FixedBitSet,
}

impl ReleasedChunk {
    fn pending(&self) -> usize {
        self.rows.len() - self.acked.count_ones(..)
    }
}

/// A released chunk's windows not acknowledged before the release, each made as it is
/// reached.
struct ReleasedWindows {
    part: ReleasedChunk,
    /// The run read and the row in it.
    run: usize,
    at: usize,
    /// The index of that row in the chunk.
    index: usize,
}

impl Iterator for ReleasedWindows {
    type Item = ClosedWindow;

    fn next(&mut self) -> Option<ClosedWindow> {
        loop {
            let run = self.part.rows.runs.get(self.run)?;
            let Some(row) = run.row(self.at) else {
                self.run += 1;
                self.at = 0;
                continue;
            };
            let acked = self.part.acked.contains(self.index);
            self.at += 1;
            self.index += 1;
            if !acked {
                return Some(row.to_window(&self.part.scope));
            }
        }
    }
}

impl Emission {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn push(&mut self, w: ClosedWindow) {
        self.windows.push(w);
        self.len += 1;
    }

    fn push_chunk(&mut self, scope: &Option<Partition>, chunk: &ClosedChunk) {
        self.len += chunk.remaining;
        self.parts.push(ReleasedChunk {
            scope: scope.clone(),
            rows: chunk.rows.clone(),
            acked: chunk.acked.clone(),
        });
    }

    /// Keeps only the windows whose scope passes `keep`.
    pub(crate) fn retain_scopes(&mut self, keep: impl Fn(&Option<Partition>) -> bool) {
        self.windows.retain(|w| keep(&w.id.partition));
        self.parts.retain(|p| keep(&p.scope));
        self.len =
            self.windows.len() + self.parts.iter().map(ReleasedChunk::pending).sum::<usize>();
    }

    /// The windows, each made as it is reached.
    pub fn into_windows(self) -> impl Iterator<Item = ClosedWindow> {
        self.windows
            .into_iter()
            .chain(self.parts.into_iter().flat_map(|part| ReleasedWindows {
                part,
                run: 0,
                at: 0,
                index: 0,
            }))
    }
}

impl From<Vec<ClosedWindow>> for Emission {
    fn from(windows: Vec<ClosedWindow>) -> Self {
        Emission {
            len: windows.len(),
            windows,
            parts: Vec::new(),
        }
    }
}

/// A group's open windows: its table of keys, and the indexes of its sessions where
/// sessions are defined.
#[derive(Debug, Clone)]
enum Tables {
    /// No session definition: a key's entry holds its fixed windows alone.
    Fixed(FixedWindows<FixedOnly>),
    /// A key's entry holds its fixed windows and its sessions, so that a record finds both
    /// with one lookup; a table per session definition indexes their ends.
    Sessions(FixedWindows<KeyWindows>, Vec<SessionTable>),
}

/// `$body` with `$f` the group's fixed windows, whichever entries its table holds.
macro_rules! fixed {
    ($tables:expr, $f:ident => $body:expr) => {
        match $tables {
            Tables::Fixed($f) => $body,
            Tables::Sessions($f, _) => $body,
        }
    };
}

/// One key group's state.
#[derive(Debug, Clone)]
pub(crate) struct GroupState {
    /// Open windows, key by key.
    tables: Tables,
    /// Final windows not acknowledged by the output yet, by the epoch they closed in (see
    /// `Engine`), which says which checkpoint releases them; oldest epoch first.
    closed: Vec<ClosedChunk>,
    scope: Option<Partition>,
}

/// A final window as a close hands it over, before a run packs it (see [`PackedRow`]).
#[derive(Debug, Clone)]
struct ClosedRow {
    /// The definition index in the top 16 bits, the record count in the others (up to
    /// [`ROW_MAX_COUNT`]).
    tag: u64,
    start: i64,
    end: i64,
    sum: f64,
    min: f64,
    max: f64,
    /// Shared with the group's open windows of the key and with other final windows, when
    /// the key is too long to sit in place.
    key: Key,
}

/// The most records a final window counts (281 trillion; a window combined from panes that
/// count more stays here).
const ROW_MAX_COUNT: u64 = (1 << 48) - 1;

/// The definition index a row's tag holds (see [`ClosedRow::tag`]).
fn tag_window(tag: u64) -> u16 {
    (tag >> 48) as u16
}

/// A row's accumulator: the record count its tag holds, and its values.
fn tag_acc(tag: u64, [sum, min, max]: [f64; 3]) -> Acc {
    Acc {
        count: tag & ROW_MAX_COUNT,
        sum,
        min,
        max,
    }
}

impl ClosedRow {
    fn new(window: u16, start: i64, end: i64, acc: Acc, key: Key) -> Self {
        ClosedRow {
            tag: (u64::from(window) << 48) | acc.count.min(ROW_MAX_COUNT),
            start,
            end,
            sum: acc.sum,
            min: acc.min,
            max: acc.max,
            key,
        }
    }

    fn window(&self) -> u16 {
        tag_window(self.tag)
    }

    fn acc(&self) -> Acc {
        tag_acc(self.tag, [self.sum, self.min, self.max])
    }

    #[cfg(test)]
    fn of(w: ClosedWindow) -> Self {
        ClosedRow::new(w.id.window, w.id.start, w.end, w.acc, w.id.key)
    }

    fn to_window(&self, scope: &Option<Partition>) -> ClosedWindow {
        ClosedWindow {
            id: StateKey {
                partition: scope.clone(),
                window: self.window(),
                start: self.start,
                key: self.key.clone(),
            },
            end: self.end,
            acc: self.acc(),
        }
    }
}

/// A final window waiting for its acknowledgement, as its run keeps it (its scope is its
/// group's): 48 bytes, where a row holding its end and its key took 72, and hundreds of
/// thousands wait at once when the output lags. Its key is an index into the run's keys (a
/// group's few keys close window after window), its end a distance from its start.
#[derive(Debug, Clone)]
struct PackedRow {
    /// As [`ClosedRow::tag`].
    tag: u64,
    start: i64,
    sum: f64,
    min: f64,
    max: f64,
    /// The end less the start, or [`LONG_SPAN`]: the end is then in the run's `long_ends`.
    span: u32,
    /// Where the key is in the run's keys.
    key: u32,
}

/// The span of a row whose end is not within `u32::MAX - 1` milliseconds after its start
/// (a session or window longer than 49 days).
const LONG_SPAN: u32 = u32::MAX;

/// How many of its keys a run finds again by their hash (a slot each, the newest key of a
/// hash kept): more than a group of 10k keys holds (2-3 keys each), so that its rows share
/// their keys. A slot keeps 16 more bits of its key's hash, so that a row whose key is new
/// reads no other key to find out (out of the cache by then, at a million keys; the turnover
/// benchmark measured no difference).
const KEY_SLOTS: usize = 16;

/// The slot of `key` among a run's [`KEY_SLOTS`], and the 16 bits of its hash a slot keeps.
fn key_slot(key: &str) -> (usize, u32) {
    use std::hash::BuildHasher;
    let hash = foldhash::fast::FixedState::with_seed(0).hash_one(key);
    ((hash >> 32) as usize % KEY_SLOTS, (hash & 0xffff) as u32)
}

/// Rows of one chunk that closed together or in a row, with the keys and the long ends they
/// refer to; shared by copies of the group and by releases, never changed once shared.
#[derive(Debug, Clone, Default)]
struct Run {
    rows: Vec<PackedRow>,
    keys: Vec<Key>,
    /// By [`key_slot`]: the hash bits of the newest key of that slot in the top 16 bits,
    /// 1 + its index in the others; 0 if none.
    slots: [u32; KEY_SLOTS],
    /// The end of each row whose span is [`LONG_SPAN`], by row index, ascending.
    long_ends: Vec<(u32, i64)>,
}

/// One row of a run, read.
#[derive(Clone, Copy)]
struct RowRef<'a> {
    run: &'a Run,
    row: &'a PackedRow,
    at: usize,
}

impl Run {
    fn with_capacity(n: usize) -> Self {
        Run {
            rows: Vec::with_capacity(n),
            ..Run::default()
        }
    }

    fn len(&self) -> usize {
        self.rows.len()
    }

    fn row(&self, at: usize) -> Option<RowRef<'_>> {
        Some(RowRef {
            run: self,
            row: self.rows.get(at)?,
            at,
        })
    }

    fn iter(&self) -> impl Iterator<Item = RowRef<'_>> {
        self.rows
            .iter()
            .enumerate()
            .map(move |(at, row)| RowRef { run: self, row, at })
    }

    /// Where `key` is in the run's keys: the newest key of its slot, else added.
    fn intern(&mut self, key: &Key) -> u32 {
        let (slot, bits) = key_slot(key);
        let held = self.slots[slot];
        if held >> 16 == bits {
            let newest = ((held & 0xffff) as usize).checked_sub(1);
            if let Some(i) = newest.filter(|&i| self.keys.get(i) == Some(key)) {
                return i as u32;
            }
        }
        // grown by half, as the rows are (a run of a million keys holds about a key per row)
        if self.keys.len() == self.keys.capacity() {
            self.keys.reserve_exact((self.keys.len() / 2).max(1));
        }
        self.keys.push(key.clone());
        let i = self.keys.len() - 1;
        // a compacted run past 65,535 keys finds its later keys by no slot
        if let Ok(index) = u16::try_from(i + 1) {
            self.slots[slot] = (bits << 16) | u32::from(index);
        }
        i as u32
    }

    /// Adds a row (the caller makes room for it).
    fn add(&mut self, row: &ClosedRow) {
        let acc = [row.sum, row.min, row.max];
        self.put(row.tag, row.start, row.end, acc, &row.key);
    }

    /// Adds a copy of a row of another run (the caller makes room for it).
    fn copy(&mut self, row: RowRef<'_>) {
        let r = row.row;
        self.put(r.tag, r.start, row.end(), [r.sum, r.min, r.max], row.key());
    }

    fn put(&mut self, tag: u64, start: i64, end: i64, [sum, min, max]: [f64; 3], key: &Key) {
        let at = self.rows.len() as u32;
        let span = end
            .checked_sub(start)
            .and_then(|span| u32::try_from(span).ok())
            .filter(|&span| span != LONG_SPAN)
            .unwrap_or_else(|| {
                self.long_ends.push((at, end));
                LONG_SPAN
            });
        let key = self.intern(key);
        self.rows.push(PackedRow {
            tag,
            start,
            sum,
            min,
            max,
            span,
            key,
        });
    }
}

impl std::fmt::Debug for RowRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowRef")
            .field("at", &self.at)
            .field("window", &self.window())
            .field("start", &self.start())
            .field("end", &self.end())
            .field("key", self.key())
            .finish()
    }
}

impl<'a> RowRef<'a> {
    fn window(&self) -> u16 {
        tag_window(self.row.tag)
    }

    fn start(&self) -> i64 {
        self.row.start
    }

    fn end(&self) -> i64 {
        if self.row.span != LONG_SPAN {
            return self.row.start + i64::from(self.row.span);
        }
        // `Run::put` lists the end of every long row, in the order of the rows
        let at = self.at as u32;
        let ends = &self.run.long_ends;
        ends[ends.partition_point(|&(i, _)| i < at)].1
    }

    fn key(&self) -> &'a Key {
        &self.run.keys[self.row.key as usize]
    }

    fn acc(&self) -> Acc {
        let r = self.row;
        tag_acc(r.tag, [r.sum, r.min, r.max])
    }

    fn to_window(self, scope: &Option<Partition>) -> ClosedWindow {
        ClosedWindow {
            id: StateKey {
                partition: scope.clone(),
                window: self.window(),
                start: self.start(),
                key: self.key().clone(),
            },
            end: self.end(),
            acc: self.acc(),
        }
    }

    fn is(&self, id: &StateKey) -> bool {
        self.window() == id.window && self.start() == id.start && **self.key() == *id.key
    }
}

/// What a table's `close` hands each window it closes to: a row appended to `out`, sharing
/// the key.
fn rows_into(out: &mut Vec<ClosedRow>) -> impl FnMut(u16, i64, i64, Acc, &Key) + '_ {
    move |window, start, end, acc, key: &Key| {
        out.push(ClosedRow::new(window, start, end, acc, key.clone()))
    }
}

/// A chunk's rows in the order they closed, in runs that never change once shared: windows
/// closing while a copy of the group (a snapshot's) or a release shares the last run start a
/// run of their own, so that the rows before them are not copied (one list per chunk was copied
/// whole on the loop when a window closed while a checkpoint still encoded the group);
/// otherwise they join the last run, which grows in place up to [`RUN_ROWS`] rows. A run per
/// close read a fifth less at 10k keys in the turnover benchmark (a few rows each, and every
/// acknowledgement looked up through them); runs of at most 128 rows took 5-10% more peak RSS
/// there.
#[derive(Debug, Clone, Default)]
struct Runs {
    runs: Vec<Arc<Run>>,
    /// The chunk index of each run's first row.
    starts: Vec<usize>,
    len: usize,
}

/// The most rows a run grows to in place (24 KiB): more than most groups close in one
/// checkpoint interval, so that a chunk is mostly one run unless a snapshot shared it while its
/// windows closed.
const RUN_ROWS: usize = 512;

impl Runs {
    fn len(&self) -> usize {
        self.len
    }

    /// Row `i` of the chunk.
    fn get(&self, i: usize) -> Option<RowRef<'_>> {
        if i >= self.len {
            return None;
        }
        // the first run starts at 0 <= i
        let r = self.starts.partition_point(|&s| s <= i).checked_sub(1)?;
        self.runs.get(r)?.row(i - self.starts[r])
    }

    fn iter(&self) -> impl Iterator<Item = RowRef<'_>> {
        self.runs.iter().flat_map(|run| run.iter())
    }

    /// The rows from index `i` on, with their indexes.
    fn iter_from(&self, i: usize) -> impl Iterator<Item = (usize, RowRef<'_>)> {
        let r = self.starts.partition_point(|&s| s <= i).saturating_sub(1);
        let first = self.starts.get(r).copied().unwrap_or(self.len);
        self.runs
            .get(r..)
            .unwrap_or(&[])
            .iter()
            .flat_map(|run| run.iter())
            .skip(i.saturating_sub(first))
            .zip(i..)
            .map(|(row, i)| (i, row))
    }

    /// `run` as the only run.
    fn of(run: Run) -> Runs {
        let len = run.len();
        if len == 0 {
            return Runs::default();
        }
        Runs {
            runs: vec![Arc::new(run)],
            starts: vec![0],
            len,
        }
    }

    /// Adds `row` as [`Runs::append`] does.
    fn push(&mut self, row: ClosedRow) {
        match self.runs.last_mut().and_then(Arc::get_mut) {
            Some(last) if last.len() < RUN_ROWS => {
                make_room(&mut last.rows, 1);
                last.add(&row)
            }
            _ => {
                let mut run = Run::with_capacity(1);
                run.add(&row);
                self.starts.push(self.len);
                self.runs.push(Arc::new(run));
            }
        }
        self.len += 1;
    }

    /// Packs the rows of `more` here, leaving it empty: into the last run if nothing shares it
    /// and it stays within [`RUN_ROWS`], else as a run of their own (its rows in one exact
    /// allocation).
    fn append(&mut self, more: &mut Vec<ClosedRow>) {
        let n = more.len();
        if n == 0 {
            return;
        }
        match self.runs.last_mut().and_then(Arc::get_mut) {
            Some(last) if last.len() + n <= RUN_ROWS => {
                make_room(&mut last.rows, n);
                for row in more.drain(..) {
                    last.add(&row);
                }
            }
            _ => {
                let mut run = Run::with_capacity(n);
                for row in more.drain(..) {
                    run.add(&row);
                }
                self.starts.push(self.len);
                self.runs.push(Arc::new(run));
            }
        }
        self.len += n;
    }
}

/// Makes room for `n` more rows in a run that stays within [`RUN_ROWS`] with them (the
/// callers' guard), growing it by half rather than doubling it: a snapshot
/// seals a run as it is (every checkpoint shares its group), and doubled runs were sealed up to
/// half empty; one grown by half is at most a third empty.
fn make_room(run: &mut Vec<PackedRow>, n: usize) {
    if run.capacity() - run.len() < n {
        run.reserve_exact(n.max(run.len() / 2).min(RUN_ROWS - run.len()));
    }
}

/// The final windows of one group that closed in one epoch, in the order they closed.
#[derive(Debug, Clone)]
struct ClosedChunk {
    epoch: u64,
    /// Shared by the copies of the group and by releases, run by run.
    rows: Runs,
    /// One bit per row: acknowledged.
    acked: FixedBitSet,
    /// Rows not acknowledged.
    remaining: usize,
    /// Where the next acknowledgement is looked for first: they come back in the order the
    /// rows were released.
    cursor: usize,
}

impl ClosedChunk {
    fn new(epoch: u64) -> Self {
        ClosedChunk {
            epoch,
            rows: Runs::default(),
            acked: FixedBitSet::new(),
            remaining: 0,
            cursor: 0,
        }
    }

    fn push(&mut self, row: ClosedRow) {
        self.rows.push(row);
        self.acked.grow(self.rows.len());
        self.remaining += 1;
    }

    /// Packs every row of `more` here, leaving it empty (see [`Runs::append`]).
    fn append(&mut self, more: &mut Vec<ClosedRow>) {
        let n = more.len();
        self.rows.append(more);
        self.acked.grow(self.rows.len());
        self.remaining += n;
    }

    /// The rows not acknowledged.
    fn pending(&self) -> impl Iterator<Item = RowRef<'_>> {
        self.rows
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.acked.contains(*i))
            .map(|(_, r)| r)
    }

    /// Where final window `id` is, if it waits here: looked for from the cursor on, then
    /// from the start.
    fn find(&self, id: &StateKey) -> Option<usize> {
        let hit = |(i, row): &(usize, RowRef<'_>)| !self.acked.contains(*i) && row.is(id);
        self.rows
            .iter_from(self.cursor)
            .find(hit)
            .or_else(|| self.rows.iter().enumerate().take(self.cursor).find(hit))
            .map(|(i, _)| i)
    }

    /// Marks row `i` acknowledged; once most rows are, keeps only the others (see
    /// [`ClosedChunk::compact`]).
    fn acknowledge(&mut self, i: usize) {
        self.acked.insert(i);
        self.remaining -= 1;
        self.cursor = i + 1;
        if self.remaining > 0 && self.rows.len() >= 64 && self.remaining * 2 < self.rows.len() {
            self.compact();
        }
    }

    /// Keeps only the rows not acknowledged, copied into one run; the runs a copy of the
    /// group or a release still reads stay as they are, and go with their last reader.
    fn compact(&mut self) {
        let mut kept = Run::with_capacity(self.remaining);
        let mut i = 0;
        // each run let go once read: the chunk is never held twice over
        for run in std::mem::take(&mut self.rows.runs) {
            for row in run.iter() {
                if !self.acked.contains(i) {
                    kept.copy(row);
                }
                i += 1;
            }
        }
        self.rows = Runs::of(kept);
        self.acked = FixedBitSet::with_capacity(self.rows.len());
        self.cursor = 0;
    }
}

impl GroupState {
    fn new(windows: &[WindowDef], scope: &Option<Partition>) -> Self {
        let sessions: Vec<SessionTable> = windows
            .iter()
            .enumerate()
            .filter_map(|(i, w)| match w.kind {
                WindowKind::Session { gap } => Some(SessionTable::new(i as u16, gap)),
                _ => None,
            })
            .collect();
        let tables = if sessions.is_empty() {
            Tables::Fixed(FixedWindows::new(windows))
        } else {
            Tables::Sessions(FixedWindows::new(windows), sessions)
        };
        GroupState {
            tables,
            closed: Vec::new(),
            scope: scope.clone(),
        }
    }

    /// Puts back the entries of one key read from a checkpoint or the changelog (a blob lists
    /// a key's entries together): open windows into their tables, final ones into the held
    /// windows (a checkpoint holds each window once: no search for an equal one). The key's
    /// fixed windows take one allocation, and its final windows, fixed windows and sessions
    /// share one copy of the key. `fixed` is room for the key's fixed windows (cleared here).
    /// Returns how many final windows it held, and the earliest end of the open windows it put
    /// back.
    fn restore_key(
        &mut self,
        windows: &[WindowDef],
        key: &str,
        entries: &[KeyEntry],
        fixed: &mut Vec<(u16, i64, Acc)>,
    ) -> Result<(usize, Option<i64>), StateError> {
        let mut shared: Option<Key> = None;
        let mut earliest = None;
        let mut closed = 0;
        fixed.clear();
        for &(window, start, end, acc, final_window) in entries {
            if final_window {
                let key = shared.get_or_insert_with(|| Key::new(key)).clone();
                self.hold(ClosedRow::new(window, start, end, acc, key), RESTORED_EPOCH);
                closed += 1;
                continue;
            }
            let unknown = StateError::UnknownWindow {
                window,
                defined: windows.len(),
            };
            match windows.get(usize::from(window)).map(|w| w.kind) {
                None => return Err(unknown),
                Some(WindowKind::Session { .. }) => {
                    let Tables::Sessions(fixed, tables) = &mut self.tables else {
                        return Err(unknown);
                    };
                    let Some(table) = tables.iter_mut().find(|t| t.index() == window) else {
                        return Err(unknown);
                    };
                    let (name, entry) = fixed.entry(key, &mut shared);
                    let Some(end) = table.restore(&mut entry.sessions, name, start, end, acc)
                    else {
                        return Err(StateError::OverlappingSession { window, start });
                    };
                    note_end(&mut earliest, end)
                }
                Some(kind) => {
                    if !kind.is_start(start) {
                        return Err(StateError::MisalignedWindow {
                            window,
                            start,
                            kind: kind.describe(),
                        });
                    }
                    fixed.push((window, start, acc))
                }
            }
        }
        if let Some(end) = fixed!(&mut self.tables, f => f.restore(key, &mut shared, fixed)) {
            note_end(&mut earliest, end);
        }
        Ok((closed, earliest))
    }

    /// The chunk of the final windows that close in `epoch` (the newest).
    fn chunk(&mut self, epoch: u64) -> &mut ClosedChunk {
        if self.closed.last().is_none_or(|c| c.epoch != epoch) {
            self.closed.push(ClosedChunk::new(epoch));
        }
        let last = self.closed.len() - 1;
        &mut self.closed[last]
    }

    /// Keeps a final window that closed in `epoch` until its acknowledgement.
    fn hold(&mut self, row: ClosedRow, epoch: u64) {
        self.chunk(epoch).push(row);
    }

    /// [`GroupState::hold`] for every window of `rows`, leaving it empty.
    fn hold_all(&mut self, rows: &mut Vec<ClosedRow>, epoch: u64) {
        if !rows.is_empty() {
            self.chunk(epoch).append(rows);
        }
    }

    /// Adds a record to its windows, noting in `earliest` the earliest end of the windows it
    /// opens; see `FixedWindows::add`.
    fn add(
        &mut self,
        key: &str,
        ts: i64,
        value: Option<f64>,
        limit: Option<i64>,
        earliest: &mut Option<i64>,
    ) -> bool {
        match &mut self.tables {
            Tables::Fixed(fixed) => fixed.add(key, ts, value, limit, earliest, |_, _, _| false),
            Tables::Sessions(fixed, tables) => {
                fixed.add(key, ts, value, limit, earliest, |entry, name, earliest| {
                    let mut took = false;
                    for t in tables.iter_mut() {
                        took |= t.add(&mut entry.sessions, name, ts, value, limit, earliest);
                    }
                    took
                })
            }
        }
    }

    /// Removes the windows that end at or before `limit` into `out`, in the order of their
    /// definitions, fixed ones by start and key, sessions by end, key and start. Returns
    /// the earliest end of its windows after, if any is open.
    fn close(&mut self, limit: i64, out: &mut Vec<ClosedRow>) -> Option<i64> {
        let from = out.len();
        let due = |earliest: Option<i64>| earliest.is_some_and(|end| end <= limit);
        let mut earliest = fixed!(&mut self.tables, f => {
            if due(f.earliest_end()) {
                f.close(limit, rows_into(out));
            }
            f.earliest_end()
        });
        out[from..].sort_unstable_by(|a, b| {
            (a.window(), a.start, &a.key).cmp(&(b.window(), b.start, &b.key))
        });
        let sessions = out.len();
        if let Tables::Sessions(fixed, tables) = &mut self.tables {
            for t in tables.iter_mut() {
                let first = match t.earliest_end() {
                    Some(end) if end <= limit => t.close(fixed.keys_mut(), limit, rows_into(out)),
                    first => first,
                };
                earliest = earlier(earliest, first);
            }
        }
        out[sessions..].sort_unstable_by(|a, b| {
            (a.window(), a.end, &a.key, a.start).cmp(&(b.window(), b.end, &b.key, b.start))
        });
        // fixed and session definitions interleave by index
        out[from..].sort_by_key(ClosedRow::window);
        earliest
    }

    /// Where final window `id` waits: chunk and row. Acknowledgements come in the order of
    /// release, so each chunk's next row is tried before any chunk is searched.
    fn find_closed(&self, id: &StateKey) -> Option<(usize, usize)> {
        let next = self.closed.iter().enumerate().find_map(|(c, chunk)| {
            let r = chunk.cursor % chunk.rows.len().max(1);
            let hit = chunk.rows.get(r).is_some_and(|row| row.is(id));
            (hit && !chunk.acked.contains(r)).then_some((c, r))
        });
        next.or_else(|| {
            self.closed
                .iter()
                .enumerate()
                .find_map(|(c, chunk)| chunk.find(id).map(|r| (c, r)))
        })
    }

    fn acknowledge(&mut self, (c, r): (usize, usize)) {
        let chunk = &mut self.closed[c];
        chunk.acknowledge(r);
        if chunk.remaining == 0 {
            self.closed.remove(c);
        }
    }

    fn closed_count(&self) -> usize {
        self.closed.iter().map(|c| c.remaining).sum()
    }

    fn open(&self) -> usize {
        match &self.tables {
            Tables::Fixed(fixed) => fixed.open_count(),
            Tables::Sessions(fixed, tables) => {
                fixed.open_count() + tables.iter().map(SessionTable::open_count).sum::<usize>()
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.open() + self.closed_count()
    }

    /// Every entry, borrowed, in no particular order.
    pub(crate) fn rows(&self) -> Vec<EntryRef<'_>> {
        let mut out = Vec::with_capacity(self.len());
        let mut open = |window, start, key, end, acc| {
            out.push(EntryRef {
                key,
                window,
                start,
                end,
                acc,
                closed: false,
            })
        };
        match &self.tables {
            Tables::Fixed(fixed) => fixed.for_each_ref(&mut open),
            Tables::Sessions(fixed, tables) => {
                fixed.for_each_ref(&mut open);
                for t in tables {
                    t.for_each_ref(fixed.keys(), &mut open);
                }
            }
        }
        for chunk in &self.closed {
            out.extend(chunk.pending().map(|row| EntryRef {
                key: row.key(),
                window: row.window(),
                start: row.start(),
                end: row.end(),
                acc: row.acc(),
                closed: true,
            }));
        }
        out
    }

    /// Every entry, sorted by key.
    pub(crate) fn entries(&self) -> Vec<(StateKey, Entry)> {
        let mut out: Vec<(StateKey, Entry)> = self
            .rows()
            .into_iter()
            .map(|r| {
                let key = StateKey {
                    partition: self.scope.clone(),
                    window: r.window,
                    start: r.start,
                    key: r.key.into(),
                };
                let status = if r.closed {
                    EntryStatus::Closed
                } else {
                    EntryStatus::Open
                };
                let entry = Entry {
                    status,
                    end: r.end,
                    acc: r.acc,
                };
                (key, entry)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

/// The epoch of final windows put back from a checkpoint (and of those emitted at once, under
/// at-least-once).
const RESTORED_EPOCH: u64 = 0;

/// The earlier of two optional times.
fn earlier(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

/// A group's state rebuilt from its stored entries apart from its scope, on any thread, then
/// put in whole ([`ScopeState::put_built`]): a restore rebuilds its groups on every core.
pub(crate) struct BuiltGroup {
    group: u16,
    state: GroupState,
    /// Final windows among its entries.
    closed: usize,
    /// The earliest end of its open windows, if any is open.
    earliest: Option<i64>,
    /// Room for a key's fixed windows.
    restoring: Vec<(u16, i64, Acc)>,
}

impl BuiltGroup {
    pub(crate) fn new(group: u16, windows: &[WindowDef], scope: &Option<Partition>) -> Self {
        BuiltGroup {
            group,
            state: GroupState::new(windows, scope),
            closed: 0,
            earliest: None,
            restoring: Vec::new(),
        }
    }

    /// [`ScopeState::restore`] of one key into this group.
    pub(crate) fn restore(
        &mut self,
        windows: &[WindowDef],
        key: &str,
        entries: &[KeyEntry],
    ) -> Result<(), StateError> {
        let (closed, earliest) =
            self.state
                .restore_key(windows, key, entries, &mut self.restoring)?;
        self.closed += closed;
        self.earliest = earlier(self.earliest, earliest);
        Ok(())
    }
}

/// The groups of one scope by group index (a record finds its group without hashing).
#[derive(Debug, Default)]
struct Groups(Vec<Option<Arc<GroupState>>>);

impl Groups {
    fn get(&self, group: u16) -> Option<&Arc<GroupState>> {
        self.0.get(usize::from(group))?.as_ref()
    }

    fn get_mut(&mut self, group: u16) -> Option<&mut Arc<GroupState>> {
        self.0.get_mut(usize::from(group))?.as_mut()
    }

    fn get_or_insert_with(
        &mut self,
        group: u16,
        new: impl FnOnce() -> GroupState,
    ) -> &mut Arc<GroupState> {
        let i = usize::from(group);
        if i >= self.0.len() {
            self.0.resize(i + 1, None);
        }
        self.0[i].get_or_insert_with(|| Arc::new(new()))
    }

    fn put(&mut self, group: u16, state: Arc<GroupState>) {
        let i = usize::from(group);
        if i >= self.0.len() {
            self.0.resize(i + 1, None);
        }
        self.0[i] = Some(state);
    }

    /// Every group made so far, by index.
    fn iter(&self) -> impl Iterator<Item = (u16, &Arc<GroupState>)> {
        self.0
            .iter()
            .enumerate()
            .filter_map(|(i, g)| Some((i as u16, g.as_ref()?)))
    }

    fn values(&self) -> impl Iterator<Item = &Arc<GroupState>> {
        self.0.iter().flatten()
    }
}

/// The groups of one scope, the changed ones, and where their windows end.
#[derive(Debug)]
pub(crate) struct ScopeState {
    scope: Option<Partition>,
    windows: Vec<WindowDef>,
    groups: Groups,
    dirty: DirtyGroups,
    /// When each group has windows to close.
    due: Due,
    /// Final windows not acknowledged yet, over all groups.
    closed: usize,
    /// Room for the fixed windows of the key a restore puts back (cleared before each use).
    restoring: Vec<(u16, i64, Acc)>,
    /// Room for the groups a close visits and the windows one group closes (left empty).
    closing: (Vec<u16>, Vec<ClosedRow>),
}

impl ScopeState {
    pub(crate) fn new(scope: Option<Partition>, windows: &[WindowDef]) -> Self {
        ScopeState {
            scope,
            windows: windows.to_vec(),
            groups: Groups::default(),
            dirty: DirtyGroups::default(),
            due: Due::default(),
            closed: 0,
            restoring: Vec::new(),
            closing: (Vec::new(), Vec::new()),
        }
    }

    /// The group, created when first needed, for changing (copied first if a snapshot still
    /// shares it).
    fn group_mut(&mut self, group: u16) -> &mut GroupState {
        let (windows, scope) = (&self.windows, &self.scope);
        let shared = self
            .groups
            .get_or_insert_with(group, || GroupState::new(windows, scope));
        Arc::make_mut(shared)
    }

    /// A window of `group` ending at `end` opened; see [`Due::note`].
    fn register(&mut self, group: u16, end: i64) {
        self.due.note(group, end);
    }

    /// Asks the processor for what adding a record of `key` (in `group`) reads; see
    /// [`FixedWindows::prefetch`].
    pub(crate) fn prefetch(&self, key: &str, group: u16) {
        if let Some(g) = self.groups.get(group) {
            fixed!(&g.tables, f => f.prefetch(key));
        }
    }

    /// Adds a record of `key` (in `group`) to every window holding `ts` that is not final.
    pub(crate) fn add(
        &mut self,
        key: &str,
        group: u16,
        ts: i64,
        value: Option<f64>,
        limit: Option<i64>,
    ) -> bool {
        let mut earliest = None;
        let took = self
            .group_mut(group)
            .add(key, ts, value, limit, &mut earliest);
        if took {
            self.dirty.mark(group);
        }
        if let Some(end) = earliest {
            self.register(group, end);
        }
        took
    }

    /// Closes every window whose end is at or before `limit`: it leaves its table and waits,
    /// in its group's state and tagged with `epoch`, for its acknowledgement. Appends them to
    /// `out` if given (windows emitted as they close), else only keeps them.
    pub(crate) fn close(&mut self, limit: i64, epoch: u64, mut out: Option<&mut Emission>) {
        let (mut due, mut now) = std::mem::take(&mut self.closing);
        self.due.take(limit, &mut due);
        for g in due.drain(..) {
            let Some(shared) = self.groups.get_mut(g) else {
                continue;
            };
            // closing copies a group a snapshot shares; a group is due only when one of its
            // windows (or a session's older bound) ends by `limit`
            let group = Arc::make_mut(shared);
            if let Some(end) = group.close(limit, &mut now) {
                self.due.note(g, end);
            }
            if now.is_empty() {
                continue;
            }
            self.closed += now.len();
            self.dirty.mark(g);
            if let Some(out) = out.as_mut() {
                for row in &now {
                    out.push(row.to_window(&self.scope));
                }
            }
            group.hold_all(&mut now, epoch);
        }
        self.closing = (due, now);
    }

    /// Puts back the entries of one key read from a checkpoint or the changelog (a blob lists
    /// a key's entries together); see [`GroupState::restore_key`].
    pub(crate) fn restore(
        &mut self,
        group: u16,
        key: &str,
        entries: &[KeyEntry],
    ) -> Result<(), StateError> {
        let (windows, scope) = (&self.windows, &self.scope);
        let g = Arc::make_mut(
            self.groups
                .get_or_insert_with(group, || GroupState::new(windows, scope)),
        );
        let (closed, earliest) = g.restore_key(windows, key, entries, &mut self.restoring)?;
        self.closed += closed;
        if let Some(end) = earliest {
            self.register(group, end);
        }
        Ok(())
    }

    /// Whether the scope holds group `group` (built apart, it could not go in whole).
    pub(crate) fn holds(&self, group: u16) -> bool {
        self.groups.get(group).is_some()
    }

    /// Puts in a group rebuilt apart from the scope ([`BuiltGroup`]), which the scope does not
    /// hold yet ([`ScopeState::holds`]); one left empty is not put in.
    pub(crate) fn put_built(&mut self, built: BuiltGroup) {
        let BuiltGroup {
            group,
            state,
            closed,
            earliest,
            ..
        } = built;
        debug_assert!(!self.holds(group), "group {group} built apart twice");
        if state.len() == 0 {
            // every entry left out (a remap): the scope makes no group, as key by key
            return;
        }
        self.groups.put(group, Arc::new(state));
        self.closed += closed;
        if let Some(end) = earliest {
            self.register(group, end);
        }
    }

    /// The output acknowledged final window `id`: it leaves the state.
    pub(crate) fn acknowledge(&mut self, group: u16, id: StateKey) {
        let Some(shared) = self.groups.get_mut(group) else {
            return;
        };
        let Some(at) = shared.find_closed(&id) else {
            return;
        };
        Arc::make_mut(shared).acknowledge(at);
        self.closed -= 1;
        self.dirty.mark(group);
    }

    /// Every group changed since the last snapshot (every group holding entries if `full`),
    /// shared, not copied; a group that emptied is listed empty. Groups that emptied are kept
    /// (a few hundred bytes each, at most one per group of the scope): dropping thousands of
    /// them at once, when every window closes, stalled the loop for tens of milliseconds.
    pub(crate) fn snapshot(&mut self, full: bool) -> Vec<GroupContent> {
        let changed = self.dirty.take();
        let mut ids: Vec<u16> = if full {
            self.groups
                .iter()
                .filter(|(_, g)| g.len() > 0)
                .map(|(id, _)| id)
                .collect()
        } else {
            changed
        };
        ids.sort_unstable();
        let out = ids
            .into_iter()
            .map(|g| {
                let id = GroupId {
                    aggregation: 0,
                    scope: self.scope.clone(),
                    group: g,
                };
                match self.groups.get(g).filter(|s| s.len() > 0) {
                    Some(state) => GroupContent::shared(id, state.clone()),
                    None => GroupContent::new(id, Vec::new()),
                }
            })
            .collect();
        out
    }

    /// Queues the final windows put back by `restore` (epoch 0; called on a scope that
    /// holds no other window of epoch 0), shared with the chunks that hold them.
    pub(crate) fn queue_restored(&self, out: &mut Emission) {
        for group in self.groups.values() {
            for chunk in group.closed.iter().filter(|c| c.epoch == RESTORED_EPOCH) {
                out.push_chunk(&self.scope, chunk);
            }
        }
    }

    /// Appends the final windows that closed in an epoch after `after`, up to `upto`: their
    /// chunks, shared, never copied.
    pub(crate) fn release(&self, after: u64, upto: u64, out: &mut Emission) {
        let due = |epoch: u64| epoch > after && epoch <= upto;
        for group in self.groups.values() {
            for chunk in group.closed.iter().filter(|c| due(c.epoch)) {
                out.push_chunk(&self.scope, chunk);
            }
        }
    }

    pub(crate) fn open_windows(&self) -> usize {
        self.groups.values().map(|g| g.open()).sum()
    }

    /// Final windows not acknowledged yet.
    pub(crate) fn pending(&self) -> usize {
        self.closed
    }

    pub(crate) fn has_changes(&self) -> bool {
        !self.dirty.is_empty()
    }
}

#[cfg(test)]
mod tests {
    //! Final windows held in chunks: what is pending is exactly what was held and not
    //! acknowledged, in whatever order acknowledgements come, and a copy of the group taken
    //! for a snapshot keeps what it saw.

    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::super::state::{one_copy, LONG_KEY};
    use super::*;

    /// Window definitions of these names and kinds.
    fn defs(kinds: &[(&str, WindowKind)]) -> Vec<WindowDef> {
        kinds
            .iter()
            .map(|(name, kind)| WindowDef {
                name: name.to_string(),
                kind: *kind,
            })
            .collect()
    }

    /// Final window `i`: of 11 keys, some of them longer than 49 days (an end a row cannot
    /// hold as a distance from its start).
    fn window(i: u32) -> ClosedWindow {
        let start = i64::from(i / 7) * 10;
        let span = match i % 13 {
            5 => 1 << 40,
            9 => i64::from(u32::MAX),
            11 => i64::from(u32::MAX) - 1,
            _ => 10,
        };
        ClosedWindow {
            id: StateKey {
                partition: None,
                window: (i % 2) as u16,
                start,
                key: format!("k{}", i % 11).into(),
            },
            end: start + span,
            acc: Acc::of(Some(f64::from(i))),
        }
    }

    /// The final windows waiting in `g`: id and end.
    fn pending(g: &GroupState) -> BTreeSet<(u16, i64, String, i64)> {
        g.entries()
            .into_iter()
            .map(|(id, e)| {
                assert_eq!(e.status, EntryStatus::Closed);
                (id.window, id.start, id.key.to_string(), e.end)
            })
            .collect()
    }

    fn id_of(i: u32) -> (u16, i64, String, i64) {
        let w = window(i);
        (w.id.window, w.id.start, w.id.key.to_string(), w.end)
    }

    proptest! {
        #[test]
        fn pending_final_windows_are_those_held_and_not_acknowledged(
            epochs in proptest::collection::vec(proptest::collection::vec(0usize..60, 1..4), 1..5),
            order in proptest::collection::vec(any::<prop::sample::Index>(), 0..400),
            copy_at in 0usize..400,
            after_copy in 0usize..40,
            in_order in any::<bool>(),
        ) {
            let mut g = GroupState::new(&[], &None);
            let mut model = BTreeSet::new();
            let mut next = 0u32;
            // each epoch: rows held one by one (as a restore holds them), then runs of rows
            // closing together
            for (epoch, runs) in epochs.iter().enumerate() {
                for (r, n) in runs.iter().enumerate() {
                    let rows = (next..next + *n as u32).map(|i| ClosedRow::of(window(i)));
                    if r == 0 {
                        for row in rows {
                            g.hold(row, epoch as u64 + 1);
                        }
                    } else {
                        g.hold_all(&mut rows.collect(), epoch as u64 + 1);
                    }
                    model.extend((next..next + *n as u32).map(id_of));
                    next += *n as u32;
                }
            }
            prop_assert_eq!(pending(&g), model.clone());
            let mut copy = None;
            // acknowledged in the order the windows were held (as the output's come back), or
            // in any order
            let mut oldest = 0u32;
            for (step, pick) in order.iter().enumerate() {
                if step == copy_at {
                    copy = Some((Arc::new(g.clone()), model.clone()));
                    // windows closing after the copy, in the newest epoch
                    let epoch = epochs.len() as u64;
                    g.hold_all(&mut (next..next + after_copy as u32).map(|i| ClosedRow::of(window(i))).collect(), epoch);
                    model.extend((next..next + after_copy as u32).map(id_of));
                    next += after_copy as u32;
                }
                let picked = if in_order {
                    oldest += 1;
                    (oldest <= next).then(|| id_of(oldest - 1))
                } else {
                    model.iter().nth(pick.index(model.len().max(1))).cloned()
                };
                let Some(target) = picked else {
                    break;
                };
                let id = StateKey { partition: None, window: target.0, start: target.1, key: target.2.clone().into() };
                let at = g.find_closed(&id);
                prop_assert!(at.is_some(), "{:?} is pending", target);
                if let Some(at) = at {
                    g.acknowledge(at);
                }
                model.remove(&target);
                prop_assert_eq!(g.closed_count(), model.len());
                prop_assert!(g.find_closed(&id).is_none(), "{:?} acknowledged twice", target);
            }
            prop_assert_eq!(pending(&g), model);
            if let Some((copy, seen)) = copy {
                prop_assert_eq!(pending(&copy), seen);
            }
        }
    }

    #[test]
    fn a_group_encodes_where_it_lives_to_the_blob_of_its_entries() {
        use crate::engine::group::encode_blob;
        use crate::engine::window::WindowKind;
        let defs = defs(&[
            ("t", WindowKind::Tumbling { size: 10 }),
            ("h", WindowKind::Hopping { size: 30, hop: 10 }),
            ("s", WindowKind::Session { gap: 5 }),
        ]);
        let mut scope = ScopeState::new(Some(Partition::new("in", 3)), &defs);
        for i in 0..300i64 {
            let key = format!("key-{}", i % 13);
            scope.add(&key, (i % 5) as u16, i * 3, Some(i as f64), None);
            if i % 50 == 49 {
                scope.close(i * 3 - 20, (i / 50) as u64 + 1, None);
            }
        }
        let groups = scope.snapshot(true);
        assert_eq!(groups.len(), 5);
        for g in &groups {
            let entries = g.entries();
            assert!(entries.iter().any(|(_, e)| e.status == EntryStatus::Closed));
            assert!(entries.iter().any(|(_, e)| e.status == EntryStatus::Open));
            assert_eq!(g.blob(), encode_blob(&entries), "group {}", g.id.group);
        }
    }

    #[test]
    fn a_release_reads_the_chunks_of_its_epochs_and_skips_what_was_acknowledged() {
        let p = Partition::new("in", 1);
        let mut scope = ScopeState::new(Some(p.clone()), &[]);
        for i in 0..200u32 {
            let mut w = window(i);
            w.id.partition = Some(p.clone());
            let group = (i % 3) as u16;
            scope
                .group_mut(group)
                .hold(ClosedRow::of(w), u64::from(i / 100) + 1);
            scope.closed += 1;
        }
        // one window of epoch 1 acknowledged early
        let mut early = window(7);
        early.id.partition = Some(p.clone());
        scope.acknowledge(1, early.id.clone());
        let mut out = Emission::default();
        scope.release(0, 1, &mut out);
        assert_eq!(out.len(), 99);
        let ids: BTreeSet<(u16, i64, String, i64)> = out
            .into_windows()
            .map(|w| {
                assert_eq!(w.id.partition.as_ref(), Some(&p));
                (w.id.window, w.id.start, w.id.key.to_string(), w.end)
            })
            .collect();
        let expected: BTreeSet<_> = (0..100).filter(|i| *i != 7).map(id_of).collect();
        assert_eq!(ids, expected);

        let mut out = Emission::from(vec![window(500)]);
        scope.release(1, 2, &mut out);
        assert_eq!(out.len(), 101);
        out.retain_scopes(|s| s.is_none());
        assert_eq!(
            out.len(),
            1,
            "the partition's windows are dropped, the other kept"
        );
    }

    #[test]
    fn windows_closing_together_join_their_epoch_and_leave_a_copy_as_it_was() {
        let mut g = GroupState::new(&[], &None);
        let mut rows: Vec<ClosedRow> = (0..10).map(|i| ClosedRow::of(window(i))).collect();
        g.hold_all(&mut rows, 1);
        assert!(rows.is_empty(), "the rows move into the group");
        let copy = g.clone();
        let mut more: Vec<ClosedRow> = (10..30).map(|i| ClosedRow::of(window(i))).collect();
        g.hold_all(&mut more, 1);
        g.hold_all(&mut Vec::new(), 2);
        assert_eq!(
            g.closed.len(),
            1,
            "one chunk per epoch, none for nothing held"
        );
        assert_eq!(pending(&g), (0..30).map(id_of).collect());
        assert_eq!(
            pending(&copy),
            (0..10).map(id_of).collect(),
            "the copy as it was"
        );
        let at = g.find_closed(&window(20).id).expect("held");
        g.acknowledge(at);
        assert_eq!(g.closed_count(), 29);
        assert!(g.find_closed(&window(20).id).is_none());
    }

    #[test]
    fn a_run_filled_a_few_rows_at_a_time_is_never_more_than_a_third_empty() {
        // a checkpoint seals a run as it is: what it holds empty stays empty until released
        for batch in [1, 3, 7, 40] {
            let mut runs = Runs::default();
            let mut next = 0;
            while runs.len() < 3 * RUN_ROWS {
                let mut rows: Vec<ClosedRow> = (next..next + batch)
                    .map(|i| ClosedRow::of(window(i)))
                    .collect();
                next += batch;
                runs.append(&mut rows);
                for run in &runs.runs {
                    let (len, cap) = (run.len(), run.rows.capacity());
                    assert!(
                        3 * (cap - len) <= cap && cap <= RUN_ROWS,
                        "batches of {batch}: a run of {len} rows holds room for {cap}"
                    );
                }
            }
            assert_eq!(runs.len(), next as usize);
            assert!(runs
                .iter()
                .zip(0..)
                .all(|(row, i)| row.to_window(&None) == window(i)));
        }
        // a restore fills runs row by row
        let mut runs = Runs::default();
        for i in 0..3 * RUN_ROWS as u32 {
            runs.push(ClosedRow::of(window(i)));
            let (len, cap) = runs
                .runs
                .last()
                .map_or((0, 0), |r| (r.len(), r.rows.capacity()));
            assert!(
                3 * (cap - len) <= cap,
                "a run of {len} rows pushed holds room for {cap}"
            );
        }
        assert!(runs.runs.iter().all(|r| r.len() == RUN_ROWS));
    }

    /// Whether two chunks' rows are the same runs in memory.
    fn same_runs(a: &Runs, b: &Runs) -> bool {
        a.runs.len() == b.runs.len() && a.runs.iter().zip(&b.runs).all(|(x, y)| Arc::ptr_eq(x, y))
    }

    #[test]
    fn a_copy_of_a_group_shares_its_final_windows() {
        let mut g = GroupState::new(&[], &None);
        for i in 0..100 {
            g.hold(ClosedRow::of(window(i)), 1);
        }
        let copy = g.clone();
        assert!(same_runs(&g.closed[0].rows, &copy.closed[0].rows));
        g.hold(ClosedRow::of(window(100)), 2);
        assert!(
            same_runs(&g.closed[0].rows, &copy.closed[0].rows),
            "a window closing in a later epoch does not copy the earlier ones"
        );
    }

    #[test]
    fn windows_closing_in_an_epoch_a_copy_shares_copy_none_of_its_rows() {
        let mut g = GroupState::new(&[], &None);
        let mut rows: Vec<ClosedRow> = (0..50).map(|i| ClosedRow::of(window(i))).collect();
        g.hold_all(&mut rows, 1);
        let copy = g.clone();
        let first = Arc::clone(&copy.closed[0].rows.runs[0]);
        let mut more: Vec<ClosedRow> = (50..80).map(|i| ClosedRow::of(window(i))).collect();
        g.hold_all(&mut more, 1);
        // a single row (as a restore holds them) joins the last run while nothing shares it,
        // and starts a run of its own when something does
        g.hold(ClosedRow::of(window(80)), 1);
        let second = g.clone();
        g.hold(ClosedRow::of(window(81)), 1);
        let runs = &g.closed[0].rows.runs;
        assert!(
            Arc::ptr_eq(&runs[0], &first),
            "the rows the copy shares stay where they are"
        );
        assert_eq!(
            runs.iter().map(|r| r.len()).collect::<Vec<_>>(),
            [50, 31, 1]
        );
        assert_eq!(pending(&g), (0..82).map(id_of).collect());
        assert_eq!(pending(&copy), (0..50).map(id_of).collect());
        assert_eq!(pending(&second), (0..81).map(id_of).collect());
        // every row is found where its index says, across the runs
        for i in 0..82u32 {
            let row = g.closed[0].rows.get(i as usize).expect("held");
            assert!(row.is(&window(i).id), "row {i}");
        }
        assert!(g.closed[0].rows.get(82).is_none());
        // and read from any index on, as the search for an acknowledged window starts
        for from in 0..84usize {
            let read: Vec<usize> = g.closed[0].rows.iter_from(from).map(|(i, _)| i).collect();
            assert_eq!(read, (from..82).collect::<Vec<_>>(), "from {from}");
            for (i, row) in g.closed[0].rows.iter_from(from) {
                assert!(row.is(&window(i as u32).id), "row {i} read from {from}");
            }
        }
        // unshared, windows closing join the last run up to RUN_ROWS rows
        let mut h = GroupState::new(&[], &None);
        for n in [RUN_ROWS as u32 - 29, 28, 1, 30, 30] {
            h.hold_all(&mut (0..n).map(|i| ClosedRow::of(window(i))).collect(), 1);
        }
        let runs = &h.closed[0].rows.runs;
        assert_eq!(
            runs.iter().map(|r| r.len()).collect::<Vec<_>>(),
            [RUN_ROWS, 30 + 30]
        );
    }

    /// The ids and ends a release yields, in order.
    fn released(out: Emission) -> Vec<(u16, i64, String, i64)> {
        out.into_windows()
            .map(|w| (w.id.window, w.id.start, w.id.key.to_string(), w.end))
            .collect()
    }

    #[test]
    fn acknowledged_windows_leave_a_chunk_that_a_copy_and_a_release_still_read() {
        let mut g = GroupState::new(&[], &None);
        g.hold_all(&mut (0..100).map(|i| ClosedRow::of(window(i))).collect(), 1);
        let copy = g.clone();
        let mut out = Emission::default();
        out.push_chunk(&None, &g.closed[0]);
        for i in 0..51 {
            let at = g.find_closed(&window(i).id).expect("held");
            g.acknowledge(at);
        }
        // most rows acknowledged: the others are copied into one run of their own
        let chunk = &g.closed[0];
        assert_eq!(
            (chunk.rows.len(), chunk.rows.runs.len(), chunk.remaining),
            (49, 1, 49)
        );
        assert!(!Arc::ptr_eq(
            &chunk.rows.runs[0],
            &copy.closed[0].rows.runs[0]
        ));
        assert_eq!(pending(&g), (51..100).map(id_of).collect());
        // the copy and the release read the rows as they were
        assert_eq!(pending(&copy), (0..100).map(id_of).collect());
        assert_eq!(released(out), (0..100).map(id_of).collect::<Vec<_>>());
        let at = g.find_closed(&window(75).id).expect("held");
        g.acknowledge(at);
        assert_eq!(g.closed_count(), 48);
    }

    #[test]
    fn a_release_reads_every_run_of_a_chunk_and_skips_what_was_acknowledged() {
        let mut g = GroupState::new(&[], &None);
        let mut copies = Vec::new();
        for (from, to) in [(0, 50), (50, 80), (80, 100)] {
            g.hold_all(
                &mut (from..to).map(|i| ClosedRow::of(window(i))).collect(),
                1,
            );
            copies.push(g.clone());
        }
        let runs = &g.closed[0].rows.runs;
        assert_eq!(
            runs.iter().map(|r| r.len()).collect::<Vec<_>>(),
            [50, 30, 20]
        );
        // the first and last rows, and both sides of each boundary between runs
        let acked = [0, 49, 50, 79, 80, 99];
        for i in acked {
            let at = g.find_closed(&window(i).id).expect("held");
            g.acknowledge(at);
        }
        let mut out = Emission::default();
        out.push_chunk(&None, &g.closed[0]);
        assert_eq!(out.len(), 94);
        let expected: Vec<_> = (0..100).filter(|i| !acked.contains(i)).map(id_of).collect();
        assert_eq!(released(out), expected);
    }

    #[test]
    fn a_final_window_keeps_its_definition_and_count_in_one_word() {
        assert_eq!(std::mem::size_of::<PackedRow>(), 48);
        let acc = Acc {
            count: ROW_MAX_COUNT,
            ..Acc::of(Some(2.5))
        };
        let mut run = Run::default();
        run.add(&ClosedRow::new(u16::MAX, -5, 7, acc, Key::new("k")));
        // a count past the bound (panes combined) stays at it and leaves the index alone
        let more = Acc {
            count: u64::MAX,
            ..acc
        };
        run.add(&ClosedRow::new(3, 0, 1, more, Key::new("k")));
        let rows: Vec<_> = run
            .iter()
            .map(|r| (r.window(), r.start(), r.end(), r.acc()))
            .collect();
        assert_eq!(rows, [(u16::MAX, -5, 7, acc), (3, 0, 1, acc)]);
    }

    #[test]
    fn a_row_reads_back_every_end_and_key_it_was_given() {
        let acc = Acc::of(Some(1.0));
        let max = i64::from(u32::MAX);
        // ends a distance from the start holds, and those it cannot (too far, before the
        // start, past the range of a difference), between ordinary ones
        let spans = [
            (0, 0),
            (0, max - 1),
            (0, max),
            (10, 10 + max + 1),
            (5, 4),
            (i64::MIN, i64::MAX),
            (i64::MAX, i64::MIN),
            (-7, 3),
            (1, 1 << 50),
        ];
        let mut run = Run::default();
        let mut given = Vec::new();
        for (i, (start, end)) in spans.iter().copied().enumerate() {
            // keys the run holds already (long rows among them), and new ones
            let key = Key::new(format!("key-{}", i % 4));
            let row = ClosedRow::new(i as u16, start, end, acc, key);
            given.push(row.to_window(&None));
            run.add(&row);
        }
        let back: Vec<_> = run.iter().map(|r| r.to_window(&None)).collect();
        assert_eq!(back, given);
        assert_eq!(run.long_ends.len(), 6);
        // a copy into another run (as a chunk compacts) reads the same
        let mut copy = Run::default();
        for row in run.iter().skip(1) {
            copy.copy(row);
        }
        let back: Vec<_> = copy.iter().map(|r| r.to_window(&None)).collect();
        assert_eq!(back, given[1..]);
        // keys of different slots, closing window after window, are stored once each
        let mut distinct: Vec<Key> = Vec::new();
        for i in 0.. {
            let key = Key::new(format!("k{i}"));
            if distinct.iter().all(|k| key_slot(k).0 != key_slot(&key).0) {
                distinct.push(key);
            }
            if distinct.len() == 4 {
                break;
            }
        }
        let mut keys = Run::default();
        for i in 0..40 {
            let key = distinct[i % 4].clone();
            keys.add(&ClosedRow::new(0, i as i64, i as i64 + 1, acc, key));
        }
        assert_eq!(keys.keys.len(), 4);
        // a key of a slot a later key took is stored again; every row reads its own key back
        let mut many = Run::default();
        let names: Vec<String> = (0..200).map(|i| format!("user-{}", i % 70)).collect();
        for (i, name) in names.iter().enumerate() {
            many.add(&ClosedRow::new(
                0,
                i as i64,
                i as i64 + 1,
                acc,
                Key::new(name),
            ));
        }
        let read: Vec<&str> = many.iter().map(|r| r.key().as_str()).collect();
        assert_eq!(read, names);
        // 70 names over 16 slots: slots are taken over, and some names stored again
        assert!(many.keys.len() > 70 && many.keys.len() <= names.len());
        // a run compacted past 65,535 keys still reads every row's key, and its slots name
        // only the keys they can
        let mut big = Run::default();
        for i in 0..70_000i64 {
            big.add(&ClosedRow::new(
                0,
                i,
                i + 1,
                acc,
                Key::new(format!("{}", i % 66_000)),
            ));
        }
        assert!(big
            .iter()
            .zip(0i64..)
            .all(|(r, i)| r.key().as_str() == format!("{}", i % 66_000)));
        assert!(big
            .slots
            .iter()
            .all(|&s| (s & 0xffff) as usize <= big.keys.len()));
    }

    #[test]
    fn a_restored_key_is_one_copy_shared_by_its_windows() {
        let defs = defs(&[("t", WindowKind::Tumbling { size: 10 })]);
        let mut scope = ScopeState::new(None, &defs);
        let acc = Acc::of(Some(1.0));
        let (open, closed) = ((0, 30, 40, acc, false), (0, 0, 10, acc, true));
        let b = format!("{LONG_KEY} b");
        scope
            .restore(3, LONG_KEY, &[closed, (0, 10, 20, acc, true), open])
            .unwrap();
        scope.restore(3, &b, &[closed]).unwrap();
        scope.restore(4, &b, &[open]).unwrap();
        let three = scope.groups.get(3).unwrap();
        let rows: Vec<RowRef<'_>> = three.closed.iter().flat_map(|c| c.rows.iter()).collect();
        assert_eq!(rows.len(), 3);
        let (held, a) = fixed!(&three.tables, f => f.key(LONG_KEY)).unwrap();
        // two final windows and the open window hold one copy
        assert!(one_copy(rows[0].key(), rows[1].key()));
        assert!(one_copy(rows[0].key(), &a));
        assert_eq!(held, 1);
        assert_eq!(**rows[2].key(), *b);
        assert_eq!(scope.closed, 3);
        assert_eq!(scope.open_windows(), 2);
    }

    #[test]
    fn a_restored_window_that_is_not_a_start_of_its_definition_is_refused() {
        let defs = defs(&[
            ("t", WindowKind::Tumbling { size: 10 }),
            ("h", WindowKind::Hopping { size: 30, hop: 10 }),
        ]);
        let mut scope = ScopeState::new(None, &defs);
        let acc = Acc::of(Some(1.0));
        for (window, start) in [(0, 15), (1, 5), (1, -25)] {
            let err = scope
                .restore(0, "k", &[(window, start, start + 10, acc, false)])
                .expect_err("misaligned");
            assert!(
                matches!(err, StateError::MisalignedWindow { window: w, start: s, .. } if (w, s) == (window, start)),
                "{err}"
            );
        }
        assert_eq!(scope.open_windows(), 0);
        // aligned ones go in, and a final window needs no definition at all
        scope
            .restore(
                0,
                "k",
                &[
                    (0, -20, -10, acc, false),
                    (1, 20, 50, acc, false),
                    (1, 5, 35, acc, true),
                ],
            )
            .unwrap();
        assert_eq!((scope.open_windows(), scope.closed), (2, 1));
    }

    #[test]
    fn a_restore_refuses_sessions_of_one_key_that_overlap() {
        let defs = defs(&[
            ("t", WindowKind::Tumbling { size: 10 }),
            ("s", WindowKind::Session { gap: 5 }),
            ("u", WindowKind::Session { gap: 5 }),
        ]);
        let acc = Acc::of(Some(1.0));
        let mut scope = ScopeState::new(None, &defs);
        // sessions of two definitions may overlap; two of one definition may not
        scope
            .restore(0, "k", &[(1, 1, 6, acc, false), (2, 3, 8, acc, false)])
            .unwrap();
        for overlapping in [(1, 3, 8), (1, 0, 2), (1, 1, 6)] {
            let (window, start, end) = overlapping;
            let refused = scope.restore(0, "k", &[(window, start, end, acc, false)]);
            assert!(
                matches!(
                    refused,
                    Err(StateError::OverlappingSession { window: 1, start: s }) if s == start
                ),
                "{overlapping:?}: {refused:?}"
            );
        }
        // one that only touches it is another session
        scope.restore(0, "k", &[(1, 6, 11, acc, false)]).unwrap();
        assert_eq!(scope.open_windows(), 3);
    }

    #[test]
    fn a_key_is_one_copy_in_its_table_its_index_of_session_ends_and_final_windows() {
        let defs = defs(&[
            ("t", WindowKind::Tumbling { size: 10 }),
            ("s", WindowKind::Session { gap: 5 }),
        ]);
        let acc = Acc::of(Some(1.0));
        let shares = |g: &GroupState| {
            let Tables::Sessions(fixed, tables) = &g.tables else {
                panic!("a group with a session definition keeps sessions in its table");
            };
            let (_, held) = fixed.key(LONG_KEY).expect("in the table");
            let bounds: Vec<&Key> = tables[0].bound_keys().collect();
            assert!(!bounds.is_empty());
            assert!(bounds.iter().all(|k| one_copy(&held, k)));
            held
        };
        // as records add them: two sessions, each with its entry in the index of ends
        let mut g = GroupState::new(&defs, &None);
        for ts in [1, 2, 30] {
            assert!(g.add(LONG_KEY, ts, Some(1.0), None, &mut None));
        }
        shares(&g);
        // as a restore puts them back, sessions first (a blob lists them by window)
        let mut scope = ScopeState::new(None, &defs);
        scope
            .restore(
                0,
                LONG_KEY,
                &[
                    (0, 0, 10, acc, false),
                    (1, 1, 6, acc, false),
                    (0, 10, 20, acc, true),
                ],
            )
            .unwrap();
        let g = scope.groups.get(0).unwrap();
        let held = shares(g);
        let row = g.closed[0].rows.get(0).expect("held");
        assert!(one_copy(&held, row.key()));
    }
}
