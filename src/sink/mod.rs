//! Emission of final windows to the output topic. A background task sends each batch of
//! windows (what one step of the engine made final) with an idempotent producer, rendering
//! each record as it hands it over with a bounded number of deliveries outstanding, retries
//! those that failed with backoff until the broker acknowledged every one, and reports the
//! acknowledged windows back in chunks so they can leave the checkpointed state.

mod format;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;
use tokio::sync::mpsc;

pub use format::{render, render_into};

use crate::engine::{AggregateKind, ClosedWindow, Emission, StateKey};
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
    tx: mpsc::UnboundedSender<Emission>,
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

    pub fn emit(&self, windows: Emission) {
        if !windows.is_empty() {
            // the receiver lives as long as the runtime; a send error means shutdown
            let _ = self.tx.send(windows);
        }
    }
}

/// Records handed to the producer and not acknowledged yet, at most: a release of a million
/// windows is rendered and sent as it goes, never held rendered all at once.
const MAX_IN_FLIGHT: usize = 4096;
/// Acknowledged windows are reported back in chunks of this many, as they come.
const ACK_CHUNK: usize = 4096;

async fn run(
    producer: FutureProducer<SinkContext>,
    settings: SinkSettings,
    metrics: Arc<Metrics>,
    mut rx: mpsc::UnboundedReceiver<Emission>,
    acks: mpsc::UnboundedSender<Vec<StateKey>>,
) {
    let mut out = Acks {
        done: Vec::new(),
        acks,
        metrics: &metrics,
    };
    while let Some(batch) = rx.recv().await {
        if send_until_acked(
            &producer,
            &settings,
            &metrics,
            batch.into_windows(),
            &mut out,
        )
        .await
        .is_err()
        {
            return;
        }
    }
}

/// Acknowledged windows on their way back to the loop.
struct Acks<'a> {
    done: Vec<StateKey>,
    acks: mpsc::UnboundedSender<Vec<StateKey>>,
    metrics: &'a Metrics,
}

/// The loop is gone: the service is shutting down.
struct Closed;

impl Acks<'_> {
    fn push(&mut self, id: StateKey) -> Result<(), Closed> {
        self.done.push(id);
        if self.done.len() >= ACK_CHUNK {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Closed> {
        if self.done.is_empty() {
            return Ok(());
        }
        self.metrics.windows_emitted.inc_by(self.done.len() as u64);
        let chunk = std::mem::replace(&mut self.done, Vec::with_capacity(ACK_CHUNK));
        self.acks.send(chunk).map_err(|_| Closed)
    }
}

/// A delivery that failed, and why.
struct Failures {
    windows: Vec<ClosedWindow>,
    last_error: Option<String>,
}

impl Failures {
    fn push(&mut self, w: ClosedWindow, error: String) {
        self.windows.push(w);
        self.last_error = Some(error);
    }
}

/// Waits for one delivery; the window goes to the acknowledged or to the failed ones.
async fn settle(
    (w, delivery): (ClosedWindow, DeliveryFuture),
    out: &mut Acks<'_>,
    failed: &mut Failures,
) -> Result<(), Closed> {
    match delivery.await {
        Ok(Ok(_)) => out.push(w.id),
        Ok(Err((e, _))) => {
            failed.push(w, e.to_string());
            Ok(())
        }
        Err(_) => {
            failed.push(w, "the producer dropped the delivery".into());
            Ok(())
        }
    }
}

/// Sends a batch of windows, each rendered just before it is handed to the producer, with at
/// most [`MAX_IN_FLIGHT`] deliveries outstanding; those that failed are sent again, with
/// backoff, until the broker acknowledged every one. Acknowledged windows are reported in
/// chunks as they come.
async fn send_until_acked(
    producer: &FutureProducer<SinkContext>,
    settings: &SinkSettings,
    metrics: &Metrics,
    windows: impl Iterator<Item = ClosedWindow> + Send + 'static,
    out: &mut Acks<'_>,
) -> Result<(), Closed> {
    let mut backoff = Duration::from_millis(100);
    let (mut key, mut payload) = (String::new(), Vec::new());
    let mut pending: Box<dyn Iterator<Item = ClosedWindow> + Send> = Box::new(windows);
    loop {
        let mut in_flight = VecDeque::new();
        let mut failed = Failures {
            windows: Vec::new(),
            last_error: None,
        };
        for w in pending {
            if in_flight.len() >= MAX_IN_FLIGHT {
                if let Some(oldest) = in_flight.pop_front() {
                    settle(oldest, out, &mut failed).await?;
                }
            }
            let name = settings
                .window_names
                .get(usize::from(w.id.window))
                .map(String::as_str)
                .unwrap_or("unknown");
            render_into(name, &w, &settings.aggregates, &mut key, &mut payload);
            let delivery = loop {
                let record = FutureRecord::to(&settings.topic)
                    .key(&key)
                    .payload(&payload);
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
                Ok(delivery) => in_flight.push_back((w, delivery)),
                Err(e) => failed.push(w, e.to_string()),
            }
        }
        while let Some(oldest) = in_flight.pop_front() {
            settle(oldest, out, &mut failed).await?;
        }
        out.flush()?;
        if failed.windows.is_empty() {
            return Ok(());
        }
        metrics.emit_failures.inc_by(failed.windows.len() as u64);
        tracing::warn!(error = ?failed.last_error, windows = failed.windows.len(), retry_in_ms = backoff.as_millis() as u64, "output writes failed, retrying");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
        pending = Box::new(failed.windows.into_iter());
    }
}

#[cfg(test)]
mod tests {
    //! The emitter against librdkafka's mock cluster: a release larger than the bound on
    //! deliveries outstanding reaches the topic whole and comes back acknowledged once per
    //! window, in chunks.

    use std::collections::HashSet;
    use std::time::Duration;

    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::mocking::MockCluster;
    use rdkafka::Message;

    use super::*;
    use crate::engine::Acc;

    const TOPIC: &str = "windows";

    fn window(i: usize) -> ClosedWindow {
        ClosedWindow {
            id: StateKey {
                partition: None,
                window: 0,
                start: (i as i64 / 100) * 10_000,
                key: format!("u{}", i % 100).into(),
            },
            end: (i as i64 / 100) * 10_000 + 10_000,
            acc: Acc::of(Some(i as f64)),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_release_past_the_in_flight_bound_is_sent_whole_and_acknowledged_once_per_window() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic(TOPIC, 1, 1).expect("topic");
        let mut client = ClientConfig::new();
        client.set("bootstrap.servers", cluster.bootstrap_servers());
        let (sink, mut acks) = Sink::start(
            client,
            SinkSettings {
                topic: TOPIC.into(),
                window_names: vec!["tumbling".into()],
                aggregates: vec![AggregateKind::Count, AggregateKind::Sum],
            },
            Arc::new(Metrics::new()),
        )
        .expect("sink");
        let n = MAX_IN_FLIGHT * 2 + ACK_CHUNK / 2 + 17;
        let sent: Vec<ClosedWindow> = (0..n).map(window).collect();
        let expected: HashSet<StateKey> = sent.iter().map(|w| w.id.clone()).collect();
        assert_eq!(expected.len(), n, "the test's windows are distinct");
        sink.emit(sent[..n / 3].to_vec().into());
        sink.emit(sent[n / 3..].to_vec().into());

        let mut acknowledged = HashSet::new();
        let mut chunks = 0;
        while acknowledged.len() < n {
            let chunk = tokio::time::timeout(Duration::from_secs(60), acks.recv())
                .await
                .expect("acknowledgements keep coming")
                .expect("the emitter runs");
            assert!(chunk.len() <= ACK_CHUNK, "a chunk of {}", chunk.len());
            for id in chunk {
                assert!(acknowledged.insert(id.clone()), "{id:?} acknowledged twice");
            }
            chunks += 1;
        }
        assert_eq!(acknowledged, expected);
        assert!(chunks >= n / ACK_CHUNK, "{chunks} chunks for {n} windows");

        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("group.id", "sink-test")
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("consumer");
        consumer.subscribe(&[TOPIC]).expect("subscribe");
        let mut keys = HashSet::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while keys.len() < n && std::time::Instant::now() < deadline {
            if let Some(m) = consumer.poll(Duration::from_millis(200)) {
                let m = m.expect("message");
                let key = String::from_utf8(m.key().expect("key").to_vec()).expect("utf8");
                assert!(keys.insert(key.clone()), "{key} written twice");
            }
        }
        let rendered: HashSet<String> = sent
            .iter()
            .map(|w| render("tumbling", w, &[AggregateKind::Count]).0)
            .collect();
        assert_eq!(keys, rendered, "every window on the topic, once");
    }
}
