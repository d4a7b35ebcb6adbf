//! Emission of final windows to the output topic. A background task sends each batch of
//! windows (what one step of the engine made final) with an idempotent producer, all records at
//! once, retries those that failed with backoff until the broker acknowledged every one, and
//! reports the acknowledged windows back so they can leave the checkpointed state.

mod format;

use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;
use tokio::sync::mpsc;

pub use format::render;

use crate::engine::{AggregateKind, ClosedWindow, StateKey};
use crate::kafka_log::ErrorLog;
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot create the output producer for topic {topic}: {source}")]
    Create {
        topic: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },
}

pub struct SinkSettings {
    pub topic: String,
    pub window_names: Vec<String>,
    pub aggregates: Vec<AggregateKind>,
}

#[derive(Default)]
pub struct SinkContext {
    errors: ErrorLog,
}

impl ClientContext for SinkContext {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        self.errors.report("producer", &error, reason);
    }
}

/// Handle to the emitter task.
pub struct Sink {
    tx: mpsc::UnboundedSender<Vec<ClosedWindow>>,
}

impl Sink {
    /// Starts the emitter. Acknowledged window ids arrive on the returned receiver.
    pub fn start(
        client: ClientConfig,
        settings: SinkSettings,
        metrics: Arc<Metrics>,
    ) -> Result<(Sink, mpsc::UnboundedReceiver<Vec<StateKey>>), SinkError> {
        let mut client = client;
        client
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5");
        let producer: FutureProducer<SinkContext> = client
            .create_with_context(SinkContext::default())
            .map_err(|source| SinkError::Create {
                topic: settings.topic.clone(),
                source,
            })?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (ack_tx, ack_rx) = mpsc::unbounded_channel();
        tokio::spawn(run(producer, settings, metrics, rx, ack_tx));
        Ok((Sink { tx }, ack_rx))
    }

    pub fn emit(&self, windows: Vec<ClosedWindow>) {
        if !windows.is_empty() {
            // the receiver lives as long as the runtime; a send error means shutdown
            let _ = self.tx.send(windows);
        }
    }
}

async fn run(
    producer: FutureProducer<SinkContext>,
    settings: SinkSettings,
    metrics: Arc<Metrics>,
    mut rx: mpsc::UnboundedReceiver<Vec<ClosedWindow>>,
    acks: mpsc::UnboundedSender<Vec<StateKey>>,
) {
    while let Some(batch) = rx.recv().await {
        let rendered: Vec<Rendered> = batch
            .into_iter()
            .map(|w| {
                let name = settings
                    .window_names
                    .get(usize::from(w.id.window))
                    .map(String::as_str)
                    .unwrap_or("unknown");
                let (key, payload) = render(name, &w, &settings.aggregates);
                Rendered {
                    id: w.id,
                    key,
                    payload,
                }
            })
            .collect();
        let done = send_until_acked(&producer, &settings.topic, &metrics, rendered).await;
        metrics.windows_emitted.inc_by(done.len() as u64);
        if acks.send(done).is_err() {
            return;
        }
    }
}

/// One final window as its output record.
struct Rendered {
    id: StateKey,
    key: String,
    payload: Vec<u8>,
}

/// Sends a batch of windows: every record is handed to the producer at once and the
/// deliveries awaited together; those that failed are sent again, with backoff, until the
/// broker acknowledged every one. Returns the ids of the windows, all acknowledged.
async fn send_until_acked(
    producer: &FutureProducer<SinkContext>,
    topic: &str,
    metrics: &Metrics,
    mut pending: Vec<Rendered>,
) -> Vec<StateKey> {
    let mut done = Vec::with_capacity(pending.len());
    let mut backoff = Duration::from_millis(100);
    while !pending.is_empty() {
        let mut in_flight = Vec::with_capacity(pending.len());
        let mut failed: Vec<Rendered> = Vec::new();
        let mut last_error = None;
        for w in pending.drain(..) {
            let delivery = loop {
                let record = FutureRecord::to(topic).key(&w.key).payload(&w.payload);
                match producer.send_result(record) {
                    Ok(delivery) => break Ok(delivery),
                    // the producer's queue is full: let deliveries drain it
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        tokio::time::sleep(Duration::from_millis(5)).await
                    }
                    Err((e, _)) => break Err(e),
                }
            };
            match delivery {
                Ok(delivery) => in_flight.push((w, delivery)),
                Err(e) => {
                    last_error = Some(e.to_string());
                    failed.push(w);
                }
            }
        }
        for (w, delivery) in in_flight {
            match delivery.await {
                Ok(Ok(_)) => done.push(w.id),
                Ok(Err((e, _))) => {
                    last_error = Some(e.to_string());
                    failed.push(w);
                }
                Err(_) => {
                    last_error = Some("the producer dropped the delivery".into());
                    failed.push(w);
                }
            }
        }
        if !failed.is_empty() {
            metrics.emit_failures.inc_by(failed.len() as u64);
            tracing::warn!(error = ?last_error, windows = failed.len(), retry_in_ms = backoff.as_millis() as u64, "output writes failed, retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
        pending = failed;
    }
    done
}
