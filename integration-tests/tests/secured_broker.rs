//! A broker that only talks SASL_SSL with SCRAM-SHA-512 to the service (the usual managed-Kafka
//! setup): the service's consumer and producer complete the TLS handshake against a certificate
//! signed by a CA it is given, authenticate, and the output is exact; the password never reaches
//! the log. With a wrong password the service stays up, not ready, and says why.

use std::time::Duration;

use anyhow::{anyhow, ensure, Result};
use integration_tests::model::{expected_windows, Event};
use integration_tests::verify::{check_output, contains_all, output_problems};
use integration_tests::workload::{self, StreamShape, START_TS};
use integration_tests::{test_seed, unique_name, Broker, OutputReader, Producer};
use integration_tests::{Service, ServiceConfig};
use rand::rngs::StdRng;
use rand::SeedableRng;

const TIMEOUT: Duration = Duration::from_secs(90);

#[test]
fn the_service_reads_and_writes_over_sasl_ssl_with_scram() {
    let seed = test_seed("secured_broker");
    let broker = Broker::start_secured().unwrap_or_else(|err| panic!("{err:#}"));
    if let Err(err) = run(seed, &broker) {
        panic!("{err:#}\n(seed {seed})");
    }
}

fn secured_config(
    broker: &Broker,
    input: &str,
    output: &str,
    password: &str,
) -> Result<ServiceConfig> {
    let sec = broker
        .secured()
        .ok_or_else(|| anyhow!("the broker has no SASL_SSL listener"))?;
    let mut config = ServiceConfig::new(broker, input, output);
    config.brokers = sec.bootstrap.clone();
    for (key, value) in [
        ("security.protocol", "SASL_SSL"),
        ("sasl.mechanisms", "SCRAM-SHA-512"),
        ("sasl.username", sec.user.as_str()),
        ("sasl.password", password),
        ("ssl.ca.location", &sec.ca.to_string_lossy()),
    ] {
        config.kafka_options.insert(key.into(), value.into());
    }
    Ok(config)
}

fn run(seed: u64, broker: &Broker) -> Result<()> {
    let password = broker
        .secured()
        .ok_or_else(|| anyhow!("the broker has no SASL_SSL listener"))?
        .password
        .clone();
    let input = unique_name("secured-in");
    let output = unique_name("secured-out");
    broker.create_topic(&input, 2)?;
    broker.create_topic(&output, 1)?;
    let events = workload::generate(
        &mut StdRng::seed_from_u64(seed),
        StreamShape {
            partitions: 2,
            records_per_partition: 300,
            keys: 4,
            start_ts: START_TS,
        },
    );
    let sentinel_ts = workload::max_ts(&events) + 3_600_000;
    let all: Vec<Event> = events.iter().flatten().cloned().collect();
    let records = workload::with_sentinels(&events, sentinel_ts);
    // the test's own clients use the plaintext listener
    Producer::new(broker)?.send_partitions(&input, &records)?;

    let config = secured_config(broker, &input, &output, &password)?;
    let expected = expected_windows(&config.windows, &all);
    let mut service = Service::new("secured_broker", config)?;
    let mut reader = OutputReader::new(broker, &output)?;
    service.start()?;
    service.wait_ready(TIMEOUT)?;
    ensure!(
        reader.poll_until(TIMEOUT, |m| contains_all(&expected, m)),
        "output incomplete over SASL_SSL: {}\n{}",
        output_problems(&expected, reader.messages()),
        service.log_tail(40)
    );
    service.stop_cleanly(Duration::from_secs(30))?;
    reader.drain(Duration::from_secs(1), Duration::from_secs(10));
    let summary = check_output(&expected, reader.messages())?;
    ensure!(
        summary.duplicates == 0,
        "windows sent twice without a crash"
    );
    let log = service.log_since_start();
    ensure!(!log.contains(&password), "the SASL password is in the log");

    // a wrong password: up, not ready, and the log says authentication failed
    let wrong = secured_config(
        broker,
        &unique_name("secured-in"),
        &output,
        "wrong-password",
    )?;
    let mut refused = Service::new("secured_wrong_password", wrong)?;
    refused.start()?;
    let said = integration_tests::poll_until(
        "an authentication failure in the log",
        TIMEOUT,
        Duration::from_millis(300),
        || {
            let log = refused.log_since_start();
            Ok(log.contains("Authentication failed").then_some(()))
        },
    );
    let ready = refused.readyz().ok();
    let running = refused.is_running()?;
    let status = refused.sigterm(Duration::from_secs(40))?;
    said.map_err(|e| anyhow!("{e:#}\n{}", refused.log_tail(30)))?;
    ensure!(running, "the service exited on an authentication failure");
    ensure!(ready == Some(503), "ready with a wrong password: {ready:?}");
    ensure!(status.code() == Some(0), "exit status {status}");
    Ok(())
}
