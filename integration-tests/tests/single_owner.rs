//! With `state.scope: instance` one instance reads every partition without group membership,
//! so a second one on the same consumer group would double the output. The start detects one:
//! another store's commits to the group within the last 30 s (it waits for them to stop, up to
//! `checkpoint.lock_wait`), or members of the group (a partition-scoped instance).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Result};
use integration_tests::metrics::RECORDS_CONSUMED;
use integration_tests::workload::{self, StreamShape, START_TS};
use integration_tests::{test_seed, unique_name, Broker, Producer, Service, ServiceConfig};
use rand::rngs::StdRng;
use rand::SeedableRng;

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn a_second_instance_on_the_same_group_is_refused() {
    let seed = test_seed("single_owner");
    if let Err(err) = run(seed) {
        panic!("{err:#}\n(seed {seed})");
    }
}

fn run(seed: u64) -> Result<()> {
    let broker = Broker::shared()?;
    let input = unique_name("owner-in");
    let output = unique_name("owner-out");
    broker.create_topic(&input, 2)?;
    broker.create_topic(&output, 1)?;
    let events = workload::generate(
        &mut StdRng::seed_from_u64(seed),
        StreamShape {
            partitions: 2,
            records_per_partition: 200,
            keys: 4,
            start_ts: START_TS,
        },
    );
    let records: Vec<_> = events.iter().map(|e| workload::valid_records(e)).collect();
    let produced = Producer::new(broker)?.send_partitions(&input, &records)?;

    let mut config = ServiceConfig::new(broker, &input, &output);
    config
        .checkpoint_extra
        .insert("lock_wait".into(), "3s".into());
    let mut first = Service::new("owner_first", config.clone())?;
    first.start()?;
    first.wait_ready(READY_TIMEOUT)?;
    first.wait_metrics(
        &format!("{RECORDS_CONSUMED} = {produced}"),
        READY_TIMEOUT,
        |m| m.sum(RECORDS_CONSUMED) == Some(produced as f64),
    )?;
    // a checkpoint after the last record: its offsets are committed
    std::thread::sleep(Duration::from_secs(2));

    // the same group, another volume: waits for the first one's commits to stop, then gives up
    let mut second = Service::new("owner_second", config.clone())?;
    second.start()?;
    let status = second.wait_exit(Duration::from_secs(30))?;
    let log = second.log_since_start();
    ensure!(
        status.code() == Some(1),
        "a second instance on the group exited with {status}\n{log}"
    );
    ensure!(
        log.contains("another instance is consuming consumer group")
            && log.contains(&config.group_id),
        "the refusal does not name the group:\n{log}"
    );
    ensure!(
        !log.contains("partition assigned"),
        "the refused instance was assigned partitions:\n{log}"
    );
    ensure!(first.is_running()?, "the first instance stopped");

    // a partition-scoped member on the same group: the instance-scoped start is refused
    let mut member_config = config.clone();
    member_config.state_extra = BTreeMap::from([("scope".to_string(), "partition".to_string())]);
    let mut member = Service::new("owner_member", member_config)?;
    let status = first.sigterm(STOP_TIMEOUT)?;
    ensure!(status.code() == Some(0), "first instance exit: {status}");
    member.start()?;
    member.wait_ready(READY_TIMEOUT)?;
    // the member holds the group; the first instance's own store restarts, but not alone
    first.start()?;
    let status = first.wait_exit(Duration::from_secs(60))?;
    let log = first.log_since_start();
    ensure!(
        status.code() == Some(1),
        "an instance-scoped start beside a group member exited with {status}\n{log}"
    );
    ensure!(
        log.contains("has active members") || log.contains("another instance is consuming"),
        "the refusal does not say why:\n{log}"
    );
    let status = member.sigterm(STOP_TIMEOUT)?;
    ensure!(status.code() == Some(0), "member exit: {status}");
    Ok(())
}
