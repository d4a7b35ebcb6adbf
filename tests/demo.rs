//! The README's demo command, bounded in time: `checkpointer demo` consumes its generated
//! stream, checkpoints and prints windows within a minute, with `/metrics` and the status page
//! live; stopped with SIGTERM it exits 0 without an error or warning in its log (its clients
//! close before the embedded broker goes), and the same command again resumes from the final
//! checkpoint instead of reading its input again.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use integration_tests::free_addr;
use integration_tests::http::try_get;
use integration_tests::metrics::metric;
use integration_tests::process::KillOnDrop;

/// A demo process with its stdout collected line by line.
struct Demo {
    child: KillOnDrop,
    stdout: Arc<Mutex<Vec<String>>>,
    log: std::path::PathBuf,
}

fn start(state: &Path, addr: std::net::SocketAddr, log: &Path) -> Demo {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/demo.yaml");
    let mut child = Command::new(env!("CARGO_BIN_EXE_checkpointer"))
        .args(["demo", "--config"])
        .arg(config)
        .env("CHECKPOINTER_CHECKPOINT__DIR", state)
        .env("CHECKPOINTER_HTTP__LISTEN", addr.to_string())
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).expect("log"))
        .spawn()
        .expect("spawn demo");
    let out = child.stdout.take().expect("stdout");
    let stdout = Arc::new(Mutex::new(Vec::new()));
    let sink = stdout.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            sink.lock().expect("lock").push(line);
        }
    });
    Demo {
        child: KillOnDrop::new(child),
        stdout,
        log: log.to_path_buf(),
    }
}

impl Demo {
    fn lines(&self) -> Vec<String> {
        self.stdout.lock().expect("lock").clone()
    }

    /// Waits until `ok(lines printed so far)` holds; panics if the demo exits first.
    fn wait(&mut self, what: &str, timeout: Duration, mut ok: impl FnMut(&[String]) -> bool) {
        let stdout = &self.stdout;
        self.child
            .wait_for(what, timeout, || {
                let lines = stdout.lock().expect("lock").clone();
                ok(&lines)
            })
            .expect("demo");
    }

    fn stop(mut self) {
        let status = self.child.terminate().expect("SIGTERM");
        let log = std::fs::read_to_string(&self.log).expect("demo log");
        assert_eq!(status.code(), Some(0), "the demo stops cleanly:\n{log}");
        let noise: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(" ERROR ") || l.contains(" WARN "))
            .collect();
        assert!(
            noise.is_empty(),
            "a clean stop logs no error or warning:\n{}",
            noise.join("\n")
        );
    }
}

fn last_checkpoint(state: &Path) -> u64 {
    let out = Command::new(env!("CARGO_BIN_EXE_checkpointer"))
        .args(["checkpoints", "list", "--json", "--dir"])
        .arg(state)
        .output()
        .expect("checkpoints list");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    list["retained"]
        .as_array()
        .and_then(|ids| ids.iter().filter_map(|i| i.as_u64()).max())
        .expect("a retained checkpoint")
}

#[test]
fn the_demo_shows_windows_within_a_minute_and_resumes_when_run_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    // a state directory whose parent does not exist yet, as on a fresh clone (`./data/demo`)
    let state = dir.path().join("data").join("state");
    let addr = free_addr().expect("free port");
    let log = dir.path().join("first.log");
    let mut demo = start(&state, addr, &log);
    demo.wait("windows printed", Duration::from_secs(60), |lines| {
        lines.iter().any(|l| l.starts_with("window {"))
    });
    assert!(
        demo.lines()[0].contains("starting fresh"),
        "{:?}",
        demo.lines()
    );
    let window = demo
        .lines()
        .into_iter()
        .find(|l| l.starts_with("window {"))
        .expect("a window");
    let parsed: serde_json::Value =
        serde_json::from_str(&window["window ".len()..]).expect("window JSON");
    assert!(parsed["count"].as_u64().is_some_and(|c| c > 0), "{parsed}");
    demo.wait("a checkpoint", Duration::from_secs(30), |_| {
        metric(addr, "checkpointer_checkpoints_completed_total") >= 1.0
    });
    let page = try_get(addr, "/").expect("status page");
    assert_eq!(page.status, 200);
    assert!(page.body.contains("<html"), "the status page is HTML");
    assert_eq!(
        try_get(addr, "/api/checkpoints").map(|r| r.status),
        Some(200)
    );
    demo.stop();

    let journal = dir.path().join("data").join("state.events");
    let replayed = std::fs::read_to_string(&journal)
        .expect("journal")
        .lines()
        .count();
    let final_checkpoint = last_checkpoint(&state);

    // the same command again resumes
    let log = dir.path().join("second.log");
    let mut demo = start(&state, addr, &log);
    demo.wait("the restart", Duration::from_secs(30), |_| {
        try_get(addr, "/readyz").is_some_and(|r| r.status == 200)
            && metric(addr, "checkpointer_checkpoints_completed_total") >= 1.0
    });
    let first = demo.lines().first().cloned().unwrap_or_default();
    assert!(
        first.contains(&format!("{replayed} events replayed")),
        "{first}"
    );
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(
        text.lines().any(|l| l.contains(" restored ")
            && l.contains(&format!("checkpoint_id={final_checkpoint} "))),
        "the restart restores checkpoint {final_checkpoint}\n{text}"
    );
    // what the first run consumed is not read again
    let consumed = metric(addr, "checkpointer_records_consumed_total");
    assert!(
        consumed >= 0.0 && consumed < replayed as f64,
        "read {consumed} records of {replayed} replayed: the input was read again"
    );
    assert_eq!(metric(addr, "checkpointer_records_duplicate_total"), 0.0);
    demo.stop();
}
