//! The checkpoint lifecycle inside the processing loop: triggering checkpoints and
//! savepoints, their outcomes, failures, and operator commands (savepoint, stop).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;

use super::runtime::{InFlight, Runtime};
use crate::checkpoint::history::{CheckpointRecord, Kind, Status};
use crate::checkpoint::protocol::meta_of;
use crate::checkpoint::restore::validate_savepoint_name;
use crate::checkpoint::scheduler::Trigger;
use crate::checkpoint::writer::{Job, WriteJob, WriteOutcome};
use crate::checkpoint::Checkpoint;
use crate::clock::epoch_ms;
use crate::http::{Command, CommandError, Reply};
use crate::position::{NextOffset, Partition};
use crate::source::{self, Source};
use crate::store::{SavepointMeta, Store, StoreError};

/// Who waits for a savepoint.
pub(super) enum SavepointWaiter {
    /// `POST /api/savepoints`.
    Trigger(Reply<SavepointMeta>),
    /// `POST /api/stop?savepoint`: taken as the last act of the stop.
    Stop(Reply<Option<SavepointMeta>>),
}

pub(super) struct SavepointRequest {
    pub name: String,
    pub waiter: SavepointWaiter,
}

impl SavepointWaiter {
    pub(super) fn fail(self, e: CommandError) {
        // the requester may have gone away; nothing to do then
        match self {
            SavepointWaiter::Trigger(r) => drop(r.send(Err(e))),
            SavepointWaiter::Stop(r) => drop(r.send(Err(e))),
        }
    }
}

impl Runtime {
    pub(super) fn on_command(&mut self, command: Command, store: &Store) {
        match command {
            Command::Stop {
                savepoint: None,
                reply,
            } => {
                tracing::info!("stop requested over HTTP");
                let _ = reply.send(Ok(None));
                self.stop_requested = true;
            }
            Command::Stop {
                savepoint: Some(name),
                reply,
            } => {
                if let Some(n) = &name {
                    if let Err(e) = self.check_savepoint_name(n, store) {
                        let _ = reply.send(Err(e));
                        return;
                    }
                }
                // the savepoint is taken once the stop has settled, so it is the final state
                tracing::info!(savepoint = ?name, "stop with savepoint requested over HTTP");
                self.stop_savepoint = Some((name, reply));
                self.stop_requested = true;
            }
            Command::Savepoint { name, reply } => {
                let waiter = SavepointWaiter::Trigger(reply);
                let name =
                    name.unwrap_or_else(|| format!("savepoint-{}", self.scheduler.peek_next_id()));
                if let Err(e) = self.check_savepoint_name(&name, store) {
                    waiter.fail(e);
                    return;
                }
                self.trigger(Some(SavepointRequest { name, waiter }));
            }
        }
    }

    pub(super) fn check_savepoint_name(
        &self,
        name: &str,
        store: &Store,
    ) -> Result<(), CommandError> {
        validate_savepoint_name(name).map_err(CommandError::BadRequest)?;
        let in_flight = self
            .in_flight
            .values()
            .any(|f| f.savepoint.as_ref().is_some_and(|(n, _)| n == name));
        let exists = match store.savepoint(name) {
            Ok(_) => true,
            Err(StoreError::NoSuchSavepoint { .. }) => false,
            Err(StoreError::Corrupt { .. }) => true,
            Err(e) => return Err(CommandError::Failed(e.to_string())),
        };
        if in_flight || exists {
            return Err(CommandError::Conflict(format!(
                "a savepoint named {name:?} already exists; delete it first or choose another name"
            )));
        }
        Ok(())
    }

    /// Takes a snapshot and hands it to the writer, as a savepoint if asked. Returns the id.
    pub(super) fn trigger(&mut self, savepoint: Option<SavepointRequest>) -> u64 {
        let Trigger { id, base } = self.scheduler.trigger(self.now());
        let trigger_ms = epoch_ms();
        let started = Instant::now();
        let delta = self.engine.snapshot(id, base.is_none());
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
        let savepoint = savepoint.map(|r| (r.name, r.waiter));
        let mut record = CheckpointRecord::from_meta(&meta_of(&cp, 0, 0), Status::InProgress);
        record.duration_ms = None;
        record.phases.snapshot_ms = Some(snapshot_time.as_millis() as u64);
        if let Some((name, _)) = &savepoint {
            record.kind = Kind::Savepoint;
            record.savepoint = Some(name.clone());
            tracing::info!(checkpoint_id = id, savepoint = %name, "taking a savepoint");
        }
        self.admin.history().push(record.clone());
        let abandoned = Arc::new(AtomicBool::new(false));
        let savepoint_name = savepoint.as_ref().map(|(n, _)| n.clone());
        self.in_flight.insert(
            id,
            InFlight {
                abandoned: abandoned.clone(),
                positions,
                savepoint,
                started,
            },
        );
        let job = WriteJob {
            checkpoint: cp,
            record,
            savepoint: savepoint_name,
            started,
            abandoned,
        };
        if self.writer.send(Job::Write(Box::new(job))).is_err() {
            tracing::error!(checkpoint_id = id, "checkpoint writer is gone");
        }
        self.metrics
            .checkpoints_in_flight
            .set(self.scheduler.in_flight() as i64);
        id
    }

    /// Records the end of a failed or abandoned attempt: history (memory and store), metrics,
    /// the savepoint requester.
    fn record_failure(&mut self, id: u64, reason: &str, abandoned: bool) {
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
        let record = self.admin.history().update(id, |r| {
            r.status = status;
            r.failure = Some(reason.to_string());
            r.duration_ms = started.map(|s| s.elapsed().as_millis() as u64);
        });
        if let Some(record) = record {
            let _ = self.writer.send(Job::Record(record));
        }
        if let Some(f) = self.in_flight.remove(&id) {
            if let Some((name, waiter)) = f.savepoint {
                waiter.fail(CommandError::Failed(format!(
                    "savepoint {name} (checkpoint {id}) failed: {reason}"
                )));
            }
        }
    }

    pub(super) fn fail(&mut self, id: u64, reason: &str, abandoned: bool) -> anyhow::Result<()> {
        self.release_after_failure(id);
        let now = self.now();
        match self.scheduler.failed(id, now, reason) {
            Ok(false) => Ok(()),
            Ok(true) => {
                self.record_failure(id, reason, abandoned);
                self.engine.checkpoint_failed(id);
                tracing::warn!(
                    checkpoint_id = id,
                    reason,
                    "checkpoint failed; the next one is a full snapshot"
                );
                Ok(())
            }
            Err(too_many) => {
                self.record_failure(id, reason, abandoned);
                let last_good = match self.last_durable {
                    Some(i) => format!("checkpoint {i}"),
                    None => format!("{}, restored at start,", self.admin.restored_from),
                };
                bail!(
                    "{too_many}; stopping. The last good state ({last_good}) is intact in {}",
                    self.settings.checkpoint.dir.display()
                )
            }
        }
    }

    pub(super) fn on_write_outcome(
        &mut self,
        outcome: WriteOutcome,
        consumer: &Source,
    ) -> anyhow::Result<()> {
        match outcome {
            WriteOutcome::Durable {
                id,
                stats,
                duration,
                checkpoint,
            } => {
                if !self.scheduler.completed(id, self.now()) {
                    tracing::info!(
                        checkpoint_id = id,
                        "abandoned checkpoint was written after its timeout; it is ignored"
                    );
                    return Ok(());
                }
                self.last_durable = Some(id);
                self.publish(&checkpoint);
                let flight = self.in_flight.remove(&id);
                self.engine.checkpoint_completed(id);
                let ready = self.engine.take_emittable();
                let released = ready.len();
                self.sink.emit(ready);
                let m = &self.metrics;
                m.checkpoint_duration.observe(duration.as_secs_f64());
                m.checkpoint_size.set(stats.bytes as i64);
                m.checkpoint_last_id.set(id as i64);
                m.checkpoint_last_time.set(epoch_ms() as f64 / 1000.0);
                m.checkpoints_completed.inc();
                m.checkpoints_in_flight
                    .set(self.scheduler.in_flight() as i64);
                self.admin.history().update(id, |r| {
                    r.status = Status::Completed;
                    r.duration_ms = Some(duration.as_millis() as u64);
                    r.bytes = Some(stats.bytes);
                    r.phases.write_ms = Some(stats.write.as_millis() as u64);
                    r.phases.flush_ms = Some(stats.flush.as_millis() as u64);
                });
                tracing::info!(
                    checkpoint_id = id,
                    duration_ms = duration.as_millis() as u64,
                    write_ms = stats.write.as_millis() as u64,
                    flush_ms = stats.flush.as_millis() as u64,
                    bytes = stats.bytes,
                    released_windows = released,
                    "checkpoint completed"
                );
                let Some(f) = flight else { return Ok(()) };
                if let (Some((_, waiter)), Some(meta)) = (f.savepoint, stats.savepoint) {
                    self.metrics.savepoints.inc();
                    tracing::info!(checkpoint_id = id, savepoint = %meta.name, entries = meta.entries, "savepoint completed");
                    match waiter {
                        SavepointWaiter::Trigger(r) => drop(r.send(Ok(meta))),
                        SavepointWaiter::Stop(r) => drop(r.send(Ok(Some(meta)))),
                    }
                }
                // only members can commit, and only for what they own
                let owned: Vec<(Partition, NextOffset)> = f
                    .positions
                    .into_iter()
                    .filter(|(p, _)| self.assigned.contains(p))
                    .collect();
                source::commit(consumer, &owned);
                Ok(())
            }
            WriteOutcome::Failed { id, reason } => self.fail(id, &reason, false),
            WriteOutcome::Superseded { id, reason } => {
                self.record_failure(id, &reason, false);
                bail!("checkpoint {id} not written: {reason}")
            }
            WriteOutcome::Skipped { id } => {
                tracing::debug!(
                    checkpoint_id = id,
                    "abandoned checkpoint skipped by the writer"
                );
                Ok(())
            }
        }
    }

    /// Abandons checkpoints in flight for longer than the timeout.
    pub(super) fn expire(&mut self) -> anyhow::Result<()> {
        for id in self.scheduler.expired(self.now()) {
            if let Some(f) = self.in_flight.get(&id) {
                f.abandoned.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            let timeout: Duration = self.settings.checkpoint.timeout;
            self.fail(
                id,
                &format!(
                    "abandoned: not durable within checkpoint.timeout ({})",
                    humantime::format_duration(timeout)
                ),
                true,
            )?;
        }
        Ok(())
    }
}
