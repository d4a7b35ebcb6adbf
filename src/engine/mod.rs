//! The window engine: plain Rust, no I/O. Facts go in (records, assignments, checkpoint
//! outcomes, emission acknowledgements); decisions come out (windows to emit, snapshots).

mod aggregate;
mod decode;
mod due;
mod fixed;
pub mod group;
mod restored;
mod scope;
mod slots;
mod state;
mod watermark;
mod window;

use std::collections::BTreeMap;

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use rayon::prelude::*;

pub use group::{GroupContent, GroupId, GroupLayout};
pub use restored::{Counts, Remap, RestoredState, StoredGroup};
pub use scope::Emission;

pub use aggregate::{Acc, AggregateKind};
pub use decode::{Decoder, FieldSource, InvalidReason, Record, TimeSource};
pub use state::{ClosedWindow, Entry, EntryStatus, Key, StateKey};
pub use watermark::PartitionProgress;
pub use window::{hopping_starts, tumbling_start, WindowDef, WindowKind};

use crate::checkpoint_id::CheckpointId;
use crate::event_time::EventTime;
use crate::position::{NextOffset, Partition};
use restored::{build_group, read_group};
use scope::{BuiltGroup, ScopeState};
use watermark::Watermarks;

/// How many decoded records a caller asks [`Engine::prefetch`] for before processing the first
/// of them. Chosen on a prototype (docs/benchmarks.md): 16 against 32 and none over eight
/// rounds, against 8 in three; 32 was within the noise of 16, and holds twice the records.
pub const RECORDS_AHEAD: usize = 16;

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

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "checkpoint holds open windows of window #{window}, but only {defined} windows are configured"
    )]
    UnknownWindow { window: u16, defined: usize },
    #[error(
        "checkpoint holds an open window of window #{window} starting at {start}, which is not a start of that window ({kind})"
    )]
    MisalignedWindow {
        window: u16,
        start: i64,
        kind: String,
    },
    #[error(
        "checkpoint holds open sessions of window #{window} for one key that overlap (one starts at {start}); a key's sessions never overlap"
    )]
    OverlappingSession { window: u16, start: i64 },
    #[error("group {group} of {scope:?} cannot be decoded: {source}")]
    Damaged {
        scope: Option<Partition>,
        group: u16,
        #[source]
        source: group::BlobError,
    },
}

/// Entries a restore's list holds before it is shrunk as it is installed.
const SHRINK_ABOVE: usize = 1 << 16;

/// Stored groups a restore rebuilds at once on every core: enough to keep the cores busy, few
/// enough that their blobs and rebuilt states are a sliver of the state.
const INSTALL_BATCH: usize = 64;

pub struct Engine {
    cfg: EngineConfig,
    /// Windows of instance-scoped state (every partition merged).
    instance: ScopeState,
    /// Windows of partition-scoped state, per source partition.
    scoped: HashMap<Partition, ScopeState>,
    marks: Watermarks,
    /// Exactly-once release, by epochs: a window closing is tagged with the current epoch
    /// (windows kept in their group's state); snapshot `id` ends an epoch and holds every
    /// window of it and of the epochs before; when `id` is durable, the windows of the epochs
    /// after `released` up to its own are handed out, read from the groups (no second copy of
    /// final windows waits anywhere). Windows restored, or emitted at once
    /// (at-least-once), have epoch 0.
    epoch: u64,
    /// The epoch each snapshot in flight ended.
    snapshots: BTreeMap<CheckpointId, u64>,
    /// Every window of this epoch and before has been handed out.
    released: u64,
    emit_queue: Emission,
    records_since_snapshot: u64,
    /// A position was moved since the last snapshot ([`Engine::move_position`]).
    positions_moved: bool,
    /// Records stamped after this are invalid ([`InvalidReason::FutureTimestamp`]): the wall
    /// clock plus `watermark.max_future_skew`, as the loop last set it.
    not_after: Option<i64>,
}

impl Engine {
    pub fn new(cfg: EngineConfig) -> Self {
        let instance = ScopeState::new(None, &cfg.windows);
        let marks = Watermarks::new(cfg.max_out_of_orderness);
        Engine {
            cfg,
            instance,
            scoped: HashMap::new(),
            marks,
            epoch: 1,
            snapshots: BTreeMap::new(),
            released: 0,
            emit_queue: Emission::default(),
            records_since_snapshot: 0,
            positions_moved: false,
            not_after: None,
        }
    }

    /// From now on, a record stamped after `t` (epoch milliseconds; the wall clock plus the
    /// allowed skew) is invalid and moves no watermark: one record from the far future would
    /// otherwise close every open window and make every later record late. `None`: no bound.
    pub fn set_not_after(&mut self, t: Option<i64>) {
        self.not_after = t;
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
                    idle: false,
                },
            );
        }
        engine.marks.set_current(state.watermark);
        // installed in order from a reversed list that shrinks as it goes (in place: the
        // allocator returns the tail), so that the decoded entries and the engine built from
        // them are never both held whole
        let mut entries = state.entries;
        entries.reverse();
        while let Some((id, entry)) = entries.pop() {
            engine.install_entry(id, entry)?;
            if entries.capacity() > SHRINK_ABOVE && entries.len() < entries.capacity() / 8 * 7 {
                entries.shrink_to_fit();
            }
        }
        // stored groups are rebuilt on every core a batch at a time, taken from the end of a
        // reversed list (nothing moves), each blob dropped once its group is in
        let mut groups = state.groups;
        groups.reverse();
        while !groups.is_empty() {
            let mut batch = groups.split_off(groups.len().saturating_sub(INSTALL_BATCH));
            batch.reverse();
            engine.install_groups(batch, state.remap.as_ref())?;
        }
        engine.instance.queue_restored(&mut engine.emit_queue);
        for state in engine.scoped.values() {
            state.queue_restored(&mut engine.emit_queue);
        }
        Ok(engine)
    }

    /// Puts back the entries of stored groups: each group the engine does not hold yet is
    /// rebuilt apart, on every core (rayon's threads), then put in whole, in order; a group it
    /// holds already (entries installed before it, or a group listed twice) goes in key by key.
    fn install_groups(
        &mut self,
        batch: Vec<StoredGroup>,
        remap: Option<&Remap>,
    ) -> Result<(), StateError> {
        let mut seen = HashSet::new();
        let apart: Vec<bool> = batch
            .iter()
            .map(|g| seen.insert((&g.id.scope, g.id.group)) && !self.holds(&g.id.scope, g.id.group))
            .collect();
        let (layout, windows) = (self.cfg.groups, &self.cfg.windows);
        let built: Vec<Option<Result<BuiltGroup, StateError>>> = batch
            .par_iter()
            .zip(apart.par_iter())
            .map(|(g, &apart)| apart.then(|| build_group(layout, windows, g, remap)))
            .collect();
        for (g, built) in batch.into_iter().zip(built) {
            match built {
                Some(built) => self.stores_of(g.id.scope.as_ref()).put_built(built?),
                None => self.install_group(&g, remap)?,
            }
        }
        Ok(())
    }

    /// Whether the engine holds group `group` of `scope`.
    fn holds(&self, scope: &Option<Partition>, group: u16) -> bool {
        match scope {
            None => self.instance.holds(group),
            Some(p) => self.scoped.get(p).is_some_and(|s| s.holds(group)),
        }
    }

    /// Puts back the entries of a stored group key by key (`remap` re-numbers their windows
    /// or leaves them out).
    fn install_group(&mut self, g: &StoredGroup, remap: Option<&Remap>) -> Result<(), StateError> {
        let layout = self.cfg.groups;
        let store = self.stores_of(g.id.scope.as_ref());
        let mut failed = None;
        read_group(layout, g, remap, |key, entries| {
            if let Err(err) = store.restore(g.id.group, key, entries) {
                failed.get_or_insert(err);
            }
        })?;
        failed.map_or(Ok(()), Err)
    }

    /// Puts back one entry read from a checkpoint or the changelog. Final windows need no
    /// definition: they are kept as they are (also those of windows no longer configured,
    /// under their old name), to be queued for emission by `queue_restored`.
    fn install_entry(&mut self, id: StateKey, entry: Entry) -> Result<(), StateError> {
        let group = self.cfg.groups.group_of(&id.key);
        let closed = entry.status == EntryStatus::Closed;
        let e = (id.window, id.start, entry.end, entry.acc, closed);
        // final windows are queued for emission once every entry is in (`queue_restored`),
        // read from the group that holds them (not a second copy)
        self.stores_of(id.partition.as_ref())
            .restore(group, &id.key, &[e])
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
                idle: false,
            },
        );
        for (id, entry) in entries {
            self.install_entry(id, entry)?;
        }
        if let Some(state) = self.scoped.get(p) {
            state.queue_restored(&mut self.emit_queue);
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
        self.emit_queue
            .retain_scopes(|scope| !scope.as_ref().is_some_and(|p| partitions.contains(p)));
    }

    pub fn revoke(&mut self, partitions: &[Partition]) {
        for p in partitions {
            self.marks.revoke(p);
        }
        self.advance();
    }

    /// Reading `partition` goes on at `next`, forward or back (its held position was out of
    /// range and `kafka.on_offset_out_of_range` moved it); the next checkpoint holds it.
    pub fn move_position(&mut self, partition: &Partition, next: NextOffset) {
        self.marks.move_to(partition, next);
        self.positions_moved = true;
    }

    /// The consumer reached the end of `partition`.
    pub fn partition_eof(&mut self, partition: &Partition) {
        self.marks.eof(partition);
        self.advance();
    }

    /// Marks `partition` idle (caught up and quiet): it holds the service watermark back no
    /// more, until its next record; windows the watermark passes then close.
    pub fn set_idle(&mut self, partition: &Partition, idle: bool) {
        if self.marks.set_idle(partition, idle) {
            self.advance();
        }
    }

    /// With partition-scoped state: moves idle `partition`'s event time up to `now_ms` (the
    /// wall clock), as a record would, and closes the windows of its scope that passes
    /// (`watermark.idle_advance: wall_clock`).
    pub fn advance_idle(&mut self, partition: &Partition, now_ms: i64) {
        let idle = self.marks.get(partition).is_some_and(|p| p.idle);
        if !idle || !self.cfg.partition_scoped {
            return;
        }
        if self.marks.raise(partition, EventTime(now_ms)) {
            self.close_partition(partition);
            self.marks.advance();
        }
    }

    /// The progress the engine holds for `partition`.
    pub fn progress_of(&self, partition: &Partition) -> Option<&PartitionProgress> {
        self.marks.get(partition)
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
        self.all_scopes().map(ScopeState::open_windows).sum()
    }

    /// The windows of `scope` (`None`: instance scope), created when first needed.
    fn stores_of(&mut self, scope: Option<&Partition>) -> &mut ScopeState {
        let Some(p) = scope else {
            return &mut self.instance;
        };
        if !self.scoped.contains_key(p) {
            let stores = ScopeState::new(Some(p.clone()), &self.cfg.windows);
            self.scoped.insert(p.clone(), stores);
        }
        match self.scoped.get_mut(p) {
            Some(stores) => stores,
            // inserted just above
            None => &mut self.instance,
        }
    }

    fn all_scopes(&self) -> impl Iterator<Item = &ScopeState> {
        std::iter::once(&self.instance).chain(self.scoped.values())
    }

    /// Final windows not yet acknowledged by the output topic.
    pub fn pending_emissions(&self) -> usize {
        self.all_scopes().map(ScopeState::pending).sum()
    }

    /// Asks the processor to bring into its cache what processing a record of `key` from
    /// `partition` will read (the key's entry in its group's table, its windows and sessions),
    /// without waiting for it. A caller holding several decoded records calls this for each
    /// (up to [`RECORDS_AHEAD`]) before processing the first: their cache misses, which
    /// [`Engine::process`] would otherwise wait for one record after another, then overlap. A
    /// hint: it changes nothing, and a record processed without it is processed the same.
    pub fn prefetch(&self, partition: &Partition, key: &str) {
        let scope = if self.cfg.partition_scoped {
            match self.scoped.get(partition) {
                Some(scope) => scope,
                None => return,
            }
        } else {
            &self.instance
        };
        scope.prefetch(key, self.cfg.groups.group_of(key));
    }

    /// [`Engine::prefetch`] for each decoded record of a batch (one that failed to decode
    /// reads nothing), in order.
    pub fn prefetch_records<'r>(
        &self,
        records: impl IntoIterator<Item = (&'r Partition, &'r Result<Record<'r>, InvalidReason>)>,
    ) {
        for (partition, record) in records {
            if let Ok(r) = record {
                self.prefetch(partition, &r.key);
            }
        }
    }

    /// Processes the message at `offset` of `partition`.
    pub fn process(
        &mut self,
        partition: &Partition,
        offset: i64,
        record: Result<Record, InvalidReason>,
    ) -> Outcome {
        let record = match record {
            Ok(r) if self.not_after.is_some_and(|t| r.ts.millis() > t) => {
                Err(InvalidReason::FutureTimestamp)
            }
            other => other,
        };
        // lateness is judged against the watermark before this record moves it: the
        // partition's own with partition-scoped state (so results do not depend on which
        // partitions an instance holds), else the service's
        let scope = self.cfg.partition_scoped.then_some(partition);
        let limit = match scope {
            Some(p) => self.partition_limit(p),
            None => self.limit(),
        };
        // one lookup of the partition says whether the record is a duplicate and, if not,
        // records it (the watermark itself moves only in `advance`, after the record is in)
        let ts = record.as_ref().ok().map(|r| r.ts);
        let Some(moved) = self.marks.admit(partition, offset, ts) else {
            return Outcome::Duplicate;
        };
        self.records_since_snapshot += 1;
        let record = match record {
            Ok(r) => r,
            Err(reason) => return Outcome::Invalid(reason),
        };
        let group = self.cfg.groups.group_of(&record.key);
        let took =
            self.stores_of(scope)
                .add(&record.key, group, record.ts.millis(), record.value, limit);
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
        let epoch = self.closing_epoch();
        let out = (!self.cfg.hold_until_checkpoint).then_some(&mut self.emit_queue);
        if let Some(state) = self.scoped.get_mut(p) {
            state.close(limit, epoch, out);
        }
    }

    fn advance(&mut self) {
        // the service watermark is kept (and reported) in both scopes
        if self.marks.advance().is_none() || self.cfg.partition_scoped {
            return;
        }
        let Some(limit) = self.limit() else { return };
        let epoch = self.closing_epoch();
        // windows just closed stay in their group's state until acknowledged, so that a crash
        // before delivery re-sends them; they are emitted now, or under exactly-once held
        // until a durable checkpoint holds them
        let mut out = (!self.cfg.hold_until_checkpoint).then_some(&mut self.emit_queue);
        self.instance.close(limit, epoch, out.as_deref_mut());
        for state in self.scoped.values_mut() {
            state.close(limit, epoch, out.as_deref_mut());
        }
    }

    /// The epoch windows closing now are tagged with.
    fn closing_epoch(&self) -> u64 {
        if self.cfg.hold_until_checkpoint {
            self.epoch
        } else {
            0
        }
    }

    /// Final windows that may be emitted now. In exactly-once mode these are windows whose
    /// closing checkpoint is durable; otherwise every window as soon as it closes.
    pub fn take_emittable(&mut self) -> Vec<ClosedWindow> {
        self.take_emission().into_windows().collect()
    }

    /// [`Engine::take_emittable`], read from the state as the output reaches each window.
    pub fn take_emission(&mut self) -> Emission {
        std::mem::take(&mut self.emit_queue)
    }

    /// Snapshot for checkpoint `id`. Cheap: proportional to what changed since the previous
    /// snapshot unless `full`.
    pub fn snapshot(&mut self, id: CheckpointId, full: bool) -> StateDelta {
        self.snapshots.insert(id, self.epoch);
        self.epoch += 1;
        let mut groups = self.instance.snapshot(full);
        for state in self.scoped.values_mut() {
            groups.extend(state.snapshot(full));
        }
        // every id once: an unstable sort orders them as a stable one would, without the stable
        // sort's scratch copy of the list (a quarter of a megabyte of fresh pages at 4,096
        // groups, on the loop, at every snapshot)
        groups.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        let entries = (self.open_windows() + self.pending_emissions()) as u64;
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
        self.positions_moved = false;
        StateDelta {
            full,
            partitions,
            watermark: self.marks.current(),
            groups,
            entries,
            records,
        }
    }

    /// Checkpoint `id` is durable: windows it closed may now be emitted.
    pub fn checkpoint_completed(&mut self, id: CheckpointId) {
        let later = self.snapshots.split_off(&id.next());
        let done = std::mem::replace(&mut self.snapshots, later);
        let Some(upto) = done.into_values().max().filter(|e| *e > self.released) else {
            return;
        };
        let after = self.released;
        self.instance.release(after, upto, &mut self.emit_queue);
        for state in self.scoped.values() {
            state.release(after, upto, &mut self.emit_queue);
        }
        self.released = upto;
    }

    /// Checkpoint `id` failed: windows waiting for it wait for the next one.
    pub fn checkpoint_failed(&mut self, id: CheckpointId) {
        // its windows stay in their groups; the next snapshot holds them, and its durability
        // releases them
        self.snapshots.remove(&id);
    }

    /// The output acknowledged these windows; they leave the state at the next checkpoint.
    pub fn emitted(&mut self, ids: impl IntoIterator<Item = StateKey>) {
        for id in ids {
            let group = self.cfg.groups.group_of(&id.key);
            let state = match &id.partition {
                None => Some(&mut self.instance),
                Some(p) => self.scoped.get_mut(p),
            };
            if let Some(state) = state {
                state.acknowledge(group, id);
            }
        }
    }

    /// Whether anything changed since the last snapshot.
    pub fn has_changes(&self) -> bool {
        self.records_since_snapshot > 0
            || self.positions_moved
            || self.all_scopes().any(ScopeState::has_changes)
    }
}

#[cfg(test)]
mod tests;
