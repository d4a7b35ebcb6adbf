//! The result table (markdown, and the same rows as JSON), number formatting, and the rows of a
//! service run, with the histogram and percentile helpers they need.

use serde_json::{json, Value};

use integration_tests::grouped;
use integration_tests::metrics::{self as m, Metrics};

use crate::service::{Outcome, ServiceRun};
use crate::GB;

/// A numeric row: JSON key, label, value, decimals shown.
pub(crate) type Row<'a> = (&'a str, &'a str, Option<f64>, usize);

/// The rows of the result table, in order; also the JSON document.
#[derive(Default)]
pub(crate) struct Report {
    rows: Vec<(String, String, Value, String)>,
}

impl Report {
    pub(crate) fn add(
        &mut self,
        key: &str,
        label: &str,
        value: impl Into<Value>,
        shown: impl Into<String>,
    ) {
        self.rows
            .push((key.into(), label.into(), value.into(), shown.into()));
    }

    pub(crate) fn num(&mut self, key: &str, label: &str, value: Option<f64>, decimals: usize) {
        match value.filter(|v| v.is_finite()) {
            Some(v) => self.add(key, label, v, grouped(v, decimals)),
            None => self.add(key, label, Value::Null, "n/a"),
        }
    }

    /// Numeric rows `(key, label, value, decimals)`, keys and labels prefixed by `section`.
    pub(crate) fn nums(&mut self, section: &str, rows: &[Row]) {
        for &(key, label, value, decimals) in rows {
            self.num(
                &format!("{section}_{key}"),
                &format!("{section}: {label}"),
                value,
                decimals,
            );
        }
    }

    pub(crate) fn markdown(&self) -> String {
        let mut out = String::from("| figure | value |\n|---|---|\n");
        for (_, label, _, shown) in &self.rows {
            out.push_str(&format!("| {label} | {} |\n", shown.replace('|', "\\|")));
        }
        out
    }

    pub(crate) fn json(&self) -> Value {
        let map: serde_json::Map<String, Value> = self
            .rows
            .iter()
            .map(|(key, _, value, _)| (key.clone(), value.clone()))
            .collect();
        Value::Object(map)
    }
}

/// count, sum and the upper bound of the highest non-empty bucket of histogram `base`.
fn histogram(metrics: &Metrics, base: &str) -> Option<(f64, f64, String)> {
    let count = metrics.sum(&format!("{base}_count"))?;
    let sum = metrics.sum(&format!("{base}_sum"))?;
    if count == 0.0 {
        return Some((0.0, 0.0, "n/a".into()));
    }
    // (upper bound, cumulative count) of every bucket, ascending
    let mut buckets: Vec<(f64, f64)> = metrics
        .samples()
        .iter()
        .filter(|s| s.name == format!("{base}_bucket"))
        .filter_map(|s| Some((s.labels.get("le")?.parse::<f64>().ok()?, s.value)))
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let max = match buckets.iter().find(|(_, n)| *n >= count) {
        Some((le, _)) if le.is_finite() => format!("≤ {le}"),
        _ => {
            let top = buckets.iter().rev().find(|(le, _)| le.is_finite());
            format!("> {} (above the top bucket)", top.map_or(0.0, |b| b.0))
        }
    };
    Some((count, sum, max))
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    let rank = ((sorted.len() as f64) * q).ceil() as usize;
    sorted.get(rank.saturating_sub(1)).copied()
}

/// The service's rows of the table; the run itself is [`crate::service::run_service`].
impl ServiceRun {
    pub(crate) fn rows(&self, report: &mut Report, bare_rate: f64) {
        let outcome = match self.outcome {
            Outcome::Complete => "complete: every window emitted".to_owned(),
            Outcome::Timeout => {
                format!(
                    "TIMEOUT: {} of {} windows",
                    self.windows_received, self.windows_expected
                )
            }
            Outcome::RssLimit => "STOPPED: peak RSS over --max-rss-gb (SIGKILL)".to_owned(),
            Outcome::Exited => "SERVICE EXITED before the end".to_owned(),
        };
        report.add(
            "service_outcome",
            "service: outcome",
            format!("{:?}", self.outcome),
            outcome,
        );
        let (all, consumed) = (self.all_emitted, self.consumed);
        let records = self.input_records as f64;
        let rate = consumed.map(|c| records / (c.at - self.consuming_from).max(0.001));
        let cpu = self.end.cpu_seconds;
        #[rustfmt::skip]
        let rows: [Row; 14] = [
            ("seconds_to_all_windows", "wall s, start to all windows emitted", all.map(|m| m.at), 1),
            ("seconds_to_consumed", "wall s, start to input consumed", consumed.map(|m| m.at), 1),
            ("records_consumed", "records consumed (metric)", Some(self.consumed_last), 0),
            ("records_per_s", "records/s while consuming", rate, 0),
            ("records_per_s_from_start", "records/s from process start", consumed.map(|m| records / m.at), 0),
            ("ratio_to_bare", "records/s ÷ bare consume records/s", rate.map(|r| r / bare_rate), 3),
            ("cpu_seconds_to_consumed", "CPU s until input consumed", consumed.map(|m| m.cpu), 1),
            ("cpu_seconds_to_all_windows", "CPU s until all windows emitted", all.map(|m| m.cpu), 1),
            ("cpu_seconds", "CPU s until exit (incl. the final checkpoint)", Some(cpu), 1),
            ("records_per_cpu_s", "records per CPU-s (CPU until exit)", Some(records / cpu.max(0.01)), 0),
            ("peak_rss_gib", "peak RSS GiB (VmHWM)", Some(self.end.hwm_bytes as f64 / GB), 2),
            ("rss_at_all_windows_gib", "RSS GiB when all windows were emitted", all.map(|m| m.rss as f64 / GB), 2),
            ("stop_seconds", "SIGTERM to exit, s", self.stop_seconds, 1),
            ("load_max", "max 1-min load average of the machine meanwhile", Some(self.load_max), 2),
        ];
        report.nums("service", &rows);
        report.add(
            "service_stop",
            "service: stop",
            self.exit.clone(),
            self.exit.clone(),
        );
        #[rustfmt::skip]
        let rows: [Row; 3] = [
            ("windows", "distinct windows received", Some(self.windows_received as f64), 0),
            ("duplicates", "messages repeating a window", Some(self.duplicates as f64), 0),
            ("unexpected", "messages not in the model", Some(self.unexpected as f64), 0),
        ];
        report.nums("output", &rows);
        self.checkpoint_rows(report);
    }

    fn checkpoint_rows(&self, report: &mut Report) {
        let Some(metrics) = &self.metrics else {
            report.add(
                "metrics",
                "metrics",
                Value::Null,
                "not scraped (service gone)",
            );
            return;
        };
        let mib = |name: &str| metrics.sum(name).map(|b| b / 1048576.0);
        #[rustfmt::skip]
        let rows: [Row; 8] = [
            ("records_late", "records late", metrics.sum(m::RECORDS_LATE), 0),
            ("records_invalid", "records invalid", metrics.sum(m::RECORDS_INVALID), 0),
            ("windows_emitted", "windows emitted", metrics.sum(m::WINDOWS_EMITTED), 0),
            ("checkpoint_last_id", "last completed checkpoint id", metrics.sum(m::CHECKPOINT_LAST_COMPLETED_ID), 0),
            ("checkpoints_failed", "checkpoints failed", metrics.sum(m::CHECKPOINTS_FAILED), 0),
            ("checkpoints_abandoned", "checkpoints abandoned", metrics.sum(m::CHECKPOINTS_ABANDONED), 0),
            ("checkpoint_size_mib", "last checkpoint MiB", mib("checkpointer_checkpoint_size_bytes"), 1),
            ("store_size_mib", "store size MiB", mib(m::STORE_SIZE_BYTES), 1),
        ];
        report.nums("metrics", &rows);
        for (key, base) in [
            ("duration", "checkpoint_duration"),
            ("stall", "checkpoint_stall"),
        ] {
            let label = format!("metrics: checkpoint {key} s (histogram)");
            let key = format!("metrics_checkpoint_{key}");
            match histogram(metrics, &format!("checkpointer_{base}_seconds")) {
                Some((count, sum, max)) => {
                    let mean = sum / count.max(1.0);
                    let value = json!({"count": count, "mean": mean, "max_bucket": max});
                    report.add(
                        &key,
                        &label,
                        value,
                        format!("count {count}, mean {mean:.3}, max {max}"),
                    );
                }
                None => report.add(&key, &label, Value::Null, "not exposed"),
            }
        }
        let completed: Vec<&Value> = self
            .checkpoints
            .values()
            .filter(|c| c["kind"] == "checkpoint" && c["status"] == "completed")
            .collect();
        let sorted = |field: fn(&Value) -> Option<f64>| {
            let mut values: Vec<f64> = completed.iter().filter_map(|c| field(c)).collect();
            values.sort_by(f64::total_cmp);
            values
        };
        let durations = sorted(|c| c["duration_ms"].as_f64().map(|ms| ms / 1000.0));
        let snapshots = sorted(|c| c["phases"]["snapshot_ms"].as_f64());
        let mean =
            (!durations.is_empty()).then(|| durations.iter().sum::<f64>() / durations.len() as f64);
        let [p50, p95, max] = [0.5, 0.95, 1.0].map(|q| percentile(&durations, q));
        let show = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "n/a".into());
        report.add(
            "api_checkpoint_duration",
            "api: checkpoint duration s (completed, /api/checkpoints)",
            json!({"count": durations.len(), "mean": mean, "p50": p50, "p95": p95, "max": max}),
            format!(
                "count {}, mean {}, p50 {}, p95 {}, max {}",
                durations.len(),
                show(mean),
                show(p50),
                show(p95),
                show(max)
            ),
        );
        let max_snapshot = snapshots.last().copied();
        #[rustfmt::skip]
        let rows: [Row; 1] = [
            ("snapshot_max_ms", "longest snapshot pause ms", max_snapshot, 0),
        ];
        report.nums("api", &rows);
        let unfinished = self
            .checkpoints
            .values()
            .rev()
            .find(|c| c["status"] == "in_progress");
        let shown = match unfinished {
            Some(c) => format!(
                "id {}, triggered {:.0} s before the end, snapshot {} ms, {} records",
                c["id"],
                (self.ended_ms - c["trigger_time"].as_i64().unwrap_or(self.ended_ms)) as f64 / 1e3,
                c["phases"]["snapshot_ms"],
                c["records"]
            ),
            None => "none".to_owned(),
        };
        let value = unfinished.cloned().unwrap_or(Value::Null);
        report.add(
            "api_unfinished_checkpoint",
            "api: checkpoint in progress at the end",
            value,
            shown,
        );
        let errors = self.api_errors.len();
        let shown = match self.api_errors.last() {
            Some(last) => format!("{errors}, last: {last}"),
            None => "0".to_owned(),
        };
        report.add(
            "api_errors",
            "api: failed polls of /api/checkpoints",
            errors,
            shown,
        );
    }
}
