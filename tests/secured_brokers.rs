//! The binary is built with TLS: a configuration for a SASL_SSL broker with SCRAM (the usual
//! managed-Kafka setup) starts, where a build without OpenSSL refuses it at start ("OpenSSL
//! not available at build time"). Nothing listens at the address given, so the service stays up
//! and not ready, and stops cleanly. (The TLS handshake and SCRAM login against a real broker are
//! tested in `integration-tests/tests/secured_broker.rs`.)

use std::time::Duration;

use integration_tests::free_addr;
use integration_tests::http::try_get;
use integration_tests::process::spawn_service;

const BIN: &str = env!("CARGO_BIN_EXE_checkpointer");

#[test]
fn a_sasl_ssl_scram_configuration_is_accepted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let addr = free_addr().expect("free port");
    // nothing listens on port 1: the clients are created, then fail to connect
    let yaml = format!(
        r#"
kafka:
  brokers: "127.0.0.1:1"
  group_id: secured
  topics: [in]
  options:
    security.protocol: SASL_SSL
    sasl.mechanisms: SCRAM-SHA-512
    sasl.username: reader
    sasl.password: not-logged
    ssl.endpoint.identification.algorithm: https
input: {{ key: /user, value: /amount, timestamp: /ts }}
windows:
  - {{ name: per_minute, type: tumbling, size: 1m }}
output: {{ topic: out }}
checkpoint: {{ dir: "{}" }}
http: {{ listen: "{addr}" }}
"#,
        dir.path().join("state").display()
    );
    let config = dir.path().join("c.yaml");
    std::fs::write(&config, yaml).expect("write config");
    let log = dir.path().join("service.log");
    let mut service = spawn_service(BIN, &config, &log, "info").expect("spawn checkpointer");
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    service
        .wait_for("/healthz", Duration::from_secs(30), || {
            try_get(addr, "/healthz").is_some_and(|r| r.status == 200)
        })
        .unwrap_or_else(|err| {
            panic!(
                "the service refused the configuration or never answered ({err:#}):\n{}",
                log_text()
            )
        });
    // the clients exist and keep trying; nothing says TLS or SCRAM is unavailable
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        service.try_wait().expect("try_wait").is_none(),
        "exited:\n{}",
        log_text()
    );
    let text = log_text();
    assert!(
        !text.contains("not available at build time") && !text.contains("Unsupported value"),
        "{text}"
    );
    assert_eq!(try_get(addr, "/readyz").map(|r| r.status), Some(503));
    let status = service.terminate().expect("SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", log_text());
}
