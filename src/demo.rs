//! `checkpointer demo`: the service against an embedded Kafka-protocol broker (librdkafka's
//! mock cluster), fed by a small event generator, with the emitted windows printed. Nothing to
//! install beyond cargo. The embedded broker keeps its data in memory, so every demo run
//! starts from an empty checkpoint directory.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::FutureProducer;

use crate::config::Settings;

pub struct DemoOptions {
    pub config: PathBuf,
    /// Events per second produced by the generator.
    pub rate: u32,
}

const EVENTS_TOPIC: &str = "demo-events";
const KEYS: u64 = 20;

/// Runs until Ctrl-C / SIGTERM.
pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    let cluster = MockCluster::new(1).context("cannot start the embedded broker")?;
    let brokers = cluster.bootstrap_servers();
    let mut env: HashMap<String, String> = std::env::vars().collect();
    env.insert("CHECKPOINTER_KAFKA__BROKERS".into(), brokers.clone());
    env.insert("CHECKPOINTER_KAFKA__TOPICS".into(), EVENTS_TOPIC.into());
    let settings = Settings::load(&opts.config, Some(env))?;
    cluster
        .create_topic(EVENTS_TOPIC, 3, 1)
        .context("cannot create the demo input topic")?;
    cluster
        .create_topic(&settings.output.topic, 1, 1)
        .context("cannot create the demo output topic")?;
    let dir = &settings.checkpoint.dir;
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("cannot clear the demo state directory {}", dir.display()))?;
    }
    tracing::info!(
        broker = %brokers,
        http = %settings.http.listen,
        dir = %dir.display(),
        rate = opts.rate,
        "demo: embedded broker up; generator and service starting (Ctrl-C stops)"
    );
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("linger.ms", "5")
        .create()
        .context("cannot create the demo generator")?;
    let generator = tokio::spawn(crate::generator::run(
        producer,
        EVENTS_TOPIC.to_string(),
        opts.rate.max(1),
        KEYS,
    ));
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
    let result = crate::service::run(settings).await;
    // stop the demo's own clients before their broker goes away
    generator.abort();
    printer.abort();
    let _ = generator.await;
    let _ = printer.await;
    drop(cluster);
    result
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
