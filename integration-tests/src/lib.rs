//! End-to-end test harness for `checkpointer`.
//!
//! The tests in `tests/` run the real service binary against a real Apache Kafka broker:
//!
//! - [`Broker`] starts a throwaway Apache Kafka broker or cluster in KRaft mode (or uses
//!   `KAFKA_BROKERS`), creates topics, and can SIGKILL and restart a node;
//! - [`Producer`] writes JSON records (or raw bytes) to chosen partitions and waits for delivery;
//! - [`OutputReader`] reads a topic from the beginning, polling until a predicate holds;
//! - [`Service`] writes a YAML config, runs the binary, kills or stops it, reads `/metrics`;
//! - [`model`] computes, independently of the service, the windows a stream must produce;
//! - [`verify`] compares what the service wrote with that model;
//! - [`cli`] runs the binary's operator subcommands (`checkpoints`, `savepoint`, `stop`).
//!
//! Environment knobs: `KAFKA_BROKERS` (use an existing cluster for the shared broker),
//! `KAFKA_LIB_DIR` (where `scripts/install-kafka.sh` keeps the broker's jars),
//! `CHECKPOINTER_BIN` (service binary),
//! `CHECKPOINTER_TEST_SEED` (workload seed),
//! `CHECKPOINTER_TEST_KEEP=1` (keep temp dirs and logs even when a test passes).

pub mod broker;
pub mod cli;
pub mod client;
pub mod http;
pub mod lifecycle;
pub mod metrics;
pub mod model;
pub mod service;
pub mod verify;
pub mod workload;

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use broker::Broker;
pub use client::{OutputReader, Producer};
pub use metrics::Metrics;
pub use model::{Event, WindowResult, WindowSpec};
pub use service::{Service, ServiceConfig};

/// The cargo workspace root (the parent of this crate).
pub fn workspace_dir() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// A loopback TCP port that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// A name unique within this machine for a while: `<prefix>-<pid>-<millis>-<n>`.
///
/// Topics and consumer groups get such names so that tests never see each other's data, even
/// against a shared broker given by `KAFKA_BROKERS`.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    format!("{prefix}-{}-{millis}-{n}", std::process::id())
}

/// The workload seed: `CHECKPOINTER_TEST_SEED` if set, else a fresh one. Printed so that a
/// failing run can be replayed.
pub fn test_seed(test: &str) -> u64 {
    let seed = match std::env::var("CHECKPOINTER_TEST_SEED") {
        Ok(s) => s.trim().parse().unwrap_or_else(|_| {
            panic!("CHECKPOINTER_TEST_SEED must be an unsigned integer, got {s:?}")
        }),
        Err(_) => rand::random(),
    };
    eprintln!("[{test}] seed {seed} (replay with CHECKPOINTER_TEST_SEED={seed})");
    seed
}

/// Whether temp dirs should be kept after the test (always kept when a test fails).
pub fn keep_temp_dirs() -> bool {
    std::env::var("CHECKPOINTER_TEST_KEEP").is_ok_and(|v| v == "1")
}

/// Calls `probe` every `every` until it returns `Some`, or fails after `timeout` with `what`.
pub fn poll_until<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut probe: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe()? {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(every);
    }
}

/// The last `lines` lines of a text file, for failure reports.
pub fn tail_file(path: &std::path::Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let from = all.len().saturating_sub(lines);
            all[from..].join("\n")
        }
        Err(err) => format!("<cannot read {}: {err}>", path.display()),
    }
}
