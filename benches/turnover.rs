//! The turnover workload: windows that open and close all the time, checkpointed as the
//! service does, through the library's own decoder, engine, scheduler, sled store and
//! background writer, driven as the pipeline drives them (snapshot on the loop, write off it,
//! release on durability, each released window made as it is reached and acknowledged at
//! once in chunks of 4,096, as the sink does).
//!
//! Input: `--records` JSON records `{"user","amount","ts"}` over `--keys` keys, event time
//! advancing 1 ms per record with up to 2 s of disorder; a tumbling 10 s and a hopping
//! 30 s/10 s window; exactly-once (final windows wait for a durable checkpoint); a checkpoint
//! every `--interval-ms` (2,000) with at most one in flight. As the service does by default
//! (`output.max_pending_windows`), reading pauses while more than `--max-pending` (1,000,000;
//! 0: never) final windows wait, until half of them are released and acknowledged.
//! `--ack-delay-ms N` (0) makes the output lag: a released window is acknowledged only N ms
//! after its release, as by an output cluster that is slow to answer; `--rate N` (0: as fast
//! as it can) reads at most N records per second of wall time, as a steady input arrives. The end
//! of input closes every window (a record far in the future), and the run ends once every window is
//! written and released. The records are generated on the loop (their formatting is included in the
//! CPU time).
//!
//! Reports records per CPU-second of the process, wall time, checkpoint durations and
//! snapshot stalls (p50/p99/max, and of them the loop's time on a CPU and waiting for one; the
//! loop's page faults in a snapshot, and for each stall over 2 ms its page faults and the
//! machine's ticks of hypervisor steal),
//! peak RSS of the run (`VmHWM`), the bytes the checkpoints wrote beside what the store wrote
//! to the disk (the process's `write_bytes`, less the benchmark's copies of the store), the
//! store's size on disk, and the time and peak RSS of
//! reopening the store and restoring its newest checkpoint in a new process, as a start does
//! (groups read and counted, the compatibility report, groups decoded as installed), split
//! into opening the store, reading its groups and installing them, with the restore's CPU
//! time in user code and in the kernel (first touches of fresh memory are kernel time) and
//! what it wrote to the disk (sled overwrites each free segment of its file when it opens it):
//! once for a crash image of the store taken when the full checkpoint below was durable, and
//! once for the store after the run. Before they run, this process hands the memory of the
//! dropped run back to the system (sled's deferred frees collected, then jemalloc's background
//! threads until its RSS stops falling), as the exit of a crashed process would; its RSS then
//! is reported.
//! `--max-seconds` (900) and `--max-rss-gib` (16) stop a run that goes past them (reported as
//! stopped, with how far it got).
//!
//! Run: `cargo bench --bench turnover -- --keys 10000` (release build). `--key-groups N` sets
//! the new store's key groups (the service's `state.key_groups`; its default otherwise), and
//! `--retained N` the checkpoints it retains (`checkpoint.retained`; 3 otherwise).
//! `--window-ms N` sets the tumbling size (the hopping window is 3N every N); `--keys-in-order`
//! takes keys in turn, so that `--records 10000000 --keys 10000000 --window-ms 100000000` holds 10M
//! live keys. Before the run ends, a full checkpoint of the state as it is then is timed
//! (`full checkpoint`), with the bytes it wrote (the whole state encoded: every group's key and
//! sealed blob, and the checkpoint's metadata), the store's size on disk once it was durable,
//! and their ratio; then what the retained checkpoints held in it (every key and value it
//! held, [`Store::held_bytes`]), and with `--fresh-copy` the size of a copy of all that into
//! a new sled database right after its flush and once reopened, and the copy's time (what
//! rebuilding the store would leave; not counted in the run's CPU or wall time, but its
//! memory counts in the peak RSS and its writes can slow the restores that follow). The
//! restores run this executable again with the same flags and
//! `--restore-from PATH` (it reopens the store at PATH, restores, reports, with the store's
//! size on disk once opened, and exits).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use checkpointer::checkpoint::compat;
use checkpointer::checkpoint::history::{CheckpointRecord, Status};
use checkpointer::checkpoint::protocol::{meta_of, InputSpec};
use checkpointer::checkpoint::scheduler::Trigger;
use checkpointer::checkpoint::{Checkpoint, Scheduler, SchedulerSettings, StateSpec};
use checkpointer::checkpoint_id::CheckpointId;
use checkpointer::engine::{
    AggregateKind, Decoder, Engine, EngineConfig, FieldSource, GroupLayout, TimeSource, WindowDef,
    WindowKind, RECORDS_AHEAD,
};
use checkpointer::position::{OffsetReset, Partition};
use checkpointer::store::writer::{self, Job, WriteJob, WriteOutcome};
use checkpointer::store::{Checkpoints, Open, Retention, Store};

/// The topic the records are read from.
const TOPIC: &str = "in";
const T0: i64 = 1_700_000_000_000;
const DISORDER_MS: u64 = 2_000;
const PARTITIONS: i32 = 4;
/// Acknowledgements per call, as the sink sends them back.
const ACK_CHUNK: usize = 4_096;

struct Args {
    records: u64,
    keys: u64,
    interval: Duration,
    max_seconds: u64,
    max_rss_gib: u64,
    /// Tumbling window size; the hopping window is 3x as long, hopping by it.
    window_ms: i64,
    /// Keys in turn (`u0`, `u1`, ...) instead of at random: with `--records` equal to
    /// `--keys` and windows longer than the run, every key is live at the end.
    keys_in_order: bool,
    /// The service's `output.max_pending_windows`: past this many final windows waiting,
    /// reading pauses until half of them are released and acknowledged (0: never).
    max_pending: usize,
    /// Acknowledgements held back this long after the release (an output that lags).
    ack_delay: Duration,
    /// Records per second of wall time at most (0: as fast as the loop goes).
    rate: u64,
    /// Key groups of the new store (the service's `state.key_groups`).
    key_groups: u16,
    /// Checkpoints the store retains (the service's `checkpoint.retained`).
    retained: usize,
    /// At the full checkpoint, copy what the store holds into a new sled database and report
    /// its size (`--fresh-copy`).
    fresh_copy: bool,
    /// Child mode: restore this store copy (`--restore-from PATH`), report, exit.
    restore_from: Option<std::path::PathBuf>,
}

fn args() -> Args {
    let mut a = Args {
        records: 2_000_000,
        keys: 10_000,
        interval: Duration::from_millis(2_000),
        max_seconds: 900,
        max_rss_gib: 16,
        window_ms: 10_000,
        keys_in_order: false,
        fresh_copy: false,
        restore_from: None,
        max_pending: 1_000_000,
        ack_delay: Duration::ZERO,
        rate: 0,
        key_groups: checkpointer::engine::group::DEFAULT_GROUPS,
        retained: Retention::default().checkpoints,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--keys-in-order" {
            a.keys_in_order = true;
            continue;
        }
        if flag == "--fresh-copy" {
            a.fresh_copy = true;
            continue;
        }
        if flag == "--restore-from" {
            a.restore_from = it.next().map(Into::into);
            continue;
        }
        let mut value = || {
            it.next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("{flag} needs a number"))
        };
        match flag.as_str() {
            "--records" => a.records = value(),
            "--keys" => a.keys = value(),
            "--interval-ms" => a.interval = Duration::from_millis(value()),
            "--max-seconds" => a.max_seconds = value(),
            "--max-rss-gib" => a.max_rss_gib = value(),
            "--window-ms" => a.window_ms = value() as i64,
            "--max-pending" => a.max_pending = value() as usize,
            "--ack-delay-ms" => a.ack_delay = Duration::from_millis(value()),
            "--rate" => a.rate = value(),
            "--retained" => a.retained = (value() as usize).max(1),
            "--key-groups" => {
                a.key_groups = u16::try_from(value())
                    .ok()
                    .filter(|&g| g > 0)
                    .unwrap_or_else(|| panic!("--key-groups takes 1 to 65535"))
            }
            // cargo bench passes --bench
            _ => {}
        }
    }
    a
}

/// CPU seconds (user + system) of this process so far.
fn cpu_seconds() -> f64 {
    let (user, system) = cpu_split();
    user + system
}

/// CPU seconds of this process in user code and in the kernel (page faults among them).
fn cpu_split() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // fields after the command name, which is in parentheses
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name
    (ticks(11) / 100.0, ticks(12) / 100.0)
}

/// Bytes this process (and its children once reaped) had written to the disk so far, from
/// `/proc/self/io`: the pages its writes dirtied (`write_bytes`) less those dropped before
/// they were written back (`cancelled_write_bytes`: files deleted or truncated first); `None`
/// where the kernel does not say.
fn disk_written() -> Option<u64> {
    let dirtied = proc_field("/proc/self/io", "write_bytes:")?;
    let cancelled = proc_field("/proc/self/io", "cancelled_write_bytes:")?;
    Some(dirtied.saturating_sub(cancelled))
}

/// A number after `field` at the start of a line of `file` (a unit after it, such as `kB`,
/// left out).
fn proc_field(file: &str, field: &str) -> Option<u64> {
    std::fs::read_to_string(file)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// MiB of `bytes`, or "unknown".
fn mib_or_unknown(bytes: Option<u64>) -> String {
    bytes.map_or("unknown".into(), |b| format!("{:.1}", b as f64 / 1048576.0))
}

/// Peak resident set size of this process, bytes.
fn peak_rss() -> u64 {
    status_kib("VmHWM:") * 1024
}

/// Resident set size of this process now, bytes.
fn rss() -> u64 {
    status_kib("VmRSS:") * 1024
}

/// Frees what sled retired and left for later: sled frees its replaced and dropped pages
/// through crossbeam-epoch, only when some thread pins an epoch afterwards, so a dropped store
/// of 10M keys still held 1.2 GB here until this process pinned again (a process's exit frees
/// it all).
fn collect_sled_garbage() {
    for _ in 0..4096 {
        crossbeam_epoch::pin().flush();
    }
}

/// Gives the memory the dropped run freed back to the system before the restores run, as the
/// exit of a process that crashed or stopped does: jemalloc gives freed memory back only while
/// it is called, or from its background threads (on where the binary is built so), and this
/// process waits idle while a restore runs, so without them it would keep the run's memory and
/// the restore would get memory the machine had not used lately (see docs/benchmarks.md on the
/// 10M restores). Waits until the RSS stops falling (at most 30 s); returns the RSS before and
/// after.
fn release_freed_memory() -> (u64, u64) {
    let before = rss();
    // on already where the binary is built so (see .cargo/config.toml); left as found
    let was_on = tikv_jemalloc_ctl::background_thread::read().unwrap_or(false);
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        eprintln!("could not start jemalloc's background threads ({e}): the restores run beside the run's freed memory");
        return (before, before);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = before;
    let mut steady = 0;
    // freed memory goes back after the allocator's decay time (one second),
    // a little at a time: wait until two seconds in a row gave back less than 8 MiB
    while Instant::now() < deadline && steady < 2 {
        std::thread::sleep(Duration::from_secs(1));
        let now = rss();
        steady = if last.saturating_sub(now) < 8 << 20 {
            steady + 1
        } else {
            0
        };
        last = now;
    }
    let _ = tikv_jemalloc_ctl::background_thread::write(was_on);
    (before, rss())
}

/// This thread's time on a CPU and waiting for one, in seconds
/// (`/proc/thread-self/schedstat`): a stall longer than its time on a CPU was spent preempted.
fn thread_sched() -> (f64, f64) {
    let raw = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    let mut fields = raw
        .split_whitespace()
        .map(|f| f.parse::<f64>().unwrap_or(0.0));
    let on_cpu = fields.next().unwrap_or(0.0) / 1e9;
    let waiting = fields.next().unwrap_or(0.0) / 1e9;
    (on_cpu, waiting)
}

/// This thread's minor page faults so far (`/proc/thread-self/stat`): pages the kernel
/// handed it, fresh or back from the allocator.
fn thread_faults() -> u64 {
    let raw = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    // the fields after the command name (which may hold spaces): state, ppid, pgrp, session,
    // tty, tpgid, flags, minflt
    raw.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(7))
        .and_then(|f| f.parse().ok())
        .unwrap_or(0)
}

/// Time the machine's CPUs were stolen by the hypervisor, in ticks of 10 ms (`/proc/stat`,
/// every CPU): a virtual CPU the host takes away keeps counting as running in the guest.
fn steal_ticks() -> u64 {
    let raw = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    // cpu user nice system idle iowait irq softirq steal
    raw.lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(8))
        .and_then(|f| f.parse().ok())
        .unwrap_or(0)
}

/// A `/proc/self/status` field in kB.
fn status_kib(field: &str) -> u64 {
    proc_field("/proc/self/status", field).unwrap_or(0)
}

fn percentiles(mut v: Vec<f64>) -> String {
    if v.is_empty() {
        return "-".to_string();
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    format!(
        "p50 {:.3} s, p99 {:.3} s, max {:.3} s",
        at(0.5),
        at(0.99),
        at(1.0)
    )
}

/// The loop's snapshot stalls: each one's length, the loop's time on a CPU and waiting for
/// one meanwhile, its page faults, and the machine's ticks of steal.
#[derive(Default)]
struct Stalls {
    secs: Vec<f64>,
    on_cpu: Vec<f64>,
    waiting: Vec<f64>,
    faults: Vec<u64>,
    steal: Vec<u64>,
}

impl Stalls {
    /// Runs `snapshot` on the loop, measured as one stall.
    fn measure<T>(&mut self, snapshot: impl FnOnce() -> T) -> T {
        let (t, sched, faults, steal) = (
            Instant::now(),
            thread_sched(),
            thread_faults(),
            steal_ticks(),
        );
        let out = snapshot();
        self.secs.push(t.elapsed().as_secs_f64());
        let after = thread_sched();
        self.on_cpu.push(after.0 - sched.0);
        self.waiting.push(after.1 - sched.1);
        self.faults.push(thread_faults().saturating_sub(faults));
        self.steal.push(steal_ticks().saturating_sub(steal));
        out
    }

    fn report(self) {
        // the long stalls with their page faults, before the percentiles sort the stalls
        let long: Vec<String> = self
            .secs
            .iter()
            .zip(self.faults.iter().zip(&self.steal))
            .filter(|(s, _)| **s > 0.002)
            .map(|(s, (f, st))| {
                format!(
                    "{:.0} ms with {f} page faults and {st} ticks of steal",
                    s * 1000.0
                )
            })
            .collect();
        let mut faults = self.faults;
        faults.sort_unstable();
        println!("snapshot stalls: {}", percentiles(self.secs));
        println!(
            "  of which on a CPU: {}; waiting for a CPU: {}",
            percentiles(self.on_cpu),
            percentiles(self.waiting)
        );
        println!(
            "  the loop's page faults in a snapshot: p50 {}, max {}; stalls over 2 ms: {}",
            faults.get(faults.len() / 2).copied().unwrap_or(0),
            faults.last().copied().unwrap_or(0),
            if long.is_empty() {
                "none".to_string()
            } else {
                long.join(", ")
            }
        );
    }
}

/// A small deterministic generator (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// What the checkpoints record of the configuration (as the service's do), so that a restore
/// assesses it as a start would.
fn state_spec(a: &Args) -> StateSpec {
    StateSpec {
        windows: engine_config(a, GroupLayout::default()).windows,
        aggregates: vec![
            AggregateKind::Count,
            AggregateKind::Sum,
            AggregateKind::Min,
            AggregateKind::Max,
            AggregateKind::Mean,
        ],
        input: Some(InputSpec {
            key: "/user".into(),
            timestamp: "/ts".into(),
            value: Some("/amount".into()),
        }),
        retired: Vec::new(),
        partition_scoped: false,
    }
}

fn engine_config(a: &Args, groups: GroupLayout) -> EngineConfig {
    EngineConfig {
        windows: vec![
            WindowDef {
                name: "tumble".into(),
                kind: WindowKind::Tumbling { size: a.window_ms },
            },
            WindowDef {
                name: "hop".into(),
                kind: WindowKind::Hopping {
                    size: 3 * a.window_ms,
                    hop: a.window_ms,
                },
            },
        ],
        max_out_of_orderness: DISORDER_MS as i64,
        allowed_lateness: 0,
        hold_until_checkpoint: true,
        partition_scoped: false,
        groups,
    }
}

/// Child mode: reopens the store at `path`, restores its newest checkpoint into an engine as
/// a start would, and prints the time it took and this process's peak RSS.
fn restore_child(a: &Args, path: &std::path::Path) {
    let t = Instant::now();
    // seconds spent opening the store (sled replays its log), reading and checking the
    // groups (with the compatibility report), and installing them in the engine
    let mut phases = [0.0f64; 3];
    // the store's size once sled opened it (which may free what it replaced)
    let mut opened_bytes = 0u64;
    let outcome = Store::open(path, Open::Create).and_then(|store| {
        phases[0] = t.elapsed().as_secs_f64();
        opened_bytes = store.size_on_disk()?;
        let layout = store.layout()?;
        let Some(&id) = store.checkpoint_ids()?.last() else {
            return Ok(None);
        };
        // as a start does: groups read and counted but kept encoded, assessed against the
        // configuration (here the stored one), then decoded one at a time as installed
        let (meta, state) = store.load_checkpoint_stored(id)?;
        let topics = vec![TOPIC.to_string()];
        let report = compat::assess(
            &meta.spec,
            &state,
            compat::Target {
                spec: &meta.spec,
                topics: &topics,
                auto_offset_reset: OffsetReset::Earliest,
            },
        );
        let state = report.apply(state).state;
        let entries = state.len();
        phases[1] = t.elapsed().as_secs_f64() - phases[0];
        let engine = Engine::from_state(engine_config(a, layout), state);
        phases[2] = t.elapsed().as_secs_f64() - phases[0] - phases[1];
        Ok(Some((entries, engine)))
    });
    let took = t.elapsed().as_secs_f64();
    // what sled wrote while opening the store and the restore read it
    let wrote = mib_or_unknown(disk_written());
    let rss = peak_rss() as f64 / 1048576.0;
    // what the restored engine holds once the restore is done
    let held = self::rss() as f64 / 1048576.0;
    match outcome {
        Ok(Some((entries, Ok(engine)))) => {
            let open = engine.open_windows() + engine.pending_emissions();
            let [opened, read, installed] = phases;
            let (user, system) = cpu_split();
            println!(
                "{took:.2} s (open {opened:.2} s, read {read:.2} s, install {installed:.2} s; CPU {user:.2} s in user code, {system:.2} s in the kernel), peak RSS {rss:.1} MiB (RSS once done {held:.1} MiB), {entries} entries ({open} in the engine); the store {:.1} MiB on disk once opened, {wrote} MiB written to the disk",
                opened_bytes as f64 / 1048576.0
            );
        }
        other => println!(
            "FAILED: {:?}",
            other.map(|o| o.map(|(n, e)| (n, e.is_ok())))
        ),
    }
}

/// Runs `restore_child` on the store at `path` in a new process; its report.
fn restore_in_child(path: &std::path::Path) -> String {
    let exe = std::env::current_exe().expect("this executable");
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    args.extend(["--restore-from".to_string(), path.display().to_string()]);
    match std::process::Command::new(exe).args(&args).output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_string(),
        Ok(out) => format!(
            "FAILED ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => format!("FAILED to start: {e}"),
    }
}

/// The files sled keeps its large values in, under the store at `path`: how many, and their
/// bytes (part of [`Store::size_on_disk`]).
fn blob_files(path: &std::path::Path) -> (usize, u64) {
    let Ok(dir) = std::fs::read_dir(path.join("blobs")) else {
        return (0, 0);
    };
    dir.flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .fold((0, 0), |(n, bytes), m| (n + 1, bytes + m.len()))
}

/// `--fresh-copy`: copies what `store` holds into a new sled database at `path`; its size right
/// after the copy's flush, the copy's seconds, and its size once reopened (sled may free the
/// leaves the copy replaced only later). The copy is removed after.
fn fresh_copy(store: &Store, path: &std::path::Path) -> Result<(u64, f64, u64), String> {
    let t = Instant::now();
    let bytes = store.copy_to(path).map_err(|e| e.to_string())?;
    let took = t.elapsed().as_secs_f64();
    let reopened = Store::open(path, Open::Existing)
        .and_then(|copy| copy.size_on_disk())
        .map_err(|e| e.to_string());
    let removed = std::fs::remove_dir_all(path).map_err(|e| e.to_string());
    Ok((bytes, took, reopened.and_then(|r| removed.map(|()| r))?))
}

/// Copies directory `from` to `to` (a crash image of a store whose writer is idle).
fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            match std::fs::copy(entry.path(), target) {
                // sled replaces its snapshot file now and then: one gone is not part of the image
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                other => {
                    other?;
                }
            }
        }
    }
    Ok(())
}

fn main() {
    let a = args();
    if let Some(path) = a.restore_from.clone() {
        restore_child(&a, &path);
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("store");
    let store = Store::open(&path, Open::AsIs)
        .expect("store")
        .with_key_groups(a.key_groups)
        .with_retention(Retention {
            checkpoints: a.retained,
            ..Retention::default()
        });
    store.upgrade().expect("new store");
    let store = Arc::new(store);
    let checkpoints: Arc<dyn Checkpoints> = store.clone();
    let (jobs, mut outcomes) = {
        let _guard = runtime.enter();
        writer::spawn(checkpoints)
    };
    let layout = store.layout().expect("key-group layout");
    let mut engine = Engine::new(engine_config(&a, layout));
    let decoder = Decoder::new(
        FieldSource::Pointer("/user".into()),
        Some("/amount".into()),
        TimeSource::Pointer("/ts".into()),
    );
    let mut scheduler = Scheduler::new(
        SchedulerSettings {
            interval: a.interval,
            min_pause: Duration::ZERO,
            timeout: Duration::from_secs(3_600),
            max_concurrent: 1,
            tolerable_failures: 0,
        },
        CheckpointId(1),
        None,
    );
    let partitions: Vec<Partition> = (0..PARTITIONS).map(|n| Partition::new(TOPIC, n)).collect();
    let spec = state_spec(&a);
    engine.assign(&partitions);

    let started = Instant::now();
    let cpu_start = cpu_seconds();
    let disk_start = disk_written();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut offsets = vec![0i64; PARTITIONS as usize];
    let mut payloads = vec![String::with_capacity(96); RECORDS_AHEAD];
    let mut batch = Vec::with_capacity(RECORDS_AHEAD);
    let (mut emitted, mut durations, mut stalls) = (0u64, Vec::new(), Stalls::default());
    let mut in_flight: Option<(CheckpointId, Instant)> = None;
    let mut stopped: Option<String> = None;
    let mut next_rss_check = Instant::now();
    let mut consumed = 0u64;
    // the most final windows held at once (exactly-once holds them until a checkpoint)
    let mut most_held = 0usize;
    // reading paused by the output bound, and how many times it was
    let (mut paused, mut pauses) = (false, 0u64);
    // acknowledgements held back by `--ack-delay-ms`, in release order
    let mut lagging: std::collections::VecDeque<(Instant, Vec<_>)> = Default::default();
    // bytes the checkpoints wrote
    let mut written = 0u64;
    let total = a.records + PARTITIONS as u64; // the closing records
    let deadline = started + Duration::from_secs(a.max_seconds);

    // the full checkpoint timed at the end of the data (before the closing records)
    let mut full: Option<(CheckpointId, u64)> = None;
    let mut full_took: Option<f64> = None;
    // its encoded size (its groups' sealed blobs: the whole state) and the store's size on
    // disk once it was durable
    let mut full_size: Option<(u64, u64, (usize, u64))> = None;
    let mut full_held: Option<Result<u64, String>> = None;
    let mut fresh: Option<Result<(u64, f64, u64), String>> = None;
    // a crash image of the store taken when the full checkpoint was durable
    let full_copy = dir.path().join("full-copy");
    let mut full_copied = false;
    // the copy's time, taken out of the run's CPU and wall time, and its writes, out of the
    // store's
    let (mut copy_cpu, mut copy_wall, mut copy_disk) = (0.0, 0.0, Some(0u64));
    let checkpoint = |engine: &mut Engine,
                      scheduler: &mut Scheduler,
                      in_flight: &mut Option<(CheckpointId, Instant)>,
                      stalls: &mut Stalls,
                      force_full: bool| {
        let now = started.elapsed();
        if in_flight.is_some() || !(force_full || scheduler.due(now)) {
            return None;
        }
        if force_full {
            scheduler.restart_line();
        }
        let Trigger { id, base } = scheduler.trigger(now);
        // the checkpoint starts with its snapshot
        let t = Instant::now();
        let delta = stalls.measure(|| engine.snapshot(id, base.is_none()));
        let cp = Checkpoint {
            id,
            base,
            trigger_ms: T0,
            spec: spec.clone(),
            delta,
        };
        let record = CheckpointRecord::from_meta(&meta_of(&cp, 0, 0), Status::InProgress);
        let job = WriteJob {
            checkpoint: cp,
            record,
            savepoint: None,
            prune: None,
            started: t,
            abandoned: Arc::new(AtomicBool::new(false)),
        };
        if jobs.send(Job::Write(Box::new(job))).is_err() {
            panic!("writer gone");
        }
        *in_flight = Some((id, t));
        Some(id)
    };

    loop {
        // the writer's outcomes, as the pipeline settles them
        while let Ok(outcome) = outcomes.try_recv() {
            match outcome {
                WriteOutcome::Durable {
                    id,
                    duration,
                    stats,
                    ..
                } => {
                    written += stats.bytes;
                    if full.is_some_and(|(f, _)| f == id) {
                        full_took = Some(duration.as_secs_f64());
                        // keep a crash image of the store with it as the newest checkpoint (the
                        // writer is idle), restored in a new process after the run (the copy
                        // is not counted in the run's CPU)
                        let (cpu, t) = (cpu_seconds(), Instant::now());
                        let flushed = store.flush().map_err(|e| e.to_string());
                        // the flush's writes are the store's; what follows, the copies'
                        let disk = disk_written();
                        let copied = flushed
                            .and_then(|_| copy_dir(&path, &full_copy).map_err(|e| e.to_string()));
                        full_size = Some((
                            stats.bytes,
                            store.size_on_disk().unwrap_or(0),
                            blob_files(&path),
                        ));
                        full_held = Some(store.held_bytes().map_err(|e| e.to_string()));
                        if a.fresh_copy {
                            fresh = Some(fresh_copy(&store, &dir.path().join("fresh")));
                        }
                        match copied {
                            Ok(()) => full_copied = true,
                            Err(e) => eprintln!("no copy of the store at the full checkpoint: {e}"),
                        }
                        copy_cpu += cpu_seconds() - cpu;
                        copy_wall += t.elapsed().as_secs_f64();
                        copy_disk =
                            copy_disk.and_then(|c| Some(c + disk_written()?.saturating_sub(disk?)));
                    }
                    scheduler.completed(id, started.elapsed());
                    engine.checkpoint_completed(id);
                    durations.push(duration.as_secs_f64());
                    in_flight = None;
                }
                other => panic!("checkpoint not written: {other:?}"),
            }
        }
        let held = engine.pending_emissions();
        most_held = most_held.max(held);
        // as `output.max_pending_windows` does in the service: past the bound, reading pauses
        // until the final windows waiting fell to half of it
        if a.max_pending > 0 {
            if !paused && held > a.max_pending {
                paused = true;
                pauses += 1;
            } else if paused && held <= a.max_pending / 2 {
                paused = false;
            }
        }
        // as the sink does: each window made as it is reached, acknowledged in chunks
        let mut released = engine.take_emission().into_windows();
        let now = Instant::now();
        loop {
            let acks: Vec<_> = released.by_ref().take(ACK_CHUNK).map(|w| w.id).collect();
            if acks.is_empty() {
                break;
            }
            emitted += acks.len() as u64;
            lagging.push_back((now + a.ack_delay, acks));
        }
        while lagging.front().is_some_and(|(due, _)| *due <= now) {
            if let Some((_, acks)) = lagging.pop_front() {
                engine.emitted(acks);
            }
        }
        if consumed == total {
            if in_flight.is_none() && engine.pending_emissions() == 0 && !engine.has_changes() {
                break;
            }
            checkpoint(
                &mut engine,
                &mut scheduler,
                &mut in_flight,
                &mut stalls,
                false,
            );
            std::thread::sleep(Duration::from_millis(1));
        } else if paused
            || (a.rate > 0
                && consumed < a.records
                && consumed as f64 > started.elapsed().as_secs_f64() * a.rate as f64)
        {
            // the service's output back-pressure: no reading while the backlog drains; or
            // ahead of the input's rate: wait for it, checkpointing on time meanwhile
            checkpoint(
                &mut engine,
                &mut scheduler,
                &mut in_flight,
                &mut stalls,
                false,
            );
            std::thread::sleep(Duration::from_millis(1));
        } else if consumed == a.records && full.is_none() {
            // the state at its largest: time a full checkpoint of it
            let entries = (engine.open_windows() + engine.pending_emissions()) as u64;
            match checkpoint(
                &mut engine,
                &mut scheduler,
                &mut in_flight,
                &mut stalls,
                true,
            ) {
                Some(id) => full = Some((id, entries)),
                None => std::thread::sleep(Duration::from_millis(1)),
            }
        } else {
            // 1,024 records between checkpoint polls, as the service decodes them: in batches
            // of RECORDS_AHEAD, each batch's state asked for before its first record is
            // processed
            for _ in 0..1_024 / RECORDS_AHEAD {
                batch.clear();
                while batch.len() < RECORDS_AHEAD {
                    let next = consumed + batch.len() as u64;
                    if next == total || (next == a.records && full.is_none()) {
                        break;
                    }
                    let (p, ts, user) = if next < a.records {
                        let jitter = rng.next() % DISORDER_MS;
                        let ts = T0 + next as i64 - jitter as i64;
                        let user = if a.keys_in_order {
                            next % a.keys
                        } else {
                            rng.next() % a.keys
                        };
                        ((rng.next() % PARTITIONS as u64) as usize, ts, user)
                    } else {
                        // one record per partition an hour ahead: every window of the data
                        // closes
                        let p = (next - a.records) as usize;
                        (p, T0 + a.records as i64 + 3_600_000, 0)
                    };
                    let payload = &mut payloads[batch.len()];
                    payload.clear();
                    use std::fmt::Write as _;
                    let _ = write!(payload, r#"{{"user":"u{user}","amount":1,"ts":{ts}}}"#);
                    batch.push(p);
                }
                if batch.is_empty() {
                    break;
                }
                let decoded: smallvec::SmallVec<[_; RECORDS_AHEAD]> = payloads[..batch.len()]
                    .iter()
                    .map(|payload| decoder.decode(None, Some(payload.as_bytes()), None))
                    .collect();
                engine.prefetch_records(
                    batch
                        .iter()
                        .zip(&decoded)
                        .map(|(&p, record)| (&partitions[p], record)),
                );
                for (&p, record) in batch.iter().zip(decoded) {
                    let offset = offsets[p];
                    offsets[p] += 1;
                    engine.process(&partitions[p], offset, record);
                    consumed += 1;
                }
            }
            checkpoint(
                &mut engine,
                &mut scheduler,
                &mut in_flight,
                &mut stalls,
                false,
            );
        }
        if Instant::now() >= deadline {
            stopped = Some(format!("--max-seconds {}", a.max_seconds));
            break;
        }
        if next_rss_check.elapsed() >= Duration::from_millis(200) {
            next_rss_check = Instant::now();
            if rss() >= a.max_rss_gib << 30 {
                stopped = Some(format!("--max-rss-gib {}", a.max_rss_gib));
                break;
            }
        }
    }
    let wall = started.elapsed().as_secs_f64() - copy_wall;
    let cpu = cpu_seconds() - cpu_start - copy_cpu;
    // what sled wrote: the run's writes less the benchmark's copies of the store
    let store_disk = disk_written()
        .zip(disk_start)
        .zip(copy_disk)
        .map(|((now, start), copies)| now.saturating_sub(start.saturating_add(copies)));
    let rss = peak_rss();
    let store_bytes = store.size_on_disk().unwrap_or(0);
    let (blobs, blob_bytes) = blob_files(&path);
    let pending = engine.pending_emissions();
    // an outcome not read yet would hold the checkpoint it wrote, and so groups of the state
    drop(jobs);
    drop(outcomes);
    drop(engine);
    drop(store);
    runtime.shutdown_timeout(Duration::from_secs(60));
    collect_sled_garbage();
    let (held, released) = release_freed_memory();
    // restores in new processes, one after the other, this one idle
    let full_restore = full_copied.then(|| restore_in_child(&full_copy));
    let restore = stopped.is_none().then(|| restore_in_child(&path));

    println!(
        "turnover: {} records, {} keys in {} key groups, checkpoint every {:?}, {} retained, acknowledgements {:?} after release, at most {} records/s (0: no bound)",
        a.records, a.keys, a.key_groups, a.interval, a.retained, a.ack_delay, a.rate
    );
    if let Some(why) = &stopped {
        println!("STOPPED after {wall:.0} s ({why}): {consumed} of {total} records read, {pending} windows not released");
    }
    println!(
        "wall {wall:.1} s, CPU {cpu:.1} s, {:.0} records per CPU-second",
        consumed as f64 / cpu.max(1e-9)
    );
    println!("windows emitted {emitted}; at most {most_held} final windows held at once; reading paused {pauses} times past {} of them", a.max_pending);
    println!(
        "checkpoints {}: {}",
        durations.len(),
        percentiles(durations)
    );
    // a stopped run's checkpoint in flight has written to the disk but not reported its bytes
    let ratio = match store_disk {
        Some(d) if stopped.is_none() => {
            format!(", {:.2} times that", d as f64 / written.max(1) as f64)
        }
        _ => String::new(),
    };
    println!(
        "checkpoints wrote {:.1} MiB in all; the store wrote {} MiB to the disk{ratio} (sled's log, blob files and metadata; the benchmark's copies of the store left out)",
        written as f64 / 1048576.0,
        mib_or_unknown(store_disk),
    );
    stalls.report();
    match (full, full_took) {
        (Some((_, entries)), Some(took)) => {
            println!("full checkpoint at the end of the data: {took:.3} s for {entries} live window-keys")
        }
        _ => println!("full checkpoint at the end of the data: not reached"),
    }
    if let Some((encoded, on_disk, (blobs, blob_bytes))) = full_size {
        println!(
            "the state it encoded {:.1} MiB; the store then {:.1} MiB on disk ({:.1} MiB of it in {blobs} sled blob files), {:.2} times the encoded state",
            encoded as f64 / 1048576.0,
            on_disk as f64 / 1048576.0,
            blob_bytes as f64 / 1048576.0,
            on_disk as f64 / encoded.max(1) as f64
        );
    }
    match (full_size, full_held) {
        (Some((encoded, on_disk, _)), Some(Ok(held))) => println!(
            "the retained checkpoints then held {:.1} MiB in the store (their group versions, metadata and history), {:.2} times the encoded state; the store on disk {:.2} times that",
            held as f64 / 1048576.0,
            held as f64 / encoded.max(1) as f64,
            on_disk as f64 / held.max(1) as f64
        ),
        (_, Some(Err(e))) => println!("what the store held: FAILED: {e}"),
        _ => {}
    }
    match fresh {
        Some(Ok((bytes, took, reopened))) => println!(
            "a copy of everything the store then held into a new sled database: {:.1} MiB on disk right after its flush, in {took:.2} s; {:.1} MiB once reopened",
            bytes as f64 / 1048576.0,
            reopened as f64 / 1048576.0
        ),
        Some(Err(e)) => println!("a copy of the store into a new sled database FAILED: {e}"),
        None => {}
    }
    println!(
        "this process's RSS once the run's state was dropped {:.1} MiB, when the restores ran {:.1} MiB",
        held as f64 / 1048576.0,
        released as f64 / 1048576.0
    );
    match full_restore {
        Some(report) => println!("reopen + restore of that checkpoint in a new process: {report}"),
        None => println!("reopen + restore of that checkpoint: not reached"),
    }
    println!("peak RSS of the run {:.1} MiB", rss as f64 / 1048576.0);
    println!(
        "store on disk {:.1} MiB ({:.1} MiB of it in {blobs} sled blob files)",
        store_bytes as f64 / 1048576.0,
        blob_bytes as f64 / 1048576.0
    );
    match restore {
        None => println!("reopen + restore after the run not measured (the run was stopped)"),
        Some(report) => println!("reopen + restore after the run in a new process: {report}"),
    }
}
