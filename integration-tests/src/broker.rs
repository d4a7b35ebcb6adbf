//! A Kafka-protocol broker for tests: a throwaway `tansu` process, or `KAFKA_BROKERS`.

use std::fs::File;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::metadata::Metadata;
use tempfile::TempDir;

use crate::{free_port, keep_temp_dirs, tail_file};

/// The tansu release the tests are written against (see `scripts/install-tansu.sh`).
pub const TANSU_VERSION: &str = "0.6.0";

const START_TIMEOUT: Duration = Duration::from_secs(30);
const START_ATTEMPTS: usize = 3;

/// A broker the tests can talk to.
///
/// With `KAFKA_BROKERS` set, that cluster is used as is. Otherwise a `tansu` broker with
/// in-memory storage is started on a free loopback port, with a cleared environment and a fresh
/// working directory (tansu reads `.env` and variables such as `LISTENER_URL`), and killed when
/// the `Broker` is dropped.
pub struct Broker {
    bootstrap: String,
    process: Option<TansuProcess>,
    admin: AdminClient<DefaultClientContext>,
}

struct TansuProcess {
    child: Child,
    dir: Option<TempDir>,
    log: PathBuf,
}

impl Broker {
    /// Uses `KAFKA_BROKERS` if set, else starts tansu; returns once the broker answers metadata.
    pub fn start() -> Result<Self> {
        match std::env::var("KAFKA_BROKERS") {
            Ok(bootstrap) if !bootstrap.trim().is_empty() => {
                let admin = admin_client(&bootstrap)?;
                let broker = Broker {
                    bootstrap,
                    process: None,
                    admin,
                };
                broker.wait_for_metadata(Instant::now() + START_TIMEOUT)?;
                Ok(broker)
            }
            _ => Self::start_tansu(),
        }
    }

    fn start_tansu() -> Result<Self> {
        let bin = tansu_bin()?;
        let mut last_error = None;
        // The port is free when chosen but may be taken before tansu binds it: retry then.
        for _ in 0..START_ATTEMPTS {
            match Self::spawn_tansu(&bin) {
                Ok(broker) => return Ok(broker),
                Err(err) => {
                    eprintln!("[broker] tansu did not start: {err:#}");
                    last_error = Some(err);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow!("tansu did not start")))
    }

    fn spawn_tansu(bin: &Path) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("tansu-")
            .tempdir()
            .context("creating the broker's working directory")?;
        let port = free_port()?;
        let url = format!("tcp://127.0.0.1:{port}");
        let log = dir.path().join("broker.log");
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;

        let mut command = Command::new(bin);
        command
            .args(["broker", "--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .env_clear()
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for var in ["PATH", "HOME"] {
            if let Some(value) = std::env::var_os(var) {
                command.env(var, value);
            }
        }
        // Broker logging for debugging, e.g. TANSU_RUST_LOG=tansu_broker::coordinator=debug
        if let Some(filter) = std::env::var_os("TANSU_RUST_LOG") {
            command.env("RUST_LOG", filter);
        }
        let child = command
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let bootstrap = format!("127.0.0.1:{port}");
        let admin = admin_client(&bootstrap)?;
        let mut broker = Broker {
            bootstrap,
            process: Some(TansuProcess {
                child,
                dir: Some(dir),
                log,
            }),
            admin,
        };
        eprintln!(
            "[broker] tansu on {} (log {})",
            broker.bootstrap,
            broker
                .log_path()
                .map(Path::display)
                .map(|d| d.to_string())
                .unwrap_or_default()
        );

        let deadline = Instant::now() + START_TIMEOUT;
        let addr: SocketAddr = broker.bootstrap.parse()?;
        loop {
            broker.check_alive()?;
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "tansu did not accept connections on {addr} within {START_TIMEOUT:?}\n{}",
                    broker.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        broker.wait_for_metadata(deadline)?;
        Ok(broker)
    }

    /// `host:port` list for `bootstrap.servers`.
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// A client config with the bootstrap servers and IPv4 preferred.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap)
            .set("broker.address.family", "v4");
        config
    }

    /// The broker's log file, when this harness started the broker.
    pub fn log_path(&self) -> Option<&Path> {
        self.process.as_ref().map(|p| p.log.as_path())
    }

    /// The last lines of the broker's log (empty for an external broker).
    pub fn log_tail(&self, lines: usize) -> String {
        self.log_path()
            .map(|path| tail_file(path, lines))
            .unwrap_or_default()
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(process) = self.process.as_mut() {
            if let Some(status) = process.child.try_wait()? {
                bail!(
                    "tansu exited with {status}\n{}",
                    tail_file(&process.log, 40)
                );
            }
        }
        Ok(())
    }

    /// Broker metadata for one topic, or for all topics with `None`.
    pub fn metadata(&self, topic: Option<&str>, timeout: Duration) -> Result<Metadata> {
        self.admin
            .inner()
            .fetch_metadata(topic, timeout)
            .with_context(|| format!("fetching metadata from {}", self.bootstrap))
    }

    fn wait_for_metadata(&self, deadline: Instant) -> Result<()> {
        loop {
            match self.metadata(None, Duration::from_secs(2)) {
                Ok(metadata) if !metadata.brokers().is_empty() => return Ok(()),
                Ok(_) => {}
                Err(err) if Instant::now() >= deadline => {
                    return Err(err.context(format!(
                        "broker did not answer metadata\n{}",
                        self.log_tail(40)
                    )))
                }
                Err(_) => {}
            }
            if Instant::now() >= deadline {
                bail!("broker metadata lists no brokers\n{}", self.log_tail(40));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Number of partitions of `topic` according to metadata (0 when unknown).
    pub fn partition_count(&self, topic: &str) -> Result<usize> {
        let metadata = self.metadata(Some(topic), Duration::from_secs(5))?;
        Ok(metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map(|t| t.partitions().len())
            .unwrap_or(0))
    }

    /// Creates `topic` with `partitions` partitions (CreateTopics through the admin API) and
    /// waits until metadata shows every partition with a leader.
    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .context("building a runtime for the admin client")?;
        let new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let results = runtime
            .block_on(self.admin.create_topics([&new_topic], &options))
            .with_context(|| format!("CreateTopics {topic}"))?;
        for result in results {
            result.map_err(|(name, code)| anyhow!("CreateTopics {name}: {code}"))?;
        }

        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let metadata = self.metadata(Some(topic), Duration::from_secs(5))?;
            let ready = metadata.topics().iter().any(|t| {
                t.name() == topic
                    && t.error().is_none()
                    && t.partitions().len() == partitions as usize
                    && t.partitions().iter().all(|p| p.leader() >= 0)
            });
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("topic {topic} with {partitions} partitions never appeared in metadata");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let Some(process) = self.process.as_mut() else {
            return;
        };
        let _ = process.child.kill();
        let _ = process.child.wait();
        if std::thread::panicking() || keep_temp_dirs() {
            if let Some(dir) = process.dir.take() {
                let path = dir.keep();
                eprintln!("[broker] kept {}", path.display());
            }
            if std::thread::panicking() {
                eprintln!(
                    "[broker] last lines of {}:\n{}",
                    process.log.display(),
                    tail_file(&process.log, 30)
                );
            }
        }
    }
}

fn admin_client(bootstrap: &str) -> Result<AdminClient<DefaultClientContext>> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("broker.address.family", "v4")
        .create()
        .context("creating an admin client")
}

/// The tansu binary: `TANSU_BIN`, else `tansu` on `PATH`, else `~/.cargo/bin/tansu`.
pub fn tansu_bin() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("TANSU_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join("tansu"))
        .find(|candidate| candidate.is_file());
    if let Some(bin) = on_path {
        return Ok(bin);
    }
    if let Some(home) = std::env::var_os("HOME") {
        let bin = PathBuf::from(home).join(".cargo/bin/tansu");
        if bin.is_file() {
            return Ok(bin);
        }
    }
    bail!(
        "tansu {TANSU_VERSION} not found (set TANSU_BIN or run scripts/install-tansu.sh), \
         or point KAFKA_BROKERS at a running broker"
    )
}
