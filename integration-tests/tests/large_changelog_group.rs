//! A partition whose state holds a key group larger than one changelog record may carry, on
//! the real broker and binary: the group travels in pieces (records of version 3, each far
//! below the topic's 1 MB message size limit), and an instance on an empty volume that takes
//! the partition over restores it exactly: its output over the whole stream equals the model.

use std::time::Duration;

use anyhow::{ensure, Result};
use integration_tests::metrics::{CHANGELOG_PUBLISHED, CHANGELOG_RESTORES, RECORDS_CONSUMED};
use integration_tests::model::{expected_windows, Event};
use integration_tests::verify::{check_output, contains_all, output_problems};
use integration_tests::workload::{self, Record, START_TS};
use integration_tests::{test_seed, unique_name, Broker, OutputReader, Producer};
use integration_tests::{Service, ServiceConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const READY_TIMEOUT: Duration = Duration::from_secs(90);
const COMPLETE_TIMEOUT: Duration = Duration::from_secs(180);
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// Keys of the partition: with one key group and keys of [`KEY_LETTERS`] letters that do not
/// compress, the group's blob is about 1.2 MB, past the broker's message size limit (a build
/// that sent a group in one record could not publish it) and five changelog records' worth.
const KEYS: usize = 4_000;
const KEY_LETTERS: usize = 300;
/// The layout version of a record that carries a piece of a group.
const PIECE_VERSION: u32 = 3;
/// The broker's default message size limit.
const BROKER_MESSAGE_MAX: usize = 1_048_588;

#[test]
fn a_key_group_larger_than_a_changelog_record_is_handed_off_in_pieces_exactly() {
    let seed = test_seed("large_changelog_group");
    if let Err(err) = run(seed) {
        panic!("{err:#}\n(seed {seed})");
    }
}

/// `KEYS` records, one per key, 1 ms apart from `start`, each key's letters drawn from `rng`
/// once: every window of them is still open once they are read.
fn records(keys: &[String], rng: &mut StdRng, start: i64) -> Vec<Event> {
    keys.iter()
        .enumerate()
        .map(|(i, key)| Event {
            key: key.clone(),
            value: rng.random_range(-100..=1000),
            ts: start + i as i64,
        })
        .collect()
}

fn run(seed: u64) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let broker = Broker::shared()?;
    let input = unique_name("large-group-in");
    let output = unique_name("large-group-out");
    let changelog = unique_name("large-group-changelog");
    broker.create_topic(&input, 1)?;
    broker.create_topic(&output, 1)?;
    broker.create_topic(&changelog, 1)?;
    let mut cfg = ServiceConfig::new(broker, &input, &output).partition_scoped(&changelog);
    cfg.state_extra.insert("key_groups".into(), "1".into());
    let windows = cfg.windows.clone();
    let mut producer = Producer::new(broker)?;
    let mut reader = OutputReader::new(broker, &output)?;

    let keys: Vec<String> = (0..KEYS)
        .map(|i| {
            let letters: String = (0..KEY_LETTERS)
                .map(|_| char::from(rng.random_range(b'a'..=b'z')))
                .collect();
            workload::local_key(0, &format!("{}-{letters}", workload::key_name(i)))
        })
        .collect();

    // the first instance reads every key once, publishes, and stops with the windows open
    let first = records(&keys, &mut rng, START_TS);
    let produced = producer.send_partitions(&input, &[workload::valid_records(&first)])?;
    let mut a = Service::new("large_group_a", cfg.clone())?;
    a.start()?;
    a.wait_ready(READY_TIMEOUT)?;
    a.wait_metrics("the first half", COMPLETE_TIMEOUT, |m| {
        m.sum(RECORDS_CONSUMED) == Some(produced as f64)
            && m.sum(CHANGELOG_PUBLISHED).unwrap_or(0.0) >= 1.0
    })?;
    let status = a.sigterm(STOP_TIMEOUT)?;
    ensure!(
        status.code() == Some(0),
        "first instance: {status}\n{}",
        a.log_tail(20)
    );

    // the changelog holds the group in pieces, each record under the broker's limit
    let mut changelog_reader = OutputReader::new(broker, &changelog)?;
    changelog_reader.drain(Duration::from_secs(2), Duration::from_secs(20));
    let versions: Vec<(u32, usize)> = changelog_reader
        .messages()
        .iter()
        .filter(|m| m.payload.len() >= 12 && m.payload.starts_with(b"CKCL"))
        .map(|m| {
            let v = &m.payload[4..8];
            (
                u32::from_be_bytes([v[0], v[1], v[2], v[3]]),
                m.payload.len(),
            )
        })
        .collect();
    let pieces = versions.iter().filter(|(v, _)| *v == PIECE_VERSION).count();
    ensure!(
        pieces >= 4,
        "a group of about 1.2 MB travels in pieces: records (version, bytes) {versions:?}"
    );
    ensure!(
        versions
            .iter()
            .all(|(_, len)| *len < BROKER_MESSAGE_MAX / 2),
        "every record is far below the message size limit: {versions:?}"
    );

    // an instance on an empty volume takes the partition over and reads on
    let mut b = Service::new("large_group_b", cfg.clone())?;
    b.start()?;
    b.wait_ready(READY_TIMEOUT)?;
    // every key again, in the same windows, then a sentinel closing them all
    let second = records(&keys, &mut rng, START_TS + 3_000);
    let sentinel_ts = START_TS + 3_600_000;
    let mut tail: Vec<Record> = workload::valid_records(&second);
    tail.push(Record::Valid(workload::local_sentinel(0, sentinel_ts)));
    producer.send_partitions(&input, &[tail])?;
    let mut history: Vec<Event> = first;
    history.extend(second);
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
    ensure!(status.code() == Some(0), "second instance: exit {status}");
    Ok(())
}
