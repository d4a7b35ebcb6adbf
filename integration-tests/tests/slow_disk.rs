//! A checkpoint that times out but is written anyway, on the real binary with a slow disk
//! ([`integration_tests::slow_disk`]: every sync of the process takes longer than
//! `checkpoint.timeout`). Each checkpoint is abandoned at its timeout and then completed by the
//! store; the service records it as completed, never as abandoned. Killed (SIGKILL) while the
//! disk is still slow, the service restarts from such a checkpoint, its history says
//! completed, and the output equals the model: nothing lost, nothing sent twice.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use integration_tests::lifecycle::list_checkpoints;
use integration_tests::metrics::{
    CHECKPOINTS_ABANDONED, CHECKPOINTS_COMPLETED, RECORDS_CONSUMED, RESTORE_INFO,
};
use integration_tests::model::{expected_windows, Event};
use integration_tests::slow_disk::SlowDisk;
use integration_tests::verify::{check_output, contains_all, output_problems};
use integration_tests::workload::{self, StreamShape, START_TS};
use integration_tests::{log_numbers, test_seed, unique_name, Broker, OutputReader, Producer};
use integration_tests::{Service, ServiceConfig};
use rand::rngs::StdRng;
use rand::SeedableRng;

const READY_TIMEOUT: Duration = Duration::from_secs(90);
const COMPLETE_TIMEOUT: Duration = Duration::from_secs(120);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Far longer than `checkpoint.timeout` (1 s).
const SLOW_SYNC: Duration = Duration::from_millis(2_500);
const LATE: &str = "a checkpoint abandoned at checkpoint.timeout was completed afterwards";

#[test]
fn a_checkpoint_written_after_its_timeout_is_completed_and_restorable() {
    let seed = test_seed("slow_disk");
    if let Err(err) = run(seed) {
        panic!("{err:#}\n(seed {seed})");
    }
}

/// The checkpoint ids of the log lines that report a late completion.
fn late_ids(log: &str) -> Vec<u64> {
    log_numbers(log, LATE, "checkpoint_id")
}

fn run(seed: u64) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let broker = Broker::shared()?;
    let input = unique_name("slow-disk-in");
    let output = unique_name("slow-disk-out");
    broker.create_topic(&input, 1)?;
    broker.create_topic(&output, 1)?;
    let mut cfg = ServiceConfig::new(broker, &input, &output);
    cfg.checkpoint_extra.insert("timeout".into(), "1s".into());
    // a checkpoint on this disk takes one slow sync per sync it makes (its pack's and the pack
    // directory's, sled's of its log, and the store's own of the log file before and after the
    // flush: docs/checkpoints.md), six to nine, 15-23 s in all, while the checkpoints
    // triggered meanwhile are abandoned one per second: enough of those are tolerated for the
    // one being written, and the full one after it, to complete
    cfg.checkpoint_extra
        .insert("tolerable_failures".into(), "60".into());
    let control = tempfile::tempdir().context("control dir")?;
    let disk = SlowDisk::attach(
        &mut cfg,
        &control.path().join("sync-delay-ms"),
        Path::new(env!("CARGO_TARGET_TMPDIR")),
    )?;
    let windows = cfg.windows.clone();
    let mut producer = Producer::new(broker)?;
    let mut reader = OutputReader::new(broker, &output)?;
    let shape = |records, start_ts| StreamShape {
        partitions: 1,
        records_per_partition: records,
        keys: 5,
        start_ts,
    };

    // a fast disk first
    let first = workload::generate(&mut rng, shape(300, START_TS));
    let mut produced = producer.send_partitions(&input, &[workload::valid_records(&first[0])])?;
    let mut service = Service::new("slow_disk", cfg)?;
    service.start()?;
    service.wait_ready(READY_TIMEOUT)?;
    service.wait_metrics("the first records checkpointed", COMPLETE_TIMEOUT, |m| {
        m.sum(RECORDS_CONSUMED) == Some(produced as f64)
            && m.sum(CHECKPOINTS_COMPLETED).unwrap_or(0.0) >= 1.0
    })?;

    // then every sync takes longer than checkpoint.timeout: checkpoints of the records that
    // follow are abandoned and then completed by the store
    disk.set(SLOW_SYNC)?;
    let second = workload::generate(&mut rng, shape(300, workload::max_ts(&first) + 1_000));
    produced += producer.send_partitions(&input, &[workload::valid_records(&second[0])])?;
    let deadline = Instant::now() + COMPLETE_TIMEOUT;
    let late = loop {
        let late = late_ids(&service.log_since_start());
        if let Some(id) = late.first() {
            break *id;
        }
        if Instant::now() > deadline {
            bail!(
                "no checkpoint completed after its timeout\n{}",
                service.log_tail(30)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let metrics = service.scrape()?;
    ensure!(
        metrics.sum(CHECKPOINTS_ABANDONED).unwrap_or(0.0) >= 1.0,
        "the timeout was counted:\n{}",
        metrics.text()
    );
    // the listing waits for the checkpoint being written: on this disk, one slow sync for each
    // sync a write makes (its pack's, the pack directory's, sled's log's)
    let shown = service.api_checkpoints_within(50, SLOW_SYNC * 12)?;
    let record = shown
        .iter()
        .find(|r| r["id"].as_u64() == Some(late))
        .with_context(|| format!("checkpoint {late} in /api/checkpoints"))?;
    ensure!(
        record["status"] == "completed",
        "checkpoint {late} completed after its timeout shows {record}"
    );
    let consumed = metrics.sum(RECORDS_CONSUMED).unwrap_or(0.0);
    // killed while the disk is still slow
    service.sigkill()?;
    disk.off()?;
    let late = late_ids(&service.log_since_start());
    eprintln!("[slow_disk] {consumed} of {produced} records read; late completions {late:?}");

    // the store's history says completed for every late completion, and the start restores
    // the newest complete checkpoint
    let (retained, records) = list_checkpoints(&service.state_dir())?;
    for id in &late {
        let record = records
            .iter()
            .find(|r| r["id"].as_u64() == Some(*id))
            .with_context(|| format!("checkpoint {id} in the store's history"))?;
        ensure!(
            record["status"] == "completed",
            "checkpoint {id}, written after its timeout, is recorded as {}",
            record["status"]
        );
    }
    let newest = retained.iter().max().copied();
    service.start()?;
    service.wait_ready(READY_TIMEOUT)?;
    let metrics = service.scrape()?;
    let restored = metrics
        .samples()
        .iter()
        .filter(|s| s.name == RESTORE_INFO)
        .find_map(|s| s.labels.get("checkpoint_id")?.parse::<u64>().ok());
    ensure!(
        restored.is_some() && restored == newest,
        "restored {restored:?}, the newest retained is {newest:?} (late completions {late:?})"
    );

    // the rest of the stream, and sentinels that close every window
    let third = workload::generate(&mut rng, shape(200, workload::max_ts(&second) + 1_000));
    let sentinel_ts = workload::max_ts(&third) + 3_600_000;
    producer.send_partitions(&input, &workload::with_local_sentinels(&third, sentinel_ts))?;
    let history: Vec<Event> = [first, second, third]
        .into_iter()
        .flatten()
        .flatten()
        .collect();
    let expected = expected_windows(&windows, &history);
    let complete = reader.poll_until(COMPLETE_TIMEOUT, |m| contains_all(&expected, m));
    let status = service.sigterm(STOP_TIMEOUT)?;
    ensure!(
        complete,
        "output incomplete: {}\n{}",
        output_problems(&expected, reader.messages()),
        service.log_tail(30)
    );
    reader.drain(Duration::from_secs(1), Duration::from_secs(10));
    let summary = check_output(&expected, reader.messages())?;
    ensure!(
        summary.duplicates == 0,
        "{} windows sent twice",
        summary.duplicates
    );
    ensure!(
        status.code() == Some(0),
        "exit status after SIGTERM: {status}"
    );
    Ok(())
}
