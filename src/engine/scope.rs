//! The state of one scope (the instance, or one source partition) by key group. Each group owns
//! its windows per definition and its final windows waiting for their acknowledgement, behind
//! an `Arc`: a snapshot shares the changed groups instead of copying the state, and a group
//! changed while a checkpoint still writes it is copied then (copy on write: one group, never
//! the state). An index of window ends per group tells which groups the watermark closes
//! windows in, so that closing never scans every group.

use std::collections::BTreeMap;
use std::sync::Arc;

use foldhash::{HashMap, HashMapExt};

use super::aggregate::Acc;
use super::group::{DirtyGroups, GroupContent, GroupId};
use super::state::{ClosedWindow, EndChange, Entry, EntryStatus, StateKey, WindowTable};
use super::window::WindowDef;
use super::StateError;
use crate::position::Partition;

/// One key group's state.
#[derive(Debug, Clone)]
pub(crate) struct GroupState {
    /// Open windows, per window definition.
    tables: Vec<WindowTable>,
    /// Final windows not acknowledged by the output yet: end, accumulator, and the epoch they
    /// closed in (see `Engine`), which says which checkpoint releases them. Keyed by window,
    /// start and key (the scope is the group's).
    closed: BTreeMap<ClosedKey, (i64, Acc, u64)>,
    scope: Option<Partition>,
}

/// A final window's identity within its group: window index, start, key.
type ClosedKey = (u16, i64, String);

fn closed_key(id: StateKey) -> ClosedKey {
    (id.window, id.start, id.key)
}

impl GroupState {
    fn new(windows: &[WindowDef], scope: &Option<Partition>) -> Self {
        GroupState {
            tables: windows
                .iter()
                .enumerate()
                .map(|(i, w)| WindowTable::new(i as u16, w.kind, scope.clone()))
                .collect(),
            closed: BTreeMap::new(),
            scope: scope.clone(),
        }
    }

    fn state_key(&self, (window, start, key): &ClosedKey) -> StateKey {
        StateKey {
            partition: self.scope.clone(),
            window: *window,
            start: *start,
            key: key.clone(),
        }
    }

    fn open(&self) -> usize {
        self.tables.iter().map(WindowTable::open_count).sum()
    }

    pub(crate) fn len(&self) -> usize {
        self.open() + self.closed.len()
    }

    /// Every entry, sorted by key.
    pub(crate) fn entries(&self) -> Vec<(StateKey, Entry)> {
        let mut out = Vec::with_capacity(self.len());
        for t in &self.tables {
            t.for_each(|key, end, acc| {
                out.push((
                    key,
                    Entry {
                        status: EntryStatus::Open,
                        end,
                        acc,
                    },
                ))
            });
        }
        out.extend(self.closed.iter().map(|(k, (end, acc, _))| {
            (
                self.state_key(k),
                Entry {
                    status: EntryStatus::Closed,
                    end: *end,
                    acc: *acc,
                },
            )
        }));
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

/// The groups of one scope, the changed ones, and where their windows end.
#[derive(Debug)]
pub(crate) struct ScopeState {
    scope: Option<Partition>,
    windows: Vec<WindowDef>,
    groups: HashMap<u16, Arc<GroupState>>,
    dirty: DirtyGroups,
    /// Ends of fixed windows, with the groups that hold a window ending there.
    fixed_ends: BTreeMap<i64, DirtyGroups>,
    /// Ends of sessions per group, with how many sessions end there.
    session_ends: BTreeMap<(i64, u16), u32>,
    /// Final windows not acknowledged yet, over all groups.
    closed: usize,
    /// Reused for the ends one record reports.
    ends: Vec<EndChange>,
}

impl ScopeState {
    pub(crate) fn new(scope: Option<Partition>, windows: &[WindowDef]) -> Self {
        ScopeState {
            scope,
            windows: windows.to_vec(),
            groups: HashMap::new(),
            dirty: DirtyGroups::default(),
            fixed_ends: BTreeMap::new(),
            session_ends: BTreeMap::new(),
            closed: 0,
            ends: Vec::new(),
        }
    }

    /// The group, created when first needed, for changing (copied first if a snapshot still
    /// shares it).
    fn group_mut(&mut self, group: u16) -> &mut GroupState {
        let (windows, scope) = (&self.windows, &self.scope);
        let shared = self
            .groups
            .entry(group)
            .or_insert_with(|| Arc::new(GroupState::new(windows, scope)));
        Arc::make_mut(shared)
    }

    fn register(&mut self, group: u16, change: EndChange) {
        match change {
            EndChange::Fixed(end) => self.fixed_ends.entry(end).or_default().mark(group),
            EndChange::SessionAdded(end) => {
                *self.session_ends.entry((end, group)).or_default() += 1
            }
            EndChange::SessionRemoved(end) => {
                if let Some(n) = self.session_ends.get_mut(&(end, group)) {
                    *n -= 1;
                    if *n == 0 {
                        self.session_ends.remove(&(end, group));
                    }
                }
            }
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
        let mut ends = std::mem::take(&mut self.ends);
        let g = self.group_mut(group);
        let mut took = false;
        for t in &mut g.tables {
            took |= t.add(key, ts, value, limit, &mut ends);
        }
        if took {
            self.dirty.mark(group);
        }
        for change in ends.drain(..) {
            self.register(group, change);
        }
        self.ends = ends;
        took
    }

    /// Closes every window whose end is at or before `limit`: it leaves its table and waits,
    /// in its group's state and tagged with `epoch`, for its acknowledgement. Appends them to
    /// `out` if given (windows emitted as they close), else only keeps them.
    pub(crate) fn close(
        &mut self,
        limit: i64,
        epoch: u64,
        mut out: Option<&mut Vec<ClosedWindow>>,
    ) {
        let mut due = DirtyGroups::default();
        while let Some(entry) = self.fixed_ends.first_entry() {
            if *entry.key() > limit {
                break;
            }
            for g in entry.remove().take() {
                due.mark(g);
            }
        }
        while let Some((&(end, g), _)) = self.session_ends.first_key_value() {
            if end > limit {
                break;
            }
            self.session_ends.pop_first();
            due.mark(g);
        }
        let mut now = Vec::new();
        for g in due.take() {
            let Some(shared) = self.groups.get_mut(&g) else {
                continue;
            };
            let group = Arc::make_mut(shared);
            for t in &mut group.tables {
                t.close(limit, &mut now);
            }
            if now.is_empty() {
                continue;
            }
            self.closed += now.len();
            self.dirty.mark(g);
            if let Some(out) = out.as_mut() {
                for w in &now {
                    let key = (w.id.window, w.id.start, w.id.key.clone());
                    group.closed.insert(key, (w.end, w.acc, epoch));
                }
                out.append(&mut now);
            } else {
                for w in now.drain(..) {
                    group.closed.insert(closed_key(w.id), (w.end, w.acc, epoch));
                }
            }
        }
    }

    /// Puts back an open entry read from a checkpoint.
    pub(crate) fn restore_open(
        &mut self,
        group: u16,
        id: StateKey,
        entry: Entry,
    ) -> Result<(), StateError> {
        let defined = self.windows.len();
        let table = self
            .group_mut(group)
            .tables
            .get_mut(usize::from(id.window))
            .ok_or(StateError::UnknownWindow {
                window: id.window,
                defined,
            })?;
        let change = table.restore(id.start, id.key, entry.end, entry.acc);
        self.register(group, change);
        Ok(())
    }

    /// Puts back a final window read from a checkpoint.
    pub(crate) fn restore_closed(&mut self, group: u16, id: StateKey, entry: Entry) {
        if self
            .group_mut(group)
            .closed
            .insert(closed_key(id), (entry.end, entry.acc, 0))
            .is_none()
        {
            self.closed += 1;
        }
    }

    /// The output acknowledged final window `id`: it leaves the state.
    pub(crate) fn acknowledge(&mut self, group: u16, id: StateKey) {
        let Some(shared) = self.groups.get_mut(&group) else {
            return;
        };
        let key = closed_key(id);
        if !shared.closed.contains_key(&key) {
            return;
        }
        Arc::make_mut(shared).closed.remove(&key);
        self.closed -= 1;
        self.dirty.mark(group);
    }

    /// Every group changed since the last snapshot (every group holding entries if `full`),
    /// shared, not copied; a group that emptied is listed empty. Groups that emptied are
    /// forgotten afterwards.
    pub(crate) fn snapshot(&mut self, full: bool) -> Vec<GroupContent> {
        let changed = self.dirty.take();
        let mut ids: Vec<u16> = if full {
            self.groups
                .iter()
                .filter(|(_, g)| g.len() > 0)
                .map(|(id, _)| *id)
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
                match self.groups.get(&g).filter(|s| s.len() > 0) {
                    Some(state) => GroupContent::shared(id, state.clone()),
                    None => GroupContent::new(id, Vec::new()),
                }
            })
            .collect();
        self.groups.retain(|_, g| g.len() > 0);
        out
    }

    /// Appends the final windows that closed in an epoch after `after`, up to `upto`
    /// (reading the groups, never copying them).
    pub(crate) fn release(&self, after: u64, upto: u64, out: &mut Vec<ClosedWindow>) {
        let due = |epoch: u64| epoch > after && epoch <= upto;
        let count: usize = self
            .groups
            .values()
            .map(|g| g.closed.values().filter(|(_, _, e)| due(*e)).count())
            .sum();
        out.reserve_exact(count);
        for group in self.groups.values() {
            for (id, (end, acc, epoch)) in &group.closed {
                if due(*epoch) {
                    out.push(ClosedWindow {
                        id: group.state_key(id),
                        end: *end,
                        acc: *acc,
                    });
                }
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
