//! Instance scope without group membership: partitions added to an input topic while the
//! service runs are found (`kafka.partition_discovery_interval`) and read from their beginning,
//! and the offsets of every durable checkpoint are committed to `group_id` (for lag tools),
//! tagged with the store that made them.

use std::time::Duration;

use anyhow::{anyhow, ensure, Context as _, Result};
use integration_tests::metrics::{RECORDS_CONSUMED, RECORDS_LATE};
use integration_tests::model::{expected_windows, Event};
use integration_tests::verify::{check_output, contains_all};
use integration_tests::workload::{self, Record, StreamShape, START_TS};
use integration_tests::{poll_until, test_seed, unique_name, Broker, OutputReader, Producer};
use integration_tests::{Service, ServiceConfig};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

const TIMEOUT: Duration = Duration::from_secs(90);

#[test]
fn partitions_added_while_running_are_read_and_offsets_are_committed_to_the_group() {
    let seed = test_seed("partition_discovery");
    if let Err(err) = run(seed) {
        panic!("{err:#}\n(seed {seed})");
    }
}

/// `(next offset, metadata)` the group has committed for each of `partitions` of `topic`.
fn committed(
    broker: &Broker,
    group: &str,
    topic: &str,
    partitions: i32,
) -> Result<Vec<(i64, String)>> {
    let consumer: BaseConsumer = broker
        .client_config()
        .set("group.id", group)
        .create()
        .context("creating a consumer to read the group's offsets")?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(tpl, Duration::from_secs(10))?;
    Ok(committed
        .elements()
        .iter()
        .map(|e| {
            let offset = match e.offset() {
                Offset::Offset(o) => o,
                _ => -1,
            };
            (offset, e.metadata().to_owned())
        })
        .collect())
}

fn run(seed: u64) -> Result<()> {
    let broker = Broker::shared()?;
    let input = unique_name("discovery-in");
    let output = unique_name("discovery-out");
    broker.create_topic(&input, 1)?;
    broker.create_topic(&output, 1)?;
    // the added partition's records come later in event time than the first one's: the
    // watermark has moved on by the time it is found, and older records would be late
    let mut rng = StdRng::seed_from_u64(seed);
    let shape = |start_ts| StreamShape {
        partitions: 1,
        records_per_partition: 300,
        keys: 5,
        start_ts,
    };
    let mut events = workload::generate(&mut rng, shape(START_TS));
    let later = workload::max_ts(&events) + 1_000;
    events.extend(workload::generate(&mut rng, shape(later)));
    // keys live on one partition each, so the windows do not depend on which partition is read
    // first
    let events: Vec<Vec<Event>> = events
        .into_iter()
        .enumerate()
        .map(|(p, evs)| {
            evs.into_iter()
                .map(|mut e| {
                    e.key = format!("p{p}-{}", e.key);
                    e
                })
                .collect()
        })
        .collect();
    let sentinel_ts = workload::max_ts(&events) + 3_600_000;
    let all: Vec<Event> = events.iter().flatten().cloned().collect();

    let mut config = ServiceConfig::new(broker, &input, &output);
    let group = config.group_id.clone();
    config
        .kafka_extra
        .insert("partition_discovery_interval".into(), "1s".into());
    let expected = expected_windows(&config.windows, &all);
    let mut producer = Producer::new(broker)?;
    producer.send_partitions(&input, &[workload::valid_records(&events[0])])?;
    let mut service = Service::new("partition_discovery", config)?;
    let mut reader = OutputReader::new(broker, &output)?;
    service.start()?;
    service.wait_ready(TIMEOUT)?;
    let first = events[0].len();
    service.wait_metrics(&format!("{RECORDS_CONSUMED} = {first}"), TIMEOUT, |m| {
        m.sum(RECORDS_CONSUMED) == Some(first as f64)
    })?;

    // a second partition appears while the service runs; its records were written before the
    // service could know of it, so it must read it from the beginning
    broker.add_partitions(&input, 2)?;
    let mut second = workload::valid_records(&events[1]);
    let mut sentinel = workload::sentinel(sentinel_ts);
    sentinel.key = format!("p1-{}", sentinel.key);
    second.push(Record::Valid(sentinel));
    let mut first_sentinel = workload::sentinel(sentinel_ts);
    first_sentinel.key = format!("p0-{}", first_sentinel.key);
    // a new producer: the first one's metadata does not know the new partition yet
    Producer::new(broker)?
        .send_partitions(&input, &[vec![Record::Valid(first_sentinel)], second])?;
    let total = first + events[1].len() + 2;
    service.wait_metrics(&format!("{RECORDS_CONSUMED} = {total}"), TIMEOUT, |m| {
        m.sum(RECORDS_CONSUMED) == Some(total as f64)
    })?;
    let late = service.scrape()?.sum(RECORDS_LATE).unwrap_or(0.0);
    ensure!(late == 0.0, "{late} records counted late");
    ensure!(
        reader.poll_until(TIMEOUT, |m| contains_all(&expected, m)),
        "windows of the added partition missing: {}",
        check_output(&expected, reader.messages())
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default()
    );

    // both partitions' positions reach the group, tagged with the service's store
    let ends = [first as i64 + 1, events[1].len() as i64 + 1];
    let offsets = poll_until(
        "the group's committed offsets reaching the end of both partitions",
        TIMEOUT,
        Duration::from_millis(500),
        || {
            let c = committed(broker, &group, &input, 2)?;
            let at_end = c.iter().map(|(o, _)| *o).collect::<Vec<_>>() == ends;
            Ok(at_end.then_some(c))
        },
    )?;
    let store_id = std::fs::read_to_string(service.state_dir().join("store.id"))
        .map_err(|e| anyhow!("reading the store's id: {e}"))?;
    for (offset, metadata) in &offsets {
        ensure!(
            metadata.starts_with(&format!("checkpointer store={} ", store_id.trim())),
            "offset {offset} committed with metadata {metadata:?}, not naming store {store_id}"
        );
    }
    let status = service.sigterm(Duration::from_secs(30))?;
    ensure!(status.code() == Some(0), "exit status {status}");
    reader.drain(Duration::from_secs(1), Duration::from_secs(10));
    let summary = check_output(&expected, reader.messages())?;
    ensure!(
        summary.duplicates == 0,
        "windows sent twice without a crash"
    );
    Ok(())
}
