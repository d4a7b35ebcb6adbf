//! The running service, as components that own their state (see docs/architecture.md):
//!
//! - `start`: open, claim and restore the store, build the engine;
//! - `coordinator`: checkpoints and savepoints (scheduler, attempts in flight, the writer);
//! - `handoff`: the partitions held and how they move (assignments, releases, changelog);
//! - `status`: readiness, progress and gauges for HTTP and Prometheus;
//! - `pipeline`: the select loop that routes records and events between them, and the stop
//!   (`stop`, a pure state machine);
//! - `edge`: the narrow traits through which they reach Kafka (`fakes`: in memory, for the
//!   in-process tests in `tests`).
//!
//! [`run`] wires them and runs until its shutdown future completes.

mod backpressure;
mod coordinator;
mod edge;
#[cfg(test)]
mod fakes;
mod handoff;
mod idle;
mod out_of_range;
mod pipeline;
mod releases;
pub(crate) mod restore;
mod start;
mod status;
mod stop;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::consumer::Consumer;

use crate::board::StatusBoard;
use crate::changelog::kafka::{ChangelogTopic, Publisher};
use crate::changelog::plan::Ledger;
use crate::checkpoint::history::History;
use crate::checkpoint::{Scheduler, SchedulerSettings};
use crate::config::{
    duration_ms, CheckpointMode, IdleAdvance, OnOutputError, Settings, StateScope,
};
use crate::engine::{Decoder, EngineConfig};
use crate::http::{self, AdminState};
use crate::memory::{self, ProcessMemory, Resident as _};
use crate::metrics::Metrics;
use crate::ratelimit::RateLimit;
use crate::sink::dead_letter::DeadLetters;
use crate::sink::{Sink, SinkSettings};
use crate::source::{self, Shared, SourceSettings};
use crate::store::{writer, Checkpoints, Retention};
use coordinator::{Coordinator, CoordinatorConfig};
use edge::Inbox;
use edge::KafkaChangelog;
use handoff::{Changelog, Handoff, HandoffConfig};
use pipeline::{Parts, Pipeline, PipelineConfig};
use status::Status;

/// Completes on SIGTERM or SIGINT, naming the signal.
pub async fn shutdown_signal() -> &'static str {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot install SIGTERM handler");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = term => "SIGTERM",
        r = tokio::signal::ctrl_c() => { if r.is_err() { std::future::pending::<()>().await; } "SIGINT" }
    }
}

/// Runs the service until `shutdown` completes (then it stops gracefully: Ok when everything
/// was checkpointed and acknowledged) or a fatal error.
pub async fn run(
    settings: Settings,
    shutdown: impl Future<Output = &'static str> + Send + 'static,
) -> anyhow::Result<()> {
    // waited for from now on (signal handlers are installed when it is first polled), not from
    // when the loop first looks: a SIGTERM during the restore stops the service cleanly once it
    // is up instead of killing it
    let (stopping, stopped) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _ = stopping.send(shutdown.await);
    });
    let shutdown = async move { stopped.await.unwrap_or("shutdown") };
    for w in settings.warnings() {
        tracing::warn!("{w}");
    }
    // before anything is opened: a start without its token goes no further
    let admin_token = http::auth::AdminToken::load(&settings.http)?;
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
    let engine_config = EngineConfig {
        windows: windows.clone(),
        max_out_of_orderness: duration_ms(settings.watermark.max_out_of_orderness),
        allowed_lateness: duration_ms(settings.watermark.allowed_lateness),
        hold_until_checkpoint: settings.checkpoint.mode == CheckpointMode::ExactlyOnce,
        partition_scoped: settings.state.scope == StateScope::Partition,
        // the store's layout, set once it is open
        groups: Default::default(),
    };
    let spec = settings.state_spec()?;
    let (store, mut restored) = {
        let settings = settings.clone();
        let spec = spec.clone();
        let metrics = metrics.clone();
        tokio::task::spawn_blocking(move || {
            start::open_and_restore(&settings, &spec, retention, &metrics)
        })
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
    let engine = start::engine(
        engine_config,
        &mut restored,
        &store,
        &settings.checkpoint.restore_from.to_string(),
        &metrics,
        restore_started,
    )?;
    let store = Arc::new(store);

    let board = Arc::new(StatusBoard::new(metrics.ready.clone(), History::new(200)));
    let shared = Arc::new(Shared::new(board.clone()));
    let (commands_tx, commands) = tokio::sync::mpsc::unbounded_channel();
    let admin = Arc::new(AdminState {
        metrics: metrics.clone(),
        board: board.clone(),
        store: store.clone(),
        commands: commands_tx,
        restored_from: restored.describe(),
        admin_token,
        refused_log: std::sync::Mutex::new(RateLimit::new(http::REFUSED_LOG_EVERY)),
    });
    let addr = http::serve(settings.http.listen, admin.clone()).await?;
    tracing::info!(%addr, "http listening");

    for (p, progress) in engine.progress() {
        if let Some(next) = progress.next {
            board.set_position(p, next);
        }
    }
    let k = &settings.kafka;
    let (fatal_tx, fatal) = tokio::sync::mpsc::unbounded_channel();
    let (probes_tx, probes) = tokio::sync::mpsc::unbounded_channel();
    // tasks holding Kafka clients: the producers' end when the pipeline drops their handles,
    // the others are stopped; all of them before `run` returns, so that no client outlives it
    let mut producers = Vec::new();
    let dead_letters = match &settings.input.dead_letter_topic {
        Some(topic) => {
            tracing::info!(%topic, on_output_error = ?settings.output.on_error, "invalid and late records are copied to the dead-letter topic");
            let (handle, task) = DeadLetters::start(
                source::base_client(&k.brokers, &k.options),
                topic.clone(),
                metrics.clone(),
                fatal_tx.clone(),
            )?;
            producers.push(task);
            Some(handle)
        }
        None => None,
    };
    let (sink, acks, sink_task) = Sink::start(
        source::base_client(&k.brokers, &k.options),
        SinkSettings {
            topic: settings.output.topic.clone(),
            window_names: windows
                .iter()
                .map(|w| w.name.clone())
                .chain(spec.retired.iter().map(|w| w.name.clone()))
                .collect(),
            aggregates: settings.aggregates.clone(),
            dead_letter_topic: match settings.output.on_error {
                OnOutputError::DeadLetter => settings.input.dead_letter_topic.clone(),
                OnOutputError::Fail => None,
            },
        },
        metrics.clone(),
        fatal_tx,
    )?;
    producers.push(sink_task);
    let mut background = Vec::new();
    // one instance owns every partition: no group membership, partitions assigned directly
    let direct = settings.state.scope == StateScope::Instance;
    let run_id = Changelog::run_id();
    let tag = source::ownership::CommitTag {
        store: store.identity()?,
        run: format!("{run_id:x}"),
        since_ms: crate::clock::epoch_ms(),
        at_ms: 0,
        instance: start::owner_name(&settings),
    };
    let consumer = Arc::new(source::connect(
        &SourceSettings {
            brokers: &k.brokers,
            group_id: &k.group_id,
            topics: &k.topics,
            auto_offset_reset: k.reset(),
            from_committed: k.from_committed(),
            instance_id: k.instance_id.as_deref(),
            options: &k.options,
            direct,
            tag: tag.clone(),
        },
        shared.clone(),
    )?);
    if direct {
        background.push(source::direct::spawn(
            consumer.clone(),
            shared.clone(),
            source::direct::DirectSettings {
                topics: k.topics.clone(),
                group: k.group_id.clone(),
                discovery_interval: k.partition_discovery_interval,
                tag,
                wait: settings.checkpoint.lock_wait,
                reset: k.reset(),
                from_committed: k.from_committed(),
            },
        ));
    }
    background.push(source::spawn_lag_monitor(
        consumer.clone(),
        shared.clone(),
        metrics.clone(),
        Duration::from_secs(5),
    ));
    let checkpoints: Arc<dyn Checkpoints> = store.clone();
    let (writer, outcomes) = writer::spawn(checkpoints.clone());
    let (changelog, failures) = match settings.state.changelog_topic.clone() {
        Some(topic) => {
            let client = source::base_client(&k.brokers, &k.options);
            let mut topic =
                tokio::task::spawn_blocking(move || ChangelogTopic::lookup(client, &topic))
                    .await
                    .context("changelog lookup task")??;
            topic.skip_unreadable =
                settings.state.on_unreadable_changelog == crate::config::OnUnreadable::Skip;
            tracing::info!(topic = %topic.topic, partitions = topic.partitions, "publishing partition state to the changelog");
            let (publisher, failures, task) = Publisher::start(topic.clone())?;
            producers.push(task);
            let changelog = Changelog {
                io: Arc::new(KafkaChangelog { topic, publisher }),
                ledger: Ledger::new(run_id),
            };
            (Some(changelog), failures)
        }
        None => (None, tokio::sync::mpsc::unbounded_channel().1),
    };
    let c = &settings.checkpoint;
    let coordinator = Coordinator::new(
        CoordinatorConfig {
            timeout: c.timeout,
            dir: c.dir.clone(),
            restored_from: restored.describe(),
            retained_unnamed_savepoints: c.retained_unnamed_savepoints,
            savepoints_per_minute: c.savepoints_per_minute,
            pinned_savepoint: match &c.restore_from {
                crate::checkpoint::RestoreFrom::Savepoint(name) => Some(name.clone()),
                _ => None,
            },
        },
        Scheduler::new(
            SchedulerSettings {
                interval: c.interval,
                min_pause: c.min_pause,
                timeout: c.timeout,
                max_concurrent: c.max_concurrent,
                tolerable_failures: c.tolerable_failures,
            },
            restored.next_id,
            restored.head,
        ),
        spec,
        writer,
        checkpoints,
        restored.head,
        metrics.clone(),
        board.clone(),
    );
    let (handoff, released, restored) = Handoff::new(
        HandoffConfig {
            group: k.group_id.clone(),
            direct,
        },
        changelog,
        board.clone(),
        metrics.clone(),
    );
    let container = memory::container_limit();
    let max_memory =
        memory::effective_limit(settings.state.max_memory.map(|m| m.as_u64()), container);
    match (max_memory, settings.state.max_memory, container) {
        (Some(limit), Some(_), _) => {
            tracing::info!(
                max_memory_mib = limit >> 20,
                "memory guard: state.max_memory"
            )
        }
        (Some(limit), None, Some(c)) => tracing::info!(
            max_memory_mib = limit >> 20,
            container_limit_mib = c >> 20,
            "memory guard: 80% of the container's memory limit (state.max_memory is not set)"
        ),
        _ => tracing::info!("memory guard off: no state.max_memory and no container memory limit"),
    }
    if max_memory.is_some() && ProcessMemory.resident_bytes().is_none() {
        tracing::warn!("memory guard off: the resident memory cannot be read (/proc/self/status)");
    }
    let pipeline = Pipeline::new(Parts {
        config: PipelineConfig {
            auto_offset_reset: k.reset(),
            dir: c.dir.clone(),
            shutdown_timeout: c.shutdown_timeout,
            on_cancel: c.on_cancel,
            max_pending_windows: usize::try_from(settings.output.max_pending_windows)
                .unwrap_or(usize::MAX),
            max_future_skew_ms: duration_ms(settings.watermark.max_future_skew),
            max_memory,
            max_open_windows: settings
                .state
                .max_open_windows
                .map(|m| usize::try_from(m).unwrap_or(usize::MAX)),
            idle_timeout: settings.watermark.idle_timeout,
            idle_wall_clock: settings.watermark.idle_advance == IdleAdvance::WallClock,
            on_out_of_range: k.on_offset_out_of_range,
        },
        engine,
        decoder: Decoder::new(
            settings.key_source()?,
            settings.input.value.clone(),
            settings.time_source()?,
        ),
        coordinator,
        handoff,
        status: Status::new(board.clone(), metrics.clone()),
        consumer: consumer.clone(),
        output: sink,
        metrics,
        shared: shared.clone(),
        memory: Arc::new(ProcessMemory),
        dead_letters,
        probes: probes_tx,
    });
    let inbox = Inbox {
        outcomes,
        acks,
        commands,
        released,
        failures,
        fatal,
        probes,
        restored,
    };
    let result = pipeline.run(inbox, shutdown).await;
    shared.set_closing();
    consumer.unsubscribe();
    close(background, producers).await;
    // a question to the broker that a stopped task had started still holds the consumer
    // until it is answered (bounded)
    let deadline = tokio::time::Instant::now() + PRODUCER_CLOSE;
    while Arc::strong_count(&consumer) > 1 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // the last handle on the consumer: it leaves the group while the brokers are there
    drop(consumer);
    result
}

/// How long the producers may take to settle what they were handed when the service ends.
const PRODUCER_CLOSE: Duration = Duration::from_secs(5);

/// Stops the background tasks and waits (bounded) for the producers' tasks to end, so that
/// every Kafka client is closed before the service returns, never after its brokers went away
/// (the demo's embedded broker ends right after).
async fn close(
    background: Vec<tokio::task::JoinHandle<()>>,
    producers: Vec<tokio::task::JoinHandle<()>>,
) {
    for task in &background {
        task.abort();
    }
    for task in background {
        let _ = task.await;
    }
    for task in producers {
        if tokio::time::timeout(PRODUCER_CLOSE, task).await.is_err() {
            tracing::warn!("a producer did not settle within 5s at the stop; what it still held is sent again at the next start");
        }
    }
}
