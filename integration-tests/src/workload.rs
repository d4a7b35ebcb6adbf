//! Generated input streams: valid records with bounded disorder, sentinels, garbage.

use rand::rngs::StdRng;
use rand::Rng;
use serde_json::json;

use crate::model::Event;

/// Key of the sentinel records that push every partition's watermark far ahead.
pub const SENTINEL_KEY: &str = "~flush";

/// A fixed, round event-time origin (ms) so failures are easy to read.
pub const START_TS: i64 = 1_700_000_000_000;

/// Largest step back in event time within a partition, in ms. Far below the 2 s
/// `max_out_of_orderness` the tests configure, so no record is ever late however the service
/// interleaves partitions.
pub const MAX_STEP_BACK_MS: i64 = 1_000;

/// One record on an input partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Valid(Event),
    Garbage(Garbage),
}

impl Record {
    /// The bytes sent as the Kafka message value.
    pub fn payload(&self) -> Vec<u8> {
        match self {
            Record::Valid(event) => event_payload(event),
            Record::Garbage(garbage) => garbage.payload(),
        }
    }

    /// The Kafka message key (the service reads the key from the JSON body, not from here).
    pub fn kafka_key(&self) -> Option<&str> {
        match self {
            Record::Valid(event) => Some(&event.key),
            Record::Garbage(_) => None,
        }
    }

    pub fn event(&self) -> Option<&Event> {
        match self {
            Record::Valid(event) => Some(event),
            Record::Garbage(_) => None,
        }
    }
}

/// The JSON body of a valid record: `{"user": key, "amount": value, "ts": ts}` plus a field the
/// service must ignore.
pub fn event_payload(event: &Event) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "user": event.key,
        "amount": event.value,
        "ts": event.ts,
        "source": "integration-tests",
    }))
    .unwrap_or_default()
}

/// Kinds of invalid input, each with exactly one defect, and the `reason` label it must be
/// counted under in `checkpointer_records_invalid_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum GarbageKind {
    NotJson,
    EmptyPayload,
    MissingKey,
    NullKey,
    ObjectKey,
    MissingValue,
    StringValue,
    MissingTimestamp,
    StringTimestamp,
    /// A value two of which sum to infinity.
    HugeValue,
}

impl GarbageKind {
    pub const ALL: [GarbageKind; 10] = [
        GarbageKind::NotJson,
        GarbageKind::EmptyPayload,
        GarbageKind::MissingKey,
        GarbageKind::NullKey,
        GarbageKind::ObjectKey,
        GarbageKind::MissingValue,
        GarbageKind::StringValue,
        GarbageKind::MissingTimestamp,
        GarbageKind::StringTimestamp,
        GarbageKind::HugeValue,
    ];

    pub fn reason(self) -> &'static str {
        match self {
            GarbageKind::NotJson => "invalid_json",
            GarbageKind::EmptyPayload => "empty_payload",
            GarbageKind::MissingKey => "missing_key",
            GarbageKind::NullKey => "null_key",
            GarbageKind::ObjectKey => "bad_key",
            GarbageKind::MissingValue => "missing_value",
            GarbageKind::StringValue => "bad_value",
            GarbageKind::MissingTimestamp => "missing_timestamp",
            GarbageKind::StringTimestamp => "bad_timestamp",
            GarbageKind::HugeValue => "value_out_of_range",
        }
    }
}

/// An invalid record. `ts` is an event time that is not ahead of its partition, so that
/// whether or not the service lets invalid records move the watermark, nothing changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Garbage {
    pub kind: GarbageKind,
    pub ts: i64,
}

impl Garbage {
    pub fn payload(&self) -> Vec<u8> {
        let ts = self.ts;
        let value = match self.kind {
            GarbageKind::NotJson => return b"\xff\xfe{not json at all".to_vec(),
            GarbageKind::EmptyPayload => return Vec::new(),
            GarbageKind::MissingKey => json!({"amount": 5, "ts": ts}),
            GarbageKind::NullKey => json!({"user": null, "amount": 5, "ts": ts}),
            GarbageKind::ObjectKey => json!({"user": {"id": "user-00"}, "amount": 5, "ts": ts}),
            GarbageKind::MissingValue => json!({"user": "user-00", "ts": ts}),
            GarbageKind::StringValue => json!({"user": "user-00", "amount": "5", "ts": ts}),
            GarbageKind::MissingTimestamp => json!({"user": "user-00", "amount": 5}),
            GarbageKind::StringTimestamp => {
                json!({"user": "user-00", "amount": 5, "ts": ts.to_string()})
            }
            GarbageKind::HugeValue => json!({"user": "user-00", "amount": 1.5e308, "ts": ts}),
        };
        serde_json::to_vec(&value).unwrap_or_default()
    }
}

/// Shape of a generated stream.
#[derive(Clone, Copy, Debug)]
pub struct StreamShape {
    pub partitions: usize,
    pub records_per_partition: usize,
    pub keys: usize,
    /// Event time of the first record of every partition.
    pub start_ts: i64,
}

/// Key names `user-00`, `user-01`, ...
pub fn key_name(i: usize) -> String {
    format!("user-{i:02}")
}

/// Valid records per partition. Event time mostly rises by 0..=300 ms per record and now and
/// then (5%) a record lags up to [`MAX_STEP_BACK_MS`] behind; keys follow a skewed (1/rank)
/// distribution so that hot keys have long sessions and cold keys many short ones; values are
/// integers in -100..=1000. Every key appears on every partition.
pub fn generate(rng: &mut StdRng, shape: StreamShape) -> Vec<Vec<Event>> {
    let weights: Vec<f64> = (0..shape.keys).map(|i| 1.0 / (i as f64 + 1.0)).collect();
    let total: f64 = weights.iter().sum();
    let mut partitions = Vec::with_capacity(shape.partitions);
    for _ in 0..shape.partitions {
        let mut events = Vec::with_capacity(shape.records_per_partition);
        let mut clock = shape.start_ts;
        for n in 0..shape.records_per_partition {
            // The first records of a partition cover every key once.
            let key = if n < shape.keys {
                n
            } else {
                let mut pick = rng.random_range(0.0..total);
                let mut chosen = shape.keys - 1;
                for (i, w) in weights.iter().enumerate() {
                    if pick < *w {
                        chosen = i;
                        break;
                    }
                    pick -= w;
                }
                chosen
            };
            let ts = if n > 0 && rng.random_bool(0.05) {
                (clock - rng.random_range(1..=MAX_STEP_BACK_MS)).max(shape.start_ts)
            } else {
                clock += rng.random_range(0..=300);
                clock
            };
            events.push(Event {
                key: key_name(key),
                value: rng.random_range(-100..=1000),
                ts,
            });
        }
        partitions.push(events);
    }
    partitions
}

/// The largest backwards step of event time within one partition's records, in ms.
pub fn max_disorder<'a>(events: impl IntoIterator<Item = &'a Event>) -> i64 {
    let mut max_seen = i64::MIN;
    let mut disorder = 0;
    for event in events {
        if max_seen != i64::MIN {
            disorder = disorder.max(max_seen - event.ts);
        }
        max_seen = max_seen.max(event.ts);
    }
    disorder
}

/// Largest event time over all partitions.
pub fn max_ts(partitions: &[Vec<Event>]) -> i64 {
    partitions
        .iter()
        .flatten()
        .map(|e| e.ts)
        .max()
        .unwrap_or(START_TS)
}

/// Each partition's valid records followed by one sentinel at `sentinel_ts`, which closes
/// every window before it.
pub fn with_sentinels(events: &[Vec<Event>], sentinel_ts: i64) -> Vec<Vec<Record>> {
    followed_by(events, |_| sentinel(sentinel_ts))
}

/// [`with_sentinels`] for a [`partition_local`] stream: each partition's sentinel is a
/// [`local_sentinel`].
pub fn with_local_sentinels(events: &[Vec<Event>], sentinel_ts: i64) -> Vec<Vec<Record>> {
    followed_by(events, |p| local_sentinel(p, sentinel_ts))
}

/// Each partition's valid records followed by `last(partition)`.
fn followed_by(events: &[Vec<Event>], last: impl Fn(usize) -> Event) -> Vec<Vec<Record>> {
    events
        .iter()
        .enumerate()
        .map(|(p, partition)| {
            let mut records = valid_records(partition);
            records.push(Record::Valid(last(p)));
            records
        })
        .collect()
}

/// `events` with every key prefixed by its partition (`p<N>-`): keys live on one partition
/// each, as Kafka's partitioner places keyed records, so that partition-scoped windows are the
/// model's per-key windows.
pub fn partition_local(events: Vec<Vec<Event>>) -> Vec<Vec<Event>> {
    events
        .into_iter()
        .enumerate()
        .map(|(p, evs)| {
            evs.into_iter()
                .map(|mut e| {
                    e.key = local_key(p, &e.key);
                    e
                })
                .collect()
        })
        .collect()
}

/// `key` as [`partition_local`] writes it for partition `p`.
pub fn local_key(p: usize, key: &str) -> String {
    format!("p{p}-{key}")
}

/// The sentinel record for one partition.
pub fn sentinel(ts: i64) -> Event {
    Event {
        key: SENTINEL_KEY.to_owned(),
        value: 0,
        ts,
    }
}

/// The sentinel of partition `p` of a [`partition_local`] stream: its key is local to `p`.
pub fn local_sentinel(p: usize, ts: i64) -> Event {
    let mut event = sentinel(ts);
    event.key = local_key(p, &event.key);
    event
}

/// Wraps valid events as records.
pub fn valid_records(events: &[Event]) -> Vec<Record> {
    events.iter().cloned().map(Record::Valid).collect()
}

/// Inserts `count` garbage records of `kind` at random places of random partitions; each takes
/// the event time of the valid record before it.
pub fn insert_garbage(
    rng: &mut StdRng,
    partitions: &mut [Vec<Record>],
    kind: GarbageKind,
    count: usize,
) {
    for _ in 0..count {
        let p = rng.random_range(0..partitions.len());
        let records = &mut partitions[p];
        let at = rng.random_range(0..=records.len());
        let ts = records[..at]
            .iter()
            .rev()
            .find_map(|r| r.event().map(|e| e.ts))
            .unwrap_or(START_TS);
        records.insert(at, Record::Garbage(Garbage { kind, ts }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn generated_disorder_is_bounded() {
        let mut rng = StdRng::seed_from_u64(7);
        let shape = StreamShape {
            partitions: 3,
            records_per_partition: 2_000,
            keys: 20,
            start_ts: START_TS,
        };
        let partitions = generate(&mut rng, shape);
        assert_eq!(partitions.len(), 3);
        for events in &partitions {
            assert_eq!(events.len(), 2_000);
            let d = max_disorder(events);
            assert!(d > 0 && d <= MAX_STEP_BACK_MS, "disorder {d}");
            assert!(events.iter().all(|e| e.ts >= START_TS));
        }
    }

    #[test]
    fn garbage_has_one_defect_each() {
        for kind in GarbageKind::ALL {
            let payload = Garbage { kind, ts: 5 }.payload();
            let parsed: Result<serde_json::Value, _> = serde_json::from_slice(&payload);
            match kind {
                GarbageKind::NotJson | GarbageKind::EmptyPayload => assert!(parsed.is_err()),
                _ => assert!(parsed.unwrap().is_object()),
            }
        }
    }
}
