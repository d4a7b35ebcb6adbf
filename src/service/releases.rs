//! Bookkeeping of partition hand-offs, kept free of I/O so its rules are tested directly:
//! which revoked partitions wait for which checkpoint, which releases are still due when their
//! publication completes, and which partitions' state an instance must drop on assignment.

use std::collections::{HashMap, HashSet};

use crate::checkpoint_id::CheckpointId;
use crate::position::Partition;

/// Revoked partitions on their way out.
#[derive(Debug, Default)]
pub(super) struct Releases {
    /// Revoke checkpoints in flight, with the partitions they release once published.
    by_checkpoint: HashMap<CheckpointId, Vec<Partition>>,
    /// Partitions revoked and not released yet, with the checkpoint they wait for.
    pending: HashMap<Partition, CheckpointId>,
}

impl Releases {
    /// `partitions` are released once checkpoint `id` is published (or failed).
    pub(super) fn begin(&mut self, id: CheckpointId, partitions: Vec<Partition>) {
        self.pending
            .extend(partitions.iter().map(|p| (p.clone(), id)));
        self.by_checkpoint.insert(id, partitions);
    }

    /// The partitions checkpoint `id` releases, if it is a revoke checkpoint.
    pub(super) fn take_checkpoint(&mut self, id: CheckpointId) -> Option<Vec<Partition>> {
        self.by_checkpoint.remove(&id)
    }

    /// `partitions` were assigned again, or released right away: a release that arrives for
    /// them later is stale.
    /// Whether a release waits for its revoke checkpoint's publication.
    pub(super) fn any_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    pub(super) fn cancel(&mut self, partitions: &[Partition]) {
        self.pending.retain(|p, _| !partitions.contains(p));
    }

    /// Of the partitions checkpoint `id`'s completed publication releases, those still
    /// waiting for it: a partition assigned again meanwhile stays, and one revoked again waits
    /// for its newer checkpoint, which holds what it processed in between.
    pub(super) fn due(&mut self, id: CheckpointId, released: Vec<Partition>) -> Vec<Partition> {
        released
            .into_iter()
            .filter(|p| {
                let waits = self.pending.get(p) == Some(&id);
                if waits {
                    self.pending.remove(p);
                }
                waits
            })
            .collect()
    }
}

/// Partitions whose state this instance holds but which are neither assigned to it nor being
/// assigned now: owned elsewhere, so their windows must be dropped, never closed and emitted,
/// and their positions forgotten.
pub(super) fn stale<'a>(
    held: impl IntoIterator<Item = &'a Partition>,
    assigned: &[Partition],
    incoming: &[Partition],
) -> Vec<Partition> {
    let keep: HashSet<&Partition> = assigned.iter().chain(incoming).collect();
    let mut out: Vec<Partition> = held
        .into_iter()
        .filter(|p| !keep.contains(p))
        .cloned()
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: i32) -> Partition {
        Partition::new("events", n)
    }

    #[test]
    fn a_partition_assigned_again_before_its_release_is_kept() {
        let mut r = Releases::default();
        r.begin(CheckpointId(5), vec![p(0), p(1)]);
        r.cancel(&[p(1)]);
        assert_eq!(r.take_checkpoint(CheckpointId(5)), Some(vec![p(0), p(1)]));
        assert_eq!(r.due(CheckpointId(5), vec![p(0), p(1)]), vec![p(0)]);
    }

    #[test]
    fn a_release_is_due_once() {
        let mut r = Releases::default();
        r.begin(CheckpointId(5), vec![p(0)]);
        assert_eq!(r.due(CheckpointId(5), vec![p(0)]), vec![p(0)]);
        // a second answer for the same checkpoint releases nothing more
        assert_eq!(r.due(CheckpointId(5), vec![p(0)]), Vec::<Partition>::new());
        assert_eq!(r.take_checkpoint(CheckpointId(5)), Some(vec![p(0)]));
        assert_eq!(r.take_checkpoint(CheckpointId(5)), None);
    }

    #[test]
    fn a_partition_revoked_again_waits_for_its_newest_revoke_checkpoint() {
        let mut r = Releases::default();
        r.begin(CheckpointId(5), vec![p(0)]);
        r.cancel(&[p(0)]); // assigned again, records processed
        r.begin(CheckpointId(9), vec![p(0)]); // and revoked again
                                              // checkpoint 5's publication lacks what came after it: releasing on it would hand the
                                              // next owner an older state than this instance holds
        assert_eq!(r.due(CheckpointId(5), vec![p(0)]), Vec::<Partition>::new());
        assert_eq!(r.due(CheckpointId(9), vec![p(0)]), vec![p(0)]);
    }

    #[test]
    fn stale_partitions_are_held_but_neither_assigned_nor_incoming() {
        let held = [p(0), p(1), p(2), p(3)];
        assert_eq!(stale(&held, &[p(0)], &[p(2)]), vec![p(1), p(3)]);
        assert_eq!(
            stale(&held, &[p(0), p(1)], &[p(2), p(3)]),
            Vec::<Partition>::new()
        );
        assert_eq!(stale(&held, &[], &[]), held.to_vec());
    }
}
