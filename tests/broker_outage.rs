//! A broker that goes away while the service runs: the service stays up, `/readyz` turns 503,
//! nothing is lost, and once the broker is back it finishes the stream with exact results.
//! Uses librdkafka's mock cluster (in this test process, listening on loopback) for the fault
//! injection; the service is the real binary. The outage is shorter than the group session:
//! the mock cluster does not serve group requests of clients that were connected across a
//! `broker_down`/`broker_up` (their requests time out), so an outage long enough to expire the
//! session cannot be tested with it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use integration_tests::free_addr;
use integration_tests::http::try_get;
use integration_tests::metrics::metric;
use integration_tests::mock_cluster::{self, consumer, mock_cluster, produce};
use integration_tests::process::spawn_service;
use rdkafka::message::Message;

const BIN: &str = env!("CARGO_BIN_EXE_checkpointer");
const WINDOW_MS: i64 = 10_000;
const START: i64 = 1_700_000_000_000;

/// (key, ts, amount) records; per key, one per second.
fn records(from_s: i64, to_s: i64) -> Vec<(String, i64, i64)> {
    (from_s..to_s)
        .flat_map(|s| (0..4).map(move |k| (format!("k{k}"), START + s * 1000 + k * 10, s + k)))
        .collect()
}

#[test]
fn broker_outage_is_survived_without_loss() {
    let (cluster, brokers, producer) = mock_cluster(2).expect("mock cluster");
    // keys are spread over both partitions by record index
    let first = records(0, 40);
    produce(&producer, |i| (i % 2) as i32, &first).expect("produce");

    let dir = tempfile::tempdir().expect("tempdir");
    let addr = free_addr().expect("free port");
    let yaml = format!(
        r#"
kafka: {{ brokers: "{brokers}", group_id: outage, topics: [in], options: {{ session.timeout.ms: "30000" }} }}
input: {{ key: /user, value: /amount, timestamp: /ts }}
windows: [ {{ name: t, type: tumbling, size: 10s }} ]
watermark: {{ max_out_of_orderness: 1s }}
output: {{ topic: out }}
checkpoint: {{ dir: "{}", interval: 300ms }}
http: {{ listen: "{addr}" }}
"#,
        dir.path().join("state").display()
    );
    let config = dir.path().join("c.yaml");
    std::fs::write(&config, yaml).expect("config");
    let mut child = spawn_service(BIN, &config, &dir.path().join("service.log"), "info")
        .expect("spawn checkpointer");
    let log_tail = || std::fs::read_to_string(dir.path().join("service.log")).unwrap_or_default();

    child
        .wait_for("ready", Duration::from_secs(60), || {
            try_get(addr, "/readyz").is_some_and(|r| r.status == 200)
        })
        .expect("wait");
    child
        .wait_for("first records consumed", Duration::from_secs(60), || {
            metric(addr, "checkpointer_records_consumed_total") == first.len() as f64
        })
        .expect("wait");

    cluster.broker_down(1).expect("broker down");
    child
        .wait_for(
            "readyz 503 during the outage",
            Duration::from_secs(60),
            || try_get(addr, "/readyz").is_some_and(|r| r.status == 503),
        )
        .expect("wait");
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "service died during the outage:\n{}",
        log_tail()
    );
    cluster.broker_up(1).expect("broker up");

    // more data after the outage, then sentinels on both partitions; a new client, because an
    // idle producer of this process does not reconnect to the mock broker after it comes back
    let producer = mock_cluster::producer(&brokers).expect("producer");
    let second = records(40, 80);
    produce(&producer, |i| (i % 2) as i32, &second).expect("produce");
    let sentinels = vec![
        ("~flush".to_string(), START + 3_600_000, 0),
        ("~flush".to_string(), START + 3_600_000, 0),
    ];
    produce(&producer, |i| i as i32, &sentinels).expect("produce");

    let mut expected: BTreeMap<String, (u64, i64)> = BTreeMap::new();
    for (key, ts, amount) in first.iter().chain(&second) {
        let start = ts - ts.rem_euclid(WINDOW_MS);
        let e = expected.entry(format!("t/{key}/{start}")).or_default();
        e.0 += 1;
        e.1 += amount;
    }
    let reader = consumer(&brokers, "outage-reader", "out").expect("reader");
    let mut seen: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen.len() < expected.len() && Instant::now() < deadline {
        if let Some(Ok(m)) = reader.poll(Duration::from_millis(200)) {
            let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
            let payload = m.payload().unwrap_or_default().to_vec();
            if let Some(prev) = seen.insert(key.clone(), payload.clone()) {
                assert_eq!(prev, payload, "window {key} re-sent with different bytes");
            }
        }
    }
    let missing: Vec<&String> = expected.keys().filter(|k| !seen.contains_key(*k)).collect();
    let extra: Vec<&String> = seen.keys().filter(|k| !expected.contains_key(*k)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "emitted windows differ from the expected ones: missing {missing:?}, extra {extra:?}\n{}",
        log_tail()
            .lines()
            .filter(|l| !l.contains("checkpoint completed"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    for (key, (count, sum)) in &expected {
        let v: serde_json::Value = serde_json::from_slice(&seen[key]).expect("json");
        assert_eq!(v["count"].as_u64(), Some(*count), "{key}");
        assert_eq!(v["sum"].as_f64(), Some(*sum as f64), "{key}");
    }
    // the checkpoint history shows completed checkpoints with the offsets they hold
    let response = try_get(addr, "/api/checkpoints?limit=5").expect("api");
    let (status, body) = (response.status, response.body);
    assert_eq!(status, 200);
    let api: serde_json::Value = serde_json::from_str(&body).expect("api json");
    let list = api["checkpoints"].as_array().expect("checkpoints list");
    assert!(!list.is_empty() && list.len() <= 5, "{body}");
    let ids: Vec<u64> = list.iter().filter_map(|c| c["id"].as_u64()).collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first: {ids:?}");
    let done = list
        .iter()
        .find(|c| c["status"] == "completed")
        .expect("a completed checkpoint");
    assert!(
        done["bytes"].as_u64().is_some() && done["duration_ms"].as_u64().is_some(),
        "{done}"
    );
    let partitions = done["partitions"].as_array().expect("partitions");
    let total: i64 = partitions
        .iter()
        .filter_map(|p| p["next_offset"].as_i64())
        .sum();
    assert_eq!(total as usize, first.len() + second.len() + 2, "{done}");
    child
        .wait_for(
            "ready again after the outage",
            Duration::from_secs(30),
            || try_get(addr, "/readyz").is_some_and(|r| r.status == 200),
        )
        .expect("wait");
    let status = child.terminate().expect("SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", log_tail());
}
