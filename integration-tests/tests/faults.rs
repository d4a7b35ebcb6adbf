//! Faults around the stream rather than in it: a partition that holds no data must not stall
//! the watermark, and a broker that is down at start leaves the service alive and not ready.

use std::time::Duration;

use anyhow::{ensure, Result};
use integration_tests::metrics::RECORDS_LATE;
use integration_tests::model::{expected_windows, Event};
use integration_tests::verify::{check_output, contains_all, output_problems};
use integration_tests::workload::{self, Record, StreamShape, START_TS};
use integration_tests::{free_port, http, test_seed, unique_name, Broker, OutputReader, Producer};
use integration_tests::{Service, ServiceConfig};
use rand::rngs::StdRng;
use rand::SeedableRng;

const TIMEOUT: Duration = Duration::from_secs(90);

#[test]
fn an_empty_partition_does_not_hold_back_the_watermark() {
    let seed = test_seed("empty_partition");
    if let Err(err) = empty_partition(seed) {
        panic!("{err:#}\n(seed {seed})");
    }
}

fn empty_partition(seed: u64) -> Result<()> {
    let broker = Broker::shared()?;
    let input = unique_name("empty-part-in");
    let output = unique_name("empty-part-out");
    broker.create_topic(&input, 3)?;
    broker.create_topic(&output, 1)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut events = workload::generate(
        &mut rng,
        StreamShape {
            partitions: 3,
            records_per_partition: 400,
            keys: 6,
            start_ts: START_TS,
        },
    );
    // partition 2 never receives anything, not even a sentinel
    events[2].clear();
    let sentinel_ts = workload::max_ts(&events) + 3_600_000;
    let records: Vec<Vec<Record>> = events
        .iter()
        .enumerate()
        .map(|(i, part)| {
            let mut r = workload::valid_records(part);
            if i < 2 {
                r.push(Record::Valid(workload::sentinel(sentinel_ts)));
            }
            r
        })
        .collect();
    let config = ServiceConfig::new(broker, &input, &output);
    let all: Vec<Event> = events.iter().flatten().cloned().collect();
    let expected = expected_windows(&config.windows, &all);
    ensure!(!expected.is_empty());
    Producer::new(broker)?.send_partitions(&input, &records)?;
    let mut service = Service::new("empty_partition", config)?;
    let mut reader = OutputReader::new(broker, &output)?;
    service.start()?;
    service.wait_ready(TIMEOUT)?;
    ensure!(
        reader.poll_until(TIMEOUT, |m| contains_all(&expected, m)),
        "windows did not close with an empty partition assigned: {}\n{}",
        output_problems(&expected, reader.messages()),
        service.log_tail(30)
    );
    service.stop_cleanly(Duration::from_secs(30))?;
    reader.drain(Duration::from_secs(1), Duration::from_secs(10));
    check_output(&expected, reader.messages())?;
    let metrics = service.scrape().ok();
    if let Some(m) = metrics {
        ensure!(m.sum(RECORDS_LATE).unwrap_or(0.0) == 0.0, "late records");
    }
    Ok(())
}

#[test]
fn broker_down_at_start_keeps_the_service_alive_and_not_ready() {
    if let Err(err) = broker_down() {
        panic!("{err:#}");
    }
}

fn broker_down() -> Result<()> {
    let broker = Broker::shared()?;
    let mut config = ServiceConfig::new(broker, "absent-in", "absent-out");
    // nothing listens on this port
    config.brokers = format!("127.0.0.1:{}", free_port()?);
    let mut service = Service::new("broker_down", config)?;
    service.start()?;
    let addr = {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(addr) = service.http_addr() {
                if http::get(addr, "/healthz", Duration::from_secs(2)).is_ok() {
                    break addr;
                }
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "http never came up\n{}",
                service.log_tail(30)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    // several retry rounds with the broker unreachable
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(500));
        ensure!(
            service.is_running()?,
            "the service exited without a broker:\n{}",
            service.log_tail(30)
        );
        let health = http::get(addr, "/healthz", Duration::from_secs(2))?;
        ensure!(health.status == 200, "healthz {}", health.status);
        let ready = http::get(addr, "/readyz", Duration::from_secs(2))?;
        ensure!(
            ready.status == 503,
            "readyz {} without a broker: {}",
            ready.status,
            ready.body
        );
    }
    let status = service.sigterm(Duration::from_secs(40))?;
    ensure!(
        status.code() == Some(0),
        "a stop without a broker should still be clean (nothing to emit): {status}\n{}",
        service.log_tail(30)
    );
    Ok(())
}

#[test]
fn end_of_one_topic_does_not_release_the_watermark_of_another() {
    let seed = test_seed("two_topics");
    if let Err(err) = two_topics(seed) {
        panic!("{err:#}\n(seed {seed})");
    }
}

/// Two input topics of one partition each: the end of the small one (partition 0) must not be
/// taken for the end of the other topic's partition 0 while its backlog is still unread.
fn two_topics(seed: u64) -> Result<()> {
    let broker = Broker::shared()?;
    let small = unique_name("two-small");
    let big = unique_name("two-big");
    let output = unique_name("two-out");
    broker.create_topic(&small, 1)?;
    broker.create_topic(&big, 1)?;
    broker.create_topic(&output, 1)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let shape = |n| StreamShape {
        partitions: 1,
        records_per_partition: n,
        keys: 6,
        start_ts: START_TS,
    };
    let small_events = workload::generate(&mut rng, shape(30));
    let big_events = workload::generate(&mut rng, shape(3_000));
    let sentinel_ts =
        workload::max_ts(&big_events).max(workload::max_ts(&small_events)) + 3_600_000;
    let with_sentinel = |events: &[Vec<Event>]| -> Vec<Vec<Record>> {
        let mut r = workload::valid_records(&events[0]);
        r.push(Record::Valid(workload::sentinel(sentinel_ts)));
        vec![r]
    };
    let mut config = ServiceConfig::new(broker, &small, &output);
    config.topics = vec![small.clone(), big.clone()];
    let all: Vec<Event> = small_events
        .iter()
        .chain(&big_events)
        .flatten()
        .cloned()
        .collect();
    let expected = expected_windows(&config.windows, &all);
    let mut producer = Producer::new(broker)?;
    producer.send_partitions(&small, &with_sentinel(&small_events))?;
    producer.send_partitions(&big, &with_sentinel(&big_events))?;
    let mut service = Service::new("two_topics", config)?;
    let mut reader = OutputReader::new(broker, &output)?;
    service.start()?;
    service.wait_ready(TIMEOUT)?;
    let complete = reader.poll_until(TIMEOUT, |m| contains_all(&expected, m));
    let metrics = service.scrape()?;
    ensure!(
        metrics.sum(RECORDS_LATE).unwrap_or(0.0) == 0.0,
        "records dropped as late:\n{}",
        metrics.text()
    );
    ensure!(
        complete,
        "output incomplete: {}",
        output_problems(&expected, reader.messages())
    );
    service.stop_cleanly(Duration::from_secs(30))?;
    reader.drain(Duration::from_secs(1), Duration::from_secs(10));
    check_output(&expected, reader.messages())?;
    Ok(())
}
