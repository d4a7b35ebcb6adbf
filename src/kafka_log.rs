//! Reporting of librdkafka client errors: structured, at warn level, and rate-limited, because
//! librdkafka repeats the same error (e.g. "all brokers down") many times per second while a
//! broker is away.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;

const EVERY: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct ErrorLog {
    last: Mutex<Option<(Instant, u64)>>,
}

impl ErrorLog {
    /// Logs `error` unless one was logged within the last 10 s; then counts it as suppressed.
    pub fn report(&self, client: &'static str, error: &KafkaError, reason: &str) {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        match *last {
            Some((at, suppressed)) if now.duration_since(at) < EVERY => {
                *last = Some((at, suppressed + 1));
            }
            Some((_, suppressed)) => {
                tracing::warn!(client, error = %error, reason, suppressed, "kafka client error");
                *last = Some((now, 0));
            }
            None => {
                tracing::warn!(client, error = %error, reason, "kafka client error");
                *last = Some((now, 0));
            }
        }
    }
}
