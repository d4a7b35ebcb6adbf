//! The window engine: plain Rust, no I/O. Facts go in (records, assignments, checkpoint
//! outcomes, emission acknowledgements); decisions come out (windows to emit, snapshots).

mod aggregate;
mod decode;
pub mod group;
mod state;
mod watermark;
mod window;

use std::collections::{BTreeMap, HashMap, HashSet};

pub use group::{GroupContent, GroupId, GroupLayout};

pub use aggregate::{Acc, AggregateKind};
pub use decode::{Decoder, FieldSource, InvalidReason, Record, TimeSource};
pub use state::{ClosedWindow, Entry, EntryStatus, StateKey};
pub use watermark::PartitionProgress;
pub use window::{hopping_starts, tumbling_start, WindowDef, WindowKind};

use crate::checkpoint_id::CheckpointId;
use crate::event_time::EventTime;
use crate::position::{NextOffset, Partition};
use group::DirtyGroups;
use state::WindowTable;
use watermark::Watermarks;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub windows: Vec<WindowDef>,
    pub max_out_of_orderness: i64,
    pub allowed_lateness: i64,
    /// Exactly-once: final windows wait in the checkpoint until it is durable.
    pub hold_until_checkpoint: bool,
    /// Windows per source partition (`state.scope: partition`) instead of per key across every
    /// partition; what lets a partition's state move to another instance.
    pub partition_scoped: bool,
    /// How keys map to groups: the store's, fixed for its life.
    pub groups: GroupLayout,
}

/// What happened to one consumed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    /// Every window of the record was already final: counted and dropped.
    Late,
    Invalid(InvalidReason),
    /// The offset was already consumed (a redelivery): ignored.
    Duplicate,
}

/// Position of one partition as stored in a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartitionState {
    pub partition: Partition,
    pub next: Option<NextOffset>,
    pub max_ts: Option<EventTime>,
}

/// The part of a checkpoint the engine produces. `full` snapshots carry every group that holds
/// entries; others carry the groups changed since the previous snapshot, each whole (empty
/// when it emptied).
#[derive(Debug, Clone, PartialEq)]
pub struct StateDelta {
    pub full: bool,
    pub partitions: Vec<PartitionState>,
    pub watermark: Option<EventTime>,
    /// Sorted by group id.
    pub groups: Vec<GroupContent>,
    /// Entries the whole state holds after this snapshot (checked on restore).
    pub entries: u64,
    pub records: u64,
}

/// The state the engine restarts from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RestoredState {
    pub partitions: Vec<PartitionState>,
    pub watermark: Option<EventTime>,
    pub entries: Vec<(StateKey, Entry)>,
    /// Bytes the state occupies in the store it was read from (0 when not read from one).
    pub stored_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "checkpoint holds open windows of window #{window}, but only {defined} windows are configured"
    )]
    UnknownWindow { window: u16, defined: usize },
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    end: i64,
    acc: crate::engine::Acc,
    /// The checkpoint whose durability releases this window for emission.
    awaiting: Option<CheckpointId>,
    handed_out: bool,
}

/// The open windows of one state scope, with the groups changed since the last snapshot.
#[derive(Debug)]
struct ScopeState {
    tables: Vec<WindowTable>,
    dirty: DirtyGroups,
}

pub struct Engine {
    cfg: EngineConfig,
    /// Windows of instance-scoped state (every partition merged).
    instance: ScopeState,
    /// Windows of partition-scoped state, per source partition.
    scoped: HashMap<Partition, ScopeState>,
    marks: Watermarks,
    outbox: BTreeMap<StateKey, Pending>,
    emit_queue: Vec<ClosedWindow>,
    records_since_snapshot: u64,
}

impl Engine {
    pub fn new(cfg: EngineConfig) -> Self {
        let instance = new_stores(&cfg, None);
        let marks = Watermarks::new(cfg.max_out_of_orderness);
        Engine {
            cfg,
            instance,
            scoped: HashMap::new(),
            marks,
            outbox: BTreeMap::new(),
            emit_queue: Vec::new(),
            records_since_snapshot: 0,
        }
    }

    /// Rebuilds the engine from a checkpoint. Windows that the checkpoint holds as closed were
    /// durable there, so they are queued for emission at once.
    pub fn from_state(cfg: EngineConfig, state: RestoredState) -> Result<Self, StateError> {
        let mut engine = Engine::new(cfg);
        for ps in state.partitions {
            engine.marks.insert(
                ps.partition,
                PartitionProgress {
                    next: ps.next,
                    max_ts: ps.max_ts,
                    assigned: false,
                    caught_up_empty: false,
                },
            );
        }
        engine.marks.set_current(state.watermark);
        for (id, entry) in state.entries {
            engine.install_entry(id, entry)?;
        }
        Ok(engine)
    }

    /// Puts back one entry read from a checkpoint or the changelog. Final windows need no
    /// definition: they are queued for emission as they are (also those of windows no longer
    /// configured, under their old name).
    fn install_entry(&mut self, id: StateKey, entry: Entry) -> Result<(), StateError> {
        match entry.status {
            EntryStatus::Open => {
                let defined = self.cfg.windows.len();
                let store = self
                    .stores_of(id.partition.as_ref())
                    .tables
                    .get_mut(usize::from(id.window))
                    .ok_or(StateError::UnknownWindow {
                        window: id.window,
                        defined,
                    })?;
                store.restore(id.start, id.key, entry.end, entry.acc);
            }
            EntryStatus::Closed => {
                self.emit_queue.push(ClosedWindow {
                    id: id.clone(),
                    end: entry.end,
                    acc: entry.acc,
                });
                self.outbox.insert(
                    id,
                    Pending {
                        end: entry.end,
                        acc: entry.acc,
                        awaiting: None,
                        handed_out: true,
                    },
                );
            }
        }
        Ok(())
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub fn assign(&mut self, partitions: &[Partition]) {
        for p in partitions {
            self.marks.assign(p);
        }
        self.advance();
    }

    /// Replaces partition `p`'s state with `entries` at `position` (partition scope: a state
    /// restored from the changelog). Final windows among them are queued for emission again.
    pub fn install_partition(
        &mut self,
        position: &PartitionState,
        entries: impl IntoIterator<Item = (StateKey, Entry)>,
    ) -> Result<(), StateError> {
        let p = &position.partition;
        self.drop_partitions(std::slice::from_ref(p));
        self.marks.insert(
            p.clone(),
            PartitionProgress {
                next: position.next,
                max_ts: position.max_ts,
                assigned: false,
                caught_up_empty: false,
            },
        );
        for (id, entry) in entries {
            self.install_entry(id, entry)?;
        }
        Ok(())
    }

    /// Forgets partitions whose state now lives elsewhere (partition scope): their windows,
    /// final windows not yet emitted, and progress. The next checkpoint must be a full one.
    pub fn drop_partitions(&mut self, partitions: &[Partition]) {
        for p in partitions {
            self.scoped.remove(p);
            self.marks.remove(p);
        }
        let gone = |k: &StateKey| k.partition.as_ref().is_some_and(|p| partitions.contains(p));
        self.outbox.retain(|k, _| !gone(k));
        self.emit_queue.retain(|w| !gone(&w.id));
    }

    pub fn revoke(&mut self, partitions: &[Partition]) {
        for p in partitions {
            self.marks.revoke(p);
        }
        self.advance();
    }

    /// The consumer reached the end of `partition`.
    pub fn partition_eof(&mut self, partition: &Partition) {
        self.marks.eof(partition);
        self.advance();
    }

    /// Where reading `partition` must continue, if the engine has consumed from it.
    pub fn position(&self, partition: &Partition) -> Option<NextOffset> {
        self.marks.get(partition).and_then(|p| p.next)
    }

    pub fn progress(&self) -> impl Iterator<Item = (&Partition, &PartitionProgress)> {
        self.marks.iter()
    }

    pub fn watermark(&self) -> Option<EventTime> {
        self.marks.current()
    }

    pub fn open_windows(&self) -> usize {
        self.all_stores().map(WindowTable::open_count).sum()
    }

    /// The windows of `scope` (`None`: instance scope), created when first needed.
    fn stores_of(&mut self, scope: Option<&Partition>) -> &mut ScopeState {
        let Some(p) = scope else {
            return &mut self.instance;
        };
        if !self.scoped.contains_key(p) {
            let stores = new_stores(&self.cfg, Some(p.clone()));
            self.scoped.insert(p.clone(), stores);
        }
        match self.scoped.get_mut(p) {
            Some(stores) => stores,
            // inserted just above
            None => &mut self.instance,
        }
    }

    fn all_stores(&self) -> impl Iterator<Item = &WindowTable> {
        self.instance
            .tables
            .iter()
            .chain(self.scoped.values().flat_map(|s| &s.tables))
    }

    fn all_stores_mut(&mut self) -> impl Iterator<Item = &mut WindowTable> {
        self.instance
            .tables
            .iter_mut()
            .chain(self.scoped.values_mut().flat_map(|s| &mut s.tables))
    }

    /// Marks the group of `id` changed.
    fn mark(&mut self, id: &StateKey) {
        let group = self.cfg.groups.group_of(&id.key);
        self.stores_of(id.partition.as_ref()).dirty.mark(group);
    }

    /// Final windows not yet acknowledged by the output topic.
    pub fn pending_emissions(&self) -> usize {
        self.outbox.len()
    }

    /// Processes the message at `offset` of `partition`.
    pub fn process(
        &mut self,
        partition: &Partition,
        offset: i64,
        record: Result<Record, InvalidReason>,
    ) -> Outcome {
        if self
            .position(partition)
            .is_some_and(|next| next.covers(offset))
        {
            return Outcome::Duplicate;
        }
        self.records_since_snapshot += 1;
        let record = match record {
            Ok(r) => r,
            Err(reason) => {
                self.marks.observe(partition, offset, None);
                return Outcome::Invalid(reason);
            }
        };
        // lateness is judged against the watermark before this record moves it: the
        // partition's own with partition-scoped state (so results do not depend on which
        // partitions an instance holds), else the service's
        let scope = self.cfg.partition_scoped.then_some(partition);
        let limit = match scope {
            Some(p) => self.partition_limit(p),
            None => self.limit(),
        };
        let mut took = false;
        let group = self.cfg.groups.group_of(&record.key);
        let state = self.stores_of(scope);
        for store in &mut state.tables {
            took |= store.add(
                &record.key,
                group,
                record.ts.millis(),
                record.value,
                limit,
                &mut state.dirty,
            );
        }
        let moved = self.marks.observe(partition, offset, Some(record.ts));
        if self.cfg.partition_scoped {
            self.close_partition(partition);
            // the service watermark is still reported (and alerted on) in partition scope
            if moved {
                self.marks.advance();
            }
        } else if moved {
            self.advance();
        }
        if took {
            Outcome::Accepted
        } else {
            Outcome::Late
        }
    }

    fn limit(&self) -> Option<i64> {
        self.marks
            .current()
            .map(|wm| wm.minus(self.cfg.allowed_lateness).millis())
    }

    /// Partition `p`'s own limit: its highest event time, less the allowed disorder and
    /// lateness.
    fn partition_limit(&self, p: &Partition) -> Option<i64> {
        self.marks.get(p).and_then(|pr| pr.max_ts).map(|t| {
            t.minus(self.cfg.max_out_of_orderness)
                .minus(self.cfg.allowed_lateness)
                .millis()
        })
    }

    /// Closes the windows of partition `p`'s scope that its own watermark has passed.
    fn close_partition(&mut self, p: &Partition) {
        let Some(limit) = self.partition_limit(p) else {
            return;
        };
        let mut closed = Vec::new();
        if let Some(state) = self.scoped.get_mut(p) {
            for store in &mut state.tables {
                store.close(limit, &mut closed);
            }
        }
        self.finalize(closed);
    }

    fn advance(&mut self) {
        // the service watermark is kept (and reported) in both scopes
        if self.marks.advance().is_none() || self.cfg.partition_scoped {
            return;
        }
        let Some(limit) = self.limit() else { return };
        let mut closed = Vec::new();
        for store in self.all_stores_mut() {
            store.close(limit, &mut closed);
        }
        self.finalize(closed);
    }

    fn finalize(&mut self, closed: Vec<ClosedWindow>) {
        for window in closed {
            self.mark(&window.id);
            // a final window stays in the state until the output acknowledges it, so a crash
            // before delivery re-sends it; exactly-once additionally waits for a durable
            // checkpoint before sending
            let send_now = !self.cfg.hold_until_checkpoint;
            self.outbox.insert(
                window.id.clone(),
                Pending {
                    end: window.end,
                    acc: window.acc,
                    awaiting: None,
                    handed_out: send_now,
                },
            );
            if send_now {
                self.emit_queue.push(window);
            }
        }
    }

    /// Final windows that may be emitted now. In exactly-once mode these are windows whose
    /// closing checkpoint is durable; otherwise every window as soon as it closes.
    pub fn take_emittable(&mut self) -> Vec<ClosedWindow> {
        std::mem::take(&mut self.emit_queue)
    }

    /// Snapshot for checkpoint `id`. Cheap: proportional to what changed since the previous
    /// snapshot unless `full`.
    pub fn snapshot(&mut self, id: CheckpointId, full: bool) -> StateDelta {
        for pending in self.outbox.values_mut() {
            if !pending.handed_out && pending.awaiting.is_none() {
                pending.awaiting = Some(id);
            }
        }
        let groups = self.changed_groups(full);
        let entries = (self.open_windows() + self.outbox.len()) as u64;
        let mut partitions: Vec<PartitionState> = self
            .marks
            .iter()
            .map(|(p, progress)| PartitionState {
                partition: p.clone(),
                next: progress.next,
                max_ts: progress.max_ts,
            })
            .collect();
        partitions.sort_by(|a, b| a.partition.cmp(&b.partition));
        let records = std::mem::take(&mut self.records_since_snapshot);
        StateDelta {
            full,
            partitions,
            watermark: self.marks.current(),
            groups,
            entries,
            records,
        }
    }

    /// The whole content of every group changed since the last snapshot (every group holding
    /// entries if `full`), sorted by group id; none is marked changed afterwards.
    fn changed_groups(&mut self, full: bool) -> Vec<GroupContent> {
        let mut wanted: HashMap<Option<Partition>, HashSet<u16>> = HashMap::new();
        let mut any = false;
        let scopes = std::iter::once((None, &mut self.instance))
            .chain(self.scoped.iter_mut().map(|(p, s)| (Some(p.clone()), s)));
        for (scope, state) in scopes {
            let changed = state.dirty.take();
            any |= !changed.is_empty();
            if !full && !changed.is_empty() {
                wanted.insert(scope, changed.into_iter().collect());
            }
        }
        if !full && !any {
            return Vec::new();
        }
        let layout = self.cfg.groups;
        let mut out: BTreeMap<GroupId, Vec<(StateKey, Entry)>> = BTreeMap::new();
        // every changed group is listed, also one that emptied
        for (scope, groups) in &wanted {
            for g in groups {
                out.entry(GroupId {
                    aggregation: 0,
                    scope: scope.clone(),
                    group: *g,
                })
                .or_default();
            }
        }
        let mut take = |key: StateKey, entry: Entry| {
            let group = layout.group_of(&key.key);
            if !full
                && !wanted
                    .get(&key.partition)
                    .is_some_and(|groups| groups.contains(&group))
            {
                return;
            }
            let id = GroupId {
                aggregation: 0,
                scope: key.partition.clone(),
                group,
            };
            out.entry(id).or_default().push((key, entry));
        };
        for store in self.all_stores() {
            store.for_each(|key, end, acc| {
                take(
                    key,
                    Entry {
                        status: EntryStatus::Open,
                        end,
                        acc,
                    },
                )
            });
        }
        for (key, p) in &self.outbox {
            take(key.clone(), closed_entry(p));
        }
        out.into_iter()
            .map(|(id, mut entries)| {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                GroupContent { id, entries }
            })
            .collect()
    }

    /// Checkpoint `id` is durable: windows it closed may now be emitted.
    pub fn checkpoint_completed(&mut self, id: CheckpointId) {
        for (key, p) in self.outbox.iter_mut() {
            if !p.handed_out && p.awaiting.is_some_and(|a| a <= id) {
                p.handed_out = true;
                self.emit_queue.push(ClosedWindow {
                    id: key.clone(),
                    end: p.end,
                    acc: p.acc,
                });
            }
        }
    }

    /// Checkpoint `id` failed: windows waiting for it wait for the next one.
    pub fn checkpoint_failed(&mut self, id: CheckpointId) {
        for p in self.outbox.values_mut() {
            if !p.handed_out && p.awaiting == Some(id) {
                p.awaiting = None;
            }
        }
    }

    /// The output topic acknowledged these windows; they leave the state at the next checkpoint.
    pub fn emitted(&mut self, ids: impl IntoIterator<Item = StateKey>) {
        for id in ids {
            if self.outbox.remove(&id).is_some() {
                self.mark(&id);
            }
        }
    }

    /// Whether anything changed since the last snapshot.
    pub fn has_changes(&self) -> bool {
        self.records_since_snapshot > 0
            || !self.instance.dirty.is_empty()
            || self.scoped.values().any(|s| !s.dirty.is_empty())
    }
}

fn new_stores(cfg: &EngineConfig, scope: Option<Partition>) -> ScopeState {
    ScopeState {
        tables: cfg
            .windows
            .iter()
            .enumerate()
            .map(|(i, w)| WindowTable::new(i as u16, w.kind, scope.clone()))
            .collect(),
        dirty: DirtyGroups::default(),
    }
}

fn closed_entry(p: &Pending) -> Entry {
    Entry {
        status: EntryStatus::Closed,
        end: p.end,
        acc: p.acc,
    }
}

#[cfg(test)]
mod tests;
