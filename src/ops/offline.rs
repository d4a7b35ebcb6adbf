//! Commands that read or change a checkpoint directory directly, while the service is stopped
//! (sled allows one process per directory: a running service makes them fail with a clear
//! message). They never create a directory.

use std::path::Path;

use serde_json::json;

use super::OpsError;
use crate::checkpoint::choice::validate_savepoint_name;
use crate::checkpoint::history::{CheckpointRecord, Kind};
use crate::checkpoint::savepoints::check_given_name;
use crate::checkpoint_id::CheckpointId;
use crate::engine::group::DEFAULT_GROUPS;
use crate::position::{NextOffset, Partition};
use crate::store::portable::{self, Portable};
use crate::store::{Open, Store, StoreError};

/// For reading: never changes the store, also not the format of an older one (which is read
/// through a migrated copy), so the build that wrote it can still open it.
fn open(dir: &Path) -> Result<Store, OpsError> {
    Ok(Store::open(dir, Open::Inspect)?)
}

/// For changing it (delete, reset-position): migrates an older format first, with
/// `key_groups` groups per scope if given (else the default).
fn open_for_change(dir: &Path, key_groups: Option<u16>) -> Result<Store, OpsError> {
    Ok(Store::open_migrating(
        dir,
        key_groups.unwrap_or(DEFAULT_GROUPS),
    )?)
}

/// What the command's report adds when it was asked for a key-group count the store does not
/// have (a store keeps the layout it got first); read before the change, so that a change
/// made is never reported as failed.
fn kept_groups(store: &Store, asked: Option<u16>) -> Result<String, OpsError> {
    let Some(asked) = asked else {
        return Ok(String::new());
    };
    let groups = store.layout()?.groups;
    Ok(if asked == groups {
        String::new()
    } else {
        format!(
            "; the store keeps the {groups} key groups it has ({asked} asked for applies only to a store without key groups yet: a new one, or one of a format before 5)"
        )
    })
}

/// `checkpoints list`: the history, newest first, with the retained ones marked.
pub fn list_checkpoints(dir: &Path, limit: usize, as_json: bool) -> Result<String, OpsError> {
    let store = open(dir)?;
    let retained = store.checkpoint_ids()?;
    let records = store.history(None, limit)?;
    if as_json {
        let mut notes = serde_json::Map::new();
        for r in &records {
            if let Some(note) = store.note(r.id)? {
                notes.insert(r.id.to_string(), note.into());
            }
        }
        return Ok(serde_json::to_string_pretty(
            &json!({ "retained": retained, "checkpoints": records, "notes": notes }),
        )?);
    }
    let mut out = format!(
        "{:>8}  {:<24}  {:<10}  {:<24}  {:>9}  {:>10}  {:>9}  {}\n",
        "ID", "KIND", "STATUS", "TRIGGERED (UTC)", "DURATION", "BYTES", "RECORDS", "RETAINED"
    );
    for r in &records {
        out.push_str(&format!(
            "{:>8}  {:<24}  {:<10}  {:<24}  {:>9}  {:>10}  {:>9}  {}\n",
            r.id,
            kind(r),
            r.status.label(),
            utc(r.trigger_time),
            r.duration_ms.map_or("-".into(), |d| format!("{d}ms")),
            r.bytes.map_or("-".into(), |b| b.to_string()),
            r.records,
            if retained.contains(&r.id) { "yes" } else { "" }
        ));
        if let Some(f) = &r.failure {
            out.push_str(&format!("{:>8}  failure: {f}\n", ""));
        }
        if let Some(note) = store.note(r.id)? {
            out.push_str(&format!("{:>8}  note: {note}\n", ""));
        }
    }
    if records.is_empty() {
        out.push_str("no checkpoint attempts recorded\n");
    }
    Ok(out)
}

fn kind(r: &CheckpointRecord) -> String {
    match (&r.kind, &r.savepoint) {
        (Kind::Savepoint, Some(name)) => format!("savepoint {name}"),
        _ => "checkpoint".to_string(),
    }
}

fn utc(ms: i64) -> String {
    humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64),
    )
    .to_string()
}

/// `checkpoints show ID`: one attempt with its offsets and watermarks, as JSON.
pub fn show_checkpoint(dir: &Path, id: CheckpointId) -> Result<String, OpsError> {
    let store = open(dir)?;
    let retained = match store.checkpoint(id) {
        Ok(r) => Some(r),
        Err(StoreError::NoSuchCheckpoint { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    let record = store.attempt(id)?;
    if record.is_none() && retained.is_none() {
        return Err(OpsError::Invalid(format!(
            "no checkpoint {id} in the history of {}",
            dir.display()
        )));
    }
    Ok(serde_json::to_string_pretty(&json!({
        "checkpoint": record,
        "retained": retained.is_some(),
        "entries": retained.as_ref().map(|r| r.live_entries),
        "note": store.note(id)?,
        "spec": retained.map(|r| r.meta.spec),
    }))?)
}

pub fn list_savepoints(dir: &Path) -> Result<String, OpsError> {
    let store = open(dir)?;
    Ok(serde_json::to_string_pretty(
        &json!({ "savepoints": store.savepoints()? }),
    )?)
}

/// `savepoint export NAME --out FILE`.
pub fn export_savepoint(dir: &Path, name: &str, out: &Path) -> Result<String, OpsError> {
    let store = open(dir)?;
    let (meta, entries) = store.read_savepoint(name)?;
    let count = entries.len();
    let bytes = portable::write_file(out, &Portable { meta, entries })?;
    Ok(format!(
        "exported savepoint {name} ({count} entries, {bytes} bytes) to {}",
        out.display()
    ))
}

/// `savepoint import FILE [--name NEW] [--key-groups N]`: creates the directory's store if
/// needed, with `key_groups` groups per scope if given (else the default); the savepoint's
/// state is filed into the store's own groups.
pub fn import_savepoint(
    dir: &Path,
    file: &Path,
    rename: Option<&str>,
    key_groups: Option<u16>,
) -> Result<String, OpsError> {
    let mut sp = portable::read_file(file)?;
    if let Some(name) = rename {
        validate_savepoint_name(name).map_err(OpsError::Invalid)?;
        sp.meta.name = name.to_string();
    }
    // under the name of an unnamed one it would be pruned like one, by age
    check_given_name(&sp.meta.name).map_err(|e| {
        OpsError::Invalid(format!("{e}; import it under another name with --name NEW"))
    })?;
    let mut store = Store::open(dir, Open::AsIs)?;
    if let Some(groups) = key_groups {
        store = store.with_key_groups(groups);
    }
    store.upgrade()?;
    let kept = kept_groups(&store, key_groups)?;
    store.import_savepoint(&sp.meta, &sp.entries)?;
    Ok(format!(
        "imported savepoint {} ({} entries) into {}; start with checkpoint.restore_from: savepoint:{}{kept}",
        sp.meta.name,
        sp.entries.len(),
        dir.display(),
        sp.meta.name,
    ))
}

/// `savepoint delete NAME --dir DIR [--key-groups N]`: an older store is migrated first, with
/// N key groups per scope if given.
pub fn delete_savepoint(
    dir: &Path,
    name: &str,
    key_groups: Option<u16>,
) -> Result<String, OpsError> {
    let store = open_for_change(dir, key_groups)?;
    let kept = kept_groups(&store, key_groups)?;
    store.delete_savepoint(name)?;
    Ok(format!("deleted savepoint {name}{kept}"))
}

/// Where `reset-position --to` moves a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The earliest offset the broker has.
    Earliest,
    /// The offset the next record will get.
    Latest,
    Offset(i64),
}

impl std::str::FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "earliest" => Ok(Target::Earliest),
            "latest" => Ok(Target::Latest),
            n => match n.parse::<i64>() {
                Ok(o) if o >= 0 => Ok(Target::Offset(o)),
                _ => Err(format!(
                    "`{s}` is neither earliest, latest nor an offset (a whole number, 0 or more)"
                )),
            },
        }
    }
}

/// The earliest and latest offsets of a partition, asked of the brokers of `client`.
pub type Watermarks<'a> = &'a dyn Fn(&Partition) -> Result<(i64, i64), String>;

/// `reset-position`: moves one partition's held position in a stopped instance's store (a new
/// checkpoint with the same state, noted in the history). `earliest` and `latest` ask the
/// broker through `watermarks`. An older store is migrated first, with `key_groups` groups
/// per scope if given.
pub fn reset_position(
    dir: &Path,
    partition: &Partition,
    to: Target,
    watermarks: Option<Watermarks<'_>>,
    key_groups: Option<u16>,
) -> Result<String, OpsError> {
    let (offset, why) = match to {
        Target::Offset(o) => (o, format!("--to {o}")),
        Target::Earliest | Target::Latest => {
            let ask = watermarks.ok_or_else(|| {
                OpsError::Invalid(
                    "--to earliest and --to latest ask the broker: give --config (its kafka.brokers and kafka.options)".to_string(),
                )
            })?;
            let (low, high) = ask(partition).map_err(OpsError::Invalid)?;
            let (o, name) = if to == Target::Earliest {
                (low, "earliest")
            } else {
                (high, "latest")
            };
            (
                o,
                format!("--to {name}: the broker had offsets {low} to {high}"),
            )
        }
    };
    let store = open_for_change(dir, key_groups)?;
    let kept = kept_groups(&store, key_groups)?;
    let note = format!("reset-position: the held position of {partition} set to {offset} ({why})");
    let (id, before) = store.reset_position(partition, NextOffset(offset), &note)?;
    let before = before.map_or("none".to_string(), |n| n.0.to_string());
    Ok(format!(
        "moved the held position of {partition} from {before} to {offset} ({why}) in checkpoint {id}; the next start reads {partition} from {offset} (the other partitions and the window state are unchanged){kept}"
    ))
}
