//! A changelog restore that takes longer than `max.poll.interval.ms`, on the real broker and
//! binary. Two instances share two partitions; when one stops, the other takes its partition
//! over and must replay its changelog, which a broker quota on the changelog reader's client id
//! (`<client.id>-changelog-reader`) makes slower than the poll interval. A third member joins
//! during that replay: the group rebalances at once (the partitions being restored are
//! assigned, paused), the second member lets them go unread, and each member replays what it
//! gets. The members keep polling their consumers meanwhile, so they stay in the group, read
//! on from where the restored state ends, and the output equals the model. A service that
//! replays on its consumer loop exceeds the poll interval and is put out of the group
//! (librdkafka logs it); one that replays before assigning holds the group's rebalance back
//! until its replay ends. With the cooperative-sticky assignor the takeover is incremental, and
//! the member reads the partition it already held on while it replays the one it got.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use integration_tests::metrics::{CHANGELOG_PUBLISHED, RECORDS_CONSUMED};
use integration_tests::model::{expected_windows, Event};
use integration_tests::verify::{check_output, contains_all, output_problems};
use integration_tests::workload::{self, START_TS};
use integration_tests::{log_numbers, test_seed, unique_name, Broker, OutputReader, Producer};
use integration_tests::{Service, ServiceConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const READY_TIMEOUT: Duration = Duration::from_secs(180);
const COMPLETE_TIMEOUT: Duration = Duration::from_secs(180);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Both members' `max.poll.interval.ms` (and session timeout, which may not be longer): the
/// replay takes longer.
const MAX_POLL_MS: u64 = 10_000;
/// Keys per partition, each with windows open at the hand-off: the changelog holds them.
const KEYS: usize = 1_500;
/// Rounds of input, each published on its own, so that the changelog holds many record
/// batches (a fetch of the reader returns one, and the quota throttles between them).
const ROUNDS: usize = 10;
/// What the changelog reader may fetch per second.
const RESTORE_BYTES_PER_SECOND: u64 = 15_000;

#[test]
fn a_restore_longer_than_the_poll_interval_keeps_the_member_in_the_group_and_exact() {
    let seed = test_seed("slow_restore");
    if let Err(err) = run(seed, Assignor::Eager) {
        panic!("{err:#}\n(seed {seed})");
    }
}

/// The same with `partition.assignment.strategy: cooperative-sticky`: the takeover is an
/// incremental assignment, and the member reads the partition it already held on while it
/// replays the one it got.
#[test]
fn a_cooperative_member_reads_its_partitions_on_while_it_restores_another() {
    let seed = test_seed("slow_restore_cooperative");
    if let Err(err) = run(seed, Assignor::Cooperative) {
        panic!("{err:#}\n(seed {seed})");
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Assignor {
    /// librdkafka's default (range, roundrobin): every rebalance revokes every partition.
    Eager,
    /// cooperative-sticky: a rebalance moves only the partitions that change owner.
    Cooperative,
}

/// Every key once, within one second of event time: all their windows stay open.
fn open_windows(rng: &mut StdRng, partition: usize, keys: usize, start_ts: i64) -> Vec<Event> {
    (0..keys)
        .map(|k| Event {
            key: format!("p{partition}-device-{k:05}-of-a-fleet-large-enough-to-hold-state"),
            value: rng.random_range(-100..=1000),
            ts: start_ts + (k as i64 * 1_000 / keys as i64),
        })
        .collect()
}

fn wait_assigned(services: &[&Service], want: usize) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    while Instant::now() < deadline {
        if services
            .iter()
            .all(|s| s.assigned_partitions() == Some(want))
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("the instances did not hold {want} partition(s) each")
}

fn run(seed: u64, assignor: Assignor) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let broker = Broker::shared()?;
    let input = unique_name("slow-restore-in");
    let output = unique_name("slow-restore-out");
    let changelog = unique_name("slow-restore-changelog");
    broker.create_topic(&input, 2)?;
    broker.create_topic(&output, 1)?;
    broker.create_topic(&changelog, 2)?;
    let client_id = unique_name("slow-restore");
    let mut cfg = ServiceConfig::new(broker, &input, &output).partition_scoped(&changelog);
    for (key, value) in [
        ("client.id", client_id.clone()),
        ("max.poll.interval.ms", MAX_POLL_MS.to_string()),
        ("session.timeout.ms", MAX_POLL_MS.to_string()),
        ("heartbeat.interval.ms", "2000".to_string()),
        // a fetch returns one record batch
        ("max.partition.fetch.bytes", "1024".to_string()),
    ] {
        cfg.kafka_options.insert(key.into(), value);
    }
    if assignor == Assignor::Cooperative {
        cfg.kafka_options.insert(
            "partition.assignment.strategy".into(),
            "cooperative-sticky".into(),
        );
    }
    let windows = cfg.windows.clone();
    let mut producer = Producer::new(broker)?;
    let mut reader = OutputReader::new(broker, &output)?;

    // two members, a partition each
    let mut a = Service::new("slow_restore_a", cfg.clone())?;
    let mut b = Service::new("slow_restore_b", cfg.clone())?;
    a.start()?;
    b.start()?;
    a.wait_ready(READY_TIMEOUT)?;
    b.wait_ready(READY_TIMEOUT)?;
    wait_assigned(&[&a, &b], 1)?;

    // keys whose windows all stay open, in rounds with a publication after each
    let first: Vec<Vec<Event>> = (0..2)
        .map(|p| open_windows(&mut rng, p, KEYS, START_TS))
        .collect();
    let mut produced = 0;
    for round in 0..ROUNDS {
        let part: Vec<Vec<_>> = first
            .iter()
            .map(|events| {
                let per = events.len() / ROUNDS;
                workload::valid_records(&events[round * per..(round + 1) * per])
            })
            .collect();
        produced += producer.send_partitions(&input, &part)?;
        let published = |s: &Service| {
            s.scrape()
                .ok()
                .and_then(|m| m.sum(CHANGELOG_PUBLISHED))
                .unwrap_or(0.0)
        };
        let deadline = Instant::now() + COMPLETE_TIMEOUT;
        loop {
            let consumed: f64 = [&a, &b]
                .iter()
                .filter_map(|s| s.scrape().ok().and_then(|m| m.sum(RECORDS_CONSUMED)))
                .sum();
            if consumed == produced as f64
                && published(&a) > round as f64
                && published(&b) > round as f64
            {
                break;
            }
            ensure!(Instant::now() < deadline, "round {round} not published");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    // the link to the changelog gets slow; the first member stops and the second takes its
    // partition over, replaying it
    broker.set_consumer_byte_rate(
        &format!("{client_id}-changelog-reader"),
        RESTORE_BYTES_PER_SECOND,
    )?;
    const REPLAY: &str = "restoring assigned partitions from the changelog before reading them";
    let replays_before = b.log_since_start().matches(REPLAY).count();
    let status = a.sigterm(STOP_TIMEOUT)?;
    ensure!(status.code() == Some(0), "first member: {status}");

    // a third member joins while that replay runs: the group rebalances at once (the
    // partitions being restored are assigned, paused), the second member lets its partitions
    // go unread, and each replays the partition it gets
    let deadline = Instant::now() + READY_TIMEOUT;
    while b.log_since_start().matches(REPLAY).count() <= replays_before {
        ensure!(
            Instant::now() < deadline,
            "the takeover's replay did not start\n{}",
            b.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let replay_started = b.log_since_start().len();
    let mut history: Vec<Event> = first.iter().flatten().cloned().collect();
    if assignor == Assignor::Cooperative {
        // the partition it held is read on meanwhile (the other one's records wait for the
        // replay's end)
        let before = b.records_consumed()?;
        let during: Vec<Vec<Event>> = (0..2)
            .map(|p| open_windows(&mut rng, p, 10, START_TS + 1_200))
            .collect();
        producer.send_partitions(
            &input,
            &during
                .iter()
                .map(|e| workload::valid_records(e))
                .collect::<Vec<_>>(),
        )?;
        history.extend(during.iter().flatten().cloned());
        let deadline = Instant::now() + READY_TIMEOUT;
        while b.records_consumed().unwrap_or(before) < before + 10.0 {
            ensure!(
                Instant::now() < deadline,
                "the held partition was not read during the replay\n{}",
                b.log_tail(30)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        ensure!(
            restore_duration_ms(&b.log_after(replay_started)).is_none(),
            "the replay ended before the held partition was read: the test proves nothing"
        );
    }
    let seen = b.log_since_start().len();
    let mut c = Service::new("slow_restore_c", cfg.clone())?;
    c.start()?;
    ensure!(
        restore_duration_ms(&b.log_after(replay_started)).is_none(),
        "the replay ended before the third member started: the test proves nothing"
    );
    if assignor == Assignor::Eager {
        // every partition is revoked: the one being restored is released unread
        let deadline = Instant::now() + READY_TIMEOUT;
        while !b
            .log_after(seen)
            .contains("revoked before their changelog restore ended: released unread")
        {
            ensure!(
                Instant::now() < deadline,
                "the group did not rebalance during the replay\n{}",
                b.log_tail(30)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // (cooperative: the assignor moves either partition to the new member)
    wait_assigned(&[&b, &c], 1)?;

    // the rest of the stream, then sentinels that close every window
    let second: Vec<Vec<Event>> = (0..2)
        .map(|p| open_windows(&mut rng, p, 20, START_TS + 1_500))
        .collect();
    let sentinel_ts = workload::max_ts(&second) + 3_600_000;
    producer.send_partitions(
        &input,
        &workload::with_local_sentinels(&second, sentinel_ts),
    )?;
    history.extend(second.iter().flatten().cloned());
    let expected = expected_windows(&windows, &history);
    let complete = reader.poll_until(COMPLETE_TIMEOUT, |m| contains_all(&expected, m));
    // no restore is left reported as running (RestoreTooLong would fire), the one given up
    // included
    for s in [&b, &c] {
        let left = s
            .scrape()?
            .sum("checkpointer_changelog_restore_remaining_records")
            .unwrap_or(0.0);
        ensure!(
            left == 0.0,
            "{left} changelog records still reported left to restore"
        );
    }
    let status_c = c.sigterm(STOP_TIMEOUT)?;
    let status = b.sigterm(STOP_TIMEOUT)?;
    let log = format!("{}\n{}", b.log_since_start(), c.log_since_start());
    ensure!(
        complete,
        "output incomplete: {}\n{}\n{}",
        output_problems(&expected, reader.messages()),
        b.log_tail(30),
        c.log_tail(30)
    );
    reader.drain(Duration::from_secs(1), Duration::from_secs(10));
    check_output(&expected, reader.messages())?;

    // the replays really took longer than the poll interval
    let restore_ms = restore_duration_ms(&log).context("the restore is logged")?;
    eprintln!("the restore took {restore_ms} ms");
    ensure!(
        restore_ms > MAX_POLL_MS,
        "the quota did not make the restore slow ({restore_ms} ms); the test proves nothing:\n{}",
        log.lines()
            .filter(|l| l.contains("from the changelog"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    ensure!(
        !log.to_lowercase().contains("maximum poll interval")
            && !log.to_lowercase().contains("session timed out"),
        "the restore held the consumer loop past max.poll.interval.ms:\n{}\n{}",
        b.log_tail(40),
        c.log_tail(40)
    );
    ensure!(status.code() == Some(0), "second member: {status}");
    ensure!(status_c.code() == Some(0), "third member: {status_c}");
    Ok(())
}

/// The longest `duration_ms` of the log lines that report a changelog restore.
fn restore_duration_ms(log: &str) -> Option<u64> {
    log_numbers(
        log,
        "restored partition state from the changelog",
        "duration_ms",
    )
    .into_iter()
    .max()
}
