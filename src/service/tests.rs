//! In-process tests of the pipeline and its components, without a broker: the store is in
//! memory (`store::memory`), the consumer, output and changelog are the fakes, and the
//! writer is the real background task. Each test drives the pipeline's event handlers in the
//! order the select loop would.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::message::{OwnedMessage, Timestamp};
use tokio::sync::{mpsc, oneshot};

use super::coordinator::{Coordinator, CoordinatorConfig};
use super::edge::{Inbox, Receive};
use super::fakes::{Call, FakeChangelog, FakeConsumer, FakeMemory, FakeOutput};
use super::handoff::{Changelog, Handoff, HandoffConfig};
use super::pipeline::{Parts, Pipeline, PipelineConfig};
use super::status::Status;
use crate::board::StatusBoard;
use crate::changelog::plan::Ledger;
use crate::checkpoint::history::{History, Kind, Status as AttemptStatus};
use crate::checkpoint::{Scheduler, SchedulerSettings, StateSpec};
use crate::checkpoint_id::CheckpointId;
use crate::config::{OffsetReset, OnCancel};
use crate::engine::{
    ClosedWindow, Decoder, Engine, EngineConfig, FieldSource, TimeSource, WindowDef, WindowKind,
    RECORDS_AHEAD,
};
use crate::http::{Command, CommandError};
use crate::lock::lock;
use crate::metrics::Metrics;
use crate::position::{NextOffset, Partition};
use crate::sink::dead_letter::{self, DeadLetter, DeadLetters};
use crate::source::{Rebalance, Shared};
use crate::store::memory::MemoryStore;
use crate::store::{writer, Checkpoints};

fn p(n: i32) -> Partition {
    Partition::new("events", n)
}

struct Options {
    partition_scoped: bool,
    changelog: bool,
    tolerable_failures: u32,
    max_pending_windows: usize,
    retained_unnamed_savepoints: usize,
    savepoints_per_minute: u32,
    max_memory: Option<u64>,
    max_open_windows: Option<usize>,
    idle_timeout: Option<Duration>,
    timeout: Duration,
    dead_letters: bool,
    on_out_of_range: crate::config::OnOutOfRange,
    on_cancel: OnCancel,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            partition_scoped: false,
            changelog: false,
            tolerable_failures: 3,
            max_pending_windows: 1_000_000,
            retained_unnamed_savepoints: 5,
            savepoints_per_minute: 6,
            max_memory: None,
            max_open_windows: None,
            idle_timeout: None,
            timeout: Duration::from_secs(60),
            dead_letters: false,
            on_out_of_range: crate::config::OnOutOfRange::Fail,
            on_cancel: OnCancel::Retain,
        }
    }
}

/// A pipeline over in-memory parts, and handles on them.
struct Rig {
    pipeline: Pipeline<FakeConsumer, FakeOutput>,
    /// Where the consumer's rebalances are queued for the pipeline.
    shared: Arc<Shared>,
    inbox: Inbox,
    store: Arc<MemoryStore>,
    consumer: Arc<FakeConsumer>,
    changelog: Arc<FakeChangelog>,
    emitted: Arc<Mutex<Vec<ClosedWindow>>>,
    board: Arc<StatusBoard>,
    metrics: Arc<Metrics>,
    memory: Arc<FakeMemory>,
    offsets: std::collections::HashMap<Partition, i64>,
    /// Dead-letter copies handed over, and how many of them count as written.
    letters: mpsc::UnboundedReceiver<DeadLetter>,
    letters_written: Arc<AtomicU64>,
}

impl Rig {
    fn new(options: Options) -> Rig {
        let memory = Arc::new(FakeMemory::default());
        let metrics = Arc::new(Metrics::new());
        let board = Arc::new(StatusBoard::new(metrics.ready.clone(), History::new(200)));
        let shared = Arc::new(Shared::new(board.clone()));
        let (_commands_tx, commands) = mpsc::unbounded_channel();
        let store = Arc::new(MemoryStore::default());
        let checkpoints: Arc<dyn Checkpoints> = store.clone();
        let (writer, outcomes) = writer::spawn(checkpoints.clone());
        let coordinator = Coordinator::new(
            CoordinatorConfig {
                timeout: options.timeout,
                dir: "memory".into(),
                restored_from: "nothing (empty start)".to_string(),
                retained_unnamed_savepoints: options.retained_unnamed_savepoints,
                savepoints_per_minute: options.savepoints_per_minute,
                pinned_savepoint: None,
            },
            Scheduler::new(
                SchedulerSettings {
                    interval: Duration::from_millis(1),
                    min_pause: Duration::ZERO,
                    timeout: options.timeout,
                    max_concurrent: 1,
                    tolerable_failures: options.tolerable_failures,
                },
                CheckpointId(1),
                None,
            ),
            StateSpec::default(),
            writer,
            checkpoints,
            None,
            metrics.clone(),
            board.clone(),
        );
        let fake_changelog = Arc::new(FakeChangelog::default());
        let changelog = options.changelog.then(|| Changelog {
            io: fake_changelog.clone(),
            ledger: Ledger::new(7),
        });
        let (handoff, released, restored) = Handoff::new(
            HandoffConfig {
                group: "g".to_string(),
                direct: !options.partition_scoped,
            },
            changelog,
            board.clone(),
            metrics.clone(),
        );
        let (acks_tx, acks) = mpsc::unbounded_channel();
        let (letters_tx, letters) = mpsc::unbounded_channel();
        let (probes_tx, probes) = mpsc::unbounded_channel();
        let letters_written = Arc::new(AtomicU64::new(0));
        let dead_letters = options
            .dead_letters
            .then(|| DeadLetters::detached(letters_tx, letters_written.clone()));
        let emitted = Arc::new(Mutex::new(Vec::new()));
        let consumer = Arc::new(FakeConsumer::default());
        let pipeline = Pipeline::new(Parts {
            config: PipelineConfig {
                auto_offset_reset: OffsetReset::Earliest,
                dir: "memory".into(),
                shutdown_timeout: Duration::from_secs(20),
                on_cancel: options.on_cancel,
                max_pending_windows: options.max_pending_windows,
                max_future_skew_ms: 3_600_000,
                max_memory: options.max_memory,
                max_open_windows: options.max_open_windows,
                idle_timeout: options.idle_timeout,
                idle_wall_clock: false,
                on_out_of_range: options.on_out_of_range,
            },
            engine: Engine::new(EngineConfig {
                windows: vec![WindowDef {
                    name: "tumble".into(),
                    kind: WindowKind::Tumbling { size: 1000 },
                }],
                max_out_of_orderness: 0,
                allowed_lateness: 0,
                hold_until_checkpoint: true,
                partition_scoped: options.partition_scoped,
                groups: Default::default(),
            }),
            decoder: Decoder::new(
                FieldSource::Pointer("/user".into()),
                Some("/amount".into()),
                TimeSource::Pointer("/ts".into()),
            ),
            coordinator,
            handoff,
            status: Status::new(board.clone(), metrics.clone()),
            consumer: consumer.clone(),
            output: FakeOutput {
                emitted: emitted.clone(),
                acks: acks_tx,
            },
            metrics: metrics.clone(),
            shared: shared.clone(),
            memory: memory.clone(),
            dead_letters,
            probes: probes_tx,
        });
        Rig {
            pipeline,
            shared,
            inbox: Inbox {
                outcomes,
                acks,
                commands,
                released,
                failures: mpsc::unbounded_channel().1,
                fatal: mpsc::unbounded_channel().1,
                probes,
                restored,
            },
            store,
            consumer,
            changelog: fake_changelog,
            emitted,
            board,
            metrics,
            memory,
            offsets: Default::default(),
            letters,
            letters_written,
        }
    }

    /// Assigns `partitions`, waiting for their changelog replay when there is one.
    async fn assign(&mut self, partitions: &[Partition]) {
        self.pipeline
            .on_rebalance(Rebalance::Assign(partitions.to_vec()))
            .await
            .expect("assign");
        if self.pipeline.restoring() {
            self.restored("the changelog replay").await;
        }
    }

    /// Waits for the changelog replay running to end, handing the pipeline every answer (a
    /// replay given up answers too).
    async fn restored(&mut self, what: &str) {
        while self.pipeline.restoring() {
            let restored = tokio::time::timeout(Duration::from_secs(5), self.inbox.restored.recv())
                .await
                .unwrap_or_else(|_| panic!("{what} within 5 s"))
                .expect("channel open");
            self.pipeline.on_restored(restored).expect("restored");
        }
    }

    /// One record of `user` at event time `ts` on partition `p`.
    fn record(&mut self, partition: &Partition, user: &str, ts: i64) {
        let payload = format!(r#"{{"user":"{user}","amount":1,"ts":{ts}}}"#);
        let m = self.message(partition, payload.as_bytes());
        self.pipeline.on_messages(&mut vec![m]);
    }

    /// The next message of `partition`, holding `payload`.
    fn message(&mut self, partition: &Partition, payload: &[u8]) -> OwnedMessage {
        let offset = self.offsets.entry(partition.clone()).or_insert(0);
        let m = OwnedMessage::new(
            Some(payload.to_vec()),
            None,
            partition.topic.clone(),
            Timestamp::NotAvailable,
            partition.partition,
            *offset,
            None,
        );
        *offset += 1;
        m
    }

    async fn revoke(&mut self, partitions: &[Partition]) {
        self.pipeline
            .on_rebalance(Rebalance::Revoke {
                partitions: partitions.to_vec(),
                lost: false,
            })
            .await
            .expect("revoke");
    }

    /// Waits for a release the hand-off made due and hands it to the pipeline.
    async fn release_due(&mut self, what: &str) {
        let (id, partitions) =
            tokio::time::timeout(Duration::from_secs(5), self.inbox.released.recv())
                .await
                .unwrap_or_else(|_| panic!("{what} within 5 s"))
                .expect("channel open");
        self.pipeline.on_released(id, partitions).expect("released");
    }

    /// Lets the checkpoint interval pass and runs the timers: the checkpoint due is triggered.
    fn tick(&mut self) {
        std::thread::sleep(Duration::from_millis(2));
        self.pipeline.on_tick().expect("tick");
    }

    /// Waits for the writer's next outcome and hands it to the pipeline.
    async fn settle(&mut self) -> anyhow::Result<()> {
        let outcome = tokio::time::timeout(Duration::from_secs(10), self.inbox.outcomes.recv())
            .await
            .expect("an outcome within 10 s")
            .expect("writer alive");
        self.pipeline.on_write_outcome(outcome)
    }

    fn emitted_users(&self) -> Vec<String> {
        lock(&self.emitted)
            .iter()
            .map(|w| w.id.key.to_string())
            .collect()
    }

    fn history(&self, id: CheckpointId) -> AttemptStatus {
        self.attempt(id).status
    }

    /// The in-memory history's record of attempt `id`.
    fn attempt(&self, id: CheckpointId) -> crate::checkpoint::history::CheckpointRecord {
        self.board
            .history()
            .recent(100)
            .into_iter()
            .find(|r| r.id == id)
            .expect("attempt in the history")
    }

    /// The attempt records the writer persisted, once `done` holds of them or 10 s passed (the
    /// writer records them off the loop).
    async fn persisted_once(
        &self,
        done: impl Fn(&[crate::checkpoint::history::CheckpointRecord]) -> bool,
    ) -> Vec<crate::checkpoint::history::CheckpointRecord> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !done(&self.store.attempts()) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.store.attempts()
    }
}

#[tokio::test]
async fn a_failed_checkpoint_releases_nothing_and_the_next_one_is_full() {
    let mut rig = Rig::new(Options::default());
    rig.assign(&[p(0)]).await;
    rig.record(&p(0), "a", 100);
    rig.tick();
    rig.settle().await.expect("checkpoint 1");
    // a record past the window's end closes [0, 1000): final, held until a checkpoint
    rig.record(&p(0), "b", 1500);
    assert_eq!(rig.pipeline.engine().pending_emissions(), 1);
    rig.store.fail_next_write("disk full");
    rig.tick();
    rig.settle().await.expect("a tolerable failure");
    assert_eq!(rig.history(CheckpointId(2)), AttemptStatus::Failed);
    assert!(
        rig.emitted_users().is_empty(),
        "nothing is released by a failed checkpoint"
    );
    rig.tick();
    rig.settle().await.expect("checkpoint 3");
    // the writer works in order: the failed attempt's record went before checkpoint 3
    assert_eq!(
        rig.store
            .attempts()
            .iter()
            .map(|r| (r.id.0, r.status))
            .collect::<Vec<_>>(),
        vec![(2, AttemptStatus::Failed)],
        "the failed attempt is recorded in the store's history"
    );
    let written = rig.store.written();
    assert_eq!(
        written
            .iter()
            .map(|w| w.checkpoint.id.0)
            .collect::<Vec<_>>(),
        vec![1, 3]
    );
    assert!(written[0].checkpoint.delta.full);
    assert!(
        written[1].checkpoint.delta.full && written[1].checkpoint.base.is_none(),
        "after a failure the next checkpoint is a full one"
    );
    assert_eq!(rig.emitted_users(), vec!["a".to_string()]);
    assert!(rig
        .consumer
        .calls()
        .contains(&Call::Commit(vec![(p(0), crate::position::NextOffset(2))])));
}

#[tokio::test]
async fn failures_past_the_tolerable_number_stop_the_service_naming_the_last_good_state() {
    let mut rig = Rig::new(Options {
        tolerable_failures: 0,
        ..Options::default()
    });
    rig.assign(&[p(0)]).await;
    rig.record(&p(0), "a", 100);
    rig.tick();
    rig.settle().await.expect("checkpoint 1");
    rig.record(&p(0), "a", 200);
    rig.store.fail_next_write("disk full");
    rig.tick();
    let err = rig.settle().await.expect_err("no failure is tolerable");
    let text = format!("{err:#}");
    assert!(
        text.contains("The last good state (checkpoint 1) is intact"),
        "{text}"
    );
    assert_eq!(rig.history(CheckpointId(2)), AttemptStatus::Failed);
}

#[tokio::test]
async fn a_partition_revoked_during_a_checkpoint_is_released_only_after_its_state_is_published() {
    let mut rig = Rig::new(Options {
        partition_scoped: true,
        changelog: true,
        ..Options::default()
    });
    rig.assign(&[p(0), p(1)]).await;
    rig.record(&p(0), "a", 100);
    rig.record(&p(1), "b", 100);
    rig.tick(); // checkpoint 1 in flight
    rig.revoke(&[p(0)]).await;
    assert!(rig.consumer.released().is_empty(), "not released at once");
    rig.settle().await.expect("checkpoint 1");
    rig.settle().await.expect("revoke checkpoint 2");
    assert!(
        rig.consumer.released().is_empty(),
        "not released before its publication is acknowledged"
    );
    let published: Vec<(Partition, u64)> = rig
        .changelog
        .chunks()
        .iter()
        .map(|c| (c.source().clone(), c.tag.checkpoint.0))
        .collect();
    assert!(
        published.contains(&(p(0), 2)),
        "the revoke checkpoint publishes the partition's state: {published:?}"
    );
    assert_eq!(rig.changelog.complete(Ok(())), 1);
    rig.release_due("release due").await;
    assert_eq!(rig.consumer.released(), vec![p(0)]);
    assert!(
        rig.pipeline.engine().progress().all(|(q, _)| *q != p(0)),
        "the released partition's state is dropped"
    );
    assert!(rig.pipeline.engine().progress().any(|(q, _)| *q == p(1)));
}

#[tokio::test]
async fn a_changelog_replay_runs_off_the_loop_with_its_partitions_assigned_paused_then_read_anew() {
    let mut rig = Rig::new(Options {
        partition_scoped: true,
        changelog: true,
        ..Options::default()
    });
    rig.assign(&[p(0)]).await;
    assert_eq!(
        rig.consumer.calls(),
        vec![
            Call::Assign(vec![p(0)]),
            Call::Pause(vec![p(0)]),
            Call::Reassign(vec![p(0)]),
            Call::Resume(vec![p(0)]),
        ],
        "assigned paused at once, read anew from the restored position"
    );
    rig.changelog.hold_reads(true);
    rig.pipeline
        .on_rebalance(Rebalance::Assign(vec![p(1)]))
        .await
        .expect("assignment taken");
    assert!(
        rig.pipeline.restoring(),
        "the replay runs in the background"
    );
    assert!(rig
        .consumer
        .calls()
        .ends_with(&[Call::Assign(vec![p(1)]), Call::Pause(vec![p(1)])]));
    let (ready, reason) = rig.board.readiness();
    assert!(!ready && reason.contains("restoring"), "{reason}");
    // a record of the partition being restored is not applied; the loop goes on
    rig.record(&p(1), "x", 100);
    assert_eq!(rig.pipeline.engine().position(&p(1)), None);
    rig.record(&p(0), "a", 100);
    assert_eq!(rig.pipeline.engine().position(&p(0)), Some(NextOffset(1)));
    // a rebalance meanwhile is applied at once
    rig.revoke(&[p(0)]).await;
    assert!(
        rig.pipeline.handoff().releasing(),
        "the revoke checkpoints its partition at once"
    );
    // the replay ends while the revoke waits for its release: reading p1 (assigning it anew)
    // would answer the group's revoke early, so it waits
    rig.changelog.hold_reads(false);
    let restored = tokio::time::timeout(Duration::from_secs(5), rig.inbox.restored.recv())
        .await
        .expect("the replay ends")
        .expect("channel open");
    rig.pipeline.on_restored(restored).expect("installed");
    assert!(rig.pipeline.restoring(), "not read before the release");
    assert!(!rig.consumer.calls().contains(&Call::Reassign(vec![p(1)])));
    rig.settle().await.expect("the revoke checkpoint");
    while rig.changelog.complete(Ok(())) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    rig.release_due("the release").await;
    assert!(!rig.pipeline.restoring());
    assert!(
        rig.consumer.calls().ends_with(&[
            Call::Release(vec![p(0)]),
            Call::Reassign(vec![p(1)]),
            Call::Resume(vec![p(1)])
        ]),
        "{:?}",
        rig.consumer.calls()
    );
    assert_eq!(rig.pipeline.handoff().assigned(), &[p(1)]);
}

#[tokio::test]
async fn a_partition_revoked_during_its_changelog_replay_is_released_unread_at_once() {
    let mut rig = Rig::new(Options {
        partition_scoped: true,
        changelog: true,
        ..Options::default()
    });
    rig.changelog.hold_reads(true);
    rig.pipeline
        .on_rebalance(Rebalance::Assign(vec![p(0), p(1)]))
        .await
        .expect("assignment taken");
    rig.revoke(&[p(1)]).await;
    assert_eq!(
        rig.consumer.released(),
        vec![p(1)],
        "released at once: nothing of it was read here"
    );
    assert!(
        !rig.pipeline.handoff().releasing(),
        "no checkpoint waited for"
    );
    assert!(rig.pipeline.restoring(), "the replay goes on for the other");
    rig.changelog.hold_reads(false);
    rig.restored("the replay of the partition kept").await;
    assert!(rig
        .consumer
        .calls()
        .ends_with(&[Call::Reassign(vec![p(0)]), Call::Resume(vec![p(0)])]));
    assert_eq!(rig.pipeline.handoff().assigned(), &[p(0)]);
    // a checkpoint publishes the partition read, never the one let go
    rig.record(&p(0), "a", 100);
    rig.tick();
    rig.settle().await.expect("checkpoint");
    let published: Vec<Partition> = rig
        .changelog
        .chunks()
        .iter()
        .map(|c| c.source().clone())
        .collect();
    assert!(
        published.contains(&p(0)) && !published.contains(&p(1)),
        "nothing of the partition revoked unread is published: {published:?}"
    );
}

#[tokio::test]
async fn a_checkpoint_triggered_before_an_assignment_neither_publishes_nor_commits_the_partition() {
    let mut rig = Rig::new(Options {
        partition_scoped: true,
        changelog: true,
        ..Options::default()
    });
    rig.assign(&[p(0)]).await;
    rig.record(&p(0), "a", 100);
    rig.tick(); // checkpoint 1 in flight, triggered while only p0 was assigned
    rig.assign(&[p(1)]).await;
    let positions = vec![(p(0), NextOffset(1)), (p(1), NextOffset(7))];
    assert_eq!(
        rig.pipeline
            .handoff()
            .owned(CheckpointId(1), positions.clone()),
        vec![(p(0), NextOffset(1))],
        "what checkpoint 1 holds of p1 predates its assignment"
    );
    assert_eq!(
        rig.pipeline
            .handoff()
            .owned(CheckpointId(2), positions.clone()),
        positions
    );
    rig.settle().await.expect("checkpoint 1");
    let published: Vec<Partition> = rig
        .changelog
        .chunks()
        .iter()
        .map(|c| c.source().clone())
        .collect();
    assert!(
        !published.contains(&p(1)),
        "checkpoint 1 publishes nothing of p1: {published:?}"
    );
}

#[tokio::test]
async fn a_stop_during_a_changelog_replay_cancels_it_and_never_reads_its_partitions() {
    let mut rig = Rig::new(Options {
        partition_scoped: true,
        changelog: true,
        ..Options::default()
    });
    rig.assign(&[p(0)]).await;
    rig.record(&p(0), "a", 100);
    rig.changelog.hold_reads(true);
    rig.pipeline
        .on_rebalance(Rebalance::Assign(vec![p(1)]))
        .await
        .expect("assignment taken");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !rig.changelog.reading() {
        assert!(std::time::Instant::now() < deadline, "the replay started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // the changelog acknowledges every publication of the stop
    let changelog = rig.changelog.clone();
    let acks = tokio::spawn(async move {
        loop {
            changelog.complete(Ok(()));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    tokio::time::timeout(Duration::from_secs(10), rig.pipeline.stop(&mut rig.inbox))
        .await
        .expect("the stop does not wait for the replay")
        .expect("a clean stop");
    acks.abort();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while rig.changelog.reading() {
        assert!(
            std::time::Instant::now() < deadline,
            "the replay is cancelled"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        !rig.consumer.calls().contains(&Call::Resume(vec![p(1)]))
            && !rig.consumer.calls().contains(&Call::Reassign(vec![p(1)])),
        "never read: {:?}",
        rig.consumer.calls()
    );
    assert!(
        rig.store.written().last().is_some_and(|w| w
            .checkpoint
            .delta
            .partitions
            .iter()
            .any(|s| s.partition == p(0) && s.next == Some(NextOffset(1)))),
        "the final checkpoint holds the partition read"
    );
}

#[tokio::test]
async fn a_revoke_checkpoint_that_fails_still_releases_the_partition() {
    let mut rig = Rig::new(Options {
        partition_scoped: true,
        changelog: true,
        ..Options::default()
    });
    rig.assign(&[p(0)]).await;
    rig.record(&p(0), "a", 100);
    rig.store.fail_next_write("disk full");
    rig.revoke(&[p(0)]).await;
    rig.settle().await.expect("a tolerable failure");
    rig.release_due("release due after the failure").await;
    assert_eq!(rig.consumer.released(), vec![p(0)]);
}

#[tokio::test]
async fn a_stop_with_savepoint_settles_everything_then_takes_the_savepoint_last() {
    let mut rig = Rig::new(Options::default());
    rig.assign(&[p(0)]).await;
    rig.record(&p(0), "a", 100);
    rig.record(&p(0), "b", 1500);
    let (reply, answer) = oneshot::channel();
    rig.pipeline.on_command(Command::Stop {
        savepoint: Some(Some("before-upgrade".to_string())),
        reply,
    });
    rig.pipeline
        .stop(&mut rig.inbox)
        .await
        .expect("a clean stop");
    let meta = answer
        .await
        .expect("answered")
        .expect("savepoint taken")
        .expect("savepoint meta");
    assert_eq!(meta.name, "before-upgrade");
    let written = rig.store.written();
    let last = written.last().expect("writes");
    assert_eq!(last.savepoint.as_deref(), Some("before-upgrade"));
    assert_eq!(meta.checkpoint_id, last.checkpoint.id);
    assert!(
        written[..written.len() - 1]
            .iter()
            .all(|w| w.savepoint.is_none()),
        "the savepoint is the stop's last write"
    );
    // the closed window was released, sent and acknowledged before the savepoint
    assert_eq!(rig.emitted_users(), vec!["a".to_string()]);
    assert_eq!(rig.pipeline.engine().pending_emissions(), 0);
    assert!(!rig.pipeline.engine().has_changes());
}

#[tokio::test]
async fn a_stop_whose_savepoint_cannot_be_written_fails_and_tells_the_requester() {
    let mut rig = Rig::new(Options::default());
    rig.assign(&[p(0)]).await;
    rig.record(&p(0), "a", 100);
    rig.tick();
    rig.settle().await.expect("checkpoint 1");
    let (reply, answer) = oneshot::channel();
    rig.pipeline.on_command(Command::Stop {
        savepoint: Some(None),
        reply,
    });
    // the stop's final checkpoint goes through; the savepoint after it does not
    rig.store.fail_write_after(1, "disk full");
    let result = rig.pipeline.stop(&mut rig.inbox).await;
    let err = result.expect_err("the stop fails without its savepoint");
    assert!(
        format!("{err:#}").contains("savepoint (checkpoint"),
        "{err:#}"
    );
    match answer.await.expect("answered") {
        Err(CommandError::Failed(text)) => assert!(text.contains("disk full"), "{text}"),
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[tokio::test]
async fn a_failed_sync_of_the_store_stops_the_pipeline_where_a_failed_write_does_not() {
    let mut rig = Rig::new(Options::default());
    rig.assign(&[p(0)]).await;
    rig.record(&p(0), "a", 100);
    rig.tick();
    // a write error: the checkpoint fails, the pipeline goes on (within tolerable failures)
    rig.store.fail_next_write("disk full");
    rig.settle().await.expect("a failed write is tolerated");
    rig.record(&p(0), "b", 200);
    rig.tick();
    rig.settle().await.expect("checkpoint 2");
    // a failed sync: what was reported durable may not be on the disk, so it stops
    rig.record(&p(0), "c", 300);
    rig.store.fail_next_sync("syncing db: Input/output error");
    rig.tick();
    let err = rig
        .settle()
        .await
        .expect_err("a failed sync stops the pipeline");
    let text = format!("{err:#}");
    assert!(text.contains("syncing db: Input/output error"), "{text}");
    assert!(text.contains("restart"), "{text}");
}

#[tokio::test]
async fn a_checkpoint_slower_than_the_interval_pauses_consumption_until_durable_and_loses_nothing()
{
    let mut rig = Rig::new(Options::default());
    rig.store.delay_writes(Duration::from_millis(300));
    rig.assign(&[p(0)]).await;
    rig.record(&p(0), "a", 100);
    rig.tick();
    // checkpoint 1 is writing, for longer than the 1 ms interval
    std::thread::sleep(Duration::from_millis(20));
    rig.pipeline.on_tick().expect("tick");
    assert!(rig.consumer.calls().contains(&Call::Pause(vec![p(0)])));
    assert_eq!(rig.metrics.backpressure.get(), 1);
    // a partition assigned while paused waits too
    rig.assign(&[p(0), p(1)]).await;
    assert!(rig
        .consumer
        .calls()
        .contains(&Call::Pause(vec![p(0), p(1)])));
    rig.settle().await.expect("checkpoint 1");
    let calls = rig.consumer.calls();
    let resumed: Vec<&Call> = calls
        .iter()
        .filter(|c| matches!(c, Call::Resume(_)))
        .collect();
    assert_eq!(resumed, vec![&Call::Resume(vec![p(0), p(1)])]);
    assert_eq!(rig.metrics.backpressure.get(), 0);
    assert!(rig.metrics.backpressure_seconds.get() > 0.0);
    // consumption goes on: records past the window's end on both partitions close [0, 1000)
    rig.record(&p(0), "b", 1500);
    rig.record(&p(1), "c", 1600);
    rig.tick();
    rig.settle().await.expect("checkpoint 2");
    assert_eq!(rig.emitted_users(), vec!["a".to_string()]);
    let written = rig.store.written();
    assert_eq!(
        written
            .iter()
            .map(|w| w.checkpoint.id.0)
            .collect::<Vec<_>>(),
        vec![1, 2]
    );
    // the state holds b's and c's open windows and a's final one (until its acknowledgement
    // is checkpointed): every record is accounted for
    let last = &written[1].checkpoint.delta;
    let mut keys: Vec<String> = last
        .groups
        .iter()
        .flat_map(|g| g.entries().into_iter().map(|(k, _)| k.key.to_string()))
        .collect();
    keys.sort();
    assert_eq!(keys, vec!["a", "b", "c"]);
    assert_eq!(last.entries, 3);
}

#[tokio::test]
async fn back_pressure_released_resumes_a_partition_lost_meanwhile_but_not_one_being_restored() {
    let mut rig = Rig::new(Options {
        partition_scoped: true,
        changelog: true,
        ..Options::default()
    });
    rig.store.delay_writes(Duration::from_millis(300));
    rig.assign(&[p(0), p(2)]).await;
    rig.record(&p(0), "a", 100);
    rig.tick();
    // checkpoint 1 is writing, for longer than the 1 ms interval
    std::thread::sleep(Duration::from_millis(20));
    rig.pipeline.on_tick().expect("tick");
    assert_eq!(rig.metrics.backpressure.get(), 1);
    // an assignment arrives meanwhile, and its replay is still running when the pause ends
    rig.changelog.hold_reads(true);
    rig.pipeline
        .on_rebalance(Rebalance::Assign(vec![p(1)]))
        .await
        .expect("assignment taken");
    assert!(rig.pipeline.restoring());
    // and a partition it paused is lost before the pause ends
    rig.pipeline
        .on_rebalance(Rebalance::Revoke {
            partitions: vec![p(2)],
            lost: true,
        })
        .await
        .expect("lost");
    rig.settle().await.expect("checkpoint 1");
    assert_eq!(rig.metrics.backpressure.get(), 0);
    let resumed: Vec<Call> = rig
        .consumer
        .calls()
        .into_iter()
        .filter(|c| matches!(c, Call::Resume(_)))
        .collect();
    // the replay may end now (its answer waits in the inbox); a failed assertion must not
    // leave the fake reader held
    rig.changelog.hold_reads(false);
    // librdkafka keeps an application's pause across an unassignment and a new assignment: a
    // lost partition is resumed too, or it would stay paused if it came back; the one being
    // restored stays paused until its state is there
    assert_eq!(
        resumed.last(),
        Some(&Call::Resume(vec![p(0), p(2)])),
        "{resumed:?}"
    );
    // the replay ends: it is read from the restored position
    let restored = tokio::time::timeout(Duration::from_secs(5), rig.inbox.restored.recv())
        .await
        .expect("restored")
        .expect("open");
    rig.pipeline.on_restored(restored).expect("installed");
    let calls = rig.consumer.calls();
    assert!(
        calls.ends_with(&[Call::Reassign(vec![p(1)]), Call::Resume(vec![p(1)])]),
        "{calls:?}"
    );
}

#[tokio::test]
async fn an_output_backlog_past_its_bound_pauses_consumption_until_acknowledged_and_loses_nothing()
{
    let mut rig = Rig::new(Options {
        max_pending_windows: 2,
        ..Options::default()
    });
    rig.assign(&[p(0)]).await;
    for user in ["a", "b", "c"] {
        rig.record(&p(0), user, 100);
    }
    // closes [0, 1000) for the three users
    rig.record(&p(0), "d", 1500);
    // three final windows wait (for checkpoint 1, then for the output): over the bound of 2
    rig.tick();
    assert!(rig.consumer.calls().contains(&Call::Pause(vec![p(0)])));
    assert_eq!(rig.metrics.backpressure.get(), 1);
    rig.settle().await.expect("checkpoint 1");
    // released to the output, not acknowledged yet (the acknowledgements wait in the inbox):
    // no checkpoint is late, but the backlog holds the pause
    assert_eq!(rig.emitted_users().len(), 3);
    rig.tick();
    let resumed = |rig: &Rig| {
        rig.consumer
            .calls()
            .iter()
            .any(|c| matches!(c, Call::Resume(_)))
    };
    assert!(!resumed(&rig));
    assert_eq!(rig.metrics.backpressure.get(), 1);
    // the acknowledgements arrive: the backlog is gone, consumption resumes at the next tick
    while let Ok(ids) = rig.inbox.acks.try_recv() {
        rig.pipeline.on_acknowledged(ids);
    }
    while rig.pipeline.checkpoints_in_flight() > 0 {
        rig.settle().await.expect("checkpoint 2");
    }
    rig.tick();
    assert!(resumed(&rig));
    assert!(rig.consumer.calls().contains(&Call::Resume(vec![p(0)])));
    // the output no longer holds consumption; the checkpoint this tick triggered may (its
    // interval is 1 ms here, and on a loaded machine it can be older than that already)
    assert!(
        rig.metrics.backpressure.get() == 0 || rig.pipeline.checkpoints_in_flight() > 0,
        "paused with no checkpoint in flight"
    );
    // each final window went out once
    let mut users = rig.emitted_users();
    users.sort();
    assert_eq!(users, vec!["a", "b", "c"]);
}

/// Asks for a savepoint as the HTTP API does; the answer arrives on the receiver.
fn ask_savepoint(
    rig: &mut Rig,
    name: Option<&str>,
) -> oneshot::Receiver<Result<crate::store::SavepointMeta, CommandError>> {
    let (reply, answer) = oneshot::channel();
    rig.pipeline.on_command(Command::Savepoint {
        name: name.map(String::from),
        reply,
    });
    answer
}

#[tokio::test]
async fn operator_savepoints_wait_for_room_come_one_at_a_time_and_only_the_newest_unnamed_stay() {
    let mut rig = Rig::new(Options {
        retained_unnamed_savepoints: 2,
        savepoints_per_minute: 4,
        ..Options::default()
    });
    rig.assign(&[p(0)]).await;
    rig.record(&p(0), "a", 100);
    rig.tick();
    // checkpoint 1 is in flight and max_concurrent is 1: the savepoint waits for room
    let mut first = ask_savepoint(&mut rig, None);
    assert!(first.try_recv().is_err(), "answered before it was taken");
    // one at a time: another one meanwhile is refused, asked to come back
    let second = ask_savepoint(&mut rig, Some("meanwhile"));
    match second.await.expect("answered") {
        Err(CommandError::TooMany(reason, _)) => assert!(reason.contains("already"), "{reason}"),
        other => panic!("{other:?}"),
    }
    rig.settle().await.expect("checkpoint 1");
    // the next tick takes the queued savepoint before any periodic checkpoint
    rig.tick();
    rig.settle().await.expect("the savepoint");
    let meta = first.await.expect("answered").expect("taken");
    assert_eq!(meta.name, "savepoint-2");
    assert_eq!(meta.checkpoint_id, CheckpointId(2));
    // a given name of the unnamed form is refused
    match ask_savepoint(&mut rig, Some("savepoint-9"))
        .await
        .expect("answered")
    {
        Err(CommandError::BadRequest(reason)) => assert!(reason.contains("unnamed"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // three more: a named one and two unnamed; then the per-minute bound refuses the fifth
    for name in [Some("keep"), None, None] {
        let answer = ask_savepoint(&mut rig, name);
        rig.settle().await.expect("the savepoint");
        answer.await.expect("answered").expect("taken");
    }
    match ask_savepoint(&mut rig, None).await.expect("answered") {
        Err(CommandError::TooMany(reason, retry_after)) => {
            assert!(
                reason.contains("checkpoint.savepoints_per_minute"),
                "{reason}"
            );
            assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(60));
        }
        other => panic!("{other:?}"),
    }
    // the two newest unnamed ones stay, and the named one
    let mut names: Vec<String> = rig
        .store
        .savepoints()
        .expect("savepoints")
        .into_iter()
        .map(|m| m.name)
        .collect();
    names.sort();
    assert_eq!(names, vec!["keep", "savepoint-4", "savepoint-5"]);
}

/// Asks for a stop with a savepoint of `name`, as the HTTP API does.
fn ask_stop_with_savepoint(
    rig: &mut Rig,
    name: &str,
) -> oneshot::Receiver<Result<Option<crate::store::SavepointMeta>, CommandError>> {
    let (reply, answer) = oneshot::channel();
    rig.pipeline.on_command(Command::Stop {
        savepoint: Some(Some(name.to_string())),
        reply,
    });
    answer
}

#[tokio::test]
async fn a_savepoint_name_being_taken_or_taken_is_refused_saying_which() {
    let mut rig = Rig::new(Options::default());
    rig.assign(&[p(0)]).await;
    rig.record(&p(0), "a", 100);
    rig.tick();
    // checkpoint 1 in flight: the savepoint waits for room under its name
    let mut queued = ask_savepoint(&mut rig, Some("release-7"));
    assert!(queued.try_recv().is_err(), "answered before it was taken");
    match ask_savepoint(&mut rig, Some("release-7"))
        .await
        .expect("answered")
    {
        Err(CommandError::Conflict(reason)) => {
            assert!(reason.contains("is being taken"), "{reason}");
            assert!(!reason.contains("already exists"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    rig.settle().await.expect("checkpoint 1");
    rig.tick();
    rig.settle().await.expect("the savepoint");
    queued.await.expect("answered").expect("taken");
    // once written, the name is taken for good
    match ask_stop_with_savepoint(&mut rig, "release-7")
        .await
        .expect("answered")
    {
        Err(CommandError::Conflict(reason)) => {
            assert!(reason.contains("already exists"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_taken_name_the_busy_store_could_not_check_is_refused_by_the_write_and_its_checkpoint_counts(
) {
    let mut rig = Rig::new(Options::default());
    rig.assign(&[p(0)]).await;
    rig.record(&p(0), "a", 100);
    let first = ask_savepoint(&mut rig, Some("release-11"));
    rig.settle().await.expect("the savepoint");
    let first = first.await.expect("answered").expect("taken");
    // the store is busy when the record path checks the name: the write is the judge
    rig.store.set_busy(true);
    rig.record(&p(0), "b", 200);
    let again = ask_savepoint(&mut rig, Some("release-11"));
    rig.settle()
        .await
        .expect("the checkpoint is durable, not failed");
    match again.await.expect("answered") {
        Err(CommandError::Conflict(reason)) => {
            assert!(reason.contains("already exists"), "{reason}");
            assert!(reason.contains("written without the savepoint"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    let written = rig.store.written();
    assert_eq!(written.len(), 2, "both checkpoints written");
    assert_eq!(written[1].savepoint, None, "no savepoint made");
    // it counts as a durable checkpoint, not a failure, and the history says what it is
    let id = written[1].checkpoint.id;
    assert_eq!(rig.history(id), AttemptStatus::Completed);
    let record = rig.attempt(id);
    assert_eq!((record.kind, record.savepoint), (Kind::Checkpoint, None));
    assert_eq!(rig.metrics.checkpoints_failed.get(), 0);
    assert_eq!(rig.metrics.savepoints.get(), 1);
    rig.store.set_busy(false);
    let kept = rig
        .store
        .savepoint_now("release-11")
        .expect("not busy")
        .expect("kept");
    assert_eq!(
        kept.checkpoint_id, first.checkpoint_id,
        "the first savepoint stays"
    );
}

#[tokio::test]
async fn a_stop_whose_savepoint_the_write_refused_fails_and_keeps_its_checkpoints() {
    // a clean stop would delete them
    let mut rig = Rig::new(Options {
        on_cancel: OnCancel::Delete,
        ..Options::default()
    });
    rig.assign(&[p(0)]).await;
    rig.record(&p(0), "a", 100);
    let first = ask_savepoint(&mut rig, Some("release-12"));
    rig.settle().await.expect("the savepoint");
    first.await.expect("answered").expect("taken");
    // the store is busy at both of the stop's checks of the name
    rig.store.set_busy(true);
    rig.record(&p(0), "b", 200);
    let stop = ask_stop_with_savepoint(&mut rig, "release-12");
    let stopped = rig.pipeline.stop(&mut rig.inbox).await;
    let err = stopped.expect_err("a stop without its savepoint is not clean");
    assert!(err.to_string().contains("stopped without it"), "{err:#}");
    match stop.await.expect("answered") {
        Err(CommandError::Conflict(reason)) => {
            assert!(reason.contains("already exists"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    let written = rig.store.written();
    assert!(
        written.len() >= 2,
        "checkpoints deleted, or the stop's not written"
    );
    assert!(written[1..].iter().all(|w| w.savepoint.is_none()));
}

#[tokio::test]
async fn a_stop_with_savepoint_takes_over_the_name_of_a_queued_savepoint() {
    let mut rig = Rig::new(Options::default());
    rig.assign(&[p(0)]).await;
    rig.record(&p(0), "a", 100);
    rig.tick();
    // checkpoint 1 in flight: "release-8" waits for room under its name
    let mut queued = ask_savepoint(&mut rig, Some("release-8"));
    rig.settle().await.expect("checkpoint 1");
    rig.record(&p(0), "b", 200);
    let stop = ask_stop_with_savepoint(&mut rig, "release-8");
    match queued.try_recv() {
        Ok(Err(CommandError::Unavailable(reason))) => {
            assert!(reason.contains("took this request over"), "{reason}")
        }
        other => panic!("the queued savepoint is dropped for the stop: {other:?}"),
    }
    // nothing takes the queued savepoint now: a tick only checkpoints
    rig.tick();
    rig.settle().await.expect("checkpoint 2");
    assert!(rig.store.written().iter().all(|w| w.savepoint.is_none()));
    rig.pipeline
        .stop(&mut rig.inbox)
        .await
        .expect("a clean stop");
    let meta = stop
        .await
        .expect("answered")
        .expect("savepoint taken")
        .expect("savepoint meta");
    assert_eq!(meta.name, "release-8");
    let written = rig.store.written();
    assert_eq!(
        written.last().and_then(|w| w.savepoint.as_deref()),
        Some("release-8"),
        "the stop's last write"
    );
}

#[tokio::test]
async fn a_stop_with_savepoint_named_as_one_written_or_being_written_is_refused_and_changes_nothing(
) {
    let mut rig = Rig::new(Options::default());
    rig.assign(&[p(0)]).await;
    rig.record(&p(0), "a", 100);
    // nothing in flight: the savepoint is written at once, under its name
    let written = ask_savepoint(&mut rig, Some("release-9"));
    match ask_stop_with_savepoint(&mut rig, "release-9")
        .await
        .expect("answered")
    {
        Err(CommandError::Conflict(reason)) => {
            assert!(reason.contains("is being taken"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    rig.settle().await.expect("the savepoint");
    assert_eq!(
        written.await.expect("answered").expect("taken").name,
        "release-9"
    );
    // a savepoint of another name queued for room stays queued when the stop is refused
    rig.record(&p(0), "b", 200);
    rig.tick();
    let mut other = ask_savepoint(&mut rig, Some("release-10"));
    match ask_stop_with_savepoint(&mut rig, "release-9")
        .await
        .expect("answered")
    {
        Err(CommandError::Conflict(reason)) => {
            assert!(reason.contains("already exists"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert!(other.try_recv().is_err(), "still queued");
    rig.settle().await.expect("checkpoint 2");
    rig.tick();
    rig.settle().await.expect("the queued savepoint");
    assert_eq!(
        other.await.expect("answered").expect("taken").name,
        "release-10"
    );
}

#[tokio::test]
async fn open_windows_past_the_limit_pause_consumption_and_readiness_until_they_fall() {
    let mut rig = Rig::new(Options {
        max_open_windows: Some(3),
        ..Options::default()
    });
    rig.assign(&[p(0), p(1)]).await;
    assert_eq!(rig.metrics.open_windows_limit.get(), 3);
    for user in ["a", "b", "c"] {
        rig.record(&p(0), user, 100);
    }
    rig.tick();
    rig.settle().await.expect("checkpoint");
    assert!(rig.board.readiness().0, "at the limit, not past it");
    rig.record(&p(1), "d", 100);
    rig.tick();
    rig.settle().await.expect("checkpoint");
    assert!(
        rig.consumer
            .calls()
            .contains(&Call::Pause(vec![p(0), p(1)])),
        "{:?}",
        rig.consumer.calls()
    );
    assert_eq!(rig.metrics.backpressure.get(), 1);
    assert_eq!(rig.metrics.open_windows_paused.get(), 1);
    assert_eq!(rig.metrics.memory_paused.get(), 0);
    let (ready, reason) = rig.board.readiness();
    assert!(
        !ready && reason.contains("state.max_open_windows"),
        "{reason}"
    );
    // records already fetched move event time on: the four windows close, one opens (the
    // key e in both partitions)
    rig.record(&p(0), "e", 5_000);
    rig.record(&p(1), "e", 5_000);
    assert_eq!(rig.pipeline.engine().open_windows(), 1);
    rig.tick();
    rig.settle().await.expect("checkpoint");
    assert!(
        rig.consumer
            .calls()
            .contains(&Call::Resume(vec![p(0), p(1)])),
        "{:?}",
        rig.consumer.calls()
    );
    assert_eq!(rig.metrics.backpressure.get(), 0);
    assert_eq!(rig.metrics.open_windows_paused.get(), 0);
    assert_eq!(
        rig.board.readiness(),
        (true, "2 partitions assigned".to_string())
    );
}

#[tokio::test]
async fn resident_memory_past_the_limit_pauses_consumption_and_readiness_until_it_falls() {
    let mut rig = Rig::new(Options {
        max_memory: Some(100 << 20),
        ..Options::default()
    });
    rig.assign(&[p(0), p(1)]).await;
    rig.memory.set(90 << 20);
    rig.tick();
    // the checkpoint each tick triggers is settled, so that only memory can hold a pause
    rig.settle().await.expect("checkpoint");
    assert!(rig.board.readiness().0);
    assert_eq!(rig.metrics.memory_limit.get(), 100 << 20);
    rig.memory.set(120 << 20);
    // the memory is read at most every quarter second
    std::thread::sleep(Duration::from_millis(300));
    rig.tick();
    // the checkpoint each tick triggers is settled, so that only memory can hold a pause
    rig.settle().await.expect("checkpoint");
    assert!(
        rig.consumer
            .calls()
            .contains(&Call::Pause(vec![p(0), p(1)])),
        "{:?}",
        rig.consumer.calls()
    );
    assert_eq!(rig.metrics.backpressure.get(), 1);
    assert_eq!(rig.metrics.memory_paused.get(), 1);
    assert_eq!(rig.metrics.memory_resident.get(), 120 << 20);
    let (ready, reason) = rig.board.readiness();
    assert!(!ready && reason.contains("state.max_memory"), "{reason}");
    // under the limit, not under 90% of it: still paused
    rig.memory.set(95 << 20);
    std::thread::sleep(Duration::from_millis(300));
    rig.tick();
    // the checkpoint each tick triggers is settled, so that only memory can hold a pause
    rig.settle().await.expect("checkpoint");
    assert!(!rig
        .consumer
        .calls()
        .iter()
        .any(|c| matches!(c, Call::Resume(_))));
    rig.memory.set(80 << 20);
    std::thread::sleep(Duration::from_millis(300));
    rig.tick();
    // the checkpoint each tick triggers is settled, so that only memory can hold a pause
    rig.settle().await.expect("checkpoint");
    assert!(
        rig.consumer
            .calls()
            .contains(&Call::Resume(vec![p(0), p(1)])),
        "{:?}",
        rig.consumer.calls()
    );
    assert_eq!(rig.metrics.backpressure.get(), 0);
    assert_eq!(rig.metrics.memory_paused.get(), 0);
    assert_eq!(
        rig.board.readiness(),
        (true, "2 partitions assigned".to_string())
    );
}

#[tokio::test]
async fn a_checkpoint_completed_after_its_timeout_is_recorded_as_completed_not_abandoned() {
    let mut rig = Rig::new(Options {
        timeout: Duration::from_millis(50),
        ..Options::default()
    });
    rig.assign(&[p(0)]).await;
    rig.record(&p(0), "a", 100);
    rig.store.delay_writes(Duration::from_millis(300));
    rig.tick();
    // the timeout passes while the store still writes (the writer runs meanwhile): abandoned
    tokio::time::sleep(Duration::from_millis(100)).await;
    rig.tick();
    assert_eq!(rig.history(CheckpointId(1)), AttemptStatus::Abandoned);
    // the write completes anyway: the store holds it, complete, and a start may restore it
    rig.settle().await.expect("late completion");
    assert_eq!(
        rig.store
            .written()
            .iter()
            .map(|w| w.checkpoint.id)
            .collect::<Vec<_>>()
            .first(),
        Some(&CheckpointId(1))
    );
    assert_eq!(rig.history(CheckpointId(1)), AttemptStatus::Completed);
    // the store's history too, after the abandonment it recorded first (the writer works in
    // order)
    let of_1 = |records: &[crate::checkpoint::history::CheckpointRecord]| -> Vec<AttemptStatus> {
        records
            .iter()
            .filter(|r| r.id == CheckpointId(1))
            .map(|r| r.status)
            .collect()
    };
    let persisted = rig.persisted_once(|r| of_1(r).len() >= 2).await;
    assert_eq!(
        of_1(&persisted),
        vec![AttemptStatus::Abandoned, AttemptStatus::Completed]
    );
}

#[tokio::test]
async fn a_late_completion_without_its_refused_savepoint_is_recorded_as_a_checkpoint() {
    let mut rig = Rig::new(Options {
        timeout: Duration::from_millis(50),
        ..Options::default()
    });
    rig.assign(&[p(0)]).await;
    rig.record(&p(0), "a", 100);
    let first = ask_savepoint(&mut rig, Some("release-13"));
    rig.settle().await.expect("the savepoint");
    let first = first.await.expect("answered").expect("taken");
    // the name's check cannot see the store; the write, slower than the timeout, refuses it
    rig.store.set_busy(true);
    rig.store.delay_writes(Duration::from_millis(300));
    rig.record(&p(0), "b", 200);
    let again = ask_savepoint(&mut rig, Some("release-13"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    rig.tick();
    let id = first.checkpoint_id.next();
    assert_eq!(rig.history(id), AttemptStatus::Abandoned);
    rig.settle().await.expect("late completion");
    assert_eq!(rig.history(id), AttemptStatus::Completed);
    // the store's record of it, after the abandonment: a checkpoint, no savepoint
    let completed = |r: &crate::checkpoint::history::CheckpointRecord| {
        r.id == id && r.status == AttemptStatus::Completed
    };
    let persisted = rig.persisted_once(|r| r.iter().any(completed)).await;
    let record = persisted
        .into_iter()
        .find(completed)
        .expect("the completion recorded");
    assert_eq!((record.kind, record.savepoint), (Kind::Checkpoint, None));
    // the requester was told when the checkpoint was abandoned
    assert!(again.await.expect("answered").is_err());
}

#[tokio::test]
async fn records_applied_in_batches_end_as_records_applied_one_at_a_time() {
    // two partitions, keys repeating, garbage, a record that closes a window followed by one
    // late for it, and a record of a partition no longer assigned: what each record does
    // depends on those before it
    let mut payloads = Vec::new();
    for i in 0..50i64 {
        let ts = 100 + i * 40 - (i % 3) * 90;
        payloads.push((
            p((i % 2) as i32),
            format!(r#"{{"user":"u{}","amount":{i},"ts":{ts}}}"#, i % 7),
        ));
        if i % 17 == 5 {
            payloads.push((p(0), "not json".to_string()));
        }
        if i == 30 {
            payloads.push((p(1), r#"{"user":"late","amount":1,"ts":20}"#.to_string()));
        }
    }
    payloads.push((p(2), r#"{"user":"gone","amount":1,"ts":2100}"#.to_string()));
    let mut ends = Vec::new();
    for batch in [1, RECORDS_AHEAD] {
        let mut rig = Rig::new(Options {
            dead_letters: true,
            ..Options::default()
        });
        rig.assign(&[p(0), p(1), p(2)]).await;
        rig.revoke(&[p(2)]).await;
        let messages: Vec<OwnedMessage> = payloads
            .iter()
            .map(|(partition, payload)| rig.message(partition, payload.as_bytes()))
            .collect();
        for chunk in messages.chunks(batch) {
            let mut chunk = chunk.to_vec();
            rig.pipeline.on_messages(&mut chunk);
            assert!(chunk.is_empty(), "a batch is emptied");
        }
        let mut letters = Vec::new();
        while let Ok(letter) = rig.letters.try_recv() {
            letters.push((letter.header(dead_letter::REASON), letter.payload));
        }
        // every copy written: the checkpoint goes ahead and releases the final windows
        rig.letters_written
            .store(letters.len() as u64, Ordering::Release);
        rig.tick();
        rig.settle().await.expect("checkpoint");
        let engine = rig.pipeline.engine();
        ends.push((
            lock(&rig.emitted).clone(),
            letters,
            engine.open_windows(),
            engine.pending_emissions(),
            [p(0), p(1), p(2)].map(|q| engine.position(&q)),
        ));
    }
    let (one_by_one, batched) = (&ends[0], &ends[1]);
    let reasons = |reason: &str| {
        one_by_one
            .1
            .iter()
            .filter(|(r, _)| r.as_deref() == Some(reason))
            .count()
    };
    assert!(
        !one_by_one.0.is_empty() && one_by_one.2 > 0,
        "windows emitted and windows open"
    );
    assert_eq!(reasons("invalid_json"), 3, "the garbage is copied");
    assert_eq!(reasons("late"), 2, "records behind closed windows are late");
    assert_eq!(
        one_by_one.4[2], None,
        "the revoked partition's record is not applied"
    );
    assert_eq!(one_by_one, batched);
}

#[tokio::test]
async fn a_checkpoint_waits_for_the_dead_letter_copies_of_the_records_it_moves_past() {
    let mut rig = Rig::new(Options {
        dead_letters: true,
        ..Options::default()
    });
    rig.assign(&[p(0)]).await;
    rig.record(&p(0), "a", 100);
    rig.record(&p(0), "b", 1500);
    // garbage and a record too late for its window (closed by the watermark at 1500)
    let garbage = OwnedMessage::new(
        Some(b"not json".to_vec()),
        Some(b"k".to_vec()),
        "events".to_string(),
        Timestamp::CreateTime(42),
        0,
        2,
        None,
    );
    rig.pipeline.on_messages(&mut vec![garbage]);
    rig.offsets.insert(p(0), 3);
    rig.record(&p(0), "c", 10);
    let first = rig
        .letters
        .try_recv()
        .expect("the invalid record is copied");
    let second = rig.letters.try_recv().expect("the late record is copied");
    assert_eq!(first.payload.as_deref(), Some(&b"not json"[..]));
    assert_eq!(first.key.as_deref(), Some(&b"k"[..]));
    assert_eq!(first.timestamp, Some(42));
    assert_eq!(
        first.header(dead_letter::REASON).as_deref(),
        Some("invalid_json")
    );
    assert_eq!(
        first.header(dead_letter::SOURCE_TOPIC).as_deref(),
        Some("events")
    );
    assert_eq!(
        first.header(dead_letter::SOURCE_PARTITION).as_deref(),
        Some("0")
    );
    assert_eq!(
        first.header(dead_letter::SOURCE_OFFSET).as_deref(),
        Some("2")
    );
    assert_eq!(second.header(dead_letter::REASON).as_deref(), Some("late"));
    assert_eq!(
        second.header(dead_letter::SOURCE_OFFSET).as_deref(),
        Some("3")
    );

    // due, but two copies are unwritten: no checkpoint, and no record is read meanwhile
    rig.tick();
    rig.tick();
    assert_eq!(rig.pipeline.checkpoints_in_flight(), 0);
    assert!(rig.store.written().is_empty());
    assert_eq!(rig.metrics.dead_letters_pending.get(), 2);
    rig.letters_written.store(1, Ordering::Release);
    rig.tick();
    assert_eq!(
        rig.pipeline.checkpoints_in_flight(),
        0,
        "one copy is still unwritten"
    );
    rig.letters_written.store(2, Ordering::Release);
    rig.tick();
    assert_eq!(rig.pipeline.checkpoints_in_flight(), 1);
    rig.settle().await.expect("the checkpoint");
    assert_eq!(rig.store.written().len(), 1);
    assert!(
        rig.consumer
            .calls()
            .contains(&Call::Commit(vec![(p(0), crate::position::NextOffset(4))])),
        "the checkpoint covers the copied records once they are written: {:?}",
        rig.consumer.calls()
    );
}

/// Reports an out-of-range position as librdkafka does, and hands the broker's answer about
/// the assigned partitions' offsets to the pipeline.
async fn out_of_range(rig: &mut Rig) -> anyhow::Result<()> {
    use rdkafka::error::KafkaError;
    use rdkafka::types::RDKafkaErrorCode;
    rig.pipeline
        .on_consumer_error(&KafkaError::MessageConsumption(
            RDKafkaErrorCode::AutoOffsetReset,
        ));
    let probed = tokio::time::timeout(Duration::from_secs(5), rig.inbox.probes.recv())
        .await
        .expect("the broker is asked within 5 s")
        .expect("channel open");
    rig.pipeline.on_probed(probed)
}

/// Two partitions read to offsets 3 and 2; the broker now has 10..20 of the first (its
/// records before 10 deleted) and 0..2 of the second.
async fn deleted_records(policy: crate::config::OnOutOfRange) -> (Rig, anyhow::Result<()>) {
    let mut rig = Rig::new(Options {
        on_out_of_range: policy,
        ..Options::default()
    });
    rig.assign(&[p(0), p(1)]).await;
    for ts in [100, 200, 300] {
        rig.record(&p(0), "a", ts);
    }
    rig.record(&p(1), "b", 100);
    rig.record(&p(1), "b", 200);
    rig.consumer.set_watermarks(&p(0), 10, 20);
    rig.consumer.set_watermarks(&p(1), 0, 2);
    let result = out_of_range(&mut rig).await;
    (rig, result)
}

fn seeks(rig: &Rig) -> Vec<Call> {
    rig.consumer
        .calls()
        .into_iter()
        .filter(|c| matches!(c, Call::Seek(..)))
        .collect()
}

#[tokio::test]
async fn out_of_range_with_fail_stops_naming_the_partition_and_the_brokers_offsets() {
    let (rig, result) = deleted_records(crate::config::OnOutOfRange::Fail).await;
    let text = format!("{:#}", result.expect_err("the service stops"));
    for part in [
        "events[0]",
        "held position 3",
        "offsets 10 to 20",
        "reset-position",
    ] {
        assert!(text.contains(part), "{part}: {text}");
    }
    assert!(seeks(&rig).is_empty(), "nothing moved: {:?}", seeks(&rig));
    assert_eq!(
        rig.pipeline.engine().position(&p(0)),
        Some(crate::position::NextOffset(3))
    );
}

#[tokio::test]
async fn out_of_range_with_earliest_moves_only_that_partition_and_counts_the_skipped_offsets() {
    let (mut rig, result) = deleted_records(crate::config::OnOutOfRange::Earliest).await;
    result.expect("moved, not stopped");
    assert_eq!(
        seeks(&rig),
        vec![Call::Seek(p(0), 10)],
        "the healthy partition is left alone"
    );
    assert_eq!(
        rig.pipeline.engine().position(&p(0)),
        Some(crate::position::NextOffset(10))
    );
    assert_eq!(
        rig.pipeline.engine().position(&p(1)),
        Some(crate::position::NextOffset(2))
    );
    assert_eq!(
        rig.metrics
            .records_skipped
            .with_label_values(&[crate::metrics::SKIPPED_OUT_OF_RANGE])
            .get(),
        7
    );
    // the next checkpoint holds the moved position
    rig.tick();
    rig.settle().await.expect("checkpoint");
    assert!(
        rig.consumer
            .calls()
            .iter()
            .any(|c| matches!(c, Call::Commit(ps)
            if ps.contains(&(p(0), crate::position::NextOffset(10)))
                && ps.contains(&(p(1), crate::position::NextOffset(2))))),
        "{:?}",
        rig.consumer.calls()
    );
}

#[tokio::test]
async fn out_of_range_with_latest_skips_to_the_end() {
    let (rig, result) = deleted_records(crate::config::OnOutOfRange::Latest).await;
    result.expect("moved, not stopped");
    assert_eq!(seeks(&rig), vec![Call::Seek(p(0), 20)]);
    assert_eq!(
        rig.metrics
            .records_skipped
            .with_label_values(&[crate::metrics::SKIPPED_OUT_OF_RANGE])
            .get(),
        17
    );
}

#[tokio::test]
async fn a_position_past_the_recreated_end_moves_back_and_the_next_checkpoint_is_full() {
    let mut rig = Rig::new(Options {
        on_out_of_range: crate::config::OnOutOfRange::Earliest,
        ..Options::default()
    });
    rig.assign(&[p(0)]).await;
    for ts in [100, 200, 300] {
        rig.record(&p(0), "a", ts);
    }
    rig.tick();
    rig.settle().await.expect("checkpoint 1 holds position 3");
    // the topic was recreated: it has offsets 0..1 now
    rig.consumer.set_watermarks(&p(0), 0, 1);
    out_of_range(&mut rig).await.expect("moved back");
    assert_eq!(seeks(&rig), vec![Call::Seek(p(0), 0)]);
    assert_eq!(
        rig.pipeline.engine().position(&p(0)),
        Some(crate::position::NextOffset(0))
    );
    rig.offsets.insert(p(0), 0);
    rig.record(&p(0), "b", 400);
    rig.tick();
    rig.settle()
        .await
        .expect("checkpoint 2 holds the moved position");
    let written = rig.store.written();
    let last = written.last().expect("written");
    assert!(
        last.checkpoint.delta.full,
        "offsets only move forward along incremental checkpoints: the next one is full"
    );
    assert_eq!(
        last.checkpoint.delta.partitions[0].next,
        Some(crate::position::NextOffset(1))
    );
}

#[tokio::test]
async fn a_report_no_held_position_explains_starts_every_partition_again_where_it_is_held() {
    let mut rig = Rig::new(Options::default());
    rig.assign(&[p(0), p(1)]).await;
    rig.record(&p(0), "a", 100);
    // partition 0 is within what the broker has; partition 1 read nothing (it started at a
    // committed offset that is gone)
    rig.consumer.set_watermarks(&p(0), 0, 5);
    rig.consumer.set_watermarks(&p(1), 7, 9);
    out_of_range(&mut rig)
        .await
        .expect("nothing out of range: no stop, even with fail");
    let mut calls = seeks(&rig);
    calls.sort_by_key(|c| format!("{c:?}"));
    assert_eq!(
        calls,
        vec![Call::Seek(p(0), 1), Call::Seek(p(1), 7)],
        "held where it is, and per auto_offset_reset (earliest) without a held position"
    );
    assert_eq!(
        rig.metrics
            .records_skipped
            .with_label_values(&[crate::metrics::SKIPPED_OUT_OF_RANGE])
            .get(),
        0
    );
}

#[tokio::test]
async fn a_record_of_a_partition_just_lost_is_not_applied() {
    let mut rig = Rig::new(Options {
        partition_scoped: true,
        ..Options::default()
    });
    rig.assign(&[p(0), p(1)]).await;
    rig.record(&p(1), "a", 100);
    rig.pipeline
        .on_rebalance(Rebalance::Revoke {
            partitions: vec![p(1)],
            lost: true,
        })
        .await
        .expect("lost");
    let consumed = rig.metrics.records_consumed.get();
    // the consumer returned it with the rebalance that took the partition away
    rig.record(&p(1), "b", 200);
    assert_eq!(rig.metrics.records_consumed.get(), consumed, "not counted");
    assert_eq!(
        rig.pipeline.engine().position(&p(1)),
        Some(crate::position::NextOffset(1)),
        "the record after the loss is not applied"
    );
    rig.record(&p(0), "c", 200);
    assert_eq!(rig.metrics.records_consumed.get(), consumed + 1);
}

#[tokio::test]
async fn a_partition_that_read_on_while_the_broker_was_asked_is_left_alone() {
    use rdkafka::error::KafkaError;
    use rdkafka::types::RDKafkaErrorCode;
    let mut rig = Rig::new(Options::default());
    rig.assign(&[p(0)]).await;
    for ts in [100, 200, 300] {
        rig.record(&p(0), "a", ts);
    }
    // the broker's answer is older than the record that arrives meanwhile: by it, position 4
    // would lie past the end
    rig.consumer.set_watermarks(&p(0), 0, 3);
    rig.pipeline
        .on_consumer_error(&KafkaError::MessageConsumption(
            RDKafkaErrorCode::AutoOffsetReset,
        ));
    let probed = tokio::time::timeout(Duration::from_secs(5), rig.inbox.probes.recv())
        .await
        .expect("asked")
        .expect("open");
    rig.record(&p(0), "a", 400);
    rig.pipeline
        .on_probed(probed)
        .expect("a partition that reads on is not out of range");
    assert!(seeks(&rig).is_empty(), "{:?}", seeks(&rig));
    assert_eq!(
        rig.pipeline.engine().position(&p(0)),
        Some(crate::position::NextOffset(4))
    );
}

/// What a consumer holds, as [`Pipeline::drain`] reads it: records, ends of partition and
/// errors in order; a rebalance is queued for the pipeline by the receive that reaches it, as
/// librdkafka's callback does inside `recv`.
struct Queue {
    items: Mutex<std::collections::VecDeque<Held>>,
    shared: Arc<Shared>,
}

enum Held {
    Record(OwnedMessage),
    Rebalance(Rebalance),
    Eof(i32),
    Error,
}

impl Receive for Queue {
    type Message<'a> = OwnedMessage;

    fn try_recv(&self) -> Option<rdkafka::error::KafkaResult<OwnedMessage>> {
        use rdkafka::error::KafkaError;
        let mut items = lock(&self.items);
        loop {
            match items.pop_front()? {
                Held::Rebalance(e) => self.shared.push(e),
                Held::Record(m) => return Some(Ok(m)),
                Held::Eof(n) => return Some(Err(KafkaError::PartitionEOF(n))),
                Held::Error => {
                    return Some(Err(KafkaError::MessageConsumption(
                        rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition,
                    )))
                }
            }
        }
    }
}

#[tokio::test]
async fn a_drain_applies_records_in_the_order_the_consumer_returned_them() {
    let mut rig = Rig::new(Options::default());
    rig.assign(&[p(0), p(1)]).await;
    let record = |rig: &mut Rig, partition: i32, user: &str, ts: i64| {
        let payload = format!(r#"{{"user":"{user}","amount":1,"ts":{ts}}}"#);
        Held::Record(rig.message(&p(partition), payload.as_bytes()))
    };
    let Held::Record(first) = record(&mut rig, 0, "a", 100) else {
        unreachable!("a record")
    };
    let mut items = std::collections::VecDeque::new();
    // more than a batch of partition 1 before its revoke: applied, the last of them after
    // the first batch and before the revoke
    for i in 0..20 {
        items.push_back(record(&mut rig, 1, "b", 100 + i));
    }
    items.push_back(Held::Rebalance(Rebalance::Revoke {
        partitions: vec![p(1)],
        lost: false,
    }));
    // after it, partition 1's records belong to its next owner; partition 0's are applied
    // (an end of partition among them is passed on, but its order against the batch is not
    // observable here: partition 0 has event time already)
    for i in 0..3 {
        items.push_back(record(&mut rig, 1, "c", 200 + i));
        items.push_back(record(&mut rig, 0, "d", 200 + i));
    }
    items.push_back(Held::Eof(0));
    items.push_back(record(&mut rig, 0, "e", 300));
    // an error ends the drain: what follows is left for the loop's next receive
    items.push_back(Held::Error);
    items.push_back(record(&mut rig, 0, "f", 400));
    let queue = Queue {
        items: Mutex::new(items),
        shared: rig.shared.clone(),
    };
    rig.pipeline.drain(&queue, first).await.expect("drain");
    assert_eq!(
        rig.metrics.records_consumed.get(),
        1 + 20 + 3 + 1,
        "the first record, partition 1's before its revoke and partition 0's before the error"
    );
    assert_eq!(
        rig.pipeline.engine().position(&p(0)),
        Some(NextOffset(5)),
        "partition 0's records up to the error"
    );
    assert_eq!(
        lock(&queue.items).len(),
        1,
        "the record after the error is left"
    );
}
