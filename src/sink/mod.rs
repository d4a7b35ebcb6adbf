//! Emission of final windows to the output topic. A background task sends each window with an
//! idempotent producer, retries with backoff until the broker acknowledges it, and reports the
//! acknowledged windows back so they can leave the checkpointed state.

mod format;

use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
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
    let settings = Arc::new(settings);
    while let Some(batch) = rx.recv().await {
        let mut sends = tokio::task::JoinSet::new();
        for w in batch {
            let producer = producer.clone();
            let settings = settings.clone();
            let metrics = metrics.clone();
            sends.spawn(async move {
                send_until_acked(&producer, &settings, &metrics, &w).await;
                w.id
            });
        }
        let mut done = Vec::with_capacity(sends.len());
        while let Some(result) = sends.join_next().await {
            match result {
                Ok(id) => done.push(id),
                Err(e) => tracing::error!(error = %e, "output task ended abnormally"),
            }
        }
        metrics.windows_emitted.inc_by(done.len() as u64);
        if acks.send(done).is_err() {
            return;
        }
    }
}

async fn send_until_acked(
    producer: &FutureProducer<SinkContext>,
    settings: &SinkSettings,
    metrics: &Metrics,
    w: &ClosedWindow,
) {
    let name = settings
        .window_names
        .get(usize::from(w.id.window))
        .map(String::as_str)
        .unwrap_or("unknown");
    let (key, payload) = render(name, w, &settings.aggregates);
    let mut backoff = Duration::from_millis(100);
    loop {
        let record = FutureRecord::to(&settings.topic)
            .key(&key)
            .payload(&payload);
        match producer.send(record, Duration::from_secs(30)).await {
            Ok(_) => return,
            Err((e, _)) => {
                metrics.emit_failures.inc();
                tracing::warn!(error = %e, window = %key, "output write failed, retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}
