//! Instance scope without group membership: partitions added to an input topic while the
//! service runs are found (`kafka.partition_discovery_interval`) and read from their beginning,
//! and so are partitions added while it is down (even with `auto_offset_reset: latest`),
//! and the offsets of every durable checkpoint are committed to `group_id` (for lag tools),
//! tagged with the store that made them.

use std::time::Duration;

use anyhow::{anyhow, ensure, Context as _, Result};
use integration_tests::metrics::{RECORDS_CONSUMED, RECORDS_LATE};
use integration_tests::model::{expected_windows, Event};
use integration_tests::verify::{check_output, contains_all, output_problems};
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
    // three partitions' worth of records, each later in event time than the one before (the
    // watermark has moved on by the time a partition is found; older records would be late);
    // keys live on one partition each
    let mut rng = StdRng::seed_from_u64(seed);
    let mut events: Vec<Vec<Event>> = Vec::new();
    let mut start_ts = START_TS;
    for p in 0..3 {
        let mut part = workload::generate(
            &mut rng,
            StreamShape {
                partitions: 1,
                records_per_partition: 300,
                keys: 5,
                start_ts,
            },
        )
        .remove(0);
        for e in part.iter_mut() {
            e.key = workload::local_key(p, &e.key);
        }
        start_ts = workload::max_ts(std::slice::from_ref(&part)) + 1_000;
        events.push(part);
    }
    let sentinel_ts = start_ts + 3_600_000;
    let sentinel = |p: usize| Record::Valid(workload::local_sentinel(p, sentinel_ts));
    let all: Vec<Event> = events.iter().flatten().cloned().collect();

    // `latest`: a partition known from the start begins at its end, so its records are produced
    // once the service runs; partitions added later must still be read from their beginning
    let mut config = ServiceConfig::new(broker, &input, &output);
    config.auto_offset_reset = "latest".into();
    let group = config.group_id.clone();
    config
        .kafka_extra
        .insert("partition_discovery_interval".into(), "1s".into());
    let expected = expected_windows(&config.windows, &all);
    let mut service = Service::new("partition_discovery", config)?;
    let mut reader = OutputReader::new(broker, &output)?;
    service.start()?;
    service.wait_ready(TIMEOUT)?;
    // the end offset the consumer starts at is looked up just after the assignment
    std::thread::sleep(Duration::from_secs(2));
    Producer::new(broker)?.send_partitions(&input, &[workload::valid_records(&events[0])])?;
    let mut total = events[0].len();
    service.wait_metrics(&format!("{RECORDS_CONSUMED} = {total}"), TIMEOUT, |m| {
        m.sum(RECORDS_CONSUMED) == Some(total as f64)
    })?;

    // a second partition appears while the service runs, written before the service can know
    // of it
    broker.add_partitions(&input, 2)?;
    // a new producer: the first one's metadata does not know the new partition yet
    Producer::new(broker)?
        .send_partitions(&input, &[vec![], workload::valid_records(&events[1])])?;
    total += events[1].len();
    service.wait_metrics(&format!("{RECORDS_CONSUMED} = {total}"), TIMEOUT, |m| {
        m.sum(RECORDS_CONSUMED) == Some(total as f64)
    })?;
    service.stop_cleanly(Duration::from_secs(30))?;

    // a third appears while the service is down: at the restart it holds no position for it,
    // but knows the topic, so it reads it from the beginning too
    broker.add_partitions(&input, 3)?;
    Producer::new(broker)?.send_partitions(
        &input,
        &[
            vec![sentinel(0)],
            vec![sentinel(1)],
            workload::valid_records(&events[2])
                .into_iter()
                .chain([sentinel(2)])
                .collect(),
        ],
    )?;
    service.start()?;
    service.wait_ready(TIMEOUT)?;
    let again = events[2].len() + 3;
    service.wait_metrics(&format!("{RECORDS_CONSUMED} = {again}"), TIMEOUT, |m| {
        m.sum(RECORDS_CONSUMED) == Some(again as f64)
    })?;
    let late = service.scrape()?.sum(RECORDS_LATE).unwrap_or(0.0);
    ensure!(late == 0.0, "{late} records counted late");
    ensure!(
        reader.poll_until(TIMEOUT, |m| contains_all(&expected, m)),
        "windows of the added partitions missing: {}",
        output_problems(&expected, reader.messages())
    );

    // every partition's position reaches the group, tagged with the service's store
    let ends: Vec<i64> = events.iter().map(|e| e.len() as i64 + 1).collect();
    let offsets = poll_until(
        "the group's committed offsets reaching the end of every partition",
        TIMEOUT,
        Duration::from_millis(500),
        || {
            let c = committed(broker, &group, &input, 3)?;
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
    service.stop_cleanly(Duration::from_secs(30))?;
    reader.drain(Duration::from_secs(1), Duration::from_secs(10));
    let summary = check_output(&expected, reader.messages())?;
    ensure!(
        summary.duplicates == 0,
        "windows sent twice without a crash"
    );
    Ok(())
}
