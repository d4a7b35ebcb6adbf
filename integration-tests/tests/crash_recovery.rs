//! SIGKILL the service repeatedly while it works through a backlog and a live stream; after
//! restarts on the same state dir the output must be exactly the model: no window missing, none
//! extra, and every re-sent window byte-for-byte identical to its first copy.

use std::collections::BTreeSet;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Result};
use integration_tests::metrics::{
    CHECKPOINT_LAST_COMPLETED_ID, OFFSET_GAP, RECORDS_CONSUMED, RECORDS_INVALID, RECORDS_LATE,
};
use integration_tests::model::{expected_windows, Event};
use integration_tests::verify::{check_output, contains_all};
use integration_tests::workload::{self, Record, StreamShape, MAX_STEP_BACK_MS, START_TS};
use integration_tests::{test_seed, unique_name, Broker, OutputReader, Producer};
use integration_tests::{Service, ServiceConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const PARTITIONS: usize = 3;
const RECORDS_PER_PARTITION: usize = 8_000;
/// Records of each partition produced before the first start. The rest is cut into one
/// segment per round (plus a last one ending with the sentinels); each round's segment is fed,
/// paced over two to three seconds, once the service is up, so that kills land while input is
/// flowing however fast the service is.
const BACKLOG_PER_PARTITION: usize = 3_000;
const FEED_CHUNK: usize = 100;
const FEED_PAUSE: Duration = Duration::from_millis(250);
const KEYS: usize = 20;
const KILLS: usize = 4;
const READY_TIMEOUT: Duration = Duration::from_secs(90);
const COMPLETE_TIMEOUT: Duration = Duration::from_secs(120);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// How the restarted instance gets its partitions back.
#[derive(Clone, Copy, Debug)]
enum Membership {
    /// `state.scope: instance` with no membership setting: partitions assigned directly.
    Direct,
    /// `state.scope: partition` with `kafka.instance_id` (static group membership).
    Static,
    /// `state.scope: partition` without it: the restart waits for the dead member's session.
    Dynamic,
}

/// A session timeout far longer than a restart takes: a restart that had to wait for the dead
/// member's session to expire would stand out.
const LONG_SESSION_MS: u64 = 60_000;
/// The dynamic-membership test's session timeout, so that it waits 6 s per kill, not 45.
const SHORT_SESSION_MS: u64 = 6_000;

/// Instance scope, no group membership, two seeds: every restart reads again without waiting
/// for any session to expire.
#[test]
fn instance_scope_sigkill_mid_stream_keeps_output_exactly_once() {
    let seed = test_seed("crash_recovery");
    for seed in [seed, seed.wrapping_add(1)] {
        crash_test(seed, Membership::Direct);
    }
}

/// Partition scope with static membership: the restarted member gets its partitions back
/// within its session.
#[test]
fn partition_scope_static_member_sigkill_keeps_output_exactly_once() {
    crash_test(test_seed("crash_recovery_static"), Membership::Static);
}

/// Partition scope with dynamic membership: the restart is assigned its partitions once the
/// killed member's session expired; the output is exact all the same.
#[test]
fn partition_scope_dynamic_member_sigkill_keeps_output_exactly_once() {
    crash_test(test_seed("crash_recovery_dynamic"), Membership::Dynamic);
}

fn crash_test(seed: u64, membership: Membership) {
    eprintln!("[crash_recovery] seed {seed}, {membership:?} membership");
    let broker = Broker::shared().unwrap_or_else(|err| panic!("{err:#}"));
    let input = unique_name("crash-in");
    let output = unique_name("crash-out");
    let mut config = ServiceConfig::new(broker, &input, &output);
    config.checkpoint_interval = Duration::from_millis(400);
    let session_ms = match membership {
        Membership::Dynamic => SHORT_SESSION_MS,
        Membership::Direct | Membership::Static => LONG_SESSION_MS,
    };
    config
        .kafka_options
        .insert("session.timeout.ms".into(), session_ms.to_string());
    if !matches!(membership, Membership::Direct) {
        config
            .state_extra
            .insert("scope".into(), "partition".into());
    }
    if matches!(membership, Membership::Static) {
        config.instance_id = Some(unique_name("crash-instance"));
    }
    let mut service =
        Service::new("crash_recovery", config).unwrap_or_else(|err| panic!("{err:#}"));
    if let Err(err) = run(seed, membership, broker, &mut service, &input, &output) {
        panic!("{err:#}\n(seed {seed}, {membership:?} membership)");
    }
}

fn run(
    seed: u64,
    membership: Membership,
    broker: &Broker,
    service: &mut Service,
    input: &str,
    output: &str,
) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    broker.create_topic(input, PARTITIONS as i32)?;
    broker.create_topic(output, 2)?;

    let events = workload::generate(
        &mut rng,
        StreamShape {
            partitions: PARTITIONS,
            records_per_partition: RECORDS_PER_PARTITION,
            keys: KEYS,
            start_ts: START_TS,
        },
    );
    for partition in &events {
        ensure!(workload::max_disorder(partition) <= MAX_STEP_BACK_MS);
    }
    // partition-scoped windows are per partition: there, keys live on one partition each (as
    // Kafka's partitioner places keyed records), so the model's per-key windows are theirs
    let local = !matches!(membership, Membership::Direct);
    let events = if local {
        workload::partition_local(events)
    } else {
        events
    };
    let all: Vec<Event> = events.iter().flatten().cloned().collect();
    let expected = expected_windows(&service.config().windows, &all);
    let sentinel_ts = workload::max_ts(&events) + 3_600_000;
    let mut backlog: Vec<Vec<Record>> = Vec::new();
    let mut live: Vec<Vec<Record>> = Vec::new();
    for (p, partition) in events.iter().enumerate() {
        let (before, after) = partition.split_at(BACKLOG_PER_PARTITION.min(partition.len()));
        backlog.push(workload::valid_records(before));
        let mut rest = workload::valid_records(after);
        rest.push(Record::Valid(if local {
            workload::local_sentinel(p, sentinel_ts)
        } else {
            workload::sentinel(sentinel_ts)
        }));
        live.push(rest);
    }
    let started = Instant::now();
    let mut producer = Producer::new(broker)?;
    let produced = producer.send_partitions(input, &backlog)?;
    eprintln!(
        "[crash_recovery] backlog of {produced} records produced in {:.1?}; {} windows expected, \
         event time spans {} s",
        started.elapsed(),
        expected.len(),
        (workload::max_ts(&events) - START_TS) / 1000
    );

    let mut reader = OutputReader::new(broker, output)?;
    let segments = split_segments(&live, KILLS + 1);
    let (go, go_rx) = mpsc::channel::<()>();
    let feed_topic = input.to_owned();
    let feeder = std::thread::spawn(move || -> Result<usize> {
        let mut fed = 0;
        for segment in &segments {
            if go_rx.recv().is_err() {
                break;
            }
            fed += producer.send_partitions_paced(&feed_topic, segment, FEED_CHUNK, FEED_PAUSE)?;
        }
        Ok(fed)
    });
    service.start()?;
    let mut started_at = Instant::now();
    let mut mid_stream_kills = 0;
    // how long each restart took to be assigned its partitions again
    let mut resumes: Vec<Duration> = Vec::new();
    for round in 1..=KILLS {
        // Mostly kill a working service; now and then one that is still starting up.
        let waited_ready = !rng.random_bool(0.2);
        if waited_ready {
            service.wait_ready(READY_TIMEOUT)?;
            if round > 1 {
                resumes.push(started_at.elapsed());
            }
        }
        // A failed feeder shows up at join below.
        let _ = go.send(());
        let delay = Duration::from_millis(rng.random_range(300..=2_500));
        std::thread::sleep(delay);
        let at_kill = service.scrape().ok();
        let consumed = at_kill
            .as_ref()
            .and_then(|m| m.sum(RECORDS_CONSUMED))
            .unwrap_or(0.0);
        let checkpoint = at_kill
            .as_ref()
            .and_then(|m| m.sum(CHECKPOINT_LAST_COMPLETED_ID));
        service.sigkill()?;
        // Nothing is written any more: drain to see exactly what was out at the kill.
        reader.drain(Duration::from_secs(1), Duration::from_secs(15));
        let out: BTreeSet<&str> = reader.messages().iter().map(|m| m.key.as_str()).collect();
        let present = expected.keys().filter(|k| out.contains(k.as_str())).count();
        let mid_stream = consumed > 0.0 && present < expected.len();
        mid_stream_kills += usize::from(mid_stream);
        eprintln!(
            "[crash_recovery] kill {round}: {delay:?} after {}, this process had consumed \
             {consumed} records (last checkpoint {checkpoint:?}), {present}/{} windows out ({} \
             messages){}",
            if waited_ready { "ready" } else { "start" },
            expected.len(),
            reader.messages().len(),
            if mid_stream { ", mid-stream" } else { "" }
        );
        service.start()?;
        started_at = Instant::now();
    }

    let _ = go.send(());
    drop(go);
    let fed = feeder
        .join()
        .map_err(|_| anyhow!("the feeding thread panicked"))??;
    eprintln!(
        "[crash_recovery] live stream of {fed} records (sentinels included) done after {:.1?}",
        started.elapsed()
    );
    service.wait_ready(READY_TIMEOUT)?;
    resumes.push(started_at.elapsed());
    eprintln!(
        "[crash_recovery] {membership:?}: restarts ready (partitions assigned) after {resumes:?}"
    );
    if !matches!(membership, Membership::Dynamic) {
        // without a session to wait for, a restart is assigned at once: far below the session
        // timeout it would otherwise wait for (a bound on behaviour, not on speed)
        let slowest = resumes.iter().max().copied().unwrap_or_default();
        ensure!(
            slowest < Duration::from_millis(LONG_SESSION_MS / 2),
            "a restart with {membership:?} membership waited {slowest:?} for its partitions, \
             as if for the killed instance's session ({LONG_SESSION_MS} ms) to expire"
        );
    }
    let complete = reader.poll_until(COMPLETE_TIMEOUT, |m| contains_all(&expected, m));
    let metrics = service.scrape()?;
    let status = service.sigterm(STOP_TIMEOUT)?;
    reader.drain(Duration::from_secs(2), Duration::from_secs(20));

    let summary = check_output(&expected, reader.messages());
    if !complete {
        eprintln!("{}", service.log_tail(60));
    }
    let summary = summary?;
    ensure!(complete, "output incomplete after {COMPLETE_TIMEOUT:?}");
    eprintln!(
        "[crash_recovery] output matches the model: {} windows {:?}, {} messages, {} re-sent \
         identically",
        summary.windows, summary.per_window, summary.messages, summary.duplicates
    );
    ensure!(
        mid_stream_kills >= 1,
        "no kill landed mid-stream (every kill was before any progress or after all output), \
         so recovery was not exercised"
    );
    ensure!(
        metrics.sum(RECORDS_LATE).unwrap_or(0.0) == 0.0,
        "records counted late although disorder stays below max_out_of_orderness:\n{}",
        metrics.text()
    );
    ensure!(
        metrics.sum(OFFSET_GAP).unwrap_or(0.0) == 0.0,
        "offsets skipped after an assignment:\n{}",
        metrics.text()
    );
    // the counter above is the last process's: every earlier run warned in the log instead
    let all_runs = std::fs::read_to_string(service.log_path()).unwrap_or_default();
    ensure!(
        !all_runs.contains("beyond the held position"),
        "a run skipped offsets after an assignment:\n{}",
        all_runs
            .lines()
            .filter(|l| l.contains("held position"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    ensure!(
        metrics.sum(RECORDS_INVALID).unwrap_or(0.0) == 0.0,
        "valid records counted invalid:\n{}",
        metrics.text()
    );
    ensure!(
        status.code() == Some(0),
        "exit status after SIGTERM: {status}\n{}",
        service.log_tail(40)
    );
    Ok(())
}

/// Cuts every partition's records into `n` consecutive segments: `result[segment][partition]`.
fn split_segments(partitions: &[Vec<Record>], n: usize) -> Vec<Vec<Vec<Record>>> {
    (0..n)
        .map(|segment| {
            partitions
                .iter()
                .map(|records| {
                    let from = records.len() * segment / n;
                    let to = records.len() * (segment + 1) / n;
                    records[from..to].to_vec()
                })
                .collect()
        })
        .collect()
}
