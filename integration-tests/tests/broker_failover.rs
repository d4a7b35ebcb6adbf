//! Broker faults while the service runs and records flow: a single broker SIGKILLed and
//! restarted on the same ports and log directory after longer than `session.timeout.ms`, and
//! on a three-node cluster (replication 3, `min.insync.replicas` 2) the leaders of an input
//! and of an output partition SIGKILLed in turn. The output must equal the model each time
//! (identical re-sends allowed) and the service must stop cleanly afterwards.

use std::time::Duration;

use anyhow::{anyhow, ensure, Result};
use integration_tests::metrics::{RECORDS_INVALID, RECORDS_LATE};
use integration_tests::model::{expected_windows, Event};
use integration_tests::verify::{check_output, contains_all};
use integration_tests::workload::{self, Record, StreamShape, START_TS};
use integration_tests::{test_seed, unique_name, Broker, OutputReader, Producer};
use integration_tests::{Service, ServiceConfig};
use rand::rngs::StdRng;
use rand::SeedableRng;

const PARTITIONS: usize = 3;
const SESSION_MS: u64 = 6_000;
const READY_TIMEOUT: Duration = Duration::from_secs(90);
const COMPLETE_TIMEOUT: Duration = Duration::from_secs(180);
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn a_broker_killed_and_restarted_for_longer_than_a_session_loses_and_doubles_nothing() {
    let seed = test_seed("broker_restart");
    let broker = Broker::start().unwrap_or_else(|err| panic!("{err:#}"));
    let result = run(seed, &broker, "broker_restart", false, kill_and_restart);
    if let Err(err) = result {
        panic!("{err:#}\n(seed {seed})");
    }
}

/// The same with a group member (`state.scope: partition`): its session expires while the
/// broker is away, and it joins the group again.
#[test]
fn a_group_member_rides_out_a_broker_killed_for_longer_than_its_session() {
    let seed = test_seed("broker_restart_member");
    let broker = Broker::start().unwrap_or_else(|err| panic!("{err:#}"));
    let result = run(
        seed,
        &broker,
        "broker_restart_member",
        true,
        kill_and_restart,
    );
    if let Err(err) = result {
        panic!("{err:#}\n(seed {seed})");
    }
}

fn kill_and_restart(broker: &Broker, _input: &str, _output: &str) -> Result<()> {
    broker.kill(1)?;
    std::thread::sleep(Duration::from_millis(SESSION_MS + 2_000));
    broker.restart(1)
}

#[test]
fn partition_leaders_killed_on_a_three_node_cluster_lose_and_double_nothing() {
    let seed = test_seed("leader_failover");
    let broker = Broker::start_cluster().unwrap_or_else(|err| panic!("{err:#}"));
    let result = run(
        seed,
        &broker,
        "leader_failover",
        false,
        |broker, input, output| {
            // one node down at a time: two of three keep min.insync.replicas for the output
            for (topic, what) in [(input, "input"), (output, "output")] {
                let leader = broker.leader(topic, 0)?;
                eprintln!("[leader_failover] killing node {leader}, leader of {what} partition 0");
                broker.kill(leader)?;
                std::thread::sleep(Duration::from_secs(5));
                broker.restart(leader)?;
            }
            Ok(())
        },
    );
    if let Err(err) = result {
        panic!("{err:#}\n(seed {seed})");
    }
}

/// Feeds a stream (paced, so it flows through the fault), runs `fault` once the service has
/// read part of it, then checks the output against the model.
fn run(
    seed: u64,
    broker: &Broker,
    name: &str,
    partition_scope: bool,
    fault: impl FnOnce(&Broker, &str, &str) -> Result<()>,
) -> Result<()> {
    let input = unique_name(&format!("{name}-in"));
    let output = unique_name(&format!("{name}-out"));
    broker.create_topic(&input, PARTITIONS as i32)?;
    broker.create_topic(&output, 2)?;
    let events = workload::generate(
        &mut StdRng::seed_from_u64(seed),
        StreamShape {
            partitions: PARTITIONS,
            records_per_partition: 2_000,
            keys: 10,
            start_ts: START_TS,
        },
    );
    let sentinel_ts = workload::max_ts(&events) + 3_600_000;
    // partition-scoped windows are per partition: there, keys live on one partition each
    let events = if partition_scope {
        workload::partition_local(events)
    } else {
        events
    };
    let all: Vec<Event> = events.iter().flatten().cloned().collect();
    let mut config = ServiceConfig::new(broker, &input, &output);
    config
        .kafka_options
        .insert("session.timeout.ms".into(), SESSION_MS.to_string());
    if partition_scope {
        config
            .state_extra
            .insert("scope".into(), "partition".into());
    }
    let expected = expected_windows(&config.windows, &all);
    let records: Vec<Vec<Record>> = if partition_scope {
        workload::with_local_sentinels(&events, sentinel_ts)
    } else {
        workload::with_sentinels(&events, sentinel_ts)
    };
    let (first, rest): (Vec<Vec<Record>>, Vec<Vec<Record>>) = records
        .iter()
        .map(|r| {
            let (a, b) = r.split_at(r.len() / 3);
            (a.to_vec(), b.to_vec())
        })
        .unzip();

    let mut producer = Producer::new(broker)?;
    producer.send_partitions(&input, &first)?;
    let mut service = Service::new(name, config)?;
    let mut reader = OutputReader::new(broker, &output)?;
    service.start()?;
    service.wait_ready(READY_TIMEOUT)?;
    std::thread::sleep(Duration::from_secs(2));

    std::thread::scope(|scope| -> Result<()> {
        // the rest flows through the fault: its producer retries while the leader is away
        let feeder = scope.spawn(|| {
            producer.send_partitions_paced(&input, &rest, 50, Duration::from_millis(150))
        });
        fault(broker, &input, &output)?;
        feeder
            .join()
            .map_err(|_| anyhow!("the feeding thread panicked"))??;
        Ok(())
    })?;
    ensure!(
        service.is_running()?,
        "the service exited during the fault:\n{}",
        service.log_tail(40)
    );
    let complete = reader.poll_until(COMPLETE_TIMEOUT, |m| contains_all(&expected, m));
    if !complete {
        eprintln!("{}", service.log_tail(60));
    }
    let metrics = service.scrape()?;
    let status = service.sigterm(STOP_TIMEOUT)?;
    reader.drain(Duration::from_secs(2), Duration::from_secs(20));
    let summary = check_output(&expected, reader.messages())?;
    ensure!(complete, "output incomplete after {COMPLETE_TIMEOUT:?}");
    for counter in [RECORDS_LATE, RECORDS_INVALID] {
        ensure!(
            metrics.sum(counter).unwrap_or(0.0) == 0.0,
            "{counter} is not zero:\n{}",
            metrics.text()
        );
    }
    ensure!(
        status.code() == Some(0),
        "exit status after SIGTERM: {status}\n{}",
        service.log_tail(40)
    );
    eprintln!(
        "[{name}] output exact: {} windows, {} identical re-sends",
        summary.windows, summary.duplicates
    );
    Ok(())
}
