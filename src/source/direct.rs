//! Direct assignment, for `state.scope: instance`: one instance owns every partition of its
//! topics, so it needs no consumer-group membership (Flink's Kafka source works the same way).
//! A restart consumes again as soon as it has restored, instead of waiting for the dead
//! member's session to expire.
//!
//! A background task finds the topics' partitions (at start, then every
//! `kafka.partition_discovery_interval`) and hands new ones to the processing loop as
//! assignments. Partitions found while running, and partitions of a topic the restored
//! checkpoint knows that it holds no position for (added while the service was down), are read
//! from their beginning; others (a topic new to the configuration, a new store) at the group's
//! committed offset with `kafka.start_from: committed`, else per `start_from`/`auto_offset_reset`.
//!
//! Offsets are still committed to `group_id` after every durable checkpoint, and the last ones
//! again every few seconds (a heartbeat), each commit tagged ([`CommitTag`]) so lag tools see
//! progress and no second instance reads the group unnoticed (rules in [`super::ownership`]):
//!
//! - at start, before anything is assigned, the group's committed offsets are read: one
//!   committed by another store within [`super::ownership::LIVE_WITHIN`] means another instance is
//!   running on the group; the start waits for its commits to stop (up to `checkpoint.lock_wait`,
//!   logged), then gives up;
//! - then it commits where it will read from (held positions, else the group's with
//!   `start_from: committed`, else the partition's start or end): the broker refuses that
//!   while the group has members (an instance with
//!   `state.scope: partition`, an old static member whose session has not expired, any
//!   subscribed consumer); the start waits for them to leave the same way, then gives up;
//! - while running, every heartbeat reads the group's commits again: a commit by another run
//!   made after this one started is a second process (another store, or a copy of this one);
//!   the one that started later stops. A heartbeat the broker refuses because the group now has
//!   members stops this instance too.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use super::ownership::{live_other, rival, yields, CommitTag};
use super::{Rebalance, Shared, Source};
use crate::config::OffsetReset;
use crate::position::{NextOffset, Partition};
use crate::ratelimit::RateLimit;

/// How often the last committed offsets are committed again (the heartbeat others see), and
/// the group's commits read for a rival.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// Bound on one metadata or offset request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Between attempts while the brokers do not answer.
const RETRY: Duration = Duration::from_secs(1);
/// How long the start retries reading the group's committed offsets before it goes ahead
/// without the check.
const UNKNOWN_WAIT: Duration = Duration::from_secs(15);

/// Whether a failed commit means the group has members (so this instance must not consume
/// without membership).
fn membership_error(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::UnknownMemberId
                | RDKafkaErrorCode::IllegalGeneration
                | RDKafkaErrorCode::RebalanceInProgress
                | RDKafkaErrorCode::FencedInstanceId
                | RDKafkaErrorCode::StaleMemberEpoch
        )
    )
}

/// The partitions of `topics` the brokers know, and the topics they do not know (yet).
pub fn discover(
    consumer: &Source,
    topics: &[String],
) -> Result<(Vec<Partition>, Vec<String>), KafkaError> {
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), REQUEST_TIMEOUT)?;
        match metadata.topics().iter().find(|t| t.name() == topic) {
            Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
                found.extend(t.partitions().iter().map(|p| Partition::new(topic, p.id())))
            }
            _ => missing.push(topic.clone()),
        }
    }
    found.sort();
    Ok((found, missing))
}

/// What the start-up check found.
enum GroupCheck {
    Clear,
    /// Another store committed recently: wait and look again.
    Busy(CommitTag),
    /// The group has members: wait for them to leave and look again.
    Members(KafkaError),
    /// The group's offsets could not be read (the coordinator is not ready yet): try again.
    Unknown(KafkaError),
}

/// The group's committed offsets for `partitions`, and the tags among them.
fn read_group(
    consumer: &Source,
    partitions: &[Partition],
) -> Result<(TopicPartitionList, Vec<CommitTag>), KafkaError> {
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition(&p.topic, p.partition);
    }
    let committed = consumer.committed_offsets(tpl, REQUEST_TIMEOUT)?;
    let tags = committed
        .elements()
        .iter()
        .filter_map(|e| CommitTag::parse(e.metadata()))
        .collect();
    Ok((committed, tags))
}

fn check_group(
    consumer: &Source,
    shared: &Shared,
    partitions: &[Partition],
    tag: &CommitTag,
    reset: OffsetReset,
    from_committed: bool,
) -> GroupCheck {
    let (committed, tags) = match read_group(consumer, partitions) {
        Ok(found) => found,
        Err(e) => return GroupCheck::Unknown(e),
    };
    if let Some(other) = live_other(&tags, tag, crate::clock::epoch_ms()) {
        return GroupCheck::Busy(other.clone());
    }
    // commit where reading will start: the broker refuses a commit without membership while
    // the group has members
    let held = shared.board().positions();
    let from_beginning = shared.from_beginning_snapshot();
    let mut probe = Vec::new();
    for e in committed.elements() {
        let p = Partition::new(e.topic(), e.partition());
        let next = match (held.get(&p), e.offset()) {
            (Some(next), _) => *next,
            (None, Offset::Offset(o)) if o >= 0 && from_committed => NextOffset(o),
            _ => match consumer.fetch_watermarks(&p.topic, p.partition, REQUEST_TIMEOUT) {
                Ok((low, _)) if from_beginning.contains(&p) || reset == OffsetReset::Earliest => {
                    NextOffset(low)
                }
                Ok((_, high)) => NextOffset(high),
                Err(_) => continue,
            },
        };
        probe.push((p, next));
    }
    match commit_tagged(consumer, &probe, tag, CommitMode::Sync) {
        Err(e) if membership_error(&e) => GroupCheck::Members(e),
        Err(e) => {
            tracing::warn!(error = %e, "offset commit at start failed (advisory)");
            GroupCheck::Clear
        }
        Ok(()) => {
            shared.set_committed(probe);
            GroupCheck::Clear
        }
    }
}

/// Commits `positions` with `tag` (stamped now) as their metadata.
pub fn commit_tagged(
    consumer: &Source,
    positions: &[(Partition, NextOffset)],
    tag: &CommitTag,
    mode: CommitMode,
) -> Result<(), KafkaError> {
    let metadata = CommitTag {
        at_ms: crate::clock::epoch_ms(),
        ..tag.clone()
    }
    .encode();
    let mut tpl = TopicPartitionList::new();
    for (p, next) in positions {
        tpl.add_partition_offset(&p.topic, p.partition, Offset::Offset(next.0))?;
        if let Some(mut e) = tpl.find_partition(&p.topic, p.partition) {
            e.set_metadata(metadata.clone());
        }
    }
    if tpl.count() == 0 {
        return Ok(());
    }
    consumer.commit(&tpl, mode)
}

pub struct DirectSettings {
    pub topics: Vec<String>,
    pub group: String,
    /// 0: partitions are looked for at start only.
    pub discovery_interval: Duration,
    pub tag: CommitTag,
    /// How long the start waits for another instance to stop.
    pub wait: Duration,
    /// `kafka.start_from`/`auto_offset_reset`, for partitions without a committed offset to use.
    pub reset: OffsetReset,
    /// `kafka.start_from: committed`.
    pub from_committed: bool,
}

/// What a heartbeat found.
enum Beat {
    Fine,
    /// Another run committed since this one started: it, and whether this one stops for it.
    Rival(CommitTag, bool),
    /// The broker refused the commit: the group has members.
    Members(KafkaError),
}

/// Reads the group's commits for a rival, then commits the last positions again if due.
fn heartbeat(consumer: &Source, shared: &Shared, known: &[Partition], tag: &CommitTag) -> Beat {
    if let Ok((_, tags)) = read_group(consumer, known) {
        if let Some(other) = rival(&tags, tag) {
            return Beat::Rival(other.clone(), yields(tag, other));
        }
    }
    if shared.commit_due(HEARTBEAT) {
        let positions = shared.committed();
        match commit_tagged(consumer, &positions, tag, CommitMode::Sync) {
            Err(e) if membership_error(&e) => return Beat::Members(e),
            Err(e) => tracing::debug!(error = %e, "heartbeat commit failed (advisory)"),
            Ok(()) => shared.set_committed(positions),
        }
    }
    Beat::Fine
}

/// Runs discovery, the start-up group check and the heartbeat until the consumer goes.
pub fn spawn(
    consumer: Arc<Source>,
    shared: Arc<Shared>,
    settings: DirectSettings,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(reason) = run(consumer, shared.clone(), settings).await {
            shared.push(Rebalance::Refused(reason));
        }
    })
}

/// Ends with the reason this instance must stop, or `Ok` when the runtime went away.
async fn run(
    consumer: Arc<Source>,
    shared: Arc<Shared>,
    settings: DirectSettings,
) -> Result<(), String> {
    // topics the restored checkpoint holds positions in: their partitions without a position
    // were added while the service was down
    let restored_topics: BTreeSet<String> = shared
        .board()
        .positions()
        .into_keys()
        .map(|p| p.topic)
        .collect();
    let mut known: BTreeSet<Partition> = BTreeSet::new();
    // when the start-up check first ran: its waits count from there
    let mut check_started: Option<Instant> = None;
    let mut checked = false;
    let mut next_discovery = Instant::now();
    let mut next_beat = Instant::now() + HEARTBEAT;
    let mut log = RateLimit::new(Duration::from_secs(10));
    let mut log_due = move || log.check().is_some();
    let group = settings.group.clone();
    loop {
        if Instant::now() >= next_discovery {
            let c = consumer.clone();
            let topics = settings.topics.clone();
            let (partitions, missing) =
                match tokio::task::spawn_blocking(move || discover(&c, &topics)).await {
                    Ok(Ok(found)) => found,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "partition discovery failed; retrying");
                        tokio::time::sleep(RETRY).await;
                        continue;
                    }
                    Err(_) => return Ok(()),
                };
            if !missing.is_empty() && log_due() {
                tracing::warn!(topics = ?missing, "input topics not found (yet); looking for them again at every partition discovery");
            }
            let held = shared.board().positions();
            let new: Vec<Partition> = partitions
                .into_iter()
                .filter(|p| !known.contains(p))
                .collect();
            // nothing of these was read: from their start
            let fresh: Vec<Partition> = new
                .iter()
                .filter(|p| {
                    !held.contains_key(p)
                        && (!known.is_empty() || restored_topics.contains(&p.topic))
                })
                .cloned()
                .collect();
            if !fresh.is_empty() {
                shared.start_from_beginning(&fresh);
                tracing::info!(partitions = ?fresh.iter().map(ToString::to_string).collect::<Vec<_>>(), "partitions added to the topics; reading them from the beginning");
            }
            if !checked {
                let started = *check_started.get_or_insert_with(Instant::now);
                let waited = started.elapsed();
                let (c, s, ps, tag) = (
                    consumer.clone(),
                    shared.clone(),
                    new.clone(),
                    settings.tag.clone(),
                );
                let (reset, from_committed) = (settings.reset, settings.from_committed);
                let verdict = tokio::task::spawn_blocking(move || {
                    check_group(&c, &s, &ps, &tag, reset, from_committed)
                })
                .await
                .map_err(|_| String::new());
                match verdict {
                    Err(_) => return Ok(()),
                    Ok(GroupCheck::Clear) => checked = true,
                    // a coordinator that is just starting (NOT_COORDINATOR, LOAD_IN_PROGRESS)
                    // answers after a few tries; one that never does is not waited for
                    Ok(GroupCheck::Unknown(e)) if waited < UNKNOWN_WAIT => {
                        tracing::debug!(error = %e, "cannot read the group's committed offsets yet; retrying");
                        tokio::time::sleep(RETRY).await;
                        continue;
                    }
                    Ok(GroupCheck::Unknown(e)) => {
                        tracing::warn!(error = %e, %group, "cannot read the group's committed offsets; going ahead without checking for another instance on the group");
                        checked = true;
                    }
                    Ok(GroupCheck::Busy(other)) if waited >= settings.wait => {
                        return Err(format!(
                            "another instance is consuming consumer group {group:?}: store {} ({}) committed offsets {} ms ago; with state.scope: instance only one instance may read a group. Waited {} s (checkpoint.lock_wait); stop the other instance or give this one its own kafka.group_id",
                            other.store,
                            other.instance,
                            crate::clock::epoch_ms() - other.at_ms,
                            waited.as_secs()
                        ));
                    }
                    Ok(GroupCheck::Busy(other)) => {
                        if log_due() {
                            tracing::warn!(%group, other_store = %other.store, other_instance = %other.instance, waited_s = waited.as_secs(), limit_s = settings.wait.as_secs(), "another instance committed to the consumer group recently; waiting for it to stop");
                        }
                        tokio::time::sleep(RETRY).await;
                        continue;
                    }
                    Ok(GroupCheck::Members(e)) if waited >= settings.wait => {
                        return Err(format!(
                            "consumer group {group:?} has active members (an instance with state.scope: partition, a member whose session has not expired yet, or another consumer subscribed with this group id): with state.scope: instance this instance reads every partition itself and would double the output. Waited {} s (checkpoint.lock_wait); stop them, or give this instance its own kafka.group_id ({e})",
                            waited.as_secs()
                        ));
                    }
                    Ok(GroupCheck::Members(e)) => {
                        if log_due() {
                            tracing::warn!(%group, error = %e, waited_s = waited.as_secs(), limit_s = settings.wait.as_secs(), "the consumer group has active members; waiting for them to leave (a stopped static member leaves when its session expires)");
                        }
                        tokio::time::sleep(RETRY).await;
                        continue;
                    }
                }
            }
            if !new.is_empty() {
                known.extend(new.iter().cloned());
                shared.push(Rebalance::Assign(new));
            }
            next_discovery = if settings.discovery_interval.is_zero() && missing.is_empty() {
                Instant::now() + Duration::from_secs(u32::MAX as u64)
            } else if settings.discovery_interval.is_zero() {
                Instant::now() + Duration::from_secs(10)
            } else {
                Instant::now() + settings.discovery_interval
            };
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        if Instant::now() < next_beat {
            continue;
        }
        next_beat = Instant::now() + HEARTBEAT;
        let (c, s, tag) = (consumer.clone(), shared.clone(), settings.tag.clone());
        let ps: Vec<Partition> = known.iter().cloned().collect();
        match tokio::task::spawn_blocking(move || heartbeat(&c, &s, &ps, &tag)).await {
            Err(_) => return Ok(()),
            Ok(Beat::Fine) => {}
            Ok(Beat::Rival(other, true)) => {
                return Err(format!(
                    "another instance reads consumer group {group:?} too: store {} ({}), run {}, started {} ms before this one and committed offsets after this one started; with state.scope: instance only one instance may read a group, and the one that started later stops. Stop one of them for good, or give each its own kafka.group_id",
                    other.store,
                    other.instance,
                    other.run,
                    settings.tag.since_ms - other.since_ms
                ));
            }
            Ok(Beat::Rival(other, false)) => {
                if log_due() {
                    tracing::warn!(%group, other_store = %other.store, other_instance = %other.instance, other_run = %other.run, "another instance that started after this one reads the consumer group too; it stops at its next heartbeat");
                }
            }
            Ok(Beat::Members(e)) => {
                return Err(format!(
                    "consumer group {group:?} has active members now (an instance with state.scope: partition, or another consumer subscribed with this group id), and this instance, with state.scope: instance, reads every partition without membership: the output would double, so it stops ({e})"
                ));
            }
        }
    }
}
