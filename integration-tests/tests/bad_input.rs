//! Garbage mixed into the input is counted by reason and otherwise ignored: the output equals
//! the model over the valid records alone, and no aggregate is written as null (values whose
//! sums would overflow to infinity are refused).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Result};
use integration_tests::metrics::{
    INVALID_REASONS, RECORDS_CONSUMED, RECORDS_INVALID, RECORDS_LATE,
};
use integration_tests::model::{expected_windows, Event};
use integration_tests::verify::{check_output, contains_all};
use integration_tests::workload::{self, GarbageKind, Record, StreamShape, START_TS};
use integration_tests::{test_seed, unique_name, Broker, OutputReader, Producer};
use integration_tests::{Service, ServiceConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const PARTITIONS: usize = 3;
const READY_TIMEOUT: Duration = Duration::from_secs(90);
const COMPLETE_TIMEOUT: Duration = Duration::from_secs(90);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn garbage_is_counted_by_reason_and_skipped() {
    let seed = test_seed("bad_input");
    let broker = Broker::shared().unwrap_or_else(|err| panic!("{err:#}"));
    let input = unique_name("bad-in");
    let output = unique_name("bad-out");
    let config = ServiceConfig::new(broker, &input, &output);
    let mut service = Service::new("bad_input", config).unwrap_or_else(|err| panic!("{err:#}"));
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
            records_per_partition: 1_000,
            keys: 10,
            start_ts: START_TS,
        },
    );
    let valid: Vec<Event> = events.iter().flatten().cloned().collect();
    let expected = expected_windows(&service.config().windows, &valid);
    let sentinel_ts = workload::max_ts(&events) + 3_600_000;

    let mut records: Vec<Vec<Record>> = events.iter().map(|p| workload::valid_records(p)).collect();
    let mut want_invalid: BTreeMap<String, f64> = BTreeMap::new();
    let mut garbage = 0;
    for kind in GarbageKind::ALL {
        let count = rng.random_range(2..=5);
        workload::insert_garbage(&mut rng, &mut records, kind, count);
        *want_invalid.entry(kind.reason().to_owned()).or_default() += count as f64;
        garbage += count;
    }
    for partition in &mut records {
        partition.push(Record::Valid(workload::sentinel(sentinel_ts)));
    }
    let produced = Producer::new(broker)?.send_partitions(input, &records)?;
    eprintln!(
        "[bad_input] produced {produced} records: {} valid, {garbage} invalid {want_invalid:?}, \
         {PARTITIONS} sentinels; {} windows expected",
        valid.len(),
        expected.len()
    );

    let mut reader = OutputReader::new(broker, output)?;
    service.start()?;
    service.wait_ready(READY_TIMEOUT)?;
    let complete = reader.poll_until(COMPLETE_TIMEOUT, |m| contains_all(&expected, m));
    let metrics = service.wait_metrics(
        &format!("{garbage} invalid records"),
        Duration::from_secs(15),
        |m| m.sum(RECORDS_INVALID) == Some(garbage as f64),
    );
    let status = service.sigterm(STOP_TIMEOUT)?;
    reader.drain(Duration::from_secs(1), Duration::from_secs(15));

    let summary = check_output(&expected, reader.messages())?;
    ensure!(complete, "output incomplete after {COMPLETE_TIMEOUT:?}");
    // values whose sums overflow are refused, so no aggregate is ever written as null
    let nulls = reader
        .messages()
        .iter()
        .filter(|m| String::from_utf8_lossy(&m.payload).contains("null"))
        .count();
    ensure!(nulls == 0, "{nulls} windows carry null aggregates");
    eprintln!(
        "[bad_input] output matches the model over valid records: {} windows {:?}",
        summary.windows, summary.per_window
    );
    ensure!(
        summary.duplicates == 0,
        "{} windows sent twice without any crash",
        summary.duplicates
    );

    let metrics = metrics?;
    let got_invalid = metrics.by_label(RECORDS_INVALID, "reason");
    for reason in got_invalid.keys() {
        ensure!(
            INVALID_REASONS.contains(&reason.as_str()),
            "unknown invalid reason {reason:?}"
        );
    }
    let got_nonzero: BTreeMap<String, f64> =
        got_invalid.into_iter().filter(|(_, v)| *v != 0.0).collect();
    ensure!(
        got_nonzero == want_invalid,
        "invalid records by reason: got {got_nonzero:?}, want {want_invalid:?}"
    );
    ensure!(
        metrics.require(RECORDS_CONSUMED)? == produced as f64,
        "{RECORDS_CONSUMED} should count every record read, valid or not ({produced}):\n{}",
        metrics.text()
    );
    ensure!(
        metrics.sum(RECORDS_LATE).unwrap_or(0.0) == 0.0,
        "late records:\n{}",
        metrics.text()
    );
    ensure!(
        status.code() == Some(0),
        "exit status after SIGTERM: {status}\n{}",
        service.log_tail(40)
    );
    Ok(())
}
