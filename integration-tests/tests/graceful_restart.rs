//! SIGTERM after the backlog is done, then restart on the same state dir: the new process must
//! replay nothing and emit nothing, and then process new input normally (resumed, not stalled).

use std::time::Duration;

use anyhow::{ensure, Result};
use integration_tests::metrics::{RECORDS_CONSUMED, RECORDS_LATE, WINDOWS_EMITTED};
use integration_tests::model::{expected_windows, Event};
use integration_tests::verify::{check_output, contains_all, output_problems};
use integration_tests::workload::{self, StreamShape, MAX_STEP_BACK_MS, START_TS};
use integration_tests::{test_seed, unique_name, Broker, OutputReader, Producer};
use integration_tests::{Service, ServiceConfig};
use rand::rngs::StdRng;
use rand::SeedableRng;

const PARTITIONS: usize = 3;
const READY_TIMEOUT: Duration = Duration::from_secs(90);
const COMPLETE_TIMEOUT: Duration = Duration::from_secs(90);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the restarted service is watched for replays before new input arrives.
const QUIET_PERIOD: Duration = Duration::from_secs(3);

#[test]
fn restart_after_sigterm_replays_nothing_and_resumes() {
    let seed = test_seed("graceful_restart");
    let broker = Broker::shared().unwrap_or_else(|err| panic!("{err:#}"));
    let input = unique_name("graceful-in");
    let output = unique_name("graceful-out");
    let config = ServiceConfig::new(broker, &input, &output);
    let mut service =
        Service::new("graceful_restart", config).unwrap_or_else(|err| panic!("{err:#}"));
    if let Err(err) = run(seed, broker, &mut service, &input, &output) {
        panic!("{err:#}\n(seed {seed})");
    }
}

fn run(seed: u64, broker: &Broker, service: &mut Service, input: &str, output: &str) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    broker.create_topic(input, PARTITIONS as i32)?;
    broker.create_topic(output, 2)?;
    let windows = service.config().windows.clone();
    let mut producer = Producer::new(broker)?;

    // Phase 1: a backlog, closed by sentinels.
    let first = workload::generate(
        &mut rng,
        StreamShape {
            partitions: PARTITIONS,
            records_per_partition: 1_500,
            keys: 12,
            start_ts: START_TS,
        },
    );
    let first_sentinel_ts = workload::max_ts(&first) + 3_600_000;
    let first_records = workload::with_sentinels(&first, first_sentinel_ts);
    let mut history: Vec<Event> = first.iter().flatten().cloned().collect();
    let expected_first = expected_windows(&windows, &history);
    let produced_first = producer.send_partitions(input, &first_records)?;

    let mut reader = OutputReader::new(broker, output)?;
    service.start()?;
    service.wait_ready(READY_TIMEOUT)?;
    ensure!(
        reader.poll_until(COMPLETE_TIMEOUT, |m| contains_all(&expected_first, m)),
        "first run incomplete: {}",
        output_problems(&expected_first, reader.messages())
    );
    service.wait_metrics(
        &format!("{RECORDS_CONSUMED} = {produced_first}"),
        Duration::from_secs(15),
        |m| m.sum(RECORDS_CONSUMED) == Some(produced_first as f64),
    )?;
    service.stop_cleanly(STOP_TIMEOUT)?;
    reader.drain(Duration::from_secs(1), Duration::from_secs(15));
    let summary = check_output(&expected_first, reader.messages())?;
    ensure!(
        summary.duplicates == 0,
        "{} windows sent twice without any crash",
        summary.duplicates
    );
    let after_first = reader.messages().len();
    eprintln!(
        "[graceful_restart] first run: {produced_first} records, {} windows {:?}",
        summary.windows, summary.per_window
    );

    // Restart on the same state: nothing to replay, nothing to emit.
    service.start()?;
    service.wait_ready(READY_TIMEOUT)?;
    let replayed = reader.poll_for(QUIET_PERIOD);
    let metrics = service.scrape()?;
    ensure!(
        replayed == 0,
        "the restarted service wrote {replayed} messages without new input, e.g. {:?}",
        reader.messages().get(after_first).map(|m| &m.key)
    );
    // Absent counts as 0 here; both counters must show up with exact values further down.
    ensure!(
        metrics.sum(RECORDS_CONSUMED).unwrap_or(0.0) == 0.0,
        "the restarted service re-read records:\n{}",
        metrics.text()
    );
    ensure!(
        metrics.sum(WINDOWS_EMITTED).unwrap_or(0.0) == 0.0,
        "the restarted service emitted windows without new input:\n{}",
        metrics.text()
    );

    // Phase 2: new input well after the first sentinels, closed by sentinels further ahead.
    let second = workload::generate(
        &mut rng,
        StreamShape {
            partitions: PARTITIONS,
            records_per_partition: 100,
            keys: 5,
            start_ts: first_sentinel_ts + 60_000,
        },
    );
    for partition in &second {
        ensure!(workload::max_disorder(partition) <= MAX_STEP_BACK_MS);
    }
    let second_sentinel_ts = workload::max_ts(&second) + 3_600_000;
    // The first sentinels' windows close now too: they are part of the expected output.
    history.extend((0..PARTITIONS).map(|_| workload::sentinel(first_sentinel_ts)));
    history.extend(second.iter().flatten().cloned());
    let expected_all = expected_windows(&windows, &history);
    let new_windows = expected_all.len() - expected_first.len();
    ensure!(new_windows > 0);
    let produced_second = producer.send_partitions(
        input,
        &workload::with_sentinels(&second, second_sentinel_ts),
    )?;

    ensure!(
        reader.poll_until(COMPLETE_TIMEOUT, |m| contains_all(&expected_all, m)),
        "new input not processed after the restart: {}",
        output_problems(&expected_all, reader.messages())
    );
    service.wait_metrics(
        &format!("{RECORDS_CONSUMED} = {produced_second}"),
        Duration::from_secs(15),
        |m| m.sum(RECORDS_CONSUMED) == Some(produced_second as f64),
    )?;
    // a window is counted once its acknowledgement reached the service, which can be a moment
    // after a reader sees it: wait for the count to settle, then check it is exact
    let metrics = service.wait_metrics(
        &format!("{WINDOWS_EMITTED} >= {new_windows}"),
        Duration::from_secs(15),
        |m| m.sum(WINDOWS_EMITTED).unwrap_or(0.0) >= new_windows as f64,
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let metrics = service.scrape().unwrap_or(metrics);
    ensure!(
        metrics.require(WINDOWS_EMITTED)? == new_windows as f64,
        "expected {new_windows} windows emitted by the restarted service:\n{}",
        metrics.text()
    );
    ensure!(
        metrics.sum(RECORDS_LATE).unwrap_or(0.0) == 0.0,
        "late records:\n{}",
        metrics.text()
    );

    let status = service.sigterm(STOP_TIMEOUT)?;
    ensure!(
        status.code() == Some(0),
        "exit status after the second SIGTERM: {status}\n{}",
        service.log_tail(40)
    );
    reader.drain(Duration::from_secs(1), Duration::from_secs(15));
    let summary = check_output(&expected_all, reader.messages())?;
    ensure!(
        summary.duplicates == 0,
        "{} windows sent twice without any crash",
        summary.duplicates
    );
    eprintln!(
        "[graceful_restart] after restart: {produced_second} more records, {new_windows} new \
         windows; {} windows in all",
        summary.windows
    );
    Ok(())
}
