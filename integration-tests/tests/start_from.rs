//! Where a partition the checkpoint holds no position for starts (`kafka.start_from`), in both
//! state scopes: with `committed`, a new store on a consumer group that already committed
//! offsets (migrating from another consumer of the group) starts at them, and the output
//! equals the model over the records from there on; unset, it starts per
//! `auto_offset_reset` (`earliest`), whatever the group committed.

use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use integration_tests::model::{expected_windows, Event};
use integration_tests::verify::{check_output, contains_all};
use integration_tests::workload::{self, Record, StreamShape, START_TS};
use integration_tests::{test_seed, unique_name, Broker, OutputReader, Producer};
use integration_tests::{Service, ServiceConfig};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};

const READY_TIMEOUT: Duration = Duration::from_secs(90);
const COMPLETE_TIMEOUT: Duration = Duration::from_secs(90);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
const RECORDS: usize = 400;
/// Where the group committed: the records before it were consumed by "the old consumer".
const COMMITTED: usize = 200;

#[test]
fn instance_scope_starts_at_the_groups_committed_offset_when_told_to() {
    let broker = Broker::shared().unwrap_or_else(|err| panic!("{err:#}"));
    if let Err(err) = run(broker, false) {
        panic!("{err:#}");
    }
}

#[test]
fn partition_scope_starts_at_the_groups_committed_offset_when_told_to() {
    let broker = Broker::shared().unwrap_or_else(|err| panic!("{err:#}"));
    if let Err(err) = run(broker, true) {
        panic!("{err:#}");
    }
}

/// Commits `offset` for partition 0 of `topic` to `group`, as another consumer of the group
/// would have.
fn commit(broker: &Broker, group: &str, topic: &str, offset: usize) -> Result<()> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .context("consumer")?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(offset as i64))?;
    consumer
        .commit(&tpl, CommitMode::Sync)
        .context("committing the group's offset")?;
    Ok(())
}

/// Runs a fresh service over `input` with `group` and `start_from`, and returns the output.
fn output_of(
    broker: &Broker,
    name: &str,
    input: &str,
    group: &str,
    start_from: Option<&str>,
    scoped: bool,
    expected: &std::collections::BTreeMap<String, integration_tests::WindowResult>,
) -> Result<Vec<integration_tests::client::Message>> {
    let output = unique_name(&format!("{name}-out"));
    broker.create_topic(&output, 1)?;
    let mut config = ServiceConfig::new(broker, input, &output);
    config.group_id = group.to_owned();
    if let Some(from) = start_from {
        config
            .kafka_extra
            .insert("start_from".into(), from.to_owned());
    }
    if scoped {
        config
            .state_extra
            .insert("scope".into(), "partition".into());
    }
    let mut reader = OutputReader::new(broker, &output)?;
    let mut service = Service::new(name, config)?;
    service.start()?;
    service.wait_ready(READY_TIMEOUT)?;
    let complete = reader.poll_until(COMPLETE_TIMEOUT, |m| contains_all(expected, m));
    let status = service.sigterm(STOP_TIMEOUT)?;
    reader.drain(Duration::from_secs(1), Duration::from_secs(10));
    ensure!(
        complete,
        "{name}: output incomplete after {COMPLETE_TIMEOUT:?}\n{}",
        service.log_tail(30)
    );
    ensure!(status.code() == Some(0), "{name}: exit {status}");
    Ok(reader.messages().to_vec())
}

fn run(broker: &Broker, scoped: bool) -> Result<()> {
    let seed = test_seed("start_from");
    let scope = if scoped { "partition" } else { "instance" };
    let input = unique_name(&format!("start-from-{scope}-in"));
    broker.create_topic(&input, 1)?;
    let events = workload::generate(
        &mut StdRng::seed_from_u64(seed),
        StreamShape {
            partitions: 1,
            records_per_partition: RECORDS,
            keys: 4,
            start_ts: START_TS,
        },
    );
    let sentinel = workload::sentinel(workload::max_ts(&events) + 3_600_000);
    let mut records: Vec<Record> = workload::valid_records(&events[0]);
    records.push(Record::Valid(sentinel));
    Producer::new(broker)?.send_partitions(&input, &[records])?;
    let windows = ServiceConfig::new(broker, &input, "unused").windows;
    // the sentinel's own windows stay open
    let from = |offset: usize| -> Vec<Event> { events[0][offset..].to_vec() };
    let from_committed = expected_windows(&windows, &from(COMMITTED));
    let from_start = expected_windows(&windows, &from(0));

    // a group another consumer read up to offset 200
    let group = unique_name(&format!("start-from-{scope}"));
    commit(broker, &group, &input, COMMITTED)?;
    let messages = output_of(
        broker,
        &format!("start_from_committed_{scope}"),
        &input,
        &group,
        Some("committed"),
        scoped,
        &from_committed,
    )?;
    let summary = check_output(&from_committed, &messages)
        .context("start_from: committed must read from the group's offset on")?;
    ensure!(
        summary.duplicates == 0,
        "{} windows sent twice",
        summary.duplicates
    );

    // unset: earliest, whatever the group committed
    let group = unique_name(&format!("start-from-{scope}-default"));
    commit(broker, &group, &input, COMMITTED)?;
    let messages = output_of(
        broker,
        &format!("start_from_default_{scope}"),
        &input,
        &group,
        None,
        scoped,
        &from_start,
    )?;
    check_output(&from_start, &messages).context("unset, a new store reads from the start")?;
    Ok(())
}
