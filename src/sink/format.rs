//! The output record of a final window. Deterministic: the same window always renders to the
//! same bytes, so a re-sent window after a crash is identical to the first copy.

use serde::Serialize;

use crate::engine::{AggregateKind, ClosedWindow};

#[derive(Serialize)]
struct Output<'a> {
    window: &'a str,
    key: &'a str,
    /// The source partition the window aggregates, with partition-scoped state.
    #[serde(skip_serializing_if = "Option::is_none")]
    topic: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    partition: Option<i32>,
    start: i64,
    end: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    count: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sum: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    min: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mean: Option<f64>,
}

/// Message key `"<window>/<key>/<start>"` and JSON payload of a final window.
pub fn render(
    window_name: &str,
    w: &ClosedWindow,
    aggregates: &[AggregateKind],
) -> (String, Vec<u8>) {
    let (mut key, mut payload) = (String::new(), Vec::new());
    render_into(window_name, w, aggregates, &mut key, &mut payload);
    (key, payload)
}

/// [`render`] into buffers the caller reuses (cleared first).
pub fn render_into(
    window_name: &str,
    w: &ClosedWindow,
    aggregates: &[AggregateKind],
    key: &mut String,
    payload: &mut Vec<u8>,
) {
    use std::fmt::Write;
    let has = |a: AggregateKind| aggregates.contains(&a);
    let out = Output {
        window: window_name,
        key: &w.id.key,
        topic: w.id.partition.as_ref().map(|p| p.topic.as_str()),
        partition: w.id.partition.as_ref().map(|p| p.partition),
        start: w.id.start,
        end: w.end,
        count: has(AggregateKind::Count).then_some(w.acc.count),
        sum: has(AggregateKind::Sum).then_some(w.acc.sum),
        min: has(AggregateKind::Min).then_some(w.acc.min),
        max: has(AggregateKind::Max).then_some(w.acc.max),
        mean: if has(AggregateKind::Mean) {
            w.acc.mean()
        } else {
            None
        },
    };
    key.clear();
    // writing to a String cannot fail
    let _ = write!(key, "{}/{}/{}", window_name, w.id.key, w.id.start);
    payload.clear();
    // serializing plain numbers and strings into a Vec cannot fail
    let _ = serde_json::to_writer(&mut *payload, &out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Acc, StateKey};

    #[test]
    fn renders_key_and_fields_in_a_fixed_order() {
        let mut acc = Acc::of(Some(2.0));
        acc.add(Some(4.5));
        let w = ClosedWindow {
            id: StateKey {
                partition: None,
                window: 0,
                start: 60_000,
                key: "u1".into(),
            },
            end: 120_000,
            acc,
        };
        let all = [
            AggregateKind::Count,
            AggregateKind::Sum,
            AggregateKind::Min,
            AggregateKind::Max,
            AggregateKind::Mean,
        ];
        let (key, payload) = render("minute", &w, &all);
        assert_eq!(key, "minute/u1/60000");
        assert_eq!(
            String::from_utf8(payload).expect("utf8"),
            r#"{"window":"minute","key":"u1","start":60000,"end":120000,"count":2,"sum":6.5,"min":2.0,"max":4.5,"mean":3.25}"#
        );
        let (_, only_count) = render("minute", &w, &[AggregateKind::Count]);
        assert_eq!(
            String::from_utf8(only_count).expect("utf8"),
            r#"{"window":"minute","key":"u1","start":60000,"end":120000,"count":2}"#
        );
    }
}
