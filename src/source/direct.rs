//! Direct assignment, for `state.scope: instance`: one instance owns every partition of its
//! topics, so it needs no consumer-group membership (Flink's Kafka source works the same way).
//! A restart consumes again as soon as it has restored, instead of waiting for the dead
//! member's session to expire.
//!
//! A background task finds the topics' partitions (at start, then every
//! `kafka.partition_discovery_interval`) and hands new ones to the processing loop as
//! assignments. Offsets are still committed to `group_id` after every durable checkpoint, and
//! the last ones again every few seconds (a heartbeat), each commit tagged with the store that
//! made it ([`CommitTag`]), so lag tools see progress and a second instance can be detected:
//!
//! - at start, before anything is assigned, the group's committed offsets are read: one
//!   committed by another store within [`LIVE_WITHIN`] means another instance is running on
//!   the same group. The start waits for its commits to stop (up to `checkpoint.lock_wait`,
//!   logged), then gives up;
//! - a commit of the held positions follows: the broker refuses it when the group has active
//!   members (an instance with `state.scope: partition`, or any subscribed consumer), and the
//!   start is refused.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use super::{Rebalance, Shared, Source};
use crate::position::{NextOffset, Partition};

/// A commit by another store younger than this means that instance is alive.
pub const LIVE_WITHIN: Duration = Duration::from_secs(30);
/// How often the last committed offsets are committed again (the heartbeat others see).
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// Bound on one metadata or offset request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Between attempts while the brokers do not answer.
const RETRY: Duration = Duration::from_secs(1);
/// How long the start retries reading the group's committed offsets before it goes ahead
/// without the check.
const UNKNOWN_WAIT: Duration = Duration::from_secs(15);

/// Who made a commit: written as the commit's metadata, `checkpointer store=ID at=MS
/// instance=NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitTag {
    /// The store's identity (`store.id` in the checkpoint directory).
    pub store: String,
    /// Unix milliseconds of the commit.
    pub at_ms: i64,
    /// `kafka.instance_id`, else the host name.
    pub instance: String,
}

impl CommitTag {
    pub fn encode(&self) -> String {
        format!(
            "checkpointer store={} at={} instance={}",
            self.store, self.at_ms, self.instance
        )
    }

    /// `None` for metadata this service did not write.
    pub fn parse(text: &str) -> Option<CommitTag> {
        let mut words = text.split_whitespace();
        if words.next()? != "checkpointer" {
            return None;
        }
        let (mut store, mut at, mut instance) = (None, None, None);
        for word in words {
            match word.split_once('=')? {
                ("store", v) => store = Some(v.to_string()),
                ("at", v) => at = v.parse().ok(),
                ("instance", v) => instance = Some(v.to_string()),
                _ => {}
            }
        }
        Some(CommitTag {
            store: store?,
            at_ms: at?,
            instance: instance.unwrap_or_default(),
        })
    }
}

/// The newest commit, among `tags`, by a store other than `mine` younger than [`LIVE_WITHIN`]
/// at `now_ms`: another live instance on the same group.
pub fn live_other<'a>(
    tags: impl IntoIterator<Item = &'a CommitTag>,
    mine: &str,
    now_ms: i64,
) -> Option<&'a CommitTag> {
    let live = LIVE_WITHIN.as_millis() as i64;
    tags.into_iter()
        .filter(|t| t.store != mine && now_ms - t.at_ms < live)
        .max_by_key(|t| t.at_ms)
}

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
    /// The group's offsets could not be read (the coordinator is not ready yet): try again.
    Unknown(KafkaError),
    /// Not to be started: the reason.
    Refused(String),
}

fn check_group(
    consumer: &Source,
    shared: &Shared,
    partitions: &[Partition],
    tag: &CommitTag,
    group: &str,
) -> GroupCheck {
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition(&p.topic, p.partition);
    }
    let committed = match consumer.committed_offsets(tpl, REQUEST_TIMEOUT) {
        Ok(c) => c,
        Err(e) => return GroupCheck::Unknown(e),
    };
    let tags: Vec<CommitTag> = committed
        .elements()
        .iter()
        .filter_map(|e| CommitTag::parse(e.metadata()))
        .collect();
    if let Some(other) = live_other(&tags, &tag.store, crate::clock::epoch_ms()) {
        return GroupCheck::Busy(other.clone());
    }
    // commit what this instance resumes from (or, where it holds nothing, what the group has):
    // the broker refuses a commit without membership while the group has members
    let held = shared.positions_snapshot();
    let mut probe = Vec::new();
    for e in committed.elements() {
        let p = Partition::new(e.topic(), e.partition());
        let next = match (held.get(&p), e.offset()) {
            (Some(next), _) => *next,
            (None, Offset::Offset(o)) if o >= 0 => NextOffset(o),
            _ => continue,
        };
        probe.push((p, next));
    }
    if probe.is_empty() {
        return GroupCheck::Clear;
    }
    match commit_tagged(consumer, &probe, tag, CommitMode::Sync) {
        Err(e) if membership_error(&e) => GroupCheck::Refused(format!(
            "consumer group {group:?} has active members (an instance with state.scope: partition, or another consumer subscribed to it): with state.scope: instance this instance reads every partition itself and would double the output; stop them, or give this instance its own kafka.group_id ({e})"
        )),
        Err(e) => {
            tracing::warn!(error = %e, group, "offset commit at start failed (advisory)");
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
    /// How long the start waits for another instance's commits to stop.
    pub wait: Duration,
}

/// Runs discovery, the start-up group check and the commit heartbeat until the consumer goes.
pub fn spawn(consumer: Arc<Source>, shared: Arc<Shared>, settings: DirectSettings) {
    tokio::spawn(async move {
        let mut known: BTreeSet<Partition> = BTreeSet::new();
        // when the start-up check first ran: its waits count from there
        let mut check_started: Option<Instant> = None;
        let mut checked = false;
        let mut next_discovery = Instant::now();
        let mut last_missing_log: Option<Instant> = None;
        let mut last_busy_log: Option<Instant> = None;
        loop {
            if Instant::now() >= next_discovery {
                let c = consumer.clone();
                let topics = settings.topics.clone();
                let found = tokio::task::spawn_blocking(move || discover(&c, &topics)).await;
                let (partitions, missing) = match found {
                    Ok(Ok(found)) => found,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "partition discovery failed; retrying");
                        tokio::time::sleep(RETRY).await;
                        continue;
                    }
                    Err(_) => return,
                };
                if !missing.is_empty()
                    && last_missing_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
                {
                    tracing::warn!(topics = ?missing, "input topics not found (yet); looking for them again at every partition discovery");
                    last_missing_log = Some(Instant::now());
                }
                if !checked {
                    let started = *check_started.get_or_insert_with(Instant::now);
                    let c = consumer.clone();
                    let s = shared.clone();
                    let ps = partitions.clone();
                    let tag = settings.tag.clone();
                    let group = settings.group.clone();
                    let verdict =
                        tokio::task::spawn_blocking(move || check_group(&c, &s, &ps, &tag, &group))
                            .await;
                    match verdict {
                        Ok(GroupCheck::Clear) => checked = true,
                        // a coordinator that is just starting (NOT_COORDINATOR, LOAD_IN_PROGRESS)
                        // answers after a few tries; one that never does is not waited for
                        Ok(GroupCheck::Unknown(e)) if started.elapsed() < UNKNOWN_WAIT => {
                            tracing::debug!(error = %e, "cannot read the group's committed offsets yet; retrying");
                            tokio::time::sleep(RETRY).await;
                            continue;
                        }
                        Ok(GroupCheck::Unknown(e)) => {
                            tracing::warn!(error = %e, group = %settings.group, "cannot read the group's committed offsets; going ahead without checking for another instance on the group");
                            checked = true;
                        }
                        Ok(GroupCheck::Busy(other)) => {
                            let waited = started.elapsed();
                            if waited >= settings.wait {
                                shared.push(Rebalance::Refused(format!(
                                    "another instance is consuming consumer group {:?}: store {} ({}) committed offsets {} ms ago; with state.scope: instance only one instance may run per group. Waited {} s (checkpoint.lock_wait); stop the other instance or give this one its own kafka.group_id",
                                    settings.group,
                                    other.store,
                                    other.instance,
                                    crate::clock::epoch_ms() - other.at_ms,
                                    waited.as_secs()
                                )));
                                return;
                            }
                            if last_busy_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
                            {
                                tracing::warn!(group = %settings.group, other_store = %other.store, other_instance = %other.instance, waited_s = waited.as_secs(), limit_s = settings.wait.as_secs(), "another instance committed to the consumer group recently; waiting for it to stop");
                                last_busy_log = Some(Instant::now());
                            }
                            tokio::time::sleep(RETRY).await;
                            continue;
                        }
                        Ok(GroupCheck::Refused(reason)) => {
                            shared.push(Rebalance::Refused(reason));
                            return;
                        }
                        Err(_) => return,
                    }
                }
                let new: Vec<Partition> = partitions
                    .into_iter()
                    .filter(|p| !known.contains(p))
                    .collect();
                if !new.is_empty() {
                    if !known.is_empty() {
                        // added while running: nothing of them was read, so from their start
                        shared.start_from_beginning(&new);
                        tracing::info!(partitions = ?new.iter().map(ToString::to_string).collect::<Vec<_>>(), "new partitions discovered; reading them from the beginning");
                    }
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
            tokio::time::sleep(HEARTBEAT.min(Duration::from_secs(1))).await;
            if shared.commit_due(HEARTBEAT) {
                let c = consumer.clone();
                let s = shared.clone();
                let tag = settings.tag.clone();
                let beat = tokio::task::spawn_blocking(move || {
                    let positions = s.committed();
                    commit_tagged(&c, &positions, &tag, CommitMode::Async)
                })
                .await;
                match beat {
                    Ok(Err(e)) => tracing::debug!(error = %e, "heartbeat commit failed (advisory)"),
                    Ok(Ok(())) => {}
                    Err(_) => return,
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(store: &str, at_ms: i64) -> CommitTag {
        CommitTag {
            store: store.into(),
            at_ms,
            instance: "pod-0".into(),
        }
    }

    #[test]
    fn a_tag_survives_its_encoding_and_foreign_metadata_is_ignored() {
        let t = tag("a1b2", 1_700_000_000_123);
        assert_eq!(CommitTag::parse(&t.encode()), Some(t));
        assert_eq!(CommitTag::parse(""), None);
        assert_eq!(CommitTag::parse("some other tool"), None);
        assert_eq!(CommitTag::parse("checkpointer at=5"), None);
    }

    #[test]
    fn only_a_recent_commit_by_another_store_is_a_live_instance() {
        let now = 1_000_000;
        let live = LIVE_WITHIN.as_millis() as i64;
        let own = tag("mine", now - 10);
        let stale = tag("other", now - live);
        assert_eq!(live_other([&own, &stale], "mine", now), None);
        let fresh = tag("other", now - live + 1);
        let newest = tag("third", now - 5);
        assert_eq!(
            live_other([&own, &stale, &fresh, &newest], "mine", now),
            Some(&newest)
        );
    }
}
