//! The dead-letter topic and output refusals, on the real broker and binary:
//!
//! - invalid and late input records are copied to `input.dead_letter_topic` unchanged (key,
//!   payload), with headers naming the reason and the source topic, partition and offset;
//!   the output equals the model over the valid records; the copies are counted by reason;
//! - a window whose output record is larger than the producer allows (a 600 KB key is valid
//!   input) stops the service with `output.on_error: fail` (exit 1 naming the window and the
//!   error) with its state intact; restarted with `output.on_error: dead_letter`, that window
//!   goes to the dead-letter topic (its key cut short, its aggregates whole) and every other
//!   window to the output, exactly.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use integration_tests::model::{expected_windows, Event};
use integration_tests::verify::{check_output, contains_all};
use integration_tests::workload::{self, GarbageKind, Record, StreamShape, START_TS};
use integration_tests::{test_seed, unique_name, Broker, OutputReader, Producer};
use integration_tests::{Service, ServiceConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const READY_TIMEOUT: Duration = Duration::from_secs(90);
const COMPLETE_TIMEOUT: Duration = Duration::from_secs(90);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
const DEAD_LETTERS: &str = "checkpointer_dead_letters_total";

#[test]
fn invalid_and_late_records_are_copied_to_the_dead_letter_topic_with_their_origin() {
    let broker = Broker::shared().unwrap_or_else(|err| panic!("{err:#}"));
    let seed = test_seed("dead_letter");
    if let Err(err) = skipped_records(broker, seed) {
        panic!("{err:#}\n(seed {seed})");
    }
}

#[test]
fn an_oversized_window_stops_the_service_or_goes_to_the_dead_letter_topic() {
    let broker = Broker::shared().unwrap_or_else(|err| panic!("{err:#}"));
    let seed = test_seed("dead_letter_output");
    if let Err(err) = oversized_window(broker, seed) {
        panic!("{err:#}\n(seed {seed})");
    }
}

fn skipped_records(broker: &Broker, seed: u64) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let input = unique_name("dlq-in");
    let output = unique_name("dlq-out");
    let dead = unique_name("dlq-dead");
    broker.create_topic(&input, 1)?;
    broker.create_topic(&output, 1)?;
    broker.create_topic(&dead, 1)?;
    let events = workload::generate(
        &mut rng,
        StreamShape {
            partitions: 1,
            records_per_partition: 600,
            keys: 6,
            start_ts: START_TS,
        },
    );
    let valid: Vec<Event> = events.iter().flatten().cloned().collect();
    let mut config = ServiceConfig::new(broker, &input, &output);
    config
        .input_extra
        .insert("dead_letter_topic".into(), format!("{dead:?}"));
    let expected = expected_windows(&config.windows, &valid);

    let mut records: Vec<Vec<Record>> = events.iter().map(|p| workload::valid_records(p)).collect();
    let mut want: BTreeMap<String, f64> = BTreeMap::new();
    for kind in GarbageKind::ALL {
        let count = rng.random_range(1..=3);
        workload::insert_garbage(&mut rng, &mut records, kind, count);
        *want.entry(kind.reason().to_owned()).or_default() += count as f64;
    }
    // an hour behind everything, after most of the stream: every window it belongs to is
    // final by then
    let late = Event {
        key: "late-user".into(),
        value: 7,
        ts: START_TS - 3_600_000,
    };
    let at = records[0].len() - 10;
    records[0].insert(at, Record::Valid(late.clone()));
    want.insert("late".into(), 1.0);
    let sentinel = workload::sentinel(workload::max_ts(&events) + 3_600_000);
    records[0].push(Record::Valid(sentinel));
    Producer::new(broker)?.send_partitions(&input, &records)?;
    let copies: f64 = want.values().sum();

    let mut reader = OutputReader::new(broker, &output)?;
    let mut dead_reader = OutputReader::new(broker, &dead)?;
    let mut service = Service::new("dead_letter", config)?;
    service.start()?;
    service.wait_ready(READY_TIMEOUT)?;
    let complete = reader.poll_until(COMPLETE_TIMEOUT, |m| contains_all(&expected, m));
    let all_copies = dead_reader.poll_until(COMPLETE_TIMEOUT, |m| m.len() >= copies as usize);
    let metrics = service.wait_metrics(
        &format!("{copies} dead letters"),
        Duration::from_secs(15),
        |m| m.sum(DEAD_LETTERS) == Some(copies),
    );
    let status = service.sigterm(STOP_TIMEOUT)?;
    reader.drain(Duration::from_secs(1), Duration::from_secs(10));
    dead_reader.drain(Duration::from_secs(1), Duration::from_secs(10));
    ensure!(complete, "output incomplete after {COMPLETE_TIMEOUT:?}");
    ensure!(
        all_copies,
        "{} of {copies} dead-letter copies after {COMPLETE_TIMEOUT:?}\n{}",
        dead_reader.messages().len(),
        service.log_tail(30)
    );
    check_output(&expected, reader.messages())?;

    // every copy is its input record, unchanged, at the offset its headers name
    let mut input_reader = OutputReader::new(broker, &input)?;
    let total: usize = records.iter().map(Vec::len).sum();
    input_reader.poll_until(COMPLETE_TIMEOUT, |m| m.len() >= total);
    let by_offset: BTreeMap<i64, &integration_tests::client::Message> = input_reader
        .messages()
        .iter()
        .map(|m| (m.offset, m))
        .collect();
    let mut got: BTreeMap<String, f64> = BTreeMap::new();
    let mut offsets = std::collections::BTreeSet::new();
    for copy in dead_reader.messages() {
        let header = |name: &str| {
            copy.header(name)
                .with_context(|| format!("copy without {name}: {copy:?}"))
        };
        let reason = header("checkpointer.reason")?;
        ensure!(header("checkpointer.source.topic")? == input, "{copy:?}");
        ensure!(header("checkpointer.source.partition")? == "0", "{copy:?}");
        let offset: i64 = header("checkpointer.source.offset")?.parse()?;
        let original = by_offset
            .get(&offset)
            .with_context(|| format!("no input record at offset {offset}"))?;
        ensure!(
            copy.payload == original.payload && copy.key == original.key,
            "the copy of offset {offset} differs from the input record"
        );
        if reason == "late" {
            let event: serde_json::Value = serde_json::from_slice(&copy.payload)?;
            ensure!(event["ts"] == late.ts, "the late copy is {event}");
        }
        *got.entry(reason).or_default() += 1.0;
        offsets.insert(offset);
    }
    ensure!(
        offsets.len() == dead_reader.messages().len(),
        "a record copied twice without any crash"
    );
    ensure!(got == want, "copies by reason: got {got:?}, want {want:?}");
    let metrics = metrics?;
    let counted: BTreeMap<String, f64> = metrics
        .by_label(DEAD_LETTERS, "reason")
        .into_iter()
        .filter(|(_, v)| *v != 0.0)
        .collect();
    ensure!(
        counted == want,
        "{DEAD_LETTERS}: {counted:?}, want {want:?}"
    );
    ensure!(
        status.code() == Some(0),
        "exit after SIGTERM: {status}\n{}",
        service.log_tail(30)
    );
    Ok(())
}

fn oversized_window(broker: &Broker, seed: u64) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let input = unique_name("big-in");
    let output = unique_name("big-out");
    let dead = unique_name("big-dead");
    broker.create_topic(&input, 1)?;
    broker.create_topic(&output, 1)?;
    broker.create_topic(&dead, 1)?;
    let events = workload::generate(
        &mut rng,
        StreamShape {
            partitions: 1,
            records_per_partition: 300,
            keys: 4,
            start_ts: START_TS,
        },
    );
    // a 600 KB key: the record (600 KB) is valid input, its window's output record (key and
    // payload both carry it: 1.2 MB) is larger than the producer's message.max.bytes
    let big_key = format!("big-{}", "x".repeat(600_000));
    let big: Vec<Event> = (0..3)
        .map(|i| Event {
            key: big_key.clone(),
            value: 10 + i,
            ts: START_TS + 1_000 + i * 500,
        })
        .collect();
    let valid: Vec<Event> = events.iter().flatten().cloned().collect();
    let config = ServiceConfig::new(broker, &input, &output);
    let expected = expected_windows(&config.windows, &valid);
    let refused = expected_windows(&config.windows, &big);

    let mut producer = Producer::new(broker)?;
    let mut records: Vec<Record> = workload::valid_records(&events[0]);
    let sentinel = workload::sentinel(workload::max_ts(&events) + 3_600_000);
    records.push(Record::Valid(sentinel));
    let (head, tail) = records.split_at(20);
    producer.send_records(&input, 0, head)?;
    for e in &big {
        // no Kafka key: the record must fit the broker's limit once
        producer.send(&input, 0, None, Some(&workload::event_payload(e)))?;
    }
    producer.send_records(&input, 0, tail)?;
    producer.flush()?;

    // output.on_error: fail (the default): exit 1 naming the window and the error
    let mut reader = OutputReader::new(broker, &output)?;
    let mut service = Service::new("dead_letter_output", config)?;
    service.start()?;
    let status = service.wait_exit(COMPLETE_TIMEOUT)?;
    let log = service.log_since_start();
    ensure!(
        status.code() == Some(1),
        "with output.on_error: fail the service must exit 1, got {status}\n{}",
        service.log_tail(30)
    );
    ensure!(
        log.contains("output_too_large")
            && log.contains("message.max.bytes")
            && log.contains("refuses window ")
            && log.contains("big-xxxx"),
        "the exit names the window and the error:\n{}",
        service.log_tail(30)
    );
    reader.drain(Duration::from_secs(1), Duration::from_secs(10));
    ensure!(
        !reader.messages().iter().any(|m| m.key.contains("big-xxx")),
        "a refused window reached the output"
    );

    // restarted with dead_letter: the refused windows (kept in the state) go to the
    // dead-letter topic, every other window to the output
    let config = service.config_mut();
    config
        .input_extra
        .insert("dead_letter_topic".into(), format!("{dead:?}"));
    config
        .output_extra
        .insert("on_error".into(), "dead_letter".into());
    let mut dead_reader = OutputReader::new(broker, &dead)?;
    service.start()?;
    service.wait_ready(READY_TIMEOUT)?;
    let complete = reader.poll_until(COMPLETE_TIMEOUT, |m| contains_all(&expected, m));
    let diverted = dead_reader.poll_until(COMPLETE_TIMEOUT, |m| m.len() >= refused.len());
    let metrics = service.wait_metrics(
        "the refused windows counted",
        Duration::from_secs(15),
        |m| m.sum(DEAD_LETTERS) == Some(refused.len() as f64),
    );
    let status = service.sigterm(STOP_TIMEOUT)?;
    reader.drain(Duration::from_secs(1), Duration::from_secs(10));
    dead_reader.drain(Duration::from_secs(1), Duration::from_secs(10));
    ensure!(complete, "output incomplete after {COMPLETE_TIMEOUT:?}");
    ensure!(
        diverted,
        "{} of {} refused windows in the dead-letter topic\n{}",
        dead_reader.messages().len(),
        refused.len(),
        service.log_tail(30)
    );
    check_output(&expected, reader.messages())?;
    let mut seen = BTreeMap::new();
    for copy in dead_reader.messages() {
        ensure!(
            copy.header("checkpointer.reason").as_deref() == Some("output_too_large"),
            "{:?}",
            copy.headers
        );
        ensure!(copy.header("checkpointer.output.topic").as_deref() == Some(output.as_str()));
        ensure!(
            copy.header("checkpointer.key.truncated") == Some(big_key.len().to_string()),
            "the copy says how long the key was: {:?}",
            copy.headers
        );
        let window: serde_json::Value = serde_json::from_slice(&copy.payload)?;
        let key = window["key"].as_str().context("key")?;
        ensure!(
            key.len() == 1024 && big_key.starts_with(key),
            "the copy carries the key's first 1024 bytes"
        );
        let full = format!(
            "{}/{big_key}/{}",
            window["window"].as_str().context("window")?,
            window["start"]
        );
        let want = refused
            .get(&full)
            .with_context(|| format!("a copy of a window not refused: {window}"))?;
        ensure!(
            window["count"] == want.count && window["sum"].as_f64() == Some(want.sum as f64),
            "the copy's aggregates {window} differ from the model's {want:?}"
        );
        seen.insert(full, ());
    }
    ensure!(
        seen.len() == refused.len(),
        "{} distinct refused windows copied, want {}",
        seen.len(),
        refused.len()
    );
    let counted = metrics?.by_label(DEAD_LETTERS, "reason");
    ensure!(
        counted.get("output_too_large") == Some(&(refused.len() as f64)),
        "{DEAD_LETTERS}: {counted:?}"
    );
    ensure!(
        status.code() == Some(0),
        "exit after SIGTERM: {status}\n{}",
        service.log_tail(30)
    );
    Ok(())
}
