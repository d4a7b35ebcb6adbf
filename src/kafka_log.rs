//! Reporting of librdkafka client errors: structured, at warn level, and rate-limited, because
//! librdkafka repeats the same error (e.g. "all brokers down") many times per second while a
//! broker is away.

use std::sync::Mutex;
use std::time::Duration;

use rdkafka::error::KafkaError;

use crate::lock::lock;
use crate::ratelimit::RateLimit;

const EVERY: Duration = Duration::from_secs(10);

pub struct ErrorLog {
    limit: Mutex<RateLimit>,
}

impl Default for ErrorLog {
    fn default() -> Self {
        ErrorLog {
            limit: Mutex::new(RateLimit::new(EVERY)),
        }
    }
}

impl ErrorLog {
    /// Logs `error` unless one was logged within the last 10 s; then counts it as suppressed.
    pub fn report(&self, client: &'static str, error: &KafkaError, reason: &str) {
        if let Some(suppressed) = lock(&self.limit).check() {
            tracing::warn!(client, error = %error, reason, suppressed, "kafka client error");
        }
    }
}
