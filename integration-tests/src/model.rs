//! An independent reference model of the windows the service must emit.
//!
//! Written from the service contract, not from the service code. It assumes every record is on
//! time and every window is closed (the tests guarantee both: bounded disorder and a sentinel far
//! ahead on every partition), so it only has to say *which* windows exist and what they contain.

use std::collections::BTreeMap;
use std::time::Duration;

/// Window name and shape, as in the service's `windows:` config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowSpec {
    pub name: String,
    pub kind: WindowKind,
}

/// Window shapes; all lengths in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowKind {
    /// `[floor(ts / size) * size, + size)`
    Tumbling { size: i64 },
    /// every `[k * hop, k * hop + size)` that contains `ts`
    Hopping { size: i64, hop: i64 },
    /// per key, records closer than `gap` share a session `[first, last + gap)`
    Session { gap: i64 },
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A duration in the config's human format (`250ms`, `10s`).
pub fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

impl WindowSpec {
    pub fn tumbling(name: &str, size: Duration) -> Self {
        WindowSpec {
            name: name.to_owned(),
            kind: WindowKind::Tumbling { size: millis(size) },
        }
    }

    pub fn hopping(name: &str, size: Duration, hop: Duration) -> Self {
        WindowSpec {
            name: name.to_owned(),
            kind: WindowKind::Hopping {
                size: millis(size),
                hop: millis(hop),
            },
        }
    }

    pub fn session(name: &str, gap: Duration) -> Self {
        WindowSpec {
            name: name.to_owned(),
            kind: WindowKind::Session { gap: millis(gap) },
        }
    }

    /// This window as a YAML flow mapping for the `windows:` list.
    pub fn to_yaml(&self) -> String {
        let ms = |v: i64| human(Duration::from_millis(v.max(0) as u64));
        let name = serde_json::Value::from(self.name.as_str());
        match self.kind {
            WindowKind::Tumbling { size } => {
                format!("{{ name: {name}, type: tumbling, size: {} }}", ms(size))
            }
            WindowKind::Hopping { size, hop } => format!(
                "{{ name: {name}, type: hopping, size: {}, hop: {} }}",
                ms(size),
                ms(hop)
            ),
            WindowKind::Session { gap } => {
                format!("{{ name: {name}, type: session, gap: {} }}", ms(gap))
            }
        }
    }
}

/// The windows of the service contract's example config.
pub fn contract_windows() -> Vec<WindowSpec> {
    vec![
        WindowSpec::tumbling("tumble", Duration::from_secs(10)),
        WindowSpec::hopping("hop", Duration::from_secs(10), Duration::from_secs(5)),
        WindowSpec::session("sess", Duration::from_secs(3)),
    ]
}

/// A valid input record: grouping key, integer value (so float sums are exact), event time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub key: String,
    pub value: i64,
    pub ts: i64,
}

/// One final window and its aggregates.
#[derive(Clone, Debug, PartialEq)]
pub struct WindowResult {
    pub window: String,
    pub key: String,
    pub start: i64,
    pub end: i64,
    pub count: u64,
    pub sum: i64,
    pub min: i64,
    pub max: i64,
}

impl WindowResult {
    fn new(window: &str, key: &str, start: i64, end: i64) -> Self {
        WindowResult {
            window: window.to_owned(),
            key: key.to_owned(),
            start,
            end,
            count: 0,
            sum: 0,
            min: i64::MAX,
            max: i64::MIN,
        }
    }

    fn add(&mut self, value: i64) {
        self.count += 1;
        self.sum += value;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
    }

    pub fn mean(&self) -> f64 {
        self.sum as f64 / self.count as f64
    }

    /// The output message key: `<window>/<key>/<start>`.
    pub fn message_key(&self) -> String {
        output_key(&self.window, &self.key, self.start)
    }
}

/// The output message key of a window.
pub fn output_key(window: &str, key: &str, start: i64) -> String {
    format!("{window}/{key}/{start}")
}

/// Every window of every event, by output message key.
pub fn expected_windows(specs: &[WindowSpec], events: &[Event]) -> BTreeMap<String, WindowResult> {
    let mut out = BTreeMap::new();
    for spec in specs {
        let results = match spec.kind {
            WindowKind::Tumbling { size } => fixed_windows(&spec.name, events, |ts| {
                let start = ts.div_euclid(size) * size;
                vec![(start, start + size)]
            }),
            WindowKind::Hopping { size, hop } => fixed_windows(&spec.name, events, |ts| {
                // k * hop <= ts < k * hop + size
                let last = ts.div_euclid(hop);
                let first = (ts - size).div_euclid(hop) + 1;
                (first..=last).map(|k| (k * hop, k * hop + size)).collect()
            }),
            WindowKind::Session { gap } => session_windows(&spec.name, events, gap),
        };
        for result in results {
            out.insert(result.message_key(), result);
        }
    }
    out
}

fn fixed_windows(
    name: &str,
    events: &[Event],
    assign: impl Fn(i64) -> Vec<(i64, i64)>,
) -> Vec<WindowResult> {
    let mut windows: BTreeMap<(&str, i64), WindowResult> = BTreeMap::new();
    for event in events {
        for (start, end) in assign(event.ts) {
            windows
                .entry((event.key.as_str(), start))
                .or_insert_with(|| WindowResult::new(name, &event.key, start, end))
                .add(event.value);
        }
    }
    windows.into_values().collect()
}

fn session_windows(name: &str, events: &[Event], gap: i64) -> Vec<WindowResult> {
    let mut by_key: BTreeMap<&str, Vec<(i64, i64)>> = BTreeMap::new();
    for event in events {
        by_key
            .entry(event.key.as_str())
            .or_default()
            .push((event.ts, event.value));
    }
    let mut out = Vec::new();
    for (key, mut points) in by_key {
        points.sort_unstable();
        let mut current: Option<(WindowResult, i64)> = None;
        for (ts, value) in points {
            match current.as_mut() {
                Some((window, last)) if ts - *last < gap => {
                    window.add(value);
                    *last = ts;
                }
                _ => {
                    if let Some((mut window, last)) = current.take() {
                        window.end = last + gap;
                        out.push(window);
                    }
                    let mut window = WindowResult::new(name, key, ts, ts + gap);
                    window.add(value);
                    current = Some((window, ts));
                }
            }
        }
        if let Some((mut window, last)) = current {
            window.end = last + gap;
            out.push(window);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(key: &str, value: i64, ts: i64) -> Event {
        Event {
            key: key.to_owned(),
            value,
            ts,
        }
    }

    fn spec(kind: WindowKind) -> Vec<WindowSpec> {
        vec![WindowSpec {
            name: "w".to_owned(),
            kind,
        }]
    }

    #[test]
    fn tumbling_aligns_to_epoch() {
        let events = [ev("a", 1, 9_999), ev("a", 2, 10_000), ev("a", -3, 19_999)];
        let got = expected_windows(&spec(WindowKind::Tumbling { size: 10_000 }), &events);
        assert_eq!(got.len(), 2);
        let first = &got["w/a/0"];
        assert_eq!(
            (first.start, first.end, first.count, first.sum),
            (0, 10_000, 1, 1)
        );
        let second = &got["w/a/10000"];
        assert_eq!(
            (second.count, second.sum, second.min, second.max),
            (2, -1, -3, 2)
        );
        assert_eq!(second.mean(), -0.5);
    }

    #[test]
    fn hopping_covers_every_containing_window() {
        let kind = WindowKind::Hopping {
            size: 10_000,
            hop: 5_000,
        };
        let got = expected_windows(&spec(kind), &[ev("a", 4, 12_000)]);
        let mut starts: Vec<i64> = got.values().map(|w| w.start).collect();
        starts.sort_unstable();
        assert_eq!(starts, vec![5_000, 10_000]);
        // a window boundary belongs to the window starting there, not the one ending there
        let got = expected_windows(&spec(kind), &[ev("a", 4, 15_000)]);
        let mut starts: Vec<i64> = got.values().map(|w| w.start).collect();
        starts.sort_unstable();
        assert_eq!(starts, vec![10_000, 15_000]);
    }

    #[test]
    fn sessions_split_on_gap_per_key() {
        let events = [
            ev("a", 1, 1_000),
            ev("b", 7, 1_500),
            ev("a", 2, 3_999), // 2_999 < 3_000 after the first: same session
            ev("a", 3, 6_999), // exactly the gap: new session
            ev("b", 1, 4_400),
        ];
        let got = expected_windows(&spec(WindowKind::Session { gap: 3_000 }), &events);
        assert_eq!(got.len(), 3);
        let a1 = &got["w/a/1000"];
        assert_eq!((a1.end, a1.count, a1.sum), (6_999, 2, 3));
        let a2 = &got["w/a/6999"];
        assert_eq!((a2.end, a2.count), (9_999, 1));
        let b = &got["w/b/1500"];
        assert_eq!((b.end, b.count, b.min, b.max), (7_400, 2, 1, 7));
    }

    #[test]
    fn yaml_uses_human_durations() {
        let specs = contract_windows();
        assert_eq!(
            specs[1].to_yaml(),
            r#"{ name: "hop", type: hopping, size: 10s, hop: 5s }"#
        );
        assert_eq!(human(Duration::from_millis(400)), "400ms");
    }
}
