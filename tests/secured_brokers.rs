//! The binary is built with TLS: a configuration for a SASL_SSL broker with SCRAM (the usual
//! managed-Kafka setup) starts, where a build without OpenSSL refuses it at start ("OpenSSL
//! not available at build time"). Nothing listens at the address given, so the service stays up
//! and not ready, and stops cleanly. (The TLS handshake and SCRAM login against a real broker are
//! tested in `integration-tests/tests/secured_broker.rs`.)

use std::time::{Duration, Instant};

mod common;
use common::{free_addr, get, nix_kill, spawn_service};

#[test]
fn a_sasl_ssl_scram_configuration_is_accepted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let addr = free_addr();
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
    let mut service = spawn_service(&config, &log);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(addr, "/healthz").is_none_or(|(s, _)| s != 200) {
        if let Ok(Some(status)) = service.0.try_wait() {
            panic!(
                "the service refused the configuration ({status}):\n{}",
                log_text()
            );
        }
        assert!(Instant::now() < deadline, "no /healthz\n{}", log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    // the clients exist and keep trying; nothing says TLS or SCRAM is unavailable
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        service.0.try_wait().expect("try_wait").is_none(),
        "exited:\n{}",
        log_text()
    );
    let text = log_text();
    assert!(
        !text.contains("not available at build time") && !text.contains("Unsupported value"),
        "{text}"
    );
    assert_eq!(get(addr, "/readyz").map(|r| r.0), Some(503));
    nix_kill(&service.0, "TERM");
    let status = service.0.wait().expect("wait");
    assert_eq!(status.code(), Some(0), "{}", log_text());
}
