//! Carrying out the restore plan at start: read the chosen snapshot, fall back to older ones
//! where the plan allows it (with a warning and a metric), never start empty silently; then
//! check it against the configuration (`compat`) and refuse, or drop what no longer fits when
//! `checkpoint.allow_non_restored_state` allows it.

use std::path::PathBuf;

use crate::checkpoint::choice::{plan, Available, ChoiceError, RestoreFrom, RestorePoint};
use crate::checkpoint::compat::{self, Report, Target};
use crate::checkpoint::CheckpointMeta;
use crate::checkpoint_id::CheckpointId;
use crate::engine::RestoredState;
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

/// What the start restored.
pub struct Restored {
    pub source: Option<RestorePoint>,
    pub meta: Option<CheckpointMeta>,
    pub state: Option<RestoredState>,
    /// The checkpoint the next delta may build on.
    pub head: Option<CheckpointId>,
    /// The first checkpoint id not used yet.
    pub next_id: CheckpointId,
    /// How the snapshot fits the configuration.
    pub report: Option<Report>,
}

/// What to restore and under which configuration.
pub struct Request<'a> {
    pub from: &'a RestoreFrom,
    pub prefer_checkpoint: bool,
    pub target: Target<'a>,
    pub allow_non_restored_state: bool,
}

/// A start refused because restored state does not fit the configuration.
#[derive(Debug, thiserror::Error)]
#[error("{snapshot} does not fit the configuration: {open} open windows would be dropped. Nothing was changed. Keep the previous configuration, or set checkpoint.allow_non_restored_state: true to drop them. What restoring it would do:\n{report}")]
pub struct Incompatible {
    pub snapshot: RestorePoint,
    pub open: u64,
    pub report: Report,
}

/// Why nothing could be restored at start.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Choice(#[from] ChoiceError),
    #[error("cannot restore {snapshot} (checkpoint.restore_from: {from}): {source}")]
    Damaged {
        snapshot: RestorePoint,
        from: RestoreFrom,
        #[source]
        source: StoreError,
    },
    #[error(transparent)]
    Incompatible(Box<Incompatible>),
    #[error("no retained checkpoint or savepoint in {} can be restored; not starting empty silently. Move the directory aside to start empty, or set checkpoint.restore_from: none. Tried: {}", dir.display(), tried.join("; "))]
    NothingRestorable { dir: PathBuf, tried: Vec<String> },
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

/// Loads what the plan chooses and checks it against the configuration, without changing it
/// (`check-restore`, and the first step of a start).
pub fn restore(
    store: &Store,
    req: &Request<'_>,
    metrics: &Metrics,
) -> Result<Restored, RestoreError> {
    let from = req.from;
    let available = available(store)?;
    let plan = plan(from, req.prefer_checkpoint, &available)?;
    let next_id = store.next_id()?;
    let store_head = store.head()?;
    let mut skipped: Vec<String> = Vec::new();
    for candidate in &plan.candidates {
        let loaded = match candidate {
            RestorePoint::Checkpoint(id) => store.load_checkpoint_stored(*id),
            RestorePoint::Savepoint(name) => store
                .load_savepoint(name)
                .map(|(sp, state)| (sp.meta, state)),
        };
        let (meta, state) = match loaded {
            Ok(v) => v,
            Err(e @ (StoreError::Unreadable(_) | StoreError::Corrupt { .. })) => {
                if !plan.fallback {
                    return Err(RestoreError::Damaged {
                        snapshot: candidate.clone(),
                        from: from.clone(),
                        source: e,
                    });
                }
                metrics.restore_fallbacks.inc();
                tracing::warn!(snapshot = %candidate, error = %e, "cannot restore the newest snapshot; falling back to the next older one");
                skipped.push(format!("{candidate}: {e}"));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let report = compat::assess(&meta.spec, &state, req.target);
        if report.refuses() && !req.allow_non_restored_state {
            return Err(RestoreError::Incompatible(Box::new(Incompatible {
                snapshot: candidate.clone(),
                open: report.incompatible_open_windows(),
                report,
            })));
        }
        // a restore that changed the state starts a new line: the next checkpoint is full
        let head = match candidate {
            RestorePoint::Checkpoint(id) if store_head == Some(*id) && !report.changes_state() => {
                Some(*id)
            }
            _ => None,
        };
        return Ok(Restored {
            source: Some(candidate.clone()),
            meta: Some(meta),
            state: Some(state),
            head,
            next_id,
            report: Some(report),
        });
    }
    if !skipped.is_empty() {
        return Err(RestoreError::NothingRestorable {
            dir: store.path().to_path_buf(),
            tried: skipped,
        });
    }
    Ok(Restored {
        source: None,
        meta: None,
        state: None,
        head: None,
        next_id,
        report: None,
    })
}

impl Restored {
    /// Applies the compatibility report to the loaded state, logging and counting what it
    /// drops.
    pub fn apply_report(&mut self, metrics: &Metrics) {
        let (Some(report), Some(state)) = (&self.report, self.state.take()) else {
            return;
        };
        let applied = report.apply(state);
        for line in report.windows.iter().chain(&report.topics) {
            if let compat::Verdict::Incompatible(why) | compat::Verdict::Dropped(why) =
                &line.verdict
            {
                if line.stored > 0 {
                    tracing::warn!(part = %line.subject, stored = line.stored, reason = %why, "state not restored");
                }
            }
        }
        if applied.dropped_entries > 0 {
            tracing::warn!(
                entries = applied.dropped_entries,
                "dropped open windows that no longer fit the configuration (checkpoint.allow_non_restored_state)"
            );
        }
        metrics
            .restore_dropped_entries
            .inc_by(applied.dropped_entries);
        metrics
            .restore_dropped_partitions
            .inc_by(applied.dropped_partitions);
        self.state = Some(applied.state);
    }
}
