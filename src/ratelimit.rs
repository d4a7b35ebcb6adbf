//! One rate limit for log lines that an event can repeat many times a second (librdkafka
//! errors, invalid records, waits): the first goes through, then at most one per period, each
//! saying how many were suppressed since the last.

use std::time::{Duration, Instant};

/// Lets one of a repeated event through per period and counts the others.
#[derive(Debug, Clone)]
pub struct RateLimit {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    pub const fn new(every: Duration) -> Self {
        RateLimit {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(n)`: log this one; `n` were suppressed since the last one logged. `None`: this one
    /// is suppressed (and counted).
    pub fn check(&mut self) -> Option<u64> {
        self.check_at(Instant::now())
    }

    fn check_at(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(at) if now.duration_since(at) < self.every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_goes_through_then_one_per_period_with_the_count_suppressed() {
        let start = Instant::now();
        let mut limit = RateLimit::new(Duration::from_secs(10));
        assert_eq!(limit.check_at(start), Some(0));
        assert_eq!(limit.check_at(start + Duration::from_secs(1)), None);
        assert_eq!(limit.check_at(start + Duration::from_secs(9)), None);
        assert_eq!(limit.check_at(start + Duration::from_secs(10)), Some(2));
        assert_eq!(limit.check_at(start + Duration::from_secs(11)), None);
        assert_eq!(limit.check_at(start + Duration::from_secs(25)), Some(1));
    }
}
