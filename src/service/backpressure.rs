//! Back-pressure: when a checkpoint takes longer than the checkpoint interval, consumption
//! pauses until it is durable, so that the state (and, in exactly-once mode, the final windows
//! waiting for that checkpoint) stops growing while the store catches up. Pure: the pipeline
//! feeds it the age of the oldest checkpoint in flight and carries out what it decides
//! (pausing and resuming the assigned partitions, the metric, the log).

use std::time::Duration;

use crate::checkpoint_id::CheckpointId;

/// What changed at an evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    /// Nothing to do.
    Same,
    /// Pause consumption: checkpoint `id` has been writing for `age`, longer than the limit.
    Engage { id: CheckpointId, age: Duration },
    /// Resume consumption after `paused` (the slow checkpoint settled).
    Release { paused: Duration },
}

#[derive(Debug)]
pub(crate) struct Backpressure {
    /// A checkpoint in flight for longer than this pauses consumption (the checkpoint
    /// interval).
    limit: Duration,
    /// Since when (on the caller's clock) consumption is paused.
    engaged_at: Option<Duration>,
}

impl Backpressure {
    pub(crate) fn new(limit: Duration) -> Self {
        Backpressure {
            limit,
            engaged_at: None,
        }
    }

    pub(crate) fn engaged(&self) -> bool {
        self.engaged_at.is_some()
    }

    /// Decides from the oldest checkpoint in flight (its id and age), at `now` (any monotonic
    /// clock the caller keeps).
    pub(crate) fn evaluate(
        &mut self,
        oldest: Option<(CheckpointId, Duration)>,
        now: Duration,
    ) -> Change {
        let late = oldest.filter(|(_, age)| *age > self.limit);
        match (self.engaged_at, late) {
            (None, Some((id, age))) => {
                self.engaged_at = Some(now);
                Change::Engage { id, age }
            }
            (Some(since), None) => {
                self.engaged_at = None;
                Change::Release {
                    paused: now.saturating_sub(since),
                }
            }
            _ => Change::Same,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_checkpoint_older_than_the_limit_pauses_until_none_is() {
        let mut b = Backpressure::new(2 * S);
        assert_eq!(b.evaluate(None, S), Change::Same);
        assert_eq!(b.evaluate(Some((CheckpointId(4), S)), 2 * S), Change::Same);
        assert_eq!(
            b.evaluate(Some((CheckpointId(4), 3 * S)), 4 * S),
            Change::Engage {
                id: CheckpointId(4),
                age: 3 * S
            }
        );
        assert!(b.engaged());
        // still writing: no second engagement
        assert_eq!(
            b.evaluate(Some((CheckpointId(4), 5 * S)), 6 * S),
            Change::Same
        );
        // it settled; the next one is young
        assert_eq!(
            b.evaluate(Some((CheckpointId(5), Duration::ZERO)), 7 * S),
            Change::Release { paused: 3 * S }
        );
        assert!(!b.engaged());
        assert_eq!(b.evaluate(None, 8 * S), Change::Same);
    }

    #[test]
    fn a_checkpoint_exactly_at_the_limit_does_not_pause() {
        let mut b = Backpressure::new(2 * S);
        assert_eq!(b.evaluate(Some((CheckpointId(1), 2 * S)), S), Change::Same);
    }
}
