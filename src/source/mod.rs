//! The Kafka consumer: subscribes to the input topics and, on every assignment, starts each
//! partition at the position the service holds for it (from its checkpoint or its own
//! progress), whatever the consumer group has committed. Offsets are committed to the group
//! only after a checkpoint is durable, so lag tools see progress.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::kafka_log::ErrorLog;
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

/// A change of the partitions this instance owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rebalance {
    Assigned(Vec<Partition>),
    Revoked {
        partitions: Vec<Partition>,
        lost: bool,
    },
    Failed(String),
}

/// Shared between the processing loop and the rebalance callback, which runs inside `recv`.
#[derive(Default)]
pub struct Shared {
    positions: Mutex<HashMap<Partition, NextOffset>>,
    events: Mutex<Vec<Rebalance>>,
    assigned: Mutex<Vec<Partition>>,
    broker_error: Mutex<Option<String>>,
    lags: Mutex<HashMap<Partition, i64>>,
}

impl Shared {
    pub fn set_position(&self, p: &Partition, next: NextOffset) {
        let mut map = self
            .positions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match map.get_mut(p) {
            Some(v) => *v = next,
            None => {
                map.insert(p.clone(), next);
            }
        }
    }

    /// The client reported the brokers unreachable (`Some`) or the consumer received again.
    pub fn set_broker_error(&self, error: Option<String>) {
        *self
            .broker_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = error;
    }

    pub fn broker_error(&self) -> Option<String> {
        self.broker_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn set_assigned(&self, partitions: &[Partition]) {
        *self.assigned.lock().unwrap_or_else(PoisonError::into_inner) = partitions.to_vec();
    }

    pub fn assigned(&self) -> Vec<Partition> {
        self.assigned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Assigned partitions with their next offset and last measured lag.
    pub fn partitions(&self) -> Vec<(Partition, Option<NextOffset>, Option<i64>)> {
        let positions = self
            .positions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let lags = self.lags.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<_> = self
            .assigned()
            .into_iter()
            .map(|p| {
                let next = positions.get(&p).copied();
                let lag = lags.get(&p).copied();
                (p, next, lag)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    pub fn take_events(&self) -> Vec<Rebalance> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn push(&self, e: Rebalance) {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(e);
    }
}

pub struct SourceContext {
    shared: Arc<Shared>,
    errors: ErrorLog,
    /// Start of a partition the service holds no position for.
    reset: Offset,
}

impl ClientContext for SourceContext {
    fn error(&self, error: KafkaError, reason: &str) {
        match error.rdkafka_error_code() {
            // reaching the end of a partition is reported on the consumer queue as well
            Some(RDKafkaErrorCode::PartitionEOF) => tracing::trace!(reason, "end of partition"),
            Some(RDKafkaErrorCode::AllBrokersDown) => {
                self.errors.report("consumer", &error, reason);
                self.shared.set_broker_error(Some(reason.to_string()));
            }
            _ => self.errors.report("consumer", &error, reason),
        }
    }
}

fn partitions_of(tpl: &TopicPartitionList) -> Vec<Partition> {
    tpl.elements()
        .iter()
        .map(|e| Partition::new(e.topic(), e.partition()))
        .collect()
}

impl ConsumerContext for SourceContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let partitions = partitions_of(tpl);
                {
                    let positions = self
                        .shared
                        .positions
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner);
                    for p in &partitions {
                        // the service's own position, else auto_offset_reset; never the
                        // group's committed offset, which is advisory
                        let start = match positions.get(p) {
                            Some(next) => Offset::Offset(next.0),
                            None => self.reset,
                        };
                        if let Err(e) = tpl.set_partition_offset(&p.topic, p.partition, start) {
                            tracing::error!(partition = %p, error = %e, "cannot set start offset");
                        }
                    }
                }
                let result = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                match result {
                    Ok(()) => {
                        for p in &partitions {
                            let at = self
                                .shared
                                .positions
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .get(p)
                                .copied();
                            match at {
                                Some(next) => {
                                    tracing::info!(partition = %p, next_offset = next.0, "partition assigned, resuming at checkpointed position")
                                }
                                None => {
                                    tracing::info!(partition = %p, "partition assigned, no checkpointed position: starting per auto_offset_reset")
                                }
                            }
                        }
                        self.shared.push(Rebalance::Assigned(partitions));
                    }
                    Err(source) => {
                        let e = SourceError::Assign {
                            partitions: partitions.iter().map(ToString::to_string).collect(),
                            source,
                        };
                        tracing::error!(error = %e, "assignment failed");
                        self.shared.push(Rebalance::Failed(e.to_string()));
                    }
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let partitions = partitions_of(tpl);
                let lost = consumer.assignment_lost();
                tracing::info!(partitions = ?partitions.iter().map(ToString::to_string).collect::<Vec<_>>(), lost, "partitions revoked");
                let result = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = result {
                    tracing::error!(error = %e, "unassign failed");
                }
                self.shared.push(Rebalance::Revoked { partitions, lost });
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
    pub auto_offset_reset: &'a str,
    pub instance_id: Option<&'a str>,
    pub options: &'a std::collections::BTreeMap<String, String>,
}

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

/// Creates the consumer and subscribes. Positions known before the first assignment must be
/// put in `shared` first.
pub fn connect(settings: &SourceSettings<'_>, shared: Arc<Shared>) -> Result<Source, SourceError> {
    let mut c = base_client(settings.brokers, settings.options);
    c.set("group.id", settings.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        // start offsets are always set explicitly (held position, else auto_offset_reset as
        // Beginning/End); librdkafka must never move a position on its own, or records would
        // be skipped silently when a broker reports a position out of range
        .set("auto.offset.reset", "error");
    if let Some(id) = settings.instance_id {
        c.set("group.instance.id", id);
    }
    let consumer: Source = c
        .create_with_context(SourceContext {
            shared,
            errors: ErrorLog::default(),
            reset: match settings.auto_offset_reset {
                "latest" => Offset::End,
                _ => Offset::Beginning,
            },
        })
        .map_err(SourceError::Create)?;
    let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(|source| SourceError::Subscribe {
            topics: settings.topics.to_vec(),
            source,
        })?;
    Ok(consumer)
}

/// Moves every partition back to the position the service holds for it (after the broker
/// reported a position out of range: librdkafka does not say which partition).
pub fn reposition(consumer: &Source, positions: &[(Partition, Option<NextOffset>)], reset: &str) {
    for (p, next) in positions {
        let offset = match next {
            Some(n) => Offset::Offset(n.0),
            None if reset == "latest" => Offset::End,
            None => Offset::Beginning,
        };
        if let Err(e) = consumer.seek(&p.topic, p.partition, offset, Duration::from_secs(1)) {
            tracing::warn!(partition = %p, error = %e, "cannot move back to the held position");
        }
    }
}

/// Commits checkpointed positions to the consumer group (advisory, for lag tools).
pub fn commit(consumer: &Source, positions: &[(Partition, NextOffset)]) {
    let mut tpl = TopicPartitionList::new();
    for (p, next) in positions {
        if let Err(e) = tpl.add_partition_offset(&p.topic, p.partition, Offset::Offset(next.0)) {
            tracing::warn!(partition = %p, error = %e, "cannot build offset commit");
        }
    }
    if tpl.count() == 0 {
        return;
    }
    if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
        tracing::debug!(error = %e, "offset commit to the consumer group failed (advisory only)");
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
) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let assigned = shared.assigned();
            let positions = shared
                .positions
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            let consumer = consumer.clone();
            let lags = tokio::task::spawn_blocking(move || {
                assigned
                    .into_iter()
                    .filter_map(|p| {
                        let high = high_watermark(&consumer, &p, Duration::from_secs(2))?;
                        let next = positions.get(&p).map_or(0, |n| n.0);
                        Some((p, (high - next).max(0)))
                    })
                    .collect::<Vec<_>>()
            })
            .await;
            match lags {
                Ok(lags) => {
                    // a broker answered: the outage, if any, is over
                    if !lags.is_empty() && shared.broker_error().is_some() {
                        tracing::info!("brokers reachable again");
                        shared.set_broker_error(None);
                    }
                    let mut known = shared.lags.lock().unwrap_or_else(PoisonError::into_inner);
                    known.clear();
                    for (p, lag) in lags {
                        known.insert(p.clone(), lag);
                        metrics
                            .consumer_lag
                            .with_label_values(&[&p.topic, &p.partition.to_string()])
                            .set(lag);
                    }
                }
                Err(_) => return,
            }
        }
    });
}
