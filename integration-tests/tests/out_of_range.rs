//! A held position the broker no longer has, on the real broker and binary: a stopped
//! service held partition 0 at offset 100, then the records before 200 were deleted
//! (`DeleteRecords`, as retention does). `kafka.on_offset_out_of_range`:
//!
//! - `fail` (the default): exit 1 naming the partition, the held position and the broker's
//!   offsets; `checkpointer reset-position --to earliest` then moves the position (noted in
//!   the history) and the next start reads on from 200;
//! - `earliest`: the service moves partition 0 to 200 by itself and counts the 100 skipped
//!   offsets; partition 1 is not rewound;
//! - `latest`: partition 0 moves to its end.
//!
//! Each time, the output equals the model over exactly the records read.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Result};
use integration_tests::model::{expected_windows, Event, WindowResult};
use integration_tests::verify::{check_output, contains_all};
use integration_tests::workload::{self, Record, StreamShape, START_TS};
use integration_tests::{cli, test_seed, unique_name, Broker, OutputReader, Producer};
use integration_tests::{Service, ServiceConfig};
use rand::rngs::StdRng;
use rand::SeedableRng;

const READY_TIMEOUT: Duration = Duration::from_secs(90);
const COMPLETE_TIMEOUT: Duration = Duration::from_secs(90);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
const PER_PARTITION: usize = 300;
/// Offsets read before the stop.
const HELD: usize = 100;
/// Records of partition 0 before this are deleted while the service is stopped.
const DELETED_BEFORE: usize = 200;
const SKIPPED: &str = "checkpointer_records_skipped_total";
const CONSUMED: &str = "checkpointer_records_consumed_total";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Policy {
    /// The default, then `reset-position --to earliest`.
    FailThenReset,
    Earliest,
    Latest,
    /// `earliest` with `state.scope: partition` (a group member: the partition is assigned
    /// anew within the group's assignment).
    EarliestPartitionScope,
}

#[test]
fn fail_stops_naming_the_partition_and_reset_position_moves_it() {
    run_policy(Policy::FailThenReset);
}

#[test]
fn earliest_moves_only_the_partition_out_of_range_and_counts_what_it_skipped() {
    run_policy(Policy::Earliest);
}

#[test]
fn earliest_in_partition_scope_moves_the_partition_within_the_groups_assignment() {
    run_policy(Policy::EarliestPartitionScope);
}

#[test]
fn latest_moves_the_partition_to_its_end() {
    run_policy(Policy::Latest);
}

fn run_policy(policy: Policy) {
    let broker = Broker::shared().unwrap_or_else(|err| panic!("{err:#}"));
    let seed = test_seed(&format!("out_of_range_{policy:?}"));
    if let Err(err) = run(broker, seed, policy) {
        panic!("{err:#}\n(seed {seed})");
    }
}

fn run(broker: &Broker, seed: u64, policy: Policy) -> Result<()> {
    let input = unique_name("oor-in");
    let output = unique_name("oor-out");
    broker.create_topic(&input, 2)?;
    broker.create_topic(&output, 1)?;
    let scoped = policy == Policy::EarliestPartitionScope;
    let events = workload::generate(
        &mut StdRng::seed_from_u64(seed),
        StreamShape {
            partitions: 2,
            records_per_partition: PER_PARTITION,
            keys: 5,
            start_ts: START_TS,
        },
    );
    // partition-scoped windows are per partition: keys local to one partition each
    let events = if scoped {
        workload::partition_local(events)
    } else {
        events
    };
    let mut config = ServiceConfig::new(broker, &input, &output);
    match policy {
        Policy::FailThenReset => {}
        Policy::Earliest | Policy::EarliestPartitionScope => {
            config
                .kafka_extra
                .insert("on_offset_out_of_range".into(), "earliest".into());
        }
        Policy::Latest => {
            config
                .kafka_extra
                .insert("on_offset_out_of_range".into(), "latest".into());
        }
    }
    if scoped {
        config
            .state_extra
            .insert("scope".into(), "partition".into());
    }
    let windows = config.windows.clone();
    let mut producer = Producer::new(broker)?;
    let mut reader = OutputReader::new(broker, &output)?;
    let mut service = Service::new(&format!("out_of_range_{policy:?}"), config)?;

    // first life: the first 100 records of each partition, then a clean stop
    for (p, partition) in events.iter().enumerate() {
        producer.send_records(
            &input,
            p as i32,
            &workload::valid_records(&partition[..HELD]),
        )?;
    }
    producer.flush()?;
    service.start()?;
    service.wait_ready(READY_TIMEOUT)?;
    service.wait_metrics("the first records", COMPLETE_TIMEOUT, |m| {
        m.sum(CONSUMED) == Some((2 * HELD) as f64)
    })?;
    let status = service.sigterm(STOP_TIMEOUT)?;
    ensure!(status.code() == Some(0), "first stop: {status}");

    // the rest, then retention takes partition 0's records before 200
    for (p, partition) in events.iter().enumerate() {
        producer.send_records(
            &input,
            p as i32,
            &workload::valid_records(&partition[HELD..]),
        )?;
    }
    producer.flush()?;
    broker.delete_records(&input, 0, DELETED_BEFORE as i64)?;

    let (moved_to, skipped) = match policy {
        Policy::FailThenReset => {
            service.start()?;
            let status = service.wait_exit(COMPLETE_TIMEOUT)?;
            let log = service.log_since_start();
            ensure!(
                status.code() == Some(1),
                "fail: exit {status}\n{}",
                service.log_tail(20)
            );
            let want = format!(
                "partition {input}[0]: the held position {HELD} is out of range: the broker has offsets {DELETED_BEFORE} to {PER_PARTITION}"
            );
            ensure!(
                log.contains(&want),
                "the exit names {want:?}:\n{}",
                service.log_tail(20)
            );
            let state = service.state_dir();
            let config_path = service.config_path();
            let args: [std::ffi::OsString; 11] = [
                "reset-position".into(),
                "--dir".into(),
                state.clone().into_os_string(),
                "--topic".into(),
                input.clone().into(),
                "--partition".into(),
                "0".into(),
                "--to".into(),
                "earliest".into(),
                "--config".into(),
                config_path.into_os_string(),
            ];
            let out = cli::run(args)?.ok()?;
            ensure!(
                out.stdout
                    .contains(&format!("from {HELD} to {DELETED_BEFORE}")),
                "{}",
                out.describe()
            );
            let args: [std::ffi::OsString; 4] = [
                "checkpoints".into(),
                "list".into(),
                "--dir".into(),
                state.into_os_string(),
            ];
            let list = cli::run(args)?.ok()?;
            ensure!(
                list.stdout.contains("note: reset-position"),
                "the history notes the reset:\n{}",
                list.stdout
            );
            (DELETED_BEFORE, 0)
        }
        Policy::Earliest | Policy::EarliestPartitionScope => {
            (DELETED_BEFORE, DELETED_BEFORE - HELD)
        }
        Policy::Latest => (PER_PARTITION, PER_PARTITION - HELD),
    };

    // the next start reads on; then a sentinel per partition closes every window
    service.start()?;
    service.wait_ready(READY_TIMEOUT)?;
    if policy != Policy::FailThenReset {
        // moved before the sentinels arrive, so that latest does not skip them
        service.wait_metrics("the move", COMPLETE_TIMEOUT, |m| {
            m.sum(SKIPPED).is_some_and(|n| n > 0.0)
        })?;
    }
    let sentinel_ts = workload::max_ts(&events) + 3_600_000;
    for p in 0..2 {
        let sentinel = if scoped {
            workload::local_sentinel(p, sentinel_ts)
        } else {
            workload::sentinel(sentinel_ts)
        };
        producer.send_records(&input, p as i32, &[Record::Valid(sentinel)])?;
    }
    producer.flush()?;

    let mut read_events: Vec<Event> = events[0][..HELD].to_vec();
    read_events.extend_from_slice(&events[0][moved_to..]);
    read_events.extend_from_slice(&events[1]);
    let expected: BTreeMap<String, WindowResult> = expected_windows(&windows, &read_events);
    let complete = reader.poll_until(COMPLETE_TIMEOUT, |m| contains_all(&expected, m));
    let metrics = service.scrape()?;
    let status = service.sigterm(STOP_TIMEOUT)?;
    reader.drain(Duration::from_secs(1), Duration::from_secs(10));
    ensure!(
        complete,
        "output incomplete after {COMPLETE_TIMEOUT:?}\n{}",
        service.log_tail(30)
    );
    check_output(&expected, reader.messages())?;
    let counted = metrics.by_label(SKIPPED, "reason");
    ensure!(
        counted.get("offset_out_of_range") == Some(&(skipped as f64)),
        "{SKIPPED}: {counted:?}, want {skipped}"
    );
    ensure!(status.code() == Some(0), "last stop: {status}");
    Ok(())
}
