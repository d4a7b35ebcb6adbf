//! What librdkafka alone costs per output record: produces records shaped like the service's
//! output (a `window|key|start` key, a JSON payload of about 150 bytes) to a throwaway Apache
//! Kafka broker with the service's producer settings (idempotent, `acks=all`, `linger.ms=5`,
//! 4,096 deliveries outstanding) and reports this process's CPU seconds per record, two ways:
//! a `FutureProducer` with a future per record (as the service's emitter sends), and a
//! `ThreadedProducer` whose delivery callback counts acknowledgements.
//!
//! `producer_floor [RECORDS]` (default 2,000,000). `PRODUCER_FLOOR_OPTIONS=k=v,k=v` adds
//! producer settings; `PRODUCER_FLOOR_IN_FLIGHT` changes the bound on outstanding deliveries.
//! A benchmark by hand (docs/benchmarks.md), never a test.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use integration_tests::{unique_name, Broker};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{
    BaseRecord, DeliveryFuture, DeliveryResult, FutureProducer, FutureRecord, Producer,
    ProducerContext, ThreadedProducer,
};
use rdkafka::ClientContext;

/// CPU seconds (user and system) of this process so far.
fn cpu_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let rest = &stat[stat.rfind(')').context("/proc/self/stat")? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        Ok(fields
            .get(i)
            .context("/proc/self/stat field")?
            .parse::<f64>()?)
    };
    // utime and stime, in clock ticks of 1/100 s
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

/// Counts acknowledgements; the sender waits on it while too many are outstanding.
#[derive(Clone, Default)]
struct Acks(Arc<(AtomicUsize, AtomicUsize, Mutex<()>, Condvar)>);

impl ClientContext for Acks {}

impl ProducerContext for Acks {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let (acked, failed, lock, ready) = &*self.0;
        if result.is_err() {
            failed.fetch_add(1, Ordering::Relaxed);
        }
        acked.fetch_add(1, Ordering::Release);
        let _guard = lock.lock();
        ready.notify_one();
    }
}

fn config(bootstrap: &str) -> Result<ClientConfig> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5");
    if let Ok(extra) = std::env::var("PRODUCER_FLOOR_OPTIONS") {
        for pair in extra.split(',').filter(|s| !s.is_empty()) {
            let Some((k, v)) = pair.split_once('=') else {
                bail!("PRODUCER_FLOOR_OPTIONS: {pair:?} is not key=value");
            };
            c.set(k, v);
        }
    }
    Ok(c)
}

fn record(i: usize, key: &mut String, payload: &mut String) {
    use std::fmt::Write as _;
    key.clear();
    payload.clear();
    let user = i % 1_000_000;
    let _ = write!(key, "tumble|p0-user-{user:07}|1700000000000");
    let _ = write!(
        payload,
        "{{\"window\":\"tumble\",\"key\":\"p0-user-{user:07}\",\"start\":1700000000000,\"end\":1700000010000,\"count\":3,\"sum\":123.0,\"min\":1.0,\"max\":100.0,\"mean\":41.0}}"
    );
}

fn with_futures(bootstrap: &str, topic: &str, n: usize, in_flight: usize) -> Result<()> {
    let producer: FutureProducer = config(bootstrap)?.create()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    runtime.block_on(async {
        let mut outstanding: VecDeque<DeliveryFuture> = VecDeque::new();
        let (mut key, mut payload) = (String::new(), String::new());
        let mut failed = 0;
        for i in 0..n {
            if outstanding.len() >= in_flight {
                if let Some(d) = outstanding.pop_front() {
                    failed += usize::from(!matches!(d.await, Ok(Ok(_))));
                }
            }
            record(i, &mut key, &mut payload);
            loop {
                match producer.send_result(FutureRecord::to(topic).key(&key).payload(&payload)) {
                    Ok(d) => break outstanding.push_back(d),
                    Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        }
        while let Some(d) = outstanding.pop_front() {
            failed += usize::from(!matches!(d.await, Ok(Ok(_))));
        }
        if failed > 0 {
            bail!("{failed} deliveries failed");
        }
        Ok(())
    })
}

fn with_callback(bootstrap: &str, topic: &str, n: usize, in_flight: usize) -> Result<()> {
    let acks = Acks::default();
    let producer: ThreadedProducer<Acks> = config(bootstrap)?.create_with_context(acks.clone())?;
    let (acked, failed, lock, ready) = &*acks.0;
    let (mut key, mut payload) = (String::new(), String::new());
    for i in 0..n {
        while i - acked.load(Ordering::Acquire) >= in_flight {
            let guard = lock.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            let _ = ready.wait_timeout(guard, Duration::from_millis(1));
        }
        record(i, &mut key, &mut payload);
        while producer
            .send(BaseRecord::to(topic).key(&key).payload(&payload))
            .is_err()
        {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    producer.flush(Duration::from_secs(60))?;
    while acked.load(Ordering::Acquire) < n {
        std::thread::sleep(Duration::from_millis(1));
    }
    match failed.load(Ordering::Relaxed) {
        0 => Ok(()),
        f => bail!("{f} deliveries failed"),
    }
}

fn main() -> Result<()> {
    let n: usize = match std::env::args().nth(1) {
        Some(v) => v.parse().context("RECORDS")?,
        None => 2_000_000,
    };
    let in_flight: usize = match std::env::var("PRODUCER_FLOOR_IN_FLIGHT") {
        Ok(v) => v.parse().context("PRODUCER_FLOOR_IN_FLIGHT")?,
        Err(_) => 4096,
    };
    let broker = Broker::start()?;
    println!("| way | records | wall s | CPU s | records per CPU-s | CPU µs per record |");
    println!("|---|---|---|---|---|---|");
    for way in ["future", "callback", "future", "callback"] {
        let topic = unique_name("producer-floor");
        broker.create_topic(&topic, 1)?;
        let (cpu, wall) = (cpu_seconds()?, Instant::now());
        match way {
            "future" => with_futures(broker.bootstrap(), &topic, n, in_flight)?,
            _ => with_callback(broker.bootstrap(), &topic, n, in_flight)?,
        }
        let cpu = cpu_seconds()? - cpu;
        println!(
            "| {way} | {n} | {:.2} | {cpu:.2} | {:.0} | {:.2} |",
            wall.elapsed().as_secs_f64(),
            n as f64 / cpu,
            cpu * 1e6 / n as f64
        );
    }
    Ok(())
}
