//! Partition state moving between instances through the changelog topic (`state.scope:
//! partition`, `state.changelog_topic`), against the Kafka broker with the real binary.

use std::time::Duration;

use anyhow::{ensure, Result};
use integration_tests::metrics::{
    CHANGELOG_PUBLISHED, CHANGELOG_RESTORES, RECORDS_CONSUMED, RECORDS_LATE,
};
use integration_tests::model::{expected_windows, Event};
use integration_tests::verify::{check_output, contains_all, output_problems};
use integration_tests::workload::{self, Record, StreamShape, START_TS};
use integration_tests::{test_seed, unique_name, Broker, OutputReader, Producer};
use integration_tests::{Service, ServiceConfig};
use rand::rngs::StdRng;
use rand::SeedableRng;

const PARTITIONS: usize = 3;
const READY_TIMEOUT: Duration = Duration::from_secs(90);
const COMPLETE_TIMEOUT: Duration = Duration::from_secs(120);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn an_instance_on_an_empty_volume_restores_partitions_from_the_changelog() {
    let seed = test_seed("handoff_empty_volume");
    if let Err(err) = empty_volume(seed) {
        panic!("{err:#}\n(seed {seed})");
    }
}

fn empty_volume(seed: u64) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let broker = Broker::shared()?;
    let input = unique_name("handoff-in");
    let output = unique_name("handoff-out");
    let changelog = unique_name("handoff-changelog");
    broker.create_topic(&input, PARTITIONS as i32)?;
    broker.create_topic(&output, 2)?;
    broker.create_topic(&changelog, PARTITIONS as i32)?;
    let cfg = ServiceConfig::new(broker, &input, &output).partition_scoped(&changelog);
    let windows = cfg.windows.clone();
    let mut producer = Producer::new(broker)?;
    let mut reader = OutputReader::new(broker, &output)?;

    // the first instance reads a first half, then stops; its volume is not used again
    let first = workload::partition_local(workload::generate(
        &mut rng,
        StreamShape {
            partitions: PARTITIONS,
            records_per_partition: 600,
            keys: 6,
            start_ts: START_TS,
        },
    ));
    let first_records: Vec<Vec<Record>> =
        first.iter().map(|e| workload::valid_records(e)).collect();
    let produced_first = producer.send_partitions(&input, &first_records)?;
    let mut a = Service::new("handoff_a", cfg.clone())?;
    a.start()?;
    a.wait_ready(READY_TIMEOUT)?;
    a.wait_metrics(
        &format!("{RECORDS_CONSUMED} = {produced_first}"),
        COMPLETE_TIMEOUT,
        |m| m.sum(RECORDS_CONSUMED) == Some(produced_first as f64),
    )?;
    // every partition is published at the first durable checkpoint after its records
    a.wait_metrics(
        &format!("{CHANGELOG_PUBLISHED} >= {PARTITIONS}"),
        COMPLETE_TIMEOUT,
        |m| m.sum(CHANGELOG_PUBLISHED).unwrap_or(0.0) >= PARTITIONS as f64,
    )?;
    let status = a.sigterm(STOP_TIMEOUT)?;
    ensure!(
        status.code() == Some(0),
        "first instance exit: {status}\n{}",
        a.log_tail(40)
    );

    // the second instance starts on an empty volume in the same group
    let second = workload::partition_local(workload::generate(
        &mut rng,
        StreamShape {
            partitions: PARTITIONS,
            records_per_partition: 300,
            keys: 6,
            start_ts: workload::max_ts(&first) + 1_000,
        },
    ));
    let sentinel_ts = workload::max_ts(&second) + 3_600_000;
    let mut history: Vec<Event> = first.iter().flatten().cloned().collect();
    // the sentinels close every window before them; their own windows stay open
    history.extend(second.iter().flatten().cloned());
    let expected = expected_windows(&windows, &history);

    // with other key groups than the first instance's: the state the changelog carries goes
    // into this volume's own groups
    let mut other_groups = cfg.clone();
    other_groups
        .state_extra
        .insert("key_groups".to_owned(), "7".to_owned());
    let mut b = Service::new("handoff_b", other_groups)?;
    b.start()?;
    b.wait_ready(READY_TIMEOUT)?;
    let log = std::fs::read_to_string(b.log_path()).unwrap_or_default();
    ensure!(
        log.contains("key_groups=7") || log.contains("\"key_groups\":7"),
        "the second volume's store was not created with 7 key groups:\n{}",
        b.log_tail(40)
    );
    let produced_second = producer.send_partitions(
        &input,
        &workload::with_local_sentinels(&second, sentinel_ts),
    )?;
    ensure!(
        reader.poll_until(COMPLETE_TIMEOUT, |m| contains_all(&expected, m)),
        "output incomplete after the takeover: {}\n{}",
        output_problems(&expected, reader.messages()),
        b.log_tail(40)
    );
    let metrics = b.wait_metrics(
        &format!("{RECORDS_CONSUMED} = {produced_second}"),
        Duration::from_secs(15),
        |m| m.sum(RECORDS_CONSUMED) == Some(produced_second as f64),
    )?;
    ensure!(
        metrics.sum(CHANGELOG_RESTORES) == Some(PARTITIONS as f64),
        "every partition restored from the changelog:\n{}",
        metrics.text()
    );
    ensure!(
        metrics.sum(RECORDS_LATE).unwrap_or(0.0) == 0.0,
        "late records:\n{}",
        metrics.text()
    );
    let status = b.sigterm(STOP_TIMEOUT)?;
    ensure!(
        status.code() == Some(0),
        "second instance exit: {status}\n{}",
        b.log_tail(40)
    );
    reader.drain(Duration::from_secs(1), Duration::from_secs(15));
    let summary = check_output(&expected, reader.messages())?;
    ensure!(
        summary.duplicates == 0,
        "{} windows sent twice across a clean hand-off",
        summary.duplicates
    );
    eprintln!(
        "[handoff] {produced_first} + {produced_second} records, {} windows, exact",
        summary.windows
    );
    Ok(())
}

/// Three instances in one group while records keep flowing: a rolling restart one instance at
/// a time (SIGTERM, then a changed but state-compatible configuration standing in for the new
/// version), one SIGKILL, then scale 3 -> 1 -> 2. Every final window equals the model.
#[test]
fn three_instances_survive_a_rolling_restart_a_crash_and_scaling() {
    let seed = test_seed("handoff_group");
    if let Err(err) = group(seed) {
        panic!("{err:#}\n(seed {seed})");
    }
}

const GROUP_PARTITIONS: usize = 6;
/// `session.timeout.ms` of the group test and a second.
const SETTLE: Duration = Duration::from_secs(7);

fn group(seed: u64) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let broker = Broker::shared()?;
    let input = unique_name("group-in");
    let output = unique_name("group-out");
    let changelog = unique_name("group-changelog");
    broker.create_topic(&input, GROUP_PARTITIONS as i32)?;
    broker.create_topic(&output, 2)?;
    broker.create_topic(&changelog, GROUP_PARTITIONS as i32)?;
    let mut base = ServiceConfig::new(broker, &input, &output).partition_scoped(&changelog);
    // a stopped static member's partitions move after its session expires
    base.kafka_options
        .insert("session.timeout.ms".into(), "6000".into());
    let windows = base.windows.clone();
    // dynamic membership: partitions really move between members here (a member restarted
    // within its session keeping them is tests/static_membership.rs)
    let config_for = |_name: &str, version: u32| {
        let mut cfg = base.clone();
        if version > 1 {
            // the "new version": other checkpoint settings, the same state
            cfg.checkpoint_interval = Duration::from_millis(700);
            cfg.checkpoint_extra.insert("retained".into(), "4".into());
        }
        cfg
    };

    let events = workload::partition_local(workload::generate(
        &mut rng,
        StreamShape {
            partitions: GROUP_PARTITIONS,
            records_per_partition: 1_200,
            keys: 4,
            start_ts: START_TS,
        },
    ));
    let sentinel_ts = workload::max_ts(&events) + 3_600_000;
    let expected = expected_windows(
        &windows,
        &events.iter().flatten().cloned().collect::<Vec<_>>(),
    );
    let mut reader = OutputReader::new(broker, &output)?;
    let mut producer = Producer::new(broker)?;

    let mut a = Service::new("group_a", config_for("group-a", 1))?;
    let mut b = Service::new("group_b", config_for("group-b", 1))?;
    let mut c = Service::new("group_c", config_for("group-c", 1))?;
    for s in [&mut a, &mut b, &mut c] {
        s.start()?;
    }
    for s in [&mut a, &mut b, &mut c] {
        s.wait_ready(READY_TIMEOUT)?;
    }

    let all = workload::with_local_sentinels(&events, sentinel_ts);
    let sent = std::thread::scope(|scope| -> Result<usize> {
        // records flow the whole time: 10 per partition every 400 ms
        let feeder = scope
            .spawn(|| producer.send_partitions_paced(&input, &all, 10, Duration::from_millis(400)));
        let step = |what: &str| eprintln!("[handoff] {what}");
        // one membership change at a time: a departed member is out of the group once its
        // session expired, before the next one joins
        let settle = || std::thread::sleep(SETTLE);
        // rolling restart, one instance at a time, each coming back as the new version
        for (name, s) in [
            ("group-a", &mut a),
            ("group-b", &mut b),
            ("group-c", &mut c),
        ] {
            step(&format!("rolling restart of {name}"));
            let status = s.sigterm(STOP_TIMEOUT)?;
            ensure!(
                status.code() == Some(0),
                "{name} exit: {status}\n{}",
                s.log_tail(40)
            );
            *s.config_mut() = config_for(name, 2);
            settle();
            s.start()?;
            s.wait_ready(READY_TIMEOUT)?;
            settle();
        }
        step("SIGKILL of group-b");
        b.sigkill()?;
        settle();
        b.start()?;
        b.wait_ready(READY_TIMEOUT)?;
        settle();
        step("scale 3 -> 1");
        for s in [&mut b, &mut c] {
            let status = s.sigterm(STOP_TIMEOUT)?;
            ensure!(
                status.code() == Some(0),
                "exit: {status}\n{}",
                s.log_tail(40)
            );
        }
        settle();
        step("scale 1 -> 2");
        b.start()?;
        b.wait_ready(READY_TIMEOUT)?;
        let sent = feeder
            .join()
            .map_err(|_| anyhow::anyhow!("feeder thread panicked"))??;
        Ok(sent)
    })?;
    eprintln!("[handoff] {sent} records sent");
    ensure!(
        reader.poll_until(COMPLETE_TIMEOUT, |m| contains_all(&expected, m)),
        "output incomplete: {}\n--- a ---\n{}\n--- b ---\n{}",
        output_problems(&expected, reader.messages()),
        a.log_tail(30),
        b.log_tail(30)
    );
    reader.drain(Duration::from_secs(1), Duration::from_secs(15));
    // duplicates (identical re-sends after the crash) are allowed; a different value is not
    let summary = check_output(&expected, reader.messages())?;
    for s in [&mut a, &mut b] {
        let metrics = s.scrape()?;
        ensure!(
            metrics.sum(RECORDS_LATE).unwrap_or(0.0) == 0.0,
            "late records:\n{}",
            metrics.text()
        );
        let status = s.sigterm(STOP_TIMEOUT)?;
        ensure!(
            status.code() == Some(0),
            "exit: {status}\n{}",
            s.log_tail(40)
        );
    }
    eprintln!(
        "[handoff] group: {} windows exact, {} identical re-sends",
        summary.windows, summary.duplicates
    );
    Ok(())
}
