//! Checkpoints that keep failing stop the service: the store sits on a small tmpfs that fills
//! up once the service has checkpointed some data, sled's writes fail, and after more consecutive
//! failures than `checkpoint.tolerable_failures` the real binary exits 1 with a message saying so.
//! The last good checkpoint stays readable and a new process resumes from it.
//!
//! Needs root (to mount the tmpfs), as CI has; elsewhere it says so and does nothing.

use std::process::Command;
use std::time::Duration;

use integration_tests::http::try_get;
use integration_tests::metrics::metric;
use integration_tests::mock_cluster::{mock_cluster, produce};
use integration_tests::process::spawn_service;
use integration_tests::{copy_dir, free_addr, poll};

const BIN: &str = env!("CARGO_BIN_EXE_checkpointer");

struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

#[test]
fn repeated_checkpoint_failures_stop_the_service_with_the_last_checkpoint_intact() {
    if !is_root() {
        eprintln!(
            "disk_full: not root, cannot mount a tmpfs; this test needs root (CI runs as root)"
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mnt = dir.path().join("small");
    std::fs::create_dir(&mnt).expect("mkdir");
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=32m", "tmpfs"])
        .arg(&mnt)
        .status()
        .expect("mount");
    assert!(
        status.success(),
        "mounting a tmpfs failed although running as root"
    );
    let _mount = Mount(mnt.clone());

    let (_cluster, brokers, producer) = mock_cluster(1).expect("mock cluster");
    // every record opens a new key in a one-hour window
    let start = 1_700_000_000_000i64;
    let batch = |from: i64, to: i64| -> Vec<(String, i64, i64)> {
        (from..to)
            .map(|i| (format!("key-{i:08}"), start + i, 1))
            .collect()
    };
    const FIRST: i64 = 2_000;
    produce(&producer, |_| 0, &batch(0, FIRST)).expect("produce");

    let addr = free_addr().expect("free port");
    let state = mnt.join("state");
    let yaml = format!(
        r#"
kafka: {{ brokers: "{brokers}", group_id: diskfull, topics: [in] }}
input: {{ key: /user, value: /amount, timestamp: /ts }}
windows: [ {{ name: h, type: tumbling, size: 1h }} ]
output: {{ topic: out }}
checkpoint: {{ dir: "{}", interval: 200ms, tolerable_failures: 2 }}
http: {{ listen: "{addr}" }}
"#,
        state.display()
    );
    let config = dir.path().join("c.yaml");
    std::fs::write(&config, &yaml).expect("config");
    let log = dir.path().join("service.log");
    let mut guard = spawn_service(BIN, &config, &log, "info").expect("spawn checkpointer");
    guard
        .wait_for(
            "the first records consumed",
            Duration::from_secs(60),
            || metric(addr, "checkpointer_records_consumed_total") == FIRST as f64,
        )
        .expect("wait");
    let consumed_at = metric(addr, "checkpointer_checkpoint_last_completed_id");
    guard
        .wait_for("a checkpoint holding them", Duration::from_secs(30), || {
            metric(addr, "checkpointer_checkpoint_last_completed_id") >= consumed_at + 2.0
        })
        .expect("wait");
    // now the disk fills up, and more records arrive
    let _ = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", mnt.join("filler").display()))
        .args(["bs=64k", "status=none"])
        .status();
    produce(&producer, |_| 0, &batch(FIRST, FIRST + 500)).expect("produce");
    let status = guard
        .wait_exit(Duration::from_secs(120))
        .expect("try_wait")
        .unwrap_or_else(|| {
            panic!(
                "the service kept running on a full disk:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(
        text.contains("3 consecutive checkpoints failed (tolerable: 2)"),
        "no clear message:\n{text}"
    );
    assert!(
        text.contains("checkpoint completed"),
        "no checkpoint ever completed:\n{text}"
    );

    // the last good checkpoint is intact: readable, and a new process resumes from it
    let rescued = dir.path().join("rescued");
    copy_dir(&state, &rescued).expect("copy the store");
    let store = checkpointer::store::Store::open(&rescued, checkpointer::store::Open::Create)
        .expect("open the store after the failures");
    let (meta, restored) = store.load().expect("load").expect("a checkpoint survived");
    let next = meta
        .partitions
        .iter()
        .filter_map(|p| p.next)
        .map(|n| n.0)
        .sum::<i64>();
    assert!(
        next >= FIRST && !restored.entries.is_empty(),
        "empty checkpoint {meta:?}\n{}",
        text.lines()
            .filter(|l| !l.contains("checkpoint completed"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        restored.entries.len() as i64,
        next,
        "one open window per record consumed"
    );
    drop(store);
    let addr2 = free_addr().expect("free port");
    let yaml2 = yaml
        .replace(&state.display().to_string(), &rescued.display().to_string())
        .replace(&addr.to_string(), &addr2.to_string())
        // a new group: the old member's session has not expired, and the checkpoint, not the
        // group's committed offsets, decides where reading resumes
        .replace("group_id: diskfull", "group_id: diskfull-restart");
    let config2 = dir.path().join("c2.yaml");
    std::fs::write(&config2, yaml2).expect("config");
    let mut again = spawn_service(BIN, &config2, &dir.path().join("service2.log"), "info")
        .expect("spawn checkpointer");
    let log2_path = dir.path().join("service2.log");
    let ready = poll(Duration::from_secs(60), Duration::from_millis(200), || {
        Ok(try_get(addr2, "/readyz")
            .is_some_and(|r| r.status == 200)
            .then_some(()))
    })
    .expect("poll");
    assert!(
        ready.is_some(),
        "the restarted service is not ready:\n{}",
        std::fs::read_to_string(&log2_path).unwrap_or_default()
    );
    again
        .wait_for(
            "the restarted service to resume, not replay",
            Duration::from_secs(30),
            || metric(addr2, "checkpointer_records_consumed_total") == (FIRST + 500 - next) as f64,
        )
        .expect("wait");
    let log2 = std::fs::read_to_string(dir.path().join("service2.log")).unwrap_or_default();
    assert!(
        log2.contains(&format!("checkpoint_id={}", meta.id)),
        "did not restore checkpoint {}:\n{log2}",
        meta.id
    );
}
