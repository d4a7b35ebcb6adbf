//! The deployment files are checked as far as this machine can without a container engine:
//! the compose file with `docker-compose config`, the Prometheus configuration and alert rules
//! with `promtool` (including the rules' unit tests), every metric a dashboard or alert uses
//! against the metrics the service really exports, every alert against its runbook entry, and
//! the image's and compose stack's settings against the service's configuration checks.
//! `promtool` and `docker-compose` come from Debian's `prometheus` and `docker-compose`
//! packages (scripts/test.sh installs them).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use checkpointer::metrics::Metrics;
use yaml_rust2::{Yaml, YamlLoader};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml(path: &str) -> Yaml {
    YamlLoader::load_from_str(&read(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("{path} is empty"))
}

/// Runs a tool that must be installed; its output when it fails.
fn tool(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .current_dir(repo(""))
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program} ({e}); scripts/test.sh installs it (apt-get install prometheus docker-compose)")
        });
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn prometheus_config_and_alert_rules_pass_promtool_and_their_unit_tests() {
    tool(
        "promtool",
        &["check", "config", "deploy/prometheus/prometheus.yml"],
    );
    tool(
        "promtool",
        &["check", "rules", "deploy/prometheus/alerts.yml"],
    );
    tool(
        "promtool",
        &["test", "rules", "deploy/prometheus/alerts.test.yml"],
    );
}

#[test]
fn compose_file_is_valid() {
    tool(
        "docker-compose",
        &["-f", "docker-compose.yml", "config", "--quiet"],
    );
}

/// Names of `checkpointer_*` series an expression uses.
fn series_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("checkpointer_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        // a job label value ("checkpointer") has no underscore after it; a metric name does
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

fn exported(name: &str, names: &[String]) -> bool {
    let base = ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name);
    names.iter().any(|n| n == name || n == base)
}

fn dashboard_exprs() -> Vec<String> {
    let dash: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/dashboards/checkpointer.json")).expect("json");
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            out.push(target["expr"].as_str().expect("expr").to_string());
        }
    }
    out
}

fn alerts() -> Vec<(String, String)> {
    let rules = yaml("deploy/prometheus/alerts.yml");
    let mut out = Vec::new();
    for group in rules["groups"].as_vec().expect("groups") {
        for rule in group["rules"].as_vec().expect("rules") {
            out.push((
                rule["alert"].as_str().expect("alert name").to_string(),
                rule["expr"].as_str().expect("expr").to_string(),
            ));
        }
    }
    out
}

#[test]
fn dashboards_and_alerts_use_only_metrics_the_service_exports() {
    let metrics = Metrics::new();
    let names = metrics.names();
    assert!(names
        .iter()
        .any(|n| n == "checkpointer_consumer_lag_records"));
    let mut used = BTreeSet::new();
    let mut missing = Vec::new();
    let sources = dashboard_exprs()
        .into_iter()
        .map(|e| ("dashboard".to_string(), e))
        .chain(alerts().into_iter().map(|(a, e)| (format!("alert {a}"), e)));
    for (source, expr) in sources {
        let found = series_names(&expr);
        for name in found {
            if !exported(&name, names) {
                missing.push(format!("{source}: {name} in {expr}"));
            }
            used.insert(name);
        }
    }
    assert!(
        missing.is_empty(),
        "not exported by the service:\n{}",
        missing.join("\n")
    );
    // the dashboard covers what the issue asks for
    for wanted in [
        "checkpointer_records_consumed_total",
        "checkpointer_consumer_lag_records",
        "checkpointer_watermark_seconds",
        "checkpointer_checkpoint_duration_seconds_bucket",
        "checkpointer_checkpoint_size_bytes",
        "checkpointer_checkpoints_failed_total",
        "checkpointer_restore_duration_seconds",
    ] {
        assert!(used.contains(wanted), "nothing shows {wanted}");
    }
}

#[test]
fn the_metric_check_catches_a_name_that_does_not_exist() {
    let metrics = Metrics::new();
    let found =
        series_names("rate(checkpointer_records_consumd_total[5m]) / up{job=\"checkpointer\"}");
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(!found.iter().all(|n| exported(n, metrics.names())));
}

#[test]
fn every_alert_has_a_runbook_entry() {
    let runbook = read("docs/operations.md");
    for (alert, _) in alerts() {
        assert!(
            runbook.contains(&format!("### {alert}\n")),
            "docs/operations.md has no \"### {alert}\" section"
        );
    }
}

/// `ENV` settings of the runtime stage.
fn dockerfile_env(dockerfile: &str) -> Vec<(String, String)> {
    let joined = dockerfile.replace("\\\n", " ");
    let mut out = Vec::new();
    for line in joined.lines().filter(|l| l.starts_with("ENV ")) {
        for pair in line["ENV ".len()..].split_whitespace() {
            if let Some((k, v)) = pair.split_once('=') {
                out.push((k.to_string(), v.to_string()));
            }
        }
    }
    out
}

fn duration(text: &str) -> Duration {
    humantime::parse_duration(text).unwrap_or_else(|e| panic!("{text}: {e}"))
}

#[test]
fn image_and_compose_settings_pass_the_configuration_check() {
    let dockerfile = read("Dockerfile");
    for needed in [
        "STOPSIGNAL SIGTERM",
        "USER 10001:10001",
        "VOLUME [\"/var/lib/checkpointer\"]",
        "CMD [\"checkpointer\", \"probe\"]",
        "COPY config/ /etc/checkpointer/",
        // before the dependency layer, which builds the allocator with its options
        "COPY .cargo .cargo\nRUN cargo chef cook",
    ] {
        assert!(dockerfile.contains(needed), "Dockerfile lacks {needed}");
    }
    let mut env = dockerfile_env(&dockerfile);
    let get = |env: &[(String, String)], k: &str| {
        env.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{k} not set"))
    };
    // the image selects its baked file and overrides nothing in it: a mounted file wins
    assert_eq!(
        env.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        vec!["CHECKPOINTER_CONFIG"],
        "the image sets configuration keys by environment"
    );
    let baked = get(&env, "CHECKPOINTER_CONFIG");
    let in_repo = baked
        .strip_prefix("/etc/checkpointer/")
        .map(|f| repo(&format!("config/{f}")))
        .expect("config under /etc/checkpointer");
    assert!(in_repo.exists(), "{} is not in config/", in_repo.display());

    let compose = yaml("docker-compose.yml");
    let service = &compose["services"]["checkpointer"];
    for (k, v) in service["environment"].as_hash().expect("environment") {
        let v = match v {
            Yaml::String(s) => s.clone(),
            Yaml::Integer(i) => i.to_string(),
            other => panic!("{k:?}: {other:?}"),
        };
        env.push((k.as_str().expect("key").to_string(), v));
    }
    // the state volume is mounted where the image keeps its store
    let volumes: Vec<&str> = service["volumes"]
        .as_vec()
        .expect("volumes")
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert!(
        volumes.contains(&"checkpointer-state:/var/lib/checkpointer"),
        "{volumes:?}"
    );

    // the admin token: the image's file names the secret compose mounts (at its default
    // place), and compose names the same file to the CLI inside the container
    let token_path = "/run/secrets/checkpointer-admin-token";
    assert!(
        read("config/container.yaml").contains(&format!("admin_token_file: {token_path}")),
        "the image's configuration names no admin token file at {token_path}"
    );
    assert_eq!(get(&env, "CHECKPOINTER_HTTP__ADMIN_TOKEN_FILE"), token_path);
    let secrets: Vec<&str> = service["secrets"]
        .as_vec()
        .expect("secrets")
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert_eq!(secrets, vec!["checkpointer-admin-token"]);
    assert!(
        compose["secrets"]["checkpointer-admin-token"]["file"]
            .as_str()
            .is_some(),
        "the secret's file"
    );
    // check-config reads the token: a file stands in for the secret
    let secret_dir = tempfile::tempdir().expect("tempdir");
    let secret = secret_dir.path().join("checkpointer-admin-token");
    std::fs::write(&secret, "0123456789abcdef0123456789abcdef\n").expect("token");
    let out = Command::new(env!("CARGO_BIN_EXE_checkpointer"))
        .arg("check-config")
        .env("CHECKPOINTER_CONFIG", &in_repo)
        .envs(
            env.iter()
                .filter(|(k, _)| k != "CHECKPOINTER_CONFIG")
                .cloned(),
        )
        .env("CHECKPOINTER_HTTP__ADMIN_TOKEN_FILE", &secret)
        .output()
        .expect("run check-config");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("0123456789abcdef0123456789abcdef"),
        "check-config printed the token"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    let shown: serde_json::Value = serde_json::from_str(&stdout).expect("check-config prints JSON");
    assert_eq!(shown["kafka"]["brokers"], "kafka:9092");
    assert_eq!(shown["log"]["format"], "json");
    let dir = shown["checkpoint"]["dir"].as_str().expect("dir");
    assert!(
        dir.starts_with("/var/lib/checkpointer/"),
        "the store {dir} must be on the volume"
    );
    // the port the image exposes, the health check probes, compose publishes and
    // Prometheus scrapes
    let listen = shown["http"]["listen"].as_str().expect("listen");
    assert_eq!(listen, "0.0.0.0:9180");
    assert!(dockerfile.contains("EXPOSE 9180"));
    let ports: Vec<&str> = service["ports"]
        .as_vec()
        .expect("ports")
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert_eq!(ports, vec!["127.0.0.1:9180:9180"]);
    // nothing of the stack is published beyond this host, and Prometheus offers no lifecycle
    // API (reload, shutdown) to whoever reaches it
    for (name, svc) in compose["services"].as_hash().expect("services") {
        for port in svc["ports"].as_vec().into_iter().flatten() {
            let port = port.as_str().expect("port as text");
            assert!(port.starts_with("127.0.0.1:"), "{name:?} publishes {port}");
        }
    }
    let prometheus = compose["services"]["prometheus"]["command"]
        .as_vec()
        .expect("prometheus command");
    assert!(
        prometheus
            .iter()
            .all(|a| a.as_str() != Some("--web.enable-lifecycle")),
        "{prometheus:?}"
    );
    assert!(read("deploy/prometheus/prometheus.yml").contains("\"checkpointer:9180\""));
    let probe = Command::new(env!("CARGO_BIN_EXE_checkpointer"))
        .args(["probe", "--help"])
        .output()
        .expect("probe --help");
    assert!(
        String::from_utf8_lossy(&probe.stdout).contains("http://127.0.0.1:9180/healthz"),
        "the health check's default URL is the baked listen port"
    );

    // a memory limit, so that the memory guard (80% of it by default) pauses before the kernel
    // kills the container
    assert!(
        service["mem_limit"].as_str().is_some(),
        "the checkpointer service has no mem_limit"
    );
    assert!(
        shown["state"]["max_memory"].is_null(),
        "the guard follows the container's limit unless set"
    );

    // docker stops a container after its grace period: the final checkpoint must fit in it
    let shutdown = duration(
        shown["checkpoint"]["shutdown_timeout"]
            .as_str()
            .expect("timeout"),
    );
    let grace = duration(
        service["stop_grace_period"]
            .as_str()
            .expect("stop_grace_period"),
    );
    assert!(
        grace > shutdown,
        "stop_grace_period {grace:?} <= shutdown_timeout {shutdown:?}"
    );

    // the generator's arguments are ones the binary accepts
    let generator = compose["services"]["generator"]["command"]
        .as_vec()
        .expect("generator command");
    let args: Vec<&str> = generator.iter().filter_map(Yaml::as_str).collect();
    assert_eq!(args.first(), Some(&"generate"));
    let status = Command::new(env!("CARGO_BIN_EXE_checkpointer"))
        .args(&args)
        .arg("--help")
        .output()
        .expect("generate --help");
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
}
