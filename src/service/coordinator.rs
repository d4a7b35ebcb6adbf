//! The checkpoint coordinator: owns the scheduler, the attempts in flight, the link to the
//! store's writer and the savepoint requests. It triggers checkpoints from the engine's
//! snapshots, settles their outcomes (history, metrics, requesters) and tells the pipeline
//! what followed: a durable checkpoint to act on, or a failure. Savepoints operators ask for
//! pass its `SavepointGate` (one at a time, a bound per minute) and may wait, queued, for a
//! checkpoint in flight to make room (`checkpoint.max_concurrent`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use tokio::sync::mpsc;

use crate::board::StatusBoard;
use crate::checkpoint::choice::validate_savepoint_name;
use crate::checkpoint::history::{CheckpointRecord, Kind, Status};
use crate::checkpoint::protocol::meta_of;
use crate::checkpoint::savepoints::{self, Admission, SavepointGate};
use crate::checkpoint::scheduler::Trigger;
use crate::checkpoint::{Checkpoint, Scheduler, StateSpec};
use crate::checkpoint_id::CheckpointId;
use crate::clock::epoch_ms;
use crate::engine::Engine;
use crate::http::{CommandError, Reply};
use crate::metrics::Metrics;
use crate::position::{NextOffset, Partition};
use crate::store::writer::{Job, Prune, WriteJob, WriteOutcome};
use crate::store::{Checkpoints, SavepointMeta, StoreError, WriteStats};

/// Who waits for a savepoint.
pub(crate) enum SavepointWaiter {
    /// `POST /api/savepoints`.
    Trigger(Reply<SavepointMeta>),
    /// `POST /api/stop?savepoint`: taken as the last act of the stop.
    Stop(Reply<Option<SavepointMeta>>),
}

impl SavepointWaiter {
    fn fail(self, e: CommandError) {
        // the requester may have gone away; nothing to do then
        match self {
            SavepointWaiter::Trigger(r) => drop(r.send(Err(e))),
            SavepointWaiter::Stop(r) => drop(r.send(Err(e))),
        }
    }

    fn succeed(self, meta: SavepointMeta) {
        match self {
            SavepointWaiter::Trigger(r) => drop(r.send(Ok(meta))),
            SavepointWaiter::Stop(r) => drop(r.send(Ok(Some(meta)))),
        }
    }
}

/// A savepoint to take: its name and who waits for it.
pub(crate) struct SavepointRequest {
    pub name: String,
    pub waiter: SavepointWaiter,
}

/// An attempt handed to the writer and not settled yet.
struct InFlight {
    abandoned: Arc<AtomicBool>,
    positions: Vec<(Partition, NextOffset)>,
    savepoint: Option<SavepointRequest>,
    started: Instant,
}

/// A checkpoint that became durable, for the pipeline to act on: publish it, release what it
/// holds, then [`Coordinator::record_completion`].
pub(crate) struct Durable {
    pub id: CheckpointId,
    pub checkpoint: Box<Checkpoint>,
    stats: Box<WriteStats>,
    duration: Duration,
    flight: Option<InFlight>,
}

/// What settling a write outcome leaves the pipeline to do.
pub(crate) enum Settled {
    /// Nothing (an abandoned attempt, skipped or written late).
    Nothing,
    Durable(Durable),
    /// Attempt `id` failed; `forget` says whether the engine must forget its snapshot (the
    /// next checkpoint is then a full one).
    Failed {
        id: CheckpointId,
        forget: bool,
    },
}

/// What does not change while the coordinator runs.
pub(crate) struct CoordinatorConfig {
    pub timeout: Duration,
    pub dir: PathBuf,
    /// What the service restored at start, for the message of a fatal failure.
    pub restored_from: String,
    /// `checkpoint.retained_unnamed_savepoints`.
    pub retained_unnamed_savepoints: usize,
    /// `checkpoint.savepoints_per_minute`.
    pub savepoints_per_minute: u32,
    /// The savepoint `checkpoint.restore_from` names, which is never removed as unnamed.
    pub pinned_savepoint: Option<String>,
}

pub(crate) struct Coordinator {
    config: CoordinatorConfig,
    scheduler: Scheduler,
    spec: StateSpec,
    writer: mpsc::UnboundedSender<Job>,
    store: Arc<dyn Checkpoints>,
    in_flight: HashMap<CheckpointId, InFlight>,
    started: Instant,
    last_durable: Option<CheckpointId>,
    metrics: Arc<Metrics>,
    board: Arc<StatusBoard>,
    gate: SavepointGate,
    /// A savepoint admitted while no checkpoint could start, taken once one can.
    queued: Option<SavepointRequest>,
    /// The newest checkpoint that was durable without the savepoint asked of it (its name was
    /// taken by the time of the write).
    refused_savepoint: Option<CheckpointId>,
}

impl Coordinator {
    /// The id the next checkpoint will get.
    pub(crate) fn next_id(&self) -> CheckpointId {
        self.scheduler.peek_next_id()
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        config: CoordinatorConfig,
        scheduler: Scheduler,
        spec: StateSpec,
        writer: mpsc::UnboundedSender<Job>,
        store: Arc<dyn Checkpoints>,
        last_durable: Option<CheckpointId>,
        metrics: Arc<Metrics>,
        board: Arc<StatusBoard>,
    ) -> Self {
        Coordinator {
            gate: SavepointGate::new(config.savepoints_per_minute),
            queued: None,
            refused_savepoint: None,
            config,
            scheduler,
            spec,
            writer,
            store,
            in_flight: HashMap::new(),
            started: Instant::now(),
            last_durable,
            metrics,
            board,
        }
    }

    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    pub(crate) fn due(&self) -> bool {
        self.scheduler.due(self.now())
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.scheduler.in_flight()
    }

    /// The oldest attempt in flight, with how long it has been running.
    pub(crate) fn oldest_in_flight(&self) -> Option<(CheckpointId, Duration)> {
        self.in_flight
            .iter()
            .min_by_key(|(id, _)| **id)
            .map(|(id, f)| (*id, f.started.elapsed()))
    }

    /// The checkpoint interval.
    pub(crate) fn interval(&self) -> Duration {
        self.scheduler.interval()
    }

    pub(crate) fn last_durable(&self) -> Option<CheckpointId> {
        self.last_durable
    }

    /// The newest checkpoint that was durable without the savepoint asked of it.
    pub(crate) fn refused_savepoint(&self) -> Option<CheckpointId> {
        self.refused_savepoint
    }

    /// The next checkpoint is a full one (a new line of deltas).
    pub(crate) fn restart_line(&mut self) {
        self.scheduler.restart_line();
    }

    pub(crate) fn store(&self) -> &Arc<dyn Checkpoints> {
        &self.store
    }

    /// The name of an unnamed savepoint taken next.
    pub(crate) fn default_savepoint_name(&self) -> String {
        savepoints::unnamed_name(self.scheduler.peek_next_id())
    }

    /// Refuses a savepoint name that is invalid, taken, or being taken.
    pub(crate) fn check_savepoint_name(&self, name: &str) -> Result<(), CommandError> {
        validate_savepoint_name(name).map_err(CommandError::BadRequest)?;
        let in_flight = self
            .in_flight
            .values()
            .filter_map(|f| f.savepoint.as_ref())
            .chain(self.queued.as_ref())
            .any(|r| r.name == name);
        let exists = match self.store.savepoint_now(name) {
            Some(Ok(_)) => true,
            Some(Err(StoreError::NoSuchSavepoint { .. })) => false,
            Some(Err(StoreError::Corrupt { .. })) => true,
            Some(Err(e)) => return Err(CommandError::Failed(e.to_string())),
            // the store is busy writing: the write of the savepoint refuses a name taken
            None => {
                tracing::debug!(
                    savepoint = name,
                    "the store is busy; the savepoint's write checks its name"
                );
                false
            }
        };
        if in_flight {
            return Err(CommandError::Conflict(format!(
                "a savepoint named {name:?} is being taken (asked for earlier and not durable yet); wait for it, or choose another name"
            )));
        }
        if exists {
            return Err(CommandError::Conflict(format!(
                "a savepoint named {name:?} already exists; delete it first or choose another name"
            )));
        }
        Ok(())
    }

    /// Refuses a name an operator gave that is invalid, taken, or of the form unnamed
    /// savepoints take.
    pub(crate) fn check_given_savepoint_name(&self, name: &str) -> Result<(), CommandError> {
        savepoints::check_given_name(name).map_err(CommandError::BadRequest)?;
        self.check_savepoint_name(name)
    }

    /// Refuses a name a stop with savepoint gave as [`Self::check_given_savepoint_name`]
    /// does, except the name of the savepoint queued for room: a stop drops that one untaken,
    /// so the stop takes its name over (the savepoint it takes last is the final state), and
    /// the queued savepoint's asker is told so. A savepoint being written keeps its name.
    pub(crate) fn take_over_savepoint_name(&mut self, name: &str) -> Result<(), CommandError> {
        let queued = self.queued.take_if(|r| r.name == name);
        if let Err(e) = self.check_given_savepoint_name(name) {
            if queued.is_some() {
                self.queued = queued;
            }
            return Err(e);
        }
        if let Some(request) = queued {
            tracing::info!(
                savepoint = name,
                "a stop with a savepoint of the same name takes over the queued savepoint"
            );
            request.waiter.fail(CommandError::Unavailable(format!(
                "the service is stopping; a stop with a savepoint named {name:?} took this request over and will take that savepoint as its last act, once the stop has settled"
            )));
        }
        Ok(())
    }

    /// A savepoint asked for over HTTP: checked, admitted by the gate, then triggered now or
    /// once a checkpoint in flight makes room.
    pub(crate) fn request_savepoint(
        &mut self,
        engine: &mut Engine,
        name: Option<String>,
        reply: Reply<SavepointMeta>,
        may_start: bool,
    ) {
        let waiter = SavepointWaiter::Trigger(reply);
        if let Some(given) = &name {
            if let Err(e) = self.check_given_savepoint_name(given) {
                waiter.fail(e);
                return;
            }
        }
        let busy = self.queued.is_some() || self.in_flight.values().any(|f| f.savepoint.is_some());
        match self
            .gate
            .admit(self.now(), busy, may_start && self.scheduler.has_room())
        {
            Admission::Refused {
                reason,
                retry_after,
            } => {
                tracing::info!(%reason, "savepoint refused");
                waiter.fail(CommandError::TooMany(reason, retry_after));
            }
            Admission::Now => {
                let name = name.unwrap_or_else(|| self.default_savepoint_name());
                // a default name may be taken too (an import, a name an older build accepted)
                if let Err(e) = self.check_savepoint_name(&name) {
                    waiter.fail(e);
                    return;
                }
                self.trigger(engine, Some(SavepointRequest { name, waiter }));
            }
            Admission::Queued => {
                tracing::info!(
                    in_flight = self.scheduler.in_flight(),
                    "savepoint queued until it can start (a checkpoint in flight and checkpoint.max_concurrent, or dead-letter copies not written yet)"
                );
                // named when taken: an unnamed one takes the id it is written under
                self.queued = Some(SavepointRequest {
                    name: name.unwrap_or_default(),
                    waiter,
                });
            }
        }
    }

    /// Whether an operator's savepoint waits for room.
    pub(crate) fn has_queued(&self) -> bool {
        self.queued.is_some()
    }

    /// Takes the queued savepoint once a checkpoint can start.
    pub(crate) fn trigger_queued(&mut self, engine: &mut Engine) {
        if self.queued.is_none() || !self.scheduler.has_room() {
            return;
        }
        if let Some(mut request) = self.queued.take() {
            if request.name.is_empty() {
                request.name = self.default_savepoint_name();
            }
            // a given name may have been taken meanwhile, a default one by an import
            if let Err(e) = self.check_savepoint_name(&request.name) {
                request.waiter.fail(e);
                return;
            }
            self.trigger(engine, Some(request));
        }
    }

    /// The queued savepoint will not be taken: the service stops.
    pub(crate) fn drop_queued(&mut self) {
        if let Some(request) = self.queued.take() {
            request.waiter.fail(CommandError::Unavailable(
                "the service is stopping; the savepoint was not taken (a stop with --savepoint takes one as its last act)".to_string(),
            ));
        }
    }

    /// Takes a snapshot and hands it to the writer, as a savepoint if asked. Returns the id.
    pub(crate) fn trigger(
        &mut self,
        engine: &mut Engine,
        savepoint: Option<SavepointRequest>,
    ) -> CheckpointId {
        let Trigger { id, base } = self.scheduler.trigger(self.now());
        let trigger_ms = epoch_ms();
        let started = Instant::now();
        let delta = engine.snapshot(id, base.is_none());
        let snapshot_time = started.elapsed();
        self.metrics
            .checkpoint_stall
            .observe(snapshot_time.as_secs_f64());
        let positions: Vec<(Partition, NextOffset)> = delta
            .partitions
            .iter()
            .filter_map(|p| p.next.map(|n| (p.partition.clone(), n)))
            .collect();
        let cp = Checkpoint {
            id,
            base,
            trigger_ms,
            spec: self.spec.clone(),
            delta,
        };
        let mut record = CheckpointRecord::from_meta(&meta_of(&cp, 0, 0), Status::InProgress);
        record.duration_ms = None;
        record.phases.snapshot_ms = Some(snapshot_time.as_millis() as u64);
        if let Some(r) = &savepoint {
            record.kind = Kind::Savepoint;
            record.savepoint = Some(r.name.clone());
            tracing::info!(checkpoint_id = id.0, savepoint = %r.name, "taking a savepoint");
        }
        self.board.history().push(record.clone());
        let abandoned = Arc::new(AtomicBool::new(false));
        let prune = savepoint
            .as_ref()
            .filter(|r| savepoints::unnamed_id(&r.name).is_some())
            .map(|r| Prune {
                keep: self.config.retained_unnamed_savepoints,
                protected: std::iter::once(r.name.clone())
                    .chain(self.config.pinned_savepoint.clone())
                    .collect(),
            });
        let job = WriteJob {
            checkpoint: cp,
            record,
            savepoint: savepoint.as_ref().map(|r| r.name.clone()),
            prune,
            started,
            abandoned: abandoned.clone(),
        };
        self.in_flight.insert(
            id,
            InFlight {
                abandoned,
                positions,
                savepoint,
                started,
            },
        );
        if self.writer.send(Job::Write(Box::new(job))).is_err() {
            tracing::error!(checkpoint_id = id.0, "checkpoint writer is gone");
        }
        self.metrics
            .checkpoints_in_flight
            .set(self.scheduler.in_flight() as i64);
        id
    }

    /// Settles what the writer reports. A store that may not be written any more (a newer
    /// owner claimed it, or a sync of its files failed) is fatal.
    pub(crate) fn settle(&mut self, outcome: WriteOutcome) -> anyhow::Result<Settled> {
        match outcome {
            WriteOutcome::Durable {
                id,
                stats,
                duration,
                checkpoint,
            } => {
                if !self.scheduler.completed(id, self.now()) {
                    self.record_late_completion(id, &stats, duration);
                    return Ok(Settled::Nothing);
                }
                self.last_durable = Some(id);
                Ok(Settled::Durable(Durable {
                    id,
                    checkpoint,
                    stats,
                    duration,
                    flight: self.in_flight.remove(&id),
                }))
            }
            WriteOutcome::Failed { id, reason } => {
                let forget = self.fail(id, &reason, false)?;
                Ok(Settled::Failed { id, forget })
            }
            WriteOutcome::Stopped { id, reason } => {
                self.record_failure(id, &reason, false);
                bail!("checkpoint {id} not written: {reason}")
            }
            WriteOutcome::Skipped { id } => {
                tracing::debug!(
                    checkpoint_id = id.0,
                    "abandoned checkpoint skipped by the writer"
                );
                Ok(Settled::Nothing)
            }
        }
    }

    /// Records a durable checkpoint the pipeline acted on (`released` windows were handed to
    /// the output) and answers its savepoint's requester. Returns the positions to commit.
    pub(crate) fn record_completion(
        &mut self,
        durable: Durable,
        released: usize,
    ) -> Vec<(Partition, NextOffset)> {
        let Durable {
            id,
            stats,
            duration,
            flight,
            ..
        } = durable;
        let m = &self.metrics;
        m.checkpoint_duration.observe(duration.as_secs_f64());
        m.checkpoint_size.set(stats.bytes as i64);
        m.checkpoint_last_id.set(id.0 as i64);
        m.checkpoint_last_time.set(epoch_ms() as f64 / 1000.0);
        m.checkpoints_completed.inc();
        m.checkpoints_in_flight
            .set(self.scheduler.in_flight() as i64);
        self.board.history().update(id, |r| {
            r.status = Status::Completed;
            r.duration_ms = Some(duration.as_millis() as u64);
            r.bytes = Some(stats.bytes);
            r.phases.write_ms = Some(stats.write.as_millis() as u64);
            r.phases.flush_ms = Some(stats.flush.as_millis() as u64);
        });
        tracing::info!(
            checkpoint_id = id.0,
            duration_ms = duration.as_millis() as u64,
            write_ms = stats.write.as_millis() as u64,
            flush_ms = stats.flush.as_millis() as u64,
            bytes = stats.bytes,
            released_windows = released,
            "checkpoint completed"
        );
        let Some(f) = flight else {
            return Vec::new();
        };
        match (f.savepoint, stats.savepoint, stats.savepoint_refused) {
            (Some(request), Some(meta), _) => {
                self.metrics.savepoints.inc();
                tracing::info!(checkpoint_id = id.0, savepoint = %meta.name, entries = meta.entries, "savepoint completed");
                request.waiter.succeed(meta);
            }
            (Some(request), None, refused) => {
                let refused = refused.unwrap_or_else(|| "the store made no savepoint".into());
                tracing::warn!(checkpoint_id = id.0, savepoint = %request.name, %refused, "savepoint not taken; the checkpoint is durable without it");
                self.board.history().update(id, |r| {
                    r.kind = Kind::Checkpoint;
                    r.savepoint = None;
                });
                self.refused_savepoint = Some(id);
                request.waiter.fail(CommandError::Conflict(format!(
                    "{refused}; checkpoint {id} was written without the savepoint: delete it first or choose another name"
                )));
            }
            (None, ..) => {}
        }
        f.positions
    }

    /// Checkpoint `id` was abandoned (`checkpoint.timeout`) but the writer completed it
    /// afterwards: it is complete in the store, and a start may restore it, so the history
    /// says completed (in memory, and in the store after the abandonment it recorded first).
    /// Nothing is released for it: the next checkpoint, a full one, does that.
    fn record_late_completion(&mut self, id: CheckpointId, stats: &WriteStats, duration: Duration) {
        let refused = stats.savepoint.is_none();
        let record = self.board.history().update(id, |r| {
            r.status = Status::Completed;
            r.failure = None;
            // a savepoint asked for and refused by the write (its name taken): as the store has it
            if refused {
                r.kind = Kind::Checkpoint;
                r.savepoint = None;
            }
            r.duration_ms = Some(duration.as_millis() as u64);
            r.bytes = Some(stats.bytes);
            r.phases.write_ms = Some(stats.write.as_millis() as u64);
            r.phases.flush_ms = Some(stats.flush.as_millis() as u64);
        });
        if let Some(record) = record {
            let _ = self.writer.send(Job::Record(record));
        }
        tracing::warn!(
            checkpoint_id = id.0,
            duration_ms = duration.as_millis() as u64,
            timeout_ms = self.config.timeout.as_millis() as u64,
            savepoint = stats.savepoint.as_ref().map(|s| s.name.as_str()),
            "a checkpoint abandoned at checkpoint.timeout was completed afterwards: it is recorded as completed and a start may restore it; its final windows go out with the next checkpoint"
        );
    }

    /// Records the end of a failed or abandoned attempt: history (memory and store), metrics,
    /// the savepoint requester.
    fn record_failure(&mut self, id: CheckpointId, reason: &str, abandoned: bool) {
        let status = if abandoned {
            Status::Abandoned
        } else {
            Status::Failed
        };
        if abandoned {
            self.metrics.checkpoints_abandoned.inc();
        } else {
            self.metrics.checkpoints_failed.inc();
        }
        let started = self.in_flight.get(&id).map(|f| f.started);
        let record = self.board.history().update(id, |r| {
            r.status = status;
            r.failure = Some(reason.to_string());
            r.duration_ms = started.map(|s| s.elapsed().as_millis() as u64);
        });
        if let Some(record) = record {
            let _ = self.writer.send(Job::Record(record));
        }
        if let Some(f) = self.in_flight.remove(&id) {
            if let Some(SavepointRequest { name, waiter }) = f.savepoint {
                waiter.fail(CommandError::Failed(format!(
                    "savepoint {name} (checkpoint {id}) failed: {reason}"
                )));
            }
        }
    }

    /// Attempt `id` failed. Returns whether the engine must forget its snapshot; an error when
    /// failures are no longer tolerable.
    fn fail(&mut self, id: CheckpointId, reason: &str, abandoned: bool) -> anyhow::Result<bool> {
        let now = self.now();
        match self.scheduler.failed(id, now, reason) {
            Ok(false) => Ok(false),
            Ok(true) => {
                self.record_failure(id, reason, abandoned);
                tracing::warn!(
                    checkpoint_id = id.0,
                    reason,
                    "checkpoint failed; the next one is a full snapshot"
                );
                Ok(true)
            }
            Err(too_many) => {
                self.record_failure(id, reason, abandoned);
                let last_good = match self.last_durable {
                    Some(i) => format!("checkpoint {i}"),
                    None => format!("{}, restored at start,", self.config.restored_from),
                };
                bail!(
                    "{too_many}; stopping. The last good state ({last_good}) is intact in {}",
                    self.config.dir.display()
                )
            }
        }
    }

    /// Abandons checkpoints in flight for longer than `checkpoint.timeout`; returns them as
    /// failures for the pipeline.
    pub(crate) fn expire(&mut self) -> anyhow::Result<Vec<Settled>> {
        let mut out = Vec::new();
        for id in self.scheduler.expired(self.now()) {
            if let Some(f) = self.in_flight.get(&id) {
                f.abandoned.store(true, Ordering::SeqCst);
            }
            let reason = format!(
                "abandoned: not durable within checkpoint.timeout ({})",
                humantime::format_duration(self.config.timeout)
            );
            let forget = self.fail(id, &reason, true)?;
            out.push(Settled::Failed { id, forget });
        }
        Ok(out)
    }
}
