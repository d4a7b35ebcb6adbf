//! The checkpoint lifecycle against the real broker and binary: retention, `on_cancel`,
//! savepoints, the choice of what to restore, export/import, and a damaged store.
//!
//! Windows are held open until the sentinels (see `integration_tests::lifecycle`), so restoring
//! any checkpoint or savepoint into a fresh output topic must give exactly the model over all
//! input, and a restored run must re-read exactly the records after the restored offsets.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use integration_tests::lifecycle::{
    config, corrupt_checkpoint, covered, delete_savepoint_offline, expect_output, expect_restored,
    export_savepoint, feed_until_distinct, id_of, import_savepoint, list_checkpoints,
    list_savepoints, offsets_of, run_list_checkpoints, savepoint_offsets, show_checkpoint,
    str_field, wait_consumed, Input, READY_TIMEOUT, STOP_TIMEOUT,
};
use integration_tests::metrics::{
    CHECKPOINTS_COMPLETED, RECORDS_CONSUMED, RESTORE_FALLBACKS, RESTORE_INFO,
};
use integration_tests::{cli, test_seed, unique_name, Broker, Service};
use serde_json::Value;

const PER_BATCH: usize = 60;
/// Long enough for a batch to be produced and read between two checkpoints on a busy machine.
const PACED_INTERVAL: Duration = Duration::from_secs(2);
/// Only the startup checkpoint, savepoints and the final checkpoint of a graceful stop.
const NO_INTERVAL: Duration = Duration::from_secs(3600);
/// Closed windows are emitted once a later checkpoint is durable: restored runs checkpoint
/// often.
const RESTORED_INTERVAL: Duration = Duration::from_millis(300);

fn check(test: &str, seed: u64, result: Result<()>) {
    if let Err(err) = result {
        panic!("{err:#}\n({test}, seed {seed})");
    }
}

fn output_topic(broker: &Broker, prefix: &str) -> Result<String> {
    let topic = unique_name(prefix);
    broker.create_topic(&topic, 2)?;
    Ok(topic)
}

/// Quotes a YAML scalar (a JSON string is a YAML string).
fn yaml_str(s: &str) -> String {
    Value::from(s).to_string()
}

#[test]
fn retention_keeps_the_newest_n_and_each_restores_its_own_offsets_and_state() {
    let seed = test_seed("lifecycle_retention");
    check("retention", seed, retention(seed));
}

fn retention(seed: u64) -> Result<()> {
    let broker = Broker::shared()?;
    let mut input = Input::new(broker, "retention-in", seed)?;
    let output = output_topic(broker, "retention-out")?;
    let mut cfg = config(broker, &input.topic, &output, "retention", PACED_INTERVAL);
    cfg.checkpoint_extra.insert("retained".into(), "3".into());
    let windows = cfg.windows.clone();
    let mut service = Service::new("retention", cfg)?;
    service.start()?;
    service.wait_ready(READY_TIMEOUT)?;

    // the store is the running service's: the CLI must refuse it, not read it half-written
    let busy = run_list_checkpoints(&service.state_dir())?;
    ensure!(
        busy.code() == Some(1)
            && busy
                .stderr
                .contains("in use by another checkpointer process"),
        "checkpoints list on a running service's dir: {}",
        busy.describe()
    );

    feed_until_distinct(&service, &mut input, 3, PER_BATCH)?;
    service.stop_cleanly(STOP_TIMEOUT)?;

    let (retained, records) = list_checkpoints(&service.state_dir())?;
    let completed: Vec<u64> = records
        .iter()
        .filter(|r| str_field(r, "kind") == "checkpoint" && str_field(r, "status") == "completed")
        .map(id_of)
        .collect::<Result<_>>()?;
    ensure!(
        retained.len() == 3,
        "retained {retained:?}, expected exactly 3 (completed: {completed:?})"
    );
    ensure!(
        completed.len() > 3,
        "only {} checkpoints completed, so retention was not exercised: {completed:?}",
        completed.len()
    );
    let mut newest_three: Vec<u64> = completed.iter().copied().take(3).collect();
    newest_three.sort_unstable();
    ensure!(
        retained == newest_three,
        "retained {retained:?} are not the newest completed checkpoints {newest_three:?}"
    );

    let mut offsets = BTreeMap::new();
    for &id in &retained {
        let shown = show_checkpoint(&service.state_dir(), id)?;
        ensure!(
            shown["retained"] == Value::Bool(true)
                && shown.pointer("/checkpoint/id") == Some(&Value::from(id)),
            "checkpoints show {id}: {shown}"
        );
        offsets.insert(id, offsets_of(&shown["checkpoint"])?);
    }
    let distinct: std::collections::BTreeSet<_> = offsets.values().collect();
    ensure!(
        distinct.len() == retained.len(),
        "retained checkpoints share offsets: {offsets:?}"
    );
    let newest = retained[retained.len() - 1];
    ensure!(
        offsets[&newest] == input.offsets(),
        "the final checkpoint {newest} has offsets {:?}, but {:?} were read",
        offsets[&newest],
        input.offsets()
    );
    eprintln!("[retention] retained {retained:?} with offsets {offsets:?}");

    input.sentinels()?;
    let expected = input.expected(&windows);
    // each retained checkpoint restored on its own copy of the store, into its own topic
    let mut restored = Vec::new();
    for &id in &retained {
        let out = output_topic(broker, &format!("retention-out-{id}"))?;
        let mut c = config(
            broker,
            &input.topic,
            &out,
            "retention-restore",
            PACED_INTERVAL,
        );
        c.checkpoint_extra.insert("retained".into(), "3".into());
        c.extra_args = vec!["--restore-from".into(), id.to_string()];
        let mut copy = Service::new(&format!("retention-restore-{id}"), c)?;
        copy.copy_state_from(&service.state_dir())?;
        copy.start()?;
        restored.push((id, copy, out));
    }
    for (id, copy, out) in &mut restored {
        let id = *id;
        copy.wait_ready(READY_TIMEOUT)?;
        expect_restored(copy, "checkpoint", Some(id), None)?;
        let rereads = input.total() - covered(&offsets[&id]);
        wait_consumed(copy, rereads)
            .with_context(|| format!("restored checkpoint {id} must re-read {rereads} records"))?;
        let (summary, _) = expect_output(broker, copy, out, &expected)
            .with_context(|| format!("after restoring checkpoint {id}"))?;
        copy.stop_cleanly(STOP_TIMEOUT)?;
        eprintln!(
            "[retention] checkpoint {id}: re-read {rereads} records, {} windows as the model",
            summary.windows
        );
    }
    Ok(())
}

#[test]
fn on_cancel_delete_removes_checkpoints_on_graceful_stop_and_retain_keeps_them() {
    let seed = test_seed("lifecycle_on_cancel");
    check("on_cancel", seed, on_cancel(seed));
}

fn on_cancel(seed: u64) -> Result<()> {
    let broker = Broker::shared()?;
    let mut input = Input::new(broker, "cancel-in", seed)?;
    let output = output_topic(broker, "cancel-out")?;
    let interval = Duration::from_millis(300);
    let mut retaining_cfg = config(broker, &input.topic, &output, "cancel-retain", interval);
    retaining_cfg
        .checkpoint_extra
        .insert("on_cancel".into(), "retain".into());
    let mut deleting_cfg = config(broker, &input.topic, &output, "cancel-delete", interval);
    deleting_cfg
        .checkpoint_extra
        .insert("on_cancel".into(), "delete".into());
    let mut retaining = Service::new("cancel-retain", retaining_cfg)?;
    let mut deleting = Service::new("cancel-delete", deleting_cfg)?;
    let produced = input.batch(100)?;
    retaining.start()?;
    deleting.start()?;
    for service in [&mut retaining, &mut deleting] {
        service.wait_ready(READY_TIMEOUT)?;
        wait_consumed(service, produced)?;
    }
    let created = deleting.post("/api/savepoints?name=kept")?;
    ensure!(created.status == 201, "POST savepoint: {created:?}");
    retaining.wait_metrics("a completed checkpoint", Duration::from_secs(10), |m| {
        m.sum(CHECKPOINTS_COMPLETED).unwrap_or(0.0) >= 1.0
    })?;
    retaining.stop_cleanly(STOP_TIMEOUT)?;
    deleting.stop_cleanly(STOP_TIMEOUT)?;

    let (kept, keep_records) = list_checkpoints(&retaining.state_dir())?;
    let keep_newest = keep_records
        .iter()
        .find(|r| str_field(r, "status") == "completed")
        .map(id_of)
        .transpose()?;
    ensure!(
        !kept.is_empty() && kept.last().copied() == keep_newest,
        "on_cancel retain: retained {kept:?}, newest completed {keep_newest:?}"
    );

    let (dropped, drop_records) = list_checkpoints(&deleting.state_dir())?;
    ensure!(
        dropped.is_empty(),
        "on_cancel delete: checkpoints still retained after a graceful stop: {dropped:?}"
    );
    let completed_history = drop_records
        .iter()
        .filter(|r| str_field(r, "status") == "completed")
        .count();
    ensure!(
        completed_history >= 2
            && drop_records
                .iter()
                .any(|r| str_field(r, "kind") == "savepoint" && str_field(r, "savepoint") == "kept"),
        "on_cancel delete must keep the history (savepoint attempt included): {drop_records:?}"
    );
    let log = deleting.log_since_start();
    ensure!(
        log.contains("checkpoints deleted"),
        "no log line about deleted checkpoints:\n{}",
        deleting.log_tail(20)
    );
    let savepoints = list_savepoints(&deleting.state_dir())?;
    ensure!(
        savepoints.iter().any(|s| str_field(s, "name") == "kept"),
        "on_cancel delete must keep savepoints: {savepoints:?}"
    );
    // without the savepoint nothing restorable is left
    delete_savepoint_offline(&deleting.state_dir(), "kept")?;
    ensure!(
        list_savepoints(&deleting.state_dir())?.is_empty(),
        "savepoint delete --dir left savepoints"
    );

    retaining.start()?;
    deleting.start()?;
    retaining.wait_ready(READY_TIMEOUT)?;
    deleting.wait_ready(READY_TIMEOUT)?;
    expect_restored(&retaining, "checkpoint", kept.last().copied(), None)?;
    expect_restored(&deleting, "none", None, None)?;

    // a crash never deletes
    deleting.wait_metrics("a completed checkpoint", Duration::from_secs(10), |m| {
        m.sum(CHECKPOINTS_COMPLETED).unwrap_or(0.0) >= 1.0
    })?;
    deleting.sigkill()?;
    let (after_kill, _) = list_checkpoints(&deleting.state_dir())?;
    ensure!(
        !after_kill.is_empty(),
        "on_cancel delete removed checkpoints after SIGKILL"
    );
    retaining.stop_cleanly(STOP_TIMEOUT)?;
    Ok(())
}

#[test]
fn restoring_a_savepoint_rereads_later_input_exactly_once() {
    let seed = test_seed("lifecycle_savepoint");
    check("savepoint", seed, savepoint(seed));
}

fn savepoint(seed: u64) -> Result<()> {
    let broker = Broker::shared()?;
    let mut input = Input::new(broker, "savepoint-in", seed)?;
    let output = output_topic(broker, "savepoint-out")?;
    let cfg = config(
        broker,
        &input.topic,
        &output,
        "savepoint",
        Duration::from_millis(400),
    );
    let windows = cfg.windows.clone();
    let mut service = Service::new("savepoint", cfg)?;
    let first = input.batch(100)?;
    service.start()?;
    service.wait_ready(READY_TIMEOUT)?;
    wait_consumed(&service, first)?;

    let name = "before-batch-2";
    let created = service.post(&format!("/api/savepoints?name={name}"))?;
    ensure!(created.status == 201, "POST /api/savepoints: {created:?}");
    let savepoint = created.json()?;
    ensure!(str_field(&savepoint, "name") == name, "{savepoint}");
    let savepoint_id = savepoint
        .get("checkpoint_id")
        .and_then(Value::as_u64)
        .context("savepoint without checkpoint_id")?;
    ensure!(
        savepoint_offsets(&savepoint)? == input.offsets(),
        "the savepoint's offsets are not those of the first batch ({:?}): {savepoint}",
        input.offsets()
    );

    let again = service.post(&format!("/api/savepoints?name={name}"))?;
    ensure!(again.status == 409, "a second savepoint {name}: {again:?}");
    let bad = service.post("/api/savepoints?name=.hidden")?;
    ensure!(bad.status == 400, "savepoint named .hidden: {bad:?}");
    let missing = service.delete("/api/savepoints/no-such-savepoint")?;
    ensure!(
        missing.status == 404,
        "DELETE of an unknown savepoint: {missing:?}"
    );
    let listed = service.get_json("/api/savepoints")?;
    ensure!(
        listed["savepoints"]
            .as_array()
            .is_some_and(|l| l.len() == 1 && str_field(&l[0], "name") == name),
        "GET /api/savepoints: {listed}"
    );
    let attempt = service.get_json(&format!("/api/checkpoints/{savepoint_id}"))?;
    ensure!(
        str_field(&attempt["checkpoint"], "kind") == "savepoint"
            && str_field(&attempt["checkpoint"], "savepoint") == name
            && str_field(&attempt["checkpoint"], "status") == "completed",
        "GET /api/checkpoints/{savepoint_id}: {attempt}"
    );
    let unknown = service.get("/api/checkpoints/987654321")?;
    ensure!(unknown.status == 404, "unknown checkpoint: {unknown:?}");

    let second = input.batch(100)?;
    wait_consumed(&service, first + second)?;
    // the CLI stop returns once the service has exited
    cli::run(["stop", "--url", &service.url()?])?.ok()?;
    let status = service.wait_exit(Duration::from_secs(5))?;
    ensure!(
        status.code() == Some(0),
        "exit after `checkpointer stop`: {status}"
    );

    input.sentinels()?;
    let expected = input.expected(&windows);
    let fresh = output_topic(broker, "savepoint-out-restored")?;
    service.config_mut().output_topic = fresh.clone();
    service.config_mut().extra_args = vec!["--restore-from".into(), format!("savepoint:{name}")];
    service.start()?;
    service.wait_ready(READY_TIMEOUT)?;
    expect_restored(&service, "savepoint", Some(savepoint_id), Some(name))?;
    // the second batch again, exactly once, and the sentinels
    wait_consumed(&service, second + 3)?;
    let (summary, _) = expect_output(broker, &service, &fresh, &expected)?;
    let consumed = service.scrape()?.require(RECORDS_CONSUMED)?;
    ensure!(
        consumed == (second + 3) as f64,
        "restored run read {consumed} records, expected {}",
        second + 3
    );
    service.stop_cleanly(STOP_TIMEOUT)?;
    eprintln!(
        "[savepoint] restored {name} (checkpoint {savepoint_id}), {} windows as the model",
        summary.windows
    );
    Ok(())
}

#[test]
fn prefer_checkpoint_for_recovery_chooses_a_checkpoint_over_a_newer_savepoint() {
    let seed = test_seed("lifecycle_prefer");
    check("prefer", seed, prefer(seed));
}

/// A savepoint is a checkpoint of its own store too (and wins ties as that checkpoint), so a
/// savepoint newer than every retained checkpoint comes from another store: service B's
/// savepoint, exported and imported into service A's store after A stopped.
fn prefer(seed: u64) -> Result<()> {
    let broker = Broker::shared()?;
    let mut input = Input::new(broker, "prefer-in", seed)?;
    let output = output_topic(broker, "prefer-out")?;
    let a_cfg = config(broker, &input.topic, &output, "prefer-a", NO_INTERVAL);
    let windows = a_cfg.windows.clone();
    let mut a = Service::new("prefer-a", a_cfg.clone())?;
    let first = input.batch(80)?;
    a.start()?;
    a.wait_ready(READY_TIMEOUT)?;
    wait_consumed(&a, first)?;
    a.stop_cleanly(STOP_TIMEOUT)?;
    let (a_retained, _) = list_checkpoints(&a.state_dir())?;
    let a_newest = *a_retained
        .last()
        .context("service A retained no checkpoint")?;
    let a_shown = show_checkpoint(&a.state_dir(), a_newest)?;
    ensure!(
        offsets_of(&a_shown["checkpoint"])? == input.offsets(),
        "A's final checkpoint does not cover the first batch: {a_shown}"
    );
    let a_time = a_shown
        .pointer("/checkpoint/trigger_time")
        .and_then(Value::as_i64)
        .context("no trigger_time")?;

    let second = input.batch(80)?;
    let b_cfg = config(broker, &input.topic, &output, "prefer-b", NO_INTERVAL);
    let mut b = Service::new("prefer-b", b_cfg)?;
    b.start()?;
    b.wait_ready(READY_TIMEOUT)?;
    wait_consumed(&b, first + second)?;
    let created = b.post("/api/savepoints?name=newer")?;
    ensure!(created.status == 201, "POST savepoint on B: {created:?}");
    let savepoint = created.json()?;
    let sp_id = savepoint["checkpoint_id"]
        .as_u64()
        .context("checkpoint_id")?;
    ensure!(
        savepoint["created_ms"].as_i64().is_some_and(|t| t > a_time),
        "the savepoint ({savepoint}) is not newer than A's checkpoint (triggered {a_time})"
    );
    b.sigkill()?;

    let file = b.dir().join("newer.savepoint");
    export_savepoint(&b.state_dir(), "newer", &file)?;
    import_savepoint(&file, &a.state_dir(), None)?.ok()?;

    // the same store twice: A itself with prefer false, a copy with prefer true
    let out_savepoint = output_topic(broker, "prefer-out-savepoint")?;
    let out_checkpoint = output_topic(broker, "prefer-out-checkpoint")?;
    a.config_mut().checkpoint_interval = RESTORED_INTERVAL;
    a.config_mut().output_topic = out_savepoint.clone();
    a.config_mut()
        .checkpoint_extra
        .insert("prefer_checkpoint_for_recovery".into(), "false".into());
    let mut c_cfg = config(
        broker,
        &input.topic,
        &out_checkpoint,
        "prefer-c",
        RESTORED_INTERVAL,
    );
    c_cfg
        .checkpoint_extra
        .insert("prefer_checkpoint_for_recovery".into(), "true".into());
    let mut c = Service::new("prefer-copy", c_cfg)?;
    c.copy_state_from(&a.state_dir())?;

    input.sentinels()?;
    let expected = input.expected(&windows);
    a.start()?;
    c.start()?;
    a.wait_ready(READY_TIMEOUT)?;
    c.wait_ready(READY_TIMEOUT)?;
    expect_restored(&a, "savepoint", Some(sp_id), Some("newer"))?;
    expect_restored(&c, "checkpoint", Some(a_newest), None)?;
    wait_consumed(&a, 3)?;
    wait_consumed(&c, second + 3)?;
    expect_output(broker, &a, &out_savepoint, &expected).context("prefer false")?;
    expect_output(broker, &c, &out_checkpoint, &expected).context("prefer true")?;
    a.stop_cleanly(STOP_TIMEOUT)?;
    c.stop_cleanly(STOP_TIMEOUT)?;
    Ok(())
}

#[test]
fn exported_savepoint_restores_identically_elsewhere_and_damaged_files_are_refused() {
    let seed = test_seed("lifecycle_export");
    check("export", seed, export_import(seed));
}

fn export_import(seed: u64) -> Result<()> {
    let broker = Broker::shared()?;
    let mut input = Input::new(broker, "export-in", seed)?;
    let output = output_topic(broker, "export-out")?;
    let cfg = config(
        broker,
        &input.topic,
        &output,
        "export",
        Duration::from_millis(400),
    );
    let windows = cfg.windows.clone();
    let mut source = Service::new("export-source", cfg)?;
    let first = input.batch(100)?;
    source.start()?;
    source.wait_ready(READY_TIMEOUT)?;
    wait_consumed(&source, first)?;
    cli::run(["stop", "--url", &source.url()?, "--savepoint", "exported"])?.ok()?;
    let status = source.wait_exit(Duration::from_secs(5))?;
    ensure!(
        status.code() == Some(0),
        "exit after `stop --savepoint`: {status}"
    );

    let listed = list_savepoints(&source.state_dir())?;
    let original = listed
        .iter()
        .find(|s| str_field(s, "name") == "exported")
        .cloned()
        .with_context(|| format!("no savepoint \"exported\" after stop: {listed:?}"))?;
    ensure!(
        savepoint_offsets(&original)? == input.offsets(),
        "savepoint offsets are not the first batch's {:?}: {original}",
        input.offsets()
    );
    let file = source.dir().join("exported.savepoint");
    export_savepoint(&source.state_dir(), "exported", &file)?;
    let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;

    let out_target = output_topic(broker, "export-out-target")?;
    let mut t_cfg = config(
        broker,
        &input.topic,
        &out_target,
        "export-target",
        Duration::from_millis(400),
    );
    t_cfg
        .checkpoint_extra
        .insert("restore_from".into(), yaml_str("savepoint:moved"));
    let mut target = Service::new("export-target", t_cfg)?;

    let damaged = [
        ("truncated", bytes[..bytes.len() - 7].to_vec()),
        ("checksum", {
            let mut b = bytes.clone();
            let middle = b.len() / 2;
            b[middle] ^= 0x55;
            b
        }),
    ];
    for (problem, content) in damaged {
        let path = target.dir().join(format!("{problem}.savepoint"));
        std::fs::write(&path, content)?;
        let refused = import_savepoint(&path, &target.state_dir(), None)?;
        ensure!(
            !refused.success() && format!("{}{}", refused.stdout, refused.stderr).contains(problem),
            "import of a {problem} file must fail naming the problem: {}",
            refused.describe()
        );
    }
    import_savepoint(&file, &target.state_dir(), Some("moved"))?.ok()?;
    let imported = list_savepoints(&target.state_dir())?;
    ensure!(
        imported.len() == 1
            && str_field(&imported[0], "name") == "moved"
            && imported[0]["meta"] == original["meta"]
            && imported[0]["entries"] == original["entries"],
        "imported savepoints {imported:?} differ from the exported {original}"
    );

    let second = input.batch(100)?;
    input.sentinels()?;
    let expected = input.expected(&windows);
    let out_source = output_topic(broker, "export-out-source")?;
    source.config_mut().output_topic = out_source.clone();
    source
        .config_mut()
        .checkpoint_extra
        .insert("restore_from".into(), yaml_str("savepoint:exported"));
    source.start()?;
    target.start()?;
    source.wait_ready(READY_TIMEOUT)?;
    target.wait_ready(READY_TIMEOUT)?;
    let sp_id = original["checkpoint_id"].as_u64();
    expect_restored(&source, "savepoint", sp_id, Some("exported"))?;
    expect_restored(&target, "savepoint", sp_id, Some("moved"))?;
    wait_consumed(&source, second + 3)?;
    wait_consumed(&target, second + 3)?;
    let (_, from_source) = expect_output(broker, &source, &out_source, &expected)?;
    let (summary, from_target) = expect_output(broker, &target, &out_target, &expected)?;
    ensure!(
        from_source == from_target,
        "the imported savepoint's output differs from the original's"
    );
    source.stop_cleanly(STOP_TIMEOUT)?;
    target.stop_cleanly(STOP_TIMEOUT)?;
    eprintln!(
        "[export] {} byte file; {} windows, identical from both stores",
        bytes.len(),
        summary.windows
    );
    Ok(())
}

#[test]
fn a_damaged_newest_checkpoint_falls_back_to_the_previous_one_unless_chosen() {
    let seed = test_seed("lifecycle_corrupt");
    check("corrupt", seed, corrupt(seed));
}

fn corrupt(seed: u64) -> Result<()> {
    let broker = Broker::shared()?;
    let mut input = Input::new(broker, "corrupt-in", seed)?;
    let output = output_topic(broker, "corrupt-out")?;
    let cfg = config(broker, &input.topic, &output, "corrupt", PACED_INTERVAL);
    let windows = cfg.windows.clone();
    let mut service = Service::new("corrupt", cfg)?;
    service.start()?;
    service.wait_ready(READY_TIMEOUT)?;
    // three: the previous checkpoint holds data too
    feed_until_distinct(&service, &mut input, 3, PER_BATCH)?;
    service.stop_cleanly(STOP_TIMEOUT)?;

    let (retained, _) = list_checkpoints(&service.state_dir())?;
    ensure!(
        retained.len() >= 2,
        "retained {retained:?}: nothing to fall back to"
    );
    let newest = retained[retained.len() - 1];
    let previous = retained[retained.len() - 2];
    let previous_offsets =
        offsets_of(&show_checkpoint(&service.state_dir(), previous)?["checkpoint"])?;
    let newest_offsets = offsets_of(&show_checkpoint(&service.state_dir(), newest)?["checkpoint"])?;
    ensure!(
        previous_offsets != newest_offsets,
        "checkpoints {previous} and {newest} have the same offsets {newest_offsets:?}"
    );
    let damaged = corrupt_checkpoint(&service.state_dir(), newest)?;
    eprintln!("[corrupt] damaged checkpoint {newest}: {damaged:?}; previous {previous}");

    // chosen explicitly, a damaged checkpoint is an error, never a fallback
    service.config_mut().extra_args = vec!["--restore-from".into(), newest.to_string()];
    service.start()?;
    let status = service.wait_exit(Duration::from_secs(30))?;
    let log = service.log_since_start();
    let named = log
        .lines()
        .any(|l| l.starts_with("checkpointer:") && l.contains(&format!("checkpoint {newest}")));
    ensure!(
        status.code() == Some(1) && named,
        "--restore-from {newest} (damaged): exit {status}, and the message must name the \
         checkpoint:\n{log}"
    );
    ensure!(
        !log.contains("falling back"),
        "a chosen checkpoint fell back:\n{log}"
    );

    input.sentinels()?;
    let expected = input.expected(&windows);
    let fresh = output_topic(broker, "corrupt-out-fallback")?;
    service.config_mut().extra_args.clear();
    service.config_mut().output_topic = fresh.clone();
    service.start()?;
    service.wait_metrics("the restore", READY_TIMEOUT, |m| {
        m.sum(RESTORE_INFO).is_some()
    })?;
    let log = service.log_since_start();
    ensure!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("falling back")),
        "no warning about falling back:\n{log}"
    );
    let metrics = service.scrape()?;
    ensure!(
        metrics.require(RESTORE_FALLBACKS)? == 1.0,
        "{RESTORE_FALLBACKS} is not 1:\n{}",
        metrics.text()
    );
    expect_restored(&service, "checkpoint", Some(previous), None)?;
    // the damaged versions left in the store must not keep new checkpoints from completing
    let checkpointing = service.wait_metrics(
        "a checkpoint completed after the fallback",
        Duration::from_secs(15),
        |m| m.sum(CHECKPOINTS_COMPLETED).unwrap_or(0.0) >= 1.0,
    );
    if let Err(err) = checkpointing {
        let failures: Vec<String> = service
            .log_since_start()
            .lines()
            .filter(|l| l.contains("checkpoint failed") || l.contains("checkpoints failed"))
            .map(String::from)
            .collect();
        return Err(err.context(format!(
            "no checkpoint completes after falling back from damaged checkpoint {newest} to \
             {previous}:\n{}",
            failures.join("\n")
        )));
    }
    service.wait_ready(READY_TIMEOUT)?;
    wait_consumed(&service, input.total() - covered(&previous_offsets))?;
    expect_output(broker, &service, &fresh, &expected)?;
    service.stop_cleanly(STOP_TIMEOUT)?;
    Ok(())
}
