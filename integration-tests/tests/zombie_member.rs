//! A member frozen past its session timeout while records flow (a "zombie"), on the real broker
//! and binary. Two instances share two partitions with partition-scoped state. One is stopped
//! with SIGSTOP right after a burst of records, so that its consumer may hold records of its
//! partition fetched and not yet handed over; the broker expels it, and the other member takes
//! its partition over from the changelog. Then the frozen one continues (SIGCONT): its consumer
//! hands over what it had fetched and, once it notices, the rebalance that took the partition
//! away (`lost`). Nothing it applies after that may reach the output or the changelog, and
//! whatever it emitted before it noticed is a re-send with identical bytes. It rejoins and the
//! partitions are shared again; then the other member stops, and the one that was frozen takes
//! its old partition back from the changelog, where only the other member's line may count.
//! The output equals the model, every copy of a window identical.
//!
//! Which records the frozen member hands over before the lost rebalance, and which with or
//! after it, depends on the timing of librdkafka's threads after SIGCONT; the test logs how
//! many it left unapplied (`records of partitions no longer assigned`) and asserts the outcome
//! whatever the timing.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use integration_tests::model::{expected_windows, Event};
use integration_tests::process::Signal;
use integration_tests::verify::{check_output, contains_all, output_problems};
use integration_tests::workload::{self, START_TS};
use integration_tests::{poll_until, test_seed, unique_name, Broker, OutputReader, Producer};
use integration_tests::{Service, ServiceConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const READY_TIMEOUT: Duration = Duration::from_secs(120);
const COMPLETE_TIMEOUT: Duration = Duration::from_secs(180);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// The broker's smallest session timeout (`group.min.session.timeout.ms`): the frozen member
/// is expelled this long after its last heartbeat.
const SESSION_MS: u64 = 6_000;
/// Its heartbeat interval: the session runs from the last heartbeat, up to this long before
/// the freeze.
const HEARTBEAT_MS: u64 = 1_000;
/// Keys per partition.
const KEYS: usize = 40;
/// Records per partition in a round; rounds follow each other every [`ROUND_PAUSE`].
const PER_ROUND: usize = 200;
/// Event time a round spans: with 250 ms between rounds, event time runs four times faster
/// than the wall clock, so windows close all the time.
const ROUND_MS: i64 = 1_000;
const ROUND_PAUSE: Duration = Duration::from_millis(250);
/// The debug line of a record the consumer handed over for a partition no longer assigned.
const NOT_APPLIED: &str = "record of a partition no longer assigned: not applied";
/// The line of a partition's state restored from the changelog.
const RESTORED: &str = "restored partition state from the changelog";

#[test]
fn a_member_frozen_past_its_session_timeout_adds_nothing_to_the_output() {
    let seed = test_seed("zombie_member");
    if let Err(err) = run(seed) {
        panic!("{err:#}\n(seed {seed})");
    }
}

/// Generates rounds of in-order events on every partition, keys local to their partition.
struct Stream {
    rng: StdRng,
    round: i64,
    history: Vec<Event>,
}

impl Stream {
    fn next_round(&mut self) -> Vec<Vec<Event>> {
        let start = START_TS + self.round * ROUND_MS;
        self.round += 1;
        let rounds: Vec<Vec<Event>> = (0..2)
            .map(|p| {
                (0..PER_ROUND)
                    .map(|i| Event {
                        key: format!("p{p}-user-{}", self.rng.random_range(0..KEYS)),
                        value: self.rng.random_range(-100..=1000),
                        ts: start + (i as i64 * ROUND_MS / PER_ROUND as i64),
                    })
                    .collect()
            })
            .collect();
        self.history.extend(rounds.iter().flatten().cloned());
        rounds
    }

    /// Produces `n` rounds, [`ROUND_PAUSE`] apart.
    fn produce(&mut self, producer: &mut Producer, topic: &str, n: usize) -> Result<()> {
        for _ in 0..n {
            let round = self.next_round();
            let records: Vec<Vec<_>> = round.iter().map(|e| workload::valid_records(e)).collect();
            producer.send_partitions(topic, &records)?;
            std::thread::sleep(ROUND_PAUSE);
        }
        Ok(())
    }

    /// Produces a round at a time until `done` holds; after [`READY_TIMEOUT`], fails naming
    /// `what` with the last lines of the `logs` of these instances.
    fn produce_until(
        &mut self,
        producer: &mut Producer,
        topic: &str,
        what: &str,
        logs: &[&Service],
        mut done: impl FnMut() -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        while !done() {
            if Instant::now() >= deadline {
                let tails: Vec<String> = logs.iter().map(|s| s.log_tail(40)).collect();
                bail!("{what}\n{}", tails.join("\n"));
            }
            self.produce(producer, topic, 1)?;
        }
        Ok(())
    }
}

fn run(seed: u64) -> Result<()> {
    let broker = Broker::shared()?;
    let input = unique_name("zombie-in");
    let output = unique_name("zombie-out");
    let changelog = unique_name("zombie-changelog");
    broker.create_topic(&input, 2)?;
    broker.create_topic(&output, 1)?;
    broker.create_topic(&changelog, 2)?;
    let mut cfg = ServiceConfig::new(broker, &input, &output).partition_scoped(&changelog);
    for (key, value) in [
        ("session.timeout.ms", SESSION_MS.to_string()),
        ("max.poll.interval.ms", SESSION_MS.to_string()),
        ("heartbeat.interval.ms", HEARTBEAT_MS.to_string()),
    ] {
        cfg.kafka_options.insert(key.into(), value);
    }
    cfg.env.insert(
        "RUST_LOG".into(),
        "info,checkpointer::service::pipeline=debug".into(),
    );
    let windows = cfg.windows.clone();
    let mut producer = Producer::new(broker)?;
    let mut reader = OutputReader::new(broker, &output)?;
    let mut stream = Stream {
        rng: StdRng::seed_from_u64(seed),
        round: 0,
        history: Vec::new(),
    };

    let mut a = Service::new("zombie_a", cfg.clone())?;
    let mut b = Service::new("zombie_b", cfg.clone())?;
    a.start()?;
    b.start()?;
    a.wait_ready(READY_TIMEOUT)?;
    b.wait_ready(READY_TIMEOUT)?;
    wait_until(READY_TIMEOUT, "a partition each", || {
        a.assigned_partitions() == Some(1) && b.assigned_partitions() == Some(1)
    })?;

    // records flow; windows close and are emitted
    stream.produce(&mut producer, &input, 12)?;
    wait_until(COMPLETE_TIMEOUT, "the first rounds read", || {
        a.records_consumed().unwrap_or(0.0) + b.records_consumed().unwrap_or(0.0)
            == stream.history.len() as f64
    })?;

    // a burst, and the first member freezes while its consumer holds part of it
    let burst: Vec<Vec<_>> = {
        let rounds: Vec<Vec<Vec<Event>>> = (0..4).map(|_| stream.next_round()).collect();
        (0..2)
            .map(|p| {
                rounds
                    .iter()
                    .flat_map(|r| workload::valid_records(&r[p]))
                    .collect()
            })
            .collect()
    };
    producer.send_partitions(&input, &burst)?;
    std::thread::sleep(Duration::from_millis(20));
    let frozen_at = Instant::now();
    a.signal(Signal::SIGSTOP)?;

    // the other member takes its partition over once the session has expired, while records
    // flow
    let seen = b.log_since_start().len();
    stream.produce_until(
        &mut producer,
        &input,
        "the second member did not take the frozen one's partition over",
        &[&b],
        || b.assigned_partitions() == Some(2),
    )?;
    ensure!(
        frozen_at.elapsed() >= Duration::from_millis(SESSION_MS - HEARTBEAT_MS),
        "the partition moved before the session expired: the test froze nothing"
    );
    ensure!(
        b.log_after(seen).contains(RESTORED),
        "the takeover did not restore from the changelog\n{}",
        b.log_tail(30)
    );
    stream.produce(&mut producer, &input, 4)?;

    // the frozen member continues with records in hand, learns that its partition is lost,
    // and rejoins
    let seen_a = a.log_since_start().len();
    a.signal(Signal::SIGCONT)?;
    stream.produce_until(
        &mut producer,
        &input,
        "the frozen member did not learn that its partition was lost",
        &[&a],
        || {
            a.log_after(seen_a)
                .lines()
                .any(|l| l.contains("partitions revoked") && l.contains("lost=true"))
        },
    )?;
    stream.produce_until(
        &mut producer,
        &input,
        "the frozen member did not rejoin",
        &[&a, &b],
        || a.assigned_partitions() == Some(1) && b.assigned_partitions() == Some(1),
    )?;
    stream.produce(&mut producer, &input, 8)?;

    // the other member stops: the one that was frozen takes every partition, its own old one
    // from the changelog the other member wrote after the takeover (never from what it held
    // itself when it froze)
    let seen_a = a.log_since_start().len();
    let status_b = b.sigterm(STOP_TIMEOUT)?;
    stream.produce_until(
        &mut producer,
        &input,
        "the frozen member did not take every partition over",
        &[&a],
        || a.assigned_partitions() == Some(2),
    )?;
    ensure!(
        a.log_after(seen_a).contains(RESTORED),
        "the frozen member did not take its old partition back from the changelog\n{}",
        a.log_tail(30)
    );
    stream.produce(&mut producer, &input, 4)?;

    // sentinels close every window
    let sentinel_ts = stream
        .history
        .iter()
        .map(|e| e.ts)
        .max()
        .unwrap_or(START_TS)
        + 3_600_000;
    producer.send_partitions(
        &input,
        &workload::with_local_sentinels(&[Vec::new(), Vec::new()], sentinel_ts),
    )?;
    let expected = expected_windows(&windows, &stream.history);
    let complete = reader.poll_until(COMPLETE_TIMEOUT, |m| contains_all(&expected, m));
    let status_a = a.sigterm(STOP_TIMEOUT)?;
    ensure!(
        complete,
        "output incomplete: {}\n{}",
        output_problems(&expected, reader.messages()),
        a.log_tail(30)
    );
    reader.drain(Duration::from_secs(1), Duration::from_secs(10));
    check_output(&expected, reader.messages()).context("the output after a zombie member")?;
    let unapplied = a.log_since_start().matches(NOT_APPLIED).count();
    eprintln!(
        "the frozen member left {unapplied} record(s) handed over after the lost rebalance unapplied"
    );
    ensure!(status_a.code() == Some(0), "first member: {status_a}");
    ensure!(status_b.code() == Some(0), "second member: {status_b}");
    Ok(())
}

/// Waits until `done` holds, every 200 ms, failing after `timeout` naming `what`.
fn wait_until(timeout: Duration, what: &str, mut done: impl FnMut() -> bool) -> Result<()> {
    poll_until(what, timeout, Duration::from_millis(200), || {
        Ok(done().then_some(()))
    })
}
