//! With `state.scope: instance` one instance reads every partition without group membership,
//! so a second one on the same consumer group would double the output. The start detects one:
//! another store's commits to the group within the last 30 s, or members of the group (it waits
//! for either to go, up to `checkpoint.lock_wait`); and a copy of the same store started beside
//! a running one stops at its first heartbeat, when it sees the other run's commits.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{ensure, Result};
use integration_tests::metrics::RECORDS_CONSUMED;
use integration_tests::workload::{self, StreamShape, START_TS};
use integration_tests::{test_seed, unique_name, Broker, Producer, Service, ServiceConfig};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rdkafka::consumer::{BaseConsumer, Consumer};

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

    // a copy of the first instance's volume (the same store id) started beside it passes the
    // start-up check (the commits it sees are its own store's), but the first heartbeat shows
    // commits by another run made since it started: the later start stops
    first.stop_cleanly(STOP_TIMEOUT)?;
    let mut copy = Service::new("owner_copy", config.clone())?;
    copy.copy_state_from(&first.state_dir())?;
    first.start()?;
    first.wait_ready(READY_TIMEOUT)?;
    std::thread::sleep(Duration::from_secs(1));
    copy.start()?;
    let status = copy.wait_exit(Duration::from_secs(60))?;
    let log = copy.log_since_start();
    ensure!(
        status.code() == Some(1),
        "a copy of the store running beside the original exited with {status}\n{log}"
    );
    ensure!(
        log.contains("another instance reads consumer group")
            && log.contains("started later stops"),
        "the copy does not say why it stopped:\n{log}"
    );
    std::thread::sleep(Duration::from_secs(6));
    ensure!(
        first.is_running()?,
        "the instance that started first stopped too:\n{}",
        first.log_tail(30)
    );
    first.stop_cleanly(STOP_TIMEOUT)?;

    // a consumer that is a member of the group (and commits nothing): refused once it stays
    let stop = AtomicBool::new(false);
    let member: BaseConsumer = broker
        .client_config()
        .set("group.id", &config.group_id)
        .set("enable.auto.commit", "false")
        .create()?;
    member.subscribe(&[input.as_str()])?;
    std::thread::scope(|scope| -> Result<()> {
        let polling = scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let _ = member.poll(Duration::from_millis(100));
            }
        });
        let joined = integration_tests::poll_until(
            "the member being assigned partitions",
            READY_TIMEOUT,
            Duration::from_millis(200),
            || Ok(member.assignment().ok().filter(|a| a.count() > 0)),
        );
        let refused = joined.and_then(|_| {
            first.start()?;
            let status = first.wait_exit(Duration::from_secs(60))?;
            Ok((status, first.log_since_start()))
        });
        stop.store(true, Ordering::Relaxed);
        let _ = polling.join();
        let (status, log) = refused?;
        ensure!(
            status.code() == Some(1),
            "an instance-scoped start beside a group member exited with {status}\n{log}"
        );
        ensure!(
            log.contains("has active members"),
            "the refusal does not say the group has members:\n{log}"
        );
        ensure!(
            !log.contains("partition assigned"),
            "the refused instance was assigned partitions:\n{log}"
        );
        Ok(())
    })
}
