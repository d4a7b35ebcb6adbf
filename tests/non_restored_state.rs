//! `checkpoint.allow_non_restored_state` does what it says: a start under a configuration that
//! no longer fits part of the restored state drops exactly the open windows that do not fit
//! (counted in `checkpointer_restore_dropped_entries_total`), drops the offsets of topics no
//! longer subscribed, still emits the final windows the snapshot held (also of a window no
//! longer configured, under its old name), and carries on with the windows that fit. Runs the real
//! binary on a copy of the golden format 3 fixture store against librdkafka's mock cluster.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use integration_tests::http::try_get;
use integration_tests::metrics::metric;
use integration_tests::mock_cluster::{consumer, mock_cluster, produce};
use integration_tests::process::spawn_service;
use integration_tests::{copy_dir, free_addr};
use rdkafka::Message;

const BIN: &str = env!("CARGO_BIN_EXE_checkpointer");

/// Event time origin of the fixture (`src/store/golden.rs`).
const T0: i64 = 1_700_000_040_000;

#[test]
fn allowed_non_restored_state_drops_only_what_does_not_fit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/state/v3/store"),
        &state,
    )
    .expect("copy the fixture store");
    let (_cluster, brokers, producer) = mock_cluster(1).expect("mock cluster");
    let addr = free_addr().expect("free port");
    // the window `per_minute` is removed (its open window no longer fits; its final window is
    // still owed) and the fixture's topic `events` is replaced by `in`
    let yaml = format!(
        r#"
kafka: {{ brokers: "{brokers}", group_id: nrs, topics: [in] }}
input: {{ key: /user, value: /amount, timestamp: /ts }}
windows:
  - {{ name: sessions, type: session, gap: 30s }}
aggregates: [count, sum, max]
output: {{ topic: out }}
checkpoint: {{ dir: "{}", interval: 200ms, allow_non_restored_state: true }}
http: {{ listen: "{addr}" }}
"#,
        state.display()
    );
    let config = dir.path().join("c.yaml");
    std::fs::write(&config, yaml).expect("write config");
    let log = dir.path().join("service.log");
    let mut service = spawn_service(BIN, &config, &log, "info").expect("spawn checkpointer");
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    service
        .wait_for("the admin endpoint", Duration::from_secs(30), || {
            try_get(addr, "/healthz").is_some_and(|r| r.status == 200)
        })
        .expect("wait");
    assert_eq!(
        metric(addr, "checkpointer_restore_dropped_entries_total"),
        1.0,
        "the open per_minute window\n{}",
        log_text()
    );
    assert_eq!(
        metric(addr, "checkpointer_restore_dropped_partitions_total"),
        2.0,
        "both partitions of `events`"
    );
    assert!(
        log_text().contains("state not restored"),
        "the log names what was dropped\n{}",
        log_text()
    );

    // one record far ahead pushes the watermark past every restored window
    produce(&producer, |_| 0, &[("zed".into(), T0 + 600_000, 1)]).expect("produce");

    let reader = consumer(&brokers, "nrs-reader", "out").expect("reader");
    let mut seen: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    let alice = format!("per_minute/alice/{}", T0 - 40_000);
    let alice_session = format!("sessions/alice/{}", T0 + 1_000);
    let bob_session = format!("sessions/bob/{}", T0 + 2_000);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut settle: Option<Instant> = None;
    while Instant::now() < deadline && settle.is_none_or(|s| s.elapsed() < Duration::from_secs(3)) {
        if let Some(Ok(m)) = reader.poll(Duration::from_millis(200)) {
            let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
            let value = serde_json::from_slice(m.payload().unwrap_or_default()).expect("json");
            seen.insert(key, value);
        }
        if settle.is_none()
            && [&alice, &alice_session, &bob_session]
                .iter()
                .all(|k| seen.contains_key(*k))
        {
            settle = Some(Instant::now());
        }
    }
    // the final window the snapshot held is emitted as it was, under the removed window's name
    let a = seen
        .get(&alice)
        .unwrap_or_else(|| panic!("{alice} not emitted: {seen:?}\n{}", log_text()));
    assert_eq!(
        (a["count"].as_u64(), a["sum"].as_f64(), a["max"].as_f64()),
        (Some(4), Some(18.5), Some(10.0))
    );
    // the open sessions, which fit, continue from their restored values
    let s = seen
        .get(&alice_session)
        .unwrap_or_else(|| panic!("{alice_session} not emitted: {seen:?}\n{}", log_text()));
    assert_eq!(
        (s["count"].as_u64(), s["sum"].as_f64()),
        (Some(3), Some(17.5))
    );
    let b = seen
        .get(&bob_session)
        .unwrap_or_else(|| panic!("{bob_session} not emitted: {seen:?}"));
    assert_eq!(
        (b["count"].as_u64(), b["sum"].as_f64()),
        (Some(1), Some(-2.0))
    );
    // the dropped open window never comes out
    assert!(
        !seen.keys().any(|k| k.contains("carol")),
        "a dropped window was emitted: {seen:?}"
    );
    assert_eq!(seen.len(), 3, "{seen:?}");

    let status = service.terminate().expect("SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", log_text());
}
