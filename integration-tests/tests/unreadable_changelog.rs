//! A changelog record the service cannot read (damaged: its checksum does not match), on the
//! real broker and binary. An instance on an empty volume that takes the partition over:
//!
//! - with `state.on_unreadable_changelog: fail` (the default) exits 1 at once, naming the
//!   changelog partition and offset, instead of retrying or restoring something else;
//! - with `skip` restores the newest complete publication before it, and its output over the
//!   rest of the stream equals the model.

use std::time::Duration;

use anyhow::{ensure, Result};
use integration_tests::metrics::{CHANGELOG_PUBLISHED, CHANGELOG_RESTORES, RECORDS_CONSUMED};
use integration_tests::model::{expected_windows, Event};
use integration_tests::verify::{check_output, contains_all, output_problems};
use integration_tests::workload::{self, Record, StreamShape, START_TS};
use integration_tests::{test_seed, unique_name, Broker, OutputReader, Producer};
use integration_tests::{Service, ServiceConfig};
use rand::rngs::StdRng;
use rand::SeedableRng;

const READY_TIMEOUT: Duration = Duration::from_secs(90);
const COMPLETE_TIMEOUT: Duration = Duration::from_secs(120);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn an_unreadable_changelog_record_stops_naming_it_or_is_skipped_by_policy() {
    let seed = test_seed("unreadable_changelog");
    if let Err(err) = run(seed) {
        panic!("{err:#}\n(seed {seed})");
    }
}

fn run(seed: u64) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let broker = Broker::shared()?;
    let input = unique_name("unreadable-in");
    let output = unique_name("unreadable-out");
    let changelog = unique_name("unreadable-changelog");
    broker.create_topic(&input, 1)?;
    broker.create_topic(&output, 1)?;
    broker.create_topic(&changelog, 1)?;
    let cfg = ServiceConfig::new(broker, &input, &output).partition_scoped(&changelog);
    let windows = cfg.windows.clone();
    let mut producer = Producer::new(broker)?;
    let mut reader = OutputReader::new(broker, &output)?;

    // the first instance reads a first half, publishes it, and stops
    let first = workload::partition_local(workload::generate(
        &mut rng,
        StreamShape {
            partitions: 1,
            records_per_partition: 400,
            keys: 5,
            start_ts: START_TS,
        },
    ));
    let produced = producer.send_partitions(
        &input,
        &first
            .iter()
            .map(|e| workload::valid_records(e))
            .collect::<Vec<_>>(),
    )?;
    let mut a = Service::new("unreadable_a", cfg.clone())?;
    a.start()?;
    a.wait_ready(READY_TIMEOUT)?;
    a.wait_metrics("the first half", COMPLETE_TIMEOUT, |m| {
        m.sum(RECORDS_CONSUMED) == Some(produced as f64)
            && m.sum(CHANGELOG_PUBLISHED).unwrap_or(0.0) >= 1.0
    })?;
    let status = a.sigterm(STOP_TIMEOUT)?;
    ensure!(status.code() == Some(0), "first instance: {status}");

    // a changelog record (its magic and version) whose checksum does not match
    let mut damaged = b"CKCL\0\0\0\x02\0\0\0\0".to_vec();
    damaged.extend_from_slice(b"damaged on the way");
    producer.send(&changelog, 0, Some("damaged"), Some(&damaged))?;
    producer.flush()?;

    // an instance on an empty volume takes the partition over: it stops, naming the record
    let mut b = Service::new("unreadable_b", cfg.clone())?;
    b.start()?;
    let status = b.wait_exit(COMPLETE_TIMEOUT)?;
    let log = b.log_since_start();
    ensure!(
        status.code() == Some(1),
        "fail: exit {status}\n{}",
        b.log_tail(20)
    );
    let want = format!(
        "changelog partition {changelog}[0] holds a record this build cannot read at offset"
    );
    ensure!(
        log.contains(&want) && log.contains("on_unreadable_changelog"),
        "the exit names the record and the policy:\n{}",
        b.log_tail(20)
    );
    ensure!(
        !log.contains("changelog read failed; retrying"),
        "an unreadable record is not retried:\n{}",
        b.log_tail(20)
    );

    // with skip it restores the publication before the record and reads on
    b.config_mut()
        .state_extra
        .insert("on_unreadable_changelog".into(), "skip".into());
    b.start()?;
    b.wait_ready(READY_TIMEOUT)?;
    let second = workload::partition_local(workload::generate(
        &mut rng,
        StreamShape {
            partitions: 1,
            records_per_partition: 200,
            keys: 5,
            start_ts: workload::max_ts(&first) + 1_000,
        },
    ));
    let sentinel_ts = workload::max_ts(&second) + 3_600_000;
    let records: Vec<Vec<Record>> = workload::with_local_sentinels(&second, sentinel_ts);
    producer.send_partitions(&input, &records)?;
    let mut history: Vec<Event> = first.iter().flatten().cloned().collect();
    history.extend(second.iter().flatten().cloned());
    let expected = expected_windows(&windows, &history);
    let complete = reader.poll_until(COMPLETE_TIMEOUT, |m| contains_all(&expected, m));
    let metrics = b.scrape()?;
    let status = b.sigterm(STOP_TIMEOUT)?;
    ensure!(
        complete,
        "output incomplete: {}\n{}",
        output_problems(&expected, reader.messages()),
        b.log_tail(30)
    );
    reader.drain(Duration::from_secs(1), Duration::from_secs(10));
    check_output(&expected, reader.messages())?;
    ensure!(
        metrics.sum(CHANGELOG_RESTORES) == Some(1.0),
        "the partition was restored from the changelog:\n{}",
        metrics.text()
    );
    ensure!(
        b.log_since_start()
            .contains("skipping a changelog record this build cannot read"),
        "the skip is logged:\n{}",
        b.log_tail(30)
    );
    ensure!(status.code() == Some(0), "skip: exit {status}");
    Ok(())
}
