//! The shapes earlier formats stored, frozen, so migrations can decode them whatever the current
//! types become. When a type these use changes, freeze its old shape here first.

use serde::{Deserialize, Serialize};

use super::{Retained, SavepointMeta};
use crate::checkpoint::protocol::InputSpec;
use crate::checkpoint::protocol::{CheckpointMeta, StateSpec};
use crate::checkpoint_id::CheckpointId;
use crate::engine::{AggregateKind, Entry, PartitionState, StateKey, WindowDef};
use crate::event_time::EventTime;

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

/// State keys of formats 1 to 3 and savepoint files 1 and 2: no scope (instance scope).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateKeyV3 {
    pub window: u16,
    pub start: i64,
    pub key: String,
}

impl From<StateKeyV3> for StateKey {
    fn from(k: StateKeyV3) -> Self {
        StateKey {
            partition: None,
            window: k.window,
            start: k.start,
            key: k.key.into(),
        }
    }
}

/// Body of savepoint file version 1 (written by store format 2).
#[derive(Debug, Clone, Deserialize)]
pub struct PortableV1 {
    pub meta: SavepointMetaV2,
    pub entries: Vec<(StateKeyV3, Entry)>,
}

/// Format 3: the spec added input fields and retired windows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateSpecV3 {
    pub windows: Vec<WindowDef>,
    pub aggregates: Vec<AggregateKind>,
    pub input: Option<InputSpec>,
    pub retired: Vec<WindowDef>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointMetaV3 {
    pub id: u64,
    pub trigger_ms: i64,
    pub duration_ms: u64,
    pub bytes: u64,
    pub full: bool,
    pub records: u64,
    pub partitions: Vec<PartitionState>,
    pub watermark: Option<i64>,
    pub spec: StateSpecV3,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RetainedV3 {
    pub meta: CheckpointMetaV3,
    pub live_entries: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavepointMetaV3 {
    pub name: String,
    pub checkpoint_id: u64,
    pub created_ms: i64,
    pub meta: CheckpointMetaV3,
    pub entries: u64,
}

/// Body of savepoint file version 2 (written by store format 3).
#[derive(Debug, Clone, Deserialize)]
pub struct PortableV2 {
    pub meta: SavepointMetaV3,
    pub entries: Vec<(StateKeyV3, Entry)>,
}

impl From<CheckpointMetaV3> for CheckpointMeta {
    fn from(m: CheckpointMetaV3) -> Self {
        CheckpointMeta {
            id: CheckpointId(m.id),
            trigger_ms: m.trigger_ms,
            duration_ms: m.duration_ms,
            bytes: m.bytes,
            full: m.full,
            records: m.records,
            partitions: m.partitions,
            watermark: m.watermark.map(EventTime),
            spec: StateSpec {
                windows: m.spec.windows,
                aggregates: m.spec.aggregates,
                input: m.spec.input,
                retired: m.spec.retired,
                partition_scoped: false,
            },
        }
    }
}

impl From<RetainedV3> for Retained {
    fn from(r: RetainedV3) -> Self {
        Retained {
            meta: r.meta.into(),
            live_entries: r.live_entries,
        }
    }
}

impl From<SavepointMetaV3> for SavepointMeta {
    fn from(s: SavepointMetaV3) -> Self {
        SavepointMeta {
            name: s.name,
            checkpoint_id: CheckpointId(s.checkpoint_id),
            created_ms: s.created_ms,
            meta: s.meta.into(),
            entries: s.entries,
        }
    }
}

impl From<CheckpointMetaV2> for CheckpointMetaV3 {
    fn from(m: CheckpointMetaV2) -> Self {
        CheckpointMetaV3 {
            id: m.id,
            trigger_ms: m.trigger_ms,
            duration_ms: m.duration_ms,
            bytes: m.bytes,
            full: m.full,
            records: m.records,
            partitions: m.partitions,
            watermark: m.watermark,
            spec: StateSpecV3 {
                windows: m.spec.windows,
                aggregates: m.spec.aggregates,
                input: None,
                retired: Vec::new(),
            },
        }
    }
}

impl From<RetainedV2> for RetainedV3 {
    fn from(r: RetainedV2) -> Self {
        RetainedV3 {
            meta: r.meta.into(),
            live_entries: r.live_entries,
        }
    }
}

impl From<SavepointMetaV2> for SavepointMetaV3 {
    fn from(s: SavepointMetaV2) -> Self {
        SavepointMetaV3 {
            name: s.name,
            checkpoint_id: s.checkpoint_id,
            created_ms: s.created_ms,
            meta: s.meta.into(),
            entries: s.entries,
        }
    }
}
