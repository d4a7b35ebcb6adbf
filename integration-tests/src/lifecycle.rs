//! Helpers for the checkpoint lifecycle tests (retention, on_cancel, savepoints, restore
//! choice, export/import, damaged stores).
//!
//! The tests hold every window open until the end: `max_out_of_orderness` is an hour and the
//! input spans minutes of event time, so nothing is emitted before the sentinels arrive. Every
//! checkpoint then holds the aggregates of exactly the records before its offsets, and
//! restoring *any* checkpoint or savepoint into a fresh output topic must give the model over
//! all input: a restore whose offsets and aggregates do not belong together shows up as wrong
//! counts or sums.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::Value;

use crate::cli::{self, CliOutput};
use crate::metrics::{RECORDS_CONSUMED, RESTORE_INFO};
use crate::model::{expected_windows, Event, WindowResult, WindowSpec};
use crate::verify::{check_output, contains_all, OutputSummary};
use crate::workload::{self, Record, StreamShape, START_TS};
use crate::{unique_name, Broker, OutputReader, Producer, Service, ServiceConfig};

/// Partitions of every lifecycle input topic.
pub const PARTITIONS: usize = 3;
/// `watermark.max_out_of_orderness` of the lifecycle tests: no window closes before the
/// sentinels.
pub const HOLD_WINDOWS: Duration = Duration::from_secs(3600);
/// How far ahead of the newest record the sentinels are: past every window plus
/// [`HOLD_WINDOWS`].
const SENTINEL_AHEAD_MS: i64 = 3 * 3_600_000;
/// Event time between the starts of two batches; a batch spans well under this.
const BATCH_SPACING_MS: i64 = 120_000;

pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
pub const COMPLETE_TIMEOUT: Duration = Duration::from_secs(60);
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);
const CONSUME_TIMEOUT: Duration = Duration::from_secs(30);

/// A service config for the lifecycle tests: windows held open, static membership (a
/// restarted or killed instance gets its partitions back at once), the given interval.
pub fn config(
    broker: &Broker,
    input: &str,
    output: &str,
    name: &str,
    interval: Duration,
) -> ServiceConfig {
    let mut config = ServiceConfig::new(broker, input, output);
    config.checkpoint_interval = interval;
    config.max_out_of_orderness = HOLD_WINDOWS;
    config.instance_id = Some(unique_name(name));
    config
}

/// An input topic and everything produced to it, in batches.
pub struct Input {
    pub topic: String,
    producer: Producer,
    rng: StdRng,
    /// Valid events per partition, in produced order (sentinels not included).
    events: Vec<Vec<Event>>,
    batches: usize,
    sentinels: usize,
}

impl Input {
    /// Creates a fresh topic of [`PARTITIONS`] partitions named after `prefix`.
    pub fn new(broker: &Broker, prefix: &str, seed: u64) -> Result<Self> {
        let topic = unique_name(prefix);
        broker.create_topic(&topic, PARTITIONS as i32)?;
        Ok(Input {
            topic,
            producer: Producer::new(broker)?,
            rng: StdRng::seed_from_u64(seed),
            events: vec![Vec::new(); PARTITIONS],
            batches: 0,
            sentinels: 0,
        })
    }

    /// Produces `per_partition` more valid records to every partition (event time after every
    /// earlier batch) and waits for their delivery; returns how many.
    pub fn batch(&mut self, per_partition: usize) -> Result<usize> {
        ensure!(self.sentinels == 0, "no batch may follow the sentinels");
        let events = workload::generate(
            &mut self.rng,
            StreamShape {
                partitions: PARTITIONS,
                records_per_partition: per_partition,
                keys: 8,
                start_ts: START_TS + self.batches as i64 * BATCH_SPACING_MS,
            },
        );
        ensure!(
            workload::max_ts(&events) < START_TS + (self.batches as i64 + 1) * BATCH_SPACING_MS
        );
        self.batches += 1;
        let records: Vec<Vec<Record>> = events.iter().map(|p| workload::valid_records(p)).collect();
        let sent = self.producer.send_partitions(&self.topic, &records)?;
        for (all, new) in self.events.iter_mut().zip(events) {
            all.extend(new);
        }
        Ok(sent)
    }

    /// Produces one sentinel per partition: every window of the batches closes.
    pub fn sentinels(&mut self) -> Result<()> {
        ensure!(self.sentinels == 0, "sentinels were produced already");
        let ts = workload::max_ts(&self.events) + SENTINEL_AHEAD_MS;
        let records: Vec<Vec<Record>> = (0..PARTITIONS)
            .map(|_| vec![Record::Valid(workload::sentinel(ts))])
            .collect();
        self.sentinels = self.producer.send_partitions(&self.topic, &records)?;
        Ok(())
    }

    /// Valid records produced so far.
    pub fn valid(&self) -> usize {
        self.events.iter().map(Vec::len).sum()
    }

    /// Every record produced so far, sentinels included.
    pub fn total(&self) -> usize {
        self.valid() + self.sentinels
    }

    /// The next offset of every partition after the valid records (before the sentinels).
    pub fn offsets(&self) -> BTreeMap<i32, i64> {
        self.events
            .iter()
            .enumerate()
            .map(|(p, events)| (p as i32, events.len() as i64))
            .collect()
    }

    /// The windows of all valid records.
    pub fn expected(&self, windows: &[WindowSpec]) -> BTreeMap<String, WindowResult> {
        let all: Vec<Event> = self.events.iter().flatten().cloned().collect();
        expected_windows(windows, &all)
    }
}

/// Waits until this process has consumed exactly `n` records.
pub fn wait_consumed(service: &Service, n: usize) -> Result<()> {
    service.wait_metrics(&format!("{RECORDS_CONSUMED} = {n}"), CONSUME_TIMEOUT, |m| {
        m.sum(RECORDS_CONSUMED) == Some(n as f64)
    })?;
    Ok(())
}

/// `partition -> next_offset` of a checkpoint record (`/api/checkpoints`, `checkpoints show`);
/// partitions without a position yet (`next_offset: null`) are left out.
pub fn offsets_of(record: &Value) -> Result<BTreeMap<i32, i64>> {
    let partitions = record
        .get("partitions")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("checkpoint record without partitions: {record}"))?;
    let mut out = BTreeMap::new();
    for p in partitions {
        let partition = p.get("partition").and_then(Value::as_i64);
        let next = p.get("next_offset");
        match (partition, next.and_then(Value::as_i64)) {
            (Some(partition), Some(next)) => {
                out.insert(partition as i32, next);
            }
            (Some(_), None) if next.is_some_and(Value::is_null) => {}
            _ => bail!("bad partition entry {p} in {record}"),
        }
    }
    Ok(out)
}

/// `partition -> next` of a savepoint (`/api/savepoints`, `savepoint list`, a 201 answer).
pub fn savepoint_offsets(savepoint: &Value) -> Result<BTreeMap<i32, i64>> {
    let partitions = savepoint
        .pointer("/meta/partitions")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("savepoint without meta.partitions: {savepoint}"))?;
    partitions
        .iter()
        .map(|p| {
            let partition = p.pointer("/partition/partition").and_then(Value::as_i64);
            let next = p.get("next").and_then(Value::as_i64);
            match (partition, next) {
                (Some(partition), Some(next)) => Ok((partition as i32, next)),
                _ => Err(anyhow!("bad partition entry {p} in {savepoint}")),
            }
        })
        .collect()
}

pub fn id_of(record: &Value) -> Result<u64> {
    record
        .get("id")
        .and_then(Value::as_u64)
        .ok_or_else(|| anyhow!("record without a numeric id: {record}"))
}

pub fn str_field<'a>(record: &'a Value, field: &str) -> &'a str {
    record.get(field).and_then(Value::as_str).unwrap_or("")
}

/// Sum of next offsets: how many records a checkpoint covers.
pub fn covered(offsets: &BTreeMap<i32, i64>) -> usize {
    offsets.values().map(|&n| n.max(0) as usize).sum()
}

fn epoch_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// Feeds batches of `per_batch` records per partition, one per checkpoint interval, until the
/// next graceful stop leaves `n` retained checkpoints with pairwise different offsets, none
/// empty: the newest `n - 1` completed checkpoints differ and hold data, the newest of them does
/// not yet cover all that
/// was consumed (so the final checkpoint of the stop differs too), at least `n` checkpoints
/// completed (so retention must drop one at the stop), nothing is in flight, and the next
/// interval checkpoint is not about to start. The service must have read the topic from the
/// start in this process.
pub fn feed_until_distinct(
    service: &Service,
    input: &mut Input,
    n: usize,
    per_batch: usize,
) -> Result<()> {
    let interval = i64::try_from(service.config().checkpoint_interval.as_millis())?;
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut newest_seen: Option<u64> = None;
    loop {
        input.batch(per_batch)?;
        wait_consumed(service, input.valid())?;
        let attempts: Vec<Value> = service
            .api_checkpoints(100)?
            .into_iter()
            .filter(|r| str_field(r, "kind") == "checkpoint")
            .collect();
        let completed: Vec<&Value> = attempts
            .iter()
            .filter(|r| str_field(r, "status") == "completed")
            .collect();
        let offsets = completed
            .iter()
            .take(n.saturating_sub(1))
            .map(|r| offsets_of(r))
            .collect::<Result<Vec<_>>>()?;
        let newest = attempts.first();
        let quiet = newest.is_some_and(|r| {
            str_field(r, "status") == "completed"
                && r.get("trigger_time")
                    .and_then(Value::as_i64)
                    .is_some_and(|t| epoch_ms() - t < interval - 700)
        });
        let distinct = offsets.iter().collect::<BTreeSet<_>>().len() == offsets.len()
            && offsets.iter().all(|o| covered(o) > 0);
        let behind = offsets.first().is_some_and(|o| covered(o) < input.valid());
        if quiet && completed.len() >= n && distinct && behind {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "no moment to stop with {n} distinct checkpoints after {} batches; attempts:\n{}",
                input.batches,
                serde_json::to_string_pretty(&attempts).unwrap_or_default()
            );
        }
        // the next batch goes right after the next checkpoint
        newest_seen = newest_seen.max(completed.first().map(|r| id_of(r)).transpose()?);
        let after = newest_seen;
        let next = crate::poll_until(
            "the next completed checkpoint",
            service.config().checkpoint_interval * 3 + Duration::from_secs(10),
            Duration::from_millis(50),
            || {
                let attempts = service.api_checkpoints(5)?;
                let newest = attempts
                    .iter()
                    .filter(|r| str_field(r, "status") == "completed")
                    .map(id_of)
                    .collect::<Result<Vec<_>>>()?
                    .into_iter()
                    .max();
                Ok(newest.filter(|id| Some(*id) > after))
            },
        )?;
        newest_seen = Some(next);
    }
}

/// Checks `checkpointer_restore_info`: `kind`, and if given the checkpoint id and savepoint.
pub fn expect_restored(
    service: &Service,
    kind: &str,
    checkpoint_id: Option<u64>,
    savepoint: Option<&str>,
) -> Result<BTreeMap<String, String>> {
    let info = service.scrape()?.info(RESTORE_INFO)?;
    let label = |name: &str| info.get(name).map(String::as_str).unwrap_or("");
    ensure!(
        label("kind") == kind,
        "restored kind {:?}, expected {kind:?}: {info:?}",
        label("kind")
    );
    if let Some(id) = checkpoint_id {
        ensure!(
            label("checkpoint_id") == id.to_string(),
            "restored checkpoint id {:?}, expected {id}: {info:?}",
            label("checkpoint_id")
        );
    }
    if let Some(name) = savepoint {
        ensure!(
            label("savepoint") == name,
            "restored savepoint {:?}, expected {name:?}: {info:?}",
            label("savepoint")
        );
    }
    Ok(info)
}

/// Reads `output` until every expected window is there, then checks it is exactly the model
/// with no window sent twice; returns the messages as `(key, payload)`.
pub fn expect_output(
    broker: &Broker,
    service: &Service,
    output: &str,
    expected: &BTreeMap<String, WindowResult>,
) -> Result<(OutputSummary, BTreeMap<String, Vec<u8>>)> {
    let mut reader = OutputReader::new(broker, output)?;
    let complete = reader.poll_until(COMPLETE_TIMEOUT, |m| contains_all(expected, m));
    reader.drain(Duration::from_millis(500), Duration::from_secs(10));
    let summary = check_output(expected, reader.messages()).map_err(|err| {
        anyhow!(
            "{err:#}\n(output {output} complete: {complete})\n{}",
            service.log_tail(30)
        )
    })?;
    ensure!(
        summary.duplicates == 0,
        "{} windows sent twice to {output} without any crash",
        summary.duplicates
    );
    let by_key = reader
        .messages()
        .iter()
        .map(|m| (m.key.clone(), m.payload.clone()))
        .collect();
    Ok((summary, by_key))
}

/// `checkpointer checkpoints list --dir DIR --json` as it ran (exit status not checked).
pub fn run_list_checkpoints(dir: &Path) -> Result<CliOutput> {
    cli::run(args(
        &["checkpoints", "list", "--dir"],
        &[dir.as_os_str(), "--json".as_ref()],
    ))
}

/// `checkpointer checkpoints list --dir DIR --json`, which must succeed: `(retained ids oldest
/// first, records newest first)`.
pub fn list_checkpoints(dir: &Path) -> Result<(Vec<u64>, Vec<Value>)> {
    let list = run_list_checkpoints(dir)?.ok()?.json()?;
    let retained = list
        .get("retained")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("no retained list: {list}"))?
        .iter()
        .map(|v| {
            v.as_u64()
                .ok_or_else(|| anyhow!("retained id {v} is not a number"))
        })
        .collect::<Result<Vec<_>>>()?;
    let records = list
        .get("checkpoints")
        .and_then(Value::as_array)
        .cloned()
        .ok_or_else(|| anyhow!("no checkpoints list: {list}"))?;
    Ok((retained, records))
}

/// `checkpointer savepoint export NAME --out FILE --dir DIR`, which must succeed.
pub fn export_savepoint(dir: &Path, name: &str, file: &Path) -> Result<()> {
    let tail = [file.as_os_str(), "--dir".as_ref(), dir.as_os_str()];
    cli::run(args(&["savepoint", "export", name, "--out"], &tail))?.ok()?;
    Ok(())
}

/// `checkpointer savepoint import FILE --dir DIR [--name NAME]` as it ran (exit status not
/// checked: damaged files must be refused).
pub fn import_savepoint(file: &Path, dir: &Path, name: Option<&str>) -> Result<CliOutput> {
    let mut tail = vec![file.as_os_str(), "--dir".as_ref(), dir.as_os_str()];
    if let Some(name) = name {
        tail.extend([OsStr::new("--name"), OsStr::new(name)]);
    }
    cli::run(args(&["savepoint", "import"], &tail))
}

/// `checkpointer savepoint delete NAME --dir DIR` (offline), which must succeed.
pub fn delete_savepoint_offline(dir: &Path, name: &str) -> Result<()> {
    cli::run(args(
        &["savepoint", "delete", name, "--dir"],
        &[dir.as_os_str()],
    ))?
    .ok()?;
    Ok(())
}

fn args(words: &[&str], tail: &[&OsStr]) -> Vec<OsString> {
    words
        .iter()
        .map(OsString::from)
        .chain(tail.iter().map(OsString::from))
        .collect()
}

/// `checkpointer checkpoints show ID --dir DIR`: `{"checkpoint", "retained", "entries"}`.
pub fn show_checkpoint(dir: &Path, id: u64) -> Result<Value> {
    let id = id.to_string();
    cli::run(args(
        &["checkpoints", "show", &id, "--dir"],
        &[dir.as_os_str()],
    ))?
    .ok()?
    .json()
}

/// `checkpointer savepoint list --dir DIR`, as a list of savepoints (accepts a bare list or
/// `{"savepoints": [...]}`).
pub fn list_savepoints(dir: &Path) -> Result<Vec<Value>> {
    let out = cli::run(args(&["savepoint", "list", "--dir"], &[dir.as_os_str()]))?.ok()?;
    let value = out.json()?;
    let list = match &value {
        Value::Array(items) => items.clone(),
        other => other
            .get("savepoints")
            .and_then(Value::as_array)
            .cloned()
            .ok_or_else(|| {
                anyhow!("savepoint list is neither a list nor {{savepoints}}: {value}")
            })?,
    };
    Ok(list)
}

/// Which part of a checkpoint [`corrupt_checkpoint`] damaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Damaged {
    /// This many state versions written by the checkpoint.
    Versions(usize),
    /// Its metadata (it wrote no state version).
    Metadata,
}

/// Damages checkpoint `id` in the sled store at `dir` (the service must be stopped): flips the
/// first payload byte (after the 4-byte CRC) of every state version it wrote
/// (`ver/<key><id BE>`), or of its metadata `cp/<id BE>` when it wrote none.
pub fn corrupt_checkpoint(dir: &Path, id: u64) -> Result<Damaged> {
    let db = sled::Config::new()
        .path(dir)
        .open()
        .with_context(|| format!("opening {} with sled", dir.display()))?;
    let tree = db.open_tree("checkpoints")?;
    let suffix = id.to_be_bytes();
    let mut damaged = 0;
    for item in tree.scan_prefix(b"ver/") {
        let (key, value) = item?;
        if key.len() >= 4 + 8 && key[key.len() - 8..] == suffix {
            tree.insert(&key, flip_payload(&value)?)?;
            damaged += 1;
        }
    }
    let result = if damaged > 0 {
        Damaged::Versions(damaged)
    } else {
        let mut key = b"cp/".to_vec();
        key.extend_from_slice(&suffix);
        let value = tree
            .get(&key)?
            .ok_or_else(|| anyhow!("checkpoint {id} has no metadata in {}", dir.display()))?;
        tree.insert(&key, flip_payload(&value)?)?;
        Damaged::Metadata
    };
    db.flush()?;
    Ok(result)
}

fn flip_payload(value: &[u8]) -> Result<Vec<u8>> {
    ensure!(
        value.len() > 4,
        "value of {} bytes has no payload",
        value.len()
    );
    let mut out = value.to_vec();
    out[4] ^= 0xff;
    Ok(out)
}
