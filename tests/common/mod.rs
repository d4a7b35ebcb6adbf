//! Helpers shared by the tests that drive the real binary against librdkafka's mock cluster.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, DefaultProducerContext, Producer};

/// A free loopback address for `http.listen`.
pub fn free_addr() -> SocketAddr {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Starts the real binary with `config`, logging to `log`.
pub fn spawn_service(config: &Path, log: &Path) -> KillOnDrop {
    spawn_service_logging(config, log, "info")
}

/// Like `spawn_service`, at log level `rust_log`.
pub fn spawn_service_logging(config: &Path, log: &Path, rust_log: &str) -> KillOnDrop {
    let log = std::fs::File::create(log).expect("log file");
    KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_checkpointer"))
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn checkpointer"),
    )
}

pub fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let status = raw.split_whitespace().nth(1)?.parse().ok()?;
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

pub fn metric(addr: SocketAddr, name: &str) -> f64 {
    get(addr, "/metrics")
        .and_then(|(_, body)| {
            body.lines()
                .find(|l| l.split_whitespace().next() == Some(name))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(-1.0)
}

pub fn wait(what: &str, timeout: Duration, child: &mut Child, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("service exited ({status}) while waiting for {what}");
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn produce(
    producer: &BaseProducer,
    partition_of: impl Fn(usize) -> i32,
    recs: &[(String, i64, i64)],
) {
    for (i, (key, ts, amount)) in recs.iter().enumerate() {
        let payload = format!(r#"{{"user":"{key}","amount":{amount},"ts":{ts}}}"#);
        let mut record = BaseRecord::to("in")
            .key(key)
            .payload(&payload)
            .partition(partition_of(i));
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    record = r;
                    producer.poll(Duration::from_millis(50));
                }
            }
        }
    }
    eprintln!("[broker_outage] flushing {} records", recs.len());
    producer.flush(Duration::from_secs(30)).expect("flush");
    eprintln!("[broker_outage] flushed");
}

/// Kills the service if the test fails before stopping it.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

pub fn nix_kill(child: &Child, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status();
}

pub type Cluster = MockCluster<'static, DefaultProducerContext>;

/// A producer for `brokers`.
pub fn producer(brokers: &str) -> BaseProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("producer")
}

/// A one-broker mock cluster with topics `in` (`partitions` partitions) and `out`, its
/// bootstrap address, and a producer for it.
pub fn mock_cluster(partitions: i32) -> (Cluster, String, BaseProducer) {
    let cluster = MockCluster::new(1).expect("mock cluster");
    let brokers = cluster.bootstrap_servers();
    cluster.create_topic("in", partitions, 1).expect("topic in");
    cluster.create_topic("out", 1, 1).expect("topic out");
    let producer = producer(&brokers);
    (cluster, brokers, producer)
}

/// Copies a directory tree (fixture stores are never opened in place: opening migrates).
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for item in std::fs::read_dir(from).expect("read fixture") {
        let item = item.expect("entry");
        let target = to.join(item.file_name());
        if item.file_type().expect("type").is_dir() {
            copy_tree(&item.path(), &target);
        } else {
            std::fs::copy(item.path(), &target).expect("copy");
        }
    }
}
