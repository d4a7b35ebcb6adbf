//! A partition that has gone quiet must not hold every window back forever
//! (`watermark.idle_timeout`): once it is caught up and quiet for the timeout, the others'
//! windows close as their event time moves. With partition-scoped state and
//! `watermark.idle_advance: wall_clock`, the quiet partition's own windows close too. The
//! windows that close are exact (equal to the model), each sent once.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Result};
use integration_tests::client::Message;
use integration_tests::model::{expected_windows, Event, WindowResult};
use integration_tests::verify::{check_output, contains_all};
use integration_tests::workload::{self, START_TS};
use integration_tests::{unique_name, Broker, OutputReader, Producer};
use integration_tests::{Service, ServiceConfig};

const READY_TIMEOUT: Duration = Duration::from_secs(90);
const COMPLETE_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// The configured disorder bound of the harness (`max_out_of_orderness`).
const DISORDER_MS: i64 = 2_000;

#[test]
fn a_quiet_partition_stops_holding_the_others_windows_back() {
    let broker = Broker::shared().unwrap_or_else(|err| panic!("{err:#}"));
    if let Err(err) = run(broker, false) {
        panic!("{err:#}");
    }
}

#[test]
fn with_partition_scope_a_quiet_partitions_windows_close_by_the_wall_clock() {
    let broker = Broker::shared().unwrap_or_else(|err| panic!("{err:#}"));
    if let Err(err) = run(broker, true) {
        panic!("{err:#}");
    }
}

/// Partition 0 carries two minutes of event time, partition 1 the first five seconds only.
fn events(scoped: bool) -> Vec<Vec<Event>> {
    let stream = |n: usize| -> Vec<Event> {
        (0..n)
            .map(|i| Event {
                key: workload::key_name(i % 4),
                value: (i % 7) as i64 + 1,
                ts: START_TS + i as i64 * 100,
            })
            .collect()
    };
    let events = vec![stream(1_200), stream(50)];
    if scoped {
        workload::partition_local(events)
    } else {
        events
    }
}

/// The messages of `expected`'s windows, for the exactness check of the windows that close.
fn of(expected: &BTreeMap<String, WindowResult>, messages: &[Message]) -> Vec<Message> {
    messages
        .iter()
        .filter(|m| expected.contains_key(&m.key))
        .cloned()
        .collect()
}

fn run(broker: &Broker, scoped: bool) -> Result<()> {
    let name = if scoped {
        "idle_wall_clock"
    } else {
        "idle_partition"
    };
    let input = unique_name(&format!("{name}-in"));
    let output = unique_name(&format!("{name}-out"));
    broker.create_topic(&input, 2)?;
    broker.create_topic(&output, 2)?;
    let events = events(scoped);
    let records: Vec<_> = events.iter().map(|p| workload::valid_records(p)).collect();
    Producer::new(broker)?.send_partitions(&input, &records)?;

    let mut config = ServiceConfig::new(broker, &input, &output);
    config
        .watermark_extra
        .insert("idle_timeout".into(), "2s".into());
    if scoped {
        config
            .state_extra
            .insert("scope".into(), "partition".into());
        config
            .watermark_extra
            .insert("idle_advance".into(), "wall_clock".into());
    }
    // the windows that must close, with room to spare at the boundary
    let expected: BTreeMap<String, WindowResult> = if scoped {
        // partition 1's own windows: all of them (its event time follows the wall clock)
        expected_windows(&config.windows, &events[1])
    } else {
        // every window that ends well before partition 0's watermark, across both partitions
        let all: Vec<Event> = events.iter().flatten().cloned().collect();
        let watermark = workload::max_ts(&events[..1]) - DISORDER_MS;
        expected_windows(&config.windows, &all)
            .into_iter()
            .filter(|(_, w)| w.end <= watermark - 15_000)
            .collect()
    };
    // without idleness, partition 1 (quiet at 5 s) holds back every window ending after its
    // own watermark
    let held = workload::max_ts(&events[1..]) - DISORDER_MS;
    ensure!(
        expected.values().any(|w| w.end > held),
        "the test would not tell idleness from its absence"
    );

    let mut reader = OutputReader::new(broker, &output)?;
    let mut service = Service::new(name, config)?;
    service.start()?;
    service.wait_ready(READY_TIMEOUT)?;
    let complete = reader.poll_until(COMPLETE_TIMEOUT, |m| contains_all(&expected, m));
    let idle = service
        .scrape()?
        .sum("checkpointer_partitions_idle")
        .unwrap_or(0.0);
    let logged = service
        .log_since_start()
        .contains("it no longer holds the watermark back");
    let status = service.sigterm(STOP_TIMEOUT)?;
    reader.drain(Duration::from_secs(1), Duration::from_secs(10));
    ensure!(
        complete,
        "{} of {} windows that must close were emitted after {COMPLETE_TIMEOUT:?}\n{}",
        of(&expected, reader.messages())
            .iter()
            .map(|m| m.key.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        expected.len(),
        service.log_tail(30)
    );
    // exact, and sent once
    let summary = check_output(&expected, &of(&expected, reader.messages()))?;
    ensure!(
        summary.duplicates == 0,
        "{} windows sent twice",
        summary.duplicates
    );
    ensure!(idle >= 1.0, "checkpointer_partitions_idle is {idle}");
    ensure!(logged, "no log line says a partition went idle");
    ensure!(status.code() == Some(0), "exit after SIGTERM: {status}");
    Ok(())
}
