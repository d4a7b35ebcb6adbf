//! Window definitions and assigners. Event time is epoch milliseconds; windows are aligned to
//! the Unix epoch and half-open: `[start, end)`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WindowKind {
    /// `[floor(ts/size)*size, +size)`
    Tumbling { size: i64 },
    /// windows of length `size` starting at every multiple of `hop`
    Hopping { size: i64, hop: i64 },
    /// per key, records closer than `gap` share a window `[first, last + gap)`
    Session { gap: i64 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowDef {
    pub name: String,
    pub kind: WindowKind,
}

/// Start of the tumbling window of `size` holding `ts`.
pub fn tumbling_start(ts: i64, size: i64) -> i64 {
    ts.div_euclid(size) * size
}

/// Starts of every hopping window (length `size`, every `hop`) holding `ts`, newest first.
pub fn hopping_starts(ts: i64, size: i64, hop: i64) -> impl Iterator<Item = i64> {
    let last = ts.div_euclid(hop) * hop;
    let mut next = Some(last);
    std::iter::from_fn(move || {
        let start = next?;
        next = start
            .checked_sub(hop)
            .filter(|s| s.saturating_add(size) > ts);
        Some(start)
    })
}

impl WindowKind {
    /// `tumbling 1m`, `hopping 1m every 10s`, `session gap 30s`.
    pub fn describe(&self) -> String {
        let d = |ms: i64| {
            humantime::format_duration(std::time::Duration::from_millis(ms.max(0) as u64))
                .to_string()
        };
        match *self {
            WindowKind::Tumbling { size } => format!("tumbling {}", d(size)),
            WindowKind::Hopping { size, hop } => format!("hopping {} every {}", d(size), d(hop)),
            WindowKind::Session { gap } => format!("session gap {}", d(gap)),
        }
    }

    /// Whether a window of this kind can start at `start`: tumbling windows start at
    /// multiples of their size, hopping ones at multiples of their hop, sessions anywhere.
    pub fn is_start(&self, start: i64) -> bool {
        match *self {
            WindowKind::Tumbling { size: step } | WindowKind::Hopping { hop: step, .. } => {
                start.rem_euclid(step.max(1)) == 0
            }
            WindowKind::Session { .. } => true,
        }
    }

    /// The fixed length of the window, `None` for sessions.
    pub fn size(&self) -> Option<i64> {
        match *self {
            WindowKind::Tumbling { size } | WindowKind::Hopping { size, .. } => Some(size),
            WindowKind::Session { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn tumbling_aligns_to_epoch_including_negative_times() {
        assert_eq!(tumbling_start(0, 1000), 0);
        assert_eq!(tumbling_start(999, 1000), 0);
        assert_eq!(tumbling_start(1000, 1000), 1000);
        assert_eq!(tumbling_start(-1, 1000), -1000);
    }

    #[test]
    fn hopping_lists_every_window_holding_the_time() {
        let starts: Vec<i64> = hopping_starts(12_500, 10_000, 5_000).collect();
        assert_eq!(starts, vec![10_000, 5_000]);
        let starts: Vec<i64> = hopping_starts(10_000, 10_000, 5_000).collect();
        assert_eq!(starts, vec![10_000, 5_000]);
        let starts: Vec<i64> = hopping_starts(7, 10, 10).collect();
        assert_eq!(starts, vec![0]);
    }

    proptest! {
        #[test]
        fn hopping_windows_are_exactly_those_containing_ts(ts in -1_000_000i64..1_000_000, hop in 1i64..500, extra in 0i64..2000) {
            let size = hop + extra;
            let got: Vec<i64> = hopping_starts(ts, size, hop).collect();
            for s in &got {
                prop_assert!(s.rem_euclid(hop) == 0);
                prop_assert!(*s <= ts && ts < s + size);
            }
            // brute force: every aligned start within range
            let lo = (ts - size).div_euclid(hop) * hop;
            let expected = (0..).map(|i| lo + i * hop).take_while(|s| *s <= ts).filter(|s| ts < s + size).count();
            prop_assert_eq!(got.len(), expected);
        }
    }
}
