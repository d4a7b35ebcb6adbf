//! Reading `/proc`: the machine (CPU, memory, load average) and a process's CPU time and RSS,
//! sampled from a thread by the [`Sampler`].

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use anyhow::{anyhow, Context as _, Result};

use crate::report::Report;
use crate::{GB, SAMPLE_EVERY};

pub(crate) fn machine_rows(report: &mut Report, command: &str) {
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kb = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next()?.parse::<f64>().ok());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    report.add("nproc", "machine: nproc", nproc, nproc.to_string());
    let mem_gb = mem_kb.map(|kb| kb * 1024.0 / GB);
    report.add(
        "mem_total_gb",
        "machine: memory",
        mem_gb,
        mem_gb.map(|g| format!("{g:.1} GiB")).unwrap_or_default(),
    );
    report.add("cpu_model", "machine: CPU", model.clone(), model);
    report.add("command", "command", command, format!("`{command}`"));
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// One `/proc/<pid>` reading: state, utime+stime, VmRSS, VmHWM (absent for a zombie).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ProcSample {
    pub(crate) cpu_seconds: f64,
    pub(crate) rss_bytes: u64,
    pub(crate) hwm_bytes: u64,
    pub(crate) exited: bool,
}

fn read_proc(pid: &str) -> Result<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // fields after the command name: state ppid ... utime (14th field) stime (15th)
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("bad /proc/{pid}/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> Result<f64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| anyhow!("bad /proc/{pid}/stat field {i}"))
    };
    let exited = matches!(fields.first(), Some(&"Z") | Some(&"X"));
    let cpu_seconds = (field(11)? + field(12)?) / clock_ticks();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
            * 1024
    };
    Ok(ProcSample {
        cpu_seconds,
        rss_bytes: kb("VmRSS:"),
        hwm_bytes: kb("VmHWM:"),
        exited,
    })
}

pub(crate) fn process_cpu_seconds(pid: &str) -> Result<f64> {
    Ok(read_proc(pid)?.cpu_seconds)
}

/// Samples a process every [`SAMPLE_EVERY`] until it exits (or is stopped); keeps the latest
/// CPU time and the largest peak RSS seen.
pub(crate) struct Sampler {
    pid: String,
    latest: Arc<Mutex<ProcSample>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Sampler {
    pub(crate) fn spawn(pid: i32) -> Sampler {
        let pid = pid.to_string();
        let latest = Arc::new(Mutex::new(ProcSample::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let (pid, latest, stop) = (pid.clone(), latest.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if !sample_into(&pid, &latest) {
                        break;
                    }
                    std::thread::sleep(SAMPLE_EVERY);
                }
            })
        };
        Sampler {
            pid,
            latest,
            stop,
            handle: Some(handle),
        }
    }

    pub(crate) fn latest(&self) -> ProcSample {
        *self.latest.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One extra reading now (e.g. just before a signal).
    pub(crate) fn sample_now(&self) -> ProcSample {
        sample_into(&self.pid, &self.latest);
        self.latest()
    }

    pub(crate) fn finish(mut self) -> ProcSample {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
        self.latest()
    }
}

/// Merges one reading into `latest`; false once the process is gone or a zombie.
fn sample_into(pid: &str, latest: &Mutex<ProcSample>) -> bool {
    let reading = read_proc(pid);
    let mut latest = latest.lock().unwrap_or_else(PoisonError::into_inner);
    match reading {
        Ok(s) => {
            latest.cpu_seconds = latest.cpu_seconds.max(s.cpu_seconds);
            latest.hwm_bytes = latest.hwm_bytes.max(s.hwm_bytes);
            if !s.exited {
                latest.rss_bytes = s.rss_bytes;
            }
            latest.exited |= s.exited;
        }
        Err(_) => latest.exited = true,
    }
    !latest.exited
}

/// The 1-minute load average (other work on the machine shows here).
pub(crate) fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}
