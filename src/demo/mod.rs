//! `checkpointer demo`: the service against an embedded Kafka-protocol broker (librdkafka's
//! mock cluster), fed by a small event generator, with the emitted windows printed. Nothing to
//! install beyond cargo.
//!
//! The embedded broker keeps its log in memory, so the demo keeps a journal of its input
//! (`journal`). Started again, it replays the journal into the new broker, every event at its
//! old offset, and the service resumes from its last checkpoint exactly as it would against a
//! real broker after a redeploy. `--fresh` starts over.

mod journal;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::clock::epoch_ms;
use crate::config::Settings;
use crate::generator::Events;
use crate::store::{Open, Store};
use journal::{Delivered, Partitions, Writer};

pub struct DemoOptions {
    pub config: PathBuf,
    /// Events per second produced by the generator.
    pub rate: u32,
    /// Forget the previous run's state and input.
    pub fresh: bool,
}

const EVENTS_TOPIC: &str = "demo-events";
const PARTITIONS: i32 = 3;
const KEYS: u64 = 20;
/// Replaying more than this (about 1.5 hours of demo at the default rate) would make the start
/// slow; such a journal is started over.
const MAX_JOURNAL: usize = 1_000_000;
/// Replayed events in flight at once (librdkafka queues at most 100,000 by default).
const REPLAY_WINDOW: usize = 10_000;

/// The journal of the demo whose checkpoint directory is `dir`: `<dir>.events`.
fn journal_path(dir: &Path) -> PathBuf {
    let mut name = dir.as_os_str().to_owned();
    name.push(".events");
    PathBuf::from(name)
}

/// Runs until Ctrl-C / SIGTERM.
pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    let cluster = MockCluster::new(1).context("cannot start the embedded broker")?;
    let brokers = cluster.bootstrap_servers();
    let mut env: HashMap<String, String> = std::env::vars().collect();
    env.insert("CHECKPOINTER_KAFKA__BROKERS".into(), brokers.clone());
    env.insert("CHECKPOINTER_KAFKA__TOPICS".into(), EVENTS_TOPIC.into());
    let settings = Settings::load(&opts.config, Some(env))?;
    cluster
        .create_topic(EVENTS_TOPIC, PARTITIONS, 1)
        .context("cannot create the demo input topic")?;
    cluster
        .create_topic(&settings.output.topic, 1, 1)
        .context("cannot create the demo output topic")?;
    let dir = settings.checkpoint.dir.clone();
    let journal = journal_path(&dir);
    let previous = if opts.fresh {
        None
    } else {
        previous_run(&dir, &journal)?
    };
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("enable.idempotence", "true")
        // one event at a time, each journaled first: no batching delay
        .set("linger.ms", "0")
        .create()
        .context("cannot create the demo generator")?;
    let mut next = vec![0i64; PARTITIONS as usize];
    match &previous {
        Some(events) => {
            let replayed = replay(&producer, events).await?;
            for (p, evs) in events {
                next[*p as usize] = evs.len() as i64;
            }
            println!(
                "demo: resuming the previous run: {replayed} events replayed into the embedded broker at their offsets; the service restores its last checkpoint from {} and reads on from there (--fresh starts over)",
                dir.display()
            );
        }
        None => {
            for stale in [&dir, &journal] {
                remove(stale)?;
            }
            println!(
                "demo: starting fresh (state in {}); stop with Ctrl-C and run the same command again to see it resume",
                dir.display()
            );
        }
    }
    tracing::info!(
        broker = %brokers,
        http = %settings.http.listen,
        dir = %dir.display(),
        rate = opts.rate,
        "demo: embedded broker up; generator and service starting (Ctrl-C stops)"
    );
    if let Some(parent) = journal.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let writer = Writer::append_to(&journal)?;
    let generator = tokio::spawn(feed(producer, writer, next, opts.rate.max(1)));
    let reader: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "checkpointer-demo-reader")
        .set("auto.offset.reset", "earliest")
        .create()
        .context("cannot create the demo output reader")?;
    reader
        .subscribe(&[settings.output.topic.as_str()])
        .context("cannot read the demo output topic")?;
    let printer = tokio::spawn(print_windows(reader));
    let result = crate::service::run(settings, crate::service::shutdown_signal()).await;
    // stop the demo's own clients before their broker goes away
    generator.abort();
    printer.abort();
    if let Ok(Err(e)) = generator.await {
        tracing::error!(error = %e, "demo generator stopped");
    }
    let _ = printer.await;
    drop(cluster);
    result
}

fn remove(path: &Path) -> anyhow::Result<()> {
    let result = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match result {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot clear {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// The previous run's input, when its state can be resumed: a checkpoint store and a journal
/// that holds at least every event the store's offsets cover.
fn previous_run(dir: &Path, journal: &Path) -> anyhow::Result<Option<Partitions>> {
    if !dir.exists() || !journal.exists() {
        return Ok(None);
    }
    let events = match journal::read(journal) {
        Ok(read) if read.events.values().map(Vec::len).sum::<usize>() > MAX_JOURNAL => {
            println!("demo: the previous run's journal holds more than {MAX_JOURNAL} events; starting fresh");
            return Ok(None);
        }
        Ok(read) => {
            journal::truncate(journal, read.complete_len)?;
            read.events
        }
        Err(e) => {
            println!("demo: {e}; starting fresh");
            return Ok(None);
        }
    };
    let store = match Store::open(dir, Open::Inspect) {
        Ok(store) => store,
        Err(e @ crate::store::StoreError::Locked { .. }) => {
            bail!("{e} (is another demo running?)")
        }
        Err(e) => {
            println!("demo: cannot read the previous run's state ({e}); starting fresh");
            return Ok(None);
        }
    };
    let current = store.current()?;
    for position in current.iter().flat_map(|m| &m.partitions) {
        let held = events
            .get(&position.partition.partition)
            .map_or(0, |e| e.len() as i64);
        if position.next.is_some_and(|n| n.0 > held) {
            println!(
                "demo: the previous run's checkpoint covers more of {} than its journal holds ({:?} > {held}); starting fresh",
                position.partition, position.next
            );
            return Ok(None);
        }
    }
    Ok(Some(events))
}

/// Produces the journal's events again, each at its partition; fails unless every one lands
/// at its old offset.
async fn replay(producer: &FutureProducer, events: &Partitions) -> anyhow::Result<usize> {
    let all: Vec<&Delivered> = events.values().flatten().collect();
    for window in all.chunks(REPLAY_WINDOW) {
        replay_window(producer, window).await?;
    }
    Ok(all.len())
}

async fn replay_window(producer: &FutureProducer, events: &[&Delivered]) -> anyhow::Result<()> {
    let mut sends = Vec::with_capacity(events.len());
    for e in events {
        let record = FutureRecord::to(EVENTS_TOPIC)
            .key(&e.key)
            .payload(&e.payload)
            .partition(e.partition);
        sends.push((e.offset, producer.send_result(record)));
    }
    for (offset, send) in sends {
        let queued = send.map_err(|(e, _)| anyhow::anyhow!("cannot replay an event: {e}"))?;
        match queued.await {
            Ok(Ok(at)) if at.offset == offset => {}
            Ok(Ok(at)) => bail!(
                "replayed event landed at offset {} of partition {}, not {offset}",
                at.offset,
                at.partition
            ),
            Ok(Err((e, _))) => bail!("cannot replay an event: {e}"),
            Err(_) => bail!("replay cancelled"),
        }
    }
    Ok(())
}

/// FNV-1a: the demo picks its partitions itself, so that each event is journaled at its
/// partition and offset before it is produced.
fn partition_of(key: &str) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in key.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h % PARTITIONS as u32) as i32
}

/// The demo's generator: `rate` events per second for `KEYS` users, each journaled (written
/// through to the kernel) before it is produced and retried until the broker has it, so the
/// journal always holds every event the service can have read.
async fn feed(
    producer: FutureProducer,
    mut journal: Writer,
    mut next: Vec<i64>,
    rate: u32,
) -> anyhow::Result<()> {
    let mut events = Events::new(epoch_ms().max(1) as u64, KEYS);
    let batch = (rate / 10).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        for _ in 0..batch {
            let (key, payload) = events.next_at(epoch_ms());
            let partition = partition_of(&key);
            let event = Delivered {
                partition,
                offset: next[partition as usize],
                key,
                payload,
            };
            journal.push(&event)?;
            journal.flush()?;
            loop {
                let record = FutureRecord::to(EVENTS_TOPIC)
                    .key(&event.key)
                    .payload(&event.payload)
                    .partition(partition);
                match producer.send(record, Duration::from_secs(5)).await {
                    Ok(at) if at.offset == event.offset => break,
                    Ok(at) => bail!(
                        "demo event landed at offset {} of partition {partition}, journaled at {}",
                        at.offset,
                        event.offset
                    ),
                    Err((e, _)) => {
                        tracing::warn!(error = %e, "demo generator could not produce; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
            next[partition as usize] += 1;
        }
    }
}

async fn print_windows(reader: StreamConsumer) {
    loop {
        match reader.recv().await {
            Ok(m) => {
                if let Some(Ok(text)) = m.payload_view::<str>() {
                    println!("window {text}");
                }
            }
            Err(e) => tracing::debug!(error = %e, "demo reader"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_journal_sits_next_to_the_checkpoint_directory() {
        assert_eq!(
            journal_path(Path::new("./data/demo")),
            PathBuf::from("./data/demo.events")
        );
    }

    #[test]
    fn every_key_has_one_partition_and_all_partitions_are_used() {
        let used: std::collections::BTreeSet<i32> = (0..20)
            .map(|u| partition_of(&format!("user-{u}")))
            .collect();
        assert_eq!(used, (0..PARTITIONS).collect());
        assert_eq!(partition_of("user-3"), partition_of("user-3"));
    }
}
