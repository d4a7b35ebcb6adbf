//! The owner epoch fences a store: a running instance that finds a newer claim of its store
//! (as a second process on a volume without reliable file locks would make) writes nothing
//! more and exits 1 naming the newer owner, leaving its last checkpoint intact; the next start
//! claims the store with a higher epoch and resumes from it. Runs the real binary against
//! librdkafka's mock cluster.

use std::time::{Duration, Instant};

use checkpointer::store::{read_owner_file, Owner, Store, OWNER_FILE};

mod common;
use common::{free_addr, get, metric, mock_cluster, nix_kill, produce, spawn_service, wait};

const T0: i64 = 1_700_000_000_000;

#[test]
fn a_newer_owner_stops_the_running_instance_and_the_next_start_resumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let (_cluster, brokers, producer) = mock_cluster(1);
    let addr = free_addr();
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
    let mut service = spawn_service(&config, &log);
    wait(
        "the admin endpoint",
        Duration::from_secs(30),
        &mut service.0,
        || get(addr, "/healthz").is_some_and(|(s, _)| s == 200),
    );
    let mine = read_owner_file(&state)
        .expect("owner file")
        .expect("the start claimed the store");
    assert_eq!(
        (mine.epoch, mine.instance.as_str(), mine.pid),
        (1, "pod-0", service.0.id())
    );

    let batch = |from: usize| -> Vec<(String, i64, i64)> {
        (from..from + 50)
            .map(|i| (format!("u{}", i % 5), T0 + i as i64 * 100, 1))
            .collect()
    };
    produce(&producer, |_| 0, &batch(0));
    wait(
        "a checkpoint with records",
        Duration::from_secs(30),
        &mut service.0,
        || metric(addr, "checkpointer_records_consumed_total") >= 50.0,
    );
    wait(
        "a durable checkpoint",
        Duration::from_secs(30),
        &mut service.0,
        || metric(addr, "checkpointer_checkpoint_last_completed_id") >= 1.0,
    );

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
    produce(&producer, |_| 0, &batch(50));

    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = service.0.try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the superseded instance kept running\n{}",
            log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
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
        head <= last_before + 1,
        "checkpoints were written after the newer claim: head {head}, last seen {last_before}"
    );

    // the next start claims above the newer owner and resumes from the intact checkpoint
    let mut service = spawn_service(&config, &log);
    wait(
        "the restarted admin endpoint",
        Duration::from_secs(30),
        &mut service.0,
        || get(addr, "/healthz").is_some_and(|(s, _)| s == 200),
    );
    let next = read_owner_file(&state).expect("read").expect("claim");
    assert_eq!(next.epoch, newer.epoch + 1);
    assert!(
        log_text()
            .lines()
            .any(|l| l.contains(" restored ") && l.contains(&format!("checkpoint_id={head} "))),
        "the restart resumes from checkpoint {head}\n{}",
        log_text()
    );
    nix_kill(&service.0, "TERM");
    let status = service.0.wait().expect("wait");
    assert_eq!(status.code(), Some(0), "{}", log_text());
}
