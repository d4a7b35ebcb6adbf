//! Child processes of the tests: the one guard that kills a child when it goes out of scope,
//! and the one way to launch the service binary as a plain process (`run --config FILE`, its
//! log in a file) for tests that write their own YAML.
//!
//! [`Service`](crate::Service) builds on both; the root crate's `tests/*.rs` use them directly,
//! with the binary cargo built for them (`env!("CARGO_BIN_EXE_checkpointer")`).

use std::fs::File;
use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
pub use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::{poll, poll_until};

/// How often [`KillOnDrop::wait_for`] evaluates its condition.
const WAIT_EVERY: Duration = Duration::from_millis(200);
/// How often [`KillOnDrop::wait_exit`] looks for the exit.
const EXIT_EVERY: Duration = Duration::from_millis(50);

/// A child process that is killed (SIGKILL) and reaped when the guard is dropped, so that a
/// failing test leaves nothing running. Dereferences to the [`Child`].
#[derive(Debug)]
pub struct KillOnDrop(Child);

impl KillOnDrop {
    pub fn new(child: Child) -> Self {
        KillOnDrop(child)
    }

    /// The process id, for `kill(2)`.
    pub fn pid(&self) -> Result<Pid> {
        let pid = i32::try_from(self.0.id()).context("pid out of range")?;
        Ok(Pid::from_raw(pid))
    }

    /// Sends `signal` (e.g. [`Signal::SIGTERM`] for a graceful stop) without waiting.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        let pid = self.pid()?;
        nix::sys::signal::kill(pid, signal).with_context(|| format!("sending {signal} to {pid}"))
    }

    /// Sends SIGTERM (the graceful stop) and waits for the exit, however long it takes.
    pub fn terminate(&mut self) -> Result<ExitStatus> {
        self.signal(Signal::SIGTERM)?;
        self.0.wait().context("waiting for the exit after SIGTERM")
    }

    /// Waits up to `timeout` for the process to exit by itself; `None` if it is still running
    /// then (it is left running).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        poll(timeout, EXIT_EVERY, || Ok(self.0.try_wait()?))
    }

    /// Evaluates `done` every 200 ms until it holds; an error naming `what` if the process
    /// exits first or `timeout` passes.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut() -> bool,
    ) -> Result<()> {
        poll_until(what, timeout, WAIT_EVERY, || {
            if done() {
                return Ok(Some(()));
            }
            if let Some(status) = self.0.try_wait()? {
                bail!("the process exited ({status}) while waiting for {what}");
            }
            Ok(None)
        })
    }
}

impl Deref for KillOnDrop {
    type Target = Child;

    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `BIN run --config CONFIG` with stdin closed and the caller's `CHECKPOINTER_*` variables
/// removed (the environment overrides the file); the caller adds arguments, the log and
/// `RUST_LOG`.
pub fn run_command(bin: &Path, config: &Path) -> Command {
    let mut command = Command::new(bin);
    command
        .arg("run")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("CHECKPOINTER_") {
            command.env_remove(key);
        }
    }
    command
}

/// Starts `BIN run --config CONFIG` at log level `rust_log`, its log (stderr) written to a new
/// file `log`, stdout discarded.
pub fn spawn_service(
    bin: impl AsRef<Path>,
    config: &Path,
    log: &Path,
    rust_log: &str,
) -> Result<KillOnDrop> {
    let bin = bin.as_ref();
    let log_file = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let child = run_command(bin, config)
        .env("RUST_LOG", rust_log)
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("spawning {}", bin.display()))?;
    Ok(KillOnDrop::new(child))
}
