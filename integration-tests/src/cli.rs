//! Running the binary's operator subcommands (`checkpoints`, `savepoint`, `stop`) as a person
//! would, and other programs (a browser), with a time limit.

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::service::service_bin;

/// How long a subcommand may run unless the caller says otherwise.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// What a subcommand did.
#[derive(Debug)]
pub struct CliOutput {
    /// The command line, for messages.
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Exit code (`None` if killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Fails unless the exit status is 0; the error shows the command, status and output.
    pub fn ok(self) -> Result<Self> {
        if self.success() {
            Ok(self)
        } else {
            bail!("{} failed: {}", self.command, self.describe())
        }
    }

    /// Stdout parsed as JSON (after [`CliOutput::ok`]).
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(self.stdout.trim())
            .with_context(|| format!("{}: stdout is not JSON; {}", self.command, self.describe()))
    }

    /// Exit status, stdout and stderr, for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "exit {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

/// Another program a test needs (Prometheus, promtool, Chromium): the path in the environment
/// variable `var` if set, else `default` if it is a file, else an error saying where
/// `scripts/test.sh` gets it (Debian's `package`).
pub fn program(var: &str, default: &str, package: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(var) {
        return Ok(PathBuf::from(path));
    }
    let path = PathBuf::from(default);
    if !path.is_file() {
        bail!(
            "{default} not found (set {var}); scripts/test.sh installs Debian's {package} package"
        );
    }
    Ok(path)
}

/// Runs `checkpointer ARGS...` with [`CLI_TIMEOUT`]; see [`run_with_timeout`].
pub fn run<I, S>(args: I) -> Result<CliOutput>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_with_timeout(args, CLI_TIMEOUT)
}

/// Runs `checkpointer ARGS...`; kills it and fails after `timeout`. A non-zero exit is not an
/// error here (see [`CliOutput::ok`]).
pub fn run_with_timeout<I, S>(args: I, timeout: Duration) -> Result<CliOutput>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_program(&service_bin()?, args, timeout)
}

/// Runs `checkpointer ARGS...` with the variables `env` set (and no others of the caller's
/// `CHECKPOINTER_*`); otherwise like [`run`].
pub fn run_with_env<I, S>(args: I, env: &[(&str, &OsStr)]) -> Result<CliOutput>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_program_with_env(&service_bin()?, args, env, CLI_TIMEOUT)
}

/// Runs `program ARGS...` with the caller's `CHECKPOINTER_*` variables removed and stdin
/// closed, capturing stdout and stderr; kills it and fails after `timeout`. A non-zero exit is
/// not an error here (see [`CliOutput::ok`]).
pub fn run_program<I, S>(program: &Path, args: I, timeout: Duration) -> Result<CliOutput>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_program_with_env(program, args, &[], timeout)
}

fn run_program_with_env<I, S>(
    program: &Path,
    args: I,
    env: &[(&str, &OsStr)],
    timeout: Duration,
) -> Result<CliOutput>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<std::ffi::OsString> = args
        .into_iter()
        .map(|a| a.as_ref().to_os_string())
        .collect();
    let name = program
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let command_line = format!(
        "{name} {}",
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut command = Command::new(program);
    command
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // its own process group: a program that starts helpers (a browser does) is stopped
        // whole on timeout, and only it
        .process_group(0);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("CHECKPOINTER_") {
            command.env_remove(key);
        }
    }
    command.envs(env.iter().copied());
    let mut child = command
        .spawn()
        .with_context(|| format!("spawning {command_line}"))?;
    let group = Pid::from_raw(i32::try_from(child.id()).context("pid out of range")?);
    let stdout = reader(&mut child, true)?;
    let stderr = reader(&mut child, false)?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = killpg(group, Signal::SIGKILL);
            let _ = child.wait();
            let stderr = finish(stderr, Instant::now() + Duration::from_secs(2));
            bail!(
                "{command_line} still running after {timeout:?} (killed); stderr:\n{}",
                stderr.unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // helpers left behind may hold the pipes open: give them a moment, then stop the group
    let drain = Instant::now() + Duration::from_secs(5);
    let (stdout, stderr) = match (finish(stdout, drain), finish(stderr, drain)) {
        (Some(out), Some(err)) => (out, err),
        _ => {
            let _ = killpg(group, Signal::SIGKILL);
            bail!("{command_line} exited ({status}) but left processes holding its output open (killed)");
        }
    };
    Ok(CliOutput {
        command: command_line,
        status,
        stdout,
        stderr,
    })
}

/// The text a reader thread collected, if it finished by `deadline`.
fn finish(handle: JoinHandle<String>, deadline: Instant) -> Option<String> {
    while !handle.is_finished() {
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    handle.join().ok()
}

/// Reads one of the child's pipes to the end on a thread, so a full pipe never blocks it.
fn reader(child: &mut Child, stdout: bool) -> Result<JoinHandle<String>> {
    let mut pipe: Box<dyn Read + Send> = if stdout {
        Box::new(child.stdout.take().context("no stdout pipe")?)
    } else {
        Box::new(child.stderr.take().context("no stderr pipe")?)
    };
    Ok(std::thread::spawn(move || {
        let mut raw = Vec::new();
        let _ = pipe.read_to_end(&mut raw);
        String::from_utf8_lossy(&raw).into_owned()
    }))
}
