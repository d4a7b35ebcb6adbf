//! A held position the broker reports out of range (records deleted, topic recreated) is never
//! skipped silently: with `kafka.on_offset_out_of_range: fail` (the default) the service
//! processes nothing, exits 1 naming the partition, the held position and the broker's
//! offsets, and leaves its checkpoint as it is. Two mock clusters stand in for the topic
//! before and after it lost its records (the policies on the real broker:
//! `integration-tests/tests/out_of_range.rs`).

use std::time::Duration;

use integration_tests::free_addr;
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
fn a_position_out_of_range_stops_the_service_with_its_checkpoint_intact() {
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
    let status = service
        .wait_exit(Duration::from_secs(60))
        .expect("wait")
        .expect("the service stops by itself");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(
        text.contains(
            "partition in[0]: the held position 50 is out of range: the broker has offsets 0 to 10"
        ),
        "{text}"
    );
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
