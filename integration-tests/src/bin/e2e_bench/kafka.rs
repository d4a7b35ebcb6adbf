//! The Kafka side of the bench: generating the workload, producing it to the input topic, and
//! the bare librdkafka consume that sets the ceiling.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context as _, Result};
use integration_tests::model::Event;
use integration_tests::workload::{sentinel, START_TS};
use integration_tests::{unique_name, Broker};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer as _, ProducerContext};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::proc::process_cpu_seconds;
use crate::Args;

/// Events in global order and the partition of each. Event time rises 1 ms per record; 5% of
/// records lag 1..=disorder ms behind (never before `START_TS`); keys uniform.
pub(crate) fn generate(args: &Args) -> (Vec<Event>, Vec<i32>) {
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut events = Vec::with_capacity(args.records);
    let mut partition_of = Vec::with_capacity(args.records);
    for i in 0..args.records {
        let key = rng.random_range(0..args.keys);
        let clock = START_TS + i as i64;
        let ts = if args.disorder_ms > 0 && rng.random_bool(0.05) {
            (clock - rng.random_range(1..=args.disorder_ms)).max(START_TS)
        } else {
            clock
        };
        events.push(Event {
            key: format!("u{key}"),
            value: rng.random_range(-100..=1000),
            ts,
        });
        partition_of.push((key % args.partitions) as i32);
    }
    (events, partition_of)
}

#[derive(Default)]
struct Deliveries {
    ok: AtomicU64,
    failed: AtomicU64,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: Self::DeliveryOpaque) {
        let counter = if result.is_ok() {
            &self.ok
        } else {
            &self.failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

pub(crate) struct Produced {
    pub(crate) records: u64,
    pub(crate) seconds: f64,
}

/// Sends every event to its partition, then one sentinel per partition a day past the largest
/// event time; returns once every message is acknowledged.
pub(crate) fn produce(
    broker: &Broker,
    topic: &str,
    events: &[Event],
    partition_of: &[i32],
    partitions: usize,
) -> Result<Produced> {
    let producer: BaseProducer<Deliveries> = broker
        .client_config()
        .set("acks", "1")
        .set("enable.idempotence", "false")
        .set("compression.type", "none")
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("batch.num.messages", "100000")
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "1048576")
        .set("message.timeout.ms", "120000")
        .create_with_context(Deliveries::default())
        .context("creating the bench producer")?;
    let far = events.iter().map(|e| e.ts).max().unwrap_or(START_TS) + 86_400_000;
    let sentinels: Vec<(Event, i32)> = (0..partitions as i32).map(|p| (sentinel(far), p)).collect();
    let all = events
        .iter()
        .zip(partition_of.iter().copied())
        .chain(sentinels.iter().map(|(e, p)| (e, *p)));
    eprintln!(
        "[bench] producing {} records to {topic}",
        events.len() + partitions
    );
    let started = Instant::now();
    let mut payload = String::new();
    let mut sent = 0u64;
    for (event, partition) in all {
        payload.clear();
        payload.push_str(&format!(
            r#"{{"user": "{}", "amount": {}, "ts": {}}}"#,
            event.key, event.value, event.ts
        ));
        let mut record = BaseRecord::<str, str>::to(topic)
            .partition(partition)
            .key(event.key.as_str())
            .payload(payload.as_str());
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    producer.poll(Duration::from_millis(10));
                }
                Err((err, _)) => return Err(anyhow!(err).context(format!("producing to {topic}"))),
            }
        }
        sent += 1;
        if sent.is_multiple_of(1024) {
            producer.poll(Duration::ZERO);
        }
    }
    producer
        .flush(Duration::from_secs(300))
        .context("flushing the bench producer")?;
    let seconds = started.elapsed().as_secs_f64();
    let ctx = producer.context();
    let (ok, failed) = (
        ctx.ok.load(Ordering::Relaxed),
        ctx.failed.load(Ordering::Relaxed),
    );
    ensure!(
        failed == 0 && ok == sent,
        "{ok} of {sent} delivered, {failed} failed"
    );
    eprintln!("[bench] produced {sent} in {seconds:.1} s");
    Ok(Produced {
        records: sent,
        seconds,
    })
}

pub(crate) struct BareConsume {
    pub(crate) records: u64,
    pub(crate) seconds: f64,
    pub(crate) cpu_seconds: f64,
}

/// A minimal librdkafka consumer: every partition assigned from the beginning, counting
/// messages (and summing their payload bytes) until each partition reached its high watermark.
/// Wall time from the assignment to the last message (like the service's, which starts at its
/// last scrape with nothing consumed); CPU time of the whole bench process meanwhile.
pub(crate) fn bare_consume(
    broker: &Broker,
    topic: &str,
    partitions: usize,
    expected: u64,
) -> Result<BareConsume> {
    let cpu_before = process_cpu_seconds("self")?;
    let consumer: BaseConsumer = broker
        .client_config()
        .set("group.id", unique_name("bare"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .context("creating the bare consumer")?;
    let mut ends = Vec::with_capacity(partitions);
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        let (_, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        ends.push(high);
        assignment.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    let total: i64 = ends.iter().sum();
    ensure!(
        total as u64 == expected,
        "high watermarks sum to {total}, produced {expected}"
    );
    let started = Instant::now();
    consumer.assign(&assignment)?;
    let mut remaining = ends.iter().filter(|&&h| h > 0).count();
    let (mut records, mut checksum) = (0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs(600);
    while remaining > 0 {
        ensure!(
            Instant::now() < deadline,
            "bare consume: {records} of {total} after 600 s"
        );
        let Some(result) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = result.context("bare consume")?;
        records += 1;
        checksum = message
            .payload()
            .unwrap_or_default()
            .iter()
            .fold(checksum, |acc, b| acc.wrapping_add(u64::from(*b)));
        let end = usize::try_from(message.partition())
            .ok()
            .and_then(|p| ends.get(p));
        if end == Some(&(message.offset() + 1)) {
            remaining -= 1;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu_seconds = process_cpu_seconds("self")? - cpu_before;
    eprintln!("[bench] bare consume: {records} in {seconds:.2} s, {cpu_seconds:.2} CPU s");
    eprintln!("[bench] payload byte sum {checksum}");
    Ok(BareConsume {
        records,
        seconds,
        cpu_seconds,
    })
}
