//! Kafka clients for tests: a producer that writes to chosen partitions and waits for delivery,
//! and a reader that collects a whole topic from the beginning.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers as _, Message as _};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer as _, ProducerContext};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::workload::Record;
use crate::{unique_name, Broker};

const FLUSH_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Default)]
struct DeliveryTracker {
    delivered: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl ClientContext for DeliveryTracker {}

impl ProducerContext for DeliveryTracker {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: Self::DeliveryOpaque) {
        match result {
            Ok(_) => {
                self.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Err((err, message)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut first) = self.first_error.lock() {
                    first.get_or_insert_with(|| {
                        format!(
                            "{err} (topic {}, partition {})",
                            message.topic(),
                            message.partition()
                        )
                    });
                }
            }
        }
    }
}

/// Writes records to explicit partitions. Idempotent, so retries cannot reorder a partition:
/// the event-time disorder the tests rely on is exactly the one they generated.
pub struct Producer {
    inner: BaseProducer<DeliveryTracker>,
    sent: u64,
}

impl Producer {
    pub fn new(broker: &Broker) -> Result<Self> {
        Producer::with_options(broker, &[])
    }

    /// A producer with more librdkafka settings (e.g. `linger.ms` and `batch.size` large enough
    /// to put many records in one record batch).
    pub fn with_options(broker: &Broker, options: &[(&str, &str)]) -> Result<Self> {
        let mut config = broker.client_config();
        config
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "60000");
        for (key, value) in options {
            config.set(*key, *value);
        }
        let inner = config
            .create_with_context(DeliveryTracker::default())
            .context("creating a producer")?;
        Ok(Producer { inner, sent: 0 })
    }

    /// Queues one message; `None` key or payload are sent as null.
    pub fn send(
        &mut self,
        topic: &str,
        partition: i32,
        key: Option<&str>,
        payload: Option<&[u8]>,
    ) -> Result<()> {
        let mut record = BaseRecord::<str, [u8]>::to(topic).partition(partition);
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(payload) = payload {
            record = record.payload(payload);
        }
        loop {
            match self.inner.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    record = returned;
                    self.inner.poll(Duration::from_millis(50));
                }
                Err((err, _)) => {
                    return Err(anyhow!(err).context(format!("producing to {topic}/{partition}")))
                }
            }
        }
        self.sent += 1;
        self.inner.poll(Duration::ZERO);
        Ok(())
    }

    /// Queues `value` serialized as JSON.
    pub fn send_json(
        &mut self,
        topic: &str,
        partition: i32,
        key: Option<&str>,
        value: &serde_json::Value,
    ) -> Result<()> {
        let payload = serde_json::to_vec(value)?;
        self.send(topic, partition, key, Some(&payload))
    }

    /// Queues raw bytes (for garbage input).
    pub fn send_raw(
        &mut self,
        topic: &str,
        partition: i32,
        key: Option<&str>,
        payload: &[u8],
    ) -> Result<()> {
        self.send(topic, partition, key, Some(payload))
    }

    /// Queues every record of `records` to `partition`, in order.
    pub fn send_records(&mut self, topic: &str, partition: i32, records: &[Record]) -> Result<()> {
        for record in records {
            let payload = record.payload();
            self.send(topic, partition, record.kafka_key(), Some(&payload))?;
        }
        Ok(())
    }

    /// Queues `partitions[p]` to partition `p` of `topic` for every `p`, then flushes; returns
    /// the number of records sent.
    pub fn send_partitions(&mut self, topic: &str, partitions: &[Vec<Record>]) -> Result<usize> {
        let mut sent = 0;
        for (partition, records) in partitions.iter().enumerate() {
            let partition = i32::try_from(partition).context("partition out of range")?;
            self.send_records(topic, partition, records)?;
            sent += records.len();
        }
        self.flush()?;
        Ok(sent)
    }

    /// Like [`Producer::send_partitions`] but spread over time: `chunk` records of every
    /// partition, flush, pause, until all are sent. Keeps a live stream going while a test
    /// kills and restarts the service.
    pub fn send_partitions_paced(
        &mut self,
        topic: &str,
        partitions: &[Vec<Record>],
        chunk: usize,
        pause: Duration,
    ) -> Result<usize> {
        let chunk = chunk.max(1);
        let longest = partitions.iter().map(Vec::len).max().unwrap_or(0);
        let mut sent = 0;
        for from in (0..longest).step_by(chunk) {
            for (partition, records) in partitions.iter().enumerate() {
                let partition = i32::try_from(partition).context("partition out of range")?;
                let part = records.get(from..).unwrap_or_default();
                let part = &part[..part.len().min(chunk)];
                self.send_records(topic, partition, part)?;
                sent += part.len();
            }
            self.flush()?;
            std::thread::sleep(pause);
        }
        Ok(sent)
    }

    /// Waits until every queued message is acknowledged; fails if any delivery failed.
    pub fn flush(&mut self) -> Result<()> {
        self.inner
            .flush(FLUSH_TIMEOUT)
            .context("flushing the producer")?;
        let context = self.inner.context();
        let failed = context.failed.load(Ordering::Relaxed);
        if failed > 0 {
            let first = context
                .first_error
                .lock()
                .ok()
                .and_then(|first| first.clone())
                .unwrap_or_default();
            bail!(
                "{failed} of {} messages failed delivery; first: {first}",
                self.sent
            );
        }
        let delivered = context.delivered.load(Ordering::Relaxed);
        if delivered != self.sent {
            bail!(
                "{delivered} of {} messages acknowledged after flush",
                self.sent
            );
        }
        Ok(())
    }

    /// Messages acknowledged so far.
    pub fn delivered(&self) -> u64 {
        self.inner.context().delivered.load(Ordering::Relaxed)
    }
}

/// One message read back from a topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub partition: i32,
    pub offset: i64,
    /// The message key as UTF-8 (lossy); empty when the message had no key.
    pub key: String,
    pub payload: Vec<u8>,
    /// The message's headers, in order (a header without a value reads as empty).
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Message {
    /// The first header named `name`, as UTF-8 (lossy).
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
}

/// Reads every partition of a topic from the beginning and keeps all messages seen so far.
///
/// Completion is decided by the caller's predicate (what a test expects to see), not by high
/// watermarks, so a test waits for exactly the output it checks.
pub struct OutputReader {
    consumer: BaseConsumer,
    topic: String,
    messages: Vec<Message>,
    errors: u64,
}

impl OutputReader {
    pub fn new(broker: &Broker, topic: &str) -> Result<Self> {
        let partitions = broker.partition_count(topic)?;
        if partitions == 0 {
            bail!("topic {topic} does not exist (create it before reading it)");
        }
        let consumer: BaseConsumer = broker
            .client_config()
            .set("group.id", unique_name("reader"))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "100")
            .create()
            .context("creating a reader")?;
        let mut assignment = TopicPartitionList::new();
        for partition in 0..partitions as i32 {
            assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
        }
        consumer.assign(&assignment)?;
        Ok(OutputReader {
            consumer,
            topic: topic.to_owned(),
            messages: Vec::new(),
            errors: 0,
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Every message read so far, in arrival order.
    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    /// Every message read so far as `(key, payload)`.
    pub fn pairs(&self) -> Vec<(String, Vec<u8>)> {
        self.messages
            .iter()
            .map(|m| (m.key.clone(), m.payload.clone()))
            .collect()
    }

    /// Polls for up to `max_wait`, returning after the first batch; returns how many messages
    /// were added.
    fn poll_batch(&mut self, max_wait: Duration) -> usize {
        let before = self.messages.len();
        let mut wait = max_wait;
        while let Some(result) = self.consumer.poll(wait) {
            match result {
                Ok(message) => self.messages.push(Message {
                    partition: message.partition(),
                    offset: message.offset(),
                    key: message
                        .key()
                        .map(|k| String::from_utf8_lossy(k).into_owned())
                        .unwrap_or_default(),
                    payload: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                    headers: message
                        .headers()
                        .map(|h| {
                            h.iter()
                                .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                                .collect()
                        })
                        .unwrap_or_default(),
                }),
                Err(err) => {
                    self.errors += 1;
                    if self.errors <= 5 {
                        eprintln!("[reader {}] {err}", self.topic);
                    }
                }
            }
            // Drain what is already queued without waiting again.
            wait = Duration::ZERO;
        }
        self.messages.len() - before
    }

    /// Collects messages for `duration`; returns how many were added.
    pub fn poll_for(&mut self, duration: Duration) -> usize {
        let deadline = Instant::now() + duration;
        let mut added = 0;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            added += self.poll_batch(left.min(Duration::from_millis(100)));
            if left.is_zero() {
                return added;
            }
        }
    }

    /// Collects messages until `done(messages so far)` holds (true) or `timeout` passes (false).
    pub fn poll_until(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&[Message]) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if done(&self.messages) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            self.poll_batch(Duration::from_millis(100));
        }
    }

    /// Collects until nothing new arrived for `idle`, or `max` passed; returns how many were
    /// added. Use it once the writer has stopped, to be sure everything it wrote was read.
    pub fn drain(&mut self, idle: Duration, max: Duration) -> usize {
        let deadline = Instant::now() + max;
        let mut quiet_since = Instant::now();
        let mut added = 0;
        while Instant::now() < deadline && quiet_since.elapsed() < idle {
            let n = self.poll_batch(Duration::from_millis(100));
            if n > 0 {
                added += n;
                quiet_since = Instant::now();
            }
        }
        added
    }
}

/// Reads `topic` from the beginning until `done` holds; fails after `timeout`.
pub fn read_topic(
    broker: &Broker,
    topic: &str,
    timeout: Duration,
    done: impl FnMut(&[Message]) -> bool,
) -> Result<Vec<(String, Vec<u8>)>> {
    let mut reader = OutputReader::new(broker, topic)?;
    if reader.poll_until(timeout, done) {
        Ok(reader.pairs())
    } else {
        bail!(
            "reading {topic}: condition not met after {timeout:?} ({} messages read)",
            reader.messages().len()
        )
    }
}
