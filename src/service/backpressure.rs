//! Back-pressure: consumption pauses while the service cannot keep up, so that memory stops
//! growing instead of growing until the kernel kills the process. The causes:
//!
//! - a checkpoint takes longer than the checkpoint interval: the state (and, in exactly-once
//!   mode, the final windows waiting for that checkpoint) would grow while the store catches
//!   up; consumption resumes once no checkpoint in flight is that old;
//! - more final windows wait for the output than `output.max_pending_windows` (the output
//!   is slower than the input): consumption resumes once they fell to half the bound (not at
//!   the bound, so that it does not pause and resume at every acknowledgement);
//! - the process's resident memory passed `state.max_memory`: consumption resumes once it fell
//!   below 90% of it (the final windows waiting drain through checkpoints and the output, and
//!   the allocator gives their memory back);
//! - copies for the dead-letter topic hold a checkpoint back for long, or too many are
//!   unacknowledged: consumption resumes once they are written;
//! - more windows are open than `state.max_open_windows` (the key-count guard): consumption
//!   resumes once at most 90% of it are open (windows close as event time moves, which needs
//!   the records the pause holds back, so in practice the pause holds until an operator raises
//!   the limit and restarts).
//!
//! Pure: the pipeline feeds it the age of the oldest checkpoint in flight, the final windows
//! not acknowledged by the output and the resident memory it last read, and carries out what
//! it decides (pausing and resuming the assigned partitions, the metric, the log).

use std::time::Duration;

use crate::checkpoint_id::CheckpointId;

/// Why consumption pauses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    /// Checkpoint `id` has been writing for `age`, longer than the limit.
    Checkpoint { id: CheckpointId, age: Duration },
    /// `pending` final windows wait for the output, more than the bound.
    Output { pending: usize, bound: usize },
    /// `resident` bytes are resident, more than `limit` (`state.max_memory`).
    Memory { resident: u64, limit: u64 },
    /// `outstanding` dead-letter copies are not acknowledged, and a checkpoint waits for them
    /// or there are too many.
    DeadLetters { outstanding: u64 },
    /// `open` windows are open, more than `limit` (`state.max_open_windows`).
    OpenWindows { open: usize, limit: usize },
}

/// What changed at an evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    /// Nothing to do.
    Same,
    /// Pause consumption.
    Engage(Cause),
    /// Resume consumption after `paused` (every cause is gone).
    Release { paused: Duration },
}

/// Whether `value` holds consumption paused against `limit`: past the limit, and once past it
/// (`was`) until it is back at 90% of it (a tenth rounded up, so that a small limit still has
/// room under it), so that it does not pause and resume at every reading. Nothing read or no
/// limit: not past.
fn past(value: Option<u64>, limit: Option<u64>, was: bool) -> bool {
    match (value, limit) {
        (Some(value), Some(limit)) if was => value > limit - limit.div_ceil(10),
        (Some(value), Some(limit)) => value > limit,
        _ => false,
    }
}

#[derive(Debug)]
pub(crate) struct Backpressure {
    /// A checkpoint in flight for longer than this pauses consumption (the checkpoint
    /// interval).
    limit: Duration,
    /// More final windows than this waiting for the output pause consumption (0: no bound).
    max_pending: usize,
    /// Since when (on the caller's clock) consumption is paused.
    engaged_at: Option<Duration>,
    /// The output's backlog went past the bound and has not fallen to half of it yet.
    backlog: bool,
    /// Resident bytes past which consumption pauses (`state.max_memory`).
    max_memory: Option<u64>,
    /// The resident bytes last read.
    resident: Option<u64>,
    /// The resident memory went past the limit and has not fallen below 90% of it yet.
    over_memory: bool,
    /// Dead-letter copies that hold consumption back, as the pipeline last judged them.
    dead_letters: Option<u64>,
    /// Open windows past which consumption pauses (`state.max_open_windows`).
    max_open: Option<usize>,
    /// The open windows last counted.
    open: Option<usize>,
    /// The open windows went past the limit and have not fallen below 90% of it yet.
    over_open: bool,
}

impl Backpressure {
    pub(crate) fn new(limit: Duration, max_pending: usize) -> Self {
        Backpressure {
            limit,
            max_pending,
            engaged_at: None,
            backlog: false,
            max_memory: None,
            resident: None,
            over_memory: false,
            dead_letters: None,
            max_open: None,
            open: None,
            over_open: false,
        }
    }

    /// Pauses consumption while more than `limit` windows are open.
    pub(crate) fn with_open_windows_limit(mut self, limit: Option<usize>) -> Self {
        self.max_open = limit;
        self
    }

    /// Whether open windows are counted for a limit.
    pub(crate) fn counts_open_windows(&self) -> bool {
        self.max_open.is_some()
    }

    /// The open windows counted now; the next evaluation judges them.
    pub(crate) fn observe_open_windows(&mut self, open: usize) {
        self.open = Some(open);
    }

    /// Whether the open-window limit holds consumption paused.
    pub(crate) fn over_open_windows(&self) -> bool {
        self.over_open
    }

    /// `Some(outstanding)`: dead-letter copies hold consumption back (a checkpoint has waited
    /// for them too long, or too many are unacknowledged); `None`: they do not.
    pub(crate) fn observe_dead_letters(&mut self, blocking: Option<u64>) {
        self.dead_letters = blocking;
    }

    /// Pauses consumption while more than `limit` bytes are resident.
    pub(crate) fn with_memory_limit(mut self, limit: Option<u64>) -> Self {
        self.max_memory = limit;
        self
    }

    /// The resident memory read now; the next evaluation judges it.
    pub(crate) fn observe_resident(&mut self, bytes: u64) {
        self.resident = Some(bytes);
    }

    pub(crate) fn engaged(&self) -> bool {
        self.engaged_at.is_some()
    }

    /// Whether the memory limit holds consumption paused.
    pub(crate) fn over_memory(&self) -> bool {
        self.over_memory
    }

    /// Decides from the oldest checkpoint in flight (its id and age) and the final windows not
    /// acknowledged by the output, at `now` (any monotonic clock the caller keeps).
    pub(crate) fn evaluate(
        &mut self,
        oldest: Option<(CheckpointId, Duration)>,
        pending: usize,
        now: Duration,
    ) -> Change {
        let late = oldest
            .filter(|(_, age)| *age > self.limit)
            .map(|(id, age)| Cause::Checkpoint { id, age });
        // past the bound, the backlog holds the pause until it fell to half the bound
        let over = if self.backlog {
            self.max_pending / 2
        } else {
            self.max_pending
        };
        self.backlog = self.max_pending > 0 && pending > over;
        let backlog = self.backlog.then_some(Cause::Output {
            pending,
            bound: self.max_pending,
        });
        // likewise, past the memory limit the pause holds until 90% of it
        self.over_memory = past(self.resident, self.max_memory, self.over_memory);
        let memory = self.over_memory.then(|| Cause::Memory {
            resident: self.resident.unwrap_or_default(),
            limit: self.max_memory.unwrap_or_default(),
        });
        let dead_letters = self
            .dead_letters
            .map(|outstanding| Cause::DeadLetters { outstanding });
        let widen = |n: Option<usize>| n.map(|n| n as u64);
        self.over_open = past(widen(self.open), widen(self.max_open), self.over_open);
        let open = self.over_open.then(|| Cause::OpenWindows {
            open: self.open.unwrap_or_default(),
            limit: self.max_open.unwrap_or_default(),
        });
        match (
            self.engaged_at,
            late.or(backlog).or(memory).or(open).or(dead_letters),
        ) {
            (None, Some(cause)) => {
                self.engaged_at = Some(now);
                Change::Engage(cause)
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
    fn open_windows_past_the_limit_pause_until_they_fell_below_nine_tenths() {
        let mut b = Backpressure::new(2 * S, 0).with_open_windows_limit(Some(1000));
        assert!(b.counts_open_windows());
        // nothing counted yet
        assert_eq!(b.evaluate(None, 0, S), Change::Same);
        b.observe_open_windows(1000);
        assert_eq!(b.evaluate(None, 0, 2 * S), Change::Same);
        b.observe_open_windows(1001);
        assert_eq!(
            b.evaluate(None, 0, 3 * S),
            Change::Engage(Cause::OpenWindows {
                open: 1001,
                limit: 1000
            })
        );
        assert!(b.over_open_windows());
        // under the limit but not under 90% of it: still paused
        b.observe_open_windows(950);
        assert_eq!(b.evaluate(None, 0, 4 * S), Change::Same);
        assert!(b.engaged() && b.over_open_windows());
        b.observe_open_windows(899);
        assert_eq!(
            b.evaluate(None, 0, 6 * S),
            Change::Release { paused: 3 * S }
        );
        assert!(!b.over_open_windows());
        // a small limit still has room under it to resume at
        let mut small = Backpressure::new(2 * S, 0).with_open_windows_limit(Some(3));
        small.observe_open_windows(4);
        assert!(matches!(small.evaluate(None, 0, S), Change::Engage(_)));
        small.observe_open_windows(3);
        assert_eq!(small.evaluate(None, 0, 2 * S), Change::Same);
        small.observe_open_windows(2);
        assert_eq!(
            small.evaluate(None, 0, 3 * S),
            Change::Release { paused: 2 * S }
        );
        // without a limit, nothing is counted and nothing pauses
        let mut off = Backpressure::new(2 * S, 0);
        assert!(!off.counts_open_windows());
        off.observe_open_windows(usize::MAX);
        assert_eq!(off.evaluate(None, 0, S), Change::Same);
    }

    #[test]
    fn resident_memory_past_the_limit_pauses_until_it_fell_below_nine_tenths() {
        let mut b = Backpressure::new(2 * S, 0).with_memory_limit(Some(1000));
        // nothing read yet
        assert_eq!(b.evaluate(None, 0, S), Change::Same);
        b.observe_resident(1000);
        assert_eq!(b.evaluate(None, 0, 2 * S), Change::Same);
        b.observe_resident(1001);
        assert_eq!(
            b.evaluate(None, 0, 3 * S),
            Change::Engage(Cause::Memory {
                resident: 1001,
                limit: 1000
            })
        );
        assert!(b.over_memory());
        // back under the limit but not under 90% of it: still paused
        b.observe_resident(950);
        assert_eq!(b.evaluate(None, 0, 4 * S), Change::Same);
        assert!(b.engaged());
        b.observe_resident(899);
        assert_eq!(
            b.evaluate(None, 0, 6 * S),
            Change::Release { paused: 3 * S }
        );
        assert!(!b.over_memory());
        // without a limit, memory never pauses
        let mut b = Backpressure::new(2 * S, 0);
        b.observe_resident(u64::MAX);
        assert_eq!(b.evaluate(None, 0, S), Change::Same);
    }

    #[test]
    fn a_pause_for_memory_and_a_slow_checkpoint_ends_when_both_are_over() {
        let mut b = Backpressure::new(2 * S, 0).with_memory_limit(Some(1000));
        b.observe_resident(2000);
        assert!(matches!(
            b.evaluate(Some((CheckpointId(1), 3 * S)), 0, S),
            Change::Engage(Cause::Checkpoint { .. })
        ));
        // the checkpoint completed, memory is still high
        assert_eq!(b.evaluate(None, 0, 2 * S), Change::Same);
        b.observe_resident(500);
        assert_eq!(
            b.evaluate(None, 0, 3 * S),
            Change::Release { paused: 2 * S }
        );
    }

    #[test]
    fn a_checkpoint_older_than_the_limit_pauses_until_none_is() {
        let mut b = Backpressure::new(2 * S, 0);
        assert_eq!(b.evaluate(None, 0, S), Change::Same);
        assert_eq!(
            b.evaluate(Some((CheckpointId(4), S)), 0, 2 * S),
            Change::Same
        );
        assert_eq!(
            b.evaluate(Some((CheckpointId(4), 3 * S)), 0, 4 * S),
            Change::Engage(Cause::Checkpoint {
                id: CheckpointId(4),
                age: 3 * S
            })
        );
        assert!(b.engaged());
        // still writing: no second engagement
        assert_eq!(
            b.evaluate(Some((CheckpointId(4), 5 * S)), 0, 6 * S),
            Change::Same
        );
        // it settled; the next one is young
        assert_eq!(
            b.evaluate(Some((CheckpointId(5), Duration::ZERO)), 0, 7 * S),
            Change::Release { paused: 3 * S }
        );
        assert!(!b.engaged());
        assert_eq!(b.evaluate(None, 0, 8 * S), Change::Same);
    }

    #[test]
    fn a_checkpoint_exactly_at_the_limit_does_not_pause() {
        let mut b = Backpressure::new(2 * S, 0);
        assert_eq!(
            b.evaluate(Some((CheckpointId(1), 2 * S)), 0, S),
            Change::Same
        );
    }

    #[test]
    fn an_output_backlog_over_the_bound_pauses_until_it_fell_to_half() {
        let mut b = Backpressure::new(2 * S, 100);
        assert_eq!(b.evaluate(None, 100, S), Change::Same);
        assert_eq!(
            b.evaluate(None, 101, 2 * S),
            Change::Engage(Cause::Output {
                pending: 101,
                bound: 100
            })
        );
        // below the bound but above half: still paused
        assert_eq!(b.evaluate(None, 80, 3 * S), Change::Same);
        assert!(b.engaged());
        assert_eq!(
            b.evaluate(None, 50, 5 * S),
            Change::Release { paused: 3 * S }
        );
        // no bound: never for the output
        let mut unbounded = Backpressure::new(2 * S, 0);
        assert_eq!(unbounded.evaluate(None, usize::MAX, S), Change::Same);
    }

    #[test]
    fn paused_for_both_causes_it_resumes_when_both_are_gone() {
        let mut b = Backpressure::new(2 * S, 100);
        assert!(matches!(
            b.evaluate(Some((CheckpointId(1), 3 * S)), 500, S),
            Change::Engage(Cause::Checkpoint { .. })
        ));
        // the checkpoint settled; the backlog is still over half the bound
        assert_eq!(b.evaluate(None, 60, 2 * S), Change::Same);
        assert_eq!(
            b.evaluate(None, 10, 4 * S),
            Change::Release { paused: 3 * S }
        );
    }

    #[test]
    fn a_pause_for_a_slow_checkpoint_alone_ends_with_it_whatever_the_backlog_under_the_bound() {
        let mut b = Backpressure::new(2 * S, 100);
        assert!(matches!(
            b.evaluate(Some((CheckpointId(1), 3 * S)), 80, S),
            Change::Engage(Cause::Checkpoint { .. })
        ));
        assert_eq!(b.evaluate(None, 80, 2 * S), Change::Release { paused: S });
    }

    #[test]
    fn dead_letter_copies_hold_consumption_back_while_the_pipeline_says_so() {
        let mut b = Backpressure::new(2 * S, 0);
        assert_eq!(b.evaluate(None, 0, S), Change::Same);
        b.observe_dead_letters(Some(7));
        assert_eq!(
            b.evaluate(None, 0, 2 * S),
            Change::Engage(Cause::DeadLetters { outstanding: 7 })
        );
        assert_eq!(b.evaluate(None, 0, 3 * S), Change::Same);
        b.observe_dead_letters(None);
        assert_eq!(
            b.evaluate(None, 0, 4 * S),
            Change::Release { paused: 2 * S }
        );
    }
}
