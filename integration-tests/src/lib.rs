//! The test-support crate of `checkpointer`: the one set of helpers for every test that drives
//! the real binary, used by two suites that differ in the Kafka they run against.
//!
//! - `integration-tests/tests` (this crate's tests) run against a real Apache Kafka broker:
//!   [`broker`] starts a throwaway broker or cluster in KRaft mode (or uses `KAFKA_BROKERS`),
//!   creates topics, and can SIGKILL and restart a node; [`Producer`] writes JSON records (or
//!   raw bytes) to chosen partitions and waits for delivery; [`OutputReader`] reads a topic from
//!   the beginning, polling until a predicate holds; [`Service`] writes a YAML config, runs the
//!   binary, kills or stops it, reads `/metrics`; [`model`] computes, independently of the
//!   service, the windows a stream must produce; [`verify`] compares what the service wrote with
//!   that model; [`cli`] runs the binary's operator subcommands.
//! - The root crate's `tests/*.rs` run against librdkafka's mock cluster, in the test process:
//!   [`mock_cluster`] creates it with its topics, produces to it and reads from it; those tests
//!   write their own YAML and start the binary cargo built for them with
//!   [`process::spawn_service`].
//!
//! Shared by both, each written once: [`process::KillOnDrop`] (the guard that kills a child
//! process when the test ends, also behind [`Service`] and the broker's nodes),
//! [`process::run_command`] (how the binary is launched), [`http`] (the HTTP client),
//! [`metrics`] (the `/metrics` parser and [`metrics::metric`]), [`poll`] and [`poll_until`]
//! (the polling loop), [`free_port`] and [`free_addr`], [`copy_dir`], [`tail_file`],
//! [`log_numbers`] (numbers a service log gives as `key=N`).
//! [`slow_disk`] makes the service's disk syncs slow on demand (a preloaded library).
//!
//! Environment knobs: `KAFKA_BROKERS` (use an existing cluster for the shared broker),
//! `KAFKA_LIB_DIR` (where `scripts/install-kafka.sh` keeps the broker's jars),
//! `CHECKPOINTER_BIN` (service binary of this crate's tests),
//! `CHECKPOINTER_TEST_SEED` (workload seed),
//! `CHECKPOINTER_TEST_KEEP=1` (keep temp dirs and logs even when a test passes).

pub mod broker;
pub mod cli;
pub mod client;
pub mod http;
pub mod lifecycle;
pub mod metrics;
pub mod mock_cluster;
pub mod model;
pub mod process;
pub mod service;
pub mod slow_disk;
pub mod verify;
pub mod workload;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;

pub use broker::Broker;
pub use client::{OutputReader, Producer};
pub use metrics::Metrics;
pub use model::{Event, WindowResult, WindowSpec};
pub use process::KillOnDrop;
pub use service::{Service, ServiceConfig};

/// `1234567.891` as `1,234,567.89` (with `decimals` places), as the benchmarks' tables show
/// figures.
pub fn grouped(v: f64, decimals: usize) -> String {
    let text = format!("{:.*}", decimals, v.abs());
    let (int, frac) = text.split_once('.').unwrap_or((&text, ""));
    let mut grouped = String::new();
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(c);
    }
    let sign = if v < 0.0 { "-" } else { "" };
    if frac.is_empty() {
        format!("{sign}{grouped}")
    } else {
        format!("{sign}{grouped}.{frac}")
    }
}

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

/// A loopback address on a [`free_port`], e.g. for the service's `http.listen`.
pub fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(SocketAddr::from(([127, 0, 0, 1], free_port()?)))
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

/// Calls `probe` every `every` until it returns `Some`, or returns `None` once `timeout` has
/// passed: the one polling loop of the harness ([`poll_until`] and
/// [`KillOnDrop`]'s waits are built on it). An error of `probe` ends it.
pub fn poll<T>(
    timeout: Duration,
    every: Duration,
    mut probe: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<Option<T>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe()? {
            return Ok(Some(value));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(every);
    }
}

/// Calls `probe` every `every` until it returns `Some`, or fails after `timeout` with `what`.
pub fn poll_until<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    probe: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    poll(timeout, every, probe)?
        .ok_or_else(|| anyhow::anyhow!("timed out after {timeout:?} waiting for {what}"))
}

/// The last `lines` lines of a text file, for failure reports.
pub fn tail_file(path: &Path, lines: usize) -> String {
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

/// Copies the directory tree `source` to `target` (created), files and sub-directories only:
/// a fixture store is never opened in place (opening migrates it), a stopped service's state
/// dir is restored in several ways from copies.
pub fn copy_dir(source: &Path, target: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(target).with_context(|| format!("creating {}", target.display()))?;
    let entries =
        std::fs::read_dir(source).with_context(|| format!("listing {}", source.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", source.display()))?;
        let from = entry.path();
        let to = target.join(entry.file_name());
        let kind = entry
            .file_type()
            .with_context(|| format!("reading the type of {}", from.display()))?;
        if kind.is_dir() {
            copy_dir(&from, &to)?;
        } else if kind.is_file() {
            std::fs::copy(&from, &to)
                .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        }
    }
    Ok(())
}

/// The numbers a service log gives as `key=N` on its lines that contain `line`, in order.
pub fn log_numbers(log: &str, line: &str, key: &str) -> Vec<u64> {
    let key = format!("{key}=");
    log.lines()
        .filter(|l| l.contains(line))
        .filter_map(|l| {
            let rest = &l[l.find(&key)? + key.len()..];
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::grouped;

    #[test]
    fn figures_are_grouped_by_thousands() {
        assert_eq!(grouped(56_876.4, 0), "56,876");
        assert_eq!(grouped(999.0, 0), "999");
        assert_eq!(grouped(1_234_567.891, 2), "1,234,567.89");
        assert_eq!(grouped(-1_234.5, 1), "-1,234.5");
    }
}
