//! The publisher against librdkafka's mock cluster: tombstones only ever follow an
//! acknowledged publication, and what was published replays to the published state.

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

use super::*;
use crate::changelog::protocol::{chunks, Kind, Tag, MAX_CHUNK_BYTES, MAX_WHOLE_GROUP_BYTES};
use crate::checkpoint_id::CheckpointId;
use crate::engine::{Acc, Entry, EntryStatus, PartitionState, StateKey};
use crate::event_time::EventTime;
use crate::position::NextOffset;

const TOPIC: &str = "changelog";

fn cluster() -> (MockCluster<'static, DefaultProducerContext>, ClientConfig) {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic(TOPIC, 2, 1).expect("topic");
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", cluster.bootstrap_servers());
    (cluster, client)
}

fn source() -> Partition {
    Partition::new("events", 0)
}

/// A publication of `n` entries for partition 0, keys padded to `pad` bytes.
fn publication(run: u64, checkpoint: u64, n: usize, pad: usize, value: f64) -> Vec<Chunk> {
    let entries: Vec<(StateKey, Entry)> = (0..n)
        .map(|i| {
            (
                StateKey {
                    partition: Some(source()),
                    window: 0,
                    start: 0,
                    // `pad` letters that do not compress (groups travel compressed)
                    key: (0..pad.max(1) as u64)
                        .map(|j| {
                            let h =
                                xxhash_rust::xxh3::xxh3_64(&(i as u64 * 65_536 + j).to_be_bytes());
                            char::from(b'a' + (h % 26) as u8)
                        })
                        .collect(),
                },
                Entry {
                    status: EntryStatus::Open,
                    end: 60_000,
                    acc: Acc::of(Some(value)),
                },
            )
        })
        .collect();
    chunks(
        "g",
        Tag {
            run,
            checkpoint: CheckpointId(checkpoint),
        },
        Kind::Full,
        PartitionState {
            partition: source(),
            next: Some(NextOffset(checkpoint as i64 * 100)),
            max_ts: Some(EventTime(1)),
        },
        Some(EventTime(1)),
        crate::engine::group::group_entries(&Default::default(), entries)
            .into_iter()
            .map(|g| crate::changelog::protocol::GroupChange {
                group: g.id.group,
                blob: crate::engine::group::encode_blob(&g.entries()).expect("blob"),
            })
            .collect(),
        2,
        MAX_CHUNK_BYTES,
        MAX_WHOLE_GROUP_BYTES,
    )
}

/// Every record of the changelog partition holding `source()`: (offset, key, is tombstone).
fn records(client: &ClientConfig, topic: &ChangelogTopic) -> Vec<(i64, String, bool)> {
    let consumer: BaseConsumer = client
        .clone()
        .set("group.id", "test-reader")
        .set("enable.partition.eof", "true")
        .create()
        .expect("consumer");
    let partition = topic.partition_of(&source());
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(TOPIC, partition, Offset::Beginning)
        .expect("tpl");
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => out.push((
                m.offset(),
                String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                m.payload().is_none(),
            )),
            Some(Err(KafkaError::PartitionEOF(_))) => break,
            _ => {}
        }
    }
    out
}

async fn publish(
    publisher: &Publisher,
    batch_chunks: Vec<Chunk>,
    tombstones: Vec<String>,
) -> Result<(), String> {
    let (done, answer) = oneshot::channel();
    publisher.publish(Batch {
        chunks: batch_chunks,
        tombstones: tombstones.into_iter().map(|k| (k, source())).collect(),
        done: Some(done),
    });
    answer.await.expect("publisher answers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstones_follow_the_publication_that_supersedes_them() {
    let (_cluster, client) = cluster();
    let topic = ChangelogTopic::lookup(client.clone(), TOPIC).expect("lookup");
    let (publisher, _failures, _task) = Publisher::start(topic.clone()).expect("publisher");
    let old = publication(1, 1, 5, 1, 1.0);
    let old_keys: Vec<String> = old.iter().map(Chunk::record_key).collect();
    publish(&publisher, old, Vec::new())
        .await
        .expect("first publication");
    let new = publication(2, 7, 5, 1, 2.0);
    let new_keys: Vec<String> = new.iter().map(Chunk::record_key).collect();
    publish(&publisher, new, old_keys.clone())
        .await
        .expect("second publication with tombstones");

    let seen = {
        let (client, topic) = (client.clone(), topic.clone());
        tokio::task::spawn_blocking(move || records(&client, &topic))
            .await
            .expect("reader")
    };
    let offset_of = |key: &str, tombstone: bool| {
        seen.iter()
            .find(|(_, k, t)| k == key && *t == tombstone)
            .map(|(o, _, _)| *o)
            .unwrap_or_else(|| panic!("no record {key} (tombstone: {tombstone}) in {seen:?}"))
    };
    let last_new = new_keys
        .iter()
        .map(|k| offset_of(k, false))
        .max()
        .expect("chunks");
    for key in &old_keys {
        assert!(
            offset_of(key, true) > last_new,
            "tombstone of {key} before the new chunks: {seen:?}"
        );
    }
    // what a new owner reads back is the new publication, whole
    let (client_topic, group) = (topic.clone(), "g".to_string());
    let (states, reports) = tokio::task::spawn_blocking(move || {
        let mut reports = Vec::new();
        let states = read_states(
            &client_topic,
            &group,
            &[source()],
            &mut |p, r| reports.push((p.clone(), r)),
            &AtomicBool::new(false),
        );
        (states, reports)
    })
    .await
    .expect("reader task");
    let states = states.expect("read");
    // progress counts down from every record of the changelog partition, bytes grow to all of
    // them
    let total = seen.len() as i64;
    assert_eq!(reports.first().map(|(_, r)| r.records_left), Some(total));
    let last = reports.last().expect("reports").1;
    assert_eq!(last.records_left, 0);
    let lefts: Vec<i64> = reports.iter().map(|(_, r)| r.records_left).collect();
    assert!(lefts.windows(2).all(|w| w[1] <= w[0]), "{lefts:?}");
    let min_bytes: usize = seen.iter().map(|(_, k, _)| k.len()).sum();
    assert!(last.bytes_read as usize > min_bytes, "{last:?}");
    assert!(reports.iter().all(|(p, _)| *p == source()));
    let state = states.get(&source()).expect("a committed state");
    assert_eq!(state.next_offset(), Some(700));
    assert_eq!(state.entries.len(), 5);
    assert!(
        state.entries.iter().all(|(_, e)| e.acc.sum == 2.0),
        "{:?}",
        state.entries
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_that_fails_sends_no_tombstones_and_is_reported() {
    let (_cluster, mut client) = cluster();
    let topic = ChangelogTopic::lookup(client.clone(), TOPIC).expect("lookup");
    let (publisher, _, _task) = Publisher::start(topic.clone()).expect("publisher");
    let old = publication(1, 1, 2, 1, 1.0);
    let old_keys: Vec<String> = old.iter().map(Chunk::record_key).collect();
    publish(&publisher, old, Vec::new())
        .await
        .expect("first publication");

    // a second publisher whose chunks exceed its message size limit: every chunk fails
    // locally, while tombstones (a key, no value) would fit
    client.set("message.max.bytes", "1000");
    let small = ChangelogTopic::lookup(client.clone(), TOPIC).expect("lookup");
    let (failing, mut failures, _task) = Publisher::start(small).expect("publisher");
    let big = publication(2, 7, 4, 600, 2.0);
    let answer = publish(&failing, big, old_keys.clone()).await;
    let reason = answer.expect_err("the publication cannot succeed");
    assert!(reason.to_lowercase().contains("size"), "{reason}");
    let failure = failures.recv().await.expect("a failure report");
    assert_eq!(failure.partitions, vec![source()]);

    let seen = tokio::task::spawn_blocking(move || records(&client, &topic))
        .await
        .expect("reader");
    assert!(
        seen.iter().all(|(_, _, tombstone)| !tombstone),
        "a tombstone was sent for an unacknowledged publication: {seen:?}"
    );
    assert_eq!(
        seen.len(),
        old_keys.len(),
        "only the first publication: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_record_fails_the_read_naming_it_or_is_skipped_by_policy() {
    let (_cluster, client) = cluster();
    let topic = ChangelogTopic::lookup(client.clone(), TOPIC).expect("lookup");
    let (publisher, _failures, _task) = Publisher::start(topic.clone()).expect("publisher");
    publish(&publisher, publication(1, 1, 5, 1, 1.0), Vec::new())
        .await
        .expect("publication");
    // a changelog record (its magic) whose checksum does not match: damaged on the way
    let producer: FutureProducer = client.clone().create().expect("producer");
    let mut damaged = b"CKCL\0\0\0\x02\0\0\0\0".to_vec();
    damaged.extend_from_slice(b"not what the checksum says");
    let delivery = producer
        .send(
            FutureRecord::to(TOPIC)
                .partition(topic.partition_of(&source()))
                .key("damaged")
                .payload(&damaged),
            Duration::from_secs(5),
        )
        .await
        .expect("produced");
    let offset = delivery.offset;
    let read = |skip: bool| {
        let topic = ChangelogTopic {
            skip_unreadable: skip,
            ..topic.clone()
        };
        tokio::task::spawn_blocking(move || {
            read_states(
                &topic,
                "g",
                &[source()],
                &mut |_, _| {},
                &AtomicBool::new(false),
            )
        })
    };
    let failed = read(false).await.expect("reader").expect_err("unreadable");
    let text = failed.to_string();
    assert!(
        matches!(failed, ChangelogError::Unreadable { offset: o, .. } if o == offset),
        "{text}"
    );
    assert!(
        text.contains(&format!("at offset {offset}")) && text.contains("on_unreadable_changelog"),
        "{text}"
    );
    let states = read(true).await.expect("reader").expect("skipped");
    let state = states.get(&source()).expect("the publication before it");
    assert_eq!(state.next_offset(), Some(100));
    assert_eq!(state.entries.len(), 5);
}
