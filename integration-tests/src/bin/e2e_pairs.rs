//! Two builds of the service end to end, in interleaved pairs, run by hand (never in CI):
//! `scripts/bench-e2e-pairs.sh --a NAME=BINARY --b NAME=BINARY [--pairs N (3)] [--out DIR]
//! [--env-a KEY=VALUE] [--env-b KEY=VALUE] [-- e2e_bench flags]`.
//!
//! This machine kind's speed moves by a third within minutes, so two builds are compared only
//! run beside run: pair `i` runs `e2e_bench` (the binary next to this one) with A's service,
//! then with B's, the order swapped every other pair so that neither always runs first. Each
//! run's table and JSON go to `DIR/<name>-<pair>.log` and `.json`; the pairs and their
//! medians are printed as one markdown table and written to `DIR/summary.md`. `--env-a` and
//! `--env-b` (repeatable) set environment variables for one side's runs of `e2e_bench` (its
//! broker, bare consume and service alike), e.g. an allocator option of the service
//! (`_RJEM_MALLOC_CONF=background_thread:false`) on the same binary; not the service's own
//! `CHECKPOINTER_*` settings, which the harness never passes to it (refused). A run that fails or
//! leaves no JSON is reported as failed, the others still run, and the exit code is 1. A run
//! that is not exact (stopped by a timeout or the RSS limit, a window lost or repeated) is a
//! result: shown as such, and left out of the medians and ratios.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use integration_tests::{grouped, workspace_dir};
use serde_json::Value;

const USAGE: &str = "usage: e2e_pairs --a NAME=BINARY --b NAME=BINARY [--pairs N (3)] \
[--out DIR (target/e2e-pairs/<unix seconds>)] [--env-a KEY=VALUE] [--env-b KEY=VALUE] \
[-- e2e_bench flags, e.g. --keys 1000000 --timeout 12m]";

/// One build under comparison.
#[derive(Debug, Clone, PartialEq)]
struct Side {
    name: String,
    binary: PathBuf,
    env: BTreeMap<String, String>,
}

#[derive(Debug)]
struct Args {
    a: Side,
    b: Side,
    pairs: usize,
    out: PathBuf,
    bench_args: Vec<String>,
}

fn key_value(flag: &str, value: &str) -> Result<(String, String)> {
    value
        .split_once('=')
        .filter(|(k, _)| !k.trim().is_empty())
        .map(|(k, v)| (k.trim().to_string(), v.to_string()))
        .ok_or_else(|| anyhow!("{flag} needs KEY=VALUE, got {value:?}\n{USAGE}"))
}

/// `--env-a`/`--env-b KEY=VALUE`. A `CHECKPOINTER_*` variable is refused: the harness starts
/// the service without any of them (its configuration is e2e_bench's own file), so it would
/// change nothing while the table says it did.
fn env_value(flag: &str, value: &str) -> Result<(String, String)> {
    let (k, v) = key_value(flag, value)?;
    ensure!(
        !k.starts_with("CHECKPOINTER_"),
        "{flag} {k}: e2e_bench starts the service without the CHECKPOINTER_* variables (its configuration is the benchmark's own), so this would change nothing; compare two binaries built with the setting instead"
    );
    Ok((k, v))
}

fn parse_args(args: impl Iterator<Item = String>, now: u64) -> Result<Args> {
    let mut a = None;
    let mut b = None;
    let mut env_a = BTreeMap::new();
    let mut env_b = BTreeMap::new();
    let mut pairs = 3;
    let mut out = None;
    let mut bench_args = Vec::new();
    let mut it = args;
    while let Some(flag) = it.next() {
        if flag == "--" {
            bench_args.extend(it.by_ref());
            break;
        }
        if flag == "-h" || flag == "--help" {
            bail!("{USAGE}");
        }
        let value = it
            .next()
            .ok_or_else(|| anyhow!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--a" => a = Some(key_value(&flag, &value)?),
            "--b" => b = Some(key_value(&flag, &value)?),
            "--env-a" => {
                let (k, v) = env_value(&flag, &value)?;
                env_a.insert(k, v);
            }
            "--env-b" => {
                let (k, v) = env_value(&flag, &value)?;
                env_b.insert(k, v);
            }
            "--pairs" => {
                pairs = value
                    .parse()
                    .with_context(|| format!("--pairs: not a number: {value:?}"))?
            }
            "--out" => out = Some(PathBuf::from(value)),
            other => bail!("unknown argument {other:?} (e2e_bench's flags go after `--`)\n{USAGE}"),
        }
    }
    let side = |given: Option<(String, String)>, env, flag: &str| -> Result<Side> {
        let (name, binary) =
            given.ok_or_else(|| anyhow!("{flag} NAME=BINARY is required\n{USAGE}"))?;
        ensure!(!binary.is_empty(), "{flag} {name}=: no binary given");
        ensure!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
            "{flag}: the name {name:?} names files: letters, digits, '-', '_' and '.' only"
        );
        Ok(Side {
            name,
            binary: PathBuf::from(binary),
            env,
        })
    };
    let a = side(a, env_a, "--a")?;
    let b = side(b, env_b, "--b")?;
    ensure!(
        a.name != b.name,
        "--a and --b need different names, both are {:?}",
        a.name
    );
    ensure!(pairs >= 1, "--pairs must be at least 1");
    ensure!(
        !bench_args.iter().any(|arg| arg == "--json"),
        "--json is set by e2e_pairs for each run (DIR/<name>-<pair>.json)"
    );
    let out = out.unwrap_or_else(|| workspace_dir().join(format!("target/e2e-pairs/{now}")));
    Ok(Args {
        a,
        b,
        pairs,
        out,
        bench_args,
    })
}

/// Which side runs first in pair `pair` (1-based): A in odd pairs, B in even ones.
fn a_first(pair: usize) -> bool {
    !pair.is_multiple_of(2)
}

/// The figures of one run, from `e2e_bench --json`.
#[derive(Debug, Clone, PartialEq)]
struct Figures {
    records_per_cpu_s: f64,
    /// Absent when the bench never saw the whole input consumed.
    share_of_bare: Option<f64>,
    peak_rss_gib: f64,
    longest_checkpoint_s: Option<f64>,
    longest_snapshot_ms: Option<f64>,
    /// Every window of the data emitted, none twice, none outside the model.
    exact: bool,
    outcome: String,
}

fn figures(json: &Value) -> Result<Figures> {
    let num = |field: &str| -> Result<f64> {
        json.get(field)
            .and_then(Value::as_f64)
            .ok_or_else(|| anyhow!("the run's JSON has no number {field:?}"))
    };
    let outcome = json
        .get("service_outcome")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("the run's JSON has no \"service_outcome\""))?
        .to_string();
    let exact = outcome == "Complete"
        && num("output_duplicates")? == 0.0
        && num("output_unexpected")? == 0.0
        && num("output_windows")? == num("workload_windows")?;
    Ok(Figures {
        records_per_cpu_s: num("service_records_per_cpu_s")?,
        share_of_bare: json.get("service_ratio_to_bare").and_then(Value::as_f64),
        peak_rss_gib: num("service_peak_rss_gib")?,
        longest_checkpoint_s: json
            .pointer("/api_checkpoint_duration/max")
            .and_then(Value::as_f64),
        longest_snapshot_ms: json.get("api_snapshot_max_ms").and_then(Value::as_f64),
        exact,
        outcome,
    })
}

/// The median of `values`, `None` when there are none.
fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

/// A run's figures, or why there are none.
type Run = std::result::Result<Figures, String>;

/// A rate as the tables show it: whole, in groups of three digits.
fn grouped0(x: f64) -> String {
    grouped(x, 0)
}

/// The pairs as one markdown table with a median row, and a line saying how often B read
/// more than A. Only exact runs count in the medians and the ratios: a run stopped early
/// (a timeout, the RSS limit) divides every input record by the CPU it used, read or not.
fn summary(a: &str, b: &str, pairs: &[(Run, Run)]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| pair | first | {a}: records per CPU-second | {b} | {b} ÷ {a} | {a}: share of the bare consume | {b} | {a}: peak RSS GiB | {b} | {a}: longest checkpoint s | {b} | {a}: longest snapshot ms | {b} | {a}: exact | {b} |"
    );
    let _ = writeln!(out, "|{}", "---|".repeat(15));
    let opt =
        |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |v| format!("{v:.digits$}"));
    let exact = |r: &Run| r.as_ref().ok().filter(|f| f.exact).cloned();
    let mut ratios = Vec::new();
    // per side (A, B): rate, share, peak RSS, longest checkpoint, longest snapshot
    let mut cols: [[Vec<f64>; 5]; 2] = Default::default();
    for (i, (ra, rb)) in pairs.iter().enumerate() {
        let pair = i + 1;
        let first = if a_first(pair) { a } else { b };
        let cell = |r: &Run, f: &dyn Fn(&Figures) -> String| match r {
            Ok(fig) => f(fig),
            Err(_) => "failed".to_string(),
        };
        for (side, r) in [ra, rb].into_iter().enumerate() {
            if let Some(f) = exact(r) {
                let c = &mut cols[side];
                c[0].push(f.records_per_cpu_s);
                c[1].extend(f.share_of_bare);
                c[2].push(f.peak_rss_gib);
                c[3].extend(f.longest_checkpoint_s);
                c[4].extend(f.longest_snapshot_ms);
            }
        }
        let ratio = match (exact(ra), exact(rb)) {
            (Some(fa), Some(fb)) if fa.records_per_cpu_s > 0.0 => {
                let r = fb.records_per_cpu_s / fa.records_per_cpu_s;
                ratios.push(r);
                format!("{r:.2}")
            }
            _ => "-".to_string(),
        };
        let verdict = |f: &Figures| {
            if f.exact {
                "yes".to_string()
            } else {
                format!("**no** ({})", f.outcome)
            }
        };
        let _ = writeln!(
            out,
            "| {pair} | {first} | {} | {} | {ratio} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            cell(ra, &|f| grouped0(f.records_per_cpu_s)),
            cell(rb, &|f| grouped0(f.records_per_cpu_s)),
            cell(ra, &|f| opt(f.share_of_bare, 3)),
            cell(rb, &|f| opt(f.share_of_bare, 3)),
            cell(ra, &|f| format!("{:.3}", f.peak_rss_gib)),
            cell(rb, &|f| format!("{:.3}", f.peak_rss_gib)),
            cell(ra, &|f| opt(f.longest_checkpoint_s, 2)),
            cell(rb, &|f| opt(f.longest_checkpoint_s, 2)),
            cell(ra, &|f| opt(f.longest_snapshot_ms, 0)),
            cell(rb, &|f| opt(f.longest_snapshot_ms, 0)),
            cell(ra, &verdict),
            cell(rb, &verdict),
        );
    }
    let med = |side: usize, col: usize, digits: usize| opt(median(&cols[side][col]), digits);
    let _ = writeln!(
        out,
        "| median of the exact runs | | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | | |",
        median(&cols[0][0]).map_or("-".into(), grouped0),
        median(&cols[1][0]).map_or("-".into(), grouped0),
        opt(median(&ratios), 2),
        med(0, 1, 3),
        med(1, 1, 3),
        med(0, 2, 3),
        med(1, 2, 3),
        med(0, 3, 2),
        med(1, 3, 2),
        med(0, 4, 1),
        med(1, 4, 1),
    );
    let more = ratios.iter().filter(|r| **r > 1.0).count();
    let _ = writeln!(
        out,
        "\n{b} read more records per CPU-second than {a} in {more} of the {} pairs whose two runs were exact ({b} ÷ {a}: the median of those pairs' ratios).",
        ratios.len()
    );
    let runs = pairs.iter().flat_map(|(ra, rb)| [ra, rb]);
    let failed = runs.clone().filter(|r| r.is_err()).count();
    let inexact = runs.filter(|r| r.as_ref().is_ok_and(|f| !f.exact)).count();
    if failed > 0 {
        let _ = writeln!(out, "{failed} run(s) failed; see their logs.");
    }
    if inexact > 0 {
        let _ = writeln!(
            out,
            "{inexact} run(s) did not emit every window exactly; they are left out of the medians and ratios."
        );
    }
    out
}

/// Runs `e2e_bench` once for `side`, its table and progress to `DIR/<name>-<pair>.log`.
fn run(bench: &Path, args: &Args, side: &Side, pair: usize) -> Run {
    let base = args.out.join(format!("{}-{pair}", side.name));
    let json = base.with_extension("json");
    let log = base.with_extension("log");
    // a JSON left by an earlier use of the directory must not pass for this run's
    match std::fs::remove_file(&json) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(format!("{}: {e}", json.display()))
        }
        _ => {}
    }
    let file = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = file
        .try_clone()
        .map_err(|e| format!("{}: {e}", log.display()))?;
    eprintln!("pair {pair}: {} ({})", side.name, side.binary.display());
    let status = Command::new(bench)
        .args(&args.bench_args)
        .arg("--json")
        .arg(&json)
        .env("CHECKPOINTER_BIN", &side.binary)
        .envs(&side.env)
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .status()
        .map_err(|e| format!("{}: {e}", bench.display()))?;
    if !status.success() {
        return Err(format!("e2e_bench {status}; see {}", log.display()));
    }
    let text = std::fs::read_to_string(&json).map_err(|e| format!("{}: {e}", json.display()))?;
    let value: Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", json.display()))?;
    figures(&value).map_err(|e| format!("{}: {e}", json.display()))
}

fn main() -> Result<()> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if std::env::args()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "-h" || a == "--help")
    {
        println!("{USAGE}");
        return Ok(());
    }
    let mut args = parse_args(std::env::args().skip(1), now)?;
    for side in [&mut args.a, &mut args.b] {
        ensure!(
            side.binary.is_file(),
            "{}: no service binary at {}",
            side.name,
            side.binary.display()
        );
        // the runs are named by it in their logs: the whole path
        side.binary = std::fs::canonicalize(&side.binary)
            .with_context(|| side.binary.display().to_string())?;
    }
    let bench = std::env::current_exe()
        .context("this program's path")?
        .with_file_name("e2e_bench");
    ensure!(
        bench.is_file(),
        "no e2e_bench beside this program ({}): build it with `cargo build --release -p integration-tests --bin e2e_bench`",
        bench.display()
    );
    std::fs::create_dir_all(&args.out).with_context(|| args.out.display().to_string())?;
    let mut pairs = Vec::new();
    for pair in 1..=args.pairs {
        let (ra, rb) = if a_first(pair) {
            let ra = run(&bench, &args, &args.a, pair);
            (ra, run(&bench, &args, &args.b, pair))
        } else {
            let rb = run(&bench, &args, &args.b, pair);
            (run(&bench, &args, &args.a, pair), rb)
        };
        for r in [&ra, &rb] {
            if let Err(e) = r {
                eprintln!("pair {pair}: failed: {e}");
            }
        }
        pairs.push((ra, rb));
    }
    let table = summary(&args.a.name, &args.b.name, &pairs);
    let path = args.out.join("summary.md");
    std::fs::write(&path, &table).with_context(|| path.display().to_string())?;
    print!("{table}");
    eprintln!("runs and summary in {}", args.out.display());
    if pairs.iter().any(|(ra, rb)| ra.is_err() || rb.is_err()) {
        std::process::exit(1);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<Args> {
        parse_args(list.iter().map(|s| s.to_string()), 7)
    }

    fn run_json(rate: f64, exact: bool) -> Value {
        serde_json::json!({
            "service_records_per_cpu_s": rate,
            "service_ratio_to_bare": 0.25,
            "service_peak_rss_gib": 0.35,
            "api_checkpoint_duration": {"max": 1.5},
            "api_snapshot_max_ms": 4.0,
            "service_outcome": "Complete",
            "output_windows": 10.0,
            "workload_windows": 10.0,
            "output_duplicates": if exact { 0.0 } else { 2.0 },
            "output_unexpected": 0.0,
        })
    }

    #[test]
    fn the_sides_their_environment_and_the_bench_flags_are_read() {
        let a = args(&[
            "--a",
            "old=/bin/old",
            "--b",
            "new=/bin/new",
            "--env-b",
            "X=y=z",
            "--pairs",
            "4",
            "--",
            "--keys",
            "1000000",
        ])
        .expect("parse");
        assert_eq!(a.a.name, "old");
        assert_eq!(a.b.binary, PathBuf::from("/bin/new"));
        assert_eq!(a.b.env.get("X").map(String::as_str), Some("y=z"));
        let empty = args(&["--a", "a=/b", "--b", "b=/c", "--env-a", "EMPTY="]).expect("parse");
        assert_eq!(empty.a.env.get("EMPTY").map(String::as_str), Some(""));
        assert!(a.a.env.is_empty());
        assert_eq!(a.pairs, 4);
        assert_eq!(a.bench_args, ["--keys", "1000000"]);
        assert!(a.out.ends_with("target/e2e-pairs/7"));
    }

    #[test]
    fn bad_command_lines_are_refused_with_the_reason() {
        let err = |list: &[&str]| args(list).expect_err("refused").to_string();
        assert!(err(&["--a", "x=/b"]).contains("--b NAME=BINARY is required"));
        assert!(err(&["--a", "x=/b", "--b", "x=/c"]).contains("different names"));
        assert!(err(&["--a", "x=", "--b", "z=/c"]).contains("no binary given"));
        assert!(err(&["--a", "x/y=/b", "--b", "z=/c"]).contains("names files"));
        assert!(err(&["--a", "x=/b", "--b", "z=/c", "--pairs", "0"]).contains("at least 1"));
        assert!(err(&["--a", "x=/b", "--b", "z=/c", "--", "--json", "f"]).contains("--json"));
        assert!(err(&["--a", "/b", "--b", "z=/c"]).contains("KEY=VALUE"));
        assert!(err(&["--a", "x=/b", "--b", "z=/c", "--keys", "5"]).contains("after `--`"));
        let service_setting = [
            "--a",
            "x=/b",
            "--b",
            "z=/c",
            "--env-b",
            "CHECKPOINTER_STATE__KEY_GROUPS=7",
        ];
        assert!(err(&service_setting).contains("without the CHECKPOINTER_* variables"));
    }

    #[test]
    fn the_order_swaps_every_pair() {
        let firsts: Vec<bool> = (1..=4).map(a_first).collect();
        assert_eq!(firsts, [true, false, true, false]);
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn a_run_with_duplicates_or_an_unfinished_outcome_is_not_exact() {
        assert!(figures(&run_json(50_000.0, true)).expect("read").exact);
        assert!(!figures(&run_json(50_000.0, false)).expect("read").exact);
        let mut short = run_json(50_000.0, true);
        short["output_windows"] = 9.0.into();
        assert!(!figures(&short).expect("read").exact);
        let mut stopped = run_json(50_000.0, true);
        stopped["service_outcome"] = "Timeout".into();
        assert!(!figures(&stopped).expect("read").exact);
        // a run stopped before the input was consumed has no share of the bare consume
        let mut timed_out = run_json(50_000.0, true);
        timed_out["service_outcome"] = "Timeout".into();
        timed_out["service_ratio_to_bare"] = Value::Null;
        let read = figures(&timed_out).expect("a timed-out run is a result");
        assert!(!read.exact);
        assert_eq!(read.share_of_bare, None);
        let missing = serde_json::json!({"service_outcome": "Complete"});
        assert!(figures(&missing).is_err());
    }

    #[test]
    fn the_summary_gives_each_pair_its_ratio_and_the_medians_of_the_exact_runs() {
        let f = |rate, exact| figures(&run_json(rate, exact)).map_err(|e| e.to_string());
        let pairs = vec![
            (f(50_000.0, true), f(60_000.0, true)),
            (f(40_000.0, true), f(30_000.0, true)),
            (
                f(45_000.0, true),
                Err("e2e_bench exit status: 1".to_string()),
            ),
            (f(90_000.0, false), f(44_000.0, true)),
        ];
        let table = summary("old", "new", &pairs);
        assert!(
            table.contains("| 1 | old | 50,000 | 60,000 | 1.20 |"),
            "{table}"
        );
        assert!(
            table.contains("| 2 | new | 40,000 | 30,000 | 0.75 |"),
            "{table}"
        );
        assert!(
            table.contains("| 3 | old | 45,000 | failed | - |"),
            "{table}"
        );
        assert!(
            table.contains("| 4 | new | 90,000 | 44,000 | - |"),
            "{table}"
        );
        assert!(table.contains("**no** (Complete)"), "{table}");
        // medians over the exact runs: old 45,000 of three (the inexact 90,000 left out), new
        // 44,000 of three; the ratio over the two pairs whose runs were both exact
        assert!(
            table.contains("| median of the exact runs | | 45,000 | 44,000 | 0.97 |"),
            "{table}"
        );
        assert!(table.contains("new read more records per CPU-second than old in 1 of the 2 pairs"));
        assert!(table.contains("1 run(s) failed"));
        assert!(table.contains("1 run(s) did not emit every window exactly"));
        // every row of the table has the header's cells
        let cells: Vec<usize> = table
            .lines()
            .filter(|l| l.starts_with('|'))
            .map(|l| l.matches('|').count())
            .collect();
        assert_eq!(cells.len(), 7, "{table}");
        assert!(cells.iter().all(|&c| c == cells[0]), "{cells:?}\n{table}");
    }
}
