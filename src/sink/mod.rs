//! Emission of final windows to the output topic. A background task sends each batch of
//! windows (what one step of the engine made final) with an idempotent producer, rendering
//! each record as it hands it over with a bounded number of deliveries outstanding, retries
//! those that failed with backoff until the broker acknowledged every one, and reports the
//! acknowledged windows back in chunks, in the order they were released, so they can leave
//! the checkpointed state. The producer's delivery reports come by sequence number through
//! its context (`Reports`), not as a future per record.

pub mod dead_letter;
mod format;
pub mod verdict;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::Client;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::{
    BaseRecord, DeliveryResult, FutureProducer, Producer, ProducerContext, ThreadedProducer,
};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;
use tokio::sync::{mpsc, Notify};

pub use format::{render, render_into};

use self::dead_letter::DeadLetter;
use self::verdict::{classify, is_unknown_topic, Refusal, Verdict};
use crate::engine::{AggregateKind, ClosedWindow, Emission, StateKey};
use crate::kafka_log::ErrorLog;
use crate::lock::lock;
use crate::metrics::Metrics;
use crate::ratelimit::RateLimit;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot create the producer for topic {topic}: {source}")]
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
    /// Where windows the output topic refuses for good go (`output.on_error: dead_letter`);
    /// None: such a window stops the service.
    pub dead_letter_topic: Option<String>,
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

/// How long the producer waits to fill a batch unless `kafka.options` says otherwise
/// (`linger.ms`, or its alias `queue.buffering.max.ms`): the cheapest in CPU per window of the
/// settings measured (docs/benchmarks.md).
pub const PRODUCER_LINGER_MS: &str = "5";

/// The settings of a producer whose writes are never lost or repeated by a retry: `client`
/// (the service's `kafka.options`, which may not set what is managed here: the configuration
/// refuses it) made idempotent, every write acknowledged by all in-sync replicas, and batches
/// lingering [`PRODUCER_LINGER_MS`] unless the options set a linger of their own.
pub fn idempotent(mut client: ClientConfig) -> ClientConfig {
    client.set("enable.idempotence", "true").set("acks", "all");
    let lingers = ["linger.ms", "queue.buffering.max.ms"]
        .iter()
        .any(|k| client.get(k).is_some());
    if !lingers {
        client.set("linger.ms", PRODUCER_LINGER_MS);
    }
    client
}

/// An idempotent producer writing to `topic` (named in the error); see [`idempotent`].
pub(crate) fn producer(
    client: ClientConfig,
    topic: &str,
) -> Result<FutureProducer<SinkContext>, SinkError> {
    idempotent(client)
        .create_with_context(SinkContext::default())
        .map_err(|source| SinkError::Create {
            topic: topic.to_string(),
            source,
        })
}

/// librdkafka's default `message.max.bytes`.
const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// The producer's `message.max.bytes` (from `kafka.options`, or librdkafka's default).
pub(crate) fn message_max_bytes(client: &ClientConfig) -> usize {
    client
        .get("message.max.bytes")
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(DEFAULT_MESSAGE_MAX_BYTES)
}

/// Why an output record failed: librdkafka's code, if any, and its message.
type Failure = (Option<RDKafkaErrorCode>, String);

/// The output producer's delivery reports, filed by its polling thread under each record's
/// sequence number (librdkafka's opaque pointer carries the number: no allocation, channel or
/// future per record) and taken by the emitter in bulk.
#[derive(Default)]
struct Reports {
    /// Sequence number, and why the record failed (`None`: acknowledged).
    done: Mutex<Vec<(usize, Option<Failure>)>>,
    /// Woken when a report lands in an empty list.
    wake: Notify,
}

impl Reports {
    fn take(&self) -> Vec<(usize, Option<Failure>)> {
        std::mem::take(&mut *lock(&self.done))
    }
}

/// The output producer's context: its errors logged as the other producers' are, its
/// delivery reports filed for the emitter.
struct OutputContext {
    errors: SinkContext,
    reports: Arc<Reports>,
}

impl ClientContext for OutputContext {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        self.errors.error(error, reason);
    }
}

impl ProducerContext for OutputContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, seq: usize) {
        let failure = result
            .as_ref()
            .err()
            .map(|(e, _)| (e.rdkafka_error_code(), e.to_string()));
        let mut done = lock(&self.reports.done);
        let first = done.is_empty();
        done.push((seq, failure));
        drop(done);
        if first {
            self.reports.wake.notify_one();
        }
    }
}

/// The emitter's handle, the acknowledged window ids, and its task (which ends once the handle
/// is dropped and what it was handed is settled).
pub type Started = (
    Sink,
    mpsc::UnboundedReceiver<Vec<StateKey>>,
    tokio::task::JoinHandle<()>,
);

/// Handle to the emitter task.
pub struct Sink {
    tx: mpsc::UnboundedSender<Emission>,
}

impl Sink {
    /// Starts the emitter. Acknowledged window ids arrive on the returned receiver; a window
    /// that can be written neither to the output nor (with `dead_letter_topic`) to the
    /// dead-letter topic is reported on `fatal`, and the emitter stops.
    pub fn start(
        client: ClientConfig,
        settings: SinkSettings,
        metrics: Arc<Metrics>,
        fatal: mpsc::UnboundedSender<String>,
    ) -> Result<Started, SinkError> {
        let max_bytes = message_max_bytes(&client);
        let reports = Arc::new(Reports::default());
        let context = OutputContext {
            errors: SinkContext::default(),
            reports: reports.clone(),
        };
        let producer = idempotent(client)
            .create_with_context(context)
            .map_err(|source| SinkError::Create {
                topic: settings.topic.clone(),
                source,
            })?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (ack_tx, ack_rx) = mpsc::unbounded_channel();
        let emitter = Emitter {
            producer,
            reports,
            next_seq: 0,
            settings,
            metrics,
            max_bytes,
            warn: RateLimit::new(WARN_EVERY),
            diverted_log: RateLimit::new(WARN_EVERY),
        };
        // ends once the Sink is dropped and what it was handed is settled (or refused)
        let task = tokio::spawn(run(emitter, rx, ack_tx, fatal));
        Ok((Sink { tx }, ack_rx, task))
    }

    pub fn emit(&self, windows: Emission) {
        if !windows.is_empty() {
            // the receiver lives as long as the runtime; a send error means shutdown
            let _ = self.tx.send(windows);
        }
    }
}

/// Records handed to the producer since the oldest one not acknowledged yet, at most: a
/// release of a million windows is rendered and sent as it goes, never held rendered all at
/// once.
const MAX_IN_FLIGHT: usize = 4096;
/// Acknowledged windows are reported back in chunks of this many, as they come.
const ACK_CHUNK: usize = 4096;
/// Minimum time between two retry warnings.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// Room left for headers and record overhead when a refused window is copied to the
/// dead-letter topic.
const DEAD_LETTER_HEADROOM: usize = 4096;
/// The bytes of a key a dead-letter copy keeps when the whole one does not fit.
const DEAD_LETTER_KEY_PREFIX: usize = 1024;

/// The emitter task's own state.
struct Emitter {
    producer: ThreadedProducer<OutputContext>,
    reports: Arc<Reports>,
    /// The sequence number of the next record handed to the producer.
    next_seq: usize,
    settings: SinkSettings,
    metrics: Arc<Metrics>,
    /// The producer's `message.max.bytes`.
    max_bytes: usize,
    warn: RateLimit,
    /// Windows written to the dead-letter topic are logged at most this often.
    diverted_log: RateLimit,
}

async fn run(
    mut emitter: Emitter,
    mut rx: mpsc::UnboundedReceiver<Emission>,
    acks: mpsc::UnboundedSender<Vec<StateKey>>,
    fatal: mpsc::UnboundedSender<String>,
) {
    let mut out = Acks {
        done: Vec::new(),
        emitted: 0,
        acks,
        metrics: emitter.metrics.clone(),
    };
    while let Some(batch) = rx.recv().await {
        match emitter
            .send_until_acked(batch.into_windows(), &mut out)
            .await
        {
            Ok(()) => {}
            Err(Stopped::Closed) => return,
            Err(Stopped::Refused(message)) => {
                // the pipeline stops with this message as its error
                let _ = fatal.send(message);
                return;
            }
        }
    }
}

/// Acknowledged windows on their way back to the loop.
struct Acks {
    done: Vec<StateKey>,
    /// How many of `done` were written to the output (the others to the dead-letter topic).
    emitted: u64,
    acks: mpsc::UnboundedSender<Vec<StateKey>>,
    metrics: Arc<Metrics>,
}

/// Why the emitter stops.
enum Stopped {
    /// The loop is gone: the service is shutting down.
    Closed,
    /// A window can be written nowhere: the message names it.
    Refused(String),
}

impl Acks {
    fn push(&mut self, id: StateKey, emitted: bool) -> Result<(), Stopped> {
        self.done.push(id);
        self.emitted += u64::from(emitted);
        if self.done.len() >= ACK_CHUNK {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Stopped> {
        if self.done.is_empty() {
            return Ok(());
        }
        self.metrics
            .windows_emitted
            .inc_by(std::mem::take(&mut self.emitted));
        let chunk = std::mem::replace(&mut self.done, Vec::with_capacity(ACK_CHUNK));
        self.acks.send(chunk).map_err(|_| Stopped::Closed)
    }
}

/// A delivery that failed, and why.
struct Failed {
    window: ClosedWindow,
    code: Option<RDKafkaErrorCode>,
    error: String,
}

/// A record handed to the producer, by what its report said.
enum Slot {
    Waiting(ClosedWindow),
    Acked(ClosedWindow),
    /// Failed: its window went to the failed ones.
    Failed,
}

/// The windows handed to the producer in one round of a batch, by sequence number: slot `i`
/// holds record `first + i` until it is settled and every record before it is too. Reports
/// of different output partitions come in any order, but acknowledgements are released in
/// the order the windows were handed over: the engine finds an acknowledged window where the
/// one before it was (`ClosedChunk::find`), so an acknowledgement out of order costs it a
/// search.
struct InFlight {
    first: usize,
    slots: VecDeque<Slot>,
    /// Records not settled yet.
    waiting: usize,
}

impl InFlight {
    fn new(first: usize) -> Self {
        InFlight {
            first,
            slots: VecDeque::new(),
            waiting: 0,
        }
    }

    /// Notes `w` as record `seq`, the one after the last noted.
    fn push(&mut self, seq: usize, w: ClosedWindow) {
        debug_assert_eq!(seq, self.first + self.slots.len());
        self.slots.push_back(Slot::Waiting(w));
        self.waiting += 1;
    }

    /// Settles record `seq` once (a record it does not wait for is ignored): acknowledged, or
    /// failed, when its window is returned.
    fn settle(&mut self, seq: usize, failed: bool) -> Option<ClosedWindow> {
        let slot = self.slots.get_mut(seq.checked_sub(self.first)?)?;
        if !matches!(slot, Slot::Waiting(_)) {
            return None;
        }
        let Slot::Waiting(w) = std::mem::replace(slot, Slot::Failed) else {
            return None;
        };
        self.waiting -= 1;
        if failed {
            return Some(w);
        }
        *slot = Slot::Acked(w);
        None
    }

    /// The acknowledged windows up to the first record still waiting, in the order they were
    /// handed over, each to `f`.
    fn release(
        &mut self,
        mut f: impl FnMut(ClosedWindow) -> Result<(), Stopped>,
    ) -> Result<(), Stopped> {
        while self
            .slots
            .front()
            .is_some_and(|s| !matches!(s, Slot::Waiting(_)))
        {
            if let Some(Slot::Acked(w)) = self.slots.pop_front() {
                f(w)?;
            }
            self.first += 1;
        }
        Ok(())
    }
}

/// Hands `record` to the output producer, waiting while its queue is full (deliveries drain
/// it); the error if it does not take the record.
async fn hand<K, P>(
    producer: &ThreadedProducer<OutputContext>,
    mut record: BaseRecord<'_, K, P, usize>,
) -> Result<(), KafkaError>
where
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// The verdict on a failed delivery of a producer (`client`): [`Verdict::Fatal`] once the
/// producer itself failed for good, else what [`classify`] says of `code`.
pub(crate) fn judge<C: ClientContext>(
    client: &Client<C>,
    code: Option<RDKafkaErrorCode>,
    unknown_for: Duration,
) -> Verdict {
    match client.fatal_error() {
        Some(_) => Verdict::Fatal,
        None => classify(code, unknown_for),
    }
}

/// How long the topic has been unknown, given whether this round's failures say it is.
pub(crate) fn unknown_for(since: &mut Option<Instant>, unknown: bool) -> Duration {
    match (unknown, *since) {
        (false, _) => {
            *since = None;
            Duration::ZERO
        }
        (true, None) => {
            *since = Some(Instant::now());
            Duration::ZERO
        }
        (true, Some(at)) => at.elapsed(),
    }
}

impl Emitter {
    fn window_name(&self, w: &ClosedWindow) -> &str {
        self.settings
            .window_names
            .get(usize::from(w.id.window))
            .map(String::as_str)
            .unwrap_or("unknown")
    }

    /// Names a window in an error: its window, key (cut short), partition and bounds.
    fn describe(&self, w: &ClosedWindow) -> String {
        let key: String = w.id.key.chars().take(64).collect();
        let cut = if key.len() < w.id.key.len() {
            "…"
        } else {
            ""
        };
        let partition =
            w.id.partition
                .as_ref()
                .map(|p| format!(" of partition {p}"))
                .unwrap_or_default();
        format!(
            "window {} key {key:?}{cut} ({} bytes){partition} [{}, {})",
            self.window_name(w),
            w.id.key.len(),
            w.id.start,
            w.end
        )
    }

    /// Sends a batch of windows, each rendered just before it is handed to the producer, with
    /// at most [`MAX_IN_FLIGHT`] deliveries outstanding; those that failed transiently are
    /// sent again, with backoff, until the broker acknowledged every one. A window refused for
    /// good goes to the dead-letter topic if there is one, or stops the emitter. Acknowledged
    /// windows are reported in chunks as they come.
    async fn send_until_acked(
        &mut self,
        windows: impl Iterator<Item = ClosedWindow> + Send + 'static,
        out: &mut Acks,
    ) -> Result<(), Stopped> {
        let mut backoff = Duration::from_millis(100);
        let mut unknown_since = None;
        let (mut key, mut payload) = (String::new(), Vec::new());
        let mut pending: Box<dyn Iterator<Item = ClosedWindow> + Send> = Box::new(windows);
        loop {
            let mut in_flight = InFlight::new(self.next_seq);
            let mut failed = Vec::new();
            for w in pending {
                // bounded by the oldest record not settled, as its acknowledgement holds back
                // those after it
                while in_flight.slots.len() >= MAX_IN_FLIGHT {
                    self.settle(&mut in_flight, out, &mut failed).await?;
                }
                render_into(
                    self.window_name(&w),
                    &w,
                    &self.settings.aggregates,
                    &mut key,
                    &mut payload,
                );
                let size = key.len() + payload.len();
                if size > self.max_bytes {
                    failed.push(Failed {
                        code: Some(RDKafkaErrorCode::MessageSizeTooLarge),
                        error: format!(
                            "the output record is {size} bytes (key {} bytes), over the producer's message.max.bytes ({})",
                            key.len(),
                            self.max_bytes
                        ),
                        window: w,
                    });
                    continue;
                }
                let seq = self.next_seq;
                let record = BaseRecord::with_opaque_to(&self.settings.topic, seq)
                    .key(&key)
                    .payload(&payload);
                match hand(&self.producer, record).await {
                    Ok(()) => {
                        self.next_seq += 1;
                        in_flight.push(seq, w);
                    }
                    Err(e) => failed.push(Failed {
                        window: w,
                        code: e.rdkafka_error_code(),
                        error: e.to_string(),
                    }),
                }
            }
            while in_flight.waiting > 0 {
                self.settle(&mut in_flight, out, &mut failed).await?;
            }
            out.flush()?;
            if failed.is_empty() {
                return Ok(());
            }
            let unknown = failed.iter().any(|f| f.code.is_some_and(is_unknown_topic));
            let unknown_for = unknown_for(&mut unknown_since, unknown);
            let mut retry = Vec::new();
            let mut last_error = None;
            for f in failed {
                match judge(self.producer.client(), f.code, unknown_for) {
                    Verdict::Retry => {
                        last_error = Some(f.error);
                        retry.push(f.window);
                    }
                    Verdict::Refused(refusal) => match self.settings.dead_letter_topic.clone() {
                        Some(topic) => {
                            self.dead_letter(&topic, &f, refusal).await?;
                            out.push(f.window.id, false)?;
                        }
                        None => {
                            return Err(Stopped::Refused(format!(
                                "the output topic {} refuses {} for good ({}): {}; output.on_error is fail, so the service stops with its state intact (the window is sent again at the next start); set output.on_error: dead_letter with input.dead_letter_topic to divert such windows",
                                self.settings.topic,
                                self.describe(&f.window),
                                refusal.label(),
                                f.error
                            )))
                        }
                    },
                    Verdict::Fatal => {
                        let why = self
                            .producer
                            .client()
                            .fatal_error()
                            .map(|(_, why)| why)
                            .unwrap_or_else(|| f.error.clone());
                        return Err(Stopped::Refused(format!(
                            "the output producer failed for good ({why}) writing {}; the service stops with its state intact (the window is sent again at the next start)",
                            self.describe(&f.window)
                        )));
                    }
                }
            }
            out.flush()?;
            if retry.is_empty() {
                return Ok(());
            }
            // transient failures only: a refusal stops the service or is counted as a dead
            // letter
            self.metrics.emit_failures.inc_by(retry.len() as u64);
            if let Some(suppressed) = self.warn.check() {
                tracing::warn!(error = ?last_error, windows = retry.len(), retry_in_ms = backoff.as_millis() as u64, suppressed, "output writes failed, retrying (further ones are counted in checkpointer_emit_failures_total and logged at most every 10s)");
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
            pending = Box::new(retry.into_iter());
        }
    }

    /// The dead-letter copy of a window the output refuses: its output key and payload with
    /// headers naming the refusal; when they do not fit, the payload with the key cut to its
    /// first [`DEAD_LETTER_KEY_PREFIX`] bytes and no message key.
    fn dead_letter_copy(&self, f: &Failed, refusal: Refusal) -> DeadLetter {
        let w = &f.window;
        let name = self.window_name(w);
        let (key, payload) = render(name, w, &self.settings.aggregates);
        let mut headers = vec![
            (
                dead_letter::REASON.to_string(),
                Some(refusal.label().as_bytes().to_vec()),
            ),
            (
                dead_letter::ERROR.to_string(),
                Some(f.error.clone().into_bytes()),
            ),
            (
                dead_letter::OUTPUT_TOPIC.to_string(),
                Some(self.settings.topic.clone().into_bytes()),
            ),
        ];
        let fits = key.len() + payload.len() + DEAD_LETTER_HEADROOM <= self.max_bytes;
        let (key, payload) = if fits {
            (Some(key.into_bytes()), payload)
        } else {
            let mut cut = DEAD_LETTER_KEY_PREFIX.min(w.id.key.len());
            while !w.id.key.is_char_boundary(cut) {
                cut -= 1;
            }
            let short = ClosedWindow {
                id: StateKey {
                    key: w.id.key[..cut].into(),
                    ..w.id.clone()
                },
                end: w.end,
                acc: w.acc,
            };
            headers.push((
                dead_letter::KEY_TRUNCATED.to_string(),
                Some(w.id.key.len().to_string().into_bytes()),
            ));
            (None, render(name, &short, &self.settings.aggregates).1)
        };
        DeadLetter {
            key,
            payload: Some(payload),
            headers,
            timestamp: None,
            reason: refusal.label(),
            origin: self.describe(w),
        }
    }

    /// Takes the reports filed since the last call (waiting for one if there are none) and
    /// settles the windows of `in_flight` they are about: failed ones at once, acknowledged
    /// ones in the order they were handed over.
    async fn settle(
        &mut self,
        in_flight: &mut InFlight,
        out: &mut Acks,
        failed: &mut Vec<Failed>,
    ) -> Result<(), Stopped> {
        let mut reports = self.reports.take();
        while reports.is_empty() {
            self.reports.wake.notified().await;
            reports = self.reports.take();
        }
        for (seq, outcome) in reports {
            let failure = outcome.is_some();
            if let (Some(window), Some((code, error))) = (in_flight.settle(seq, failure), outcome) {
                failed.push(Failed {
                    window,
                    code,
                    error,
                });
            }
        }
        in_flight.release(|w| out.push(w.id, true))
    }

    /// Hands one dead-letter copy to the producer and waits for its report: `None` once
    /// acknowledged, or why it failed; the error if the producer does not take it. Only when
    /// no other record is in flight (after a round of a batch settled), so every report it
    /// takes is its own.
    async fn send_one(
        &mut self,
        topic: &str,
        letter: &DeadLetter,
    ) -> Result<Option<Failure>, KafkaError> {
        let seq = self.next_seq;
        hand(&self.producer, letter.base_record(topic, seq)).await?;
        self.next_seq += 1;
        loop {
            let reports = self.reports.take();
            debug_assert!(reports.iter().all(|(s, _)| *s == seq), "{reports:?}");
            if let Some((_, outcome)) = reports.into_iter().find(|(s, _)| *s == seq) {
                return Ok(outcome);
            }
            self.reports.wake.notified().await;
        }
    }

    /// Writes the dead-letter copy of a refused window, retrying transient failures.
    async fn dead_letter(
        &mut self,
        topic: &str,
        f: &Failed,
        refusal: Refusal,
    ) -> Result<(), Stopped> {
        let letter = self.dead_letter_copy(f, refusal);
        let mut backoff = Duration::from_millis(100);
        let mut unknown_since = None;
        loop {
            let (code, error) = match self.send_one(topic, &letter).await {
                Ok(None) => {
                    self.metrics.dead_letter(letter.reason);
                    if let Some(suppressed) = self.diverted_log.check() {
                        tracing::warn!(window = %letter.origin, reason = letter.reason, error = %f.error, topic, suppressed, "the output refuses a window for good; written to the dead-letter topic instead (further ones are counted in checkpointer_dead_letters_total and logged at most every 10s)");
                    }
                    return Ok(());
                }
                Ok(Some(failure)) => failure,
                Err(e) => (e.rdkafka_error_code(), e.to_string()),
            };
            let unknown_for = unknown_for(&mut unknown_since, code.is_some_and(is_unknown_topic));
            if judge(self.producer.client(), code, unknown_for) != Verdict::Retry {
                return Err(Stopped::Refused(format!(
                    "the output topic {} refuses {} ({}: {}) and the dead-letter topic {topic} refuses its copy too: {error}; the service stops with its state intact (the window is sent again at the next start)",
                    self.settings.topic,
                    letter.origin,
                    refusal.label(),
                    f.error
                )));
            }
            if let Some(suppressed) = self.warn.check() {
                tracing::warn!(%error, topic, retry_in_ms = backoff.as_millis() as u64, suppressed, "dead-letter write of a refused window failed, retrying");
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
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

    #[test]
    fn the_producer_is_idempotent_and_lingers_5_ms_unless_the_options_set_a_linger() {
        let made = idempotent(ClientConfig::new());
        assert_eq!(made.get("enable.idempotence"), Some("true"));
        assert_eq!(made.get("acks"), Some("all"));
        assert_eq!(made.get("linger.ms"), Some(PRODUCER_LINGER_MS));
        for key in ["linger.ms", "queue.buffering.max.ms"] {
            let mut options = ClientConfig::new();
            options.set(key, "20");
            let made = idempotent(options);
            assert_eq!(made.get(key), Some("20"), "{key}");
            // the alias is not set beside it: librdkafka would apply the two in any order
            let others = ["linger.ms", "queue.buffering.max.ms"].map(|k| made.get(k));
            assert_eq!(others.iter().flatten().count(), 1, "{key}");
            assert_eq!(made.get("acks"), Some("all"));
        }
    }

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

    #[test]
    fn acknowledgements_are_released_in_the_order_handed_over_and_failures_at_once() {
        let mut in_flight = InFlight::new(10);
        for seq in 10..15 {
            in_flight.push(seq, window(seq));
        }
        let mut released = Vec::new();
        let release = |f: &mut InFlight, out: &mut Vec<String>| {
            f.release(|w| {
                out.push(w.id.key.to_string());
                Ok(())
            })
            .map_err(|_| "closed")
        };
        // 13 and 11 acknowledged before 10: held back, also when 13 is reported again
        assert!(in_flight.settle(13, false).is_none());
        assert!(in_flight.settle(11, false).is_none());
        assert!(in_flight.settle(13, true).is_none());
        release(&mut in_flight, &mut released).expect("release");
        assert_eq!(in_flight.waiting, 3);
        assert!(released.is_empty(), "nothing before 10: {released:?}");
        // 12 failed while 10 still waits: its window comes back at once
        let failed = in_flight.settle(12, true).expect("the failed window");
        assert_eq!(failed.id, window(12).id);
        release(&mut in_flight, &mut released).expect("release");
        assert!(released.is_empty(), "nothing before 10: {released:?}");
        // 10 acknowledged: 10, 11 and 13 go (12 failed)
        assert!(in_flight.settle(10, false).is_none());
        release(&mut in_flight, &mut released).expect("release");
        // a report twice, or of a record it never held, changes nothing
        assert!(in_flight.settle(11, false).is_none());
        assert!(in_flight.settle(99, false).is_none());
        assert!(in_flight.settle(3, true).is_none());
        assert!(in_flight.settle(14, false).is_none());
        release(&mut in_flight, &mut released).expect("release");
        assert_eq!(in_flight.waiting, 0);
        assert!(in_flight.slots.is_empty());
        assert_eq!(released, vec!["u10", "u11", "u13", "u14"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_release_past_the_in_flight_bound_is_sent_whole_and_acknowledged_once_per_window() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        // several partitions: their reports come in any order
        cluster.create_topic(TOPIC, 4, 1).expect("topic");
        let mut client = ClientConfig::new();
        client.set("bootstrap.servers", cluster.bootstrap_servers());
        let (sink, mut acks, _task) = Sink::start(
            client,
            SinkSettings {
                topic: TOPIC.into(),
                window_names: vec!["tumbling".into()],
                aggregates: vec![AggregateKind::Count, AggregateKind::Sum],
                dead_letter_topic: None,
            },
            Arc::new(Metrics::new()),
            mpsc::unbounded_channel().0,
        )
        .expect("sink");
        let n = MAX_IN_FLIGHT * 2 + ACK_CHUNK / 2 + 17;
        let sent: Vec<ClosedWindow> = (0..n).map(window).collect();
        let expected: HashSet<StateKey> = sent.iter().map(|w| w.id.clone()).collect();
        assert_eq!(expected.len(), n, "the test's windows are distinct");
        sink.emit(sent[..n / 3].to_vec().into());
        sink.emit(sent[n / 3..].to_vec().into());

        let mut acknowledged = HashSet::new();
        let mut in_order = Vec::with_capacity(n);
        let mut chunks = 0;
        while acknowledged.len() < n {
            let chunk = tokio::time::timeout(Duration::from_secs(60), acks.recv())
                .await
                .expect("acknowledgements keep coming")
                .expect("the emitter runs");
            assert!(chunk.len() <= ACK_CHUNK, "a chunk of {}", chunk.len());
            for id in chunk {
                assert!(acknowledged.insert(id.clone()), "{id:?} acknowledged twice");
                in_order.push(id);
            }
            chunks += 1;
        }
        assert_eq!(acknowledged, expected);
        let sent_order: Vec<StateKey> = sent.iter().map(|w| w.id.clone()).collect();
        assert!(
            in_order == sent_order,
            "acknowledgements come in the order the windows were released"
        );
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
