//! Wiring and the processing loop: restore, consume, aggregate, checkpoint in the background,
//! emit, and stop gracefully. All decisions are the engine's and the scheduler's; this file
//! moves facts between them and the I/O tasks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::mpsc;

use crate::checkpoint::history::{CheckpointRecord, History, Status};
use crate::checkpoint::protocol::meta_of;
use crate::checkpoint::scheduler::{SchedulerSettings, Trigger};
use crate::checkpoint::writer::{self, WriteJob, WriteOutcome};
use crate::checkpoint::{Checkpoint, Scheduler, StateSpec};
use crate::config::{duration_ms, CheckpointMode, Settings};
use crate::engine::{Decoder, Engine, EngineConfig, Outcome, StateKey};
use crate::http::{self, AdminState};
use crate::metrics::Metrics;
use crate::position::{NextOffset, Partition};
use crate::sink::{Sink, SinkSettings};
use crate::source::{self, Rebalance, Shared, Source, SourceSettings};
use crate::store::Store;

/// How often timers (checkpoint due, timeouts, gauges) are evaluated.
const TICK: Duration = Duration::from_millis(50);
/// Minimum time between two identical consumer-error log lines.
const ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

fn epoch_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

struct InFlight {
    abandoned: Arc<AtomicBool>,
    positions: Vec<(Partition, NextOffset)>,
}

struct Runtime {
    settings: Settings,
    spec: StateSpec,
    engine: Engine,
    decoder: Decoder,
    scheduler: Scheduler,
    metrics: Arc<Metrics>,
    admin: Arc<AdminState>,
    shared: Arc<Shared>,
    sink: Sink,
    writer: mpsc::UnboundedSender<WriteJob>,
    in_flight: HashMap<u64, InFlight>,
    started: Instant,
    assigned: Vec<Partition>,
    broker_down: bool,
    last_error_log: Option<Instant>,
    suppressed_errors: u64,
    last_gauges: Instant,
    last_durable: Option<u64>,
}

/// Runs the service until SIGTERM/SIGINT (Ok) or a fatal error.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    for w in settings.warnings() {
        tracing::warn!("{w}");
    }
    let metrics = Arc::new(Metrics::new());
    let restore_started = Instant::now();
    let dir = settings.checkpoint.dir.clone();
    let store = tokio::task::spawn_blocking(move || Store::open(&dir))
        .await
        .context("store open task")??;
    let store = Arc::new(store);
    let loaded = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.load())
            .await
            .context("store load task")??
    };
    let windows = settings.window_defs()?;
    let engine_cfg = EngineConfig {
        windows: windows.clone(),
        max_out_of_orderness: duration_ms(settings.watermark.max_out_of_orderness),
        allowed_lateness: duration_ms(settings.watermark.allowed_lateness),
        hold_until_checkpoint: settings.checkpoint.mode == CheckpointMode::ExactlyOnce,
    };
    let mut history = History::new(200);
    if let Ok(past) = store.history(50) {
        for meta in past.iter().rev() {
            history.push(CheckpointRecord::from_meta(meta, Status::Completed));
        }
    }
    let spec = StateSpec {
        windows: windows.clone(),
        aggregates: settings.aggregates.clone(),
    };
    let (engine, restored_id) = match loaded {
        Some((meta, state)) => {
            meta.spec.check_restorable(&spec, meta.id)?;
            let entries = state.entries.len();
            let engine = Engine::restore(engine_cfg, state).with_context(|| {
                format!(
                    "cannot restore checkpoint {} from {}",
                    meta.id,
                    store.path().display()
                )
            })?;
            tracing::info!(
                checkpoint_id = meta.id,
                entries,
                pending_windows = engine.pending_emissions(),
                duration_ms = restore_started.elapsed().as_millis() as u64,
                "restored checkpoint"
            );
            (engine, Some(meta.id))
        }
        None => {
            tracing::info!(dir = %store.path().display(), "no checkpoint found, starting empty");
            (Engine::new(engine_cfg), None)
        }
    };
    metrics
        .restore_duration
        .set(restore_started.elapsed().as_secs_f64());
    if let Some(id) = restored_id {
        metrics.checkpoint_last_id.set(id as i64);
    }

    let admin = Arc::new(AdminState::new(metrics.clone(), history));
    let addr = http::serve(settings.http.listen, admin.clone()).await?;
    tracing::info!(%addr, "http listening");

    let shared = Arc::new(Shared::default());
    for (p, progress) in engine.progress() {
        if let Some(next) = progress.next {
            shared.set_position(p, next);
        }
    }
    let k = &settings.kafka;
    let (sink, acks) = Sink::start(
        source::base_client(&k.brokers, &k.options),
        SinkSettings {
            topic: settings.output.topic.clone(),
            window_names: windows.iter().map(|w| w.name.clone()).collect(),
            aggregates: settings.aggregates.clone(),
        },
        metrics.clone(),
    )?;
    let consumer = source::connect(
        &SourceSettings {
            brokers: &k.brokers,
            group_id: &k.group_id,
            topics: &k.topics,
            auto_offset_reset: k.auto_offset_reset.as_str(),
            instance_id: k.instance_id.as_deref(),
            options: &k.options,
        },
        shared.clone(),
    )?;
    let consumer = Arc::new(consumer);
    source::spawn_lag_monitor(
        consumer.clone(),
        shared.clone(),
        metrics.clone(),
        Duration::from_secs(5),
    );
    let (writer, outcomes) = writer::spawn(store.clone());
    let c = &settings.checkpoint;
    let scheduler = Scheduler::new(
        SchedulerSettings {
            interval: c.interval,
            min_pause: c.min_pause,
            timeout: c.timeout,
            max_concurrent: c.max_concurrent,
            tolerable_failures: c.tolerable_failures,
        },
        restored_id,
    );
    let decoder = Decoder {
        key: settings.key_source()?,
        value: settings.input.value.clone(),
        timestamp: settings.time_source()?,
    };
    let mut rt = Runtime {
        settings,
        spec,
        engine,
        decoder,
        scheduler,
        metrics,
        admin,
        shared,
        sink,
        writer,
        in_flight: HashMap::new(),
        started: Instant::now(),
        assigned: Vec::new(),
        broker_down: false,
        last_error_log: None,
        suppressed_errors: 0,
        last_gauges: Instant::now(),
        last_durable: restored_id,
    };
    // windows the restored checkpoint holds as final were durable there: send them again
    let restored_windows = rt.engine.take_emittable();
    rt.sink.emit(restored_windows);
    rt.refresh_readiness();

    let result = rt.main_loop(&consumer, outcomes, acks, store.clone()).await;
    consumer.unsubscribe();
    result
}

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
    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    async fn main_loop(
        &mut self,
        consumer: &Source,
        mut outcomes: mpsc::UnboundedReceiver<WriteOutcome>,
        mut acks: mpsc::UnboundedReceiver<Vec<StateKey>>,
        store: Arc<Store>,
    ) -> anyhow::Result<()> {
        let shutdown = shutdown_signal();
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut backoff = Duration::from_millis(100);
        loop {
            tokio::select! {
                biased;
                signal = &mut shutdown => {
                    tracing::info!(signal, "stopping: no more records are read; taking a final checkpoint");
                    return self.stop(consumer, outcomes, acks).await;
                }
                Some(outcome) = outcomes.recv() => self.on_write_outcome(outcome, consumer)?,
                Some(ids) = acks.recv() => self.engine.emitted(ids),
                _ = tick.tick() => self.on_tick(&store)?,
                msg = consumer.recv() => {
                    // rebalances run inside recv: apply them before what recv returned
                    self.apply_rebalances()?;
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
                            self.on_consumer_error(&e);
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(5));
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
        let now = Instant::now();
        if self
            .last_error_log
            .is_none_or(|t| now.duration_since(t) >= ERROR_LOG_EVERY)
        {
            tracing::warn!(partition = %p, offset, reason, suppressed = self.suppressed_errors, "skipping invalid record (further ones are counted in checkpointer_records_invalid_total and logged at most every 10s)");
            self.last_error_log = Some(now);
            self.suppressed_errors = 0;
        } else {
            self.suppressed_errors += 1;
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
                self.engine.partition_eof(&p);
            }
        }
        let ready = self.engine.take_emittable();
        self.sink.emit(ready);
    }

    fn on_consumer_error(&mut self, e: &KafkaError) {
        let down = matches!(
            e.rdkafka_error_code(),
            Some(RDKafkaErrorCode::AllBrokersDown | RDKafkaErrorCode::BrokerTransportFailure)
        );
        let now = Instant::now();
        if self
            .last_error_log
            .is_none_or(|t| now.duration_since(t) >= ERROR_LOG_EVERY)
        {
            tracing::warn!(error = %e, "consumer error, retrying with backoff");
            self.last_error_log = Some(now);
        }
        if down {
            self.shared.set_broker_error(Some(e.to_string()));
        }
    }

    fn apply_rebalances(&mut self) -> anyhow::Result<()> {
        for event in self.shared.take_events() {
            match event {
                Rebalance::Assigned(ps) => {
                    for p in &ps {
                        if !self.assigned.contains(p) {
                            self.assigned.push(p.clone());
                        }
                    }
                    self.engine.assign(&ps);
                    self.shared.set_assigned(&self.assigned);
                }
                Rebalance::Revoked { partitions, .. } => {
                    self.assigned.retain(|p| !partitions.contains(p));
                    self.engine.revoke(&partitions);
                    self.shared.set_assigned(&self.assigned);
                }
                Rebalance::Failed(reason) => tracing::warn!(%reason, "rebalance did not complete"),
            }
            let ready = self.engine.take_emittable();
            self.sink.emit(ready);
            self.refresh_readiness();
        }
        Ok(())
    }

    fn refresh_readiness(&mut self) {
        let broker_error = self.shared.broker_error();
        self.broker_down = broker_error.is_some();
        if let Some(e) = &broker_error {
            self.admin
                .set_ready(false, &format!("broker unreachable: {e}"));
        } else if self.assigned.is_empty() {
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
        let now = self.now();
        for id in self.scheduler.expired(now) {
            if let Some(f) = self.in_flight.get(&id) {
                f.abandoned.store(true, Ordering::SeqCst);
            }
            let timeout = self.settings.checkpoint.timeout;
            self.fail(
                id,
                &format!(
                    "abandoned: not durable within checkpoint.timeout ({})",
                    humantime::format_duration(timeout)
                ),
                true,
            )?;
        }
        if self.scheduler.due(now) {
            self.trigger();
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
        for (p, progress) in self.engine.progress() {
            if let Some(ts) = progress.max_ts {
                m.partition_watermark
                    .with_label_values(&[&p.topic, &p.partition.to_string()])
                    .set(ts);
            }
        }
        if let Ok(size) = store.size_on_disk() {
            m.store_size.set(size as i64);
        }
    }

    /// Takes a snapshot and hands it to the writer. Returns the checkpoint id.
    fn trigger(&mut self) -> u64 {
        let Trigger { id, base } = self.scheduler.trigger(self.now());
        let trigger_ms = epoch_ms();
        let started = Instant::now();
        let delta = self.engine.snapshot(id, base.is_none());
        self.metrics
            .checkpoint_stall
            .observe(started.elapsed().as_secs_f64());
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
        self.admin.history().push(record);
        let abandoned = Arc::new(AtomicBool::new(false));
        self.in_flight.insert(
            id,
            InFlight {
                abandoned: abandoned.clone(),
                positions,
            },
        );
        if self
            .writer
            .send(WriteJob {
                checkpoint: cp,
                started,
                abandoned,
            })
            .is_err()
        {
            tracing::error!(checkpoint_id = id, "checkpoint writer is gone");
        }
        self.metrics
            .checkpoints_in_flight
            .set(self.scheduler.in_flight() as i64);
        id
    }

    fn fail(&mut self, id: u64, reason: &str, abandoned: bool) -> anyhow::Result<()> {
        let now = self.now();
        match self.scheduler.failed(id, now, reason) {
            Ok(false) => Ok(()),
            Ok(true) => {
                self.in_flight.remove(&id);
                self.engine.checkpoint_failed(id);
                self.metrics.checkpoint_failures.inc();
                self.admin.history().update(id, |r| {
                    r.status = if abandoned {
                        Status::Abandoned
                    } else {
                        Status::Failed
                    };
                    r.failure = Some(reason.to_string());
                });
                tracing::warn!(
                    checkpoint_id = id,
                    reason,
                    "checkpoint failed; the next one is a full snapshot"
                );
                Ok(())
            }
            Err(too_many) => {
                self.metrics.checkpoint_failures.inc();
                self.admin.history().update(id, |r| {
                    r.status = Status::Failed;
                    r.failure = Some(reason.to_string());
                });
                bail!(
                    "{too_many}; stopping. The last good checkpoint ({}) is intact in {}",
                    self.last_durable
                        .map_or("none".to_string(), |i| i.to_string()),
                    self.settings.checkpoint.dir.display()
                )
            }
        }
    }

    fn on_write_outcome(&mut self, outcome: WriteOutcome, consumer: &Source) -> anyhow::Result<()> {
        match outcome {
            WriteOutcome::Durable {
                id,
                stats,
                duration,
            } => {
                if !self.scheduler.completed(id, self.now()) {
                    tracing::info!(
                        checkpoint_id = id,
                        "abandoned checkpoint was written after its timeout; it is ignored"
                    );
                    return Ok(());
                }
                self.last_durable = Some(id);
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
                if let Some(f) = flight {
                    // only members can commit, and only for what they own
                    let owned: Vec<(Partition, NextOffset)> = f
                        .positions
                        .into_iter()
                        .filter(|(p, _)| self.assigned.contains(p))
                        .collect();
                    source::commit(consumer, &owned);
                }
                Ok(())
            }
            WriteOutcome::Failed { id, reason } => self.fail(id, &reason, false),
            WriteOutcome::Skipped { id } => {
                tracing::debug!(
                    checkpoint_id = id,
                    "abandoned checkpoint skipped by the writer"
                );
                Ok(())
            }
        }
    }

    /// Graceful stop: final checkpoint, emission of what it released, a last checkpoint that
    /// records the acknowledgements, all within `checkpoint.shutdown_timeout`.
    async fn stop(
        &mut self,
        consumer: &Source,
        mut outcomes: mpsc::UnboundedReceiver<WriteOutcome>,
        mut acks: mpsc::UnboundedReceiver<Vec<StateKey>>,
    ) -> anyhow::Result<()> {
        self.admin.set_ready(false, "stopping");
        let deadline = tokio::time::Instant::now() + self.settings.checkpoint.shutdown_timeout;
        let mut final_id: Option<u64> = None;
        loop {
            // a checkpoint is taken once nothing is in flight; the last one is taken after every
            // final window was acknowledged
            if self.scheduler.in_flight() == 0 {
                let done = final_id.is_some_and(|id| self.last_durable == Some(id));
                if done && self.engine.pending_emissions() == 0 && !self.engine.has_changes() {
                    tracing::info!(checkpoint_id = ?self.last_durable, "stopped cleanly; the next start resumes here and replays nothing");
                    return Ok(());
                }
                if !done || self.engine.pending_emissions() == 0 {
                    final_id = Some(self.trigger());
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
