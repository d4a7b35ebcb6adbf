//! End-to-end benchmark on a real Apache Kafka broker, run by hand (never in CI):
//! `scripts/bench-e2e.sh [--records N] [--keys N] [--partitions N] [--timeout 45m] [--json PATH]`.
//!
//! 1. starts a throwaway single-node Kafka (KRaft), produces `--records` JSON records
//!    `{"user": "u<k>", "amount": <int>, "ts": <ms>}` over `--keys` uniform keys (partition =
//!    key mod partitions), event time 1 ms per record, 5% of records lagging up to
//!    `--disorder-ms` (the shape of `workload.rs`), then one sentinel a day ahead per partition so
//!    that every window closes;
//! 2. the ceiling: a bare librdkafka consume of the topic (manual assign, from the beginning);
//! 3. the real release `checkpointer` (tumbling 10 s, hopping 30 s/10 s, default aggregates,
//!    checkpoint every 2 s, exactly once, 2 s out-of-orderness) until every window of the data
//!    is on the output topic, sampling its CPU time and peak RSS from `/proc`, then SIGTERM;
//! 4. prints one markdown table (and `--json PATH`).
//!
//! A timeout, a service that exits, or one that passes `--max-rss-gb` (then SIGKILLed) is a
//! result and is reported as such.

mod kafka;
mod proc;
mod report;
mod service;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use integration_tests::model::{expected_windows, WindowSpec};
use integration_tests::{unique_name, workspace_dir, Broker};

use crate::kafka::{bare_consume, generate, produce};
use crate::proc::{load_average, machine_rows};
use crate::report::{Report, Row};
use crate::service::run_service;

const USAGE: &str = "usage: e2e_bench [--records N (2000000)] [--keys N (10000)] \
[--partitions N (4)] [--disorder-ms N (2000)] [--seed N (1)] [--timeout DUR (30m)] \
[--max-rss-gb N (16)] [--kafka-option KEY=VALUE (a librdkafka setting for the service only; \
repeatable)] [--json PATH]";
/// How often the service's CPU time and RSS are read from `/proc`, and its metrics scraped
/// once the input is consumed.
const SAMPLE_EVERY: Duration = Duration::from_millis(500);
const GB: f64 = 1024.0 * 1024.0 * 1024.0;

struct Args {
    records: usize,
    keys: usize,
    partitions: usize,
    disorder_ms: i64,
    seed: u64,
    timeout: Duration,
    max_rss_bytes: u64,
    /// librdkafka settings given to the service as `kafka.options`.
    kafka_options: BTreeMap<String, String>,
    json: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        records: 2_000_000,
        keys: 10_000,
        partitions: 4,
        disorder_ms: 2_000,
        seed: 1,
        timeout: Duration::from_secs(30 * 60),
        max_rss_bytes: 16 * (1 << 30),
        kafka_options: BTreeMap::new(),
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = it
            .next()
            .ok_or_else(|| anyhow!("{flag} needs a value\n{USAGE}"))?;
        let num = |v: &str| -> Result<u64> {
            v.replace('_', "")
                .parse()
                .with_context(|| format!("{flag}: not a number: {v:?}"))
        };
        match flag.as_str() {
            "--records" => args.records = num(&value)? as usize,
            "--keys" => args.keys = num(&value)? as usize,
            "--partitions" => args.partitions = num(&value)? as usize,
            "--disorder-ms" => args.disorder_ms = num(&value)? as i64,
            "--seed" => args.seed = num(&value)?,
            "--timeout" => args.timeout = parse_duration(&value)?,
            "--max-rss-gb" => args.max_rss_bytes = num(&value)? << 30,
            "--kafka-option" => {
                let (key, v) = value
                    .split_once('=')
                    .filter(|(key, _)| !key.trim().is_empty())
                    .ok_or_else(|| anyhow!("--kafka-option needs KEY=VALUE, got {value:?}"))?;
                args.kafka_options
                    .insert(key.trim().into(), v.trim().into());
            }
            "--json" => args.json = Some(PathBuf::from(value)),
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    ensure!(
        args.records > 0 && args.keys > 0,
        "--records and --keys must be > 0"
    );
    ensure!(
        (1..=1000).contains(&args.partitions),
        "--partitions must be 1..=1000"
    );
    Ok(args)
}

/// Whether a librdkafka setting holds a secret (a password, a key, a token): the service's own
/// rule (`checkpointer::config::is_secret`, which this crate does not link), word for word.
fn is_secret(option: &str) -> bool {
    let k = option.to_ascii_lowercase();
    [
        "password",
        "secret",
        "token",
        ".key",
        "oauthbearer.config",
        "jaas",
    ]
    .iter()
    .any(|s| k.contains(s))
}

/// The command line as the report shows it: the values of secret `--kafka-option`s masked.
fn shown_command(args: impl Iterator<Item = String>) -> String {
    let mut out = Vec::new();
    let mut option = false;
    for arg in args {
        let shown = match arg.split_once('=') {
            Some((key, _)) if option && is_secret(key) => format!("{key}=***"),
            _ => arg,
        };
        option = shown == "--kafka-option";
        out.push(shown);
    }
    out.join(" ")
}

/// `90`, `90s`, `500ms`, `45m`, `1h` (a bare number is seconds).
fn parse_duration(text: &str) -> Result<Duration> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (n, unit) = text.split_at(split);
    let n: u64 = n
        .parse()
        .with_context(|| format!("bad duration {text:?}"))?;
    Ok(match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => bail!("bad duration {text:?} (use ms, s, m or h)"),
    })
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let command = shown_command(std::env::args());
    let mut report = Report::default();
    machine_rows(&mut report, &command);
    let bin = service_binary()?;
    let shown = bin.display().to_string();
    report.add("service_binary", "service binary", shown.clone(), shown);
    // secrets (SASL passwords, keys) are not written into the report
    let shown_options: BTreeMap<&str, &str> = args
        .kafka_options
        .iter()
        .map(|(k, v)| (k.as_str(), if is_secret(k) { "***" } else { v.as_str() }))
        .collect();
    let options: Vec<String> = shown_options
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let shown = if options.is_empty() {
        "none".to_string()
    } else {
        options.join(", ")
    };
    report.add(
        "service_kafka_options",
        "service kafka.options (not the bare consume's)",
        serde_json::json!(shown_options),
        shown,
    );
    #[rustfmt::skip]
    let rows: [Row; 4] = [
        ("records", "records (plus 1 sentinel per partition)", Some(args.records as f64), 0),
        ("keys", "keys", Some(args.keys as f64), 0),
        ("partitions", "input partitions", Some(args.partitions as f64), 0),
        ("disorder_ms", "5% of records lag up to ms", Some(args.disorder_ms as f64), 0),
    ];
    report.nums("workload", &rows);

    eprintln!(
        "[bench] generating {} records over {} keys",
        args.records, args.keys
    );
    let (events, partition_of) = generate(&args);
    let windows = vec![
        WindowSpec::tumbling("tumble", Duration::from_secs(10)),
        WindowSpec::hopping("hop", Duration::from_secs(30), Duration::from_secs(10)),
    ];
    let expected: HashSet<String> = expected_windows(&windows, &events).into_keys().collect();
    #[rustfmt::skip]
    let rows: [Row; 1] = [
        ("windows", "windows in the data (model)", Some(expected.len() as f64), 0),
    ];
    report.nums("workload", &rows);

    let broker = Broker::start()?;
    let input = unique_name("bench-in");
    let output = unique_name("bench-out");
    broker.create_topic(&input, args.partitions as i32)?;
    broker.create_topic(&output, args.partitions as i32)?;

    let produced = produce(&broker, &input, &events, &partition_of, args.partitions)?;
    drop(events);
    drop(partition_of);
    #[rustfmt::skip]
    let rows: [Row; 2] = [
        ("seconds", "wall s (acks=1, until flushed)", Some(produced.seconds), 2),
        ("records_per_s", "records/s", Some(produced.records as f64 / produced.seconds), 0),
    ];
    report.nums("produce", &rows);

    #[rustfmt::skip]
    let rows: [Row; 1] = [
        ("load_before_bare", "1-min load average before the bare consume", Some(load_average()), 2),
    ];
    report.nums("machine", &rows);
    let bare = bare_consume(&broker, &input, args.partitions, produced.records)?;
    let bare_rate = bare.records as f64 / bare.seconds;
    #[rustfmt::skip]
    let rows: [Row; 4] = [
        ("seconds", "wall s", Some(bare.seconds), 2),
        ("records_per_s", "records/s", Some(bare_rate), 0),
        ("cpu_seconds", "CPU s", Some(bare.cpu_seconds), 2),
        ("records_per_cpu_s", "records per CPU-s", Some(bare.records as f64 / bare.cpu_seconds.max(0.01)), 0),
    ];
    report.nums("bare", &rows);

    let topics = (input.as_str(), output.as_str());
    let service = run_service(
        &args,
        &broker,
        topics,
        &windows,
        &expected,
        produced.records,
    )?;
    service.rows(&mut report, bare_rate);

    println!("\n{}", report.markdown());
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report.json())?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("[bench] wrote {}", path.display());
    }
    Ok(())
}

/// `CHECKPOINTER_BIN` if set, else the release build, which the harness then uses.
fn service_binary() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("CHECKPOINTER_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(|d| workspace_dir().join(d))
        .unwrap_or_else(|| workspace_dir().join("target"));
    let bin = target.join("release").join("checkpointer");
    ensure!(
        bin.is_file(),
        "{} missing: cargo build --release --bin checkpointer (scripts/bench-e2e.sh does it)",
        bin.display()
    );
    std::env::set_var("CHECKPOINTER_BIN", &bin);
    Ok(bin)
}
