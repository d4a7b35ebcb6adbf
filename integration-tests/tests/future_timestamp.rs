//! One record stamped in 2100 must not close every open window and make every later record
//! late: further ahead of the wall clock than `watermark.max_future_skew`, it is invalid
//! (`future_timestamp`), moves no watermark, and the output equals the model over the other
//! records, with none of them late.

use std::time::Duration;

use anyhow::{ensure, Result};
use integration_tests::metrics::{RECORDS_INVALID, RECORDS_LATE};
use integration_tests::model::{expected_windows, Event};
use integration_tests::verify::{check_output, contains_all};
use integration_tests::workload::{self, Record, StreamShape, START_TS};
use integration_tests::{test_seed, unique_name, Broker, OutputReader, Producer};
use integration_tests::{Service, ServiceConfig};
use rand::rngs::StdRng;
use rand::SeedableRng;

// one partition: the service watermark is its own, so on a build without the bound the poisoned
// record would close every open window and make every later record late
const PARTITIONS: usize = 1;
const READY_TIMEOUT: Duration = Duration::from_secs(90);
const COMPLETE_TIMEOUT: Duration = Duration::from_secs(90);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// 2100-01-01T00:00:00Z.
const YEAR_2100_MS: i64 = 4_102_444_800_000;

#[test]
fn a_record_from_the_far_future_is_invalid_and_closes_nothing() {
    let seed = test_seed("future_timestamp");
    let broker = Broker::shared().unwrap_or_else(|err| panic!("{err:#}"));
    let input = unique_name("future-in");
    let output = unique_name("future-out");
    let config = ServiceConfig::new(broker, &input, &output);
    let mut service =
        Service::new("future_timestamp", config).unwrap_or_else(|err| panic!("{err:#}"));
    if let Err(err) = run(seed, broker, &mut service, &input, &output) {
        panic!("{err:#}\n(seed {seed})");
    }
}

fn run(seed: u64, broker: &Broker, service: &mut Service, input: &str, output: &str) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    broker.create_topic(input, PARTITIONS as i32)?;
    broker.create_topic(output, 2)?;
    let events = workload::generate(
        &mut rng,
        StreamShape {
            partitions: PARTITIONS,
            records_per_partition: 600,
            keys: 8,
            start_ts: START_TS,
        },
    );
    let valid: Vec<Event> = events.iter().flatten().cloned().collect();
    let expected = expected_windows(&service.config().windows, &valid);
    let sentinel_ts = workload::max_ts(&events) + 3_600_000;
    let mut records: Vec<Vec<Record>> = events.iter().map(|p| workload::valid_records(p)).collect();
    // the poisoned record early in partition 0, with a key of its own
    let poison = Event {
        key: "from-2100".to_owned(),
        value: 1,
        ts: YEAR_2100_MS,
    };
    records[0].insert(10, Record::Valid(poison));
    for partition in &mut records {
        partition.push(Record::Valid(workload::sentinel(sentinel_ts)));
    }
    let produced = Producer::new(broker)?.send_partitions(input, &records)?;
    eprintln!(
        "[future_timestamp] produced {produced} records, one of them stamped in 2100; {} windows expected",
        expected.len()
    );

    let mut reader = OutputReader::new(broker, output)?;
    service.start()?;
    service.wait_ready(READY_TIMEOUT)?;
    let complete = reader.poll_until(COMPLETE_TIMEOUT, |m| contains_all(&expected, m));
    let metrics = service.wait_metrics("one invalid record", Duration::from_secs(15), |m| {
        m.sum(RECORDS_INVALID) == Some(1.0)
    });
    let status = service.sigterm(STOP_TIMEOUT)?;
    reader.drain(Duration::from_secs(1), Duration::from_secs(15));

    let summary = check_output(&expected, reader.messages())?;
    ensure!(complete, "output incomplete after {COMPLETE_TIMEOUT:?}");
    ensure!(
        summary.duplicates == 0,
        "{} windows sent twice",
        summary.duplicates
    );
    let metrics = metrics?;
    let invalid = metrics.by_label(RECORDS_INVALID, "reason");
    ensure!(
        invalid.get("future_timestamp") == Some(&1.0),
        "invalid records by reason: {invalid:?}"
    );
    ensure!(
        metrics.sum(RECORDS_LATE).unwrap_or(0.0) == 0.0,
        "records made late:\n{}",
        metrics.text()
    );
    ensure!(
        status.code() == Some(0),
        "exit status after SIGTERM: {status}\n{}",
        service.log_tail(40)
    );
    Ok(())
}
