//! The Kafka consumer: subscribes to the input topics (group membership, `state.scope:
//! partition`) or assigns their partitions directly (`state.scope: instance`, see [`direct`])
//! and, on every assignment, starts each partition at the position the service holds for it
//! (from its checkpoint or its own progress), whatever the consumer group has committed.
//! Offsets are committed to the group only after a checkpoint is durable, so lag tools see
//! progress.

pub mod direct;
pub mod ownership;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::board::StatusBoard;
use crate::config::OffsetReset;
use crate::kafka_log::ErrorLog;
use crate::lock::lock;
use crate::metrics::Metrics;
use crate::position::{NextOffset, Partition};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot create the Kafka consumer: {0}")]
    Create(#[source] KafkaError),
    #[error("cannot subscribe to topics {topics:?}: {source}")]
    Subscribe {
        topics: Vec<String>,
        #[source]
        source: KafkaError,
    },
    #[error("cannot apply assignment of {partitions:?}: {source}")]
    Assign {
        partitions: Vec<String>,
        #[source]
        source: KafkaError,
    },
}

/// A change of the partitions this instance owns, handed to the processing loop, which then
/// completes it with `assign` or `release` (librdkafka lets the application do so after the
/// rebalance callback returned): state is restored before a partition's first record and
/// checkpointed before the partition goes to another instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rebalance {
    /// To be assigned: call `assign` once their positions are known.
    Assign(Vec<Partition>),
    /// To be released: call `release` once their state is safe. `lost`: another member may
    /// own them already (session expired).
    Revoke {
        partitions: Vec<Partition>,
        lost: bool,
    },
    Failed(String),
    /// The start must not go ahead (another instance consumes the same group): the reason.
    Refused(String),
}

/// Shared between the processing loop and the consumer's callbacks (rebalances run inside
/// `recv`): the rebalances waiting for the loop, the shutdown flag, partitions to read from
/// their beginning, the last commit; and the status board, whose positions the assignments
/// start from.
pub struct Shared {
    /// Set when the loop stops serving rebalances (shutdown): the callback completes them.
    closing: std::sync::atomic::AtomicBool,
    events: Mutex<Vec<Rebalance>>,
    /// Whether `events` holds any: read per record without taking the lock.
    pending: std::sync::atomic::AtomicBool,
    /// Partitions added to the topics (found while running, or while the service was down):
    /// read from their beginning when nothing is held for them.
    from_beginning: Mutex<std::collections::HashSet<Partition>>,
    /// The positions last committed to the group, and when.
    committed: Mutex<Committed>,
    board: Arc<StatusBoard>,
}

/// The positions last committed to the group, and when.
type Committed = (Vec<(Partition, NextOffset)>, Option<std::time::Instant>);

impl Shared {
    pub fn new(board: Arc<StatusBoard>) -> Self {
        Shared {
            closing: Default::default(),
            events: Default::default(),
            pending: Default::default(),
            from_beginning: Default::default(),
            committed: Default::default(),
            board,
        }
    }

    /// The status board: held positions, assignment, brokers' reachability.
    pub fn board(&self) -> &StatusBoard {
        &self.board
    }

    /// From now on rebalances are completed in the callback itself (the loop has stopped).
    pub fn set_closing(&self) {
        self.closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn closing(&self) -> bool {
        self.closing.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Partitions to start at their earliest offset when no position is held for them.
    pub fn from_beginning_snapshot(&self) -> std::collections::HashSet<Partition> {
        lock(&self.from_beginning).clone()
    }

    /// `partitions` start at their earliest offset when no position is held for them.
    pub fn start_from_beginning(&self, partitions: &[Partition]) {
        lock(&self.from_beginning).extend(partitions.iter().cloned());
    }

    fn set_committed(&self, positions: Vec<(Partition, NextOffset)>) {
        *lock(&self.committed) = (positions, Some(std::time::Instant::now()));
    }

    /// The positions last committed.
    pub fn committed(&self) -> Vec<(Partition, NextOffset)> {
        lock(&self.committed).0.clone()
    }

    /// Something was committed, longer than `every` ago.
    fn commit_due(&self, every: std::time::Duration) -> bool {
        let committed = lock(&self.committed);
        !committed.0.is_empty() && committed.1.is_none_or(|t| t.elapsed() >= every)
    }

    /// Whether a rebalance waits to be taken ([`Shared::take_events`]).
    pub fn has_events(&self) -> bool {
        self.pending.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn take_events(&self) -> Vec<Rebalance> {
        if !self.has_events() {
            return Vec::new();
        }
        let mut events = lock(&self.events);
        self.pending
            .store(false, std::sync::atomic::Ordering::Release);
        std::mem::take(&mut *events)
    }

    pub(crate) fn push(&self, e: Rebalance) {
        let mut events = lock(&self.events);
        events.push(e);
        self.pending
            .store(true, std::sync::atomic::Ordering::Release);
    }
}

pub struct SourceContext {
    shared: Arc<Shared>,
    errors: ErrorLog,
    /// Start of a partition the service holds no position for.
    reset: Offset,
    /// Partitions are assigned directly, without group membership.
    direct: bool,
    /// A partition with no held position starts at the group's committed offset, if any.
    from_committed: bool,
    /// The metadata of every offset commit.
    tag: ownership::CommitTag,
}

impl ClientContext for SourceContext {
    fn error(&self, error: KafkaError, reason: &str) {
        match error.rdkafka_error_code() {
            // reaching the end of a partition is reported on the consumer queue as well
            Some(RDKafkaErrorCode::PartitionEOF) => tracing::trace!(reason, "end of partition"),
            Some(RDKafkaErrorCode::AllBrokersDown) => {
                self.errors.report("consumer", &error, reason);
                self.shared
                    .board()
                    .set_broker_error(Some(reason.to_string()));
            }
            _ => self.errors.report("consumer", &error, reason),
        }
    }
}

/// The group's committed offsets of `partitions` (those it has; none if the broker cannot
/// say, logged).
fn committed_offsets<C: Consumer<SourceContext>>(
    consumer: &C,
    partitions: &[&Partition],
) -> HashMap<Partition, NextOffset> {
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition(&p.topic, p.partition);
    }
    match consumer.committed_offsets(tpl, Duration::from_secs(10)) {
        Ok(found) => found
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) if o >= 0 => {
                    Some((Partition::new(e.topic(), e.partition()), NextOffset(o)))
                }
                _ => None,
            })
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the group's committed offsets; partitions without a checkpointed position start per auto_offset_reset");
            HashMap::new()
        }
    }
}

/// The partitions of `partitions` whose start is looked up among the group's committed
/// offsets: with `kafka.start_from: committed` (`look_up`), those with no held position that
/// the restored checkpoint's topics did not gain while the service was down. The service passes
/// `look_up` false while it stops: partitions assigned then are never read, and the lookup (up
/// to 10 s, in the consumer's rebalance callback) would only hold the stop up.
fn to_look_up<'a>(
    partitions: &'a [Partition],
    positions: &HashMap<Partition, NextOffset>,
    from_beginning: &std::collections::HashSet<Partition>,
    look_up: bool,
) -> Vec<&'a Partition> {
    if !look_up {
        return Vec::new();
    }
    partitions
        .iter()
        .filter(|p| !positions.contains_key(*p) && !from_beginning.contains(*p))
        .collect()
}

fn partitions_of(tpl: &TopicPartitionList) -> Vec<Partition> {
    tpl.elements()
        .iter()
        .map(|e| Partition::new(e.topic(), e.partition()))
        .collect()
}

impl SourceContext {
    /// Assigns `partitions`, each at the service's position for it, else (with
    /// `kafka.start_from: committed`) at the group's committed offset, else per
    /// `start_from`/`auto_offset_reset`. A partition the restored checkpoint's topics gained
    /// while the service was down starts at its beginning.
    fn assign_at_positions<C: Consumer<Self>>(
        &self,
        consumer: &C,
        partitions: &[Partition],
    ) -> Result<(), SourceError> {
        let mut tpl = TopicPartitionList::new();
        let positions = self.shared.board().positions();
        let from_beginning = self.shared.from_beginning_snapshot();
        // read once: the lookup and the log below agree
        let closing = self.shared.closing();
        let unknown = to_look_up(
            partitions,
            &positions,
            &from_beginning,
            self.from_committed && !closing,
        );
        let committed = if unknown.is_empty() {
            HashMap::new()
        } else {
            committed_offsets(consumer, &unknown)
        };
        for p in partitions {
            let start = match positions.get(p) {
                Some(next) => Offset::Offset(next.0),
                None if from_beginning.contains(p) => Offset::Beginning,
                None => committed
                    .get(p)
                    .map_or(self.reset, |next| Offset::Offset(next.0)),
            };
            tpl.add_partition_offset(&p.topic, p.partition, start)
                .map_err(|source| SourceError::Assign {
                    partitions: vec![p.to_string()],
                    source,
                })?;
        }
        let result = if self.direct || is_cooperative(consumer) {
            consumer.incremental_assign(&tpl)
        } else {
            consumer.assign(&tpl)
        };
        result.map_err(|source| SourceError::Assign {
            partitions: partitions.iter().map(ToString::to_string).collect(),
            source,
        })?;
        for p in partitions {
            if closing {
                tracing::info!(partition = %p, "partition assigned while the service stops: not read");
                continue;
            }
            match positions.get(p) {
                Some(next) => {
                    tracing::info!(partition = %p, next_offset = next.0, "partition assigned, resuming at checkpointed position")
                }
                None => match committed.get(p) {
                    Some(next) => {
                        tracing::info!(partition = %p, next_offset = next.0, "partition assigned, no checkpointed position: starting at the group's committed offset (kafka.start_from: committed)")
                    }
                    None => {
                        tracing::info!(partition = %p, "partition assigned, no checkpointed position: starting per kafka.start_from / auto_offset_reset")
                    }
                },
            }
        }
        Ok(())
    }

    fn release<C: Consumer<Self>>(&self, consumer: &C, partitions: &[Partition]) {
        let result = if self.direct || is_cooperative(consumer) {
            let mut tpl = TopicPartitionList::new();
            for p in partitions {
                tpl.add_partition(&p.topic, p.partition);
            }
            consumer.incremental_unassign(&tpl)
        } else {
            consumer.unassign()
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "unassign failed");
        }
    }
}

fn is_cooperative<C: Consumer<SourceContext>>(consumer: &C) -> bool {
    matches!(
        consumer.rebalance_protocol(),
        RebalanceProtocol::Cooperative
    )
}

/// Completes an `Assign` event: assigns `partitions` at the positions now in `Shared`.
pub fn assign(consumer: &Source, partitions: &[Partition]) -> Result<(), SourceError> {
    consumer.context().assign_at_positions(consumer, partitions)
}

/// Pauses (or resumes) fetching `partitions`. librdkafka drops what it fetched ahead for a
/// paused partition and resumes after the last record it delivered, so nothing is skipped.
pub fn pause(consumer: &Source, partitions: &[Partition], pause: bool) {
    if partitions.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition(&p.topic, p.partition);
    }
    let result = if pause {
        consumer.pause(&tpl)
    } else {
        consumer.resume(&tpl)
    };
    if let Err(e) = result {
        tracing::warn!(error = %e, pause, "cannot pause or resume partitions");
    }
}

/// Completes a `Revoke` event: lets `partitions` go to their new owner.
pub fn release(consumer: &Source, partitions: &[Partition]) {
    consumer.context().release(consumer, partitions)
}

impl ConsumerContext for SourceContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let partitions = partitions_of(tpl);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                if !self.shared.closing() {
                    self.shared.push(Rebalance::Assign(partitions));
                } else if let Err(e) = self.assign_at_positions(consumer, &partitions) {
                    tracing::error!(error = %e, "assignment failed");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let lost = consumer.assignment_lost();
                tracing::info!(partitions = ?partitions.iter().map(ToString::to_string).collect::<Vec<_>>(), lost, "partitions revoked");
                if self.shared.closing() {
                    self.release(consumer, &partitions);
                } else {
                    self.shared.push(Rebalance::Revoke { partitions, lost });
                }
            }
            other => {
                let message = format!("rebalance error: {other:?}");
                tracing::warn!(error = %message, "rebalance failed");
                if let Err(e) = consumer.unassign() {
                    tracing::error!(error = %e, "unassign after rebalance error failed");
                }
                self.shared.push(Rebalance::Failed(message));
            }
        }
    }
}

pub type Source = StreamConsumer<SourceContext>;

pub struct SourceSettings<'a> {
    pub brokers: &'a str,
    pub group_id: &'a str,
    pub topics: &'a [String],
    pub auto_offset_reset: OffsetReset,
    /// A partition with no held position starts at the group's committed offset, if any
    /// (`kafka.start_from: committed`).
    pub from_committed: bool,
    pub instance_id: Option<&'a str>,
    pub options: &'a std::collections::BTreeMap<String, String>,
    /// Assign partitions directly ([`direct`]) instead of subscribing as a group member.
    pub direct: bool,
    /// The metadata of every offset commit.
    pub tag: ownership::CommitTag,
}

/// What librdkafka fetches ahead of the loop at most, unless `kafka.options` says otherwise
/// (`queued.max.messages.kbytes`; librdkafka's own default is 64 MiB). A second or more of
/// records at the rates one instance reads. With the default, librdkafka held about 40 MB of
/// the service's peak heap at 10k keys, most of it records fetched ahead, for no gain in speed.
pub const CONSUMER_QUEUE_KBYTES: u32 = 16 * 1024;

/// librdkafka settings shared by the consumer and the producer.
pub fn base_client(
    brokers: &str,
    options: &std::collections::BTreeMap<String, String>,
) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    for (k, v) in options {
        c.set(k, v);
    }
    c
}

/// The consumer's librdkafka settings: `kafka.options`, then what the service manages.
fn consumer_client(settings: &SourceSettings<'_>) -> ClientConfig {
    let mut c = base_client(settings.brokers, settings.options);
    c.set("group.id", settings.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        // start offsets are always set explicitly (held position, else auto_offset_reset as
        // Beginning/End); librdkafka must never move a position on its own, or records would
        // be skipped silently when a broker reports a position out of range
        .set("auto.offset.reset", "error");
    if !settings.options.contains_key("queued.max.messages.kbytes") {
        c.set(
            "queued.max.messages.kbytes",
            CONSUMER_QUEUE_KBYTES.to_string(),
        );
    }
    if let (Some(id), false) = (settings.instance_id, settings.direct) {
        c.set("group.instance.id", id);
    }
    c
}

/// Creates the consumer and, unless partitions are assigned directly, subscribes. Positions
/// known before the first assignment must be put in `shared` first.
pub fn connect(settings: &SourceSettings<'_>, shared: Arc<Shared>) -> Result<Source, SourceError> {
    let consumer: Source = consumer_client(settings)
        .create_with_context(SourceContext {
            shared,
            errors: ErrorLog::default(),
            reset: match settings.auto_offset_reset {
                OffsetReset::Latest => Offset::End,
                OffsetReset::Earliest => Offset::Beginning,
            },
            direct: settings.direct,
            from_committed: settings.from_committed,
            tag: settings.tag.clone(),
        })
        .map_err(SourceError::Create)?;
    if settings.direct {
        return Ok(consumer);
    }
    let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(|source| SourceError::Subscribe {
            topics: settings.topics.to_vec(),
            source,
        })?;
    Ok(consumer)
}

/// Reading each of `moves` (partition, offset) starts again at its offset. After an
/// out-of-range report librdkafka has stopped fetching the partition and refuses a seek
/// ("Erroneous state"), so the partitions are assigned anew: on their own where assignments
/// are incremental, else the whole assignment once more, every other partition at the position
/// the board holds (nothing is skipped or read twice: the loop has applied every record
/// delivered up to those positions).
pub fn restart_at(consumer: &Source, moves: &[(Partition, i64)]) -> Result<(), SourceError> {
    if moves.is_empty() {
        return Ok(());
    }
    let context = consumer.context();
    let board = context.shared.board();
    for (p, offset) in moves {
        board.set_position(p, NextOffset(*offset));
    }
    let moved: Vec<Partition> = moves.iter().map(|(p, _)| p.clone()).collect();
    reassign(consumer, &moved)
}

/// Reads `partitions` (assigned) again from the positions the board holds for them, whatever
/// librdkafka fetched or was told before: they are assigned anew (with an eager assignor, the
/// whole assignment is).
pub fn reassign(consumer: &Source, partitions: &[Partition]) -> Result<(), SourceError> {
    if partitions.is_empty() {
        return Ok(());
    }
    let context = consumer.context();
    let moved = partitions.to_vec();
    let failed = |source| SourceError::Assign {
        partitions: moved.iter().map(ToString::to_string).collect(),
        source,
    };
    if context.direct || is_cooperative(consumer) {
        let mut tpl = TopicPartitionList::new();
        for p in &moved {
            tpl.add_partition(&p.topic, p.partition);
        }
        consumer.incremental_unassign(&tpl).map_err(failed)?;
        context.assign_at_positions(consumer, &moved)
    } else {
        let all: Vec<Partition> = consumer
            .assignment()
            .map_err(failed)?
            .elements()
            .iter()
            .map(|e| Partition::new(e.topic(), e.partition()))
            .collect();
        context.assign_at_positions(consumer, &all)
    }
}

/// Commits checkpointed positions to the consumer group (advisory, for lag tools), tagged
/// with the store that made them.
pub fn commit(consumer: &Source, positions: &[(Partition, NextOffset)]) {
    if positions.is_empty() {
        return;
    }
    let context = consumer.context();
    match direct::commit_tagged(consumer, positions, &context.tag, CommitMode::Async) {
        Ok(()) => context.shared.set_committed(positions.to_vec()),
        Err(e) => {
            tracing::debug!(error = %e, "offset commit to the consumer group failed (advisory only)")
        }
    }
}

/// The high watermark of a partition, asked of the broker (blocking, bounded by `timeout`).
pub fn high_watermark(consumer: &Source, p: &Partition, timeout: Duration) -> Option<i64> {
    watermarks(consumer, p, timeout).map(|(_, high)| high)
}

/// Low and high watermarks of a partition, asked of the broker (blocking, bounded).
pub fn watermarks(consumer: &Source, p: &Partition, timeout: Duration) -> Option<(i64, i64)> {
    consumer
        .fetch_watermarks(&p.topic, p.partition, timeout)
        .ok()
        .filter(|(low, high)| *low >= 0 && *high >= 0)
}

/// Publishes `checkpointer_consumer_lag_records` for the assigned partitions every `every`,
/// off the processing loop.
/// A successful probe also ends a reported broker outage (readiness), even on an idle topic.
pub fn spawn_lag_monitor(
    consumer: Arc<Source>,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let board = &shared.board;
            let assigned = board.assigned();
            let positions = board.positions();
            let consumer = consumer.clone();
            let highs = tokio::task::spawn_blocking(move || {
                assigned
                    .into_iter()
                    .filter_map(|p| {
                        let high = high_watermark(&consumer, &p, Duration::from_secs(2))?;
                        Some((p, high))
                    })
                    .collect::<Vec<_>>()
            })
            .await;
            match highs {
                Ok(highs) => {
                    board.set_highs(&highs);
                    let lags: Vec<(Partition, i64)> = highs
                        .into_iter()
                        .map(|(p, high)| {
                            let next = positions.get(&p).map_or(0, |n| n.0);
                            (p, (high - next).max(0))
                        })
                        .collect();
                    // a broker answered: the outage, if any, is over
                    if !lags.is_empty() && board.broker_error().is_some() {
                        tracing::info!("brokers reachable again");
                        board.set_broker_error(None);
                    }
                    // partitions no longer assigned here stop being reported
                    for gone in board.set_lags(&lags) {
                        let _ = metrics
                            .consumer_lag
                            .remove_label_values(&[&gone.topic, &gone.partition.to_string()]);
                    }
                    for (p, lag) in lags {
                        metrics
                            .consumer_lag
                            .with_label_values(&[&p.topic, &p.partition.to_string()])
                            .set(lag);
                    }
                }
                Err(_) => return,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn settings(options: &BTreeMap<String, String>) -> ClientConfig {
        consumer_client(&SourceSettings {
            brokers: "127.0.0.1:9092",
            group_id: "g",
            topics: &[],
            auto_offset_reset: OffsetReset::Earliest,
            from_committed: false,
            instance_id: None,
            options,
            direct: false,
            tag: ownership::CommitTag {
                store: "s".into(),
                run: "r".into(),
                since_ms: 0,
                at_ms: 0,
                instance: "i".into(),
            },
        })
    }

    #[test]
    fn only_partitions_without_a_known_start_are_looked_up_and_none_while_stopping() {
        let (a, b, c) = (
            Partition::new("in", 0),
            Partition::new("in", 1),
            Partition::new("in", 2),
        );
        let partitions = [a.clone(), b.clone(), c.clone()];
        let positions = HashMap::from([(a.clone(), NextOffset(7))]);
        let gained = std::collections::HashSet::from([b.clone()]);
        let looked = to_look_up(&partitions, &positions, &gained, true);
        assert_eq!(
            looked,
            vec![&c],
            "held and gained partitions start where they are"
        );
        // no lookup without start_from: committed, nor while the service stops
        assert!(to_look_up(&partitions, &positions, &gained, false).is_empty());
    }

    #[test]
    fn the_consumer_fetches_ahead_16_mib_unless_the_options_say_otherwise() {
        let default = settings(&BTreeMap::new());
        assert_eq!(default.get("queued.max.messages.kbytes"), Some("16384"));
        let options = BTreeMap::from([("queued.max.messages.kbytes".into(), "65536".into())]);
        let chosen = settings(&options);
        assert_eq!(chosen.get("queued.max.messages.kbytes"), Some("65536"));
        // what the service manages is set whatever the options
        assert_eq!(chosen.get("auto.offset.reset"), Some("error"));
    }
}
