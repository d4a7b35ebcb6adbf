//! The real binary's command line: configuration errors exit 2 naming the key, check-config
//! validates without running and never prints secrets.

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
        store.write(&cp, std::time::Instant::now()).expect("write");
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
