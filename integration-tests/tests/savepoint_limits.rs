//! Savepoint requests cannot fill the disk: past `checkpoint.savepoints_per_minute` they are
//! refused (429), and only the newest `checkpoint.retained_unnamed_savepoints` unnamed
//! savepoints are kept; named ones stay until deleted. The kept ones restore.

use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use integration_tests::{unique_name, workload, Broker, Producer, Service, ServiceConfig};
use integration_tests::{workload::StreamShape, workload::START_TS};
use rand::rngs::StdRng;
use rand::SeedableRng;

const READY_TIMEOUT: Duration = Duration::from_secs(90);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn savepoint_requests_are_bounded_and_only_the_newest_unnamed_ones_kept() {
    let broker = Broker::shared().unwrap_or_else(|err| panic!("{err:#}"));
    if let Err(err) = run(broker) {
        panic!("{err:#}");
    }
}

fn savepoint_names(service: &Service) -> Result<Vec<String>> {
    let list = service.get_json("/api/savepoints")?;
    let mut names: Vec<String> = list["savepoints"]
        .as_array()
        .context("savepoints")?
        .iter()
        .filter_map(|s| s["name"].as_str().map(String::from))
        .collect();
    names.sort();
    Ok(names)
}

fn run(broker: &Broker) -> Result<()> {
    let input = unique_name("savepoint-limits-in");
    let output = unique_name("savepoint-limits-out");
    broker.create_topic(&input, 1)?;
    broker.create_topic(&output, 1)?;
    let events = workload::generate(
        &mut StdRng::seed_from_u64(11),
        StreamShape {
            partitions: 1,
            records_per_partition: 50,
            keys: 4,
            start_ts: START_TS,
        },
    );
    let records: Vec<_> = events.iter().map(|p| workload::valid_records(p)).collect();
    Producer::new(broker)?.send_partitions(&input, &records)?;
    let mut config = ServiceConfig::new(broker, &input, &output);
    config
        .checkpoint_extra
        .insert("retained_unnamed_savepoints".into(), "2".into());
    config
        .checkpoint_extra
        .insert("savepoints_per_minute".into(), "4".into());
    let mut service = Service::new("savepoint_limits", config)?;
    service.start()?;
    service.wait_ready(READY_TIMEOUT)?;

    // four within the minute: three unnamed and one named, each answered once durable
    let mut unnamed = Vec::new();
    for name in [None, Some("before-upgrade"), None, None] {
        let path = match name {
            Some(n) => format!("/api/savepoints?name={n}"),
            None => "/api/savepoints".to_string(),
        };
        let r = service.post(&path)?;
        ensure!(r.status == 201, "POST {path}: {} {}", r.status, r.body);
        if name.is_none() {
            unnamed.push(
                r.json()?["name"]
                    .as_str()
                    .context("savepoint name")?
                    .to_string(),
            );
        }
    }
    // the fifth: refused, nothing made
    let refused = service.post("/api/savepoints?name=fifth")?;
    ensure!(
        refused.status == 429 && refused.body.contains("checkpoint.savepoints_per_minute"),
        "the fifth savepoint in a minute: {} {}",
        refused.status,
        refused.body
    );
    // a given name of the unnamed form: refused
    let reserved = service.post("/api/savepoints?name=savepoint-1")?;
    ensure!(
        reserved.status == 400,
        "{} {}",
        reserved.status,
        reserved.body
    );

    // the two newest unnamed ones and the named one
    let mut expected = vec!["before-upgrade".to_string()];
    expected.extend(unnamed[1..].iter().cloned());
    expected.sort();
    let names = savepoint_names(&service)?;
    ensure!(
        names == expected,
        "savepoints kept: {names:?}, expected {expected:?} (taken unnamed: {unnamed:?})"
    );
    let status = service.sigterm(STOP_TIMEOUT)?;
    ensure!(status.code() == Some(0), "exit after SIGTERM: {status}");

    // the oldest unnamed one is gone from the store, the kept ones restore
    let out = integration_tests::cli::run([
        "savepoint",
        "list",
        "--dir",
        service.state_dir().to_str().context("utf-8 dir")?,
    ])?
    .ok()?;
    ensure!(
        !out.stdout.contains(&format!("\"{}\"", unnamed[0])),
        "{} is still in the store: {}",
        unnamed[0],
        out.stdout
    );
    service.config_mut().extra_args =
        vec!["--restore-from".into(), format!("savepoint:{}", unnamed[2])];
    service.start()?;
    service.wait_ready(READY_TIMEOUT)?;
    let status = service.sigterm(STOP_TIMEOUT)?;
    ensure!(
        status.code() == Some(0),
        "restoring {}: exit {status}\n{}",
        unnamed[2],
        service.log_tail(30)
    );
    Ok(())
}
