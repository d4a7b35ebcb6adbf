//! The output record of a final window. Deterministic: the same window always renders to the
//! same bytes, so a re-sent window after a crash is identical to the first copy.

use crate::engine::{AggregateKind, ClosedWindow};

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

/// [`render`] into buffers the caller reuses (cleared first). The payload is one JSON object,
/// its fields always in this order, those not configured left out: `window`, `key`, `topic`
/// and `partition` (partition-scoped state only), `start`, `end`, `count`, `sum`, `min`,
/// `max`, `mean` (a value that is not a finite number is `null`). Strings and numbers are
/// written by serde_json, field by field: the payload is what serializing a struct of these
/// fields gives (a test holds the two together), without walking one per window.
pub fn render_into(
    window_name: &str,
    w: &ClosedWindow,
    aggregates: &[AggregateKind],
    key: &mut String,
    payload: &mut Vec<u8>,
) {
    let mut digits = itoa::Buffer::new();
    key.clear();
    key.push_str(window_name);
    key.push('/');
    key.push_str(&w.id.key);
    key.push('/');
    key.push_str(digits.format(w.id.start));
    payload.clear();
    let out = payload;
    out.extend_from_slice(b"{\"window\":");
    json(out, window_name);
    out.extend_from_slice(b",\"key\":");
    json(out, &*w.id.key);
    if let Some(p) = &w.id.partition {
        out.extend_from_slice(b",\"topic\":");
        json(out, p.topic.as_str());
        out.extend_from_slice(b",\"partition\":");
        out.extend_from_slice(digits.format(p.partition).as_bytes());
    }
    out.extend_from_slice(b",\"start\":");
    out.extend_from_slice(digits.format(w.id.start).as_bytes());
    out.extend_from_slice(b",\"end\":");
    out.extend_from_slice(digits.format(w.end).as_bytes());
    let has = |a: AggregateKind| aggregates.contains(&a);
    if has(AggregateKind::Count) {
        out.extend_from_slice(b",\"count\":");
        out.extend_from_slice(digits.format(w.acc.count).as_bytes());
    }
    let values = [
        (AggregateKind::Sum, &b",\"sum\":"[..], Some(w.acc.sum)),
        (AggregateKind::Min, b",\"min\":", Some(w.acc.min)),
        (AggregateKind::Max, b",\"max\":", Some(w.acc.max)),
        (AggregateKind::Mean, b",\"mean\":", w.acc.mean()),
    ];
    for (kind, name, value) in values {
        if let (true, Some(v)) = (has(kind), value) {
            out.extend_from_slice(name);
            json(out, &v);
        }
    }
    out.push(b'}');
}

/// Appends `value` as serde_json writes it (a string escaped, a float as its shortest form
/// or `null`); writing a string or number into a `Vec` cannot fail.
fn json<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    let _ = serde_json::to_writer(out, value);
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

    /// The payload as serializing a struct of its fields gives it: what `render_into` was
    /// before it wrote the fields one by one, and must stay byte for byte.
    #[derive(serde::Serialize)]
    struct Reference<'a> {
        window: &'a str,
        key: &'a str,
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

    fn reference(name: &str, w: &ClosedWindow, aggregates: &[AggregateKind]) -> (String, Vec<u8>) {
        let has = |a: AggregateKind| aggregates.contains(&a);
        let out = Reference {
            window: name,
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
        let key = format!("{}/{}/{}", name, w.id.key, w.id.start);
        (
            key,
            serde_json::to_vec(&out).expect("plain fields serialize"),
        )
    }

    fn float() -> impl proptest::strategy::Strategy<Value = f64> {
        use proptest::prelude::*;
        prop_oneof![
            any::<f64>(),
            (-1_000_000i64..1_000_000).prop_map(|n| n as f64 / 100.0),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
            Just(f64::NAN),
            Just(-0.0),
        ]
    }

    proptest::proptest! {
        #[test]
        fn renders_every_window_as_serializing_its_fields_does(
            name in "\\PC{0,12}",
            key in proptest::prelude::any::<String>(),
            partition in proptest::option::of(("[a-z.\\-\"\\\\]{1,8}", proptest::prelude::any::<i32>())),
            start in proptest::prelude::any::<i64>(),
            end in proptest::prelude::any::<i64>(),
            count in proptest::prop_oneof![proptest::strategy::Just(0u64), proptest::prelude::any::<u64>()],
            (sum, min, max) in (float(), float(), float()),
            chosen in proptest::collection::vec(proptest::prelude::any::<bool>(), 5),
        ) {
            let kinds = [
                AggregateKind::Count,
                AggregateKind::Sum,
                AggregateKind::Min,
                AggregateKind::Max,
                AggregateKind::Mean,
            ];
            let aggregates: Vec<AggregateKind> = kinds
                .iter()
                .zip(&chosen)
                .filter(|(_, c)| **c)
                .map(|(k, _)| *k)
                .collect();
            let w = ClosedWindow {
                id: StateKey {
                    partition: partition.map(|(topic, partition)| crate::position::Partition { topic, partition }),
                    window: 0,
                    start,
                    key: key.as_str().into(),
                },
                end,
                acc: Acc { count, sum, min, max },
            };
            let (k, payload) = render(&name, &w, &aggregates);
            let (rk, rpayload) = reference(&name, &w, &aggregates);
            proptest::prop_assert_eq!(k, rk);
            proptest::prop_assert_eq!(
                String::from_utf8(payload).expect("utf8"),
                String::from_utf8(rpayload).expect("utf8")
            );
        }
    }
}
