//! The dead-letter topic (`input.dead_letter_topic`): input records the service skips
//! (invalid or late) are copied there unchanged, with headers naming the reason and where they
//! came from; with `output.on_error: dead_letter` the sink writes refused windows there too.
//!
//! A copy is written before the checkpoint that moves past its record: the pipeline takes no
//! checkpoint while copies are unacknowledged ([`DeadLetters::outstanding`]), so a crash
//! replays the record and copies it again (at least once, never lost). A copy the topic
//! refuses for good stops the service, naming the record.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::mpsc;

use super::verdict::{is_unknown_topic, Refusal, Verdict};
use super::{judge, unknown_for};
use super::{SinkContext, SinkError};
use crate::metrics::Metrics;
use crate::ratelimit::RateLimit;

/// The reason of a late input record.
pub const LATE: &str = "late";
/// Header naming why the record is here (`checkpointer_dead_letters_total`'s reason).
pub const REASON: &str = "checkpointer.reason";
/// Headers naming the input record a copy was made of.
pub const SOURCE_TOPIC: &str = "checkpointer.source.topic";
pub const SOURCE_PARTITION: &str = "checkpointer.source.partition";
pub const SOURCE_OFFSET: &str = "checkpointer.source.offset";
/// Header with the producer's error, on a refused window.
pub const ERROR: &str = "checkpointer.error";
/// Header naming the output topic that refused a window.
pub const OUTPUT_TOPIC: &str = "checkpointer.output.topic";
/// Header with the length in bytes of a window's key, when the copy carries only its start.
pub const KEY_TRUNCATED: &str = "checkpointer.key.truncated";
/// Headers with the length in bytes of an input record's payload or key, when the copy
/// leaves it out because it does not fit the dead-letter topic.
pub const PAYLOAD_DROPPED: &str = "checkpointer.payload.dropped";
pub const KEY_DROPPED: &str = "checkpointer.key.dropped";
/// Room kept for headers and record overhead below `message.max.bytes`.
const HEADROOM: usize = 4096;

/// Copies handed to the producer and not settled yet, at most.
const MAX_IN_FLIGHT: usize = 4096;
/// Minimum time between two retry warnings.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// One record for the dead-letter topic.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    pub timestamp: Option<i64>,
    /// The `reason` label.
    pub reason: &'static str,
    /// What it is a copy of, for an error that names it.
    pub origin: String,
}

impl DeadLetter {
    /// A copy of input record `m`: key, payload, headers and timestamp unchanged, with the
    /// reason and the source topic, partition and offset added as headers.
    pub fn of_input(m: &impl Message, reason: &'static str) -> DeadLetter {
        let mut headers: Vec<(String, Option<Vec<u8>>)> = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default();
        headers.extend([
            (REASON.to_string(), Some(reason.as_bytes().to_vec())),
            (
                SOURCE_TOPIC.to_string(),
                Some(m.topic().as_bytes().to_vec()),
            ),
            (
                SOURCE_PARTITION.to_string(),
                Some(m.partition().to_string().into_bytes()),
            ),
            (
                SOURCE_OFFSET.to_string(),
                Some(m.offset().to_string().into_bytes()),
            ),
        ]);
        DeadLetter {
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            headers,
            timestamp: m.timestamp().to_millis(),
            reason,
            origin: format!(
                "record {}/{} offset {}",
                m.topic(),
                m.partition(),
                m.offset()
            ),
        }
    }

    /// The record, to be handed to a producer.
    pub(crate) fn record<'a>(&'a self, topic: &'a str) -> FutureRecord<'a, [u8], [u8]> {
        let mut headers = OwnedHeaders::new_with_capacity(self.headers.len());
        for (key, value) in &self.headers {
            headers = headers.insert(Header {
                key,
                value: value.as_deref(),
            });
        }
        let mut record = FutureRecord::to(topic).headers(headers);
        if let Some(k) = &self.key {
            record = record.key(k.as_slice());
        }
        if let Some(p) = &self.payload {
            record = record.payload(p.as_slice());
        }
        if let Some(ts) = self.timestamp {
            record = record.timestamp(ts);
        }
        record
    }

    /// [`DeadLetter::record`] for a producer whose deliveries carry a sequence number.
    pub(crate) fn base_record<'a>(
        &'a self,
        topic: &'a str,
        seq: usize,
    ) -> BaseRecord<'a, [u8], [u8], usize> {
        let r = self.record(topic);
        BaseRecord {
            topic: r.topic,
            partition: r.partition,
            payload: r.payload,
            key: r.key,
            timestamp: r.timestamp,
            headers: r.headers,
            delivery_opaque: seq,
        }
    }

    /// The copy without its payload (and without its key if that alone is too large for
    /// `max_bytes`), with headers naming the lengths left out; the source headers still say
    /// where the record is.
    pub fn stripped(&self, max_bytes: usize) -> DeadLetter {
        let mut copy = self.clone();
        if let Some(p) = copy.payload.take() {
            copy.headers.push((
                PAYLOAD_DROPPED.to_string(),
                Some(p.len().to_string().into_bytes()),
            ));
        }
        if copy.size() + HEADROOM > max_bytes {
            if let Some(k) = copy.key.take() {
                copy.headers.push((
                    KEY_DROPPED.to_string(),
                    Some(k.len().to_string().into_bytes()),
                ));
            }
        }
        copy
    }

    /// The value of the first header named `name`, as UTF-8 (lossy).
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    fn is_stripped(&self) -> bool {
        self.headers.iter().any(|(k, _)| k == PAYLOAD_DROPPED)
    }

    /// Bytes the producer counts against `message.max.bytes`, roughly.
    pub fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len)
            + self.payload.as_ref().map_or(0, Vec::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
                .sum::<usize>()
    }
}

/// Hands `letter` to the producer, waiting while its queue is full; the delivery, or why it
/// could not be handed over.
pub(crate) async fn hand_over(
    producer: &FutureProducer<SinkContext>,
    topic: &str,
    letter: &DeadLetter,
) -> Result<DeliveryFuture, KafkaError> {
    loop {
        match producer.send_result(letter.record(topic)) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// The pipeline's handle on the dead-letter writer.
pub struct DeadLetters {
    tx: mpsc::UnboundedSender<DeadLetter>,
    sent: u64,
    done: Arc<AtomicU64>,
    /// The producer's `message.max.bytes`.
    max_bytes: usize,
}

impl DeadLetters {
    /// Starts the writer for `topic`. A copy the topic refuses for good is reported on `fatal`
    /// (and the writer stops). The task ends once the handle is dropped and what it was handed
    /// is written.
    pub fn start(
        client: ClientConfig,
        topic: String,
        metrics: Arc<Metrics>,
        fatal: mpsc::UnboundedSender<String>,
    ) -> Result<(DeadLetters, tokio::task::JoinHandle<()>), SinkError> {
        let max_bytes = super::message_max_bytes(&client);
        let producer = super::producer(client, &topic)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let done = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(run(
            producer,
            topic,
            metrics,
            rx,
            done.clone(),
            fatal,
            max_bytes,
        ));
        Ok((
            DeadLetters {
                tx,
                sent: 0,
                done,
                max_bytes,
            },
            task,
        ))
    }

    /// A handle whose copies go to `tx` and count as written when `done` says so (tests).
    #[cfg(test)]
    pub(crate) fn detached(tx: mpsc::UnboundedSender<DeadLetter>, done: Arc<AtomicU64>) -> Self {
        DeadLetters {
            tx,
            sent: 0,
            done,
            max_bytes: usize::MAX,
        }
    }

    /// Hands a copy to the writer; one larger than the producer allows goes without its
    /// payload (see [`DeadLetter::stripped`]).
    pub fn send(&mut self, letter: DeadLetter) {
        let letter = if letter.size().saturating_add(HEADROOM) > self.max_bytes {
            letter.stripped(self.max_bytes)
        } else {
            letter
        };
        // the writer lives as long as the runtime unless it stopped on a refusal, which the
        // pipeline hears about on its own: the copy then stays outstanding, so no checkpoint
        // moves past its record
        let _ = self.tx.send(letter);
        self.sent += 1;
    }

    /// Copies handed over and not acknowledged by the topic yet.
    pub fn outstanding(&self) -> u64 {
        self.sent.saturating_sub(self.done.load(Ordering::Acquire))
    }

    /// Waits until every copy handed over is acknowledged, or `deadline`; whether they are.
    pub async fn drained(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            if self.outstanding() == 0 {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

async fn run(
    producer: FutureProducer<SinkContext>,
    topic: String,
    metrics: Arc<Metrics>,
    mut rx: mpsc::UnboundedReceiver<DeadLetter>,
    done: Arc<AtomicU64>,
    fatal: mpsc::UnboundedSender<String>,
    max_bytes: usize,
) {
    let mut warn = RateLimit::new(WARN_EVERY);
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, MAX_IN_FLIGHT).await > 0 {
        let pending = std::mem::take(&mut batch);
        if let Err(message) = write(
            &producer, &topic, &metrics, pending, &done, &mut warn, max_bytes,
        )
        .await
        {
            // the pipeline stops with this message as its error
            let _ = fatal.send(message);
            return;
        }
    }
}

/// Writes `pending` to the topic, retrying transient failures with backoff until every copy
/// is acknowledged; the error naming a copy refused for good.
async fn write(
    producer: &FutureProducer<SinkContext>,
    topic: &str,
    metrics: &Metrics,
    mut pending: Vec<DeadLetter>,
    done: &AtomicU64,
    warn: &mut RateLimit,
    max_bytes: usize,
) -> Result<(), String> {
    let mut backoff = Duration::from_millis(100);
    let mut unknown_since: Option<Instant> = None;
    loop {
        let mut in_flight = VecDeque::with_capacity(pending.len());
        let mut failed: Vec<(DeadLetter, KafkaError)> = Vec::new();
        for letter in pending {
            match hand_over(producer, topic, &letter).await {
                Ok(delivery) => in_flight.push_back((letter, delivery)),
                Err(e) => failed.push((letter, e)),
            }
        }
        while let Some((letter, delivery)) = in_flight.pop_front() {
            match delivery.await {
                Ok(Ok(_)) => {
                    metrics.dead_letter(letter.reason);
                    done.fetch_add(1, Ordering::AcqRel);
                }
                Ok(Err((e, _))) => failed.push((letter, e)),
                Err(_) => failed.push((letter, KafkaError::Canceled)),
            }
        }
        if failed.is_empty() {
            return Ok(());
        }
        let unknown = failed
            .iter()
            .any(|(_, e)| e.rdkafka_error_code().is_some_and(is_unknown_topic));
        let unknown_for = unknown_for(&mut unknown_since, unknown);
        let mut retry = Vec::with_capacity(failed.len());
        for (letter, e) in failed {
            match judge(producer.client(), e.rdkafka_error_code(), unknown_for) {
                Verdict::Retry => retry.push((letter, e)),
                // the topic takes less than the producer: the copy goes without its payload
                Verdict::Refused(Refusal::TooLarge) if !letter.is_stripped() => {
                    retry.push((letter.stripped(max_bytes), e))
                }
                Verdict::Fatal => {
                    let why = producer
                        .client()
                        .fatal_error()
                        .map_or_else(|| e.to_string(), |(_, why)| why);
                    return Err(format!(
                        "the dead-letter producer failed for good ({why}) writing the copy of {} to {topic}",
                        letter.origin
                    ));
                }
                Verdict::Refused(_) => {
                    return Err(format!(
                        "the dead-letter topic {topic} refuses the copy of {} ({} bytes, reason {}): {e}; nothing past it is checkpointed, so it is copied again at the next start once the topic takes it",
                        letter.origin,
                        letter.size(),
                        letter.reason
                    ))
                }
            }
        }
        let failed = retry;
        if let Some(suppressed) = warn.check() {
            let (_, e) = &failed[0];
            tracing::warn!(topic, error = %e, records = failed.len(), retry_in_ms = backoff.as_millis() as u64, suppressed, "dead-letter writes failed, retrying (checkpoints wait for them)");
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
        pending = failed.into_iter().map(|(letter, _)| letter).collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(key: usize, payload: usize) -> DeadLetter {
        DeadLetter {
            key: Some(vec![b'k'; key]),
            payload: Some(vec![b'p'; payload]),
            headers: vec![(REASON.to_string(), Some(b"invalid_json".to_vec()))],
            timestamp: Some(1),
            reason: "invalid_json",
            origin: "record t/0 offset 7".into(),
        }
    }

    #[test]
    fn a_copy_too_large_goes_without_its_payload_and_if_need_be_its_key() {
        let small_key = letter(10, 2_000_000).stripped(1_000_000);
        assert_eq!(small_key.payload, None);
        assert_eq!(small_key.key.as_deref().map(<[u8]>::len), Some(10));
        assert_eq!(
            small_key.header(PAYLOAD_DROPPED).as_deref(),
            Some("2000000")
        );
        assert_eq!(small_key.header(KEY_DROPPED), None);
        assert!(small_key.is_stripped());
        assert_eq!(small_key.header(REASON).as_deref(), Some("invalid_json"));

        let big_key = letter(999_000, 10).stripped(1_000_000);
        assert_eq!((big_key.key.clone(), big_key.payload.clone()), (None, None));
        assert_eq!(big_key.header(KEY_DROPPED).as_deref(), Some("999000"));
        assert!(big_key.size() < 1_000);
    }

    #[tokio::test]
    async fn the_handle_strips_a_copy_larger_than_the_producer_allows() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut handle = DeadLetters::detached(tx, Arc::new(AtomicU64::new(0)));
        handle.max_bytes = 100_000;
        handle.send(letter(5, 200_000));
        handle.send(letter(5, 50));
        let first = rx.try_recv().expect("sent");
        let second = rx.try_recv().expect("sent");
        assert_eq!(first.payload, None);
        assert_eq!(second.payload.as_deref().map(<[u8]>::len), Some(50));
        assert_eq!(handle.outstanding(), 2);
    }
}
