//! What a checkpoint contains and how it applies to the state it builds on. Pure: the store
//! encodes these types, the engine produces and consumes them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::checkpoint_id::CheckpointId;
use crate::engine::{
    AggregateKind, Entry, GroupId, PartitionState, RestoredState, StateDelta, StateKey, WindowDef,
};
use crate::event_time::EventTime;
use crate::position::{check_forward, BackwardsMove};

/// What the state means: the window definitions its entries belong to (by position), the
/// aggregates its final windows render, and the input fields its accumulators were fed from.
/// Stored with every checkpoint so that a restart under a changed configuration can tell what
/// of the state still applies (`compat`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StateSpec {
    pub windows: Vec<WindowDef>,
    pub aggregates: Vec<AggregateKind>,
    /// `None` in state written by format 2 and earlier, which did not record it.
    pub input: Option<InputSpec>,
    /// Windows no longer configured (removed, or redefined under the same name) whose final
    /// windows still wait for emission; their entries use the indices after `windows`.
    pub retired: Vec<WindowDef>,
    /// Windows aggregate one source partition each (`state.scope: partition`).
    pub partition_scoped: bool,
}

impl StateSpec {
    /// The name of the window at `index` (configured, then retired).
    pub fn window_name(&self, index: u16) -> Option<&str> {
        let i = usize::from(index);
        self.windows
            .get(i)
            .or_else(|| self.retired.get(i.checked_sub(self.windows.len())?))
            .map(|w| w.name.as_str())
    }
}

/// The configured input fields (`input.key`, `input.timestamp`, `input.value`) as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputSpec {
    pub key: String,
    pub timestamp: String,
    pub value: Option<String>,
}

/// One checkpoint as handed to the writer: the engine's delta plus identity.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub id: CheckpointId,
    /// The checkpoint this delta applies on top of; `None` for a full snapshot.
    pub base: Option<CheckpointId>,
    /// Wall-clock trigger time, epoch milliseconds.
    pub trigger_ms: i64,
    pub spec: StateSpec,
    pub delta: StateDelta,
}

/// Metadata stored atomically with every completed checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub id: CheckpointId,
    pub trigger_ms: i64,
    /// Time from trigger until the write was flushed, milliseconds.
    pub duration_ms: u64,
    /// Encoded size of what this checkpoint wrote.
    pub bytes: u64,
    pub full: bool,
    pub records: u64,
    pub partitions: Vec<PartitionState>,
    pub watermark: Option<EventTime>,
    pub spec: StateSpec,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("checkpoint {id} builds on checkpoint {base:?} but the store holds {current:?}")]
    BaseMismatch {
        id: CheckpointId,
        base: Option<CheckpointId>,
        current: Option<CheckpointId>,
    },
    #[error("checkpoint {id} is not newer than the stored checkpoint {current}")]
    NotNewer {
        id: CheckpointId,
        current: CheckpointId,
    },
    #[error("checkpoint {id}: {source}")]
    Backwards {
        id: CheckpointId,
        #[source]
        source: BackwardsMove,
    },
}

/// Checks that `cp` may be applied on top of `current`, the newest checkpoint written.
pub fn check_applicable(
    current: Option<&CheckpointMeta>,
    cp: &Checkpoint,
) -> Result<(), ApplyError> {
    let current_id = current.map(|m| m.id);
    if let Some(c) = current_id {
        if cp.id <= c {
            return Err(ApplyError::NotNewer {
                id: cp.id,
                current: c,
            });
        }
    }
    if !cp.delta.full && cp.base != current_id {
        return Err(ApplyError::BaseMismatch {
            id: cp.id,
            base: cp.base,
            current: current_id,
        });
    }
    // offsets only move forward along a chain of deltas; a full snapshot may start a new line
    // (a restore of an older checkpoint or of a savepoint)
    if let Some(meta) = current.filter(|_| !cp.delta.full) {
        let before: BTreeMap<_, _> = meta
            .partitions
            .iter()
            .filter_map(|p| p.next.map(|n| (&p.partition, n)))
            .collect();
        check_forward(
            |p| before.get(p).copied(),
            cp.delta
                .partitions
                .iter()
                .filter_map(|p| p.next.map(|n| (&p.partition, n))),
        )
        .map_err(|source| ApplyError::Backwards { id: cp.id, source })?;
    }
    Ok(())
}

/// The complete state as of one checkpoint: what restoring it yields. A checkpoint replaces
/// each group it carries whole (a full one replaces every group).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MaterializedState {
    pub meta: Option<CheckpointMeta>,
    pub groups: BTreeMap<GroupId, Vec<(StateKey, Entry)>>,
}

impl MaterializedState {
    /// Applies `cp` (checked first; nothing changes on error).
    pub fn apply(
        &mut self,
        cp: &Checkpoint,
        duration_ms: u64,
        bytes: u64,
    ) -> Result<(), ApplyError> {
        check_applicable(self.meta.as_ref(), cp)?;
        if cp.delta.full {
            self.groups.clear();
        }
        for g in &cp.delta.groups {
            if g.is_empty() {
                self.groups.remove(&g.id);
            } else {
                self.groups.insert(g.id.clone(), g.entries());
            }
        }
        self.meta = Some(meta_of(cp, duration_ms, bytes));
        Ok(())
    }

    /// Every entry, by key.
    pub fn entries(&self) -> BTreeMap<StateKey, Entry> {
        self.groups
            .values()
            .flatten()
            .map(|(k, e)| (k.clone(), *e))
            .collect()
    }

    pub fn restored(&self) -> RestoredState {
        RestoredState {
            partitions: self
                .meta
                .as_ref()
                .map(|m| m.partitions.clone())
                .unwrap_or_default(),
            watermark: self.meta.as_ref().and_then(|m| m.watermark),
            entries: self.entries().into_iter().collect(),
            stored_bytes: 0,
            ..Default::default()
        }
    }
}

pub fn meta_of(cp: &Checkpoint, duration_ms: u64, bytes: u64) -> CheckpointMeta {
    CheckpointMeta {
        id: cp.id,
        trigger_ms: cp.trigger_ms,
        duration_ms,
        bytes,
        full: cp.delta.full,
        records: cp.delta.records,
        partitions: cp.delta.partitions.clone(),
        watermark: cp.delta.watermark,
        spec: cp.spec.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::group::group_entries;
    use crate::engine::{Acc, EntryStatus, GroupLayout};
    use crate::position::{NextOffset, Partition};

    /// Checkpoint `id` of one key whose state holds windows `1..=id` (`..=1` for `short`).
    fn cp(id: u64, base: Option<u64>, full: bool, next: i64) -> Checkpoint {
        Checkpoint {
            id: CheckpointId(id),
            base: base.map(CheckpointId),
            trigger_ms: 0,
            spec: StateSpec::default(),
            delta: StateDelta {
                full,
                partitions: vec![PartitionState {
                    partition: Partition::new("t", 0),
                    next: Some(NextOffset(next)),
                    max_ts: None,
                }],
                watermark: None,
                groups: group_entries(
                    &GroupLayout::default(),
                    (1..=id).map(|start| {
                        (
                            StateKey {
                                partition: None,
                                window: 0,
                                start: start as i64,
                                key: "k".into(),
                            },
                            Entry {
                                status: EntryStatus::Open,
                                end: 1,
                                acc: Acc::of(Some(1.0)),
                            },
                        )
                    }),
                ),
                entries: id,
                records: 1,
            },
        }
    }

    #[test]
    fn deltas_chain_on_their_base() {
        let mut s = MaterializedState::default();
        s.apply(&cp(1, None, true, 5), 0, 0).expect("full");
        s.apply(&cp(2, Some(1), false, 6), 0, 0).expect("delta");
        assert_eq!(s.entries().len(), 2);
        let err = s.apply(&cp(4, Some(3), false, 7), 0, 0).expect_err("gap");
        assert!(matches!(err, ApplyError::BaseMismatch { .. }));
        assert_eq!(
            s.meta.as_ref().map(|m| m.id.0),
            Some(2),
            "unchanged on error"
        );
    }

    #[test]
    fn full_snapshot_replaces_everything() {
        let mut s = MaterializedState::default();
        s.apply(&cp(2, None, true, 5), 0, 0).expect("full");
        let mut other = cp(3, None, true, 6);
        other.delta.groups.clear();
        s.apply(&other, 0, 0).expect("full");
        assert!(s.entries().is_empty());
    }

    #[test]
    fn offsets_moving_backwards_are_refused() {
        let mut s = MaterializedState::default();
        s.apply(&cp(1, None, true, 5), 0, 0).expect("full");
        let err = s
            .apply(&cp(2, Some(1), false, 4), 0, 0)
            .expect_err("backwards");
        assert!(matches!(err, ApplyError::Backwards { .. }));
    }

    #[test]
    fn older_checkpoint_is_refused() {
        let mut s = MaterializedState::default();
        s.apply(&cp(3, None, true, 5), 0, 0).expect("full");
        let err = s.apply(&cp(2, None, true, 6), 0, 0).expect_err("older");
        assert!(matches!(err, ApplyError::NotNewer { .. }));
    }
}
