//! librdkafka's mock cluster: an in-process stand-in for a Kafka broker, listening on loopback,
//! whose broker can be taken down and brought back (`broker_down`/`broker_up`). The root
//! crate's `tests/*.rs` run the real binary against it; [`crate::broker`] is the real Apache
//! Kafka of `integration-tests/tests`.
//!
//! Its topics are [`INPUT`] and [`OUTPUT`]; records are JSON `{"user","amount","ts"}`, the
//! pointers of the tests' configurations.

use std::time::Duration;

use anyhow::{Context as _, Result};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, DefaultProducerContext, Producer};

/// The input topic of a [`mock_cluster`].
pub const INPUT: &str = "in";
/// The output topic of a [`mock_cluster`] (one partition).
pub const OUTPUT: &str = "out";

const FLUSH_TIMEOUT: Duration = Duration::from_secs(30);

pub type Cluster = MockCluster<'static, DefaultProducerContext>;

/// A one-broker mock cluster with topics [`INPUT`] (`partitions` partitions) and [`OUTPUT`],
/// its bootstrap address, and a producer for it.
pub fn mock_cluster(partitions: i32) -> Result<(Cluster, String, BaseProducer)> {
    let cluster = MockCluster::new(1).context("creating the mock cluster")?;
    let brokers = cluster.bootstrap_servers();
    cluster
        .create_topic(INPUT, partitions, 1)
        .with_context(|| format!("creating topic {INPUT}"))?;
    cluster
        .create_topic(OUTPUT, 1, 1)
        .with_context(|| format!("creating topic {OUTPUT}"))?;
    let producer = producer(&brokers)?;
    Ok((cluster, brokers, producer))
}

/// A producer for `brokers`.
pub fn producer(brokers: &str) -> Result<BaseProducer> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("creating a producer")
}

/// A consumer of `topic` from its beginning, in group `group`.
pub fn consumer(brokers: &str, group: &str, topic: &str) -> Result<BaseConsumer> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .create()
        .context("creating a consumer")?;
    consumer
        .subscribe(&[topic])
        .with_context(|| format!("subscribing to {topic}"))?;
    Ok(consumer)
}

/// Writes `(key, ts, amount)` records to [`INPUT`], record `i` to partition `partition_of(i)`,
/// retrying while the local queue is full, and waits until every one is delivered.
pub fn produce(
    producer: &BaseProducer,
    partition_of: impl Fn(usize) -> i32,
    recs: &[(String, i64, i64)],
) -> Result<()> {
    for (i, (key, ts, amount)) in recs.iter().enumerate() {
        let payload = format!(r#"{{"user":"{key}","amount":{amount},"ts":{ts}}}"#);
        let mut record = BaseRecord::to(INPUT)
            .key(key)
            .payload(&payload)
            .partition(partition_of(i));
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    record = r;
                    producer.poll(Duration::from_millis(50));
                }
            }
        }
    }
    eprintln!("[mock_cluster] flushing {} records", recs.len());
    producer
        .flush(FLUSH_TIMEOUT)
        .with_context(|| format!("flushing {} records", recs.len()))?;
    eprintln!("[mock_cluster] flushed");
    Ok(())
}
