//! The harness against the real broker: topic creation, per-partition produce, read-back.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Result};
use integration_tests::client::read_topic;
use integration_tests::{unique_name, Broker, OutputReader, Producer};
use serde_json::{json, Value};

const PARTITIONS: i32 = 3;
const PER_PARTITION: i64 = 50;

#[test]
fn produces_to_each_partition_and_reads_everything_back() {
    let broker = Broker::shared().unwrap_or_else(|err| panic!("{err:#}"));
    if let Err(err) = round_trip(broker) {
        panic!("{err:#}\nbroker log:\n{}", broker.log_tail(40));
    }
}

fn round_trip(broker: &Broker) -> Result<()> {
    let topic = unique_name("harness");
    broker.create_topic(&topic, PARTITIONS)?;
    ensure!(broker.partition_count(&topic)? == PARTITIONS as usize);

    let mut producer = Producer::new(broker)?;
    for partition in 0..PARTITIONS {
        for i in 0..PER_PARTITION {
            let key = format!("p{partition}-k{}", i % 4);
            let value = json!({"partition": partition, "i": i, "ts": 1_700_000_000_000i64 + i});
            producer.send_json(&topic, partition, Some(&key), &value)?;
        }
    }
    let garbage: &[u8] = b"\xff\x00 not json";
    producer.send_raw(&topic, 1, None, garbage)?;
    producer.send_raw(&topic, 2, Some("empty"), b"")?;
    producer.flush()?;
    let total = (PARTITIONS as i64 * PER_PARTITION + 2) as usize;
    ensure!(producer.delivered() == total as u64);

    let mut reader = OutputReader::new(broker, &topic)?;
    ensure!(
        reader.poll_until(Duration::from_secs(30), |m| m.len() >= total),
        "read {} of {total} messages",
        reader.messages().len()
    );
    // Nothing beyond what was produced shows up.
    reader.drain(Duration::from_millis(500), Duration::from_secs(5));
    let messages = reader.messages();
    ensure!(
        messages.len() == total,
        "read {} messages, produced {total}",
        messages.len()
    );

    let mut per_partition: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    for message in messages {
        if message.key.is_empty() {
            ensure!(message.partition == 1 && message.payload == garbage);
            continue;
        }
        if message.key == "empty" {
            ensure!(message.partition == 2 && message.payload.is_empty());
            continue;
        }
        let value: Value = serde_json::from_slice(&message.payload)?;
        let partition = value["partition"].as_i64().unwrap_or(-1);
        let i = value["i"].as_i64().unwrap_or(-1);
        ensure!(
            partition == i64::from(message.partition),
            "record for partition {partition} read from partition {}",
            message.partition
        );
        ensure!(message.key == format!("p{partition}-k{}", i % 4));
        per_partition.entry(message.partition).or_default().push(i);
    }
    for partition in 0..PARTITIONS {
        let seen = per_partition.remove(&partition).unwrap_or_default();
        let want: Vec<i64> = (0..PER_PARTITION).collect();
        ensure!(seen == want, "partition {partition} read in order {seen:?}");
    }
    let offsets_ok = messages.iter().all(|m| m.offset >= 0);
    ensure!(offsets_ok, "negative offset read back");

    // The one-shot helper sees the same topic.
    let pairs = read_topic(broker, &topic, Duration::from_secs(30), |m| {
        m.len() >= total
    })?;
    ensure!(pairs.len() == total);
    Ok(())
}
