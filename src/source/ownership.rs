//! Who reads a consumer group with `state.scope: instance` (pure): every offset commit carries
//! a [`CommitTag`] naming the store and the run that made it, and these rules read the tags
//! found in the group.
//!
//! - At start, a commit by another store younger than [`LIVE_WITHIN`] means another instance is
//!   running on the group ([`live_other`]): the start waits for it to stop.
//! - While running, a commit by another run made after this run started means a second process
//!   reads the group now ([`rival`]), even one on a copy of this store; of the two, the one that
//!   started later stops ([`yields`]).

use std::time::Duration;

/// A commit by another store younger than this means that instance is alive.
pub const LIVE_WITHIN: Duration = Duration::from_secs(30);
/// How far two hosts' clocks may disagree: a commit stamped less than this after a run started
/// may be the last one of a process that stopped before it (on a host whose clock is ahead).
pub const CLOCK_SLACK: Duration = Duration::from_secs(5);

/// Who made a commit, written as its metadata:
/// `checkpointer store=ID run=ID since=MS at=MS instance=NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitTag {
    /// The store's identity (`store.id` in the checkpoint directory).
    pub store: String,
    /// This process's run (a new one at every start).
    pub run: String,
    /// Unix milliseconds at which this run started.
    pub since_ms: i64,
    /// Unix milliseconds of the commit.
    pub at_ms: i64,
    /// `kafka.instance_id`, else the host name (white space replaced by `_`).
    pub instance: String,
}

impl CommitTag {
    pub fn encode(&self) -> String {
        let instance: String = self
            .instance
            .chars()
            .map(|c| if c.is_whitespace() { '_' } else { c })
            .collect();
        format!(
            "checkpointer store={} run={} since={} at={} instance={instance}",
            self.store, self.run, self.since_ms, self.at_ms
        )
    }

    /// `None` for metadata this service did not write.
    pub fn parse(text: &str) -> Option<CommitTag> {
        let mut words = text.split_whitespace();
        if words.next()? != "checkpointer" {
            return None;
        }
        let mut tag = CommitTag {
            store: String::new(),
            run: String::new(),
            since_ms: 0,
            at_ms: -1,
            instance: String::new(),
        };
        for word in words {
            match word.split_once('=')? {
                ("store", v) => tag.store = v.to_string(),
                ("run", v) => tag.run = v.to_string(),
                ("since", v) => tag.since_ms = v.parse().ok()?,
                ("at", v) => tag.at_ms = v.parse().ok()?,
                ("instance", v) => tag.instance = v.to_string(),
                _ => {}
            }
        }
        (!tag.store.is_empty() && tag.at_ms >= 0).then_some(tag)
    }
}

/// The newest commit by a store other than `mine`'s younger than [`LIVE_WITHIN`] at `now_ms`:
/// another live instance on the same group.
pub fn live_other<'a>(
    tags: impl IntoIterator<Item = &'a CommitTag>,
    mine: &CommitTag,
    now_ms: i64,
) -> Option<&'a CommitTag> {
    let live = LIVE_WITHIN.as_millis() as i64;
    tags.into_iter()
        .filter(|t| t.store != mine.store && now_ms - t.at_ms < live)
        .max_by_key(|t| t.at_ms)
}

/// A commit by another run made after `mine` started (by more than [`CLOCK_SLACK`]): a second
/// process reads the group now (an earlier run of this store stopped before this one started).
pub fn rival<'a>(
    tags: impl IntoIterator<Item = &'a CommitTag>,
    mine: &CommitTag,
) -> Option<&'a CommitTag> {
    let after = mine.since_ms + CLOCK_SLACK.as_millis() as i64;
    tags.into_iter()
        .filter(|t| t.run != mine.run && t.at_ms > after)
        .max_by_key(|t| t.at_ms)
}

/// Whether `mine` stops for `other`: the run that started later does (ties by run id), so of
/// two instances that see each other exactly one stops.
pub fn yields(mine: &CommitTag, other: &CommitTag) -> bool {
    (mine.since_ms, &mine.run) > (other.since_ms, &other.run)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(store: &str, run: &str, since_ms: i64, at_ms: i64) -> CommitTag {
        CommitTag {
            store: store.into(),
            run: run.into(),
            since_ms,
            at_ms,
            instance: "pod-0".into(),
        }
    }

    #[test]
    fn a_tag_survives_its_encoding_and_foreign_metadata_is_ignored() {
        let t = tag("a1b2", "r1", 1_700_000_000_000, 1_700_000_000_123);
        assert_eq!(CommitTag::parse(&t.encode()), Some(t));
        let spaced = CommitTag {
            instance: "my pod".into(),
            ..tag("s", "r", 1, 2)
        };
        assert_eq!(
            CommitTag::parse(&spaced.encode()).map(|t| t.instance),
            Some("my_pod".to_string())
        );
        assert_eq!(CommitTag::parse(""), None);
        assert_eq!(CommitTag::parse("some other tool"), None);
        assert_eq!(CommitTag::parse("checkpointer at=5"), None);
        assert_eq!(CommitTag::parse("checkpointer store=x at=soon"), None);
    }

    #[test]
    fn only_a_recent_commit_by_another_store_is_a_live_instance_at_start() {
        let now = 1_000_000;
        let live = LIVE_WITHIN.as_millis() as i64;
        let me = tag("mine", "r2", now, now);
        // an earlier run of this very store (a crash a moment ago) is not another instance
        let own = tag("mine", "r1", 0, now - 10);
        let stale = tag("other", "x", 0, now - live);
        assert_eq!(live_other([&own, &stale], &me, now), None);
        let fresh = tag("other", "x", 0, now - live + 1);
        let newest = tag("third", "y", 0, now - 5);
        assert_eq!(
            live_other([&own, &stale, &fresh, &newest], &me, now),
            Some(&newest)
        );
    }

    #[test]
    fn a_commit_by_another_run_after_this_one_started_is_a_rival_and_the_later_start_yields() {
        let slack = CLOCK_SLACK.as_millis() as i64;
        let me = tag("mine", "r2", 1_000, 5_000);
        let before = tag("mine", "r1", 0, 999);
        // the last commit of a run that stopped, stamped by a clock a little ahead
        let skewed = tag("mine", "r1", 0, 1_000 + slack);
        assert_eq!(rival([&before, &skewed, &me], &me), None);
        // a copy of this store, committing while this run reads
        let copy = tag("mine", "r3", 2_000, 1_001 + slack);
        assert_eq!(rival([&before, &copy], &me), Some(&copy));
        assert!(!yields(&me, &copy));
        assert!(yields(&copy, &me));
        let other_store = tag("other", "r9", 500, 1_500);
        assert!(yields(&me, &other_store));
        let tie = tag("other", "r1", 1_000, 1_500);
        assert!(yields(&me, &tie) != yields(&tie, &me));
    }
}
