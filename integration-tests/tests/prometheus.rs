//! Prometheus for real: a Prometheus server (Debian's `prometheus` package) runs the repo's
//! scrape configuration and alert rules (`deploy/prometheus`), its target pointed at a running
//! checkpointer on the Kafka broker. Through Prometheus's HTTP query API: the target is up, records
//! consumed increase between two scrapes, the last checkpoint is younger than twice the
//! checkpoint interval, and every alert rule is loaded, evaluates without error and raises
//! nothing on a healthy instance (not even pending, but for a transient WatermarkStalled).
//! `promtool check metrics` passes on the service's `/metrics`.
//!
//! Needs `/usr/bin/prometheus` and `/usr/bin/promtool` (or `PROMETHEUS_BIN`, `PROMTOOL_BIN`);
//! `scripts/test.sh` installs them.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use integration_tests::cli::program;
use integration_tests::http;
use integration_tests::lifecycle::{config, wait_consumed, Input, READY_TIMEOUT};
use integration_tests::metrics::CHECKPOINTS_COMPLETED;
use integration_tests::{free_addr, poll, tail_file, workspace_dir, KillOnDrop};
use integration_tests::{test_seed, unique_name, Broker, Service};

const INTERVAL: Duration = Duration::from_secs(2);
const PROMETHEUS_TIMEOUT: Duration = Duration::from_secs(60);
const POLL_EVERY: Duration = Duration::from_millis(500);

#[test]
fn prometheus_scrapes_the_service_with_the_repos_configuration() {
    let seed = test_seed("prometheus");
    if let Err(err) = run(seed) {
        panic!("{err:#}\n(prometheus, seed {seed})");
    }
}

/// The repo's `prometheus.yml`, scraping `target` every second and evaluating rules every
/// second, with the rule file by absolute path.
fn scrape_config(target: SocketAddr) -> Result<String> {
    let dir = workspace_dir().join("deploy/prometheus");
    let text = std::fs::read_to_string(dir.join("prometheus.yml")).context("prometheus.yml")?;
    let mut out = text.clone();
    for (from, to) in [
        ("\"checkpointer:9180\"".to_string(), format!("\"{target}\"")),
        (
            "scrape_interval: 5s".to_string(),
            "scrape_interval: 1s".to_string(),
        ),
        (
            "evaluation_interval: 15s".to_string(),
            "evaluation_interval: 1s".to_string(),
        ),
        (
            "- alerts.yml".to_string(),
            format!("- {}", dir.join("alerts.yml").display()),
        ),
    ] {
        ensure!(
            out.contains(&from),
            "deploy/prometheus/prometheus.yml no longer contains {from:?}; update this test"
        );
        out = out.replace(&from, &to);
    }
    Ok(out)
}

struct Prometheus {
    /// Killed when the test ends.
    _child: KillOnDrop,
    addr: SocketAddr,
    log: PathBuf,
}

impl Prometheus {
    fn start(dir: &Path, target: SocketAddr) -> Result<Prometheus> {
        let addr = free_addr()?;
        let config = dir.join("prometheus.yml");
        std::fs::write(&config, scrape_config(target)?)?;
        let log = dir.join("prometheus.log");
        let child = Command::new(program(
            "PROMETHEUS_BIN",
            "/usr/bin/prometheus",
            "prometheus",
        )?)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("starting prometheus")?;
        Ok(Prometheus {
            _child: KillOnDrop::new(child),
            addr,
            log,
        })
    }

    fn log_tail(&self) -> String {
        tail_file(&self.log, 20)
    }

    fn api(&self, path: &str) -> Result<serde_json::Value> {
        let resp = http::get(self.addr, path, Duration::from_secs(5))?;
        ensure!(resp.status == 200, "GET {path}: {resp:?}");
        let body = resp.json()?;
        ensure!(body["status"] == "success", "GET {path}: {body}");
        Ok(body["data"].clone())
    }

    /// The value of each series an instant query returns.
    fn query(&self, promql: &str) -> Result<Vec<f64>> {
        let data = self.api(&format!("/api/v1/query?query={}", encode(promql)))?;
        data["result"]
            .as_array()
            .context("result")?
            .iter()
            .map(|r| {
                r["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .with_context(|| format!("sample of {promql}: {r}"))
            })
            .collect()
    }

    /// The single value of `promql`, waiting until there is one that `ok` accepts.
    fn wait_value(&self, promql: &str, ok: impl Fn(f64) -> bool) -> Result<f64> {
        let mut last = String::new();
        let value = poll(PROMETHEUS_TIMEOUT, POLL_EVERY, || {
            match self.query(promql) {
                Ok(values) => {
                    if let [v] = values[..] {
                        if ok(v) {
                            return Ok(Some(v));
                        }
                    }
                    last = format!("{values:?}");
                }
                Err(e) => last = format!("{e:#}"),
            }
            Ok(None)
        })?;
        match value {
            Some(v) => Ok(v),
            None => bail!(
                "{promql} never gave an acceptable value (last: {last})\nprometheus log:\n{}",
                self.log_tail()
            ),
        }
    }
}

/// Percent-encoding of a query parameter value.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn run(seed: u64) -> Result<()> {
    let broker = Broker::shared()?;
    let mut input = Input::new(broker, "prom-in", seed)?;
    let output = unique_name("prom-out");
    broker.create_topic(&output, 2)?;
    let cfg = config(broker, &input.topic, &output, "prom", INTERVAL);
    let mut service = Service::new("prometheus", cfg)?;
    let mut produced = input.batch(50)?;
    service.start()?;
    service.wait_ready(READY_TIMEOUT)?;
    wait_consumed(&service, produced)?;
    service.wait_metrics("a completed checkpoint", Duration::from_secs(30), |m| {
        m.sum(CHECKPOINTS_COMPLETED).unwrap_or(0.0) >= 1.0
    })?;

    // the exposition passes promtool's checks (format and naming)
    let exposition = service.metrics()?;
    let mut promtool = Command::new(program("PROMTOOL_BIN", "/usr/bin/promtool", "prometheus")?)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting promtool")?;
    promtool
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(exposition.as_bytes())?;
    let checked = promtool.wait_with_output()?;
    ensure!(
        checked.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    let dir = tempfile::tempdir()?;
    let target = service.http_addr().context("service address")?;
    let prometheus = Prometheus::start(dir.path(), target)?;
    prometheus.wait_value(r#"up{job="checkpointer"}"#, |v| v == 1.0)?;

    // records consumed, as Prometheus scraped them, grow with the input
    let before = prometheus.wait_value("checkpointer_records_consumed_total", |v| {
        v >= produced as f64
    })?;
    produced += input.batch(50)?;
    wait_consumed(&service, produced)?;
    let after = prometheus.wait_value("checkpointer_records_consumed_total", |v| {
        v >= produced as f64
    })?;
    ensure!(
        after > before,
        "records consumed did not increase: {before} then {after}"
    );

    // the last checkpoint, at the time of the scrape, is younger than twice the interval
    let interval =
        prometheus.wait_value("checkpointer_checkpoint_interval_seconds", |v| v > 0.0)?;
    ensure!(
        (interval - INTERVAL.as_secs_f64()).abs() < 1e-9,
        "interval {interval}"
    );
    let age = prometheus.wait_value(
        "timestamp(checkpointer_checkpoint_last_completed_timestamp_seconds) - checkpointer_checkpoint_last_completed_timestamp_seconds",
        |v| v >= 0.0,
    )?;
    ensure!(
        age < 2.0 * interval,
        "last checkpoint {age} s old at the scrape, interval {interval} s"
    );
    prometheus.wait_value("checkpointer_ready", |v| v == 1.0)?;

    // every rule of the repo's alert file is loaded and evaluates cleanly against real series
    let rules = std::fs::read_to_string(workspace_dir().join("deploy/prometheus/alerts.yml"))?;
    let expected = rules.matches("- alert: ").count();
    let mut last = String::new();
    let all_evaluated = poll(PROMETHEUS_TIMEOUT, POLL_EVERY, || {
        let data = prometheus.api("/api/v1/rules")?;
        let loaded: Vec<&serde_json::Value> = data["groups"]
            .as_array()
            .context("groups")?
            .iter()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .collect();
        let evaluated = loaded
            .iter()
            .filter(|r| r["health"] == "ok" && r["lastEvaluation"] != "0001-01-01T00:00:00Z")
            .count();
        if loaded.len() == expected && evaluated == expected {
            return Ok(Some(()));
        }
        let broken: Vec<String> = loaded
            .iter()
            .filter(|r| r["health"] == "err")
            .map(|r| format!("{}: {}", r["name"], r["lastError"]))
            .collect();
        ensure!(broken.is_empty(), "rules failing to evaluate: {broken:?}");
        last = format!(
            "{} of {expected} rules loaded, {evaluated} evaluated",
            loaded.len()
        );
        Ok(None)
    })?;
    ensure!(all_evaluated.is_some(), "{last}\n{}", prometheus.log_tail());
    // a healthy instance raises nothing, not even a pending alert (most rules wait minutes
    // before firing; pending shows their condition already holds). WatermarkStalled may be
    // pending for a moment: a scrape can see records counted before the watermark gauge
    // catches up, which its `for: 5m` is there to ride out; it must not fire.
    let query = r#"ALERTS{alertname!="WatermarkStalled"} or ALERTS{alertstate="firing"}"#;
    let raised = prometheus.api(&format!("/api/v1/query?query={}", encode(query)))?;
    ensure!(
        raised["result"].as_array().is_some_and(Vec::is_empty),
        "alerts raised on a healthy instance: {raised}"
    );
    let status = service.sigterm(Duration::from_secs(30))?;
    ensure!(status.success(), "service exit: {status}");
    Ok(())
}
