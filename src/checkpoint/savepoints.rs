//! Limits on the savepoints operators ask for (pure): one at a time, at most
//! `checkpoint.savepoints_per_minute`, queued behind checkpoints in flight up to
//! `checkpoint.max_concurrent` ([`SavepointGate`]); and which unnamed savepoints to let go so
//! that at most `checkpoint.retained_unnamed_savepoints` stay ([`unnamed_to_drop`]). A
//! savepoint is unnamed when it was taken without a name: it is then called
//! `savepoint-<checkpoint id>`, a form given names may not take. Named savepoints stay until
//! deleted.

use std::collections::VecDeque;
use std::time::Duration;

use crate::checkpoint_id::CheckpointId;

use super::choice::validate_savepoint_name;

const UNNAMED_PREFIX: &str = "savepoint-";

/// The span the per-minute limit counts over.
const MINUTE: Duration = Duration::from_secs(60);

/// The name of an unnamed savepoint taken as checkpoint `id`.
pub fn unnamed_name(id: CheckpointId) -> String {
    format!("{UNNAMED_PREFIX}{}", id.0)
}

/// The checkpoint id of an unnamed savepoint's name; `None` for a given name.
pub fn unnamed_id(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(UNNAMED_PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Checks a name given by an operator: valid, and not of the form unnamed savepoints take.
pub fn check_given_name(name: &str) -> Result<(), String> {
    validate_savepoint_name(name)?;
    if unnamed_id(name).is_some() {
        return Err(format!(
            "savepoint name {name:?} has the form of unnamed savepoints ({UNNAMED_PREFIX}<checkpoint id>), which are removed once more than checkpoint.retained_unnamed_savepoints exist; choose another name, or give none"
        ));
    }
    Ok(())
}

/// The unnamed savepoints among `savepoints` (name, creation time) beyond the newest `keep`
/// (by creation time, then checkpoint id), oldest first: the ones to delete. Those named in
/// `protected` (the one just taken, the one `checkpoint.restore_from` names) are never among
/// them.
pub fn unnamed_to_drop(
    savepoints: &[(String, i64)],
    keep: usize,
    protected: &[String],
) -> Vec<String> {
    let mut unnamed: Vec<(i64, u64, &String)> = savepoints
        .iter()
        .filter_map(|(n, created)| unnamed_id(n).map(|id| (*created, id, n)))
        .collect();
    // newest first
    unnamed.sort_by(|a, b| b.cmp(a));
    let mut drop: Vec<String> = unnamed
        .into_iter()
        .skip(keep)
        .map(|(_, _, n)| n.clone())
        .filter(|n| !protected.contains(n))
        .collect();
    drop.reverse();
    drop
}

/// What happens to a savepoint an operator asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Take it now.
    Now,
    /// Take it once a checkpoint in flight completed (`checkpoint.max_concurrent`).
    Queued,
    /// Refused; the operator may ask again after `retry_after`.
    Refused {
        reason: String,
        retry_after: Duration,
    },
}

/// Decides on the savepoints operators ask for; remembers when it admitted them.
#[derive(Debug)]
pub struct SavepointGate {
    per_minute: usize,
    /// When the savepoints of the last minute were admitted, oldest first.
    admitted: VecDeque<Duration>,
}

impl SavepointGate {
    pub fn new(per_minute: u32) -> Self {
        SavepointGate {
            per_minute: per_minute.max(1) as usize,
            admitted: VecDeque::new(),
        }
    }

    /// A savepoint asked for at `now`: `busy` says another one is queued or being taken,
    /// `slot_free` that fewer checkpoints than `checkpoint.max_concurrent` are in flight.
    pub fn admit(&mut self, now: Duration, busy: bool, slot_free: bool) -> Admission {
        if busy {
            return Admission::Refused {
                reason: "a savepoint is already being taken; ask again once it is durable"
                    .to_string(),
                retry_after: Duration::from_secs(1),
            };
        }
        while self
            .admitted
            .front()
            .is_some_and(|&t| now.saturating_sub(t) >= MINUTE)
        {
            self.admitted.pop_front();
        }
        if self.admitted.len() >= self.per_minute {
            let oldest = self.admitted.front().copied().unwrap_or(now);
            return Admission::Refused {
                reason: format!(
                    "{} savepoints were taken in the last minute, the most checkpoint.savepoints_per_minute allows",
                    self.admitted.len()
                ),
                retry_after: (oldest + MINUTE).saturating_sub(now).max(Duration::from_secs(1)),
            };
        }
        self.admitted.push_back(now);
        if slot_free {
            Admission::Now
        } else {
            Admission::Queued
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn one_at_a_time_and_at_most_the_configured_number_a_minute() {
        let mut gate = SavepointGate::new(2);
        assert_eq!(gate.admit(s(0), false, true), Admission::Now);
        // while it is being taken
        assert!(matches!(
            gate.admit(s(1), true, true),
            Admission::Refused { .. }
        ));
        assert_eq!(gate.admit(s(10), false, true), Admission::Now);
        // the third within the minute: refused until the first is a minute old
        match gate.admit(s(20), false, true) {
            Admission::Refused {
                reason,
                retry_after,
            } => {
                assert!(
                    reason.contains("checkpoint.savepoints_per_minute"),
                    "{reason}"
                );
                assert_eq!(retry_after, s(40));
            }
            other => panic!("{other:?}"),
        }
        // refusals do not count
        assert_eq!(gate.admit(s(60), false, true), Admission::Now);
        assert!(matches!(
            gate.admit(s(61), false, true),
            Admission::Refused { .. }
        ));
        assert_eq!(gate.admit(s(70), false, true), Admission::Now);
    }

    #[test]
    fn a_savepoint_waits_for_a_free_slot_behind_checkpoints_in_flight() {
        let mut gate = SavepointGate::new(6);
        assert_eq!(gate.admit(s(0), false, false), Admission::Queued);
    }

    #[test]
    fn unnamed_savepoints_beyond_the_newest_kept_are_dropped_oldest_first() {
        let all: Vec<(String, i64)> = [
            ("savepoint-12", 1_200),
            ("before-upgrade", 50),
            ("savepoint-3", 300),
            ("savepoint-100", 10_000),
            ("savepoint-7", 700),
            ("savepoint-x", 1),
            ("savepoint-", 2),
        ]
        .map(|(n, t)| (n.to_string(), t))
        .to_vec();
        assert_eq!(
            unnamed_to_drop(&all, 2, &[]),
            vec!["savepoint-3".to_string(), "savepoint-7".to_string()]
        );
        assert!(unnamed_to_drop(&all, 4, &[]).is_empty());
        assert_eq!(unnamed_to_drop(&all, 0, &[]).len(), 4);
        // protected ones stay, whatever their age
        assert_eq!(
            unnamed_to_drop(&all, 2, &["savepoint-3".to_string()]),
            vec!["savepoint-7".to_string()]
        );
    }

    #[test]
    fn age_decides_not_the_id_in_the_name() {
        // imported from a store whose ids ran higher: older, though its id is larger
        let all: Vec<(String, i64)> = [
            ("savepoint-900", 100),
            ("savepoint-5", 200),
            ("savepoint-6", 300),
        ]
        .map(|(n, t)| (n.to_string(), t))
        .to_vec();
        assert_eq!(
            unnamed_to_drop(&all, 2, &["savepoint-6".to_string()]),
            vec!["savepoint-900".to_string()]
        );
    }

    #[test]
    fn given_names_may_not_take_the_form_of_unnamed_ones() {
        assert_eq!(unnamed_name(CheckpointId(42)), "savepoint-42");
        assert_eq!(unnamed_id("savepoint-42"), Some(42));
        assert!(check_given_name("savepoint-42").is_err());
        assert!(check_given_name("before-upgrade").is_ok());
        assert!(check_given_name("savepoint-v2").is_ok());
        assert!(check_given_name(".hidden").is_err());
    }
}
