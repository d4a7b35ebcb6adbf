//! The broker the tests run against: a throwaway Apache Kafka cluster in KRaft mode, started
//! from the jars of the pinned release (`scripts/install-kafka.sh`), or `KAFKA_BROKERS`.
//!
//! - [`Broker::shared`]: one single-node broker per test process, started on first use and
//!   killed when the process exits; tests keep apart by unique topic and group names.
//! - [`Broker::start`]: a single-node broker of the caller's own, which it may SIGKILL and
//!   restart on the same ports and log directory ([`Broker::kill`], [`Broker::restart`]).
//! - [`Broker::start_cluster`]: three nodes (each broker and controller), replication factor 3,
//!   `min.insync.replicas` 2, for failover tests.
//! - [`Broker::start_secured`]: a single node with a second listener, SASL_SSL with
//!   SCRAM-SHA-512, its certificate signed by a throwaway CA ([`Secured`]).
//!
//! Every node listens on free loopback ports, keeps its data and its log (`kafka.log`, INFO) in
//! a directory of its own, and is a child of a thread that lives as long as the test process,
//! with `PR_SET_PDEATHSIG`: no broker outlives the tests, even when they are killed. A panic in
//! a test prints the end of every node's log.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::metadata::Metadata;

use crate::{free_port, keep_temp_dirs, tail_file, workspace_dir, KillOnDrop};

/// How long a node may take from its start until the cluster answers metadata with every node.
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// Attempts at starting on freshly chosen ports (a free port can be taken before the JVM binds).
const START_ATTEMPTS: usize = 3;
/// The JVM's heap: the broker of a test holds little data.
const HEAP: &str = "-Xmx512m";

/// A Kafka cluster the tests can talk to: nodes this harness started, or `KAFKA_BROKERS`.
pub struct Broker {
    bootstrap: String,
    nodes: Vec<Mutex<Node>>,
    replication: i32,
    admin: AdminClient<DefaultClientContext>,
    /// The directory holding every node's directory (removed on drop unless kept).
    dir: Option<PathBuf>,
    secured: Option<Secured>,
}

/// The SASL_SSL listener of [`Broker::start_secured`].
#[derive(Clone, Debug)]
pub struct Secured {
    /// `127.0.0.1:PORT` of the SASL_SSL listener.
    pub bootstrap: String,
    /// The CA certificate (PEM) that signed the broker's certificate.
    pub ca: PathBuf,
    /// A SCRAM-SHA-512 user known to the broker, and its password.
    pub user: String,
    pub password: String,
}

/// One broker+controller JVM.
struct Node {
    id: u32,
    port: u16,
    dir: PathBuf,
    /// The JVM while it runs (killed when dropped).
    child: Option<KillOnDrop>,
}

impl Node {
    fn config_path(&self) -> PathBuf {
        self.dir.join("server.properties")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("kafka.log")
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

impl Broker {
    /// The broker shared by every test of this process: `KAFKA_BROKERS` if set, else a
    /// single-node Kafka started on first use.
    pub fn shared() -> Result<&'static Broker> {
        static SHARED: OnceLock<std::result::Result<Broker, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| {
                let broker = match external_bootstrap() {
                    Some(bootstrap) => Broker::external(bootstrap),
                    None => Broker::launch(1, false),
                };
                broker.map_err(|err| format!("{err:#}"))
            })
            .as_ref()
            .map_err(|err| anyhow!("{err}"))
    }

    /// A single-node broker of the caller's own (`KAFKA_BROKERS` is not used: the caller may
    /// kill and restart it).
    pub fn start() -> Result<Broker> {
        Broker::launch(1, false)
    }

    /// A single-node broker with a SASL_SSL (SCRAM-SHA-512) listener besides the plaintext one
    /// the harness itself uses; see [`Broker::secured`].
    pub fn start_secured() -> Result<Broker> {
        Broker::launch(1, true)
    }

    /// The SASL_SSL listener, for a broker from [`Broker::start_secured`].
    pub fn secured(&self) -> Option<&Secured> {
        self.secured.as_ref()
    }

    /// A three-node cluster: every topic replicated three times, `min.insync.replicas` 2.
    pub fn start_cluster() -> Result<Broker> {
        Broker::launch(3, false)
    }

    fn external(bootstrap: String) -> Result<Broker> {
        let broker = Broker {
            admin: admin_client(&bootstrap)?,
            bootstrap,
            nodes: Vec::new(),
            replication: 1,
            dir: None,
            secured: None,
        };
        broker.wait_for_nodes(Instant::now() + START_TIMEOUT, 1)?;
        Ok(broker)
    }

    fn launch(size: usize, secure: bool) -> Result<Broker> {
        install_panic_hook();
        let lib = kafka_lib()?;
        let mut last_error = None;
        for attempt in 1..=START_ATTEMPTS {
            match Broker::launch_once(&lib, size, secure) {
                Ok(broker) => return Ok(broker),
                Err(err) => {
                    eprintln!("[broker] attempt {attempt}: Kafka did not start: {err:#}");
                    last_error = Some(err);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow!("Kafka did not start")))
    }

    fn launch_once(lib: &Path, size: usize, secure: bool) -> Result<Broker> {
        let dir = cluster_dir()?;
        let secured = if secure {
            Some(make_secured(&dir, free_port()?)?)
        } else {
            None
        };
        let ports: Vec<(u16, u16)> = (0..size)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<Result<_>>()?;
        let voters = ports
            .iter()
            .enumerate()
            .map(|(i, (_, controller))| format!("{}@127.0.0.1:{controller}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let replication = size as i32;
        let cluster_id = run_java(lib, &["kafka.tools.StorageTool", "random-uuid"])?;
        let cluster_id = cluster_id.trim().to_owned();
        let mut nodes = Vec::new();
        for (i, (port, controller)) in ports.iter().enumerate() {
            let id = i as u32 + 1;
            let node_dir = dir.join(format!("node-{id}"));
            std::fs::create_dir_all(node_dir.join("data"))
                .with_context(|| format!("creating {}", node_dir.display()))?;
            let node = Node {
                id,
                port: *port,
                dir: node_dir,
                child: None,
            };
            let mut properties = server_properties(&node, *controller, &voters, replication);
            if let Some(sec) = &secured {
                properties = secure_properties(&properties, sec, &dir);
            }
            write_file(&node.config_path(), &properties)?;
            write_file(
                &node.dir.join("log4j2.properties"),
                &log4j_properties(&node),
            )?;
            let config = node.config_path();
            let config = config.to_string_lossy();
            let mut format = vec![
                "kafka.tools.StorageTool".to_owned(),
                "format".to_owned(),
                "-t".to_owned(),
                cluster_id.clone(),
                "-c".to_owned(),
                config.into_owned(),
            ];
            if let Some(sec) = &secured {
                format.push("--add-scram".to_owned());
                format.push(format!(
                    "SCRAM-SHA-512=[name={},password={}]",
                    sec.user, sec.password
                ));
            }
            let format: Vec<&str> = format.iter().map(String::as_str).collect();
            run_java(lib, &format)
                .with_context(|| format!("formatting node {id}'s log directory"))?;
            nodes.push(node);
        }
        let bootstrap = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",");
        let broker = Broker {
            admin: admin_client(&bootstrap)?,
            bootstrap,
            nodes: nodes.into_iter().map(Mutex::new).collect(),
            replication,
            dir: Some(dir),
            secured,
        };
        let started = Instant::now();
        for node in &broker.nodes {
            let mut node = node.lock().unwrap_or_else(PoisonError::into_inner);
            spawn_node(lib, &mut node)?;
        }
        let deadline = Instant::now() + START_TIMEOUT;
        for index in 0..broker.nodes.len() {
            broker.wait_for_port(index, deadline)?;
        }
        broker.wait_for_nodes(deadline, size)?;
        eprintln!(
            "[broker] Kafka {} ({} node{}) on {} answered after {:.1?} (logs in {})",
            KAFKA_VERSION.get().map(String::as_str).unwrap_or("?"),
            size,
            if size == 1 { "" } else { "s" },
            broker.bootstrap,
            started.elapsed(),
            broker
                .dir
                .as_deref()
                .map(Path::display)
                .map(|d| d.to_string())
                .unwrap_or_default()
        );
        register(&broker);
        Ok(broker)
    }

    /// `host:port` list for `bootstrap.servers`.
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// How many nodes the harness runs (0 for `KAFKA_BROKERS`).
    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    /// A client config with the bootstrap servers and IPv4 preferred.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap)
            .set("broker.address.family", "v4");
        config
    }

    /// The log file of the first node, when this harness started the broker.
    pub fn log_path(&self) -> Option<PathBuf> {
        self.nodes.first().map(|n| lock(n).log_path())
    }

    /// The last lines of every node's log (empty for an external broker).
    pub fn log_tail(&self, lines: usize) -> String {
        self.nodes
            .iter()
            .map(|node| {
                let node = lock(node);
                format!(
                    "--- node {} ({}) ---\n{}",
                    node.id,
                    node.log_path().display(),
                    tail_file(&node.log_path(), lines)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// SIGKILLs node `id` (1-based) and waits until the process is gone.
    pub fn kill(&self, id: u32) -> Result<()> {
        let mut node = self.node(id)?;
        let mut child = node
            .child
            .take()
            .ok_or_else(|| anyhow!("node {id} is not running"))?;
        child.kill().with_context(|| format!("killing node {id}"))?;
        child.wait().with_context(|| format!("reaping node {id}"))?;
        eprintln!("[broker] node {id} killed (SIGKILL)");
        Ok(())
    }

    /// Starts node `id` again on its ports and log directory; returns once its port accepts
    /// connections and the cluster lists every node again.
    pub fn restart(&self, id: u32) -> Result<()> {
        let lib = kafka_lib()?;
        {
            let mut node = self.node(id)?;
            ensure!(node.child.is_none(), "node {id} is still running");
            spawn_node(&lib, &mut node)?;
        }
        let deadline = Instant::now() + START_TIMEOUT;
        self.wait_for_port(id as usize - 1, deadline)?;
        self.wait_for_nodes(deadline, self.nodes.len())?;
        // a node not yet fenced is still listed: wait until it serves its replicas again
        self.wait_for_full_isr(deadline)?;
        eprintln!("[broker] node {id} restarted on {}", self.node(id)?.addr());
        Ok(())
    }

    /// Waits until every partition of every topic has all its replicas in sync.
    fn wait_for_full_isr(&self, deadline: Instant) -> Result<()> {
        loop {
            let metadata = self.metadata(None, Duration::from_secs(5))?;
            let lagging: Vec<String> = metadata
                .topics()
                .iter()
                .flat_map(|t| {
                    t.partitions()
                        .iter()
                        .filter(|p| p.isr().len() < p.replicas().len() || p.leader() < 0)
                        .map(move |p| format!("{}/{}", t.name(), p.id()))
                })
                .collect();
            if lagging.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "partitions without every replica in sync after a restart: {lagging:?}\n{}",
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The node leading `topic`'s `partition`, per metadata.
    pub fn leader(&self, topic: &str, partition: i32) -> Result<u32> {
        let metadata = self.metadata(Some(topic), Duration::from_secs(5))?;
        let leader = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .and_then(|t| t.partitions().iter().find(|p| p.id() == partition))
            .map(|p| p.leader())
            .ok_or_else(|| anyhow!("no metadata for {topic}/{partition}"))?;
        u32::try_from(leader).map_err(|_| anyhow!("{topic}/{partition} has no leader"))
    }

    fn node(&self, id: u32) -> Result<std::sync::MutexGuard<'_, Node>> {
        let index = (id as usize)
            .checked_sub(1)
            .filter(|i| *i < self.nodes.len())
            .ok_or_else(|| anyhow!("no node {id} (the harness runs {})", self.nodes.len()))?;
        Ok(lock(&self.nodes[index]))
    }

    fn wait_for_port(&self, index: usize, deadline: Instant) -> Result<()> {
        loop {
            let addr = {
                let mut node = lock(&self.nodes[index]);
                if let Some(child) = node.child.as_mut() {
                    if let Some(status) = child.try_wait()? {
                        node.child = None;
                        bail!(
                            "Kafka node {} exited with {status}\n{}",
                            node.id,
                            tail_file(&node.log_path(), 40)
                        );
                    }
                }
                node.addr()
            };
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "Kafka did not accept connections on {addr} within {START_TIMEOUT:?}\n{}",
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Broker metadata for one topic, or for all topics with `None`.
    pub fn metadata(&self, topic: Option<&str>, timeout: Duration) -> Result<Metadata> {
        self.admin
            .inner()
            .fetch_metadata(topic, timeout)
            .with_context(|| format!("fetching metadata from {}", self.bootstrap))
    }

    fn wait_for_nodes(&self, deadline: Instant, nodes: usize) -> Result<()> {
        loop {
            match self.metadata(None, Duration::from_secs(2)) {
                Ok(metadata) if metadata.brokers().len() >= nodes => return Ok(()),
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
                bail!(
                    "broker metadata lists fewer than {nodes} brokers\n{}",
                    self.log_tail(40)
                );
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

    /// Creates `topic` with `partitions` partitions, replicated on every node, and waits until
    /// metadata shows every partition with a leader.
    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<()> {
        self.create_topic_with(topic, partitions, &[])
    }

    /// [`Broker::create_topic`] with topic configs (`cleanup.policy`, ...).
    pub fn create_topic_with(
        &self,
        topic: &str,
        partitions: i32,
        configs: &[(&str, &str)],
    ) -> Result<()> {
        let runtime = runtime()?;
        let mut new_topic =
            NewTopic::new(topic, partitions, TopicReplication::Fixed(self.replication));
        for (key, value) in configs {
            new_topic = new_topic.set(key, value);
        }
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
        let results = runtime
            .block_on(self.admin.create_topics([&new_topic], &options))
            .with_context(|| format!("CreateTopics {topic}"))?;
        for result in results {
            result.map_err(|(name, code)| anyhow!("CreateTopics {name}: {code}"))?;
        }
        self.wait_for_partitions(topic, partitions)
    }

    /// Deletes the records of `topic`/`partition` before `before` (what retention does): the
    /// partition's earliest offset becomes `before`.
    pub fn delete_records(&self, topic: &str, partition: i32, before: i64) -> Result<()> {
        let runtime = runtime()?;
        let mut offsets = rdkafka::TopicPartitionList::new();
        offsets.add_partition_offset(topic, partition, rdkafka::Offset::Offset(before))?;
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
        let result = runtime
            .block_on(self.admin.delete_records(&offsets, &options))
            .with_context(|| format!("DeleteRecords {topic}/{partition} before {before}"))?;
        for e in result.elements() {
            if let Err(err) = e.error() {
                return Err(anyhow!("DeleteRecords {topic}/{}: {err}", e.partition()));
            }
        }
        Ok(())
    }

    /// Bounds what clients named `client_id` (`client.id`) may fetch per second, a broker
    /// quota: a slow link on demand. The broker answers their fetches and then makes them wait.
    pub fn set_consumer_byte_rate(&self, client_id: &str, bytes_per_second: u64) -> Result<()> {
        let lib = kafka_lib()?;
        let rate = format!("consumer_byte_rate={bytes_per_second}");
        run_java(
            &lib,
            &[
                "kafka.admin.ConfigCommand",
                "--bootstrap-server",
                self.bootstrap(),
                "--alter",
                "--entity-type",
                "clients",
                "--entity-name",
                client_id,
                "--add-config",
                &rate,
            ],
        )
        .with_context(|| format!("setting a consumer byte rate quota for client {client_id}"))?;
        Ok(())
    }

    /// Adds partitions to `topic` until it has `total`, and waits until they have leaders.
    pub fn add_partitions(&self, topic: &str, total: usize) -> Result<()> {
        let runtime = runtime()?;
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
        let new = rdkafka::admin::NewPartitions::new(topic, total);
        let results = runtime
            .block_on(self.admin.create_partitions([&new], &options))
            .with_context(|| format!("CreatePartitions {topic}"))?;
        for result in results {
            result.map_err(|(name, code)| anyhow!("CreatePartitions {name}: {code}"))?;
        }
        self.wait_for_partitions(topic, total as i32)
    }

    fn wait_for_partitions(&self, topic: &str, partitions: i32) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
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
        for node in &self.nodes {
            // the guard kills and reaps the JVM
            drop(lock(node).child.take());
        }
        unregister(self);
        let Some(dir) = self.dir.take() else {
            return;
        };
        if std::thread::panicking() || keep_temp_dirs() {
            eprintln!("[broker] kept {}", dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

fn lock(node: &Mutex<Node>) -> std::sync::MutexGuard<'_, Node> {
    node.lock().unwrap_or_else(PoisonError::into_inner)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .context("building a runtime for the admin client")
}

fn external_bootstrap() -> Option<String> {
    std::env::var("KAFKA_BROKERS")
        .ok()
        .filter(|b| !b.trim().is_empty())
}

fn admin_client(bootstrap: &str) -> Result<AdminClient<DefaultClientContext>> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("broker.address.family", "v4")
        .create()
        .context("creating an admin client")
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn server_properties(node: &Node, controller_port: u16, voters: &str, replication: i32) -> String {
    let min_isr = if replication >= 3 { 2 } else { 1 };
    let data = node.dir.join("data");
    let mut p = BTreeMap::new();
    p.insert("process.roles", "broker,controller".to_owned());
    p.insert("node.id", node.id.to_string());
    p.insert("controller.quorum.voters", voters.to_owned());
    p.insert(
        "listeners",
        format!(
            "PLAINTEXT://127.0.0.1:{},CONTROLLER://127.0.0.1:{controller_port}",
            node.port
        ),
    );
    p.insert(
        "advertised.listeners",
        format!("PLAINTEXT://127.0.0.1:{}", node.port),
    );
    p.insert("controller.listener.names", "CONTROLLER".to_owned());
    p.insert(
        "listener.security.protocol.map",
        "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT".to_owned(),
    );
    p.insert("inter.broker.listener.name", "PLAINTEXT".to_owned());
    p.insert("log.dirs", data.to_string_lossy().into_owned());
    p.insert("auto.create.topics.enable", "false".to_owned());
    p.insert("num.partitions", "1".to_owned());
    p.insert("default.replication.factor", replication.to_string());
    p.insert("min.insync.replicas", min_isr.to_string());
    p.insert("offsets.topic.replication.factor", replication.to_string());
    p.insert("offsets.topic.num.partitions", "5".to_owned());
    p.insert(
        "transaction.state.log.replication.factor",
        replication.to_string(),
    );
    p.insert("transaction.state.log.min.isr", min_isr.to_string());
    p.insert("transaction.state.log.num.partitions", "5".to_owned());
    p.insert(
        "share.coordinator.state.topic.replication.factor",
        replication.to_string(),
    );
    p.insert("share.coordinator.state.topic.min.isr", min_isr.to_string());
    // every first join would otherwise wait 3 s
    p.insert("group.initial.rebalance.delay.ms", "0".to_owned());
    // tests shorten consumer sessions to see expiry quickly
    p.insert("group.min.session.timeout.ms", "1000".to_owned());
    p.insert("unclean.leader.election.enable", "false".to_owned());
    p.iter().map(|(k, v)| format!("{k}={v}\n")).collect()
}

/// A throwaway CA, the broker's key and certificate (for 127.0.0.1) signed by it, and a SCRAM
/// user, all under `dir`.
fn make_secured(dir: &Path, port: u16) -> Result<Secured> {
    let tls = dir.join("tls");
    std::fs::create_dir_all(&tls).with_context(|| format!("creating {}", tls.display()))?;
    let openssl = |args: &[&str]| -> Result<()> {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(&tls)
            .stdin(Stdio::null())
            .output()
            .context("running openssl (the secured broker needs it on PATH)")?;
        ensure!(
            output.status.success(),
            "openssl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(())
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=checkpointer-test-ca",
    ])?;
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "broker.key",
        "-out",
        "broker.csr",
        "-subj",
        "/CN=localhost",
    ])?;
    write_file(
        &tls.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        "broker.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "broker.crt",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ])?;
    // Kafka's PEM key store: the (unencrypted PKCS#8) key followed by the certificate chain
    let key = std::fs::read_to_string(tls.join("broker.key"))?;
    let cert = std::fs::read_to_string(tls.join("broker.crt"))?;
    let ca = std::fs::read_to_string(tls.join("ca.pem"))?;
    write_file(
        &tls.join("broker-keystore.pem"),
        &format!("{key}{cert}{ca}"),
    )?;
    Ok(Secured {
        bootstrap: format!("127.0.0.1:{port}"),
        ca: tls.join("ca.pem"),
        user: "reader".to_owned(),
        password: "reader-secret".to_owned(),
    })
}

/// `properties` with the SASL_SSL listener of `sec` added.
fn secure_properties(properties: &str, sec: &Secured, dir: &Path) -> String {
    let mut out = String::new();
    for line in properties.lines() {
        let line = match line.split_once('=') {
            Some(("listeners", v)) => format!("listeners={v},SASL_SSL://{}", sec.bootstrap),
            Some(("advertised.listeners", v)) => {
                format!("advertised.listeners={v},SASL_SSL://{}", sec.bootstrap)
            }
            Some(("listener.security.protocol.map", v)) => {
                format!("listener.security.protocol.map={v},SASL_SSL:SASL_SSL")
            }
            _ => line.to_owned(),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out.push_str("sasl.enabled.mechanisms=SCRAM-SHA-512\n");
    out.push_str("listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;\n");
    out.push_str("ssl.keystore.type=PEM\n");
    out.push_str(&format!(
        "ssl.keystore.location={}\n",
        dir.join("tls/broker-keystore.pem").display()
    ));
    out
}

fn log4j_properties(node: &Node) -> String {
    let log = node.log_path();
    format!(
        "appender.file.type = File\n\
         appender.file.name = FILE\n\
         appender.file.fileName = {}\n\
         appender.file.layout.type = PatternLayout\n\
         appender.file.layout.pattern = [%d] %p %m (%c)%n\n\
         rootLogger.level = INFO\n\
         rootLogger.appenderRef.file.ref = FILE\n\
         logger.request.name = kafka.request.logger\n\
         logger.request.level = WARN\n\
         logger.raft.name = org.apache.kafka.raft\n\
         logger.raft.level = WARN\n",
        log.display()
    )
}

/// Runs a Kafka tool class to completion and returns its standard output.
fn run_java(lib: &Path, args: &[&str]) -> Result<String> {
    let output = Command::new("java")
        .args(["-Xmx256m", "-cp", &classpath(lib)])
        .arg("-Dlog4j2.level=WARN")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running java (the test broker needs Java 17+ on PATH)")?;
    ensure!(
        output.status.success(),
        "java {} failed ({}): {}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn classpath(lib: &Path) -> String {
    format!("{}/*", lib.display())
}

fn spawn_node(lib: &Path, node: &mut Node) -> Result<()> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(node.dir.join("stdout.log"))
        .context("opening the broker's stdout log")?;
    let mut command = Command::new("java");
    command
        .arg(HEAP)
        .arg("-Xms128m")
        .arg("-Djava.awt.headless=true")
        .arg(format!(
            "-Dlog4j2.configurationFile={}",
            node.dir.join("log4j2.properties").display()
        ))
        .args(["-cp", &classpath(lib), "kafka.Kafka"])
        .arg(node.config_path())
        .current_dir(&node.dir)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    let child = spawn_kept(command).with_context(|| format!("starting Kafka node {}", node.id))?;
    let mut marker = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(node.log_path())?;
    let _ = writeln!(
        marker,
        "[harness] node {} started, pid {}",
        node.id,
        child.id()
    );
    node.child = Some(KillOnDrop::new(child));
    Ok(())
}

/// Spawns `command` from a thread that lives as long as the test process, with
/// `PR_SET_PDEATHSIG` = SIGKILL: the kernel kills the child when that thread (so the process)
/// ends, even when the test process itself is killed. (The death signal follows the thread
/// that forked, so test threads, which end with their test, must not fork the shared broker.)
fn spawn_kept(command: Command) -> std::io::Result<Child> {
    type Request = (Command, mpsc::Sender<std::io::Result<Child>>);
    static KEEPER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("kafka-keeper".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
                    #[allow(unsafe_code)]
                    unsafe {
                        command.pre_exec(|| {
                            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                                .map_err(std::io::Error::from)
                        });
                    }
                    let _ = reply.send(command.spawn());
                }
                // the sender lives in a static: never reached while the process runs
                loop {
                    std::thread::park();
                }
            })
            .map(|_| ())
            .unwrap_or_else(|err| eprintln!("[broker] cannot start the keeper thread: {err}"));
        Mutex::new(tx)
    });
    let (reply, answer) = mpsc::channel();
    keeper
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .send((command, reply))
        .map_err(|_| std::io::Error::other("the broker keeper thread is gone"))?;
    answer
        .recv()
        .map_err(|_| std::io::Error::other("the broker keeper thread did not answer"))?
}

static KAFKA_VERSION: OnceLock<String> = OnceLock::new();

/// The jars of the pinned Kafka release: `KAFKA_LIB_DIR` if it holds them, else what
/// `scripts/install-kafka.sh` resolves (cached; a no-op when present).
pub fn kafka_lib() -> Result<PathBuf> {
    static LIB: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    LIB.get_or_init(|| install_kafka().map_err(|err| format!("{err:#}")))
        .clone()
        .map_err(|err| anyhow!(err))
}

fn install_kafka() -> Result<PathBuf> {
    let script = workspace_dir().join("scripts/install-kafka.sh");
    let output = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    ensure!(
        output.status.success(),
        "{} failed ({})",
        script.display(),
        output.status
    );
    let lib = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    let version = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("kafka_2.13-")
                .and_then(|v| v.strip_suffix(".jar"))
                .map(str::to_owned)
        })
        .next()
        .ok_or_else(|| anyhow!("no kafka_2.13 jar in {}", lib.display()))?;
    let _ = KAFKA_VERSION.set(version);
    Ok(lib)
}

/// A fresh directory for one cluster, `<tmp>/checkpointer-kafka/<pid>-<n>`; directories left by
/// test processes that no longer run are removed first.
fn cluster_dir() -> Result<PathBuf> {
    let base = std::env::temp_dir().join("checkpointer-kafka");
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    static SWEPT: OnceLock<()> = OnceLock::new();
    SWEPT.get_or_init(|| {
        let Ok(entries) = std::fs::read_dir(&base) else {
            return;
        };
        for entry in entries.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let pid = name.split('-').next().and_then(|p| p.parse::<u32>().ok());
            if let Some(pid) = pid {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
    });
    let dir = tempfile::Builder::new()
        .prefix(&format!("{}-", std::process::id()))
        .tempdir_in(&base)
        .context("creating the broker's directory")?;
    Ok(dir.keep())
}

/// Log files of the clusters alive in this process, printed by the panic hook.
static LIVE: Mutex<Vec<(String, Vec<PathBuf>)>> = Mutex::new(Vec::new());

fn register(broker: &Broker) {
    let logs = broker.nodes.iter().map(|n| lock(n).log_path()).collect();
    LIVE.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push((broker.bootstrap.clone(), logs));
}

fn unregister(broker: &Broker) {
    LIVE.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .retain(|(bootstrap, _)| *bootstrap != broker.bootstrap);
}

/// On a panic in any test: the default report, then the end of every running broker's log.
fn install_panic_hook() {
    static HOOK: OnceLock<()> = OnceLock::new();
    HOOK.get_or_init(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default(info);
            let live = LIVE.lock().unwrap_or_else(PoisonError::into_inner).clone();
            for (bootstrap, logs) in live {
                for log in logs {
                    eprintln!(
                        "[broker] {bootstrap}: last lines of {}:\n{}",
                        log.display(),
                        tail_file(&log, 40)
                    );
                }
            }
        }));
    });
}
