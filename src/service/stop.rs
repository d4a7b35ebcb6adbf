//! The graceful stop as a state machine, free of I/O: a final checkpoint, emission of what it
//! released, a last checkpoint that records the acknowledgements, then (when asked) the
//! savepoint, taken once the state has settled so that it holds exactly what the stop leaves.
//! The pipeline feeds it facts and carries out the step it names.

use crate::checkpoint_id::CheckpointId;

/// What the pipeline knows when it asks for the next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Facts {
    /// Checkpoints triggered and not settled.
    pub in_flight: usize,
    /// The newest durable checkpoint.
    pub last_durable: Option<CheckpointId>,
    /// The newest checkpoint that was durable without the savepoint asked of it (its name
    /// was taken by the time of the write).
    pub refused_savepoint: Option<CheckpointId>,
    /// Final windows not acknowledged by the output yet.
    pub pending_emissions: usize,
    /// The state changed since the last snapshot.
    pub has_changes: bool,
}

/// What to do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// Wait for an outcome or an acknowledgement, then ask again.
    Wait,
    /// Trigger a checkpoint and report its id with [`StopSequence::triggered`].
    Checkpoint,
    /// Trigger the savepoint (`None`: its default name) and report its id with
    /// [`StopSequence::triggered`].
    Savepoint(Option<String>),
    /// The savepoint (this checkpoint) was not written: stop without it.
    SavepointFailed(CheckpointId),
    /// Everything is durable and acknowledged.
    Done {
        /// A savepoint was taken: let its requester read the answer before exiting.
        savepoint: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Savepoint {
    NotAsked,
    Wanted(Option<String>),
    Taken(CheckpointId),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StopSequence {
    /// The checkpoint whose durability ends the stop (or leads to the savepoint).
    last: Option<CheckpointId>,
    savepoint: Savepoint,
}

impl StopSequence {
    /// A stop; `savepoint` asks for a savepoint at its end (`Some(None)`: default name).
    pub(crate) fn new(savepoint: Option<Option<String>>) -> Self {
        StopSequence {
            last: None,
            savepoint: match savepoint {
                Some(name) => Savepoint::Wanted(name),
                None => Savepoint::NotAsked,
            },
        }
    }

    pub(crate) fn next(&mut self, facts: Facts) -> Step {
        // a checkpoint is taken only once nothing is in flight
        if facts.in_flight > 0 {
            return Step::Wait;
        }
        if let Savepoint::Taken(id) = self.savepoint {
            if facts.last_durable != Some(id) || facts.refused_savepoint == Some(id) {
                return Step::SavepointFailed(id);
            }
        }
        let durable = self.last.is_some() && self.last == facts.last_durable;
        if durable && facts.pending_emissions == 0 && !facts.has_changes {
            return match std::mem::replace(&mut self.savepoint, Savepoint::NotAsked) {
                Savepoint::Wanted(name) => Step::Savepoint(name),
                Savepoint::Taken(id) => {
                    self.savepoint = Savepoint::Taken(id);
                    Step::Done { savepoint: true }
                }
                Savepoint::NotAsked => Step::Done { savepoint: false },
            };
        }
        // the last checkpoint is taken after every final window was acknowledged
        if !durable || facts.pending_emissions == 0 {
            Step::Checkpoint
        } else {
            Step::Wait
        }
    }

    /// The checkpoint (or savepoint) the last step asked for was triggered as `id`.
    pub(crate) fn triggered(&mut self, id: CheckpointId, savepoint: bool) {
        self.last = Some(id);
        if savepoint {
            self.savepoint = Savepoint::Taken(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(
        in_flight: usize,
        last_durable: Option<CheckpointId>,
        pending: usize,
        changes: bool,
    ) -> Facts {
        Facts {
            in_flight,
            last_durable,
            refused_savepoint: None,
            pending_emissions: pending,
            has_changes: changes,
        }
    }

    #[test]
    fn nothing_is_triggered_while_a_checkpoint_is_in_flight() {
        let mut s = StopSequence::new(None);
        assert_eq!(s.next(facts(1, Some(CheckpointId(3)), 0, true)), Step::Wait);
    }

    #[test]
    fn a_stop_with_pending_windows_checkpoints_waits_for_acks_and_checkpoints_again() {
        let mut s = StopSequence::new(None);
        assert_eq!(
            s.next(facts(0, Some(CheckpointId(3)), 0, true)),
            Step::Checkpoint
        );
        s.triggered(CheckpointId(4), false);
        assert_eq!(s.next(facts(1, Some(CheckpointId(3)), 0, true)), Step::Wait);
        // checkpoint 4 is durable and released two windows: wait for their acknowledgement
        assert_eq!(
            s.next(facts(0, Some(CheckpointId(4)), 2, false)),
            Step::Wait
        );
        // acknowledged: the acknowledgement is state to record
        assert_eq!(
            s.next(facts(0, Some(CheckpointId(4)), 0, true)),
            Step::Checkpoint
        );
        s.triggered(CheckpointId(5), false);
        assert_eq!(
            s.next(facts(0, Some(CheckpointId(5)), 0, false)),
            Step::Done { savepoint: false }
        );
    }

    #[test]
    fn a_failed_final_checkpoint_is_taken_again() {
        let mut s = StopSequence::new(None);
        assert_eq!(
            s.next(facts(0, Some(CheckpointId(3)), 0, true)),
            Step::Checkpoint
        );
        s.triggered(CheckpointId(4), false);
        // 4 failed: still 3 durable
        assert_eq!(
            s.next(facts(0, Some(CheckpointId(3)), 0, true)),
            Step::Checkpoint
        );
        s.triggered(CheckpointId(5), false);
        assert_eq!(
            s.next(facts(0, Some(CheckpointId(5)), 0, false)),
            Step::Done { savepoint: false }
        );
    }

    #[test]
    fn the_savepoint_is_taken_once_the_state_has_settled_and_ends_the_stop() {
        let mut s = StopSequence::new(Some(Some("before-upgrade".into())));
        assert_eq!(
            s.next(facts(0, Some(CheckpointId(3)), 0, true)),
            Step::Checkpoint
        );
        s.triggered(CheckpointId(4), false);
        assert_eq!(
            s.next(facts(0, Some(CheckpointId(4)), 0, false)),
            Step::Savepoint(Some("before-upgrade".into()))
        );
        s.triggered(CheckpointId(5), true);
        assert_eq!(
            s.next(facts(1, Some(CheckpointId(4)), 0, false)),
            Step::Wait
        );
        assert_eq!(
            s.next(facts(0, Some(CheckpointId(5)), 0, false)),
            Step::Done { savepoint: true }
        );
    }

    #[test]
    fn a_savepoint_that_was_not_written_fails_the_stop() {
        let mut s = StopSequence::new(Some(None));
        assert_eq!(s.next(facts(0, None, 0, false)), Step::Checkpoint);
        s.triggered(CheckpointId(1), false);
        assert_eq!(
            s.next(facts(0, Some(CheckpointId(1)), 0, false)),
            Step::Savepoint(None)
        );
        s.triggered(CheckpointId(2), true);
        assert_eq!(
            s.next(facts(0, Some(CheckpointId(1)), 0, false)),
            Step::SavepointFailed(CheckpointId(2))
        );
    }

    #[test]
    fn a_savepoint_whose_checkpoint_was_written_without_it_fails_the_stop() {
        let mut s = StopSequence::new(Some(Some("release".into())));
        assert_eq!(s.next(facts(0, None, 0, false)), Step::Checkpoint);
        s.triggered(CheckpointId(1), false);
        assert_eq!(
            s.next(facts(0, Some(CheckpointId(1)), 0, false)),
            Step::Savepoint(Some("release".into()))
        );
        s.triggered(CheckpointId(2), true);
        // durable, but its name was taken by the time of the write
        let refused = Facts {
            refused_savepoint: Some(CheckpointId(2)),
            ..facts(0, Some(CheckpointId(2)), 0, false)
        };
        assert_eq!(s.next(refused), Step::SavepointFailed(CheckpointId(2)));
        // an earlier refusal does not fail this one
        let mut s = StopSequence::new(Some(None));
        s.triggered(CheckpointId(3), true);
        let earlier = Facts {
            refused_savepoint: Some(CheckpointId(2)),
            ..facts(0, Some(CheckpointId(3)), 0, false)
        };
        assert_eq!(s.next(earlier), Step::Done { savepoint: true });
    }
}
