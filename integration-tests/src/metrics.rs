//! Parsing of the Prometheus text exposition format served on `/metrics`.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use anyhow::{anyhow, bail, Result};

use crate::http;

pub const RECORDS_CONSUMED: &str = "checkpointer_records_consumed_total";
pub const RECORDS_INVALID: &str = "checkpointer_records_invalid_total";
pub const RECORDS_LATE: &str = "checkpointer_records_late_total";
pub const WINDOWS_EMITTED: &str = "checkpointer_windows_emitted_total";
pub const CHECKPOINT_LAST_COMPLETED_ID: &str = "checkpointer_checkpoint_last_completed_id";
pub const OFFSET_GAP: &str = "checkpointer_offset_gap_records_total";
pub const CHECKPOINTS_COMPLETED: &str = "checkpointer_checkpoints_completed_total";
pub const CHECKPOINTS_FAILED: &str = "checkpointer_checkpoints_failed_total";
pub const CHECKPOINTS_ABANDONED: &str = "checkpointer_checkpoints_abandoned_total";
pub const SAVEPOINTS: &str = "checkpointer_savepoints_total";
pub const CHANGELOG_RESTORES: &str = "checkpointer_changelog_restores_total";
pub const CHANGELOG_PUBLISHED: &str = "checkpointer_changelog_published_total";
pub const CHECKPOINTS_RETAINED: &str = "checkpointer_checkpoints_retained";
pub const STORE_SIZE_BYTES: &str = "checkpointer_store_size_bytes";
/// `{kind="checkpoint|savepoint|none",checkpoint_id="..",savepoint=".."} 1`
pub const RESTORE_INFO: &str = "checkpointer_restore_info";
pub const RESTORE_DURATION: &str = "checkpointer_restore_duration_seconds";
pub const RESTORE_FALLBACKS: &str = "checkpointer_restore_fallbacks_total";

/// Every `reason` label value of [`RECORDS_INVALID`] in the service contract.
pub const INVALID_REASONS: [&str; 11] = [
    "invalid_json",
    "missing_key",
    "null_key",
    "bad_key",
    "missing_value",
    "bad_value",
    "missing_timestamp",
    "bad_timestamp",
    "empty_payload",
    "future_timestamp",
    "value_out_of_range",
];

/// One sample: metric name, labels, value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed scrape.
#[derive(Clone, Debug)]
pub struct Metrics {
    samples: Vec<Sample>,
    text: String,
}

impl Metrics {
    pub fn parse(text: &str) -> Result<Self> {
        let mut samples = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            samples.push(
                parse_sample(line).map_err(|err| anyhow!("line {}: {err}: {line:?}", n + 1))?,
            );
        }
        Ok(Metrics {
            samples,
            text: text.to_owned(),
        })
    }

    /// The raw exposition text.
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// Sum over every series of `name`; `None` when the service exposes no such series.
    pub fn sum(&self, name: &str) -> Option<f64> {
        let mut found = false;
        let mut total = 0.0;
        for sample in self.samples.iter().filter(|s| s.name == name) {
            found = true;
            total += sample.value;
        }
        found.then_some(total)
    }

    /// Like [`Metrics::sum`] but an error naming the metric when it is absent, so that a test
    /// cannot pass because a metric is missing.
    pub fn require(&self, name: &str) -> Result<f64> {
        self.sum(name)
            .ok_or_else(|| anyhow!("metric {name} is not exposed; /metrics was:\n{}", self.text))
    }

    /// The labels of the one series of `name` whose value is 1 (an info metric such as
    /// [`RESTORE_INFO`]); an error if there is none or more than one.
    pub fn info(&self, name: &str) -> Result<BTreeMap<String, String>> {
        let mut set = self
            .samples
            .iter()
            .filter(|s| s.name == name && s.value == 1.0);
        match (set.next(), set.next()) {
            (Some(sample), None) => Ok(sample.labels.clone()),
            (None, _) => bail!("no series of {name} is 1; /metrics was:\n{}", self.text),
            (Some(_), Some(_)) => bail!(
                "more than one series of {name} is 1; /metrics was:\n{}",
                self.text
            ),
        }
    }

    /// Value of each series of `name` by the value of its label `label`.
    pub fn by_label(&self, name: &str, label: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for sample in self.samples.iter().filter(|s| s.name == name) {
            let key = sample.labels.get(label).cloned().unwrap_or_default();
            *out.entry(key).or_insert(0.0) += sample.value;
        }
        out
    }
}

/// `GET /metrics` on `addr`, parsed; `None` when the service does not answer 200 or the text
/// does not parse.
pub fn scrape(addr: SocketAddr) -> Option<Metrics> {
    let response = http::try_get(addr, "/metrics")?;
    if response.status != 200 {
        return None;
    }
    Metrics::parse(&response.body).ok()
}

/// The value of `name` on `addr` (the sum of its series), or -1 when it cannot be read: no
/// answer, or no such series. No counter of the service is negative, so a comparison with an
/// expected count fails rather than passing on a missing metric.
pub fn metric(addr: SocketAddr, name: &str) -> f64 {
    scrape(addr).and_then(|m| m.sum(name)).unwrap_or(-1.0)
}

fn parse_sample(line: &str) -> Result<Sample> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or_else(|| anyhow!("no value"))?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(after_brace)?;
        labels = parsed;
        rest = after;
    }
    let value_text = rest
        .split_whitespace()
        .next()
        .ok_or_else(|| anyhow!("no value"))?;
    let value = value_text
        .parse::<f64>()
        .map_err(|_| anyhow!("bad value {value_text:?}"))?;
    Ok(Sample {
        name,
        labels,
        value,
    })
}

/// Parses `a="x",b="y"}` and returns the labels and what follows the closing brace.
fn parse_labels(mut s: &str) -> Result<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    loop {
        s = s.trim_start_matches([' ', ',']);
        if let Some(after) = s.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = s.find('=').ok_or_else(|| anyhow!("label without '='"))?;
        let name = s[..eq].trim().to_owned();
        s = s[eq + 1..]
            .strip_prefix('"')
            .ok_or_else(|| anyhow!("label value not quoted"))?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => bail!("unterminated escape"),
                },
                Some((_, c)) => value.push(c),
                None => bail!("unterminated label value"),
            }
        };
        labels.insert(name, value);
        s = &s[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP checkpointer_records_consumed_total Records read.
# TYPE checkpointer_records_consumed_total counter
checkpointer_records_consumed_total 1234
checkpointer_records_invalid_total{reason="bad_key"} 2
checkpointer_records_invalid_total{reason="invalid_json",x="a \"q\" \\ b"} 3
checkpointer_checkpoint_duration_seconds_bucket{le="+Inf"} 7
checkpointer_up 1 1700000000000
checkpointer_restore_info{kind="savepoint",checkpoint_id="7",savepoint="sp"} 1
"#;

    #[test]
    fn parses_names_labels_values() {
        let m = Metrics::parse(TEXT).unwrap();
        assert_eq!(m.sum(RECORDS_CONSUMED), Some(1234.0));
        assert_eq!(m.sum(RECORDS_INVALID), Some(5.0));
        assert_eq!(m.sum("nope"), None);
        assert!(m.require("nope").is_err());
        let by_reason = m.by_label(RECORDS_INVALID, "reason");
        assert_eq!(by_reason.get("bad_key"), Some(&2.0));
        assert_eq!(by_reason.get("invalid_json"), Some(&3.0));
        let quoted = &m.samples()[2].labels["x"];
        assert_eq!(quoted, "a \"q\" \\ b");
        assert_eq!(m.sum("checkpointer_up"), Some(1.0));
        let info = m.info(RESTORE_INFO).unwrap();
        assert_eq!(info["kind"], "savepoint");
        assert_eq!(info["checkpoint_id"], "7");
        assert!(m.info("checkpointer_up_missing").is_err());
    }

    #[test]
    fn rejects_bad_lines() {
        assert!(Metrics::parse("foo{a=\"b\" 1").is_err());
        assert!(Metrics::parse("foo bar").is_err());
    }
}
