//! Comparing the service's output topic with the reference model.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use anyhow::{bail, Result};
use serde_json::Value;

use crate::client::Message;
use crate::model::WindowResult;

const MEAN_TOLERANCE: f64 = 1e-9;
const SHOW: usize = 10;

/// Counts from a successful comparison.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutputSummary {
    /// Messages read.
    pub messages: usize,
    /// Distinct message keys (= windows).
    pub windows: usize,
    /// Messages beyond the first for their key (re-sent windows).
    pub duplicates: usize,
    /// Windows per window name.
    pub per_window: BTreeMap<String, usize>,
}

/// Whether every expected window key is present in `messages` (values are not checked).
pub fn contains_all(expected: &BTreeMap<String, WindowResult>, messages: &[Message]) -> bool {
    distinct_keys(messages) >= expected.len() && {
        let keys: BTreeSet<&str> = messages.iter().map(|m| m.key.as_str()).collect();
        expected.keys().all(|k| keys.contains(k.as_str()))
    }
}

/// Number of distinct message keys.
pub fn distinct_keys(messages: &[Message]) -> usize {
    messages
        .iter()
        .map(|m| m.key.as_str())
        .collect::<BTreeSet<_>>()
        .len()
}

/// What [`check_output`] finds wrong with `messages` (empty when nothing), for the message of a
/// test whose output did not complete in time.
pub fn output_problems(expected: &BTreeMap<String, WindowResult>, messages: &[Message]) -> String {
    check_output(expected, messages)
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default()
}

/// Checks the exactly-once contract: every copy of a window is byte-for-byte identical, and the
/// distinct windows equal `expected` exactly (no missing, no extra, same aggregates).
pub fn check_output(
    expected: &BTreeMap<String, WindowResult>,
    messages: &[Message],
) -> Result<OutputSummary> {
    let mut by_key: BTreeMap<&str, Vec<&[u8]>> = BTreeMap::new();
    for message in messages {
        by_key
            .entry(message.key.as_str())
            .or_default()
            .push(&message.payload);
    }

    let mut problems: Vec<String> = Vec::new();
    let mut summary = OutputSummary {
        messages: messages.len(),
        windows: by_key.len(),
        ..OutputSummary::default()
    };

    let mut differing_copies = Vec::new();
    for (key, copies) in &by_key {
        summary.duplicates += copies.len() - 1;
        if copies.iter().any(|c| c != &copies[0]) {
            differing_copies.push(format!(
                "{key}: {} copies differ, e.g. {} vs {}",
                copies.len(),
                String::from_utf8_lossy(copies[0]),
                String::from_utf8_lossy(
                    copies
                        .iter()
                        .find(|c| *c != &copies[0])
                        .unwrap_or(&copies[0])
                )
            ));
        }
    }
    report(
        &mut problems,
        "windows re-sent with different bytes",
        &differing_copies,
    );

    let missing: Vec<String> = expected
        .keys()
        .filter(|k| !by_key.contains_key(k.as_str()))
        .cloned()
        .collect();
    report(
        &mut problems,
        "expected windows missing from the output",
        &missing,
    );

    let extra: Vec<String> = by_key
        .iter()
        .filter(|(k, _)| !expected.contains_key(**k))
        .map(|(k, copies)| format!("{k} = {}", String::from_utf8_lossy(copies[0])))
        .collect();
    report(&mut problems, "unexpected windows in the output", &extra);

    let mut wrong = Vec::new();
    for (key, copies) in &by_key {
        let Some(want) = expected.get(*key) else {
            continue;
        };
        *summary.per_window.entry(want.window.clone()).or_default() += 1;
        if let Err(err) = check_payload(want, copies[0]) {
            wrong.push(format!(
                "{key}: {err}; got {}",
                String::from_utf8_lossy(copies[0])
            ));
        }
    }
    report(&mut problems, "windows with wrong contents", &wrong);

    if problems.is_empty() {
        Ok(summary)
    } else {
        bail!(
            "output does not match the model ({} messages, {} distinct windows, {} expected):\n{}",
            summary.messages,
            summary.windows,
            expected.len(),
            problems.join("\n")
        )
    }
}

fn report(problems: &mut Vec<String>, what: &str, items: &[String]) {
    if items.is_empty() {
        return;
    }
    let mut text = format!("- {} {what}:", items.len());
    for item in items.iter().take(SHOW) {
        let _ = write!(text, "\n    {item}");
    }
    if items.len() > SHOW {
        let _ = write!(text, "\n    ... and {} more", items.len() - SHOW);
    }
    problems.push(text);
}

/// Compares one output payload with the model: strings and integers exactly, sum/min/max as
/// f64 exactly (integer inputs), mean within a relative 1e-9.
pub fn check_payload(want: &WindowResult, payload: &[u8]) -> Result<()> {
    let value: Value = serde_json::from_slice(payload)
        .map_err(|err| anyhow::anyhow!("payload is not JSON: {err}"))?;
    let Some(object) = value.as_object() else {
        bail!("payload is not a JSON object");
    };
    let field = |name: &str| {
        object
            .get(name)
            .ok_or_else(|| anyhow::anyhow!("field {name:?} missing"))
    };
    let mut errors = Vec::new();
    let mut expect = |ok: bool, what: String| {
        if !ok {
            errors.push(what);
        }
    };

    let window = field("window")?;
    expect(
        window.as_str() == Some(want.window.as_str()),
        format!("window {window} != {:?}", want.window),
    );
    let key = field("key")?;
    expect(
        key.as_str() == Some(want.key.as_str()),
        format!("key {key} != {:?}", want.key),
    );
    for (name, want_value) in [("start", want.start), ("end", want.end)] {
        let got = field(name)?;
        expect(
            got.as_i64() == Some(want_value),
            format!("{name} {got} != {want_value} (an integer)"),
        );
    }
    let count = field("count")?;
    expect(
        count.as_u64() == Some(want.count),
        format!("count {count} != {} (an integer)", want.count),
    );
    for (name, want_value) in [("sum", want.sum), ("min", want.min), ("max", want.max)] {
        let got = field(name)?;
        expect(
            got.as_f64() == Some(want_value as f64),
            format!("{name} {got} != {want_value}"),
        );
    }
    let mean = field("mean")?;
    let want_mean = want.mean();
    expect(
        mean.as_f64()
            .is_some_and(|m| (m - want_mean).abs() <= MEAN_TOLERANCE * want_mean.abs().max(1.0)),
        format!("mean {mean} != {want_mean}"),
    );

    if errors.is_empty() {
        Ok(())
    } else {
        bail!("{}", errors.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{expected_windows, Event, WindowSpec};
    use std::time::Duration;

    fn message(key: &str, payload: &str) -> Message {
        Message {
            partition: 0,
            offset: 0,
            key: key.to_owned(),
            payload: payload.as_bytes().to_vec(),
            headers: Vec::new(),
        }
    }

    fn expected() -> BTreeMap<String, WindowResult> {
        let events = [
            Event {
                key: "a".into(),
                value: 1,
                ts: 1_000,
            },
            Event {
                key: "a".into(),
                value: 4,
                ts: 2_000,
            },
        ];
        expected_windows(
            &[WindowSpec::tumbling("t", Duration::from_secs(10))],
            &events,
        )
    }

    const GOOD: &str = r#"{"window":"t","key":"a","start":0,"end":10000,"count":2,"sum":5.0,"min":1,"max":4,"mean":2.5}"#;

    #[test]
    fn accepts_exact_output_with_identical_duplicates() {
        let out = [message("t/a/0", GOOD), message("t/a/0", GOOD)];
        let summary = check_output(&expected(), &out).unwrap();
        assert_eq!(summary.windows, 1);
        assert_eq!(summary.duplicates, 1);
        assert!(contains_all(&expected(), &out));
    }

    #[test]
    fn rejects_differing_duplicates_missing_extra_and_wrong_values() {
        let reordered = r#"{"key":"a","window":"t","start":0,"end":10000,"count":2,"sum":5.0,"min":1,"max":4,"mean":2.5}"#;
        let err = check_output(
            &expected(),
            &[message("t/a/0", GOOD), message("t/a/0", reordered)],
        )
        .unwrap_err();
        assert!(err.to_string().contains("different bytes"), "{err}");

        let err = check_output(&expected(), &[]).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
        assert!(!contains_all(&expected(), &[]));

        let err = check_output(
            &expected(),
            &[message("t/a/0", GOOD), message("t/b/0", GOOD)],
        )
        .unwrap_err();
        assert!(err.to_string().contains("unexpected"), "{err}");

        let wrong = GOOD.replace("\"count\":2", "\"count\":3");
        let err = check_output(&expected(), &[message("t/a/0", &wrong)]).unwrap_err();
        assert!(err.to_string().contains("count 3 != 2"), "{err}");

        let float_start = GOOD.replace("\"start\":0", "\"start\":0.0");
        assert!(check_output(&expected(), &[message("t/a/0", &float_start)]).is_err());
    }
}
