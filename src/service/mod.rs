//! Wiring: open and restore the store, start the admin server, the output, the consumer and
//! the checkpoint writer, then hand over to the processing loop in `runtime`.

mod handoff;
mod lifecycle;
mod releases;
pub(crate) mod restore;
mod runtime;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::consumer::Consumer;

use crate::changelog::kafka::{ChangelogTopic, Publisher};
use crate::checkpoint::compat::Target;
use crate::checkpoint::history::History;
use crate::checkpoint::scheduler::SchedulerSettings;
use crate::checkpoint::writer;
use crate::checkpoint::{Scheduler, Snapshot, StateSpec};
use crate::config::{duration_ms, CheckpointMode, Settings, StateScope};
use crate::engine::{Decoder, Engine, EngineConfig};
use crate::http::{self, AdminState};
use crate::metrics::Metrics;
use crate::ratelimit::RateLimit;
use crate::sink::{Sink, SinkSettings};
use crate::source::{self, Shared, SourceSettings};
use crate::store::{Retention, Store, StoreError, FORMAT_VERSION};
use runtime::Runtime;

/// Opens the store, waiting up to `wait` for a lock another process holds: an old instance on
/// the same volume may still be writing its final checkpoint. Logged while it waits.
fn open_waiting(dir: &std::path::Path, wait: Duration) -> Result<Store, StoreError> {
    let started = Instant::now();
    let mut log = RateLimit::new(Duration::from_secs(10));
    loop {
        match Store::open_unversioned(dir) {
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
/// it; only a start that goes ahead migrates it.
fn open_and_restore(
    settings: &Settings,
    spec: &StateSpec,
    retention: Retention,
    metrics: &Metrics,
) -> anyhow::Result<(Store, restore::Restored)> {
    let dir = &settings.checkpoint.dir;
    let c = &settings.checkpoint;
    let request = restore::Request {
        from: &c.restore_from,
        prefer_checkpoint: c.prefer_checkpoint_for_recovery,
        target: Target {
            spec,
            topics: &settings.kafka.topics,
            auto_offset_reset: settings.kafka.auto_offset_reset,
        },
        allow_non_restored_state: c.allow_non_restored_state,
    };
    // the lock is held from here on: nothing can change the store between check and migration
    let mut store = open_waiting(dir, c.lock_wait)?.with_retention(retention);
    // claimed before anything is migrated or restored: an older writer stops at its next write
    let owner = store.claim(&owner_name(settings))?;
    tracing::info!(dir = %dir.display(), epoch = owner.epoch, instance = %owner.instance, "claimed the checkpoint store");
    if let Some(found) = store.format_version()?.filter(|v| *v < FORMAT_VERSION) {
        tracing::info!(dir = %dir.display(), found, current = FORMAT_VERSION, "the checkpoint store has an older format; checking the restore on a migrated copy before migrating it");
        let copy = store.scratch_copy()?;
        restore::restore(&copy, &request, &Metrics::new())?;
    }
    store.upgrade()?;
    store.record_claim()?;
    let restored = restore::restore(&store, &request, metrics)?;
    Ok((store, restored))
}

/// Who claims the store: `kafka.instance_id`, else the host name (a pod's name).
fn owner_name(settings: &Settings) -> String {
    settings
        .kafka
        .instance_id
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "unnamed".to_string())
}

pub async fn run(settings: Settings) -> anyhow::Result<()> {
    for w in settings.warnings() {
        tracing::warn!("{w}");
    }
    let metrics = Arc::new(Metrics::new());
    metrics
        .checkpoint_interval
        .set(settings.checkpoint.interval.as_secs_f64());
    metrics
        .build_info
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
    let restore_started = Instant::now();
    let retention = Retention {
        checkpoints: settings.checkpoint.retained,
        history: settings.checkpoint.history,
    };
    let windows = settings.window_defs()?;
    let engine_cfg = EngineConfig {
        windows: windows.clone(),
        max_out_of_orderness: duration_ms(settings.watermark.max_out_of_orderness),
        allowed_lateness: duration_ms(settings.watermark.allowed_lateness),
        hold_until_checkpoint: settings.checkpoint.mode == CheckpointMode::ExactlyOnce,
        partition_scoped: settings.state.scope == StateScope::Partition,
    };
    let spec = settings.state_spec()?;
    let (store, mut restored) = {
        let settings = settings.clone();
        let spec = spec.clone();
        let metrics = metrics.clone();
        tokio::task::spawn_blocking(move || open_and_restore(&settings, &spec, retention, &metrics))
            .await
            .context("restore task")??
    };
    restored.apply_report(&metrics);
    // checkpoints name the windows whose final windows still wait under retired indices
    let mut spec = spec;
    spec.retired = restored
        .report
        .as_ref()
        .map(|r| r.retired().to_vec())
        .unwrap_or_default();
    let store = Arc::new(store);
    let engine = match (&restored.meta, restored.state.clone()) {
        (Some(meta), Some(state)) => {
            let entries = state.entries.len();
            let bytes = Store::state_bytes(&state.entries);
            let engine = Engine::restore(engine_cfg, state).with_context(|| {
                format!(
                    "cannot restore {} from {}",
                    restored.describe(),
                    store.path().display()
                )
            })?;
            tracing::info!(
                restored_from = %restored.describe(),
                checkpoint_id = meta.id,
                entries,
                bytes,
                pending_windows = engine.pending_emissions(),
                duration_ms = restore_started.elapsed().as_millis() as u64,
                "restored"
            );
            engine
        }
        _ => {
            tracing::info!(dir = %store.path().display(), restore_from = %settings.checkpoint.restore_from, "no checkpoint restored, starting empty");
            Engine::new(engine_cfg)
        }
    };
    metrics
        .restore_duration
        .set(restore_started.elapsed().as_secs_f64());
    let (kind, id, name) = match &restored.source {
        Some(Snapshot::Checkpoint(id)) => ("checkpoint", id.to_string(), String::new()),
        Some(Snapshot::Savepoint(name)) => (
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
        metrics.checkpoint_last_id.set(id as i64);
    }

    let shared = Arc::new(Shared::default());
    let shared_for_close = shared.clone();
    let (commands_tx, commands) = tokio::sync::mpsc::unbounded_channel();
    let admin = Arc::new(AdminState::new(
        metrics.clone(),
        History::new(200),
        store.clone(),
        shared.clone(),
        commands_tx,
        restored.describe(),
    ));
    let addr = http::serve(settings.http.listen, admin.clone()).await?;
    tracing::info!(%addr, "http listening");

    for (p, progress) in engine.progress() {
        if let Some(next) = progress.next {
            shared.set_position(p, next);
        }
    }
    let k = &settings.kafka;
    let (sink, acks) = Sink::start(
        source::base_client(&k.brokers, &k.options),
        SinkSettings {
            topic: settings.output.topic.clone(),
            window_names: windows
                .iter()
                .map(|w| w.name.clone())
                .chain(spec.retired.iter().map(|w| w.name.clone()))
                .collect(),
            aggregates: settings.aggregates.clone(),
        },
        metrics.clone(),
    )?;
    // one instance owns every partition: no group membership, partitions assigned directly
    let direct = settings.state.scope == StateScope::Instance;
    let tag = source::ownership::CommitTag {
        store: store.identity()?,
        run: format!("{:x}", handoff::Changelog::run_id()),
        since_ms: crate::clock::epoch_ms(),
        at_ms: 0,
        instance: owner_name(&settings),
    };
    let consumer = source::connect(
        &SourceSettings {
            brokers: &k.brokers,
            group_id: &k.group_id,
            topics: &k.topics,
            auto_offset_reset: k.auto_offset_reset,
            instance_id: k.instance_id.as_deref(),
            options: &k.options,
            direct,
            tag: tag.clone(),
        },
        shared.clone(),
    )?;
    let consumer = Arc::new(consumer);
    if direct {
        source::direct::spawn(
            consumer.clone(),
            shared.clone(),
            source::direct::DirectSettings {
                topics: k.topics.clone(),
                group: k.group_id.clone(),
                discovery_interval: k.partition_discovery_interval,
                tag,
                wait: settings.checkpoint.lock_wait,
                reset: k.auto_offset_reset,
            },
        );
    }
    source::spawn_lag_monitor(
        consumer.clone(),
        shared.clone(),
        metrics.clone(),
        Duration::from_secs(5),
    );
    let (writer, outcomes) = writer::spawn(store.clone());
    let (released_tx, released) = tokio::sync::mpsc::unbounded_channel();
    let (changelog, failures) = match settings.state.changelog_topic.clone() {
        Some(topic) => {
            let client = source::base_client(&k.brokers, &k.options);
            let topic = tokio::task::spawn_blocking(move || ChangelogTopic::lookup(client, &topic))
                .await
                .context("changelog lookup task")??;
            tracing::info!(topic = %topic.topic, partitions = topic.partitions, "publishing partition state to the changelog");
            let (publisher, failures) = Publisher::start(topic.clone())?;
            (
                Some(handoff::Changelog {
                    topic,
                    publisher,
                    run: handoff::Changelog::run_id(),
                    published: HashMap::new(),
                    record_keys: HashMap::new(),
                    since_full: 0,
                }),
                failures,
            )
        }
        None => (None, tokio::sync::mpsc::unbounded_channel().1),
    };
    let c = &settings.checkpoint;
    let scheduler = Scheduler::new(
        SchedulerSettings {
            interval: c.interval,
            min_pause: c.min_pause,
            timeout: c.timeout,
            max_concurrent: c.max_concurrent,
            tolerable_failures: c.tolerable_failures,
        },
        restored.next_id,
        restored.head,
    );
    let decoder = Decoder {
        key: settings.key_source()?,
        value: settings.input.value.clone(),
        timestamp: settings.time_source()?,
    };
    let mut rt = Runtime {
        settings,
        spec,
        engine,
        decoder,
        scheduler,
        metrics,
        admin,
        shared,
        sink,
        writer,
        in_flight: HashMap::new(),
        started: Instant::now(),
        assigned: Vec::new(),
        broker_down: false,
        invalid_log: RateLimit::new(runtime::ERROR_LOG_EVERY),
        consumer_error_log: RateLimit::new(runtime::ERROR_LOG_EVERY),
        last_gauges: Instant::now(),
        last_durable: restored.head,
        stop_requested: false,
        stop_savepoint: None,
        awaiting_first: Default::default(),
        changelog,
        releases: Default::default(),
        assignment_seen: false,
        released_tx,
    };
    // windows the restored checkpoint holds as final were durable there: send them again
    let restored_windows = rt.engine.take_emittable();
    rt.sink.emit(restored_windows);
    rt.refresh_readiness();

    let result = rt
        .main_loop(
            &consumer,
            outcomes,
            acks,
            commands,
            handoff::HandoffEvents { released, failures },
            store.clone(),
        )
        .await;
    shared_for_close.set_closing();
    consumer.unsubscribe();
    result
}
