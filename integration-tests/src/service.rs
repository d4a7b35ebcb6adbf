//! Running the real `checkpointer` binary: config, start, readiness, signals, metrics, logs.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use nix::unistd::Pid;
use tempfile::TempDir;

use crate::http::TIMEOUT as HTTP_TIMEOUT;
use crate::metrics::Metrics;
use crate::model::{contract_windows, human, WindowSpec};
use crate::process::{run_command, KillOnDrop, Signal};
use crate::{copy_dir, free_addr, http, keep_temp_dirs, poll, unique_name, workspace_dir, Broker};

const LOG_TAIL_LINES: usize = 80;

/// What goes into the service's YAML config. `new` fills in the contract's example values;
/// tests change fields before creating the [`Service`].
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    pub brokers: String,
    pub group_id: String,
    pub topics: Vec<String>,
    pub output_topic: String,
    pub key_pointer: String,
    pub value_pointer: String,
    pub timestamp_pointer: String,
    pub windows: Vec<WindowSpec>,
    pub aggregates: Vec<String>,
    pub max_out_of_orderness: Duration,
    pub allowed_lateness: Duration,
    pub checkpoint_interval: Duration,
    /// `exactly_once` or `at_least_once`.
    pub mode: String,
    /// librdkafka settings passed through as `kafka.options`.
    pub kafka_options: BTreeMap<String, String>,
    /// `kafka.instance_id` (static group membership), if set.
    pub instance_id: Option<String>,
    /// `kafka.auto_offset_reset`: `earliest` (the default here) or `latest`.
    pub auto_offset_reset: String,
    /// More keys of the `kafka:` section, values verbatim YAML.
    pub kafka_extra: BTreeMap<String, String>,
    /// More keys of the `checkpoint:` section, `key -> value` with the value written verbatim
    /// as YAML (`"3"`, `"delete"`; quote strings that need it yourself).
    pub checkpoint_extra: BTreeMap<String, String>,
    /// Arguments appended to `checkpointer run --config PATH` (e.g. `--restore-from 7`).
    pub extra_args: Vec<String>,
    /// Keys of a `state:` section (written when not empty), values verbatim YAML.
    pub state_extra: BTreeMap<String, String>,
    /// More keys of the `http:` section (besides `listen`), values verbatim YAML.
    pub http_extra: BTreeMap<String, String>,
    /// More keys of the `watermark:` section, values verbatim YAML.
    pub watermark_extra: BTreeMap<String, String>,
    /// More keys of the `input:` section, values verbatim YAML.
    pub input_extra: BTreeMap<String, String>,
    /// More keys of the `output:` section, values verbatim YAML.
    pub output_extra: BTreeMap<String, String>,
    /// Environment variables of the service process (not part of the YAML).
    pub env: BTreeMap<String, String>,
}

impl ServiceConfig {
    pub fn new(broker: &Broker, input_topic: &str, output_topic: &str) -> Self {
        ServiceConfig {
            brokers: broker.bootstrap().to_owned(),
            group_id: unique_name("checkpointer"),
            topics: vec![input_topic.to_owned()],
            output_topic: output_topic.to_owned(),
            key_pointer: "/user".to_owned(),
            value_pointer: "/amount".to_owned(),
            timestamp_pointer: "/ts".to_owned(),
            windows: contract_windows(),
            aggregates: ["count", "sum", "min", "max", "mean"]
                .map(String::from)
                .to_vec(),
            max_out_of_orderness: Duration::from_secs(2),
            allowed_lateness: Duration::ZERO,
            checkpoint_interval: Duration::from_millis(500),
            mode: "exactly_once".to_owned(),
            kafka_options: BTreeMap::new(),
            instance_id: None,
            auto_offset_reset: "earliest".to_owned(),
            kafka_extra: BTreeMap::new(),
            checkpoint_extra: BTreeMap::new(),
            extra_args: Vec::new(),
            state_extra: BTreeMap::new(),
            http_extra: BTreeMap::new(),
            watermark_extra: BTreeMap::new(),
            input_extra: BTreeMap::new(),
            output_extra: BTreeMap::new(),
            env: BTreeMap::new(),
        }
    }

    /// `state.scope: partition` with the changelog topic `changelog`: each partition's state
    /// moves with the partition between instances.
    pub fn partition_scoped(mut self, changelog: &str) -> Self {
        self.state_extra
            .insert("scope".to_owned(), "partition".to_owned());
        self.state_extra
            .insert("changelog_topic".to_owned(), format!("{changelog:?}"));
        self
    }

    /// The YAML document; strings are written as JSON strings, which YAML reads verbatim.
    pub fn to_yaml(&self, state_dir: &Path, http_listen: SocketAddr) -> String {
        let q = |s: &str| serde_json::Value::from(s).to_string();
        let list = |items: &[String]| items.iter().map(|s| q(s)).collect::<Vec<_>>().join(", ");
        let mut yaml = String::new();
        yaml.push_str("kafka:\n");
        yaml.push_str(&format!("  brokers: {}\n", q(&self.brokers)));
        yaml.push_str(&format!("  group_id: {}\n", q(&self.group_id)));
        yaml.push_str(&format!("  topics: [{}]\n", list(&self.topics)));
        yaml.push_str(&format!(
            "  auto_offset_reset: {}\n",
            self.auto_offset_reset
        ));
        if let Some(id) = &self.instance_id {
            yaml.push_str(&format!("  instance_id: {}\n", q(id)));
        }
        for (key, value) in &self.kafka_extra {
            yaml.push_str(&format!("  {key}: {value}\n"));
        }
        if !self.kafka_options.is_empty() {
            yaml.push_str("  options:\n");
            for (key, value) in &self.kafka_options {
                yaml.push_str(&format!("    {}: {}\n", q(key), q(value)));
            }
        }
        yaml.push_str("input:\n");
        yaml.push_str(&format!("  key: {}\n", q(&self.key_pointer)));
        yaml.push_str(&format!("  value: {}\n", q(&self.value_pointer)));
        yaml.push_str(&format!("  timestamp: {}\n", q(&self.timestamp_pointer)));
        for (key, value) in &self.input_extra {
            yaml.push_str(&format!("  {key}: {value}\n"));
        }
        yaml.push_str("windows:\n");
        for window in &self.windows {
            yaml.push_str(&format!("  - {}\n", window.to_yaml()));
        }
        yaml.push_str(&format!("aggregates: [{}]\n", self.aggregates.join(", ")));
        yaml.push_str("watermark:\n");
        yaml.push_str(&format!(
            "  max_out_of_orderness: {}\n",
            human(self.max_out_of_orderness)
        ));
        yaml.push_str(&format!(
            "  allowed_lateness: {}\n",
            human(self.allowed_lateness)
        ));
        for (key, value) in &self.watermark_extra {
            yaml.push_str(&format!("  {key}: {value}\n"));
        }
        yaml.push_str("output:\n");
        yaml.push_str(&format!("  topic: {}\n", q(&self.output_topic)));
        for (key, value) in &self.output_extra {
            yaml.push_str(&format!("  {key}: {value}\n"));
        }
        yaml.push_str("checkpoint:\n");
        yaml.push_str(&format!("  dir: {}\n", q(&state_dir.to_string_lossy())));
        yaml.push_str(&format!(
            "  interval: {}\n",
            human(self.checkpoint_interval)
        ));
        yaml.push_str(&format!("  mode: {}\n", self.mode));
        for (key, value) in &self.checkpoint_extra {
            yaml.push_str(&format!("  {key}: {value}\n"));
        }
        if !self.state_extra.is_empty() {
            yaml.push_str("state:\n");
            for (key, value) in &self.state_extra {
                yaml.push_str(&format!("  {key}: {value}\n"));
            }
        }
        yaml.push_str("http:\n");
        yaml.push_str(&format!("  listen: {}\n", q(&http_listen.to_string())));
        for (key, value) in &self.http_extra {
            yaml.push_str(&format!("  {key}: {value}\n"));
        }
        yaml
    }
}

/// The service binary: `CHECKPOINTER_BIN`, else `<target>/debug/checkpointer`, built with
/// `cargo build --bin checkpointer` (once per test process) when missing.
pub fn service_bin() -> Result<PathBuf> {
    static BIN: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| locate_or_build().map_err(|err| format!("{err:#}")))
        .clone()
        .map_err(|err| anyhow!(err))
}

fn locate_or_build() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("CHECKPOINTER_BIN") {
        let bin = PathBuf::from(bin);
        if !bin.is_file() {
            bail!("CHECKPOINTER_BIN={} is not a file", bin.display());
        }
        return Ok(bin);
    }
    let workspace = workspace_dir();
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace.join(dir),
        None => workspace.join("target"),
    };
    let bin = target.join("debug").join("checkpointer");
    if !bin.is_file() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        eprintln!(
            "[service] {} missing: cargo build --bin checkpointer",
            bin.display()
        );
        let status = Command::new(cargo)
            .args(["build", "--bin", "checkpointer"])
            .current_dir(&workspace)
            .status()
            .context("running cargo build --bin checkpointer")?;
        if !status.success() || !bin.is_file() {
            bail!("cargo build --bin checkpointer failed ({status})");
        }
    }
    Ok(bin)
}

/// The `checkpointer` binary under test, with its own temp dir holding the config, the state
/// dir (kept across restarts) and `service.log` (stdout and stderr of every run, appended).
///
/// Dropping it kills a running process; when the test is panicking, or the process was never
/// stopped by the test (it returned an error early), it also prints the config and the end of
/// the log and keeps the temp dir.
pub struct Service {
    name: String,
    config: ServiceConfig,
    bin: PathBuf,
    dir: Option<TempDir>,
    dir_path: PathBuf,
    child: Option<KillOnDrop>,
    http: Option<SocketAddr>,
    starts: u32,
}

impl Service {
    /// Prepares a service (nothing runs until [`Service::start`]).
    pub fn new(name: &str, config: ServiceConfig) -> Result<Self> {
        let bin = service_bin()?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("checkpointer-{name}-"))
            .tempdir()
            .context("creating the service's temp dir")?;
        let dir_path = dir.path().to_owned();
        Ok(Service {
            name: name.to_owned(),
            config,
            bin,
            dir: Some(dir),
            dir_path,
            child: None,
            http: None,
            starts: 0,
        })
    }

    pub fn config(&self) -> &ServiceConfig {
        &self.config
    }

    /// The config to use from the next start on (the state dir stays).
    pub fn config_mut(&mut self) -> &mut ServiceConfig {
        &mut self.config
    }

    /// The service's own temp dir (config, log, state dir); a place for a test's other files.
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    /// The checkpoint directory, the same for every start.
    pub fn state_dir(&self) -> PathBuf {
        self.dir_path.join("state")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir_path.join("checkpointer.yaml")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir_path.join("service.log")
    }

    /// The admin HTTP address of the current (or last) run.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http
    }

    /// How many times the process was started.
    pub fn starts(&self) -> u32 {
        self.starts
    }

    /// Writes the config (with a fresh HTTP port) and runs `checkpointer run --config PATH`
    /// with `RUST_LOG=info` (or the caller's `RUST_LOG`).
    pub fn start(&mut self) -> Result<()> {
        if self.is_running()? {
            bail!("{}: already running", self.name);
        }
        let http = free_addr()?;
        let yaml = self.config.to_yaml(&self.state_dir(), http);
        std::fs::write(self.config_path(), &yaml)
            .with_context(|| format!("writing {}", self.config_path().display()))?;

        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .with_context(|| format!("opening {}", self.log_path().display()))?;
        writeln!(log, "===== start #{} (http {http}) =====", self.starts)?;
        let stderr = log.try_clone()?;

        let mut command = run_command(&self.bin, &self.config_path());
        command
            .args(&self.config.extra_args)
            .current_dir(&self.dir_path)
            .stdout(log)
            .stderr(stderr);
        let rust_log = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
        command.env("RUST_LOG", rust_log);
        command.envs(&self.config.env);
        let child = command
            .spawn()
            .with_context(|| format!("spawning {}", self.bin.display()))?;
        eprintln!(
            "[service {}] start #{} pid {} http {http}",
            self.name,
            self.starts,
            child.id()
        );
        self.child = Some(KillOnDrop::new(child));
        self.http = Some(http);
        Ok(())
    }

    /// Replaces this service's state dir with a copy of `source` (another service's stopped
    /// state dir), e.g. to restore one store in several ways.
    pub fn copy_state_from(&mut self, source: &Path) -> Result<()> {
        if self.is_running()? {
            bail!(
                "{}: cannot replace the state dir of a running service",
                self.name
            );
        }
        let target = self.state_dir();
        if target.exists() {
            std::fs::remove_dir_all(&target)
                .with_context(|| format!("removing {}", target.display()))?;
        }
        copy_dir(source, &target)
    }

    /// Waits up to `timeout` for the process to exit by itself (after `POST /api/stop`, a CLI
    /// `stop`, or a start that must fail); returns the exit status. On timeout the process is
    /// killed and an error returned.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.reap(
            timeout,
            "exited by itself",
            &format!("did not exit within {timeout:?}"),
        )
    }

    /// Waits up to `timeout` for the process to exit and reaps it (logging `exited` and the
    /// time taken); on timeout kills it and fails with `timed_out` and the log's end.
    fn reap(&mut self, timeout: Duration, exited: &str, timed_out: &str) -> Result<ExitStatus> {
        let started = Instant::now();
        match self.child()?.wait_exit(timeout)? {
            Some(status) => {
                self.child = None;
                eprintln!(
                    "[service {}] {exited} after {:.1?}: {status}",
                    self.name,
                    started.elapsed()
                );
                Ok(status)
            }
            None => {
                self.sigkill()?;
                bail!(
                    "{}: {timed_out} (killed)\n{}",
                    self.name,
                    self.log_tail(LOG_TAIL_LINES)
                );
            }
        }
    }

    /// The process of the current run, an error naming the service when there is none.
    fn child(&mut self) -> Result<&mut KillOnDrop> {
        self.child
            .as_mut()
            .ok_or_else(|| anyhow!("{}: not running", self.name))
    }

    fn addr(&self) -> Result<SocketAddr> {
        self.http
            .ok_or_else(|| anyhow!("{}: not started", self.name))
    }

    /// `http://ADDR` of the current (or last) run, for the CLI's `--url`.
    pub fn url(&self) -> Result<String> {
        Ok(format!("http://{}", self.addr()?))
    }

    /// `GET path` on the admin listener.
    pub fn get(&self, path: &str) -> Result<http::Response> {
        http::get(self.addr()?, path, HTTP_TIMEOUT)
            .with_context(|| format!("{}: GET {path}", self.name))
    }

    /// `POST path` on the admin listener (empty body).
    pub fn post(&self, path: &str) -> Result<http::Response> {
        http::post(self.addr()?, path, HTTP_TIMEOUT)
            .with_context(|| format!("{}: POST {path}", self.name))
    }

    /// `METHOD path` on the admin listener with more request headers (empty body).
    pub fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<http::Response> {
        http::send(self.addr()?, method, path, headers, HTTP_TIMEOUT)
            .with_context(|| format!("{}: {method} {path}", self.name))
    }

    /// `DELETE path` on the admin listener.
    pub fn delete(&self, path: &str) -> Result<http::Response> {
        http::delete(self.addr()?, path, HTTP_TIMEOUT)
            .with_context(|| format!("{}: DELETE {path}", self.name))
    }

    /// `GET path`, which must answer 200 with JSON.
    pub fn get_json(&self, path: &str) -> Result<serde_json::Value> {
        self.get_json_within(path, HTTP_TIMEOUT)
    }

    /// [`Service::get_json`], answered within `timeout`.
    pub fn get_json_within(&self, path: &str, timeout: Duration) -> Result<serde_json::Value> {
        let response = http::get(self.addr()?, path, timeout)
            .with_context(|| format!("{}: GET {path}", self.name))?;
        if response.status != 200 {
            bail!(
                "{}: GET {path} returned {}: {}",
                self.name,
                response.status,
                response.body.trim()
            );
        }
        Ok(response.json()?)
    }

    /// The attempts of `GET /api/checkpoints?limit=LIMIT` (newest first), as JSON records.
    pub fn api_checkpoints(&self, limit: usize) -> Result<Vec<serde_json::Value>> {
        self.api_checkpoints_within(limit, HTTP_TIMEOUT)
    }

    /// [`Service::api_checkpoints`], answered within `timeout`: the listing waits for a
    /// checkpoint being written (docs/checkpoints.md), which on a slow disk takes several
    /// slow syncs.
    pub fn api_checkpoints_within(
        &self,
        limit: usize,
        timeout: Duration,
    ) -> Result<Vec<serde_json::Value>> {
        let page = self.get_json_within(&format!("/api/checkpoints?limit={limit}"), timeout)?;
        page.get("checkpoints")
            .and_then(|c| c.as_array())
            .cloned()
            .ok_or_else(|| anyhow!("{}: /api/checkpoints without a list: {page}", self.name))
    }

    /// Whether the process is running; reaps it if it exited.
    pub fn is_running(&mut self) -> Result<bool> {
        match self.child.as_mut() {
            None => Ok(false),
            Some(child) => Ok(child.try_wait()?.is_none()),
        }
    }

    /// Exit status of the current process if it has exited.
    pub fn try_exit_status(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            None => Ok(None),
            Some(child) => Ok(child.try_wait()?),
        }
    }

    /// The process id of the running (or last, not yet reaped) process, e.g. to sample its
    /// CPU time and memory from `/proc`.
    pub fn pid(&self) -> Result<Pid> {
        self.child
            .as_ref()
            .ok_or_else(|| anyhow!("{}: not started", self.name))?
            .pid()
    }

    /// Polls `GET /readyz` until it answers 200. Fails early, with the log tail, if the process
    /// exits.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        let addr = self
            .http
            .ok_or_else(|| anyhow!("{}: not started", self.name))?;
        let mut last = String::new();
        let ready = poll(timeout, Duration::from_millis(100), || {
            if let Some(status) = self.try_exit_status()? {
                bail!(
                    "{}: exited with {status} before becoming ready\n{}",
                    self.name,
                    self.log_tail(LOG_TAIL_LINES)
                );
            }
            last = match http::get(addr, "/readyz", HTTP_TIMEOUT) {
                Ok(response) if response.status == 200 => return Ok(Some(())),
                Ok(response) => format!("{} {}", response.status, response.body.trim()),
                Err(err) => err.to_string(),
            };
            Ok(None)
        })?;
        if ready.is_none() {
            bail!(
                "{}: /readyz not 200 after {timeout:?} (last: {last})\n{}",
                self.name,
                self.log_tail(LOG_TAIL_LINES)
            );
        }
        eprintln!(
            "[service {}] ready after {:.1?}",
            self.name,
            started.elapsed()
        );
        Ok(())
    }

    /// `GET /readyz` status code.
    pub fn readyz(&self) -> Result<u16> {
        let addr = self
            .http
            .ok_or_else(|| anyhow!("{}: not started", self.name))?;
        Ok(http::get(addr, "/readyz", HTTP_TIMEOUT)?.status)
    }

    /// How many partitions `/readyz` says the instance holds; `None` while it is not ready
    /// (or not answering).
    pub fn assigned_partitions(&self) -> Option<usize> {
        let body = self.get("/readyz").ok()?.body;
        body.trim()
            .strip_prefix("ready: ")?
            .strip_suffix(" partitions assigned")?
            .parse()
            .ok()
    }

    /// Records the instance has consumed (`checkpointer_records_consumed_total`), an error
    /// when it cannot be scraped.
    pub fn records_consumed(&self) -> Result<f64> {
        self.scrape()?
            .sum(crate::metrics::RECORDS_CONSUMED)
            .ok_or_else(|| anyhow!("{}: no records-consumed metric", self.name))
    }

    /// `GET /metrics` body.
    pub fn metrics(&self) -> Result<String> {
        let addr = self
            .http
            .ok_or_else(|| anyhow!("{}: not started", self.name))?;
        let response = http::get(addr, "/metrics", HTTP_TIMEOUT)
            .with_context(|| format!("{}: GET /metrics", self.name))?;
        if response.status != 200 {
            bail!("{}: GET /metrics returned {}", self.name, response.status);
        }
        Ok(response.body)
    }

    /// `GET /metrics`, parsed.
    pub fn scrape(&self) -> Result<Metrics> {
        Metrics::parse(&self.metrics()?)
    }

    /// Scrapes `/metrics` until `done` holds; on timeout the error shows the last scrape.
    pub fn wait_metrics(
        &self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&Metrics) -> bool,
    ) -> Result<Metrics> {
        let mut shown = String::new();
        let found = poll(timeout, Duration::from_millis(200), || {
            shown = match self.scrape() {
                Ok(metrics) if done(&metrics) => return Ok(Some(metrics)),
                Ok(metrics) => metrics.text().to_owned(),
                Err(err) => format!("{err:#}"),
            };
            Ok(None)
        })?;
        found.ok_or_else(|| {
            anyhow!(
                "{}: metrics never showed {what} within {timeout:?}; last scrape:\n{shown}",
                self.name
            )
        })
    }

    /// Kills the process with SIGKILL (no chance to checkpoint) and reaps it.
    pub fn sigkill(&mut self) -> Result<()> {
        let pid = self.pid()?;
        if self.try_exit_status()?.is_none() {
            self.child()?.signal(Signal::SIGKILL)?;
        }
        if let Some(mut child) = self.child.take() {
            let status = child.wait()?;
            eprintln!("[service {}] killed pid {pid}: {status}", self.name);
        }
        Ok(())
    }

    /// Sends `signal` to the running process without waiting (SIGSTOP freezes it, SIGCONT
    /// lets it continue).
    pub fn signal(&mut self, signal: Signal) -> Result<()> {
        self.child()?.signal(signal)
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit; returns the exit status. On
    /// timeout the process is killed and an error returned.
    pub fn sigterm(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let pid = self.pid()?;
        if self.try_exit_status()?.is_none() {
            self.child()?.signal(Signal::SIGTERM)?;
        }
        self.reap(
            timeout,
            &format!("pid {pid} stopped"),
            &format!("still running {timeout:?} after SIGTERM"),
        )
    }

    /// [`Service::sigterm`], and an error naming the status and the log's end unless the
    /// process exited 0: the graceful stop every test expects.
    pub fn stop_cleanly(&mut self, timeout: Duration) -> Result<()> {
        let status = self.sigterm(timeout)?;
        if status.code() != Some(0) {
            bail!(
                "{}: exit status after SIGTERM: {status}\n{}",
                self.name,
                self.log_tail(40)
            );
        }
        Ok(())
    }

    /// The last `lines` lines of the service log, for failure reports: colour codes stripped
    /// and the periodic "checkpoint completed" lines left out (the file has everything).
    pub fn log_tail(&self, lines: usize) -> String {
        let text = match std::fs::read(self.log_path()) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(err) => format!("<cannot read: {err}>"),
        };
        let kept: Vec<String> = text
            .lines()
            .map(strip_ansi)
            .filter(|line| !line.contains("checkpoint completed"))
            .collect();
        let from = kept.len().saturating_sub(lines);
        format!(
            "----- last lines of {} (periodic checkpoint lines omitted) -----\n{}\n-----",
            self.log_path().display(),
            kept[from..].join("\n")
        )
    }

    /// The log of the current (or last) start only: what follows its `===== start #N` line,
    /// colour codes stripped.
    pub fn log_since_start(&self) -> String {
        let text = match std::fs::read(self.log_path()) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(err) => return format!("<cannot read {}: {err}>", self.log_path().display()),
        };
        let marker = format!("===== start #{} ", self.starts);
        let from = text.rfind(&marker).unwrap_or(0);
        text[from..]
            .lines()
            .map(strip_ansi)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// [`Service::log_since_start`] past its first `seen` bytes (a length it had earlier): what
    /// the current start logged since then.
    pub fn log_after(&self, seen: usize) -> String {
        self.log_since_start().get(seen..).unwrap_or("").to_string()
    }

    /// Runs `checkpointer check-config --config PATH` on the config this service would use.
    pub fn check_config(&self) -> Result<std::process::Output> {
        let http: SocketAddr = "127.0.0.1:0".parse()?;
        let path = self.dir_path.join("check-config.yaml");
        let mut file = File::create(&path)?;
        file.write_all(self.config.to_yaml(&self.state_dir(), http).as_bytes())?;
        Command::new(&self.bin)
            .arg("check-config")
            .arg("--config")
            .arg(&path)
            .output()
            .context("running check-config")
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        // a process the test never stopped (SIGTERM, SIGKILL, wait_exit) means the test gave
        // up early: an error returned with `?` drops the service before the test panics
        let abandoned = self.child.is_some();
        // the guard kills and reaps it
        drop(self.child.take());
        let failed = std::thread::panicking() || abandoned;
        if failed {
            if abandoned {
                eprintln!(
                    "[service {}] dropped without being stopped: the test failed",
                    self.name
                );
            }
            eprintln!(
                "[service {}] config:\n{}",
                self.name,
                std::fs::read_to_string(self.config_path()).unwrap_or_default()
            );
            eprintln!("{}", self.log_tail(LOG_TAIL_LINES));
        }
        if failed || keep_temp_dirs() {
            if let Some(dir) = self.dir.take() {
                eprintln!("[service {}] kept {}", self.name, dir.keep().display());
            }
        }
    }
}

/// Removes ANSI escape sequences (`ESC [ ... letter`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::strip_ansi;

    #[test]
    fn strips_colour_codes() {
        assert_eq!(
            strip_ansi("\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m done"),
            "2026  INFO done"
        );
    }
}
