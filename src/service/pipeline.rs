//! The pipeline: the select loop that reads records into the engine and routes events between
//! the components: the checkpoint coordinator (triggers, outcomes), the hand-off (assignments,
//! releases, publications), the output (final windows and their acknowledgements), the status
//! board, and the operator's commands. All decisions are the components' and the pure cores';
//! this loop moves facts between them, and carries out the graceful stop ([`StopSequence`]).

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::mpsc;

use super::backpressure::{Backpressure, Cause, Change};
use super::coordinator::{Coordinator, SavepointRequest, SavepointWaiter, Settled};
use super::edge::{Assignments, Inbox, Output, Receive};
use super::handoff::{Handoff, Restored};
use super::idle::{Idleness, Seen};
use super::out_of_range::{Decision, Probed};
use super::status::Status;
use super::stop::{Facts, Step, StopSequence};
use crate::checkpoint_id::CheckpointId;
use crate::config::{OffsetReset, OnCancel, OnOutOfRange};
use crate::engine::{Decoder, Engine, InvalidReason, Outcome, Record, StateKey, RECORDS_AHEAD};
use crate::http::{Command, Reply};
use crate::memory::Resident;
use crate::metrics::Metrics;
use crate::position::{NextOffset, Partition};
use crate::ratelimit::RateLimit;
use crate::sink::dead_letter::{self, DeadLetter, DeadLetters};
use crate::source::{Rebalance, Shared, Source};
use crate::store::writer::WriteOutcome;
use crate::store::SavepointMeta;

/// How often timers (checkpoint due, timeouts, gauges) are evaluated.
const TICK: Duration = Duration::from_millis(50);
/// Records taken from the consumer's buffer per wake, without going back through the loop.
const DRAIN_MAX: usize = 512;
/// Minimum time between two identical error log lines.
const ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// What does not change while the pipeline runs.
pub(crate) struct PipelineConfig {
    pub auto_offset_reset: OffsetReset,
    pub dir: PathBuf,
    pub shutdown_timeout: Duration,
    pub on_cancel: OnCancel,
    /// `output.max_pending_windows` (0: no bound).
    pub max_pending_windows: usize,
    /// `watermark.max_future_skew`, in milliseconds.
    pub max_future_skew_ms: i64,
    /// Resident bytes past which consumption pauses (`state.max_memory`, or the default share
    /// of the container's limit); `None`: no limit.
    pub max_memory: Option<u64>,
    /// Open windows past which consumption pauses (`state.max_open_windows`); `None`: no
    /// limit.
    pub max_open_windows: Option<usize>,
    /// `watermark.idle_timeout`.
    pub idle_timeout: Option<Duration>,
    /// `watermark.idle_advance: wall_clock`.
    pub idle_wall_clock: bool,
    /// `kafka.on_offset_out_of_range`.
    pub on_out_of_range: OnOutOfRange,
}

/// How long after a revoke records are checked against the assignment (the consumer may
/// still hand over one it fetched for a partition taken away).
const RECENT_REVOKE: Duration = Duration::from_secs(5);
/// Least time between two questions to the broker about partitions out of range.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// Longest pause of reading after a consumer error.
const MAX_CONSUMER_BACKOFF: Duration = Duration::from_secs(1);

/// How often partitions are looked at for idleness.
const IDLE_CHECK_EVERY: Duration = Duration::from_millis(250);

/// Dead-letter copies not acknowledged yet past which consumption pauses until they are.
const MAX_DEAD_LETTERS_OUTSTANDING: u64 = 50_000;
/// How long a checkpoint waiting for dead-letter copies stops reading before the partitions
/// are paused (back-pressure) instead.
const DEAD_LETTER_HOLD: Duration = Duration::from_secs(1);
/// How long a revoke waits for dead-letter copies of the partitions' records.
const REVOKE_DEAD_LETTER_WAIT: Duration = Duration::from_secs(10);

/// How often the resident memory is read.
const MEMORY_READ_EVERY: Duration = Duration::from_millis(250);

/// A stop asked for over HTTP, with the savepoint to take as its last act (name or default)
/// and its requester.
struct StopRequest {
    savepoint: Option<(Option<String>, Reply<Option<SavepointMeta>>)>,
}

pub(crate) struct Pipeline<C, O> {
    config: PipelineConfig,
    engine: Engine,
    decoder: Decoder,
    coordinator: Coordinator,
    handoff: Handoff,
    status: Status,
    consumer: Arc<C>,
    output: O,
    metrics: Arc<Metrics>,
    shared: Arc<Shared>,
    invalid_log: RateLimit,
    consumer_error_log: RateLimit,
    backpressure: Backpressure,
    /// Partitions paused by back-pressure (assigned or not since): all resumed on release, so
    /// that none stays paused if it comes back after a rebalance.
    paused: Vec<Partition>,
    backpressure_log: RateLimit,
    /// The clock back-pressure is judged on.
    started: std::time::Instant,
    stop: Option<StopRequest>,
    /// The process's resident memory, for the memory limit and its gauge.
    memory: Arc<dyn Resident>,
    /// When it was last read.
    memory_read: Option<std::time::Instant>,
    /// Idle partitions (`watermark.idle_timeout`), when configured.
    idleness: Option<Idleness>,
    /// When partitions were last looked at for idleness.
    idle_checked: Option<std::time::Instant>,
    /// The dead-letter topic's writer, when `input.dead_letter_topic` is set.
    dead_letters: Option<DeadLetters>,
    /// Since when a checkpoint that is due waits for dead-letter copies: no record is read
    /// meanwhile, for up to [`DEAD_LETTER_HOLD`]; past it the partitions are paused instead (the
    /// consumer must go on being polled).
    awaiting_dead_letters: Option<std::time::Instant>,
    /// Where the broker's offsets of the assigned partitions go, asked off the loop.
    probes: mpsc::UnboundedSender<Vec<Probed>>,
    /// The broker reported a position out of range and has not been asked which one yet.
    probe_wanted: bool,
    /// The broker is being asked; when the last question was.
    probe_in_flight: bool,
    last_probe: Option<std::time::Instant>,
    /// Reading pauses until then after a consumer error (never a sleep inside the loop).
    consumer_backoff_until: Option<tokio::time::Instant>,
    consumer_backoff: Duration,
    /// When partitions were last revoked: for [`RECENT_REVOKE`] after, records are checked
    /// against the assignment.
    revoked_at: Option<std::time::Instant>,
}

/// The parts a pipeline is made of.
pub(crate) struct Parts<C, O> {
    pub config: PipelineConfig,
    pub engine: Engine,
    pub decoder: Decoder,
    pub coordinator: Coordinator,
    pub handoff: Handoff,
    pub status: Status,
    pub consumer: Arc<C>,
    pub output: O,
    pub metrics: Arc<Metrics>,
    pub shared: Arc<Shared>,
    pub memory: Arc<dyn Resident>,
    pub dead_letters: Option<DeadLetters>,
    pub probes: mpsc::UnboundedSender<Vec<Probed>>,
}

impl<C: Assignments + Send + Sync + 'static, O: Output> Pipeline<C, O> {
    pub(crate) fn new(parts: Parts<C, O>) -> Self {
        // a checkpoint writing for longer than the interval, or an output backlog past its
        // bound, pauses consumption
        let backpressure = Backpressure::new(
            parts.coordinator.interval(),
            parts.config.max_pending_windows,
        )
        .with_memory_limit(parts.config.max_memory)
        .with_open_windows_limit(parts.config.max_open_windows);
        parts
            .metrics
            .memory_limit
            .set(parts.config.max_memory.map_or(0, |m| m as i64));
        parts.metrics.open_windows_limit.set(
            parts
                .config
                .max_open_windows
                .map_or(0, |m| i64::try_from(m).unwrap_or(i64::MAX)),
        );
        let idleness = parts.config.idle_timeout.map(Idleness::new);
        let mut pipeline = Pipeline {
            idleness,
            config: parts.config,
            engine: parts.engine,
            decoder: parts.decoder,
            coordinator: parts.coordinator,
            handoff: parts.handoff,
            status: parts.status,
            consumer: parts.consumer,
            output: parts.output,
            metrics: parts.metrics,
            shared: parts.shared,
            invalid_log: RateLimit::new(ERROR_LOG_EVERY),
            consumer_error_log: RateLimit::new(ERROR_LOG_EVERY),
            backpressure,
            paused: Vec::new(),
            backpressure_log: RateLimit::new(ERROR_LOG_EVERY),
            started: std::time::Instant::now(),
            stop: None,
            memory: parts.memory,
            memory_read: None,
            idle_checked: None,
            dead_letters: parts.dead_letters,
            awaiting_dead_letters: None,
            probes: parts.probes,
            probe_wanted: false,
            probe_in_flight: false,
            last_probe: None,
            consumer_backoff_until: None,
            consumer_backoff: Duration::from_millis(100),
            revoked_at: None,
        };
        // windows the restored checkpoint holds as final were durable there: send them again
        pipeline.emit();
        pipeline.refresh_readiness();
        pipeline
    }

    /// Hands what the engine made final to the output; returns how many windows.
    fn emit(&mut self) -> usize {
        let ready = self.engine.take_emission();
        let n = ready.len();
        self.output.emit(ready);
        n
    }

    fn refresh_readiness(&mut self) {
        self.status.refresh(
            self.handoff.assigned().len(),
            self.handoff.assignment_seen(),
            self.handoff.restoring().len(),
        );
    }

    /// Applies `first`, the record a wake brought, and what the consumer already holds after it
    /// (up to [`DRAIN_MAX`] records), without waiting and without going back through the loop:
    /// records arrive in batches, one wake each. They are applied [`RECORDS_AHEAD`] at a time
    /// (see [`Self::on_messages`]), in the order the consumer returned them: a batch is applied
    /// before a rebalance the consumer reports after it, an end of partition or an error.
    pub(crate) async fn drain<'c, R: Receive>(
        &mut self,
        consumer: &'c R,
        first: R::Message<'c>,
    ) -> anyhow::Result<()> {
        let mut batch = Vec::with_capacity(RECORDS_AHEAD);
        batch.push(first);
        for _ in 0..DRAIN_MAX {
            if self.stop.is_some() || !self.reading() {
                break;
            }
            let Some(msg) = consumer.try_recv() else {
                break;
            };
            // rebalances run inside recv: apply them after the records returned before and
            // before what recv returned
            if self.shared.has_events() {
                self.on_messages(&mut batch);
                self.apply_rebalances().await?;
            }
            match msg {
                Ok(m) => {
                    batch.push(m);
                    if batch.len() == RECORDS_AHEAD {
                        self.on_messages(&mut batch);
                    }
                }
                Err(KafkaError::PartitionEOF(n)) => {
                    self.on_messages(&mut batch);
                    self.on_eof(n);
                }
                Err(e) => {
                    // the loop's own receive handles errors with its backoff
                    self.on_messages(&mut batch);
                    self.on_consumer_error(&e);
                    return Ok(());
                }
            }
        }
        self.on_messages(&mut batch);
        Ok(())
    }

    /// Records from the consumer, in the order it returned them (at most
    /// [`RECORDS_AHEAD`]): all decoded, then their state asked for (see
    /// [`Engine::prefetch`]: the lookups one after another, so that their cache misses
    /// overlap), then each applied in turn. Empties `batch`.
    pub(crate) fn on_messages<M: Message>(&mut self, batch: &mut Vec<M>) {
        debug_assert!(batch.len() <= RECORDS_AHEAD, "a batch of {}", batch.len());
        let decoded: smallvec::SmallVec<[_; RECORDS_AHEAD]> = batch
            .iter()
            .map(|m| {
                let p = Partition::new(m.topic(), m.partition());
                let record = self
                    .decoder
                    .decode(m.key(), m.payload(), m.timestamp().to_millis());
                (p, record)
            })
            .collect();
        self.engine
            .prefetch_records(decoded.iter().map(|(p, record)| (p, record)));
        for (m, (p, record)) in batch.iter().zip(decoded) {
            self.apply(m, p, record);
        }
        batch.clear();
    }

    /// Applies record `m` of partition `p`, decoded as `decoded`.
    fn apply(
        &mut self,
        m: &impl Message,
        p: Partition,
        decoded: Result<Record<'_>, InvalidReason>,
    ) {
        self.status.record_arrived(
            self.handoff.assigned().len(),
            self.handoff.assignment_seen(),
            self.handoff.restoring().len(),
        );
        // a record the consumer returned together with the rebalance that took its partition
        // away belongs to the partition's next owner
        if self
            .revoked_at
            .is_some_and(|at| at.elapsed() < RECENT_REVOKE)
            && !self.handoff.assigned().contains(&p)
        {
            tracing::debug!(partition = %p, offset = m.offset(), "record of a partition no longer assigned: not applied");
            return;
        }
        // assigned paused while its state is restored, and read anew from there after: a
        // record fetched before the pause is read again then
        if !self.handoff.restoring().is_empty() && self.handoff.restoring().contains(&p) {
            tracing::debug!(partition = %p, offset = m.offset(), "record of a partition being restored: not applied");
            return;
        }
        let engine = &self.engine;
        self.handoff
            .check_first_record(&p, m.offset(), || engine.position(&p));
        let outcome = self.engine.process(&p, m.offset(), decoded);
        let metrics = &self.metrics;
        match outcome {
            Outcome::Accepted => metrics.records_consumed.inc(),
            Outcome::Late => {
                metrics.records_consumed.inc();
                metrics.records_late.inc();
                if let Some(d) = self.dead_letters.as_mut() {
                    d.send(DeadLetter::of_input(m, dead_letter::LATE));
                }
            }
            Outcome::Invalid(reason) => {
                metrics.records_consumed.inc();
                metrics.invalid(reason);
                if let Some(d) = self.dead_letters.as_mut() {
                    d.send(DeadLetter::of_input(m, reason.label()));
                }
                if let Some(suppressed) = self.invalid_log.check() {
                    tracing::warn!(partition = %p, offset = m.offset(), reason = reason.label(), suppressed, "skipping invalid record (further ones are counted in checkpointer_records_invalid_total and logged at most every 10s)");
                }
            }
            Outcome::Duplicate => {
                metrics.records_duplicate.inc();
                return;
            }
        }
        self.emit();
    }

    fn on_eof(&mut self, number: i32) {
        // librdkafka reports only the partition number: it names one partition only when a
        // single assigned partition has that number; otherwise the broker is asked which of
        // the candidates has nothing left to read
        let same_number: Vec<Partition> = self
            .handoff
            .assigned()
            .iter()
            .filter(|p| p.partition == number)
            .cloned()
            .collect();
        let unambiguous = same_number.len() == 1;
        if let (Some(idleness), true) = (self.idleness.as_mut(), unambiguous) {
            let now = self.started.elapsed();
            for p in &same_number {
                idleness.end_reached(p, self.engine.position(p), now);
            }
        }
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
                || match self.consumer.watermarks(&p) {
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
        self.emit();
    }

    pub(crate) fn on_consumer_error(&mut self, e: &KafkaError) {
        if e.rdkafka_error_code() == Some(RDKafkaErrorCode::AutoOffsetReset) {
            // librdkafka stops fetching the partition and does not say which one it is: the
            // broker is asked for every assigned partition's offsets, off the loop
            self.metrics.offset_out_of_range.inc();
            tracing::warn!(error = %e, "the broker reported a held position out of range; asking it which partition (kafka.on_offset_out_of_range decides what happens)");
            self.probe_wanted = true;
            self.start_probe();
            return;
        }
        // one broker failing is not an outage: its partitions move to other leaders
        let down = e.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown);
        if let Some(suppressed) = self.consumer_error_log.check() {
            tracing::warn!(error = %e, suppressed, "consumer error, retrying");
        }
        if down {
            self.shared.board().set_broker_error(Some(e.to_string()));
        }
        // librdkafka reconnects by itself, reporting every failed attempt: a broker that
        // refuses connections (one of several, or the group coordinator) must not hold back
        // the records of partitions whose leaders answer, so only other errors pause reading,
        // briefly, with the loop going on meanwhile
        if e.rdkafka_error_code() != Some(RDKafkaErrorCode::BrokerTransportFailure) {
            self.consumer_backoff_until = Some(tokio::time::Instant::now() + self.consumer_backoff);
            self.consumer_backoff = (self.consumer_backoff * 2).min(MAX_CONSUMER_BACKOFF);
        }
    }

    /// A record arrived: errors are over.
    fn consumer_recovered(&mut self) {
        self.consumer_backoff = Duration::from_millis(100);
        self.consumer_backoff_until = None;
    }

    /// Asks the broker for the offsets of every assigned partition, on a blocking thread, at
    /// most once per [`PROBE_EVERY`]; the answer comes back on the inbox's `probes`.
    fn start_probe(&mut self) {
        if !self.probe_wanted
            || self.probe_in_flight
            || self.handoff.rebalancing()
            || self.last_probe.is_some_and(|at| at.elapsed() < PROBE_EVERY)
        {
            return;
        }
        self.probe_wanted = false;
        self.probe_in_flight = true;
        self.last_probe = Some(std::time::Instant::now());
        let held: Vec<(Partition, Option<NextOffset>)> = self
            .handoff
            .assigned()
            .iter()
            .map(|p| (p.clone(), self.engine.position(p)))
            .collect();
        let consumer = self.consumer.clone();
        let tx = self.probes.clone();
        tokio::task::spawn_blocking(move || {
            let probed = held
                .into_iter()
                .filter_map(|(partition, held)| {
                    let (low, high) = consumer.watermarks(&partition)?;
                    Some(Probed {
                        partition,
                        held,
                        low,
                        high,
                    })
                })
                .collect();
            let _ = tx.send(probed);
        });
    }

    /// The broker's offsets after an out-of-range report: each partition whose held position
    /// the broker no longer has follows `kafka.on_offset_out_of_range`; the others are left
    /// alone.
    pub(crate) fn on_probed(&mut self, probed: Vec<Probed>) -> anyhow::Result<()> {
        self.probe_in_flight = false;
        if self.handoff.rebalancing() {
            // assigning anew now would answer the group's pending revoke early, or read
            // partitions waiting for their changelog replay:
            // ask again once it is done
            self.probe_wanted = true;
            return Ok(());
        }
        let policy = self.config.on_out_of_range;
        // judged by the position sent with the question: a partition revoked meanwhile, or one
        // that read on since (it is evidently fetched), is left alone
        let probed: Vec<Probed> = probed
            .into_iter()
            .filter(|p| {
                self.handoff.assigned().contains(&p.partition)
                    && self.engine.position(&p.partition) == p.held
            })
            .collect();
        let mut moves = Vec::new();
        for p in &probed {
            match p.decide(policy) {
                Decision::InRange => {}
                Decision::Fail => bail!("{}", p.failure()),
                Decision::Move { to, skipped } => {
                    if p.held.is_some_and(|NextOffset(held)| to < held) {
                        // offsets move only forward along a line of incremental checkpoints
                        self.coordinator.restart_line();
                    }
                    self.engine.move_position(&p.partition, NextOffset(to));
                    self.metrics
                        .records_skipped(crate::metrics::SKIPPED_OUT_OF_RANGE, skipped);
                    tracing::warn!(partition = %p.partition, held = ?p.held.map(|n| n.0), moved_to = to, skipped, low = p.low, high = p.high, policy = ?policy, "held position out of range: moved by kafka.on_offset_out_of_range; skipped offsets are counted in checkpointer_records_skipped_total");
                    moves.push((p.partition.clone(), to));
                }
            }
        }
        if moves.is_empty() && !probed.is_empty() {
            // no held position is out of range by the broker's offsets now: librdkafka's
            // fetch position was (a topic truncated below what it had fetched ahead), or a
            // partition without a held position started at a committed offset that is gone.
            // librdkafka fetches none of them any more: every partition starts again at its
            // held position, one without at auto_offset_reset's end of what the broker has
            moves = probed
                .iter()
                .map(|p| {
                    let to = p.held.map_or(
                        match self.config.auto_offset_reset {
                            OffsetReset::Earliest => p.low,
                            OffsetReset::Latest => p.high,
                        },
                        |n| n.0,
                    );
                    (p.partition.clone(), to)
                })
                .collect();
            tracing::warn!(partitions = moves.len(), "no held position is out of range by the broker's offsets now; every assigned partition starts again at its held position (one without, at auto_offset_reset)");
        }
        if !moves.is_empty() {
            // the board's positions are those the other partitions start at again where the
            // whole assignment must be renewed
            self.publish_positions();
            self.consumer.restart_at(&moves)?;
            if self.backpressure.engaged() {
                // a partition assigned anew is fetched again: the pause holds for it too
                self.pause_assigned(true);
            }
        }
        Ok(())
    }

    /// Carries out the rebalances the consumer queued.
    async fn apply_rebalances(&mut self) -> anyhow::Result<()> {
        for event in self.shared.take_events() {
            self.on_rebalance(event).await?;
        }
        Ok(())
    }

    /// The changelog replay of an assignment is done: its partitions are read from where the
    /// state they now hold ends.
    pub(crate) fn on_restored(&mut self, restored: Restored) -> anyhow::Result<()> {
        // with an eager assignor every partition is assigned anew, from the board's positions
        self.publish_positions();
        let (engine, coordinator, consumer) =
            (&mut self.engine, &mut self.coordinator, &*self.consumer);
        self.handoff
            .on_restored(engine, coordinator, consumer, restored)?;
        self.after_assignment_change();
        Ok(())
    }

    /// Reads the partitions a replay restored, once no revoke waits for its release.
    fn finish_reading(&mut self) -> anyhow::Result<()> {
        if !self.handoff.waiting_to_read() {
            return Ok(());
        }
        self.publish_positions();
        let (engine, coordinator, consumer) =
            (&mut self.engine, &mut self.coordinator, &*self.consumer);
        if self.handoff.finish_reading(engine, coordinator, consumer)? {
            self.after_assignment_change();
        }
        Ok(())
    }

    /// What follows any change of the assignment.
    fn after_assignment_change(&mut self) {
        if self.backpressure.engaged() {
            // partitions assigned while paused wait too (all of them again: a client may
            // forget a pause when a partition is assigned anew)
            self.pause_assigned(true);
        }
        self.emit();
        self.refresh_readiness();
    }

    /// One rebalance, completed by the hand-off.
    pub(crate) async fn on_rebalance(&mut self, event: Rebalance) -> anyhow::Result<()> {
        // assignments start from the board's positions, which are otherwise published on the
        // tick: bring them up to the engine's first
        self.publish_positions();
        let (engine, coordinator, consumer) =
            (&mut self.engine, &mut self.coordinator, &*self.consumer);
        match event {
            Rebalance::Assign(ps) => self.handoff.on_assign(engine, coordinator, consumer, ps)?,
            Rebalance::Revoke { partitions, lost } => {
                self.revoked_at = Some(std::time::Instant::now());
                // the revoke checkpoint hands the partitions' positions on: their records'
                // dead-letter copies go first
                let deadline = tokio::time::Instant::now() + REVOKE_DEAD_LETTER_WAIT;
                if !lost && !self.dead_letters_written(deadline).await {
                    tracing::warn!(outstanding = self.dead_letters.as_ref().map_or(0, DeadLetters::outstanding), "dead-letter copies still unwritten after 10s at a revoke; the hand-off goes on and they are still being written (a crash now loses them)");
                }
                let (engine, coordinator, consumer) =
                    (&mut self.engine, &mut self.coordinator, &*self.consumer);
                self.handoff
                    .on_revoke(engine, coordinator, consumer, partitions, lost)
            }
            Rebalance::Failed(reason) => tracing::warn!(%reason, "rebalance did not complete"),
            Rebalance::Refused(reason) => bail!("{reason}"),
        }
        self.after_assignment_change();
        Ok(())
    }

    /// Timers: checkpoints due or timed out, readiness, gauges.
    pub(crate) fn on_tick(&mut self) -> anyhow::Result<()> {
        for expired in self.coordinator.expire()? {
            self.on_settled(expired);
        }
        // restored partitions that waited for a release that is no longer pending
        self.finish_reading()?;
        self.read_memory();
        self.check_idle();
        self.start_probe();
        // a checkpoint moves past records only once their dead-letter copies are written:
        // while any is outstanding, no record is read and the checkpoint waits for them
        let outstanding = self
            .dead_letters
            .as_ref()
            .map_or(0, DeadLetters::outstanding);
        self.metrics.dead_letters_pending.set(outstanding as i64);
        let awaiting = outstanding > 0 && (self.coordinator.due() || self.coordinator.has_queued());
        self.awaiting_dead_letters = match (awaiting, self.awaiting_dead_letters) {
            (false, _) => None,
            (true, None) => Some(std::time::Instant::now()),
            (true, since) => since,
        };
        let held_long = self
            .awaiting_dead_letters
            .is_some_and(|since| since.elapsed() >= DEAD_LETTER_HOLD);
        self.backpressure.observe_dead_letters(
            (held_long || outstanding >= MAX_DEAD_LETTERS_OUTSTANDING).then_some(outstanding),
        );
        if !awaiting {
            // an operator's savepoint waiting for room goes before the periodic checkpoint
            self.coordinator.trigger_queued(&mut self.engine);
            if self.coordinator.due() {
                self.coordinator.trigger(&mut self.engine, None);
            }
        }
        self.apply_backpressure();
        if self.status.stale() {
            self.refresh_readiness();
        }
        // positions are published on the tick, not per record
        self.publish_positions();
        self.status.gauges(
            &self.engine,
            self.coordinator.in_flight(),
            &**self.coordinator.store(),
        );
        Ok(())
    }

    /// Whether the consumer is polled now: not during the first [`DEAD_LETTER_HOLD`] a
    /// checkpoint waits for dead-letter copies (past it, back-pressure pauses the partitions
    /// and polling goes on, as it must within `max.poll.interval.ms`), nor during the backoff
    /// after a consumer error.
    fn reading(&self) -> bool {
        self.awaiting_dead_letters
            .is_none_or(|since| since.elapsed() >= DEAD_LETTER_HOLD)
            && self
                .consumer_backoff_until
                .is_none_or(|until| tokio::time::Instant::now() >= until)
    }

    /// Waits until every dead-letter copy handed over is written, or `deadline`.
    async fn dead_letters_written(&self, deadline: tokio::time::Instant) -> bool {
        match &self.dead_letters {
            Some(d) => d.drained(deadline).await,
            None => true,
        }
    }

    /// Whether a changelog replay runs (for tests).
    #[cfg(test)]
    pub(crate) fn restoring(&self) -> bool {
        !self.handoff.restoring().is_empty()
    }

    /// Checkpoints in flight (for tests that settle them).
    #[cfg(test)]
    pub(crate) fn checkpoints_in_flight(&self) -> usize {
        self.coordinator.in_flight()
    }

    /// Marks partitions idle that are caught up and quiet for `watermark.idle_timeout` (their
    /// windows may close then), notes those that moved again, and with `idle_advance:
    /// wall_clock` moves idle partitions' event time with the wall clock.
    fn check_idle(&mut self) {
        let Some(idleness) = self.idleness.as_mut() else {
            return;
        };
        if self
            .idle_checked
            .is_some_and(|at| at.elapsed() < IDLE_CHECK_EVERY)
        {
            return;
        }
        self.idle_checked = Some(std::time::Instant::now());
        // while consumption is paused, partitions are quiet but not caught up
        if self.backpressure.engaged() {
            idleness.paused(self.started.elapsed());
            return;
        }
        let engine = &self.engine;
        let board = self.shared.board();
        let seen = self.handoff.assigned().iter().map(|p| Seen {
            partition: p,
            position: engine.position(p),
            high: board.high(p),
            engine_idle: engine.progress_of(p).is_some_and(|x| x.idle),
        });
        let changes = idleness.evaluate(seen, self.started.elapsed());
        for p in &changes.active {
            tracing::info!(partition = %p, "partition has records again; it holds the watermark back again");
        }
        for p in &changes.idle {
            tracing::info!(partition = %p, next_offset = ?self.engine.position(p), "partition is caught up and quiet for watermark.idle_timeout; it no longer holds the watermark back until its next record");
            self.engine.set_idle(p, true);
        }
        let idle: Vec<Partition> = idleness.idle().cloned().collect();
        self.metrics.partitions_idle.set(idle.len() as i64);
        if self.config.idle_wall_clock {
            let now = crate::clock::epoch_ms();
            for p in &idle {
                self.engine.advance_idle(p, now);
            }
        }
        if !changes.idle.is_empty() || (self.config.idle_wall_clock && !idle.is_empty()) {
            self.emit();
        }
    }

    /// Reads the resident memory when it is due, for back-pressure and the gauge.
    fn read_memory(&mut self) {
        if self
            .memory_read
            .is_some_and(|at| at.elapsed() < MEMORY_READ_EVERY)
        {
            return;
        }
        self.memory_read = Some(std::time::Instant::now());
        if let Some(bytes) = self.memory.resident_bytes() {
            self.backpressure.observe_resident(bytes);
            self.metrics.memory_resident.set(bytes as i64);
        }
    }

    /// Pauses consumption while a checkpoint has been writing for longer than the interval,
    /// the output's backlog is past its bound or the resident memory past its limit, and
    /// resumes it once none is; not ready while memory holds it.
    fn apply_backpressure(&mut self) {
        if self.backpressure.counts_open_windows() {
            self.backpressure
                .observe_open_windows(self.engine.open_windows());
        }
        let change = self.backpressure.evaluate(
            self.coordinator.oldest_in_flight(),
            self.engine.pending_emissions(),
            self.started.elapsed(),
        );
        match change {
            Change::Same => {}
            Change::Engage(cause) => {
                self.pause_assigned(false);
                self.metrics.backpressure.set(1);
                if let Some(suppressed) = self.backpressure_log.check() {
                    match cause {
                        Cause::Checkpoint { id, age } => tracing::warn!(checkpoint_id = id.0, writing_ms = age.as_millis() as u64, interval_ms = self.coordinator.interval().as_millis() as u64, suppressed, "back-pressure: a checkpoint takes longer than checkpoint.interval; consumption is paused until it is durable (checkpointer_backpressure)"),
                        Cause::Output { pending, bound } => tracing::warn!(pending_windows = pending, max_pending_windows = bound, suppressed, "back-pressure: more final windows wait for the output than output.max_pending_windows; consumption is paused until half of them are acknowledged (checkpointer_backpressure)"),
                        Cause::DeadLetters { outstanding } => tracing::warn!(outstanding, suppressed, "back-pressure: copies for input.dead_letter_topic are not written and a checkpoint waits for them (or too many wait); consumption is paused until they are (checkpointer_backpressure, checkpointer_dead_letters_pending)"),
                        Cause::OpenWindows { open, limit } => tracing::warn!(open_windows = open, max_open_windows = limit, pending_windows = self.engine.pending_emissions(), suppressed, "back-pressure: more windows are open than state.max_open_windows; consumption is paused until they are below 90% of it, and the service is not ready meanwhile (checkpointer_backpressure, checkpointer_open_windows_paused)"),
                        Cause::Memory { resident, limit } => tracing::warn!(resident_mib = resident >> 20, max_memory_mib = limit >> 20, pending_windows = self.engine.pending_emissions(), open_windows = self.engine.open_windows(), suppressed, "back-pressure: the process's resident memory passed state.max_memory; consumption is paused until it is below 90% of it, and the service is not ready meanwhile (checkpointer_backpressure)"),
                    }
                }
            }
            Change::Release { paused } => {
                self.consumer.resume(&std::mem::take(&mut self.paused));
                self.metrics.backpressure.set(0);
                self.metrics
                    .backpressure_seconds
                    .inc_by(paused.as_secs_f64());
                tracing::debug!(
                    paused_ms = paused.as_millis() as u64,
                    "back-pressure released: consumption resumed"
                );
            }
        }
        // not ready while a limit on memory or open windows holds consumption paused
        self.metrics
            .memory_paused
            .set(i64::from(self.backpressure.over_memory()));
        self.metrics
            .open_windows_paused
            .set(i64::from(self.backpressure.over_open_windows()));
        let why = self.limit_pause_reason();
        let resumed = why.is_none();
        let before = self.status.limit_pause().map(str::to_owned);
        if self.status.set_limit_pause(why) {
            match before {
                Some(b) if resumed && b.contains("state.max_memory") => {
                    tracing::info!("resident memory is below 90% of state.max_memory again")
                }
                Some(_) if resumed => {
                    tracing::info!("open windows are below 90% of state.max_open_windows again")
                }
                _ => {}
            }
            self.refresh_readiness();
        }
    }

    /// The `/readyz` reason while a limit on memory or open windows holds consumption paused.
    fn limit_pause_reason(&self) -> Option<String> {
        if let Some(limit) = self
            .config
            .max_memory
            .filter(|_| self.backpressure.over_memory())
        {
            return Some(format!(
                "consumption paused: resident memory passed state.max_memory ({} MiB); it resumes below 90% of it",
                limit >> 20
            ));
        }
        self.config
            .max_open_windows
            .filter(|_| self.backpressure.over_open_windows())
            .map(|limit| {
                format!(
                    "consumption paused: open windows passed state.max_open_windows ({limit}); it resumes below 90% of it"
                )
            })
    }

    /// Pauses the assigned partitions not paused yet (every assigned one if `all`).
    fn pause_assigned(&mut self, all: bool) {
        let pause: Vec<Partition> = self
            .handoff
            .assigned()
            .iter()
            .filter(|p| all || !self.paused.contains(p))
            .cloned()
            .collect();
        if pause.is_empty() {
            return;
        }
        self.consumer.pause(&pause);
        for p in pause {
            if !self.paused.contains(&p) {
                self.paused.push(p);
            }
        }
    }

    /// Publishes the position of every partition the engine holds to the status board.
    fn publish_positions(&self) {
        let board = self.shared.board();
        for (p, progress) in self.engine.progress() {
            if let Some(next) = progress.next {
                board.set_position(p, next);
            }
        }
    }

    /// An operator's request.
    pub(crate) fn on_command(&mut self, command: Command) {
        match command {
            Command::Stop {
                savepoint: None,
                reply,
            } => {
                tracing::info!("stop requested over HTTP");
                let _ = reply.send(Ok(None));
                self.stop = Some(StopRequest { savepoint: None });
            }
            Command::Stop {
                savepoint: Some(name),
                reply,
            } => {
                if let Some(n) = &name {
                    if let Err(e) = self.coordinator.take_over_savepoint_name(n) {
                        let _ = reply.send(Err(e));
                        return;
                    }
                }
                // the savepoint is taken once the stop has settled, so it is the final state
                tracing::info!(savepoint = ?name, "stop with savepoint requested over HTTP");
                self.stop = Some(StopRequest {
                    savepoint: Some((name, reply)),
                });
            }
            Command::Savepoint { name, reply } => {
                // a savepoint moves past records only once their dead-letter copies are
                // written: with copies outstanding it is queued and taken on the tick
                let copies_written = self
                    .dead_letters
                    .as_ref()
                    .is_none_or(|d| d.outstanding() == 0);
                self.coordinator
                    .request_savepoint(&mut self.engine, name, reply, copies_written)
            }
        }
    }

    /// A write outcome from the store's writer.
    pub(crate) fn on_write_outcome(&mut self, outcome: WriteOutcome) -> anyhow::Result<()> {
        let settled = self.coordinator.settle(outcome)?;
        self.on_settled(settled);
        self.apply_backpressure();
        Ok(())
    }

    fn on_settled(&mut self, settled: Settled) {
        match settled {
            Settled::Nothing => {}
            Settled::Durable(durable) => {
                let id = durable.id;
                self.handoff
                    .publish(&mut self.coordinator, &durable.checkpoint);
                self.engine.checkpoint_completed(id);
                let released = self.emit();
                let positions = self.coordinator.record_completion(durable, released);
                self.consumer.commit(&self.handoff.owned(id, positions));
            }
            Settled::Failed { id, forget } => {
                self.handoff.release_after_failure(id);
                if forget {
                    self.engine.checkpoint_failed(id);
                }
            }
        }
    }

    /// The output acknowledged these windows.
    pub(crate) fn on_acknowledged(&mut self, ids: Vec<StateKey>) {
        self.engine.emitted(ids);
    }

    /// A revoke checkpoint's publication completed (or failed).
    pub(crate) fn on_released(
        &mut self,
        id: CheckpointId,
        partitions: Vec<Partition>,
    ) -> anyhow::Result<()> {
        self.handoff.on_released(
            &mut self.engine,
            &mut self.coordinator,
            &*self.consumer,
            id,
            partitions,
        );
        // partitions restored meanwhile waited for the release
        self.finish_reading()
    }

    /// The hand-off, for in-process tests to look at.
    #[cfg(test)]
    pub(crate) fn handoff(&self) -> &Handoff {
        &self.handoff
    }

    /// The engine, for in-process tests to look at.
    #[cfg(test)]
    pub(crate) fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Graceful stop: final checkpoint, emission of what it released, a last checkpoint that
    /// records the acknowledgements, all within `checkpoint.shutdown_timeout`; then the
    /// savepoint, if the stop asked for one.
    pub(crate) async fn stop(&mut self, inbox: &mut Inbox) -> anyhow::Result<()> {
        // rebalances from here on are completed by the consumer callback itself; partitions
        // still waiting for their changelog replay are never read here
        self.shared.set_closing();
        self.handoff.cancel_restore();
        self.status.stopping();
        let deadline = tokio::time::Instant::now() + self.config.shutdown_timeout;
        self.coordinator.drop_queued();
        // the final checkpoint moves past every record read: their dead-letter copies first
        tokio::select! {
            written = self.dead_letters_written(deadline) => if !written {
                bail!(
                    "graceful stop did not finish within checkpoint.shutdown_timeout ({}): {} dead-letter copies are not written (their records are read again at the next start); last durable checkpoint: {:?}",
                    humantime::format_duration(self.config.shutdown_timeout),
                    self.dead_letters.as_ref().map_or(0, DeadLetters::outstanding),
                    self.coordinator.last_durable()
                );
            },
            Some(message) = inbox.fatal.recv() => bail!("{message}"),
        }
        let mut savepoint = self.stop.take().and_then(|s| s.savepoint);
        let mut sequence = StopSequence::new(savepoint.as_ref().map(|(name, _)| name.clone()));
        loop {
            let facts = Facts {
                in_flight: self.coordinator.in_flight(),
                last_durable: self.coordinator.last_durable(),
                refused_savepoint: self.coordinator.refused_savepoint(),
                pending_emissions: self.engine.pending_emissions(),
                has_changes: self.engine.has_changes(),
            };
            match sequence.next(facts) {
                Step::Wait => {}
                Step::Checkpoint => {
                    let id = self.coordinator.trigger(&mut self.engine, None);
                    sequence.triggered(id, false);
                }
                Step::Savepoint(name) => {
                    let Some((_, reply)) = savepoint.take() else {
                        bail!("stop with savepoint: the requester is gone");
                    };
                    // the state is settled: the savepoint holds exactly what the stop leaves
                    let name = name.unwrap_or_else(|| self.coordinator.default_savepoint_name());
                    if let Err(e) = self.coordinator.check_savepoint_name(&name) {
                        let text = e.to_string();
                        let _ = reply.send(Err(e));
                        bail!("stop with savepoint: {text}; stopped without it");
                    }
                    let request = SavepointRequest {
                        name,
                        waiter: SavepointWaiter::Stop(reply),
                    };
                    let id = self.coordinator.trigger(&mut self.engine, Some(request));
                    sequence.triggered(id, true);
                    continue;
                }
                Step::SavepointFailed(id) => bail!(
                    "stop with savepoint: savepoint (checkpoint {id}) failed; stopped without it, checkpoints kept in {} (latest: {:?})",
                    self.config.dir.display(),
                    self.coordinator.last_durable()
                ),
                Step::Done { savepoint } => {
                    if savepoint {
                        // let the HTTP answer reach the requester before the process exits
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    self.handoff.settled(deadline).await;
                    if self.config.on_cancel == OnCancel::Delete {
                        // the store's removals and syncs block: on a blocking thread
                        let store = Arc::clone(self.coordinator.store());
                        let deleted =
                            tokio::task::spawn_blocking(move || store.delete_checkpoints())
                                .await
                                .context("checkpoint.on_cancel: delete")??;
                        tracing::info!(deleted, "stopped cleanly; checkpoints deleted (checkpoint.on_cancel: delete): the next start begins without them (savepoints are kept)");
                    } else {
                        tracing::info!(checkpoint_id = ?self.coordinator.last_durable(), "stopped cleanly; the next start resumes here and replays nothing");
                    }
                    return Ok(());
                }
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    bail!(
                        "graceful stop did not finish within checkpoint.shutdown_timeout ({}); last durable checkpoint: {:?}, windows awaiting output acknowledgement: {} (they are kept and sent at the next start)",
                        humantime::format_duration(self.config.shutdown_timeout),
                        self.coordinator.last_durable(),
                        self.engine.pending_emissions()
                    );
                }
                Some(outcome) = inbox.outcomes.recv() => self.on_write_outcome(outcome)?,
                Some(ids) = inbox.acks.recv() => self.on_acknowledged(ids),
                Some(message) = inbox.fatal.recv() => bail!("{message}"),
            }
        }
    }
}

impl<O: Output> Pipeline<Source, O> {
    /// Runs until `shutdown` completes (then stops gracefully), a stop is asked for over HTTP,
    /// or a fatal error.
    pub(crate) async fn run(
        mut self,
        mut inbox: Inbox,
        shutdown: impl Future<Output = &'static str>,
    ) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let consumer = self.consumer.clone();
        loop {
            if self.stop.is_some() {
                tracing::info!("stopping: no more records are read; taking a final checkpoint");
                inbox.refuse_commands();
                return self.stop(&mut inbox).await;
            }
            tokio::select! {
                biased;
                signal = &mut shutdown => {
                    tracing::info!(signal, "stopping: no more records are read; taking a final checkpoint");
                    inbox.refuse_commands();
                    return self.stop(&mut inbox).await;
                }
                Some(outcome) = inbox.outcomes.recv() => self.on_write_outcome(outcome)?,
                Some(command) = inbox.commands.recv() => self.on_command(command),
                Some(ids) = inbox.acks.recv() => self.on_acknowledged(ids),
                Some((id, ps)) = inbox.released.recv() => self.on_released(id, ps)?,
                Some(f) = inbox.failures.recv() => self.handoff.on_publish_failure(&mut self.coordinator, f),
                Some(message) = inbox.fatal.recv() => bail!("{message}"),
                Some(probed) = inbox.probes.recv() => self.on_probed(probed)?,
                Some(restored) = inbox.restored.recv() => {
                    // a revoke the consumer already reported goes first: reading the restored
                    // partitions waits for its release
                    self.apply_rebalances().await?;
                    self.on_restored(restored)?
                }
                _ = tick.tick() => {
                    // rebalances wait for the loop (release after a checkpoint); without
                    // assigned partitions recv would never return
                    self.apply_rebalances().await?;
                    self.on_tick()?
                }
                msg = consumer.recv(), if self.reading() => {
                    // rebalances run inside recv: apply them before what recv returned
                    self.apply_rebalances().await?;
                    match msg {
                        Ok(m) => {
                            self.consumer_recovered();
                            // the wall clock once per wake, for this record and those drained
                            // with it
                            self.engine.set_not_after(Some(
                                crate::clock::epoch_ms().saturating_add(self.config.max_future_skew_ms),
                            ));
                            self.drain(&*consumer, m).await?;
                        }
                        Err(KafkaError::PartitionEOF(n)) => {
                            tracing::debug!(partition = n, "end of partition");
                            self.on_eof(n);
                        }
                        Err(e) => self.on_consumer_error(&e),
                    }
                }
            }
        }
    }
}
