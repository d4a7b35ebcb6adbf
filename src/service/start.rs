//! The start: open the store (waiting for a lock an old instance still holds), claim it,
//! check a migrated copy before migrating, restore, and build the engine from what was
//! restored.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::restore::{self, Restored};
use crate::checkpoint::compat::Target;
use crate::checkpoint::{RestorePoint, StateSpec};
use crate::config::Settings;
use crate::engine::{Engine, EngineConfig};
use crate::metrics::Metrics;
use crate::ratelimit::RateLimit;
use crate::store::{Open, Retention, Store, StoreError, FORMAT_VERSION};

/// Opens the store, waiting up to `wait` for a lock another process holds: an old instance on
/// the same volume may still be writing its final checkpoint. Logged while it waits.
fn open_waiting(dir: &Path, wait: Duration, cache: u64) -> Result<Store, StoreError> {
    let started = Instant::now();
    let mut log = RateLimit::new(Duration::from_secs(10));
    loop {
        match Store::open_with_cache(dir, Open::AsIs, cache) {
            Err(StoreError::Locked { path }) => {
                let waited = started.elapsed();
                if waited >= wait {
                    return Err(StoreError::LockTimeout { path, waited });
                }
                if log.check().is_some() {
                    tracing::warn!(dir = %path.display(), waited_s = waited.as_secs(), limit_s = wait.as_secs(), "checkpoint store is locked by another process (an instance still shutting down?); waiting for it");
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            other => return other,
        }
    }
}

/// Opens the store and restores from it. A store of an older format is checked on a migrated
/// temporary copy first, so a start that is refused leaves it readable by the build that wrote
/// it; only a start that goes ahead migrates it. Blocking.
pub(super) fn open_and_restore(
    settings: &Settings,
    spec: &StateSpec,
    retention: Retention,
    metrics: &Metrics,
) -> anyhow::Result<(Store, Restored)> {
    let dir = &settings.checkpoint.dir;
    let c = &settings.checkpoint;
    let request = restore::Request {
        from: &c.restore_from,
        prefer_checkpoint: c.prefer_checkpoint_for_recovery,
        target: Target {
            spec,
            topics: &settings.kafka.topics,
            auto_offset_reset: settings.kafka.reset(),
        },
        allow_non_restored_state: c.allow_non_restored_state,
    };
    // the lock is held from here on: nothing can change the store between check and migration
    let mut store = open_waiting(dir, c.lock_wait, c.cache_capacity.as_u64())?
        .with_retention(retention)
        .with_key_groups(settings.state.key_groups());
    // claimed before anything is migrated or restored: an older writer stops at its next write
    let owner = store.claim(&owner_name(settings))?;
    tracing::info!(dir = %dir.display(), epoch = owner.epoch, instance = %owner.instance, "claimed the checkpoint store");
    if let Some(found) = store.format_version()?.filter(|v| *v < FORMAT_VERSION) {
        tracing::info!(dir = %dir.display(), found, current = FORMAT_VERSION, "the checkpoint store has an older format; checking the restore on a migrated copy before migrating it");
        let copy = store.scratch_copy()?;
        restore::restore(&copy, &request, &Metrics::new())?;
    }
    store.upgrade()?;
    let (layout, configured) = (store.layout()?, settings.state.key_groups());
    if layout.groups == configured {
        tracing::info!(dir = %dir.display(), key_groups = layout.groups, "checkpoint store key groups");
    } else {
        tracing::info!(dir = %dir.display(), key_groups = layout.groups, configured_key_groups = configured, "the checkpoint store keeps the key groups it was created with; state.key_groups applies to new stores only");
    }
    store.record_claim()?;
    let restored = restore::restore(&store, &request, metrics)?;
    Ok((store, restored))
}

/// Who claims the store: `kafka.instance_id`, else the host name (a pod's name).
pub(super) fn owner_name(settings: &Settings) -> String {
    settings
        .kafka
        .instance_id
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "unnamed".to_string())
}

/// The engine holding what was restored (empty when nothing was), with the restore's metrics
/// and log line.
pub(super) fn engine(
    mut config: EngineConfig,
    restored: &mut Restored,
    store: &Store,
    restore_from: &str,
    metrics: &Metrics,
    restore_started: Instant,
) -> anyhow::Result<Engine> {
    config.groups = store.layout()?;
    let engine = match (&restored.meta, restored.state.take()) {
        (Some(meta), Some(state)) => {
            let entries = state.len();
            let bytes = state.stored_bytes;
            let engine = Engine::from_state(config, state).with_context(|| {
                format!(
                    "cannot restore {} from {}",
                    restored.describe(),
                    store.path().display()
                )
            })?;
            tracing::info!(
                restored_from = %restored.describe(),
                checkpoint_id = meta.id.0,
                entries,
                bytes,
                pending_windows = engine.pending_emissions(),
                duration_ms = restore_started.elapsed().as_millis() as u64,
                "restored"
            );
            engine
        }
        _ => {
            tracing::info!(dir = %store.path().display(), restore_from, "no checkpoint restored, starting empty");
            Engine::new(config)
        }
    };
    metrics
        .restore_duration
        .set(restore_started.elapsed().as_secs_f64());
    let (kind, id, name) = match &restored.source {
        Some(RestorePoint::Checkpoint(id)) => ("checkpoint", id.to_string(), String::new()),
        Some(RestorePoint::Savepoint(name)) => (
            "savepoint",
            restored
                .meta
                .as_ref()
                .map_or(String::new(), |m| m.id.to_string()),
            name.clone(),
        ),
        None => ("none", String::new(), String::new()),
    };
    metrics
        .restore_info
        .with_label_values(&[kind, &id, &name])
        .set(1);
    if let Some(id) = restored.head {
        metrics.checkpoint_last_id.set(id.0 as i64);
    }
    Ok(engine)
}
