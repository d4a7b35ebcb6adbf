//! The admin API lets nobody change a running instance without its token: with
//! `http.admin_token_file` set, a savepoint, a deletion or a stop without the token, with a
//! wrong one, or from another site's page is refused (401) and nothing happens; with the token
//! (over HTTP, and through the CLI by flag and by environment) they go ahead. Without a token
//! configured, a cross-site request is still refused, as is one addressed by a name (DNS
//! rebinding). Reading stays open.

use std::ffi::OsStr;
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use integration_tests::{cli, unique_name, Broker, Producer, Service, ServiceConfig};
use integration_tests::{workload, workload::StreamShape, workload::START_TS};
use rand::rngs::StdRng;
use rand::SeedableRng;

const READY_TIMEOUT: Duration = Duration::from_secs(90);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
const REFUSED: &str = "checkpointer_admin_requests_refused_total";
const TOKEN: &str = "4f1c0e2a9b7d46e8a3c5f0b1d2e3f4a5";

#[test]
fn nothing_changes_without_the_admin_token() {
    let broker = Broker::shared().unwrap_or_else(|err| panic!("{err:#}"));
    if let Err(err) = with_token(broker) {
        panic!("{err:#}");
    }
}

#[test]
fn a_cross_site_request_is_refused_even_without_a_token_configured() {
    let broker = Broker::shared().unwrap_or_else(|err| panic!("{err:#}"));
    if let Err(err) = without_token(broker) {
        panic!("{err:#}");
    }
}

/// A started service reading a small topic, with `http` keys added.
fn started(broker: &Broker, name: &str, http: &[(&str, String)]) -> Result<Service> {
    let input = unique_name(&format!("{name}-in"));
    let output = unique_name(&format!("{name}-out"));
    broker.create_topic(&input, 1)?;
    broker.create_topic(&output, 1)?;
    let events = workload::generate(
        &mut StdRng::seed_from_u64(7),
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
    for (key, value) in http {
        config.http_extra.insert((*key).to_owned(), value.clone());
    }
    let mut service = Service::new(name, config)?;
    service.start()?;
    service.wait_ready(READY_TIMEOUT)?;
    Ok(service)
}

fn savepoint_names(service: &Service) -> Result<Vec<String>> {
    let list = service.get_json("/api/savepoints")?;
    Ok(list["savepoints"]
        .as_array()
        .context("savepoints")?
        .iter()
        .filter_map(|s| s["name"].as_str().map(String::from))
        .collect())
}

fn refused(service: &Service) -> Result<std::collections::BTreeMap<String, f64>> {
    Ok(service.scrape()?.by_label(REFUSED, "reason"))
}

fn with_token(broker: &Broker) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, format!("{TOKEN}\n"))?;
    let token_path = token_file.to_str().context("utf-8 path")?.to_owned();
    let mut service = started(
        broker,
        "admin_token",
        &[("admin_token_file", format!("{token_path:?}"))],
    )?;
    let bearer = format!("Bearer {TOKEN}");
    let wrong = format!("Bearer {}", TOKEN.replace('4', "5"));

    // without the token, with a wrong one, from another site with the right one: 401 each,
    // and no savepoint made
    let attempts: [(&str, Vec<(&str, &str)>); 3] = [
        ("missing_token", vec![]),
        ("wrong_token", vec![("Authorization", wrong.as_str())]),
        (
            "cross_site",
            vec![
                ("Authorization", bearer.as_str()),
                ("Origin", "https://attacker.example"),
                ("Sec-Fetch-Site", "cross-site"),
            ],
        ),
    ];
    for (why, headers) in &attempts {
        let r = service.send("POST", "/api/savepoints?name=refused", headers)?;
        ensure!(
            r.status == 401,
            "{why}: POST answered {}: {}",
            r.status,
            r.body
        );
        ensure!(r.body.contains("refused"), "{why}: {}", r.body);
    }
    ensure!(
        savepoint_names(&service)?.is_empty(),
        "a refused request made a savepoint: {:?}",
        savepoint_names(&service)?
    );

    // with it: made
    let made = service.send(
        "POST",
        "/api/savepoints?name=kept",
        &[("Authorization", &bearer)],
    )?;
    ensure!(
        made.status == 201,
        "with the token: {} {}",
        made.status,
        made.body
    );
    ensure!(savepoint_names(&service)? == vec!["kept".to_string()]);

    // a deletion and a stop without the token: refused, nothing happens
    let r = service.delete("/api/savepoints/kept")?;
    ensure!(r.status == 401, "DELETE answered {}: {}", r.status, r.body);
    ensure!(savepoint_names(&service)? == vec!["kept".to_string()]);
    let r = service.post("/api/stop")?;
    ensure!(r.status == 401, "stop answered {}: {}", r.status, r.body);
    std::thread::sleep(Duration::from_secs(2));
    ensure!(service.is_running()?, "a refused stop stopped the service");
    ensure!(service.readyz()? == 200, "not ready after a refused stop");

    // the CLI: refused without the token, naming the status; accepted with it, by flag and by
    // the variable the service reads
    let url = service.url()?;
    let out = cli::run(["savepoint", "--url", &url, "--name", "cli"])?;
    ensure!(out.code() == Some(1), "{}", out.describe());
    ensure!(out.stderr.contains("401"), "{}", out.describe());
    cli::run([
        "savepoint",
        "--url",
        &url,
        "--name",
        "cli",
        "--admin-token-file",
        &token_path,
    ])?
    .ok()?;
    cli::run_with_env(
        ["savepoint", "delete", "kept", "--url", &url],
        &[(
            "CHECKPOINTER_HTTP__ADMIN_TOKEN_FILE",
            OsStr::new(&token_path),
        )],
    )?
    .ok()?;
    ensure!(
        savepoint_names(&service)? == vec!["cli".to_string()],
        "savepoints after the CLI: {:?}",
        savepoint_names(&service)?
    );

    // every refusal counted by reason (the CLI's without the token is the fourth missing one)
    let counts = refused(&service)?;
    for (reason, expected) in [
        ("missing_token", 4.0),
        ("wrong_token", 1.0),
        ("cross_site", 1.0),
    ] {
        ensure!(
            counts.get(reason) == Some(&expected),
            "refusals by reason: {counts:?}"
        );
    }
    ensure!(
        !std::fs::read_to_string(service.log_path())?.contains(TOKEN),
        "the token is in the log"
    );

    // the CLI's stop with the token stops it cleanly
    cli::run(["stop", "--url", &url, "--admin-token-file", &token_path])?.ok()?;
    let status = service.wait_exit(STOP_TIMEOUT)?;
    ensure!(status.code() == Some(0), "exit after the stop: {status}");
    Ok(())
}

fn without_token(broker: &Broker) -> Result<()> {
    let mut service = started(broker, "admin_cross_site", &[])?;
    // what a page of another site makes a browser send: refused, and the service runs on
    for headers in [
        vec![
            ("Origin", "https://attacker.example"),
            ("Sec-Fetch-Site", "cross-site"),
        ],
        // a browser that sends only the origin
        vec![("Origin", "http://attacker.example")],
        // a page whose own name was pointed at this host (DNS rebinding): same-origin
        vec![
            ("Host", "rebind.attacker.example:9180"),
            ("Origin", "http://rebind.attacker.example:9180"),
            ("Sec-Fetch-Site", "same-origin"),
        ],
    ] {
        let r = service.send("POST", "/api/stop", &headers)?;
        ensure!(r.status == 401, "{headers:?}: {} {}", r.status, r.body);
        let r = service.send("POST", "/api/savepoints?name=csrf", &headers)?;
        ensure!(r.status == 401, "{headers:?}: {} {}", r.status, r.body);
    }
    std::thread::sleep(Duration::from_secs(2));
    ensure!(
        service.is_running()?,
        "a cross-site stop stopped the service"
    );
    ensure!(savepoint_names(&service)?.is_empty());
    ensure!(
        refused(&service)?.get("cross_site") == Some(&6.0),
        "refusals: {:?}",
        refused(&service)?
    );
    // a client that is no browser needs nothing on loopback without a token
    let r = service.post("/api/savepoints?name=local")?;
    ensure!(r.status == 201, "{} {}", r.status, r.body);
    ensure!(savepoint_names(&service)? == vec!["local".to_string()]);
    let status = service.sigterm(STOP_TIMEOUT)?;
    ensure!(status.code() == Some(0), "exit after SIGTERM: {status}");
    Ok(())
}
