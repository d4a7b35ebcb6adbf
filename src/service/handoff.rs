//! The hand-off: the partitions this instance holds and how they move. On assignment, a
//! partition's state is restored before its first record (from the changelog when that holds
//! a newer state than this instance); on revocation, it is checkpointed and published before
//! the partition is released; every durable checkpoint publishes what it changed per
//! partition. Owns the assignment, the releases on their way, and the changelog link.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use prometheus::IntGauge;
use tokio::sync::{mpsc, oneshot};

use super::coordinator::Coordinator;
use super::edge::{Assignments, ChangelogIo};
use super::releases::{stale, Releases};
use crate::board::StatusBoard;
use crate::changelog::kafka::{Batch, ChangelogError, PublishFailure, ReadProgress};
use crate::changelog::plan::{plan, Ledger};
use crate::changelog::protocol::Committed;
use crate::checkpoint::Checkpoint;
use crate::checkpoint_id::CheckpointId;
use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::position::{NextOffset, Partition};

/// How often `/readyz` text follows a changelog restore's progress (the metrics follow every
/// record).
const READY_TEXT_EVERY: Duration = Duration::from_millis(200);

/// This instance's link to the changelog topic.
pub(crate) struct Changelog {
    pub io: Arc<dyn ChangelogIo>,
    pub ledger: Ledger,
}

impl Changelog {
    /// A random id per process start, never reused: tags this run's publications.
    pub(crate) fn run_id() -> u64 {
        let ms = crate::clock::epoch_ms().max(0) as u64;
        (ms << 20) ^ u64::from(std::process::id())
    }
}

/// What a changelog replay found: each partition's committed state, and how far the read
/// went per partition.
type Replayed = (
    HashMap<Partition, Committed>,
    HashMap<Partition, ReadProgress>,
);

/// A finished changelog replay of an assignment's partitions, handed back to the loop.
pub(crate) struct Restored {
    /// Which replay this is (a replay given up and started again answers too).
    generation: u64,
    partitions: Vec<Partition>,
    read: anyhow::Result<Replayed>,
    duration: Duration,
}

/// A changelog replay in flight.
struct Restoring {
    generation: u64,
    partitions: Vec<Partition>,
    /// The replay is done and its state installed; the partitions wait to be read
    /// ([`Handoff::finish_reading`]).
    installed: bool,
    cancel: Arc<AtomicBool>,
}

/// One changelog replay of an assignment's partitions, run off the loop.
struct Replay {
    io: Arc<dyn ChangelogIo>,
    group: String,
    partitions: Vec<Partition>,
    board: Arc<StatusBoard>,
    metrics: Arc<Metrics>,
    cancel: Arc<AtomicBool>,
}

impl Replay {
    /// Replays the changelog of the partitions (one reader for all), retrying a failed or
    /// stalled read a few times before giving up (the service then stops rather than restore
    /// an older state than published).
    async fn run(&self) -> anyhow::Result<Replayed> {
        let mut backoff = Duration::from_secs(1);
        let mut attempt = 1;
        loop {
            let board = self.board.clone();
            let metrics = self.metrics.clone();
            let io = self.io.clone();
            let cancel = self.cancel.clone();
            let (sources, group) = (self.partitions.clone(), self.group.clone());
            let result = tokio::task::spawn_blocking(move || {
                // called per changelog record: gauge handles are looked up once per partition and
                // the readiness text is rewritten at most every READY_TEXT_EVERY
                let mut seen: HashMap<Partition, (IntGauge, IntGauge, ReadProgress)> =
                    HashMap::new();
                let mut text_at: Option<Instant> = None;
                let mut progress = |p: &Partition, now: ReadProgress| {
                    // a replay given up leaves its gauges to the one that follows
                    if cancel.load(Ordering::Relaxed) {
                        return;
                    }
                    let (left, bytes, last) = seen.entry(p.clone()).or_insert_with(|| {
                        let label = p.to_string();
                        (
                            metrics
                                .changelog_restore_remaining
                                .with_label_values(&[label.as_str()]),
                            metrics
                                .changelog_restore_read_bytes
                                .with_label_values(&[label.as_str()]),
                            ReadProgress::default(),
                        )
                    });
                    left.set(now.records_left);
                    bytes.set(now.bytes_read as i64);
                    *last = now;
                    if now.records_left > 0
                        && text_at.is_none_or(|t| t.elapsed() >= READY_TEXT_EVERY)
                    {
                        text_at = Some(Instant::now());
                        board.set_ready(
                            false,
                            &format!(
                                "restoring {p} from the changelog: {} records left, {} bytes read",
                                now.records_left, now.bytes_read
                            ),
                        );
                    }
                };
                let states = io.read(&group, &sources, &mut progress, &cancel);
                let last = seen.into_iter().map(|(p, (_, _, r))| (p, r)).collect();
                states.map(|states| (states, last))
            })
            .await
            .context("changelog reader task")?;
            match result {
                Ok(read) => return Ok(read),
                // the same record is as unreadable on the next try; a cancelled read is over
                Err(e @ (ChangelogError::Unreadable { .. } | ChangelogError::Cancelled { .. })) => {
                    return Err(e).context("restoring partitions from the changelog")
                }
                Err(e) if attempt < 4 && !self.cancel.load(Ordering::Relaxed) => {
                    tracing::warn!(attempt, error = %e, "changelog read failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                    attempt += 1;
                }
                Err(e) => return Err(e).context("restoring partitions from the changelog"),
            }
        }
    }
}

/// Where revoked partitions whose release is due arrive, with the checkpoint that published
/// them.
pub(crate) type ReleasesDue = mpsc::UnboundedReceiver<(CheckpointId, Vec<Partition>)>;

/// What does not change while the hand-off runs.
pub(crate) struct HandoffConfig {
    /// The consumer group whose state the changelog holds.
    pub group: String,
    /// Partitions are assigned directly (instance scope): nothing assigns them again after a
    /// failed assignment.
    pub direct: bool,
}

pub(crate) struct Handoff {
    config: HandoffConfig,
    assigned: Vec<Partition>,
    /// Assigned partitions whose first record has not arrived yet.
    awaiting_first: HashSet<Partition>,
    /// An assignment (possibly empty) was received since the start.
    assignment_seen: bool,
    /// Revoked partitions waiting for their checkpoint's publication.
    releases: Releases,
    changelog: Option<Changelog>,
    /// The changelog replay of an assignment, while it runs.
    restoring: Option<Restoring>,
    /// Replays started so far.
    replays: u64,
    /// The first checkpoint id triggered after each assigned partition was assigned: an
    /// earlier checkpoint (in flight at the assignment) holds what the instance had of it
    /// before, which is neither published nor committed for it.
    assigned_from: HashMap<Partition, CheckpointId>,
    released_tx: mpsc::UnboundedSender<(CheckpointId, Vec<Partition>)>,
    restored_tx: mpsc::UnboundedSender<Restored>,
    board: Arc<StatusBoard>,
    metrics: Arc<Metrics>,
}

impl Handoff {
    /// A hand-off; releases due after a publication arrive on the first receiver returned,
    /// finished changelog replays on the second.
    pub(crate) fn new(
        config: HandoffConfig,
        changelog: Option<Changelog>,
        board: Arc<StatusBoard>,
        metrics: Arc<Metrics>,
    ) -> (Self, ReleasesDue, mpsc::UnboundedReceiver<Restored>) {
        let (released_tx, released) = mpsc::unbounded_channel();
        let (restored_tx, restored) = mpsc::unbounded_channel();
        let handoff = Handoff {
            config,
            assigned: Vec::new(),
            awaiting_first: HashSet::new(),
            assignment_seen: false,
            releases: Releases::default(),
            changelog,
            restoring: None,
            replays: 0,
            assigned_from: HashMap::new(),
            released_tx,
            restored_tx,
            board,
            metrics,
        };
        (handoff, released, restored)
    }

    pub(crate) fn assigned(&self) -> &[Partition] {
        &self.assigned
    }

    /// Whether revoked partitions wait for their release: the group waits for this consumer's
    /// answer to the revoke, and no other assignment change may come first.
    pub(crate) fn releasing(&self) -> bool {
        self.releases.any_pending()
    }

    /// Whether an assignment change is under way (a revoke waiting for its release, or
    /// partitions assigned paused while their changelog replays): nothing is assigned anew
    /// meanwhile.
    pub(crate) fn rebalancing(&self) -> bool {
        self.releasing() || self.restoring.is_some()
    }

    pub(crate) fn assignment_seen(&self) -> bool {
        self.assignment_seen
    }

    /// Checks a record of `p` at `offset`: the first one after an assignment must be at the
    /// position held (`held`, asked only then); offsets between that and it were never delivered (counted and
    /// warned about).
    pub(crate) fn check_first_record(
        &mut self,
        p: &Partition,
        offset: i64,
        held: impl FnOnce() -> Option<NextOffset>,
    ) {
        if self.awaiting_first.is_empty() || !self.awaiting_first.remove(p) {
            return;
        }
        match held() {
            Some(next) if offset > next.0 => {
                let gap = (offset - next.0) as u64;
                self.metrics
                    .offset_gap
                    .with_label_values(&[&p.topic, &p.partition.to_string()])
                    .inc_by(gap);
                tracing::warn!(
                    partition = %p,
                    held = next.0,
                    first = offset,
                    gap,
                    "first record after assignment is beyond the held position: offsets in between were never delivered (compaction or transaction markers explain small gaps; counted in checkpointer_offset_gap_records_total)"
                )
            }
            Some(next) if next.0 != offset => tracing::warn!(
                partition = %p,
                held = next.0,
                first = offset,
                "first record after assignment is before the held position"
            ),
            _ => tracing::debug!(partition = %p, first = offset, "first record after assignment"),
        }
    }

    /// Of durable checkpoint `id`'s positions, those this instance may commit: only members
    /// can commit, and only for what they owned when the checkpoint was triggered.
    pub(crate) fn owned(
        &self,
        id: CheckpointId,
        positions: Vec<(Partition, NextOffset)>,
    ) -> Vec<(Partition, NextOffset)> {
        positions
            .into_iter()
            .filter(|(p, _)| self.owned_at(id, p))
            .collect()
    }

    /// Whether `p` was assigned when checkpoint `id` was triggered.
    fn owned_at(&self, id: CheckpointId, p: &Partition) -> bool {
        self.assigned.contains(p) && self.assigned_from.get(p).is_none_or(|from| id >= *from)
    }

    /// Takes an assignment: without a changelog, assigns at once; with one, assigns the
    /// partitions paused (so that librdkafka's rebalance completes and the group can rebalance
    /// again at any time) and replays their changelog off the loop; they are read, from the
    /// position the state they hold matches, once it is done ([`Handoff::on_restored`]). A
    /// replay running meanwhile is started again with these partitions added.
    pub(crate) fn on_assign(
        &mut self,
        engine: &mut Engine,
        coordinator: &mut Coordinator,
        consumer: &dyn Assignments,
        partitions: Vec<Partition>,
    ) -> anyhow::Result<()> {
        if engine.config().partition_scoped {
            // windows of partitions this instance no longer owns must not close and emit here
            let stale = stale(
                engine.progress().map(|(p, _)| p),
                &self.assigned,
                &[&partitions[..], self.restoring()].concat(),
            );
            if !stale.is_empty() {
                tracing::info!(partitions = ?stale.iter().map(ToString::to_string).collect::<Vec<_>>(), "dropping the state of partitions assigned elsewhere");
                engine.drop_partitions(&stale);
                self.board.clear_positions(&stale);
                self.unreport(&stale);
                coordinator.restart_line();
            }
        }
        // a partition assigned again is no longer on its way out
        self.releases.cancel(&partitions);
        let Some(io) = self
            .changelog
            .as_ref()
            .map(|c| c.io.clone())
            .filter(|_| !partitions.is_empty())
        else {
            return self.assign_now(engine, consumer, partitions, coordinator.next_id());
        };
        if let Err(e) = consumer.assign(&partitions) {
            if self.config.direct {
                anyhow::bail!("{e}");
            }
            tracing::error!(error = %e, "assignment failed");
            return Ok(());
        }
        // nothing is read before the state is in place
        consumer.pause(&partitions);
        self.assignment_seen = true;
        let mut all = self.cancel_replay();
        for p in partitions {
            if !all.contains(&p) {
                all.push(p);
            }
        }
        self.start_restore(io, all);
        Ok(())
    }

    /// Partitions assigned and paused while their changelog replay runs (empty: none).
    pub(crate) fn restoring(&self) -> &[Partition] {
        self.restoring
            .as_ref()
            .map_or(&[], |r| r.partitions.as_slice())
    }

    /// Whether partitions whose state a replay installed wait to be read.
    pub(crate) fn waiting_to_read(&self) -> bool {
        self.restoring.as_ref().is_some_and(|r| r.installed)
    }

    /// Gives up a replay in flight (the service stops; its partitions were never read).
    pub(crate) fn cancel_restore(&mut self) {
        let partitions = self.cancel_replay();
        if !partitions.is_empty() {
            tracing::info!(partitions = ?partitions.iter().map(ToString::to_string).collect::<Vec<_>>(), "changelog restore cancelled: stopping");
        }
    }

    /// Stops the replay in flight, if any (or forgets the partitions one installed, waiting
    /// to be read); returns its partitions. Their restore gauges go: a replay started again
    /// sets them anew.
    fn cancel_replay(&mut self) -> Vec<Partition> {
        let Some(r) = self.restoring.take() else {
            return Vec::new();
        };
        r.cancel.store(true, Ordering::Relaxed);
        for p in &r.partitions {
            let label = p.to_string();
            let _ = self
                .metrics
                .changelog_restore_remaining
                .remove_label_values(&[label.as_str()]);
            let _ = self
                .metrics
                .changelog_restore_read_bytes
                .remove_label_values(&[label.as_str()]);
        }
        r.partitions
    }

    fn start_restore(&mut self, io: Arc<dyn ChangelogIo>, partitions: Vec<Partition>) {
        let cancel = Arc::new(AtomicBool::new(false));
        let replay = Replay {
            io,
            group: self.config.group.clone(),
            partitions: partitions.clone(),
            board: self.board.clone(),
            metrics: self.metrics.clone(),
            cancel: cancel.clone(),
        };
        let done = self.restored_tx.clone();
        self.replays += 1;
        let generation = self.replays;
        tracing::info!(partitions = ?partitions.iter().map(ToString::to_string).collect::<Vec<_>>(), "restoring assigned partitions from the changelog before reading them");
        self.board.set_ready(
            false,
            &format!(
                "restoring {} partitions from the changelog",
                partitions.len()
            ),
        );
        tokio::spawn(async move {
            let started = Instant::now();
            let read = replay.run().await;
            let _ = done.send(Restored {
                generation,
                partitions: replay.partitions,
                read,
                duration: started.elapsed(),
            });
        });
        self.restoring = Some(Restoring {
            generation,
            partitions,
            installed: false,
            cancel,
        });
    }

    /// Completes an assignment whose changelog replay is done: installs what the changelog holds
    /// newer than this instance, then assigns. A failed replay stops the service (restoring an
    /// older state than published would double-count).
    pub(crate) fn on_restored(
        &mut self,
        engine: &mut Engine,
        coordinator: &mut Coordinator,
        consumer: &dyn Assignments,
        restored: Restored,
    ) -> anyhow::Result<()> {
        match &self.restoring {
            Some(r) if r.generation == restored.generation && !r.installed => {}
            // cancelled, or an answer to an earlier replay
            _ => return Ok(()),
        }
        let Restored {
            partitions,
            read,
            duration,
            ..
        } = restored;
        let (mut states, progress) = read?;
        let read_ms = duration.as_millis() as u64;
        for p in &partitions {
            let local = engine.position(p).map(|n| n.0);
            let committed = states.remove(p);
            if let (Some(c), Some(link)) = (&committed, self.changelog.as_mut()) {
                link.ledger
                    .record_keys
                    .insert(p.clone(), c.record_keys.clone());
            }
            match committed {
                Some(c) if c.next_offset() > local => {
                    let Some(position) = c.position.clone() else {
                        continue;
                    };
                    let entries = c.entries.len();
                    engine
                        .install_partition(&position, c.entries)
                        .with_context(|| format!("installing {p} from the changelog"))?;
                    if let Some(next) = position.next {
                        self.board.set_position(p, next);
                    }
                    self.metrics.changelog_restores.inc();
                    let bytes = progress.get(p).map_or(0, |r| r.bytes_read);
                    let checkpoint_id = c.tag.map(|t| t.checkpoint);
                    tracing::info!(partition = %p, checkpoint_id = ?checkpoint_id, next_offset = ?position.next.map(|n| n.0), local_next_offset = ?local, entries, bytes, duration_ms = read_ms, "restored partition state from the changelog");
                }
                Some(c) => {
                    tracing::info!(partition = %p, next_offset = ?local, changelog_next_offset = ?c.next_offset(), "local partition state is as new as the changelog's; keeping it")
                }
                None => {
                    tracing::info!(partition = %p, next_offset = ?local, "no changelog state for the partition")
                }
            }
            // the partition is assigned exactly where the state it holds ends
            match engine.position(p) {
                Some(next) => self.board.set_position(p, next),
                None => self.board.clear_positions(std::slice::from_ref(p)),
            }
        }
        // the first checkpoint after a takeover publishes the partitions' full state
        coordinator.restart_line();
        if let Some(link) = self.changelog.as_mut() {
            link.ledger.forget(&partitions);
        }
        if let Some(r) = self.restoring.as_mut() {
            r.installed = true;
        }
        self.finish_reading(engine, coordinator, consumer)?;
        Ok(())
    }

    /// Reads the partitions whose state a replay installed, from where that state ends
    /// (whatever was fetched before they were paused is dropped): they are assigned anew and
    /// resumed. Not while a revoke waits for its release: assigning anew would answer the
    /// group's pending revoke early (a cooperative assignor takes any unassign as that
    /// answer), so they wait for it. Returns whether it read them. A failure stops the
    /// service: the partitions would stay paused, and the group reassigns them to the next
    /// start.
    pub(crate) fn finish_reading(
        &mut self,
        engine: &mut Engine,
        coordinator: &mut Coordinator,
        consumer: &dyn Assignments,
    ) -> anyhow::Result<bool> {
        if !self.restoring.as_ref().is_some_and(|r| r.installed) || self.releasing() {
            return Ok(false);
        }
        let Some(r) = self.restoring.take() else {
            return Ok(false);
        };
        consumer.reassign(&r.partitions).with_context(|| {
            format!(
                "reading the partitions restored from the changelog ({})",
                r.partitions
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        consumer.resume(&r.partitions);
        self.adopt(engine, &r.partitions, coordinator.next_id());
        Ok(true)
    }

    /// Assigns `partitions` to the consumer at the positions held for them; checkpoints from
    /// `first` on are theirs.
    fn assign_now(
        &mut self,
        engine: &mut Engine,
        consumer: &dyn Assignments,
        partitions: Vec<Partition>,
        first: CheckpointId,
    ) -> anyhow::Result<()> {
        if let Err(e) = consumer.assign(&partitions) {
            if self.config.direct {
                // assigned directly, nothing would assign them again: stop rather than never
                // read them
                anyhow::bail!("{e}");
            }
            tracing::error!(error = %e, "assignment failed");
            return Ok(());
        }
        self.assignment_seen = true;
        self.adopt(engine, &partitions, first);
        Ok(())
    }

    /// `partitions`, assigned and read from now on, are this instance's; checkpoints from
    /// `first` on are theirs.
    fn adopt(&mut self, engine: &mut Engine, partitions: &[Partition], first: CheckpointId) {
        self.awaiting_first.extend(partitions.iter().cloned());
        for p in partitions {
            if !self.assigned.contains(p) {
                self.assigned.push(p.clone());
            }
            self.assigned_from.insert(p.clone(), first);
        }
        engine.assign(partitions);
        self.board.set_assigned(&self.assigned);
    }

    /// Starts a revocation: with a changelog, a checkpoint first, released once it is
    /// published (`on_released`); otherwise (or when the partitions are already lost, or all of
    /// them still wait for their changelog replay) at once. A replay of revoked partitions is
    /// given up (and started again for the others it covered): they were never read here, and
    /// their state is the changelog's, never published from here.
    pub(crate) fn on_revoke(
        &mut self,
        engine: &mut Engine,
        coordinator: &mut Coordinator,
        consumer: &dyn Assignments,
        partitions: Vec<Partition>,
        lost: bool,
    ) {
        let replaying = self.restoring().to_vec();
        let (unread, read): (Vec<Partition>, Vec<Partition>) = partitions
            .iter()
            .cloned()
            .partition(|p| replaying.contains(p));
        if !unread.is_empty() {
            let keep: Vec<Partition> = self
                .cancel_replay()
                .into_iter()
                .filter(|p| !unread.contains(p))
                .collect();
            tracing::info!(partitions = ?unread.iter().map(ToString::to_string).collect::<Vec<_>>(), "partitions revoked before their changelog restore ended: released unread");
            engine.drop_partitions(&unread);
            self.board.clear_positions(&unread);
            if let Some(io) = self
                .changelog
                .as_ref()
                .map(|c| c.io.clone())
                .filter(|_| !keep.is_empty())
            {
                self.start_restore(io, keep);
            }
        }
        if self.changelog.is_some() && !lost && !read.is_empty() {
            let id = coordinator.trigger(engine, None);
            tracing::info!(checkpoint_id = id.0, partitions = ?partitions.iter().map(ToString::to_string).collect::<Vec<_>>(), "partitions revoked: checkpointing them before release");
            // released together: an eager assignor's release lets every partition go at once
            self.releases.begin(id, partitions);
            return;
        }
        self.releases.cancel(&partitions);
        consumer.release(&partitions);
        self.forget(engine, coordinator, &partitions);
    }

    /// The revoke checkpoint of these partitions is published (or failed): let them go,
    /// unless they were lost or assigned again meanwhile.
    pub(crate) fn on_released(
        &mut self,
        engine: &mut Engine,
        coordinator: &mut Coordinator,
        consumer: &dyn Assignments,
        id: CheckpointId,
        partitions: Vec<Partition>,
    ) {
        let partitions = self.releases.due(id, partitions);
        if partitions.is_empty() {
            return;
        }
        tracing::info!(partitions = ?partitions.iter().map(ToString::to_string).collect::<Vec<_>>(), "partitions released");
        consumer.release(&partitions);
        self.forget(engine, coordinator, &partitions);
    }

    /// Stops exporting per-partition series of partitions this instance no longer holds.
    fn unreport(&self, partitions: &[Partition]) {
        for p in partitions {
            let _ = self
                .metrics
                .partition_watermark
                .remove_label_values(&[&p.topic, &p.partition.to_string()]);
        }
    }

    fn forget(
        &mut self,
        engine: &mut Engine,
        coordinator: &mut Coordinator,
        partitions: &[Partition],
    ) {
        self.assigned.retain(|p| !partitions.contains(p));
        for p in partitions {
            self.assigned_from.remove(p);
        }
        self.unreport(partitions);
        if let Some(link) = self.changelog.as_mut() {
            engine.drop_partitions(partitions);
            self.board.clear_positions(partitions);
            coordinator.restart_line();
            link.ledger.forget(partitions);
        } else {
            engine.revoke(partitions);
        }
        self.board.set_assigned(&self.assigned);
    }

    /// A revoke checkpoint failed: release its partitions anyway; the new owner restores the
    /// last published state, which matches its offsets.
    pub(crate) fn release_after_failure(&mut self, id: CheckpointId) {
        if let Some(partitions) = self.releases.take_checkpoint(id) {
            tracing::warn!(checkpoint_id = id.0, "the checkpoint before releasing partitions failed; releasing them at their last published state");
            let _ = self.released_tx.send((id, partitions));
        }
    }

    /// Publishes a durable checkpoint's changes per owned partition.
    pub(crate) fn publish(&mut self, coordinator: &mut Coordinator, cp: &Checkpoint) {
        let releasing = self.releases.take_checkpoint(cp.id);
        let Some(link) = self.changelog.as_mut() else {
            return;
        };
        let owned: Vec<Partition> = self
            .assigned
            .iter()
            .filter(|p| self.assigned_from.get(*p).is_none_or(|from| cp.id >= *from))
            .cloned()
            .collect();
        let plan = plan(&link.ledger, &self.config.group, cp, &owned);
        let done = releasing.map(|partitions| {
            let (tx, rx) = oneshot::channel::<Result<(), String>>();
            let released = self.released_tx.clone();
            let id = cp.id;
            tokio::spawn(async move {
                // released whether the publication succeeded or not: see release_after_failure
                let _ = rx.await;
                let _ = released.send((id, partitions));
            });
            tx
        });
        link.ledger.apply(&plan);
        self.metrics
            .changelog_published
            .inc_by(plan.published.len() as u64);
        if link.ledger.wants_full(&plan) {
            coordinator.restart_line();
        }
        link.io.publish(Batch {
            chunks: plan.chunks,
            tombstones: plan.tombstones,
            done,
        });
    }

    /// Waits (until `deadline`) for every publication sent so far, so that a stopping instance
    /// leaves its final state in the changelog for whoever takes its partitions.
    pub(crate) async fn settled(&self, deadline: tokio::time::Instant) {
        let Some(link) = &self.changelog else { return };
        let (tx, rx) = oneshot::channel();
        link.io.publish(Batch {
            chunks: Vec::new(),
            tombstones: Vec::new(),
            done: Some(tx),
        });
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(Ok(()))) => tracing::info!("changelog publications complete"),
            Ok(Ok(Err(e))) => {
                tracing::warn!(error = %e, "the last changelog publication failed; a new owner restores an older state (and reads again from there)")
            }
            _ => tracing::warn!(
                "changelog publications did not complete before the shutdown timeout"
            ),
        }
    }

    /// A publication failed: those partitions' next publication must be full.
    pub(crate) fn on_publish_failure(
        &mut self,
        coordinator: &mut Coordinator,
        failure: PublishFailure,
    ) {
        self.metrics.changelog_publish_failures.inc();
        if let Some(link) = self.changelog.as_mut() {
            link.ledger.forget(&failure.partitions);
        }
        coordinator.restart_line();
    }
}
