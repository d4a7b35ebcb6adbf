//! Carrying out the restore plan at start: read the chosen snapshot, fall back to older ones
//! where the plan allows it (with a warning and a metric), never start empty silently.

use anyhow::{bail, Context as _};

use crate::checkpoint::restore::{plan, Available, RestoreFrom, Snapshot};
use crate::checkpoint::{CheckpointMeta, StateSpec};
use crate::engine::RestoredState;
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

/// What the start restored.
pub struct Restored {
    pub source: Option<Snapshot>,
    pub meta: Option<CheckpointMeta>,
    pub state: Option<RestoredState>,
    /// The checkpoint the next delta may build on.
    pub head: Option<u64>,
    /// The first checkpoint id not used yet.
    pub next_id: u64,
}

impl Restored {
    pub fn describe(&self) -> String {
        match &self.source {
            Some(s) => s.to_string(),
            None => "nothing (empty start)".to_string(),
        }
    }
}

pub fn available(store: &Store) -> Result<Available, StoreError> {
    // a snapshot whose metadata cannot be read is tried (and reported) first
    let mut checkpoints = Vec::new();
    for id in store.checkpoint_ids()? {
        let time = store.checkpoint(id).map_or(i64::MAX, |c| c.meta.trigger_ms);
        checkpoints.push((id, time));
    }
    let mut savepoints = Vec::new();
    for name in store.savepoint_names()? {
        let time = store.savepoint(&name).map_or(i64::MAX, |s| s.created_ms);
        savepoints.push((name, time));
    }
    Ok(Available {
        checkpoints,
        savepoints,
    })
}

pub fn restore(
    store: &Store,
    from: &RestoreFrom,
    prefer_checkpoint: bool,
    spec: &StateSpec,
    metrics: &Metrics,
) -> anyhow::Result<Restored> {
    let available = available(store)?;
    let plan = plan(from, prefer_checkpoint, &available)?;
    let next_id = store.next_id()?;
    let store_head = store.head()?;
    let mut skipped: Vec<String> = Vec::new();
    for candidate in &plan.candidates {
        let loaded = match candidate {
            Snapshot::Checkpoint(id) => store.load_checkpoint(*id),
            Snapshot::Savepoint(name) => store
                .load_savepoint(name)
                .map(|(sp, state)| (sp.meta, state)),
        };
        let (meta, state) = match loaded {
            Ok(v) => v,
            Err(e @ (StoreError::Unreadable(_) | StoreError::Corrupt { .. })) => {
                if !plan.fallback {
                    return Err(e).with_context(|| {
                        format!("cannot restore {candidate} (checkpoint.restore_from: {from})")
                    });
                }
                metrics.restore_fallbacks.inc();
                tracing::warn!(snapshot = %candidate, error = %e, "cannot restore the newest snapshot; falling back to the next older one");
                skipped.push(format!("{candidate}: {e}"));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        meta.spec.check_restorable(spec, meta.id)?;
        let head = match candidate {
            Snapshot::Checkpoint(id) if store_head == Some(*id) => Some(*id),
            _ => None,
        };
        return Ok(Restored {
            source: Some(candidate.clone()),
            meta: Some(meta),
            state: Some(state),
            head,
            next_id,
        });
    }
    if !skipped.is_empty() {
        bail!(
            "no retained checkpoint or savepoint in {} can be restored; not starting empty silently. Move the directory aside to start empty, or set checkpoint.restore_from: none. Tried: {}",
            store.path().display(),
            skipped.join("; ")
        );
    }
    Ok(Restored {
        source: None,
        meta: None,
        state: None,
        head: None,
        next_id,
    })
}
