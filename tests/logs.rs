//! `log.format: json` writes one JSON object per line, with one line per checkpoint and per
//! restore carrying id, duration and bytes; a SASL password in `kafka.options` never appears in
//! the log (even at debug level) or in `check-config`. The real binary against librdkafka's
//! mock cluster.

use std::process::Command;
use std::time::Duration;

use integration_tests::free_addr;
use integration_tests::http::try_get;
use integration_tests::metrics::metric;
use integration_tests::mock_cluster::{mock_cluster, produce};
use integration_tests::process::spawn_service;

const BIN: &str = env!("CARGO_BIN_EXE_checkpointer");

const SECRET: &str = "pa55-w0rd-that-must-not-leak";
const T0: i64 = 1_700_000_000_000;

/// The log's lines as JSON objects; panics on a line that is not one.
fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect()
}

fn with_message<'a>(lines: &'a [serde_json::Value], message: &str) -> Vec<&'a serde_json::Value> {
    lines
        .iter()
        .filter(|l| l["fields"]["message"] == message)
        .collect()
}

#[test]
fn json_logs_carry_checkpoints_and_restores_and_never_a_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_cluster, brokers, producer) = mock_cluster(1).expect("mock cluster");
    let addr = free_addr().expect("free port");
    let yaml = format!(
        r#"
kafka:
  brokers: "{brokers}"
  group_id: logs
  topics: [in]
  options: {{ sasl.username: reader, sasl.password: "{SECRET}" }}
input: {{ key: /user, value: /amount, timestamp: /ts }}
windows:
  - {{ name: per_minute, type: tumbling, size: 1m }}
output: {{ topic: out }}
checkpoint: {{ dir: "{}", interval: 300ms }}
http: {{ listen: "{addr}" }}
log: {{ format: json }}
"#,
        dir.path().join("state").display()
    );
    let config = dir.path().join("c.yaml");
    std::fs::write(&config, yaml).expect("write config");

    let shown = Command::new(env!("CARGO_BIN_EXE_checkpointer"))
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .expect("check-config");
    assert!(shown.status.success());
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&shown.stdout),
        String::from_utf8_lossy(&shown.stderr)
    );
    assert!(printed.contains("sasl.password"), "{printed}");
    assert!(
        !printed.contains(SECRET),
        "check-config shows the password:\n{printed}"
    );

    let log = dir.path().join("first.log");
    let mut service = spawn_service(BIN, &config, &log, "debug").expect("spawn checkpointer");
    service
        .wait_for("ready", Duration::from_secs(30), || {
            try_get(addr, "/readyz").is_some_and(|r| r.status == 200)
        })
        .expect("wait");
    let records: Vec<(String, i64, i64)> = (0..20)
        .map(|i| (format!("u{}", i % 4), T0 + i * 100, 2))
        .collect();
    produce(&producer, |_| 0, &records).expect("produce");
    service
        .wait_for("checkpoints", Duration::from_secs(30), || {
            metric(addr, "checkpointer_records_consumed_total") >= 20.0
                && metric(addr, "checkpointer_checkpoints_completed_total") >= 2.0
        })
        .expect("wait");
    assert_eq!(service.terminate().expect("SIGTERM").code(), Some(0));

    let text = std::fs::read_to_string(&log).expect("log");
    assert!(!text.contains(SECRET), "the log shows the password");
    let lines = json_lines(&text);
    assert!(
        lines.iter().any(|l| l["level"] == "DEBUG"),
        "ran at debug level"
    );
    let checkpoints = with_message(&lines, "checkpoint completed");
    assert!(checkpoints.len() >= 2, "{text}");
    for c in &checkpoints {
        let f = &c["fields"];
        assert!(f["checkpoint_id"].as_u64().is_some(), "{c}");
        assert!(f["duration_ms"].as_u64().is_some(), "{c}");
        assert!(f["bytes"].as_u64().is_some_and(|b| b > 0), "{c}");
    }
    let last_id = checkpoints
        .iter()
        .filter_map(|c| c["fields"]["checkpoint_id"].as_u64())
        .max()
        .expect("ids");

    // the restart logs one restore line naming what it restored (before it joins the group,
    // which the mock cluster holds up until the old member's session has expired)
    let log = dir.path().join("second.log");
    let mut service = spawn_service(BIN, &config, &log, "debug").expect("spawn checkpointer");
    service
        .wait_for("the restore", Duration::from_secs(30), || {
            std::fs::read_to_string(&log).is_ok_and(|t| t.contains(r#""message":"restored""#))
                && try_get(addr, "/healthz").is_some_and(|r| r.status == 200)
        })
        .expect("wait");
    assert_eq!(service.terminate().expect("SIGTERM").code(), Some(0));
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(!text.contains(SECRET), "the log shows the password");
    let lines = json_lines(&text);
    let restores = with_message(&lines, "restored");
    assert_eq!(restores.len(), 1, "{text}");
    let f = &restores[0]["fields"];
    assert!(
        f["checkpoint_id"].as_u64().is_some_and(|id| id >= last_id),
        "{f}"
    );
    assert_eq!(f["entries"].as_u64(), Some(4), "{f}");
    assert!(f["bytes"].as_u64().is_some_and(|b| b > 0), "{f}");
    assert!(f["duration_ms"].as_u64().is_some(), "{f}");
}
