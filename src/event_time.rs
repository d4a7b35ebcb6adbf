//! Event time: when a record says it happened, in epoch milliseconds, as opposed to the wall
//! clock (`clock`), offsets (`position`) or durations. Record timestamps, watermarks and the
//! highest event time of a partition are `EventTime`; window bounds inside the engine are
//! plain milliseconds of the same clock. It encodes exactly as the `i64` it wraps (serde
//! transparent), so stores, savepoint files, changelog records and the HTTP API keep their
//! formats.

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventTime(pub i64);

impl EventTime {
    /// Epoch milliseconds.
    pub fn millis(self) -> i64 {
        self.0
    }

    /// This time less `ms` milliseconds (saturating).
    pub fn minus(self, ms: i64) -> EventTime {
        EventTime(self.0.saturating_sub(ms))
    }

    /// Epoch seconds, for gauges.
    pub fn seconds(self) -> f64 {
        self.0 as f64 / 1000.0
    }
}

/// Shown as the bare number of milliseconds, in messages as in `Debug` output.
impl fmt::Debug for EventTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for EventTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
