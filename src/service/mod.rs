//! Wiring: open and restore the store, start the admin server, the output, the consumer and
//! the checkpoint writer, then hand over to the processing loop in `runtime`.

mod lifecycle;
mod restore;
mod runtime;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::consumer::Consumer;

use crate::checkpoint::history::History;
use crate::checkpoint::scheduler::SchedulerSettings;
use crate::checkpoint::writer;
use crate::checkpoint::{Scheduler, Snapshot, StateSpec};
use crate::config::{duration_ms, CheckpointMode, Settings};
use crate::engine::{Decoder, Engine, EngineConfig};
use crate::http::{self, AdminState};
use crate::metrics::Metrics;
use crate::sink::{Sink, SinkSettings};
use crate::source::{self, Shared, SourceSettings};
use crate::store::{Retention, Store};
use runtime::Runtime;

pub async fn run(settings: Settings) -> anyhow::Result<()> {
    for w in settings.warnings() {
        tracing::warn!("{w}");
    }
    let metrics = Arc::new(Metrics::new());
    let restore_started = Instant::now();
    let dir = settings.checkpoint.dir.clone();
    let retention = Retention {
        checkpoints: settings.checkpoint.retained,
        history: settings.checkpoint.history,
    };
    let store = tokio::task::spawn_blocking(move || Store::open(&dir))
        .await
        .context("store open task")??
        .with_retention(retention);
    let store = Arc::new(store);
    let windows = settings.window_defs()?;
    let engine_cfg = EngineConfig {
        windows: windows.clone(),
        max_out_of_orderness: duration_ms(settings.watermark.max_out_of_orderness),
        allowed_lateness: duration_ms(settings.watermark.allowed_lateness),
        hold_until_checkpoint: settings.checkpoint.mode == CheckpointMode::ExactlyOnce,
    };
    let spec = StateSpec {
        windows: windows.clone(),
        aggregates: settings.aggregates.clone(),
    };
    let restored = {
        let store = store.clone();
        let from = settings.checkpoint.restore_from.clone();
        let prefer = settings.checkpoint.prefer_checkpoint_for_recovery;
        let spec = spec.clone();
        let metrics = metrics.clone();
        tokio::task::spawn_blocking(move || {
            restore::restore(&store, &from, prefer, &spec, &metrics)
        })
        .await
        .context("restore task")??
    };
    let engine = match (&restored.meta, restored.state.clone()) {
        (Some(meta), Some(state)) => {
            let entries = state.entries.len();
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
            window_names: windows.iter().map(|w| w.name.clone()).collect(),
            aggregates: settings.aggregates.clone(),
        },
        metrics.clone(),
    )?;
    let consumer = source::connect(
        &SourceSettings {
            brokers: &k.brokers,
            group_id: &k.group_id,
            topics: &k.topics,
            auto_offset_reset: k.auto_offset_reset.as_str(),
            instance_id: k.instance_id.as_deref(),
            options: &k.options,
        },
        shared.clone(),
    )?;
    let consumer = Arc::new(consumer);
    source::spawn_lag_monitor(
        consumer.clone(),
        shared.clone(),
        metrics.clone(),
        Duration::from_secs(5),
    );
    let (writer, outcomes) = writer::spawn(store.clone());
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
        last_error_log: None,
        suppressed_errors: 0,
        last_gauges: Instant::now(),
        last_durable: restored.head,
        stop_requested: false,
        stop_savepoint: None,
        awaiting_first: Default::default(),
    };
    // windows the restored checkpoint holds as final were durable there: send them again
    let restored_windows = rt.engine.take_emittable();
    rt.sink.emit(restored_windows);
    rt.refresh_readiness();

    let result = rt
        .main_loop(&consumer, outcomes, acks, commands, store.clone())
        .await;
    consumer.unsubscribe();
    result
}
