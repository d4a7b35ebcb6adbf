//! Running the real service until every window is on the output topic: its CPU time and RSS
//! sampled, its metrics scraped, `/api/checkpoints` polled from a thread, then the stop; the
//! result is a [`ServiceRun`].

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Result};
use integration_tests::metrics::{self as m, Metrics};
use integration_tests::model::WindowSpec;
use integration_tests::{http, Broker, OutputReader, Service, ServiceConfig};
use serde_json::Value;

use crate::proc::{load_average, ProcSample, Sampler};
use crate::{Args, GB, SAMPLE_EVERY};

/// How often `/metrics` is scraped until the input is consumed (the resolution of that time).
const SCRAPE_WHILE_CONSUMING: Duration = Duration::from_millis(100);
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
const STOP_TIMEOUT: Duration = Duration::from_secs(600);
/// `/api/checkpoints` reads the store's history, which can wait behind a long checkpoint write:
/// polled from a thread of its own, with a generous timeout.
const API_EVERY: Duration = Duration::from_secs(2);
const API_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Outcome {
    Complete,
    Timeout,
    RssLimit,
    Exited,
}

/// A point in the service run: seconds since its start and the CPU time then.
#[derive(Clone, Copy, Default)]
pub(crate) struct Mark {
    pub(crate) at: f64,
    pub(crate) cpu: f64,
    pub(crate) rss: u64,
}

pub(crate) struct ServiceRun {
    pub(crate) outcome: Outcome,
    pub(crate) input_records: u64,
    pub(crate) windows_expected: usize,
    pub(crate) windows_received: usize,
    pub(crate) duplicates: u64,
    pub(crate) unexpected: u64,
    pub(crate) consumed_last: f64,
    pub(crate) consuming_from: f64,
    pub(crate) consumed: Option<Mark>,
    pub(crate) all_emitted: Option<Mark>,
    pub(crate) end: ProcSample,
    pub(crate) exit: String,
    pub(crate) stop_seconds: Option<f64>,
    pub(crate) metrics: Option<Metrics>,
    /// Every checkpoint attempt seen on `/api/checkpoints`, by id (last state seen).
    pub(crate) checkpoints: BTreeMap<u64, Value>,
    pub(crate) api_errors: Vec<String>,
    /// Epoch ms when the service phase ended (for the age of an unfinished checkpoint).
    pub(crate) ended_ms: i64,
    pub(crate) load_max: f64,
}

pub(crate) fn run_service(
    args: &Args,
    broker: &Broker,
    (input, output): (&str, &str),
    windows: &[WindowSpec],
    expected: &HashSet<String>,
    input_records: u64,
) -> Result<ServiceRun> {
    let mut config = ServiceConfig::new(broker, input, output);
    config.windows = windows.to_vec();
    config.checkpoint_interval = Duration::from_secs(2);
    config.mode = "exactly_once".into();
    config.max_out_of_orderness = Duration::from_secs(2);
    config.kafka_options = args.kafka_options.clone();
    let mut service = Service::new("e2e-bench", config)?;
    let mut reader = OutputReader::new(broker, output)?;

    let started = Instant::now();
    service.start()?;
    let sampler = Sampler::spawn(service.pid()?.as_raw());
    let api = service
        .http_addr()
        .map(ApiPoller::spawn)
        .ok_or_else(|| anyhow!("the service has no HTTP address"))?;
    let mut run = ServiceRun {
        outcome: Outcome::Timeout,
        input_records,
        windows_expected: expected.len(),
        windows_received: 0,
        duplicates: 0,
        unexpected: 0,
        consumed_last: 0.0,
        consuming_from: 0.0,
        consumed: None,
        all_emitted: None,
        end: ProcSample::default(),
        exit: String::new(),
        stop_seconds: None,
        metrics: None,
        checkpoints: BTreeMap::new(),
        api_errors: Vec::new(),
        ended_ms: 0,
        load_max: 0.0,
    };
    let mut received: HashSet<String> = HashSet::with_capacity(expected.len());
    let mut seen = 0;
    let mut last_scrape = Instant::now() - SAMPLE_EVERY;
    let mut last_progress = Instant::now();
    let mark = |s: ProcSample| Mark {
        at: started.elapsed().as_secs_f64(),
        cpu: s.cpu_seconds,
        rss: s.rss_bytes,
    };
    let finished = reader.poll_until(args.timeout, |messages| {
        for message in &messages[seen..] {
            if !expected.contains(&message.key) {
                run.unexpected += 1;
            } else if !received.insert(message.key.clone()) {
                run.duplicates += 1;
            }
        }
        seen = messages.len();
        run.windows_received = received.len();
        if run.windows_received == expected.len() {
            run.all_emitted = Some(mark(sampler.sample_now()));
            run.outcome = Outcome::Complete;
            return true;
        }
        let scrape_every = if run.consumed.is_some() {
            SAMPLE_EVERY
        } else {
            SCRAPE_WHILE_CONSUMING
        };
        if last_scrape.elapsed() >= scrape_every {
            last_scrape = Instant::now();
            if let Ok(metrics) = service.scrape() {
                let consumed = metrics.sum(m::RECORDS_CONSUMED).unwrap_or(0.0);
                if consumed == 0.0 {
                    run.consuming_from = started.elapsed().as_secs_f64();
                }
                if run.consumed.is_none() && consumed >= input_records as f64 {
                    run.consumed = Some(mark(sampler.sample_now()));
                }
                run.consumed_last = consumed;
            }
        }
        let sample = sampler.latest();
        if sample.exited {
            run.outcome = Outcome::Exited;
            return true;
        }
        if sample.hwm_bytes > args.max_rss_bytes {
            run.outcome = Outcome::RssLimit;
            return true;
        }
        if last_progress.elapsed() >= PROGRESS_EVERY {
            last_progress = Instant::now();
            run.load_max = run.load_max.max(load_average());
            let (rss, hwm) = (sample.rss_bytes as f64 / GB, sample.hwm_bytes as f64 / GB);
            eprintln!(
                "[bench] {:>5.0} s: consumed {}/{input_records}, windows {}/{}, \
                 rss {rss:.2} GiB (peak {hwm:.2}), cpu {:.0} s",
                started.elapsed().as_secs_f64(),
                run.consumed_last,
                run.windows_received,
                expected.len(),
                sample.cpu_seconds
            );
        }
        false
    });
    if !finished {
        run.outcome = Outcome::Timeout;
    }
    eprintln!(
        "[bench] service phase ended: {:?} after {:.1} s",
        run.outcome,
        started.elapsed().as_secs_f64()
    );

    run.ended_ms = epoch_ms();
    run.load_max = run.load_max.max(load_average());
    if run.outcome != Outcome::Exited {
        run.metrics = service.scrape().ok();
    }
    // one last poll while the service still runs; a SIGKILL for memory does not wait for it
    let mut api = Some(api);
    if run.outcome != Outcome::RssLimit {
        if let Some(api) = api.take() {
            (run.checkpoints, run.api_errors) = api.finish();
        }
    }
    sampler.sample_now();
    let stopping = Instant::now();
    match run.outcome {
        Outcome::RssLimit => {
            service.sigkill()?;
            run.exit = "SIGKILL (peak RSS over the limit)".into();
        }
        Outcome::Exited => {
            eprintln!("{}", service.log_tail(40));
            let status = service.wait_exit(Duration::from_secs(5))?;
            run.exit = format!("exited by itself: {status}");
        }
        Outcome::Complete | Outcome::Timeout => match service.sigterm(STOP_TIMEOUT) {
            Ok(status) => {
                run.stop_seconds = Some(stopping.elapsed().as_secs_f64());
                run.exit = format!("SIGTERM: {status}");
            }
            Err(err) => {
                run.exit = format!(
                    "SIGTERM failed, killed: {}",
                    err.to_string().lines().next().unwrap_or("")
                )
            }
        },
    }
    if let Some(api) = api.take() {
        (run.checkpoints, run.api_errors) = api.finish();
    }
    run.end = sampler.finish();
    Ok(run)
}

/// Checkpoint attempts by id, and the errors of failed polls.
type ApiSeen = (BTreeMap<u64, Value>, Vec<String>);

/// Polls `GET /api/checkpoints` every [`API_EVERY`] until finished, keeping the last state of
/// every attempt by id, so that checkpoints that ended long ago and one still in flight at the
/// end are both known even when a late request times out.
struct ApiPoller {
    seen: Arc<Mutex<ApiSeen>>,
    stop: Arc<AtomicBool>,
    handle: JoinHandle<()>,
}

impl ApiPoller {
    fn spawn(addr: SocketAddr) -> ApiPoller {
        let seen = Arc::new(Mutex::new((BTreeMap::new(), Vec::new())));
        let stop = Arc::new(AtomicBool::new(false));
        let (shared, stopped) = (seen.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            // errors before the first answer are the listener not being up yet
            let mut answered = false;
            loop {
                let page = http::get(addr, "/api/checkpoints?limit=100", API_TIMEOUT)
                    .and_then(|r| r.json())
                    .map_err(|err| err.to_string());
                let mut seen = shared.lock().unwrap_or_else(PoisonError::into_inner);
                match page {
                    Ok(page) => {
                        answered = true;
                        let list = page["checkpoints"].as_array().cloned().unwrap_or_default();
                        for record in list {
                            if let Some(id) = record["id"].as_u64() {
                                seen.0.insert(id, record);
                            }
                        }
                    }
                    // a service already stopped or killed no longer answers
                    Err(err) if answered && !stopped.load(Ordering::Relaxed) => seen.1.push(err),
                    Err(_) => {}
                }
                drop(seen);
                if stopped.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(API_EVERY);
            }
        });
        ApiPoller { seen, stop, handle }
    }

    /// One last poll, then the attempts seen and the errors met.
    fn finish(self) -> ApiSeen {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.handle.join();
        std::mem::take(&mut *self.seen.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

fn epoch_ms() -> i64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}
