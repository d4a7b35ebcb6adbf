//! `state.max_memory` and `state.max_open_windows` stop the service from growing until the
//! kernel kills it: with a limit below what the process holds, it pauses consumption, says why
//! in `/readyz` (503) and its metrics, and still stops cleanly; restarted with room, it resumes
//! from its checkpoint and the output equals the model: nothing was lost or sent twice.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use integration_tests::metrics::{Metrics, RECORDS_CONSUMED};
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

/// One guard: its `state` key and value, and what shows it holding consumption paused.
struct Guard {
    key: &'static str,
    value: &'static str,
    /// Named by `/readyz` while paused.
    setting: &'static str,
    /// 1 while paused.
    paused_metric: &'static str,
    /// In the log line that engaged the pause.
    log: &'static str,
    /// What else its metrics must show while paused.
    check: fn(&Metrics) -> Result<()>,
}

#[test]
fn past_max_memory_consumption_pauses_and_nothing_is_lost() {
    guarded(Guard {
        key: "max_memory",
        // far below what any build of the process holds
        value: "16 MiB",
        setting: "state.max_memory",
        paused_metric: "checkpointer_memory_paused",
        log: "resident memory passed state.max_memory",
        check: |m| {
            ensure!(
                m.sum("checkpointer_memory_limit_bytes") == Some(16.0 * 1024.0 * 1024.0),
                "checkpointer_memory_limit_bytes: {:?}",
                m.sum("checkpointer_memory_limit_bytes")
            );
            ensure!(
                m.sum("checkpointer_memory_resident_bytes").unwrap_or(0.0) > 16.0 * 1024.0 * 1024.0,
                "checkpointer_memory_resident_bytes: {:?}",
                m.sum("checkpointer_memory_resident_bytes")
            );
            Ok(())
        },
    });
}

#[test]
fn past_max_open_windows_consumption_pauses_and_nothing_is_lost() {
    guarded(Guard {
        key: "max_open_windows",
        // 16 keys hold about 60 windows open at once
        value: "20",
        setting: "state.max_open_windows",
        paused_metric: "checkpointer_open_windows_paused",
        log: "more windows are open than state.max_open_windows",
        check: |m| {
            ensure!(
                m.sum("checkpointer_open_windows_limit") == Some(20.0),
                "checkpointer_open_windows_limit: {:?}",
                m.sum("checkpointer_open_windows_limit")
            );
            ensure!(
                m.sum("checkpointer_memory_paused") == Some(0.0),
                "paused for memory rather than open windows"
            );
            Ok(())
        },
    });
}

fn guarded(guard: Guard) {
    let seed = test_seed(&format!("guard_{}", guard.key));
    let broker = Broker::shared().unwrap_or_else(|err| panic!("{err:#}"));
    let input = unique_name("guard-in");
    let output = unique_name("guard-out");
    let mut config = ServiceConfig::new(broker, &input, &output);
    config
        .state_extra
        .insert(guard.key.into(), guard.value.into());
    let mut service = Service::new(&format!("guard_{}", guard.key), config)
        .unwrap_or_else(|err| panic!("{err:#}"));
    if let Err(err) = run(seed, broker, &mut service, &input, &output, &guard) {
        panic!("{err:#}\n(seed {seed})");
    }
}

fn run(
    seed: u64,
    broker: &Broker,
    service: &mut Service,
    input: &str,
    output: &str,
    guard: &Guard,
) -> Result<()> {
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
    // the sentinels that close every window go in only once the pause was seen: a service that
    // read everything within one look at its limits would never pause
    let sentinel_ts = workload::max_ts(&events) + 3_600_000;
    let records: Vec<Vec<Record>> = events.iter().map(|p| workload::valid_records(p)).collect();
    let mut producer = Producer::new(broker)?;
    let produced = producer.send_partitions(input, &records)?;
    let mut reader = OutputReader::new(broker, output)?;

    // over the limit at once: paused, not ready, and says why
    service.start()?;
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(r) = service.get("/readyz") {
            if r.status == 503 && r.body.contains(guard.setting) {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!(
                "/readyz never named {}\n{}",
                guard.setting,
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
        "consumption went on past {}: {:?} then {consumed} of {produced}",
        guard.setting,
        before.sum(RECORDS_CONSUMED)
    );
    ensure!(
        after.sum("checkpointer_backpressure") == Some(1.0)
            && after.sum(guard.paused_metric) == Some(1.0),
        "checkpointer_backpressure or {} is not 1",
        guard.paused_metric
    );
    (guard.check)(&after)?;
    ensure!(
        service.log_since_start().contains(guard.log),
        "no log line names the limit\n{}",
        service.log_tail(30)
    );
    let status = service.sigterm(STOP_TIMEOUT)?;
    ensure!(
        status.code() == Some(0),
        "a paused service must still stop cleanly: {status}\n{}",
        service.log_tail(30)
    );
    eprintln!(
        "[{}] paused after {consumed} of {produced} records; restarting with room",
        guard.key
    );

    let sentinels: Vec<Vec<Record>> = (0..PARTITIONS)
        .map(|_| vec![Record::Valid(workload::sentinel(sentinel_ts))])
        .collect();
    producer.send_partitions(input, &sentinels)?;

    // with room: resumes from its checkpoint, and every window is exact
    service.config_mut().state_extra.remove(guard.key);
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
