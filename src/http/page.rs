//! The operator page served at `/`: one server-rendered HTML5 document with inline CSS and an
//! inline SVG chart, no scripts and no external assets. Everything taken from data is escaped.

use std::fmt::Write as _;

use crate::checkpoint::history::{CheckpointRecord, Kind, Status};
use crate::checkpoint_id::CheckpointId;
use crate::event_time::EventTime;

/// Everything the page shows.
#[derive(Debug, Clone, Default)]
pub struct PageView {
    /// Newest first; at most a few hundred.
    pub attempts: Vec<CheckpointRecord>,
    pub partitions: Vec<PartitionView>,
    /// Service event-time watermark, epoch milliseconds.
    pub watermark: Option<EventTime>,
    pub ready: bool,
    pub ready_reason: String,
    pub savepoints: Vec<SavepointView>,
    /// e.g. "checkpoint 12", "savepoint before-upgrade", "nothing (empty start)".
    pub restored_from: String,
    /// How many complete checkpoints are retained and restorable.
    pub retained: usize,
    /// Epoch milliseconds when the page is rendered (for "x s ago").
    pub now_ms: i64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PartitionView {
    pub topic: String,
    pub partition: i32,
    pub next_offset: Option<i64>,
    /// Records behind the high watermark; None if unknown.
    pub lag: Option<i64>,
    /// Highest event time seen, epoch ms.
    pub max_event_time: Option<EventTime>,
}

#[derive(Debug, Clone)]
pub struct SavepointView {
    pub name: String,
    pub checkpoint_id: CheckpointId,
    pub created_ms: i64,
    pub entries: u64,
}

const STYLE: &str = "\
body{font:14px/1.4 system-ui,sans-serif;margin:1rem 2rem;color:#1f2937;background:#fff}
h1{font-size:1.4rem;margin:0 0 .3rem}h2{font-size:1.1rem;margin:1.4rem 0 .4rem}
nav a{margin-right:1rem}a{color:#1d4ed8}
dl{display:flex;flex-wrap:wrap;gap:.5rem 2.5rem;margin:.6rem 0}
dt{font-size:.72rem;color:#6b7280;text-transform:uppercase;letter-spacing:.04em}
dd{margin:0;font-weight:600}
.ok{color:#15803d}.bad{color:#b91c1c}.muted{color:#6b7280;font-weight:400}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:13px;min-width:50%}
th,td{padding:.22rem .55rem;border-bottom:1px solid #e5e7eb;text-align:left;white-space:nowrap}
th{background:#f9fafb;font-weight:600}
.num{text-align:right;font-variant-numeric:tabular-nums}
tr.st-completed .status{color:#15803d}tr.st-in_progress .status{color:#1d4ed8}
tr.st-failed{background:#fef2f2}tr.st-failed .status{color:#b91c1c}
tr.st-abandoned{color:#6b7280}
td.failure{white-space:normal;color:#b91c1c;min-width:16rem}
svg{max-width:100%;height:auto;border:1px solid #e5e7eb;background:#fff}
";

const DURATION_COLOUR: &str = "#2563eb";
const SIZE_COLOUR: &str = "#d97706";

/// Renders the whole page as a complete HTML5 document.
pub fn render(view: &PageView) -> String {
    let mut out = String::with_capacity(8 * 1024 + view.attempts.len() * 600);
    out.push_str(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta http-equiv=\"refresh\" content=\"5\">\n<title>checkpointer</title>\n<style>\n",
    );
    out.push_str(STYLE);
    out.push_str("</style>\n</head>\n<body>\n");
    header(&mut out, view);
    partitions(&mut out, view);
    out.push_str("<h2>Checkpoint duration and size</h2>\n");
    chart(&mut out, &view.attempts);
    history(&mut out, &view.attempts);
    savepoints(&mut out, view);
    out.push_str("</body>\n</html>\n");
    out
}

fn header(out: &mut String, view: &PageView) {
    out.push_str(
        "<header>\n<h1>checkpointer</h1>\n<nav><a href=\"/api/checkpoints\">/api/checkpoints</a>\
         <a href=\"/api/savepoints\">/api/savepoints</a><a href=\"/metrics\">/metrics</a></nav>\n<dl>\n",
    );
    let (class, state) = if view.ready {
        ("ok", "ready")
    } else {
        ("bad", "not ready")
    };
    let reason = escape(&view.ready_reason);
    let _ = writeln!(
        out,
        "<div><dt>Readiness</dt><dd id=\"ready\" class=\"{class}\">{state} \
         <span class=\"muted\">{reason}</span></dd></div>"
    );
    item(out, "Restored from", &escape(&view.restored_from));
    let watermark = view.watermark.map(|w| stamp(view.now_ms, w.millis()));
    item(
        out,
        "Watermark",
        &watermark.unwrap_or_else(|| "none yet".to_string()),
    );
    item(out, "Retained checkpoints", &view.retained.to_string());
    item(out, "Rendered", &utc(view.now_ms));
    out.push_str("</dl>\n</header>\n");
}

/// A header item; `html` must already be escaped.
fn item(out: &mut String, label: &str, html: &str) {
    let _ = writeln!(out, "<div><dt>{label}</dt><dd>{html}</dd></div>");
}

/// Heading, table and header row; `|`-separated columns, `#` marks right-aligned numbers.
fn open_table(out: &mut String, title: &str, id: &str, columns: &str) {
    let _ = write!(
        out,
        "<h2>{title}</h2>\n<div class=\"scroll\"><table id=\"{id}\">\n<thead><tr>"
    );
    for c in columns.split('|') {
        let _ = match c.strip_prefix('#') {
            Some(c) => write!(out, "<th class=\"num\">{c}</th>"),
            None => write!(out, "<th>{c}</th>"),
        };
    }
    out.push_str("</tr></thead>\n<tbody>\n");
}

const CLOSE_TABLE: &str = "</tbody>\n</table></div>\n";

fn partitions(out: &mut String, view: &PageView) {
    let columns = "topic|#partition|#next offset|#lag|max event time (UTC)";
    open_table(out, "Partitions", "partitions", columns);
    for p in &view.partitions {
        out.push_str("<tr>");
        td(out, "", &p.topic);
        td(out, "num", &p.partition.to_string());
        td(out, "num", &opt(p.next_offset));
        td(out, "num", &opt(p.lag));
        td(
            out,
            "",
            &opt(p.max_event_time.map(|t| stamp(view.now_ms, t.millis()))),
        );
        out.push_str("</tr>\n");
    }
    out.push_str(CLOSE_TABLE);
    if view.partitions.is_empty() {
        out.push_str("<p class=\"muted\">No partitions assigned.</p>\n");
    }
}

fn history(out: &mut String, attempts: &[CheckpointRecord]) {
    let columns =
        "#id|kind|status|triggered (UTC)|#duration|#snapshot ms|#write ms|#flush ms|#size|\
                   mode|#records|watermark (UTC)|failure";
    open_table(out, "Attempts", "history", columns);
    for a in attempts {
        let label = a.status.label();
        let _ = write!(
            out,
            "<tr class=\"st-{label}\" data-id=\"{}\" data-status=\"{label}\">",
            a.id
        );
        td(out, "num", &a.id.to_string());
        let kind = match (a.kind, &a.savepoint) {
            (Kind::Checkpoint, _) => "checkpoint".to_string(),
            (Kind::Savepoint, name) => format!("savepoint {}", name.as_deref().unwrap_or("")),
        };
        td(out, "", kind.trim_end());
        td(out, "status", label);
        td(out, "", &utc(a.trigger_time));
        td(out, "num", &opt(a.duration_ms.map(duration)));
        td(out, "num", &opt(a.phases.snapshot_ms));
        td(out, "num", &opt(a.phases.write_ms));
        td(out, "num", &opt(a.phases.flush_ms));
        td(out, "num", &opt(a.bytes.map(human_bytes)));
        td(out, "", if a.full { "full" } else { "incremental" });
        td(out, "num", &a.records.to_string());
        td(out, "", &opt(a.watermark.map(|w| utc(w.millis()))));
        td(out, "failure", a.failure.as_deref().unwrap_or(""));
        out.push_str("</tr>\n");
    }
    out.push_str(CLOSE_TABLE);
    if attempts.is_empty() {
        out.push_str("<p class=\"muted\">No attempts yet.</p>\n");
    }
}

fn savepoints(out: &mut String, view: &PageView) {
    if view.savepoints.is_empty() {
        out.push_str("<h2>Savepoints</h2>\n<p class=\"muted\">There are no savepoints.</p>\n");
        return;
    }
    let columns = "name|#checkpoint id|created (UTC)|#entries";
    open_table(out, "Savepoints", "savepoints", columns);
    for s in &view.savepoints {
        out.push_str("<tr>");
        td(out, "", &s.name);
        td(out, "num", &s.checkpoint_id.to_string());
        td(out, "", &stamp(view.now_ms, s.created_ms));
        td(out, "num", &s.entries.to_string());
        out.push_str("</tr>\n");
    }
    out.push_str(CLOSE_TABLE);
}

/// One cell; `text` is escaped here, `class` is a constant.
fn td(out: &mut String, class: &str, text: &str) {
    let _ = match class {
        "" => write!(out, "<td>{}</td>", escape(text)),
        _ => write!(out, "<td class=\"{class}\">{}</td>", escape(text)),
    };
}

/// Duration (ms) and size (bytes) of completed attempts, oldest left, each line scaled to its
/// own max. View box 640×180; plot area x 72..568, y 30..150.
fn chart(out: &mut String, attempts: &[CheckpointRecord]) {
    const LEFT: f64 = 72.0;
    const WIDTH: f64 = 496.0;
    const BOTTOM: f64 = 150.0;
    const HEIGHT: f64 = 120.0;
    let mut done: Vec<&CheckpointRecord> = attempts
        .iter()
        .filter(|a| a.status == Status::Completed)
        .collect();
    done.sort_by_key(|a| (a.trigger_time, a.id));
    out.push_str(
        "<svg id=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 640 180\" \
         width=\"640\" height=\"180\" role=\"img\" aria-label=\"checkpoint duration and size\" \
         font-size=\"11\" font-family=\"system-ui,sans-serif\">\n",
    );
    if done.len() < 2 {
        out.push_str(
            "<text x=\"320\" y=\"90\" text-anchor=\"middle\" fill=\"#6b7280\">\
             not enough checkpoints yet</text>\n</svg>\n",
        );
        return;
    }
    let step = WIDTH / (done.len() - 1) as f64;
    let durations: Vec<u64> = done.iter().map(|a| a.duration_ms.unwrap_or(0)).collect();
    let sizes: Vec<u64> = done.iter().map(|a| a.bytes.unwrap_or(0)).collect();
    let max_d = durations.iter().copied().max().unwrap_or(0).max(1);
    let max_b = sizes.iter().copied().max().unwrap_or(0).max(1);
    let (md, mb) = (escape(&duration(max_d)), escape(&human_bytes(max_b)));
    let (first, last) = (done[0].id, done[done.len() - 1].id);
    let (d, s) = (DURATION_COLOUR, SIZE_COLOUR);
    let _ = write!(
        out,
        "<path d=\"M72 30V150H568V30\" fill=\"none\" stroke=\"#9ca3af\"/>\n\
         <text x=\"68\" y=\"34\" text-anchor=\"end\" fill=\"{d}\">{md}</text>\n\
         <text x=\"68\" y=\"150\" text-anchor=\"end\" fill=\"{d}\">0 ms</text>\n\
         <text x=\"572\" y=\"34\" fill=\"{s}\">{mb}</text>\n\
         <text x=\"572\" y=\"150\" fill=\"{s}\">0 B</text>\n\
         <text x=\"72\" y=\"166\" fill=\"#6b7280\">#{first}</text>\n\
         <text x=\"568\" y=\"166\" text-anchor=\"end\" fill=\"#6b7280\">#{last}</text>\n\
         <rect x=\"72\" y=\"10\" width=\"10\" height=\"10\" fill=\"{d}\"/>\
         <text x=\"86\" y=\"19\">duration (max {md})</text>\n\
         <rect x=\"292\" y=\"10\" width=\"10\" height=\"10\" fill=\"{s}\"/>\
         <text x=\"306\" y=\"19\">size (max {mb})</text>\n"
    );
    for (values, max, colour) in [(&durations, max_d, d), (&sizes, max_b, s)] {
        let _ = write!(
            out,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\" points=\""
        );
        for (i, v) in values.iter().enumerate() {
            let x = LEFT + step * i as f64;
            let y = BOTTOM - HEIGHT * (*v as f64 / max as f64);
            let _ = write!(out, "{x:.1},{y:.1} ");
        }
        out.push_str("\"/>\n");
    }
    out.push_str("</svg>\n");
}

/// HTML-escapes text for element content and quoted attribute values.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The value, or a dash for unknown.
fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "–".to_string(), |v| v.to_string())
}

fn duration(ms: u64) -> String {
    if ms < 10_000 {
        format!("{ms} ms")
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}

/// Binary units with one decimal: `1234` -> `1.2 KiB`.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    // 1023.95 would print as "1024.0", so move up a unit before that.
    while v >= 1023.95 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// Relative age of `t` at `now`, both epoch ms.
fn ago(now: i64, t: i64) -> String {
    let ms = now.saturating_sub(t);
    if ms < 0 {
        return "in the future".to_string();
    }
    match ms / 1000 {
        s @ 0..=119 => format!("{s} s ago"),
        s @ 120..=7_199 => format!("{} min ago", s / 60),
        s @ 7_200..=172_799 => format!("{} h ago", s / 3600),
        s => format!("{} d ago", s / 86_400),
    }
}

/// UTC time and age, e.g. `2023-11-14T22:13:20Z (5 s ago)`.
fn stamp(now: i64, t: i64) -> String {
    format!("{} ({})", utc(t), ago(now, t))
}

/// Epoch milliseconds as UTC ISO-8601 to the second, e.g. `2023-11-14T22:13:20Z`.
fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    let (hh, mm, ss) = (s / 3600, s % 3600 / 60, s % 60);
    format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z")
}

/// (year, month, day) of a day count since 1970-01-01, proleptic Gregorian (H. Hinnant).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::history::Phases;

    const T0: i64 = 1_700_000_000_000;

    fn attempt(id: u64, status: Status) -> CheckpointRecord {
        CheckpointRecord {
            id: CheckpointId(id),
            kind: Kind::Checkpoint,
            savepoint: None,
            status,
            trigger_time: T0 + id as i64 * 10_000,
            duration_ms: Some(100 + id * 7),
            phases: Phases::default(),
            bytes: Some(1000 * id),
            full: id.is_multiple_of(5),
            records: id * 10,
            partitions: Vec::new(),
            watermark: Some(EventTime(T0)),
            failure: None,
        }
    }

    fn partition(topic: &str, partition: i32) -> PartitionView {
        let topic = topic.to_string();
        let max_event_time = Some(EventTime(T0));
        PartitionView {
            topic,
            partition,
            next_offset: Some(42),
            lag: None,
            max_event_time,
        }
    }

    fn view(attempts: Vec<CheckpointRecord>) -> PageView {
        let partitions = vec![partition("events", 0), partition("events", 1)];
        let now_ms = T0 + 5_000;
        PageView {
            attempts,
            partitions,
            watermark: Some(EventTime(T0)),
            now_ms,
            ..PageView::default()
        }
    }

    fn completed(n: u64) -> Vec<CheckpointRecord> {
        (0..n)
            .rev()
            .map(|i| attempt(i, Status::Completed))
            .collect()
    }

    /// Rows in the `<tbody>` of the table with this id.
    fn body_rows(html: &str, id: &str) -> usize {
        let table = &html[html.find(&format!("id=\"{id}\"")).expect("table")..];
        let body = &table[table.find("<tbody>").expect("tbody")..];
        body[..body.find("</tbody>").expect("end")]
            .matches("<tr")
            .count()
    }

    fn chart_svg(html: &str) -> &str {
        let svg = &html[html.find("<svg id=\"chart\"").expect("chart")..];
        &svg[..svg.find("</svg>").expect("svg end")]
    }

    #[test]
    fn one_row_per_attempt_and_partition_with_status_data() {
        use Status::*;
        let statuses = [InProgress, Completed, Failed, Abandoned];
        let attempts = (0..7).rev().map(|i| attempt(i, statuses[i as usize % 4]));
        let html = render(&view(attempts.collect()));
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(html.contains("<title>checkpointer</title>"));
        assert_eq!(body_rows(&html, "history"), 7);
        assert_eq!(body_rows(&html, "partitions"), 2);
        for s in statuses {
            let attr = format!("data-status=\"{}\"", s.label());
            assert!(html.contains(&attr), "{attr}");
        }
        assert!(html.contains("<tr class=\"st-failed\" data-id=\"6\" data-status=\"failed\">"));
        for link in ["/api/checkpoints", "/api/savepoints", "/metrics"] {
            assert!(html.contains(&format!("href=\"{link}\"")), "{link}");
        }
        assert!(html.contains("There are no savepoints."));
        assert!(!html.contains("<script"));
        let empty = render(&PageView::default());
        assert_eq!(body_rows(&empty, "history"), 0);
        assert_eq!(body_rows(&empty, "partitions"), 0);
        assert!(empty.contains("not ready") && empty.contains("none yet"));
    }

    #[test]
    fn escapes_everything_from_data() {
        let all = escape(r#"a&b<c>"d"'e'"#);
        assert_eq!(all, "a&amp;b&lt;c&gt;&quot;d&quot;&#39;e&#39;");
        let hostile = "<script>alert('x')</script>";
        let mut failed = attempt(1, Status::Failed);
        failed.failure = Some(format!("disk full {hostile} & \"more\""));
        let mut sp = attempt(2, Status::Completed);
        sp.kind = Kind::Savepoint;
        sp.savepoint = Some(hostile.to_string());
        let mut v = view(vec![sp, failed]);
        v.ready_reason = hostile.to_string();
        v.restored_from = hostile.to_string();
        v.partitions.push(partition(hostile, 3));
        let name = hostile.to_string();
        let (checkpoint_id, created_ms, entries) = (2, 0, 9);
        v.savepoints.push(SavepointView {
            name,
            checkpoint_id: CheckpointId(checkpoint_id),
            created_ms,
            entries,
        });
        let html = render(&v);
        assert!(!html.contains("<script"), "{html}");
        assert!(html.contains("disk full &lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp;"));
        assert!(html.contains("savepoint &lt;script&gt;"));
        assert_eq!(body_rows(&html, "savepoints"), 1);
        assert_eq!(body_rows(&html, "partitions"), 3);
    }

    #[test]
    fn chart_never_divides_by_zero() {
        let clean = |svg: &str| !svg.contains("NaN") && !svg.contains("inf");
        for n in [0, 1, 2, 50] {
            let html = render(&view(completed(n)));
            let svg = chart_svg(&html);
            assert!(clean(svg), "{n}: {svg}");
            assert_eq!(svg.contains("not enough checkpoints yet"), n < 2, "{n}");
            assert_eq!(svg.matches("<polyline").count(), if n < 2 { 0 } else { 2 });
        }
        // Completed without duration or size, plus an attempt that is not completed.
        let mut attempts = completed(4);
        for a in &mut attempts {
            (a.duration_ms, a.bytes) = (None, Some(0));
        }
        attempts.push(attempt(9, Status::Failed));
        let html = render(&view(attempts));
        assert!(clean(chart_svg(&html)) && chart_svg(&html).contains("<polyline"));
        // One completed among failures is still not enough.
        let html = render(&view(vec![
            attempt(3, Status::Failed),
            attempt(2, Status::Completed),
        ]));
        assert!(chart_svg(&html).contains("not enough checkpoints yet"));
    }

    #[test]
    fn formats_utc_times() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(T0), "2023-11-14T22:13:20Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_709_208_000_999), "2024-02-29T12:00:00Z");
        assert_eq!(utc(-1), "1969-12-31T23:59:59Z");
        assert_eq!(civil_from_days(-719_468), (0, 3, 1));
    }

    #[test]
    fn formats_bytes_durations_and_ages() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1234), "1.2 KiB");
        assert_eq!(human_bytes(1_048_575), "1.0 MiB");
        assert_eq!(human_bytes(5 << 30), "5.0 GiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
        assert_eq!(duration(250), "250 ms");
        assert_eq!(duration(12_345), "12.3 s");
        assert_eq!(ago(10_000, 5_000), "5 s ago");
        assert_eq!(ago(0, 1), "in the future");
        assert_eq!(ago(3 * 86_400_000, 0), "3 d ago");
    }
}
