//! The processing loop: consume, aggregate, checkpoint in the background, emit, and stop
//! gracefully. All decisions are the engine's and the scheduler's; this loop moves facts
//! between them and the I/O tasks.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::mpsc;

use super::handoff::{Changelog, HandoffEvents};
use super::lifecycle::{SavepointRequest, SavepointWaiter};
use crate::checkpoint::writer::{Job, WriteOutcome};
use crate::checkpoint::{Scheduler, StateSpec};
use crate::config::{OnCancel, Settings};
use crate::engine::{Decoder, Engine, Outcome, StateKey};
use crate::http::{AdminState, Command, Progress, Reply};
use crate::metrics::Metrics;
use crate::position::{NextOffset, Partition};
use crate::ratelimit::RateLimit;
use crate::sink::Sink;
use crate::source::{self, Rebalance, Shared, Source};
use crate::store::{SavepointMeta, Store};

/// How often timers (checkpoint due, timeouts, gauges) are evaluated.
const TICK: Duration = Duration::from_millis(50);
/// Minimum time between two identical consumer-error log lines.
pub(super) const ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

pub(super) struct InFlight {
    pub(super) abandoned: Arc<AtomicBool>,
    pub(super) positions: Vec<(Partition, NextOffset)>,
    /// The savepoint's name and who waits for it.
    pub(super) savepoint: Option<(String, SavepointWaiter)>,
    pub(super) started: Instant,
}

pub(super) struct Runtime {
    pub(super) settings: Settings,
    pub(super) spec: StateSpec,
    pub(super) engine: Engine,
    pub(super) decoder: Decoder,
    pub(super) scheduler: Scheduler,
    pub(super) metrics: Arc<Metrics>,
    pub(super) admin: Arc<AdminState>,
    pub(super) shared: Arc<Shared>,
    pub(super) sink: Sink,
    pub(super) writer: mpsc::UnboundedSender<Job>,
    pub(super) in_flight: HashMap<u64, InFlight>,
    pub(super) started: Instant,
    pub(super) assigned: Vec<Partition>,
    pub(super) broker_down: bool,
    /// Invalid records and consumer errors are logged at most every [`ERROR_LOG_EVERY`].
    pub(super) invalid_log: RateLimit,
    pub(super) consumer_error_log: RateLimit,
    pub(super) last_gauges: Instant,
    pub(super) last_durable: Option<u64>,
    /// Assigned partitions whose first record has not arrived yet.
    pub(super) awaiting_first: std::collections::HashSet<Partition>,
    /// A stop was asked for over HTTP.
    pub(super) stop_requested: bool,
    /// The savepoint to take as the last act of that stop (name or default) and its requester.
    pub(super) stop_savepoint: Option<(Option<String>, Reply<Option<SavepointMeta>>)>,
    /// The changelog topic, when partitions' state moves between instances.
    pub(super) changelog: Option<Changelog>,
    /// Revoked partitions waiting for their checkpoint's publication.
    pub(super) releases: super::releases::Releases,
    /// An assignment (possibly empty) was received since the start.
    pub(super) assignment_seen: bool,
    pub(super) released_tx: mpsc::UnboundedSender<(u64, Vec<Partition>)>,
}

/// Runs the service until SIGTERM/SIGINT (Ok) or a fatal error.
async fn shutdown_signal() -> &'static str {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot install SIGTERM handler");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = term => "SIGTERM",
        r = tokio::signal::ctrl_c() => { if r.is_err() { std::future::pending::<()>().await; } "SIGINT" }
    }
}

impl Runtime {
    pub(super) fn now(&self) -> Duration {
        self.started.elapsed()
    }

    pub(super) async fn main_loop(
        &mut self,
        consumer: &Source,
        mut outcomes: mpsc::UnboundedReceiver<WriteOutcome>,
        mut acks: mpsc::UnboundedReceiver<Vec<StateKey>>,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut handoff: HandoffEvents,
        store: Arc<Store>,
    ) -> anyhow::Result<()> {
        let shutdown = shutdown_signal();
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut backoff = Duration::from_millis(100);
        loop {
            if self.stop_requested {
                tracing::info!("stopping: no more records are read; taking a final checkpoint");
                drop(commands);
                return self.stop(consumer, outcomes, acks, &store).await;
            }
            tokio::select! {
                biased;
                signal = &mut shutdown => {
                    tracing::info!(signal, "stopping: no more records are read; taking a final checkpoint");
                    drop(commands);
                    return self.stop(consumer, outcomes, acks, &store).await;
                }
                Some(outcome) = outcomes.recv() => self.on_write_outcome(outcome, consumer)?,
                Some(command) = commands.recv() => self.on_command(command, &store),
                Some(ids) = acks.recv() => self.engine.emitted(ids),
                Some((id, ps)) = handoff.released.recv() => self.on_released(consumer, id, ps),
                Some(f) = handoff.failures.recv() => self.on_publish_failure(f),
                _ = tick.tick() => {
                    // rebalances wait for the loop (assign after restore, release after a
                    // checkpoint); without assigned partitions recv would never return
                    self.apply_rebalances(consumer).await?;
                    self.on_tick(&store)?
                }
                msg = consumer.recv() => {
                    // rebalances run inside recv: apply them before what recv returned
                    self.apply_rebalances(consumer).await?;
                    match msg {
                        Ok(m) => {
                            backoff = Duration::from_millis(100);
                            self.on_message(&m);
                        }
                        Err(KafkaError::PartitionEOF(n)) => {
                            tracing::debug!(partition = n, "end of partition");
                            self.on_eof(consumer, n);
                        }
                        Err(e) => {
                            self.on_consumer_error(consumer, &e);
                            // librdkafka reconnects by itself, reporting every failed attempt:
                            // a broker that refuses connections (one of several, or the group
                            // coordinator) must not hold back the records of partitions whose
                            // leaders answer, so only other errors pause the loop, briefly
                            if e.rdkafka_error_code() != Some(RDKafkaErrorCode::BrokerTransportFailure) {
                                tokio::time::sleep(backoff).await;
                                backoff = (backoff * 2).min(Duration::from_secs(1));
                            }
                        }
                    }
                }
            }
        }
    }

    fn on_message(&mut self, m: &rdkafka::message::BorrowedMessage<'_>) {
        if self.broker_down {
            self.broker_down = false;
            self.shared.set_broker_error(None);
            tracing::info!("receiving records again");
            self.refresh_readiness();
        }
        let p = Partition::new(m.topic(), m.partition());
        if !self.awaiting_first.is_empty() && self.awaiting_first.remove(&p) {
            let held = self.engine.position(&p);
            match held {
                Some(next) if m.offset() > next.0 => {
                    let gap = (m.offset() - next.0) as u64;
                    self.metrics
                        .offset_gap
                        .with_label_values(&[&p.topic, &p.partition.to_string()])
                        .inc_by(gap);
                    tracing::warn!(
                        partition = %p,
                        held = next.0,
                        first = m.offset(),
                        gap,
                        "first record after assignment is beyond the held position: offsets in between were never delivered (compaction or transaction markers explain small gaps; counted in checkpointer_offset_gap_records_total)"
                    )
                }
                Some(next) if next.0 != m.offset() => tracing::warn!(
                    partition = %p,
                    held = next.0,
                    first = m.offset(),
                    "first record after assignment is before the held position"
                ),
                _ => {
                    tracing::debug!(partition = %p, first = m.offset(), "first record after assignment")
                }
            }
        }
        let decoded = self
            .decoder
            .decode(m.key(), m.payload(), m.timestamp().to_millis());
        let outcome = self.engine.process(&p, m.offset(), decoded);
        let metrics = &self.metrics;
        match outcome {
            Outcome::Accepted => metrics.records_consumed.inc(),
            Outcome::Late => {
                metrics.records_consumed.inc();
                metrics.records_late.inc();
            }
            Outcome::Invalid(reason) => {
                metrics.records_consumed.inc();
                metrics.invalid(reason);
                self.log_invalid(&p, m.offset(), reason.label());
            }
            Outcome::Duplicate => {
                metrics.records_duplicate.inc();
                return;
            }
        }
        self.shared.set_position(&p, NextOffset::after(m.offset()));
        let ready = self.engine.take_emittable();
        self.sink.emit(ready);
    }

    fn log_invalid(&mut self, p: &Partition, offset: i64, reason: &str) {
        if let Some(suppressed) = self.invalid_log.check() {
            tracing::warn!(partition = %p, offset, reason, suppressed, "skipping invalid record (further ones are counted in checkpointer_records_invalid_total and logged at most every 10s)");
        }
    }

    fn on_eof(&mut self, consumer: &Source, number: i32) {
        // librdkafka reports only the partition number: it names one partition only when a
        // single assigned partition has that number; otherwise the broker is asked which of
        // the candidates has nothing left to read
        let same_number: Vec<Partition> = self
            .assigned
            .iter()
            .filter(|p| p.partition == number)
            .cloned()
            .collect();
        let unambiguous = same_number.len() == 1;
        for p in same_number {
            let pending = self
                .engine
                .progress()
                .find(|(q, _)| **q == p)
                .is_none_or(|(_, progress)| progress.max_ts.is_none() && !progress.caught_up_empty);
            if !pending {
                continue;
            }
            let at_end = unambiguous
                || match source::watermarks(consumer, &p, Duration::from_secs(1)) {
                    Some((low, high)) => match self.engine.position(&p) {
                        Some(next) => next.0 >= high,
                        // nothing read yet: empty when no record is retained
                        None => low >= high,
                    },
                    None => false,
                };
            if at_end {
                tracing::info!(partition = %p, next_offset = ?self.engine.position(&p), "partition has no data; it does not hold the watermark back until it has");
                self.engine.partition_eof(&p);
            }
        }
        let ready = self.engine.take_emittable();
        self.sink.emit(ready);
    }

    fn on_consumer_error(&mut self, consumer: &Source, e: &KafkaError) {
        if e.rdkafka_error_code() == Some(RDKafkaErrorCode::AutoOffsetReset) {
            self.metrics.offset_out_of_range.inc();
            tracing::warn!(error = %e, "the broker reported a held position out of range; moving every partition back to its held position instead of skipping records (if records were deleted by retention, this repeats: restore the data or start from an empty checkpoint.dir)");
            let positions: Vec<(Partition, Option<NextOffset>)> = self
                .assigned
                .iter()
                .map(|p| (p.clone(), self.engine.position(p)))
                .collect();
            source::reposition(consumer, &positions, self.settings.kafka.auto_offset_reset);
            return;
        }
        // one broker failing is not an outage: its partitions move to other leaders
        let down = e.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown);
        if let Some(suppressed) = self.consumer_error_log.check() {
            tracing::warn!(error = %e, suppressed, "consumer error, retrying");
        }
        if down {
            self.shared.set_broker_error(Some(e.to_string()));
        }
    }

    async fn apply_rebalances(&mut self, consumer: &Source) -> anyhow::Result<()> {
        for event in self.shared.take_events() {
            match event {
                Rebalance::Assign(ps) => self.on_assign(consumer, ps).await?,
                Rebalance::Revoke { partitions, lost } => {
                    self.on_revoke(consumer, partitions, lost)
                }
                Rebalance::Failed(reason) => tracing::warn!(%reason, "rebalance did not complete"),
                Rebalance::Refused(reason) => bail!("{reason}"),
            }
            let ready = self.engine.take_emittable();
            self.sink.emit(ready);
            self.refresh_readiness();
        }
        Ok(())
    }

    pub(super) fn refresh_readiness(&mut self) {
        let broker_error = self.shared.broker_error();
        self.broker_down = broker_error.is_some();
        if let Some(e) = &broker_error {
            self.admin
                .set_ready(false, &format!("broker unreachable: {e}"));
        } else if self.assigned.is_empty() && !self.assignment_seen {
            self.admin
                .set_ready(false, "restored; waiting for partition assignment");
        } else {
            self.admin.set_ready(
                true,
                &format!("{} partitions assigned", self.assigned.len()),
            );
        }
    }

    fn on_tick(&mut self, store: &Store) -> anyhow::Result<()> {
        self.expire()?;
        if self.scheduler.due(self.now()) {
            self.trigger(None);
        }
        if self.shared.broker_error().is_some() != self.broker_down {
            self.refresh_readiness();
        }
        if self.last_gauges.elapsed() >= Duration::from_secs(1) {
            self.last_gauges = Instant::now();
            self.update_gauges(store);
        }
        Ok(())
    }

    fn update_gauges(&self, store: &Store) {
        let m = &self.metrics;
        m.windows_open.set(self.engine.open_windows() as i64);
        m.windows_pending
            .set(self.engine.pending_emissions() as i64);
        m.checkpoints_in_flight
            .set(self.scheduler.in_flight() as i64);
        if let Some(wm) = self.engine.watermark() {
            m.watermark.set(wm as f64 / 1000.0);
        }
        let mut progress = Progress {
            watermark: self.engine.watermark(),
            ..Progress::default()
        };
        for (p, partition) in self.engine.progress() {
            if let Some(ts) = partition.max_ts {
                m.partition_watermark
                    .with_label_values(&[&p.topic, &p.partition.to_string()])
                    .set(ts as f64 / 1000.0);
                progress.max_event_time.insert(p.clone(), ts);
            }
        }
        self.admin.set_progress(progress);
        if let Ok(size) = store.size_on_disk() {
            m.store_size.set(size as i64);
        }
        if let Ok(ids) = store.checkpoint_ids() {
            m.checkpoints_retained.set(ids.len() as i64);
        }
    }

    /// Graceful stop: final checkpoint, emission of what it released, a last checkpoint that
    /// records the acknowledgements, all within `checkpoint.shutdown_timeout`.
    async fn stop(
        &mut self,
        consumer: &Source,
        mut outcomes: mpsc::UnboundedReceiver<WriteOutcome>,
        mut acks: mpsc::UnboundedReceiver<Vec<StateKey>>,
        store: &Store,
    ) -> anyhow::Result<()> {
        // rebalances from here on are completed by the consumer callback itself
        self.shared.set_closing();
        self.admin.set_ready(false, "stopping");
        let deadline = tokio::time::Instant::now() + self.settings.checkpoint.shutdown_timeout;
        let mut final_id: Option<u64> = None;
        let mut savepoint_id: Option<u64> = None;
        loop {
            // a checkpoint is taken once nothing is in flight; the last one is taken after every
            // final window was acknowledged
            if self.scheduler.in_flight() == 0 {
                if let Some(id) = savepoint_id.filter(|id| self.last_durable != Some(*id)) {
                    bail!(
                        "stop with savepoint: savepoint (checkpoint {id}) failed; stopped without it, checkpoints kept in {} (latest: {:?})",
                        self.settings.checkpoint.dir.display(),
                        self.last_durable
                    );
                }
                let done = final_id.is_some_and(|id| self.last_durable == Some(id));
                if done && self.engine.pending_emissions() == 0 && !self.engine.has_changes() {
                    if let Some((name, reply)) = self.stop_savepoint.take() {
                        // the state is settled: the savepoint holds exactly what the stop leaves
                        let name = name.unwrap_or_else(|| {
                            format!("savepoint-{}", self.scheduler.peek_next_id())
                        });
                        if let Err(e) = self.check_savepoint_name(&name, store) {
                            let text = e.to_string();
                            let _ = reply.send(Err(e));
                            bail!("stop with savepoint: {text}; stopped without it");
                        }
                        let id = self.trigger(Some(SavepointRequest {
                            name,
                            waiter: SavepointWaiter::Stop(reply),
                        }));
                        savepoint_id = Some(id);
                        final_id = Some(id);
                        continue;
                    }
                    if savepoint_id.is_some() {
                        // let the HTTP answer reach the requester before the process exits
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    self.changelog_settled(deadline).await;
                    if self.settings.checkpoint.on_cancel == OnCancel::Delete {
                        let deleted = store.delete_checkpoints()?;
                        tracing::info!(deleted, "stopped cleanly; checkpoints deleted (checkpoint.on_cancel: delete): the next start begins without them (savepoints are kept)");
                    } else {
                        tracing::info!(checkpoint_id = ?self.last_durable, "stopped cleanly; the next start resumes here and replays nothing");
                    }
                    return Ok(());
                }
                if !done || self.engine.pending_emissions() == 0 {
                    final_id = Some(self.trigger(None));
                }
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    bail!(
                        "graceful stop did not finish within checkpoint.shutdown_timeout ({}); last durable checkpoint: {:?}, windows awaiting output acknowledgement: {} (they are kept and sent at the next start)",
                        humantime::format_duration(self.settings.checkpoint.shutdown_timeout),
                        self.last_durable,
                        self.engine.pending_emissions()
                    );
                }
                Some(outcome) = outcomes.recv() => self.on_write_outcome(outcome, consumer)?,
                Some(ids) = acks.recv() => self.engine.emitted(ids),
            }
        }
    }
}
