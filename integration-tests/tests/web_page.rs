//! The status page as a person sees it: headless Chromium renders `GET /` of a working service;
//! the rendered DOM must show every checkpoint attempt the API knows, one row per assigned
//! partition, the chart and the savepoints, and a screenshot must come out.
//!
//! Needs Chromium (`/usr/bin/chromium`, or `CHROMIUM_BIN`); `scripts/test.sh` installs it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use integration_tests::cli::{self, CliOutput};
use integration_tests::lifecycle::{
    config, id_of, str_field, wait_consumed, Input, PARTITIONS, READY_TIMEOUT, STOP_TIMEOUT,
};
use integration_tests::metrics::CHECKPOINTS_COMPLETED;
use integration_tests::{test_seed, unique_name, Broker, Service};

const CHROMIUM_TIMEOUT: Duration = Duration::from_secs(60);
const SAVEPOINT: &str = "page-test";

#[test]
fn status_page_renders_attempts_partitions_chart_and_savepoints_in_chromium() {
    let seed = test_seed("web_page");
    if let Err(err) = run(seed) {
        panic!("{err:#}\n(web_page, seed {seed})");
    }
}

/// Headless Chromium on `url` with a fresh profile; `action` is `--dump-dom` or
/// `--screenshot=...`.
fn run_chromium(url: &str, action: &[String]) -> Result<CliOutput> {
    let profile = tempfile::Builder::new()
        .prefix("chromium-profile-")
        .tempdir()
        .context("creating a Chromium profile dir")?;
    let mut args: Vec<String> = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    .map(String::from)
    .to_vec();
    args.push(format!("--user-data-dir={}", profile.path().display()));
    args.extend(action.iter().cloned());
    args.push(url.to_owned());
    let chromium = cli::program("CHROMIUM_BIN", "/usr/bin/chromium", "chromium")?;
    cli::run_program(&chromium, &args, CHROMIUM_TIMEOUT)?.ok()
}

/// The part of `html` from `<table id="ID"` to its `</table>`.
fn table<'a>(html: &'a str, id: &str) -> Result<&'a str> {
    let start = html
        .find(&format!("<table id=\"{id}\""))
        .with_context(|| format!("no table #{id} in the page"))?;
    let len = html[start..]
        .find("</table>")
        .with_context(|| format!("table #{id} not closed"))?;
    Ok(&html[start..start + len])
}

/// Rows of a table's body.
fn body_rows(table: &str) -> Vec<&str> {
    let body = table
        .find("<tbody>")
        .map(|at| &table[at..])
        .unwrap_or_default();
    body.split("<tr").skip(1).collect()
}

/// The text of every cell of a row (markup-free cells only, as the page renders them).
fn cells(row: &str) -> Vec<&str> {
    row.split("<td")
        .skip(1)
        .filter_map(|cell| {
            let from = cell.find('>')? + 1;
            let to = cell.find("</td>")?;
            cell.get(from..to)
        })
        .collect()
}

/// The value of attribute `name` in the start tag at the beginning of `row`.
fn attribute<'a>(row: &'a str, name: &str) -> Option<&'a str> {
    let tag = &row[..row.find('>')?];
    let at = tag.find(&format!("{name}=\""))? + name.len() + 2;
    let len = tag[at..].find('"')?;
    Some(&tag[at..at + len])
}

/// `id -> status` of the attempts API, newest first, at most 200.
fn api_attempts(service: &Service) -> Result<BTreeMap<u64, String>> {
    service
        .api_checkpoints(200)?
        .iter()
        .map(|r| Ok((id_of(r)?, str_field(r, "status").to_owned())))
        .collect()
}

fn run(seed: u64) -> Result<()> {
    let broker = Broker::shared()?;
    let mut input = Input::new(broker, "page-in", seed)?;
    let output = unique_name("page-out");
    broker.create_topic(&output, 2)?;
    let cfg = config(
        broker,
        &input.topic,
        &output,
        "page",
        Duration::from_millis(300),
    );
    let mut service = Service::new("web_page", cfg)?;
    let produced = input.batch(100)?;
    service.start()?;
    service.wait_ready(READY_TIMEOUT)?;
    wait_consumed(&service, produced)?;
    service.wait_metrics(
        "three completed checkpoints",
        Duration::from_secs(20),
        |m| m.sum(CHECKPOINTS_COMPLETED).unwrap_or(0.0) >= 3.0,
    )?;
    let created = service.post(&format!("/api/savepoints?name={SAVEPOINT}"))?;
    ensure!(created.status == 201, "POST savepoint: {created:?}");

    let url = format!("{}/", service.url()?);
    let before = api_attempts(&service)?;
    let dump = run_chromium(&url, &["--dump-dom".to_owned()])?;
    let after = api_attempts(&service)?;
    let dom = dump.stdout;

    // every attempt the API listed is a row, with its terminal status; nothing else is
    let history = table(&dom, "history")?;
    let mut rows: BTreeMap<u64, String> = BTreeMap::new();
    for row in body_rows(history) {
        let id = attribute(row, "data-id")
            .and_then(|id| id.parse().ok())
            .with_context(|| format!("history row without a numeric data-id: {row}"))?;
        let status = attribute(row, "data-status")
            .with_context(|| format!("history row {id} without data-status"))?;
        ensure!(
            ["completed", "failed", "abandoned", "in_progress"].contains(&status),
            "row {id}: unknown status {status:?}"
        );
        ensure!(
            rows.insert(id, status.to_owned()).is_none(),
            "attempt {id} shown twice"
        );
    }
    for (id, status) in &before {
        match rows.get(id) {
            None => bail!("attempt {id} ({status}) from /api/checkpoints is not on the page"),
            Some(shown) if status != "in_progress" && shown != status => {
                bail!("attempt {id} is {status} in the API but {shown} on the page")
            }
            _ => {}
        }
    }
    let unknown: Vec<&u64> = rows.keys().filter(|id| !after.contains_key(id)).collect();
    ensure!(
        unknown.is_empty(),
        "rows {unknown:?} are not attempts of /api/checkpoints"
    );
    ensure!(
        rows.values().filter(|s| *s == "completed").count() >= 3,
        "fewer than 3 completed attempts on the page: {rows:?}"
    );

    let partitions = body_rows(table(&dom, "partitions")?);
    ensure!(
        partitions.len() == PARTITIONS,
        "{} partition rows, expected {PARTITIONS}: {partitions:?}",
        partitions.len()
    );
    let shown: BTreeSet<i32> = partitions
        .iter()
        .filter_map(|row| {
            let cells = cells(row);
            (cells.first() == Some(&input.topic.as_str()))
                .then(|| cells.get(1).and_then(|p| p.parse().ok()))
                .flatten()
        })
        .collect();
    ensure!(
        shown == (0..PARTITIONS as i32).collect(),
        "partition rows do not show {} partitions 0..{PARTITIONS}: {partitions:?}",
        input.topic
    );

    // the chart plots duration and size of every completed attempt on the page
    let chart_at = dom
        .find("<svg id=\"chart\"")
        .context("no <svg id=\"chart\"> on the page")?;
    let chart =
        &dom[chart_at..chart_at + dom[chart_at..].find("</svg>").context("svg not closed")?];
    let completed = rows.values().filter(|s| *s == "completed").count();
    let lines: Vec<usize> = chart
        .split("<polyline")
        .skip(1)
        .map(|line| {
            attribute(line, "points")
                .map(|p| p.split_whitespace().count())
                .unwrap_or(0)
        })
        .collect();
    ensure!(
        lines == [completed, completed],
        "chart lines with {lines:?} points, expected two of {completed} (completed attempts)"
    );

    let savepoints = table(&dom, "savepoints")?;
    ensure!(
        body_rows(savepoints).len() == 1 && savepoints.contains(SAVEPOINT),
        "savepoints table does not list {SAVEPOINT}: {savepoints}"
    );
    eprintln!(
        "[web_page] DOM: {} attempts ({completed} completed), {} partitions, chart, savepoint",
        rows.len(),
        partitions.len()
    );

    let screenshot = service.dir().join("status-page.png");
    run_chromium(
        &url,
        &[
            format!("--screenshot={}", screenshot.display()),
            "--window-size=1280,900".to_owned(),
        ],
    )?;
    let png = std::fs::read(&screenshot)
        .with_context(|| format!("no screenshot at {}", screenshot.display()))?;
    ensure!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is not a PNG",
        screenshot.display()
    );
    ensure!(
        png.len() > 8 * 1024,
        "screenshot of {} bytes: a blank page?",
        png.len()
    );
    eprintln!(
        "[web_page] screenshot {} ({} bytes; kept with CHECKPOINTER_TEST_KEEP=1)",
        screenshot.display(),
        png.len()
    );

    let status = service.sigterm(STOP_TIMEOUT)?;
    ensure!(
        status.code() == Some(0),
        "exit status after SIGTERM: {status}"
    );
    Ok(())
}
