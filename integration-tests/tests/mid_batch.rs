//! Resuming from the middle of a record batch: Kafka returns whole batches, so a consumer
//! resuming at an offset inside one must skip exactly the records before it, and no others.
//! One large batch is produced; the service checkpoints often while it reads it, is SIGKILLed,
//! and restarts from a checkpoint whose position lies inside the batch. It must read exactly
//! the records from that position on, count no offset gap, and write exactly the model's
//! windows. And the legitimate gap: a transaction's commit marker takes an offset that is
//! never delivered, so a restart held just before it counts a gap of exactly one.

use std::time::Duration;

use anyhow::{anyhow, ensure, Result};
use integration_tests::metrics::{OFFSET_GAP, RECORDS_CONSUMED, RECORDS_LATE};
use integration_tests::model::{expected_windows, Event};
use integration_tests::verify::{check_output, contains_all};
use integration_tests::workload::{self, Record, StreamShape, START_TS};
use integration_tests::{test_seed, unique_name, Broker, OutputReader, Producer};
use integration_tests::{Service, ServiceConfig};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};

/// Records in the one batch (about 60 bytes each, well below the batch limits set below).
const RECORDS: usize = 40_000;
/// Bytes a batch may hold: the topic's and the producer's limit.
const BATCH_BYTES: &str = "16777216";
const TIMEOUT: Duration = Duration::from_secs(240);

#[test]
fn a_restart_from_inside_a_record_batch_reads_exactly_from_the_held_offset() {
    let seed = test_seed("mid_batch");
    if let Err(err) = run(seed) {
        panic!("{err:#}\n(seed {seed})");
    }
}

fn run(seed: u64) -> Result<()> {
    let broker = Broker::shared()?;
    let input = unique_name("midbatch-in");
    let output = unique_name("midbatch-out");
    broker.create_topic_with(&input, 1, &[("max.message.bytes", BATCH_BYTES)])?;
    broker.create_topic(&output, 1)?;
    let events = workload::generate(
        &mut StdRng::seed_from_u64(seed),
        StreamShape {
            partitions: 1,
            records_per_partition: RECORDS,
            keys: 10,
            start_ts: START_TS,
        },
    );
    let sentinel_ts = workload::max_ts(&events) + 3_600_000;
    let all: Vec<Event> = events.iter().flatten().cloned().collect();

    // everything queued before the first send leaves: one batch
    let mut batcher = Producer::with_options(
        broker,
        &[
            ("linger.ms", "3000"),
            ("batch.size", BATCH_BYTES),
            ("batch.num.messages", "1000000"),
            ("message.max.bytes", BATCH_BYTES),
            ("compression.type", "none"),
        ],
    )?;
    batcher.send_partitions(&input, &[workload::valid_records(&events[0])])?;
    // the sentinel closes every window, in a batch of its own
    let mut producer = Producer::new(broker)?;
    producer.send_partitions(
        &input,
        &[vec![Record::Valid(workload::sentinel(sentinel_ts))]],
    )?;
    let total = RECORDS as i64 + 1;

    let mut config = ServiceConfig::new(broker, &input, &output);
    config.checkpoint_interval = Duration::from_millis(100);
    config
        .checkpoint_extra
        .insert("retained".into(), "200".into());
    let expected = expected_windows(&config.windows, &all);
    let mut service = Service::new("mid_batch", config)?;
    let mut reader = OutputReader::new(broker, &output)?;
    service.start()?;
    service.wait_ready(TIMEOUT)?;
    service.wait_metrics(&format!("{RECORDS_CONSUMED} = {total}"), TIMEOUT, |m| {
        m.sum(RECORDS_CONSUMED) == Some(total as f64)
    })?;
    // a checkpoint taken while the batch was half read
    let attempts = service.api_checkpoints(200)?;
    let inside: Vec<(u64, i64)> = attempts
        .iter()
        .filter(|a| a["status"] == "completed" && a["kind"] == "checkpoint")
        .filter_map(|a| {
            let next = a["partitions"]
                .as_array()?
                .iter()
                .find(|p| p["topic"] == input.as_str())?["next_offset"]
                .as_i64()?;
            Some((a["id"].as_u64()?, next))
        })
        .filter(|(_, next)| *next > 0 && *next < RECORDS as i64)
        .collect();
    let (id, held) = inside
        .get(inside.len() / 2)
        .copied()
        .ok_or_else(|| anyhow!("no retained checkpoint lies inside the batch: {attempts:?}"))?;
    eprintln!(
        "[mid_batch] {} checkpoints inside the batch; restarting from checkpoint {id} at offset {held}",
        inside.len()
    );
    service.sigkill()?;

    service.config_mut().extra_args = vec!["--restore-from".into(), id.to_string()];
    service.start()?;
    service.wait_ready(TIMEOUT)?;
    let complete = reader.poll_until(TIMEOUT, |m| contains_all(&expected, m));
    let again = total - held;
    let metrics = service.wait_metrics(&format!("{RECORDS_CONSUMED} = {again}"), TIMEOUT, |m| {
        m.sum(RECORDS_CONSUMED) == Some(again as f64)
    })?;
    ensure!(complete, "output incomplete after the restart");
    ensure!(
        metrics.sum(OFFSET_GAP).unwrap_or(0.0) == 0.0,
        "an offset gap was counted:\n{}",
        metrics.text()
    );
    ensure!(
        metrics.sum(RECORDS_LATE).unwrap_or(0.0) == 0.0,
        "late records:\n{}",
        metrics.text()
    );
    let log = service.log_since_start();
    ensure!(
        !log.contains("beyond the held position") && !log.contains("before the held position"),
        "the first record after the restart was not at the held offset:\n{log}"
    );
    service.stop_cleanly(Duration::from_secs(30))?;
    reader.drain(Duration::from_secs(1), Duration::from_secs(15));
    // windows closed before the kill are sent again identically; none differs or is missing
    let summary = check_output(&expected, reader.messages())?;
    eprintln!(
        "[mid_batch] read {again} records again from offset {held}; {} windows exact, {} identical re-sends",
        summary.windows, summary.duplicates
    );
    Ok(())
}

#[test]
fn a_transaction_marker_after_the_held_position_is_counted_as_a_gap_of_one() {
    let seed = test_seed("transaction_gap");
    if let Err(err) = transaction_gap(seed) {
        panic!("{err:#}\n(seed {seed})");
    }
}

fn transaction_gap(seed: u64) -> Result<()> {
    const IN_TRANSACTION: usize = 100;
    let broker = Broker::shared()?;
    let input = unique_name("txgap-in");
    let output = unique_name("txgap-out");
    broker.create_topic(&input, 1)?;
    broker.create_topic(&output, 1)?;
    let events = workload::generate(
        &mut StdRng::seed_from_u64(seed),
        StreamShape {
            partitions: 1,
            records_per_partition: IN_TRANSACTION + 50,
            keys: 4,
            start_ts: START_TS,
        },
    );
    let (in_tx, after) = events[0].split_at(IN_TRANSACTION);
    let sentinel_ts = workload::max_ts(&events) + 3_600_000;

    // offsets 0..=99 in one committed transaction; its marker takes offset 100
    let tx: BaseProducer = broker
        .client_config()
        .set("transactional.id", unique_name("txgap"))
        .create()?;
    let timeout = Duration::from_secs(30);
    tx.init_transactions(timeout)?;
    tx.begin_transaction()?;
    for event in in_tx {
        let payload = Record::Valid(event.clone()).payload();
        tx.send(
            BaseRecord::<str, [u8]>::to(&input)
                .partition(0)
                .key(event.key.as_str())
                .payload(&payload),
        )
        .map_err(|(e, _)| anyhow!("queueing a transactional record: {e}"))?;
    }
    tx.commit_transaction(timeout)?;

    let config = ServiceConfig::new(broker, &input, &output);
    let expected = expected_windows(&config.windows, &events[0]);
    let mut service = Service::new("transaction_gap", config)?;
    let mut reader = OutputReader::new(broker, &output)?;
    service.start()?;
    service.wait_ready(TIMEOUT)?;
    // the transaction is read and checkpointed: the held position is the marker's offset
    integration_tests::poll_until(
        "a checkpoint holding offset 100",
        TIMEOUT,
        Duration::from_millis(200),
        || {
            let newest = service.api_checkpoints(1)?;
            let held = newest.first().and_then(|a| {
                (a["status"] == "completed").then_some(())?;
                a["partitions"].as_array()?.first()?["next_offset"].as_i64()
            });
            Ok((held == Some(IN_TRANSACTION as i64)).then_some(()))
        },
    )?;
    service.sigkill()?;

    let mut rest = workload::valid_records(after);
    rest.push(Record::Valid(workload::sentinel(sentinel_ts)));
    Producer::new(broker)?.send_partitions(&input, &[rest])?;
    service.start()?;
    service.wait_ready(TIMEOUT)?;
    let again = after.len() + 1;
    let metrics = service.wait_metrics(&format!("{RECORDS_CONSUMED} = {again}"), TIMEOUT, |m| {
        m.sum(RECORDS_CONSUMED) == Some(again as f64)
    })?;
    ensure!(
        metrics.sum(OFFSET_GAP) == Some(1.0),
        "the commit marker at offset 100 should count as a gap of one:\n{}",
        metrics.text()
    );
    let log = service.log_since_start();
    ensure!(
        log.contains("beyond the held position"),
        "no warning about the gap:\n{log}"
    );
    ensure!(
        reader.poll_until(TIMEOUT, |m| contains_all(&expected, m)),
        "output incomplete"
    );
    service.stop_cleanly(Duration::from_secs(30))?;
    reader.drain(Duration::from_secs(1), Duration::from_secs(10));
    check_output(&expected, reader.messages())?;
    Ok(())
}
