//! The shapes earlier formats stored, frozen, so migrations can decode them whatever the current
//! types become. When a type these use changes, freeze its old shape here first.

use serde::{Deserialize, Serialize};

use super::{Retained, SavepointMeta};
use crate::checkpoint::protocol::{CheckpointMeta, StateSpec};
use crate::engine::{AggregateKind, Entry, PartitionState, StateKey, WindowDef};

/// Formats 1 and 2: the spec named windows and aggregates only.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateSpecV2 {
    pub windows: Vec<WindowDef>,
    pub aggregates: Vec<AggregateKind>,
}

/// Checkpoint metadata of formats 1 and 2.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointMetaV2 {
    pub id: u64,
    pub trigger_ms: i64,
    pub duration_ms: u64,
    pub bytes: u64,
    pub full: bool,
    pub records: u64,
    pub partitions: Vec<PartitionState>,
    pub watermark: Option<i64>,
    pub spec: StateSpecV2,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RetainedV2 {
    pub meta: CheckpointMetaV2,
    pub live_entries: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavepointMetaV2 {
    pub name: String,
    pub checkpoint_id: u64,
    pub created_ms: i64,
    pub meta: CheckpointMetaV2,
    pub entries: u64,
}

/// Body of savepoint file version 1 (written by store format 2).
#[derive(Debug, Clone, Deserialize)]
pub struct PortableV1 {
    pub meta: SavepointMetaV2,
    pub entries: Vec<(StateKey, Entry)>,
}

impl From<CheckpointMetaV2> for CheckpointMeta {
    fn from(m: CheckpointMetaV2) -> Self {
        CheckpointMeta {
            id: m.id,
            trigger_ms: m.trigger_ms,
            duration_ms: m.duration_ms,
            bytes: m.bytes,
            full: m.full,
            records: m.records,
            partitions: m.partitions,
            watermark: m.watermark,
            spec: StateSpec {
                windows: m.spec.windows,
                aggregates: m.spec.aggregates,
                input: None,
                retired: Vec::new(),
            },
        }
    }
}

impl From<RetainedV2> for Retained {
    fn from(r: RetainedV2) -> Self {
        Retained {
            meta: r.meta.into(),
            live_entries: r.live_entries,
        }
    }
}

impl From<SavepointMetaV2> for SavepointMeta {
    fn from(s: SavepointMetaV2) -> Self {
        SavepointMeta {
            name: s.name,
            checkpoint_id: s.checkpoint_id,
            created_ms: s.created_ms,
            meta: s.meta.into(),
            entries: s.entries,
        }
    }
}
