//! What to restore at start: `checkpoint.restore_from` and
//! `checkpoint.prefer_checkpoint_for_recovery` applied to what the store holds. Pure: the
//! service reads the candidates in order and falls back only where the plan allows it.

use crate::checkpoint_id::CheckpointId;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// `checkpoint.restore_from`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum RestoreFrom {
    /// The newest complete checkpoint or savepoint, falling back to older ones.
    #[default]
    Latest,
    /// Start empty, whatever the store holds.
    None,
    /// Exactly this retained checkpoint; an error if it cannot be restored.
    Checkpoint(CheckpointId),
    /// Exactly this savepoint; an error if it cannot be restored.
    Savepoint(String),
}

impl FromStr for RestoreFrom {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        match s {
            "latest" => Ok(RestoreFrom::Latest),
            "none" => Ok(RestoreFrom::None),
            _ => {
                if let Some(name) = s.strip_prefix("savepoint:") {
                    validate_savepoint_name(name)?;
                    return Ok(RestoreFrom::Savepoint(name.to_string()));
                }
                s.parse::<CheckpointId>()
                    .map(RestoreFrom::Checkpoint)
                    .map_err(|_| {
                        format!(
                            "{s:?} is not one of latest, none, <checkpoint id>, savepoint:<name>"
                        )
                    })
            }
        }
    }
}

impl fmt::Display for RestoreFrom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RestoreFrom::Latest => write!(f, "latest"),
            RestoreFrom::None => write!(f, "none"),
            RestoreFrom::Checkpoint(id) => write!(f, "{id}"),
            RestoreFrom::Savepoint(name) => write!(f, "savepoint:{name}"),
        }
    }
}

impl Serialize for RestoreFrom {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RestoreFrom {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // YAML may give an id as a number
        let v = serde_json::Value::deserialize(d)?;
        let text = match v {
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n) => n.to_string(),
            other => return Err(serde::de::Error::custom(format!("{other} is not a string"))),
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Savepoint names: 1 to 100 of `A-Z a-z 0-9 . _ -`, not starting with a dot.
pub fn validate_savepoint_name(name: &str) -> Result<(), String> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if name.is_empty() || name.len() > 100 || !ok_chars || name.starts_with('.') {
        return Err(format!(
            "savepoint name {name:?} must be 1 to 100 characters of A-Z a-z 0-9 . _ - and not start with a dot"
        ));
    }
    Ok(())
}

/// Something restorable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestorePoint {
    Checkpoint(CheckpointId),
    Savepoint(String),
}

impl fmt::Display for RestorePoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RestorePoint::Checkpoint(id) => write!(f, "checkpoint {id}"),
            RestorePoint::Savepoint(name) => write!(f, "savepoint {name}"),
        }
    }
}

/// What the store holds: retained checkpoints `(id, trigger time)` and savepoints
/// `(name, time of the checkpoint it was made from)`; times are epoch milliseconds.
#[derive(Debug, Clone, Default)]
pub struct Available {
    pub checkpoints: Vec<(CheckpointId, i64)>,
    pub savepoints: Vec<(String, i64)>,
}

/// The snapshots to try, in order. With `fallback`, an unreadable one is skipped (with a
/// warning) for the next; without, it is an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub candidates: Vec<RestorePoint>,
    pub fallback: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChoiceError {
    #[error("checkpoint.restore_from is {id}, but checkpoint {id} is not retained; retained checkpoints: {retained}")]
    NoSuchCheckpoint { id: CheckpointId, retained: String },
    #[error("checkpoint.restore_from is savepoint:{name}, but there is no savepoint {name:?}; savepoints: {known}")]
    NoSuchSavepoint { name: String, known: String },
}

fn list<T: fmt::Display>(items: impl Iterator<Item = T>) -> String {
    let v: Vec<String> = items.map(|i| i.to_string()).collect();
    if v.is_empty() {
        "none".to_string()
    } else {
        v.join(", ")
    }
}

pub fn plan(
    from: &RestoreFrom,
    prefer_checkpoint: bool,
    available: &Available,
) -> Result<Plan, ChoiceError> {
    match from {
        RestoreFrom::None => Ok(Plan {
            candidates: Vec::new(),
            fallback: false,
        }),
        RestoreFrom::Checkpoint(id) => {
            if available.checkpoints.iter().any(|(c, _)| c == id) {
                Ok(Plan {
                    candidates: vec![RestorePoint::Checkpoint(*id)],
                    fallback: false,
                })
            } else {
                Err(ChoiceError::NoSuchCheckpoint {
                    id: *id,
                    retained: list(available.checkpoints.iter().map(|(c, _)| c)),
                })
            }
        }
        RestoreFrom::Savepoint(name) => {
            if available.savepoints.iter().any(|(n, _)| n == name) {
                Ok(Plan {
                    candidates: vec![RestorePoint::Savepoint(name.clone())],
                    fallback: false,
                })
            } else {
                Err(ChoiceError::NoSuchSavepoint {
                    name: name.clone(),
                    known: list(available.savepoints.iter().map(|(n, _)| n)),
                })
            }
        }
        RestoreFrom::Latest => {
            // newest first; a savepoint and the checkpoint it was made from hold the same
            // state, and the checkpoint goes first on a tie
            // checkpoints are ordered by id whatever the clock did: each counts as at least as
            // recent as every checkpoint before it
            let mut by_id = available.checkpoints.clone();
            by_id.sort_unstable();
            let mut newest = i64::MIN;
            let checkpoints: Vec<(CheckpointId, i64)> = by_id
                .into_iter()
                .map(|(id, t)| {
                    newest = newest.max(t);
                    (id, newest)
                })
                .collect();
            let mut all: Vec<((i64, CheckpointId, u8), RestorePoint)> =
                checkpoints
                    .iter()
                    .map(|(id, t)| ((*t, *id, 1), RestorePoint::Checkpoint(*id)))
                    .chain(available.savepoints.iter().map(|(n, t)| {
                        ((*t, CheckpointId(0), 0), RestorePoint::Savepoint(n.clone()))
                    }))
                    .collect();
            all.sort_by_key(|(order, _)| std::cmp::Reverse(*order));
            let mut candidates: Vec<RestorePoint> = all.into_iter().map(|(_, s)| s).collect();
            if prefer_checkpoint {
                // stable: checkpoints newest first, then savepoints newest first
                candidates.sort_by_key(|s| matches!(s, RestorePoint::Savepoint(_)));
            }
            Ok(Plan {
                candidates,
                fallback: true,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn available() -> Available {
        Available {
            checkpoints: vec![
                (CheckpointId(3), 300),
                (CheckpointId(4), 400),
                (CheckpointId(5), 500),
            ],
            savepoints: vec![("before-upgrade".into(), 450), ("newest".into(), 600)],
        }
    }

    fn names(p: &Plan) -> Vec<String> {
        p.candidates.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn latest_takes_the_newest_of_both_kinds_then_falls_back() {
        let p = plan(&RestoreFrom::Latest, false, &available()).expect("plan");
        assert!(p.fallback);
        assert_eq!(
            names(&p),
            [
                "savepoint newest",
                "checkpoint 5",
                "savepoint before-upgrade",
                "checkpoint 4",
                "checkpoint 3"
            ]
        );
    }

    #[test]
    fn prefer_checkpoint_puts_checkpoints_first_even_when_a_savepoint_is_newer() {
        let p = plan(&RestoreFrom::Latest, true, &available()).expect("plan");
        assert_eq!(
            names(&p),
            [
                "checkpoint 5",
                "checkpoint 4",
                "checkpoint 3",
                "savepoint newest",
                "savepoint before-upgrade"
            ]
        );
        let only_savepoints = Available {
            checkpoints: vec![],
            savepoints: vec![("a".into(), 1)],
        };
        let p = plan(&RestoreFrom::Latest, true, &only_savepoints).expect("plan");
        assert_eq!(names(&p), ["savepoint a"]);
    }

    #[test]
    fn a_savepoint_ties_with_its_checkpoint_and_the_checkpoint_goes_first() {
        let a = Available {
            checkpoints: vec![(CheckpointId(7), 700)],
            savepoints: vec![("sp".into(), 700)],
        };
        let p = plan(&RestoreFrom::Latest, false, &a).expect("plan");
        assert_eq!(names(&p), ["checkpoint 7", "savepoint sp"]);
    }

    #[test]
    fn checkpoints_are_ordered_by_id_even_if_the_clock_went_back() {
        let a = Available {
            checkpoints: vec![(CheckpointId(5), 1000), (CheckpointId(6), 900)],
            savepoints: vec![("between".into(), 950)],
        };
        let p = plan(&RestoreFrom::Latest, false, &a).expect("plan");
        assert_eq!(
            names(&p),
            ["checkpoint 6", "checkpoint 5", "savepoint between"]
        );
    }

    #[test]
    fn a_chosen_snapshot_never_falls_back_and_must_exist() {
        let p = plan(
            &RestoreFrom::Checkpoint(CheckpointId(4)),
            false,
            &available(),
        )
        .expect("plan");
        assert_eq!(
            (names(&p), p.fallback),
            (vec!["checkpoint 4".into()], false)
        );
        let err = plan(
            &RestoreFrom::Checkpoint(CheckpointId(2)),
            false,
            &available(),
        )
        .expect_err("gone");
        assert_eq!(
            err.to_string(),
            "checkpoint.restore_from is 2, but checkpoint 2 is not retained; retained checkpoints: 3, 4, 5"
        );
        let err =
            plan(&RestoreFrom::Savepoint("x".into()), false, &available()).expect_err("unknown");
        assert!(err.to_string().contains("before-upgrade, newest"), "{err}");
        let p = plan(&RestoreFrom::None, false, &available()).expect("plan");
        assert!(p.candidates.is_empty());
    }

    #[test]
    fn restore_from_parses_and_prints_back() {
        for text in ["latest", "none", "42", "savepoint:pre-2.0_rc.1"] {
            let parsed: RestoreFrom = text.parse().expect(text);
            assert_eq!(parsed.to_string(), text);
        }
        assert!("savepoint:a/b".parse::<RestoreFrom>().is_err());
        assert!("savepoint:".parse::<RestoreFrom>().is_err());
        let err = "newest".parse::<RestoreFrom>().expect_err("unknown");
        assert!(err.contains("latest, none"), "{err}");
    }
}
