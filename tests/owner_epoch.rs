//! The owner epoch fences a store: a running instance that finds a newer claim of its store
//! (as a second process on a volume without reliable file locks would make) writes nothing
//! more and exits 1 naming the newer owner, leaving its last checkpoint intact; the next start
//! claims the store with a higher epoch and resumes from it. Runs the real binary against
//! librdkafka's mock cluster.

use std::time::Duration;

use checkpointer::store::{read_owner_file, Owner, Store, OWNER_FILE};
use integration_tests::free_addr;
use integration_tests::http::try_get;
use integration_tests::metrics::metric;
use integration_tests::mock_cluster::{mock_cluster, produce};
use integration_tests::process::spawn_service;

const BIN: &str = env!("CARGO_BIN_EXE_checkpointer");

const T0: i64 = 1_700_000_000_000;

#[test]
fn a_newer_owner_stops_the_running_instance_and_the_next_start_resumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let (_cluster, brokers, producer) = mock_cluster(1).expect("mock cluster");
    let addr = free_addr().expect("free port");
    let yaml = format!(
        r#"
kafka: {{ brokers: "{brokers}", group_id: owner, topics: [in], instance_id: pod-0 }}
input: {{ key: /user, value: /amount, timestamp: /ts }}
windows:
  - {{ name: per_minute, type: tumbling, size: 1m }}
aggregates: [count, sum]
output: {{ topic: out }}
checkpoint: {{ dir: "{}", interval: 200ms }}
http: {{ listen: "{addr}" }}
"#,
        state.display()
    );
    let config = dir.path().join("c.yaml");
    std::fs::write(&config, yaml).expect("write config");
    let log = dir.path().join("service.log");
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let mut service = spawn_service(BIN, &config, &log, "info").expect("spawn checkpointer");
    service
        .wait_for("the admin endpoint", Duration::from_secs(30), || {
            try_get(addr, "/healthz").is_some_and(|r| r.status == 200)
        })
        .expect("wait");
    let mine = read_owner_file(&state)
        .expect("owner file")
        .expect("the start claimed the store");
    assert_eq!(
        (mine.epoch, mine.instance.as_str(), mine.pid),
        (1, "pod-0", service.id())
    );

    let batch = |from: usize| -> Vec<(String, i64, i64)> {
        (from..from + 50)
            .map(|i| (format!("u{}", i % 5), T0 + i as i64 * 100, 1))
            .collect()
    };
    produce(&producer, |_| 0, &batch(0)).expect("produce");
    service
        .wait_for("a checkpoint with records", Duration::from_secs(30), || {
            metric(addr, "checkpointer_records_consumed_total") >= 50.0
        })
        .expect("wait");
    service
        .wait_for("a durable checkpoint", Duration::from_secs(30), || {
            metric(addr, "checkpointer_checkpoint_last_completed_id") >= 1.0
        })
        .expect("wait");

    // a second process claims the volume
    let newer = Owner {
        epoch: mine.epoch + 1,
        instance: "pod-0-replacement".into(),
        pid: 1,
        claimed_at_ms: mine.claimed_at_ms + 1,
    };
    let last_before = metric(addr, "checkpointer_checkpoint_last_completed_id") as u64;
    std::fs::write(
        state.join(OWNER_FILE),
        serde_json::to_vec(&newer).expect("json"),
    )
    .expect("write owner file");
    produce(&producer, |_| 0, &batch(50)).expect("produce");

    let status = service
        .wait_exit(Duration::from_secs(30))
        .expect("try_wait")
        .unwrap_or_else(|| panic!("the superseded instance kept running\n{}", log_text()));
    assert_eq!(status.code(), Some(1), "{}", log_text());
    assert!(
        log_text().contains("claimed by a newer owner, epoch 2 (pod-0-replacement, pid 1)"),
        "the error names the newer owner\n{}",
        log_text()
    );
    // it left the newer claim alone and wrote no checkpoint after seeing it (one whose check
    // ran before the file was replaced may have landed)
    assert_eq!(read_owner_file(&state).expect("read"), Some(newer.clone()));
    let head = Store::open(&state, checkpointer::store::Open::Inspect)
        .expect("open the store")
        .head()
        .expect("head")
        .expect("a head checkpoint");
    assert!(
        head <= checkpointer::checkpoint_id::CheckpointId(last_before + 1),
        "checkpoints were written after the newer claim: head {head}, last seen {last_before}"
    );

    // the next start claims above the newer owner and resumes from the intact checkpoint
    let mut service = spawn_service(BIN, &config, &log, "info").expect("spawn checkpointer");
    service
        .wait_for(
            "the restarted admin endpoint",
            Duration::from_secs(30),
            || try_get(addr, "/healthz").is_some_and(|r| r.status == 200),
        )
        .expect("wait");
    let next = read_owner_file(&state).expect("read").expect("claim");
    assert_eq!(next.epoch, newer.epoch + 1);
    assert!(
        log_text()
            .lines()
            .any(|l| l.contains(" restored ") && l.contains(&format!("checkpoint_id={head} "))),
        "the restart resumes from checkpoint {head}\n{}",
        log_text()
    );
    let status = service.terminate().expect("SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", log_text());
}
