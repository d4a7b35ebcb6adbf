//! A held position the broker reports out of range (records deleted, topic recreated) is never
//! skipped silently: the service stays at its position, counts
//! `checkpointer_offset_out_of_range_total`, warns, processes nothing it would have to skip to,
//! and stays up. Two mock clusters stand in for the topic before and after it lost its records.

use std::time::Duration;

use integration_tests::free_addr;
use integration_tests::http::try_get;
use integration_tests::metrics::metric;
use integration_tests::mock_cluster::{mock_cluster, produce, Cluster};
use integration_tests::process::spawn_service;

const BIN: &str = env!("CARGO_BIN_EXE_checkpointer");

fn records(n: i64) -> Vec<(String, i64, i64)> {
    (0..n)
        .map(|i| (format!("k{}", i % 3), 1_700_000_000_000 + i * 100, 1))
        .collect()
}

fn cluster_with(n: i64) -> (Cluster, String) {
    let (cluster, brokers, producer) = mock_cluster(1).expect("mock cluster");
    produce(&producer, |_| 0, &records(n)).expect("produce");
    (cluster, brokers)
}

#[test]
fn a_position_out_of_range_is_held_not_skipped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let config = |brokers: &str, addr: std::net::SocketAddr| {
        let yaml = format!(
            r#"
kafka: {{ brokers: "{brokers}", group_id: oor, topics: [in] }}
input: {{ key: /user, value: /amount, timestamp: /ts }}
windows: [ {{ name: t, type: tumbling, size: 1h }} ]
output: {{ topic: out }}
checkpoint: {{ dir: "{}", interval: 200ms }}
http: {{ listen: "{addr}" }}
"#,
            state.display()
        );
        let path = dir.path().join(format!("c-{}.yaml", addr.port()));
        std::fs::write(&path, yaml).expect("config");
        path
    };

    // first life: 50 records consumed and checkpointed, clean stop
    {
        let (_cluster, brokers) = cluster_with(50);
        let addr = free_addr().expect("free port");
        let mut service = spawn_service(
            BIN,
            &config(&brokers, addr),
            &dir.path().join("first.log"),
            "info",
        )
        .expect("spawn checkpointer");
        service
            .wait_for("50 records consumed", Duration::from_secs(60), || {
                metric(addr, "checkpointer_records_consumed_total") == 50.0
            })
            .expect("wait");
        let status = service.terminate().expect("SIGTERM");
        assert_eq!(status.code(), Some(0));
    }

    // second life: the topic now holds 10 records; the held position 50 is out of range
    let (_cluster, brokers) = cluster_with(10);
    let addr = free_addr().expect("free port");
    let log = dir.path().join("second.log");
    let mut service =
        spawn_service(BIN, &config(&brokers, addr), &log, "info").expect("spawn checkpointer");
    service
        .wait_for(
            "the out-of-range position to be reported",
            Duration::from_secs(60),
            || metric(addr, "checkpointer_offset_out_of_range_total") >= 1.0,
        )
        .expect("wait");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        service.try_wait().expect("try_wait").is_none(),
        "the service exited"
    );
    assert_eq!(
        metric(addr, "checkpointer_records_consumed_total"),
        0.0,
        "records were read from a position the service does not hold"
    );
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains("held position out of range"), "{text}");
    assert!(try_get(addr, "/healthz").is_some_and(|r| r.status == 200));
    let status = service.terminate().expect("SIGTERM");
    assert_eq!(status.code(), Some(0), "{text}");
    // the checkpoint still holds position 50
    let store =
        checkpointer::store::Store::open(&state, checkpointer::store::Open::Create).expect("open");
    let (meta, _) = store.load().expect("load").expect("checkpoint");
    let next: Vec<i64> = meta
        .partitions
        .iter()
        .filter_map(|p| p.next.map(|n| n.0))
        .collect();
    assert_eq!(next, vec![50]);
}
