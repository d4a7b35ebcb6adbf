//! A small event generator: JSON events (`user`, `amount`, `ts`) for a fixed set of users at a
//! steady rate, event time now minus up to 1.5 s of jitter. Feeds the demo and the container
//! stack (`checkpointer generate`).

use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::clock::epoch_ms;

/// The events, deterministic for a seed: (record key, JSON payload).
pub struct Events {
    seed: u64,
    keys: u64,
}

impl Events {
    pub fn new(seed: u64, keys: u64) -> Self {
        Events {
            seed: seed.max(1),
            keys: keys.max(1),
        }
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        self.seed
    }

    /// The next event at wall-clock time `now_ms`.
    pub fn next_at(&mut self, now_ms: i64) -> (String, String) {
        let user = self.next_random() % self.keys;
        let amount = self.next_random() % 100 + 1;
        let ts = now_ms - (self.next_random() % 1500) as i64;
        (
            format!("user-{user}"),
            format!(r#"{{"user":"user-{user}","amount":{amount},"ts":{ts}}}"#),
        )
    }
}

/// How many events tick `i` (ten ticks a second) sends for `rate` events per second: spread
/// so that every second sends exactly `rate`.
pub fn per_tick(rate: u32, i: u64) -> u64 {
    let rate = u64::from(rate);
    rate * ((i % 10) + 1) / 10 - rate * (i % 10) / 10
}

/// Produces `rate` events per second to `topic` until the task is dropped. Each tick's events
/// are enqueued together and then awaited. Failed sends are logged and the generator carries on.
pub async fn run(producer: FutureProducer, topic: String, rate: u32, keys: u64) {
    let mut events = Events::new(0x2545_f491_4f6c_dd1d, keys);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut sent: u64 = 0;
    for i in 0u64.. {
        tick.tick().await;
        let batch: Vec<(String, String)> = (0..per_tick(rate, i))
            .map(|_| events.next_at(epoch_ms()))
            .collect();
        // enqueued at once (send_result does not wait), then awaited
        let mut deliveries = Vec::with_capacity(batch.len());
        for (key, payload) in &batch {
            let record = FutureRecord::to(&topic).key(key).payload(payload);
            match producer.send_result(record) {
                Ok(delivery) => deliveries.push(delivery),
                Err((e, _)) => {
                    tracing::warn!(error = %e, topic = %topic, "generator could not produce")
                }
            }
        }
        for delivery in deliveries {
            match delivery.await {
                Ok(Ok(_)) => sent += 1,
                Ok(Err((e, _))) => {
                    tracing::warn!(error = %e, topic = %topic, "generator could not produce")
                }
                Err(_) => {}
            }
        }
        if i % 100 == 99 {
            tracing::info!(sent, topic = %topic, "generator progress");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_second_sends_exactly_the_rate() {
        for rate in [1, 5, 15, 199, 200, 1234] {
            let second: u64 = (0..10).map(|i| per_tick(rate, i)).sum();
            assert_eq!(second, u64::from(rate), "rate {rate}");
            let ten: u64 = (0..100).map(|i| per_tick(rate, i)).sum();
            assert_eq!(ten, 10 * u64::from(rate), "rate {rate}");
        }
    }

    #[test]
    fn events_are_valid_records_for_the_configured_input() {
        let mut events = Events::new(7, 3);
        let mut users = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let (key, payload) = events.next_at(1_000_000);
            let v: serde_json::Value = serde_json::from_str(&payload).expect("json");
            assert_eq!(v["user"].as_str(), Some(key.as_str()));
            let amount = v["amount"].as_u64().expect("amount");
            assert!((1..=100).contains(&amount));
            let ts = v["ts"].as_i64().expect("ts");
            assert!((1_000_000 - 1500..=1_000_000).contains(&ts), "{ts}");
            users.insert(key);
        }
        assert_eq!(users.len(), 3, "{users:?}");
    }
}
