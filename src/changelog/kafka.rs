//! The changelog's Kafka side: a publisher task that writes each durable checkpoint's
//! per-partition chunks (idempotent producer, acknowledged by all replicas), and a reader that
//! replays one changelog partition to rebuild a source partition's state.
//!
//! Source partition `p` of any topic goes to changelog partition `p mod N` (N: the changelog
//! topic's partition count); records carry their source, so topics sharing a changelog
//! partition are told apart.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot};

use super::protocol::{decode, encode, Chunk, Committed, DecodeError, Replay};
use crate::position::Partition;

#[derive(Debug, thiserror::Error)]
pub enum ChangelogError {
    #[error("cannot create the changelog {role} for topic {topic}: {source}")]
    Create {
        role: &'static str,
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error("changelog topic {topic} does not exist or has no partitions ({detail}); create it (compacted, as many partitions as the largest input topic) before starting")]
    Missing { topic: String, detail: String },
    #[error("cannot read changelog partition {topic}[{partition}]: {source}")]
    Read {
        topic: String,
        partition: i32,
        #[source]
        source: KafkaError,
    },
    #[error("reading changelog partition {topic}[{partition}] stalled at offset {at} before its end {end}")]
    Stalled {
        topic: String,
        partition: i32,
        at: i64,
        end: i64,
    },
    #[error("changelog partition {topic}[{partition}] holds a record this build cannot read at offset {offset}: {detail}; state.on_unreadable_changelog is fail, so the service stops (every instance that gets this partition does). Restore the record, or set state.on_unreadable_changelog: skip to restore the newest complete publication before it")]
    Unreadable {
        topic: String,
        partition: i32,
        offset: i64,
        detail: String,
    },
    #[error("reading changelog topic {topic} was cancelled (the service is stopping)")]
    Cancelled { topic: String },
}

/// Where the changelog is and how to reach it.
#[derive(Clone)]
pub struct ChangelogTopic {
    pub client: ClientConfig,
    pub topic: String,
    pub partitions: i32,
    /// A record this build cannot read is skipped on restore (`state.on_unreadable_changelog:
    /// skip`) instead of failing the read.
    pub skip_unreadable: bool,
}

impl ChangelogTopic {
    /// Looks the topic up; it must exist.
    pub fn lookup(client: ClientConfig, topic: &str) -> Result<Self, ChangelogError> {
        let consumer: BaseConsumer = client
            .clone()
            .set("group.id", "checkpointer-changelog-probe")
            .create()
            .map_err(|source| ChangelogError::Create {
                role: "metadata client",
                topic: topic.to_string(),
                source,
            })?;
        let missing = |detail: String| ChangelogError::Missing {
            topic: topic.to_string(),
            detail,
        };
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(30))
            .map_err(|e| missing(e.to_string()))?;
        let partitions = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .filter(|t| t.error().is_none())
            .map(|t| t.partitions().len())
            .unwrap_or(0);
        if partitions == 0 {
            return Err(missing("no partitions in the broker's metadata".into()));
        }
        Ok(ChangelogTopic {
            client,
            topic: topic.to_string(),
            partitions: partitions as i32,
            skip_unreadable: false,
        })
    }

    /// The changelog partition of source partition `p`.
    pub fn partition_of(&self, p: &Partition) -> i32 {
        p.partition.rem_euclid(self.partitions)
    }
}

/// One publication batch: chunks to write, then tombstones for records they supersede (key and
/// source partition), and who waits for their acknowledgement.
pub struct Batch {
    pub chunks: Vec<Chunk>,
    pub tombstones: Vec<(String, Partition)>,
    pub done: Option<oneshot::Sender<Result<(), String>>>,
}

/// Handle to the publisher task.
#[derive(Clone)]
pub struct Publisher {
    tx: mpsc::UnboundedSender<Batch>,
}

/// A publication that failed: the partitions whose changelog line must restart with a full
/// publication.
#[derive(Debug)]
pub struct PublishFailure {
    pub partitions: Vec<Partition>,
    pub reason: String,
}

/// The publisher, its failures, and its task (which ends once the publisher is dropped and
/// what it was handed is published or failed).
pub type Started = (
    Publisher,
    mpsc::UnboundedReceiver<PublishFailure>,
    tokio::task::JoinHandle<()>,
);

impl Publisher {
    pub fn start(topic: ChangelogTopic) -> Result<Started, ChangelogError> {
        let producer: FutureProducer = crate::sink::idempotent(topic.client.clone())
            .create()
            .map_err(|source| ChangelogError::Create {
                role: "producer",
                topic: topic.topic.clone(),
                source,
            })?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (fail_tx, fail_rx) = mpsc::unbounded_channel();
        // ends once the Publisher is dropped and what it was handed is published (or failed)
        let task = tokio::spawn(run(producer, topic, rx, fail_tx));
        Ok((Publisher { tx }, fail_rx, task))
    }

    pub fn publish(&self, batch: Batch) {
        // the receiver lives as long as the runtime; a send error means shutdown
        let _ = self.tx.send(batch);
    }
}

async fn run(
    producer: FutureProducer,
    topic: ChangelogTopic,
    mut rx: mpsc::UnboundedReceiver<Batch>,
    failures: mpsc::UnboundedSender<PublishFailure>,
) {
    // the first failure since the last batch that waited for an answer
    let mut unreported: Option<String> = None;
    while let Some(batch) = rx.recv().await {
        let mut partitions: Vec<Partition> = Vec::new();
        for chunk in &batch.chunks {
            if !partitions.contains(chunk.source()) {
                partitions.push(chunk.source().clone());
            }
        }
        let mut error = send_chunks(&producer, &topic, &batch.chunks).await.err();
        // tombstones only once what supersedes them is acknowledged
        if error.is_none() && !batch.tombstones.is_empty() {
            error = send_tombstones(&producer, &topic, &batch.tombstones)
                .await
                .err();
        }
        if let Some(reason) = &error {
            tracing::warn!(error = %reason, topic = %topic.topic, "changelog publication failed; the next checkpoint publishes the partitions' full state");
            unreported.get_or_insert_with(|| reason.clone());
            let _ = failures.send(PublishFailure {
                partitions,
                reason: reason.clone(),
            });
        }
        if let Some(done) = batch.done {
            let _ = done.send(match unreported.take() {
                None => Ok(()),
                Some(reason) => Err(reason),
            });
        }
    }
    let _ = producer.flush(Duration::from_secs(10));
}

async fn send_chunks(
    producer: &FutureProducer,
    topic: &ChangelogTopic,
    chunks: &[Chunk],
) -> Result<(), String> {
    let mut records = Vec::with_capacity(chunks.len());
    for chunk in chunks {
        let payload =
            encode(chunk).map_err(|e| format!("cannot encode a changelog record: {e}"))?;
        records.push((
            chunk.record_key(),
            payload,
            topic.partition_of(chunk.source()),
        ));
    }
    let sends: Vec<_> = records
        .iter()
        .map(|(key, payload, partition)| {
            let record = FutureRecord::to(&topic.topic)
                .key(key)
                .payload(payload)
                .partition(*partition);
            producer.send(record, Duration::from_secs(60))
        })
        .collect();
    first_error(sends).await
}

async fn send_tombstones(
    producer: &FutureProducer,
    topic: &ChangelogTopic,
    tombstones: &[(String, Partition)],
) -> Result<(), String> {
    let sends: Vec<_> = tombstones
        .iter()
        .map(|(key, source)| {
            let record = FutureRecord::<String, Vec<u8>>::to(&topic.topic)
                .key(key)
                .partition(topic.partition_of(source));
            producer.send(record, Duration::from_secs(60))
        })
        .collect();
    first_error(sends)
        .await
        .map_err(|e| format!("tombstones: {e}"))
}

/// Waits for every send; the first failure, if any.
async fn first_error<F, T, M>(sends: Vec<F>) -> Result<(), String>
where
    F: std::future::Future<Output = Result<T, (KafkaError, M)>>,
{
    let mut error = None;
    for send in sends {
        if let Err((e, _)) = send.await {
            error.get_or_insert_with(|| e.to_string());
        }
    }
    error.map_or(Ok(()), Err)
}

/// How far a changelog read is for one source partition (counted over the changelog
/// partition that holds it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReadProgress {
    /// Records left to read.
    pub records_left: i64,
    /// Bytes (keys and values) read so far.
    pub bytes_read: u64,
}

/// Called with each source partition's progress during a changelog read.
pub type OnProgress<'a> = &'a mut dyn FnMut(&Partition, ReadProgress);

/// Replays the changelog partitions of `sources` (all at once, one reader) from their start to
/// their end and returns the state the changelog holds for each source (absent: none).
/// Blocking; gives up with [`ChangelogError::Cancelled`] soon after `cancel` is set.
pub fn read_states(
    topic: &ChangelogTopic,
    group: &str,
    sources: &[Partition],
    on_progress: OnProgress<'_>,
    cancel: &AtomicBool,
) -> Result<HashMap<Partition, Committed>, ChangelogError> {
    let mut out = HashMap::new();
    if sources.is_empty() {
        return Ok(out);
    }
    // its own client id, so that a broker quota can bound restore traffic apart from the rest
    let client_id = format!(
        "{}-changelog-reader",
        topic.client.get("client.id").unwrap_or("checkpointer")
    );
    let consumer: BaseConsumer = topic
        .client
        .clone()
        .set("client.id", client_id)
        .set("group.id", "checkpointer-changelog-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .create()
        .map_err(|source| ChangelogError::Create {
            role: "reader",
            topic: topic.topic.clone(),
            source,
        })?;
    // changelog partition -> (next offset to see, end, sources it holds)
    let mut pending: BTreeMap<i32, (i64, i64, Vec<Partition>)> = BTreeMap::new();
    // changelog partition -> bytes read
    let mut bytes: HashMap<i32, u64> = HashMap::new();
    for s in sources {
        let partition = topic.partition_of(s);
        if let Some(entry) = pending.get_mut(&partition) {
            entry.2.push(s.clone());
            continue;
        }
        let (low, high) = consumer
            .fetch_watermarks(&topic.topic, partition, Duration::from_secs(30))
            .map_err(|source| ChangelogError::Read {
                topic: topic.topic.clone(),
                partition,
                source,
            })?;
        pending.insert(partition, (low, high, vec![s.clone()]));
    }
    pending.retain(|_, (low, high, srcs)| {
        for s in srcs.iter() {
            on_progress(
                s,
                ReadProgress {
                    records_left: (*high - *low).max(0),
                    bytes_read: 0,
                },
            );
        }
        high > low
    });
    if pending.is_empty() {
        return Ok(out);
    }
    let mut tpl = TopicPartitionList::new();
    for partition in pending.keys() {
        tpl.add_partition_offset(&topic.topic, *partition, Offset::Beginning)
            .map_err(|source| ChangelogError::Read {
                topic: topic.topic.clone(),
                partition: *partition,
                source,
            })?;
    }
    consumer
        .assign(&tpl)
        .map_err(|source| ChangelogError::Read {
            topic: topic.topic.clone(),
            partition: -1,
            source,
        })?;
    let mut replay = Replay::default();
    let mut idle_since = Instant::now();
    while !pending.is_empty() {
        if cancel.load(Ordering::Relaxed) {
            return Err(ChangelogError::Cancelled {
                topic: topic.topic.clone(),
            });
        }
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                idle_since = Instant::now();
                let partition = m.partition();
                let read = bytes.entry(partition).or_default();
                *read += (m.key_len() + m.payload_len()) as u64;
                if let Some((next, high, srcs)) = pending.get_mut(&partition) {
                    *next = m.offset() + 1;
                    let progress = ReadProgress {
                        records_left: (*high - *next).max(0),
                        bytes_read: *read,
                    };
                    for s in srcs.iter() {
                        on_progress(s, progress);
                    }
                    if *next >= *high {
                        pending.remove(&partition);
                    }
                }
                let Some(payload) = m.payload() else {
                    continue; // a tombstone
                };
                match decode(payload) {
                    Ok(chunk) if chunk.group == group && sources.contains(chunk.source()) => {
                        replay.push(chunk)
                    }
                    Ok(_) => {}
                    // something else written to the topic: not ours, not state
                    Err(DecodeError::Foreign) => {
                        tracing::warn!(topic = %topic.topic, partition, offset = m.offset(), "skipping a record that is not a changelog record");
                    }
                    // the publication it belongs to stays incomplete, so the replay takes the
                    // newest complete one before it: state and offsets still match
                    Err(e) if topic.skip_unreadable => {
                        tracing::warn!(topic = %topic.topic, partition, offset = m.offset(), error = %e, "skipping a changelog record this build cannot read (state.on_unreadable_changelog: skip); the newest complete publication without it is restored and the records after it are read again");
                    }
                    Err(e) => {
                        return Err(ChangelogError::Unreadable {
                            topic: topic.topic.clone(),
                            partition,
                            offset: m.offset(),
                            detail: e.to_string(),
                        })
                    }
                }
            }
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                if let Some((_, _, srcs)) = pending.remove(&partition) {
                    let progress = ReadProgress {
                        records_left: 0,
                        bytes_read: bytes.get(&partition).copied().unwrap_or(0),
                    };
                    for s in &srcs {
                        on_progress(s, progress);
                    }
                }
            }
            Some(Err(e)) => {
                return Err(ChangelogError::Read {
                    topic: topic.topic.clone(),
                    partition: -1,
                    source: e,
                })
            }
            // a partial replay would restore an older state than the newest published one
            None if idle_since.elapsed() > Duration::from_secs(30) => {
                let (partition, (at, end, _)) = pending
                    .iter()
                    .next()
                    .map(|(p, v)| (*p, v.clone()))
                    .unwrap_or((-1, (0, 0, Vec::new())));
                return Err(ChangelogError::Stalled {
                    topic: topic.topic.clone(),
                    partition,
                    at,
                    end,
                });
            }
            None => {}
        }
    }
    for ignored in &replay.ignored {
        tracing::warn!(tag = ?ignored.tag, reason = %ignored.reason, "changelog publication ignored");
    }
    for s in sources {
        if let Some(c) = replay.take_committed(s) {
            out.insert(s.clone(), c);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
