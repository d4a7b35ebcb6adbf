//! The real binary's command line: configuration errors exit 2 naming the key, check-config
//! validates without running and never prints secrets; offline checkpoint and savepoint
//! commands.

use std::path::Path;
use std::process::{Command, Output};

const VALID: &str = r#"
kafka:
  brokers: 127.0.0.1:9
  group_id: g
  topics: [events]
  options: { sasl.password: hunter2 }
input: { key: /user, value: /amount, timestamp: /ts }
windows:
  - { name: minute, type: tumbling, size: 1m }
output: { topic: out }
checkpoint: { dir: ./state }
"#;

fn run(args: &[&str], yaml: &str, env: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, yaml).expect("write config");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_checkpointer"));
    cmd.args(args).arg("--config").arg(&path);
    cmd.env_remove("CHECKPOINTER_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run checkpointer")
}

/// `checkpointer run` with the valid configuration pointed at `state`; returns once it exits.
fn run_on_state(dir: &Path, state: &Path) -> Output {
    let yaml = VALID.replace("dir: ./state", &format!("dir: {}", state.display()))
        + "http: { listen: 127.0.0.1:0 }\n";
    let path = dir.join("c.yaml");
    std::fs::write(&path, yaml).expect("write");
    Command::new(env!("CARGO_BIN_EXE_checkpointer"))
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .expect("run")
}

fn write(
    store: &checkpointer::store::Store,
    cp: &checkpointer::checkpoint::Checkpoint,
    savepoint: Option<&str>,
) {
    use checkpointer::checkpoint::history::{CheckpointRecord, Status};
    use checkpointer::checkpoint::protocol::meta_of;
    store
        .write(&checkpointer::store::WriteRequest {
            checkpoint: cp,
            record: CheckpointRecord::from_meta(&meta_of(cp, 0, 0), Status::InProgress),
            savepoint: savepoint.map(String::from),
            started: std::time::Instant::now(),
        })
        .expect("write");
}

/// A store with checkpoints 1..=3 (retained: 2), offsets 10, 20, 30, and a savepoint of 2.
fn populated_store(state: &Path) -> checkpointer::store::Store {
    use checkpointer::checkpoint::{Checkpoint, StateSpec};
    use checkpointer::engine::{
        Acc, AggregateKind, Entry, EntryStatus, PartitionState, StateDelta, StateKey, WindowDef,
        WindowKind,
    };
    use checkpointer::position::{NextOffset, Partition};
    let store = checkpointer::store::Store::open(state)
        .expect("open store")
        .with_retention(checkpointer::store::Retention {
            checkpoints: 2,
            history: 100,
        });
    for id in 1..=3u64 {
        let cp = Checkpoint {
            id,
            base: (id > 1).then(|| id - 1),
            trigger_ms: 1_700_000_000_000 + id as i64,
            spec: StateSpec {
                windows: vec![WindowDef {
                    name: "minute".into(),
                    kind: WindowKind::Tumbling { size: 60_000 },
                }],
                aggregates: vec![AggregateKind::Count],
            },
            delta: StateDelta {
                full: id == 1,
                partitions: vec![PartitionState {
                    partition: Partition::new("events", 0),
                    next: Some(NextOffset(id as i64 * 10)),
                    max_ts: Some(5),
                }],
                watermark: None,
                upserts: vec![(
                    StateKey {
                        window: 0,
                        start: 0,
                        key: format!("user-{id}"),
                    },
                    Entry {
                        status: EntryStatus::Open,
                        end: 60_000,
                        acc: Acc::of(None),
                    },
                )],
                deletes: vec![],
                records: 10,
            },
        };
        write(&store, &cp, (id == 2).then_some("before-upgrade"));
    }
    store
}

fn cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_checkpointer"))
        .args(args)
        .output()
        .expect("run checkpointer")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn check_config_accepts_a_valid_file_and_masks_secrets() {
    let out = run(&["check-config"], VALID, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("\"brokers\": \"127.0.0.1:9\""), "{stdout}");
    assert!(!stdout.contains("hunter2"), "secret printed: {stdout}");
}

#[test]
fn unknown_key_exits_2_and_names_it() {
    let yaml = VALID.replace("group_id: g", "group_id: g\n  group: typo");
    for cmd in ["check-config", "run"] {
        let out = run(&[cmd], &yaml, &[]);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {}", stderr(&out));
        assert!(stderr(&out).contains("group"), "{cmd}: {}", stderr(&out));
    }
}

#[test]
fn bad_duration_from_environment_exits_2_naming_the_key() {
    let out = run(
        &["check-config"],
        VALID,
        &[("CHECKPOINTER_CHECKPOINT__INTERVAL", "soon")],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("interval"), "{}", stderr(&out));
}

#[test]
fn impossible_combination_exits_2() {
    let yaml = VALID.replace(
        "type: tumbling, size: 1m",
        "type: hopping, size: 1m, hop: 2m",
    );
    let out = run(&["check-config"], &yaml, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("windows[0].hop"), "{}", stderr(&out));
}

#[test]
fn missing_file_exits_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_checkpointer"))
        .args(["check-config", "--config"])
        .arg(Path::new("/nonexistent/checkpointer.yaml"))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("/nonexistent/checkpointer.yaml"));
}

#[test]
fn second_process_on_the_same_state_dir_gets_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    // hold the store the way a running instance does
    let _held = checkpointer::store::Store::open(&state).expect("open store");
    let out = run_on_state(dir.path(), &state);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("in use by another checkpointer process"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn state_made_under_other_windows_is_refused_at_start() {
    use checkpointer::checkpoint::{Checkpoint, StateSpec};
    use checkpointer::engine::{AggregateKind, StateDelta, WindowDef, WindowKind};
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    {
        let store = checkpointer::store::Store::open(&state).expect("open store");
        let cp = Checkpoint {
            id: 3,
            base: None,
            trigger_ms: 0,
            spec: StateSpec {
                windows: vec![WindowDef {
                    name: "minute".into(),
                    kind: WindowKind::Tumbling { size: 30_000 },
                }],
                aggregates: vec![AggregateKind::Count],
            },
            delta: StateDelta {
                full: true,
                partitions: vec![],
                watermark: None,
                upserts: vec![],
                deletes: vec![],
                records: 0,
            },
        };
        write(&store, &cp, None);
    }
    let out = run_on_state(dir.path(), &state);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("checkpoint 3")
            && err.contains("minute: tumbling 30000ms")
            && err.contains("minute: tumbling 60000ms"),
        "{err}"
    );
}

#[test]
fn offline_list_and_show_read_a_stopped_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    drop(populated_store(&state));
    let d = state.to_str().expect("utf8 path");
    let out = cli(&["checkpoints", "list", "--dir", d, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let list: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(list["retained"], serde_json::json!([2, 3]));
    let ids: Vec<u64> = list["checkpoints"]
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|r| r["id"].as_u64())
        .collect();
    assert_eq!(ids, vec![3, 2, 1]);
    assert_eq!(list["checkpoints"][1]["kind"], "savepoint");
    let table = stdout(&cli(&["checkpoints", "list", "--dir", d]));
    assert!(table.contains("savepoint before-upgrade"), "{table}");

    let out = cli(&["checkpoints", "show", "2", "--dir", d]);
    let shown: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(shown["retained"], true);
    assert_eq!(shown["entries"], 2);
    assert_eq!(shown["checkpoint"]["partitions"][0]["next_offset"], 20);
    let out = cli(&["checkpoints", "show", "1", "--dir", d]);
    let shown: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(
        shown["retained"], false,
        "removed by retention, still in the history"
    );
    let out = cli(&["checkpoints", "show", "9", "--dir", d]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no checkpoint 9"), "{}", stderr(&out));
}

#[test]
fn offline_commands_refuse_a_running_store_and_a_missing_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let held = populated_store(&state);
    let out = cli(&[
        "checkpoints",
        "list",
        "--dir",
        state.to_str().expect("utf8"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("in use by another checkpointer process"),
        "{}",
        stderr(&out)
    );
    drop(held);
    let missing = dir.path().join("nope");
    let out = cli(&[
        "checkpoints",
        "list",
        "--dir",
        missing.to_str().expect("utf8"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no checkpoint store at"),
        "{}",
        stderr(&out)
    );
    assert!(!missing.exists(), "an offline command created a store");
}

#[test]
fn export_import_round_trip_and_damaged_files_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    drop(populated_store(&state));
    let file = dir.path().join("sp.chkpt");
    let (d, f) = (state.to_str().expect("utf8"), file.to_str().expect("utf8"));
    let out = cli(&[
        "savepoint",
        "export",
        "before-upgrade",
        "--out",
        f,
        "--dir",
        d,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let raw = std::fs::read(&file).expect("file");

    let fresh = dir.path().join("fresh");
    let fr = fresh.to_str().expect("utf8");
    let out = cli(&["savepoint", "import", f, "--dir", fr]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let listed: serde_json::Value =
        serde_json::from_str(&stdout(&cli(&["savepoint", "list", "--dir", fr]))).expect("json");
    assert_eq!(listed["savepoints"][0]["name"], "before-upgrade");
    assert_eq!(listed["savepoints"][0]["entries"], 2);
    assert_eq!(listed["savepoints"][0]["meta"]["partitions"][0]["next"], 20);
    let again = cli(&["savepoint", "import", f, "--dir", fr]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );

    let cut = dir.path().join("cut.chkpt");
    std::fs::write(&cut, &raw[..raw.len() - 7]).expect("write");
    let out = cli(&[
        "savepoint",
        "import",
        cut.to_str().expect("utf8"),
        "--dir",
        fr,
        "--name",
        "x",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("truncated"), "{}", stderr(&out));
    let mut bad = raw.clone();
    bad[raw.len() / 2] ^= 0x01;
    let tampered = dir.path().join("bad.chkpt");
    std::fs::write(&tampered, &bad).expect("write");
    let out = cli(&[
        "savepoint",
        "import",
        tampered.to_str().expect("utf8"),
        "--dir",
        fr,
        "--name",
        "y",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("checksum mismatch"),
        "{}",
        stderr(&out)
    );

    let out = cli(&["savepoint", "delete", "before-upgrade", "--dir", fr]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = cli(&["savepoint", "delete", "before-upgrade", "--dir", fr]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no savepoint named"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn restore_from_must_name_something_restorable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    drop(populated_store(&state));
    let yaml = VALID
        .replace("dir: ./state", &format!("dir: {}", state.display()))
        .replace("size: 1m }", "size: 1m }\naggregates: [count]")
        + "http: { listen: 127.0.0.1:0 }\n";
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, yaml).expect("write");
    let c = path.to_str().expect("utf8");
    let out = cli(&["run", "--config", c, "--restore-from", "1"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("checkpoint 1 is not retained; retained checkpoints: 2, 3"),
        "{}",
        stderr(&out)
    );
    let out = cli(&["run", "--config", c, "--restore-from", "savepoint:nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("savepoints: before-upgrade"),
        "{}",
        stderr(&out)
    );
    let out = cli(&["run", "--config", c, "--restore-from", "yesterday"]);
    assert_eq!(out.status.code(), Some(2), "usage error: {}", stderr(&out));
}

#[test]
fn commands_for_a_running_instance_say_when_none_answers() {
    let out = cli(&[
        "savepoint",
        "--url",
        "http://127.0.0.1:9",
        "--timeout",
        "2s",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot reach the service at http://127.0.0.1:9"),
        "{}",
        stderr(&out)
    );
}
