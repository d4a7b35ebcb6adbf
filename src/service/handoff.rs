//! Partitions moving between instances of one consumer group (partition-scoped state): on
//! assignment, a partition's state is restored before its first record (from the changelog
//! when that holds a newer state than this instance); on revocation, it is checkpointed and
//! published before the partition is released; every durable checkpoint publishes what it
//! changed per partition.

use std::collections::HashMap;

use anyhow::Context as _;
use prometheus::IntGauge;
use tokio::sync::{mpsc, oneshot};

use super::releases::stale;
use super::runtime::Runtime;
use crate::changelog::kafka::{
    read_states, Batch, ChangelogTopic, Progress, PublishFailure, Publisher,
};
use crate::changelog::protocol::{chunks, publication_kind, Committed, Kind, Tag, MAX_CHUNK_BYTES};
use crate::checkpoint::Checkpoint;
use crate::engine::{Entry, StateKey};
use crate::position::Partition;
use crate::source::{self, Source};

/// Changes per chunk: keeps records far below Kafka's 1 MB default message size.
const CHUNK_ENTRIES: usize = 2_000;
/// A full publication of every partition after this many checkpoints, which tombstones the
/// line before it: bounds what compaction keeps and what a restore reads.
const FULL_EVERY: u64 = 100;
/// How often `/readyz` text follows a changelog restore's progress (the metrics follow every
/// record).
const READY_TEXT_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

/// This instance's link to the changelog topic.
pub(super) struct Changelog {
    pub(super) topic: ChangelogTopic,
    pub(super) publisher: Publisher,
    /// Tags this process's publications (random per start, never reused).
    pub(super) run: u64,
    /// The last publication of each partition this process made: the base of its next delta.
    pub(super) published: HashMap<Partition, Tag>,
    /// Keys of each partition's records since its last full publication (tombstoned by the
    /// next one).
    pub(super) record_keys: HashMap<Partition, Vec<String>>,
    /// Publications since the last full one.
    pub(super) since_full: u64,
}

/// Events the hand-off waits for, received by the processing loop.
pub(super) struct HandoffEvents {
    pub(super) released: mpsc::UnboundedReceiver<(u64, Vec<Partition>)>,
    pub(super) failures: mpsc::UnboundedReceiver<PublishFailure>,
}

impl Changelog {
    pub(super) fn run_id() -> u64 {
        let ms = crate::clock::epoch_ms().max(0) as u64;
        (ms << 20) ^ u64::from(std::process::id())
    }
}

impl Runtime {
    /// Completes an assignment: restores what needs restoring, then assigns.
    pub(super) async fn on_assign(
        &mut self,
        consumer: &Source,
        partitions: Vec<Partition>,
    ) -> anyhow::Result<()> {
        if self.engine.config().partition_scoped {
            // windows of partitions this instance no longer owns must not close and emit here
            let stale = stale(
                self.engine.progress().map(|(p, _)| p),
                &self.assigned,
                &partitions,
            );
            if !stale.is_empty() {
                tracing::info!(partitions = ?stale.iter().map(ToString::to_string).collect::<Vec<_>>(), "dropping the state of partitions assigned elsewhere");
                self.engine.drop_partitions(&stale);
                self.shared.clear_positions(&stale);
                self.unreport(&stale);
                self.scheduler.restart_line();
            }
        }
        // a partition assigned again is no longer on its way out
        self.releases.cancel(&partitions);
        if let Some(link) = &self.changelog {
            let topic = link.topic.clone();
            let group = self.settings.kafka.group_id.clone();
            let started = std::time::Instant::now();
            let (mut states, progress) = self.read_changelog(&topic, &group, &partitions).await?;
            let read_ms = started.elapsed().as_millis() as u64;
            for p in &partitions {
                let local = self.engine.position(p).map(|n| n.0);
                let committed = states.remove(p);
                if let (Some(c), Some(link)) = (&committed, self.changelog.as_mut()) {
                    link.record_keys.insert(p.clone(), c.record_keys.clone());
                }
                match committed {
                    Some(c) if c.next_offset() > local => {
                        let Some(position) = c.position.clone() else {
                            continue;
                        };
                        let entries = c.entries.len();
                        self.engine
                            .install_partition(&position, c.entries)
                            .with_context(|| format!("installing {p} from the changelog"))?;
                        if let Some(next) = position.next {
                            self.shared.set_position(p, next);
                        }
                        self.metrics.changelog_restores.inc();
                        let bytes = progress.get(p).map_or(0, |r| r.bytes_read);
                        let checkpoint_id = c.tag.map(|t| t.checkpoint);
                        tracing::info!(partition = %p, checkpoint_id = ?checkpoint_id, next_offset = ?position.next.map(|n| n.0), local_next_offset = ?local, entries, bytes, duration_ms = read_ms, "restored partition state from the changelog");
                    }
                    Some(c) => {
                        tracing::info!(partition = %p, next_offset = ?local, changelog_next_offset = ?c.next_offset(), "local partition state is as new as the changelog's; keeping it")
                    }
                    None => {
                        tracing::info!(partition = %p, next_offset = ?local, "no changelog state for the partition")
                    }
                }
                // the partition is assigned exactly where the state it holds ends
                match self.engine.position(p) {
                    Some(next) => self.shared.set_position(p, next),
                    None => self.shared.clear_positions(std::slice::from_ref(p)),
                }
            }
            // the first checkpoint after a takeover publishes the partitions' full state
            self.scheduler.restart_line();
            for p in &partitions {
                if let Some(link) = self.changelog.as_mut() {
                    link.published.remove(p);
                }
            }
        }
        if let Err(e) = source::assign(consumer, &partitions) {
            if self.settings.state.scope == crate::config::StateScope::Instance {
                // assigned directly, nothing would assign them again: stop rather than never
                // read them
                anyhow::bail!("{e}");
            }
            tracing::error!(error = %e, "assignment failed");
            return Ok(());
        }
        self.assignment_seen = true;
        self.awaiting_first.extend(partitions.iter().cloned());
        for p in &partitions {
            if !self.assigned.contains(p) {
                self.assigned.push(p.clone());
            }
        }
        self.engine.assign(&partitions);
        self.shared.set_assigned(&self.assigned);
        Ok(())
    }

    /// Replays the changelog for `partitions` (one reader for all), retrying a failed or
    /// stalled read a few times before giving up (the service then stops rather than restore
    /// an older state than published).
    async fn read_changelog(
        &self,
        topic: &ChangelogTopic,
        group: &str,
        partitions: &[Partition],
    ) -> anyhow::Result<(HashMap<Partition, Committed>, HashMap<Partition, Progress>)> {
        let mut backoff = std::time::Duration::from_secs(1);
        let mut attempt = 1;
        loop {
            let admin = self.admin.clone();
            let metrics = self.metrics.clone();
            let (sources, topic, group) = (partitions.to_vec(), topic.clone(), group.to_string());
            let result = tokio::task::spawn_blocking(move || {
                // called per changelog record: gauge handles are looked up once per partition and
                // the readiness text is rewritten at most every READY_TEXT_EVERY
                let mut seen: HashMap<Partition, (IntGauge, IntGauge, Progress)> = HashMap::new();
                let mut text_at: Option<std::time::Instant> = None;
                let mut progress = |p: &Partition, now: Progress| {
                    let (left, bytes, last) = seen.entry(p.clone()).or_insert_with(|| {
                        let label = p.to_string();
                        (
                            metrics
                                .changelog_restore_remaining
                                .with_label_values(&[label.as_str()]),
                            metrics
                                .changelog_restore_read_bytes
                                .with_label_values(&[label.as_str()]),
                            Progress::default(),
                        )
                    });
                    left.set(now.records_left);
                    bytes.set(now.bytes_read as i64);
                    *last = now;
                    if now.records_left > 0
                        && text_at.is_none_or(|t| t.elapsed() >= READY_TEXT_EVERY)
                    {
                        text_at = Some(std::time::Instant::now());
                        admin.set_ready(
                            false,
                            &format!(
                                "restoring {p} from the changelog: {} records left, {} bytes read",
                                now.records_left, now.bytes_read
                            ),
                        );
                    }
                };
                let states = read_states(&topic, &group, &sources, &mut progress);
                let last = seen.into_iter().map(|(p, (_, _, r))| (p, r)).collect();
                states.map(|states| (states, last))
            })
            .await
            .context("changelog reader task")?;
            match result {
                Ok(read) => return Ok(read),
                Err(e) if attempt < 4 => {
                    tracing::warn!(attempt, error = %e, "changelog read failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                    attempt += 1;
                }
                Err(e) => return Err(e).context("restoring partitions from the changelog"),
            }
        }
    }

    /// Starts a revocation: with a changelog, a checkpoint first, released once it is
    /// published (`on_released`); otherwise (or when the partitions are already lost) at once.
    pub(super) fn on_revoke(&mut self, consumer: &Source, partitions: Vec<Partition>, lost: bool) {
        if self.changelog.is_some() && !lost && !partitions.is_empty() {
            let id = self.trigger(None);
            tracing::info!(checkpoint_id = id, partitions = ?partitions.iter().map(ToString::to_string).collect::<Vec<_>>(), "partitions revoked: checkpointing them before release");
            self.releases.begin(id, partitions);
            return;
        }
        self.releases.cancel(&partitions);
        source::release(consumer, &partitions);
        self.forget(&partitions);
    }

    /// The revoke checkpoint of these partitions is published (or failed): let them go,
    /// unless they were lost or assigned again meanwhile.
    pub(super) fn on_released(&mut self, consumer: &Source, id: u64, partitions: Vec<Partition>) {
        let partitions = self.releases.due(id, partitions);
        if partitions.is_empty() {
            return;
        }
        tracing::info!(partitions = ?partitions.iter().map(ToString::to_string).collect::<Vec<_>>(), "partitions released");
        source::release(consumer, &partitions);
        self.forget(&partitions);
    }

    /// Stops exporting per-partition series of partitions this instance no longer holds.
    fn unreport(&self, partitions: &[Partition]) {
        for p in partitions {
            let _ = self
                .metrics
                .partition_watermark
                .remove_label_values(&[&p.topic, &p.partition.to_string()]);
        }
    }

    fn forget(&mut self, partitions: &[Partition]) {
        self.assigned.retain(|p| !partitions.contains(p));
        self.unreport(partitions);
        if self.changelog.is_some() {
            self.engine.drop_partitions(partitions);
            self.shared.clear_positions(partitions);
            self.scheduler.restart_line();
            if let Some(link) = self.changelog.as_mut() {
                for p in partitions {
                    link.published.remove(p);
                }
            }
        } else {
            self.engine.revoke(partitions);
        }
        self.shared.set_assigned(&self.assigned);
    }

    /// A revoke checkpoint failed: release its partitions anyway; the new owner restores the
    /// last published state, which matches its offsets.
    pub(super) fn release_after_failure(&mut self, id: u64) {
        if let Some(partitions) = self.releases.take_checkpoint(id) {
            tracing::warn!(checkpoint_id = id, "the checkpoint before releasing partitions failed; releasing them at their last published state");
            let _ = self.released_tx.send((id, partitions));
        }
    }

    /// Publishes a durable checkpoint's changes per owned partition.
    pub(super) fn publish(&mut self, cp: &Checkpoint) {
        let releasing = self.releases.take_checkpoint(cp.id);
        let Some(link) = self.changelog.as_mut() else {
            return;
        };
        let mut ups: HashMap<&Partition, Vec<(StateKey, Entry)>> = HashMap::new();
        let mut dels: HashMap<&Partition, Vec<StateKey>> = HashMap::new();
        for (k, e) in &cp.delta.upserts {
            if let Some(p) = &k.partition {
                ups.entry(p).or_default().push((k.clone(), *e));
            }
        }
        for k in &cp.delta.deletes {
            if let Some(p) = &k.partition {
                dels.entry(p).or_default().push(k.clone());
            }
        }
        let mut out = Vec::new();
        let mut tombstones = Vec::new();
        let mut need_full = false;
        let mut published = 0;
        for position in &cp.delta.partitions {
            let p = &position.partition;
            if !self.assigned.contains(p) {
                continue;
            }
            let Some(kind) = publication_kind(
                cp.delta.full,
                cp.base,
                link.published.get(p).copied(),
                link.run,
            ) else {
                need_full = true;
                continue;
            };
            let tag = Tag {
                run: link.run,
                checkpoint: cp.id,
            };
            let new = chunks(
                &self.settings.kafka.group_id,
                tag,
                kind,
                position.clone(),
                cp.delta.watermark,
                ups.remove(p).unwrap_or_default(),
                dels.remove(p).unwrap_or_default(),
                CHUNK_ENTRIES,
                MAX_CHUNK_BYTES,
            );
            let keys = link.record_keys.entry(p.clone()).or_default();
            if kind == Kind::Full {
                tombstones.extend(keys.drain(..).map(|k| (k, p.clone())));
            }
            keys.extend(new.iter().map(|c| c.record_key()));
            out.extend(new);
            link.published.insert(p.clone(), tag);
            published += 1;
        }
        let done = releasing.map(|partitions| {
            let (tx, rx) = oneshot::channel::<Result<(), String>>();
            let released = self.released_tx.clone();
            let id = cp.id;
            tokio::spawn(async move {
                // released whether the publication succeeded or not: see release_after_failure
                let _ = rx.await;
                let _ = released.send((id, partitions));
            });
            tx
        });
        link.publisher.publish(Batch {
            chunks: out,
            tombstones,
            done,
        });
        self.metrics.changelog_published.inc_by(published);
        link.since_full = if cp.delta.full {
            0
        } else {
            link.since_full + 1
        };
        if need_full || link.since_full >= FULL_EVERY {
            self.scheduler.restart_line();
        }
    }

    /// Waits (until `deadline`) for every publication sent so far, so that a stopping instance
    /// leaves its final state in the changelog for whoever takes its partitions.
    pub(super) async fn changelog_settled(&self, deadline: tokio::time::Instant) {
        let Some(link) = &self.changelog else { return };
        let (tx, rx) = oneshot::channel();
        link.publisher.publish(Batch {
            chunks: Vec::new(),
            tombstones: Vec::new(),
            done: Some(tx),
        });
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(Ok(()))) => tracing::info!("changelog publications complete"),
            Ok(Ok(Err(e))) => {
                tracing::warn!(error = %e, "the last changelog publication failed; a new owner restores an older state (and reads again from there)")
            }
            _ => tracing::warn!(
                "changelog publications did not complete before the shutdown timeout"
            ),
        }
    }

    /// A publication failed: those partitions' next publication must be full.
    pub(super) fn on_publish_failure(&mut self, failure: PublishFailure) {
        self.metrics.changelog_publish_failures.inc();
        if let Some(link) = self.changelog.as_mut() {
            for p in &failure.partitions {
                link.published.remove(p);
            }
        }
        self.scheduler.restart_line();
    }
}
