//! `state.max_memory` stops the service from growing until the kernel kills it: with a limit
//! below what the process holds, it pauses consumption at once, says why in `/readyz`
//! (503) and its metrics, and still stops cleanly; restarted with room, it resumes from its
//! checkpoint and the output equals the model: nothing was lost or sent twice.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use integration_tests::metrics::RECORDS_CONSUMED;
use integration_tests::model::{expected_windows, Event};
use integration_tests::verify::{check_output, contains_all};
use integration_tests::workload::{self, Record, StreamShape, START_TS};
use integration_tests::{test_seed, unique_name, Broker, OutputReader, Producer};
use integration_tests::{Service, ServiceConfig};
use rand::rngs::StdRng;
use rand::SeedableRng;

const PARTITIONS: usize = 4;
// more than one wake of the consumer can take (a record and 512 drained with it) before the
// pause applies
const RECORDS_PER_PARTITION: usize = 2_000;
const READY_TIMEOUT: Duration = Duration::from_secs(90);
const COMPLETE_TIMEOUT: Duration = Duration::from_secs(120);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn past_max_memory_consumption_pauses_and_nothing_is_lost() {
    let seed = test_seed("memory_guard");
    let broker = Broker::shared().unwrap_or_else(|err| panic!("{err:#}"));
    let input = unique_name("memory-in");
    let output = unique_name("memory-out");
    let mut config = ServiceConfig::new(broker, &input, &output);
    // far below what any build of the process holds
    config
        .state_extra
        .insert("max_memory".into(), "16 MiB".into());
    let mut service = Service::new("memory_guard", config).unwrap_or_else(|err| panic!("{err:#}"));
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
            records_per_partition: RECORDS_PER_PARTITION,
            keys: 16,
            start_ts: START_TS,
        },
    );
    let valid: Vec<Event> = events.iter().flatten().cloned().collect();
    let expected = expected_windows(&service.config().windows, &valid);
    let sentinel_ts = workload::max_ts(&events) + 3_600_000;
    let mut records: Vec<Vec<Record>> = events.iter().map(|p| workload::valid_records(p)).collect();
    for partition in &mut records {
        partition.push(Record::Valid(workload::sentinel(sentinel_ts)));
    }
    let produced = Producer::new(broker)?.send_partitions(input, &records)?;
    let mut reader = OutputReader::new(broker, output)?;

    // over the limit from the start: paused, not ready, and says why
    service.start()?;
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(r) = service.get("/readyz") {
            if r.status == 503 && r.body.contains("state.max_memory") {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!(
                "/readyz never named state.max_memory\n{}",
                service.log_tail(30)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // consumption stays paused
    std::thread::sleep(Duration::from_secs(3));
    let before = service.scrape()?;
    std::thread::sleep(Duration::from_secs(3));
    let after = service.scrape()?;
    let consumed = after.sum(RECORDS_CONSUMED).unwrap_or(0.0);
    ensure!(
        before.sum(RECORDS_CONSUMED) == after.sum(RECORDS_CONSUMED) && consumed < produced as f64,
        "consumption went on past state.max_memory: {:?} then {consumed} of {produced}",
        before.sum(RECORDS_CONSUMED)
    );
    ensure!(
        after.sum("checkpointer_backpressure") == Some(1.0)
            && after.sum("checkpointer_memory_paused") == Some(1.0),
        "checkpointer_backpressure or checkpointer_memory_paused is not 1"
    );
    ensure!(
        after.sum("checkpointer_memory_limit_bytes") == Some(16.0 * 1024.0 * 1024.0),
        "checkpointer_memory_limit_bytes: {:?}",
        after.sum("checkpointer_memory_limit_bytes")
    );
    ensure!(
        after
            .sum("checkpointer_memory_resident_bytes")
            .unwrap_or(0.0)
            > 16.0 * 1024.0 * 1024.0,
        "checkpointer_memory_resident_bytes: {:?}",
        after.sum("checkpointer_memory_resident_bytes")
    );
    ensure!(
        service
            .log_since_start()
            .contains("resident memory passed state.max_memory"),
        "no log line names the limit\n{}",
        service.log_tail(30)
    );
    let status = service.sigterm(STOP_TIMEOUT)?;
    ensure!(
        status.code() == Some(0),
        "a paused service must still stop cleanly: {status}\n{}",
        service.log_tail(30)
    );
    eprintln!("[memory_guard] paused after {consumed} of {produced} records; restarting with room");

    // with room: resumes from its checkpoint, and every window is exact
    service.config_mut().state_extra.remove("max_memory");
    service.start()?;
    service.wait_ready(READY_TIMEOUT)?;
    let complete = reader.poll_until(COMPLETE_TIMEOUT, |m| contains_all(&expected, m));
    let status = service.sigterm(STOP_TIMEOUT)?;
    reader.drain(Duration::from_secs(1), Duration::from_secs(15));
    let summary = check_output(&expected, reader.messages())?;
    ensure!(complete, "output incomplete after {COMPLETE_TIMEOUT:?}");
    ensure!(
        summary.duplicates == 0,
        "{} windows sent twice",
        summary.duplicates
    );
    ensure!(
        status.code() == Some(0),
        "exit status after SIGTERM: {status}"
    );
    Ok(())
}
