//! Commands sent to a running instance over its admin HTTP API. Those that change it carry the
//! admin token when one is given (`--admin-token-file`, or `CHECKPOINTER_HTTP__ADMIN_TOKEN_FILE`
//! as the instance reads it).

use std::time::{Duration, Instant};

use super::OpsError;
use crate::http::auth::AdminToken;

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .build()
        .into()
}

/// Sends a request (with the token, if given) and returns the JSON body of a 2xx answer.
fn call(
    method: &str,
    url: &str,
    timeout: Duration,
    token: Option<&AdminToken>,
) -> Result<String, OpsError> {
    let a = agent(timeout);
    let bearer = token.map(AdminToken::bearer);
    let result = match (method, bearer) {
        ("POST", Some(b)) => a.post(url).header("authorization", &b).send_empty(),
        ("POST", None) => a.post(url).send_empty(),
        ("DELETE", Some(b)) => a.delete(url).header("authorization", &b).call(),
        ("DELETE", None) => a.delete(url).call(),
        _ => a.get(url).call(),
    };
    let mut resp = result.map_err(|e| OpsError::Unreachable {
        url: url.to_string(),
        detail: e.to_string(),
    })?;
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| OpsError::Unreachable {
            url: url.to_string(),
            detail: e.to_string(),
        })?;
    if !(200..300).contains(&status) {
        let message = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
            .unwrap_or(body);
        return Err(OpsError::Refused {
            url: url.to_string(),
            status,
            message,
        });
    }
    Ok(body)
}

fn pretty(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| body.to_string())
}

fn query_name(name: &str) -> String {
    // names are validated to [A-Za-z0-9._-]: nothing to escape, but refuse anything else here
    name.chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .collect()
}

/// `checkpointer savepoint [--name N]`: waits until the savepoint is durable.
pub fn trigger_savepoint(
    base: &str,
    name: Option<&str>,
    timeout: Duration,
    token: Option<&AdminToken>,
) -> Result<String, OpsError> {
    let url = match name {
        Some(n) => format!("{base}/api/savepoints?name={}", query_name(n)),
        None => format!("{base}/api/savepoints"),
    };
    call("POST", &url, timeout, token).map(|b| pretty(&b))
}

pub fn list_savepoints(base: &str) -> Result<String, OpsError> {
    call(
        "GET",
        &format!("{base}/api/savepoints"),
        Duration::from_secs(10),
        None,
    )
    .map(|b| pretty(&b))
}

pub fn delete_savepoint(
    base: &str,
    name: &str,
    token: Option<&AdminToken>,
) -> Result<String, OpsError> {
    call(
        "DELETE",
        &format!("{base}/api/savepoints/{}", query_name(name)),
        Duration::from_secs(10),
        token,
    )
    .map(|_| format!("deleted savepoint {name}"))
}

/// `checkpointer stop [--savepoint [NAME]]`: asks for a graceful stop and waits until the
/// service no longer answers.
pub fn stop(
    base: &str,
    savepoint: Option<Option<&str>>,
    wait: Duration,
    token: Option<&AdminToken>,
) -> Result<String, OpsError> {
    let url = match savepoint {
        None => format!("{base}/api/stop"),
        Some(None) => format!("{base}/api/stop?savepoint"),
        Some(Some(n)) => format!("{base}/api/stop?savepoint={}", query_name(n)),
    };
    let body = call("POST", &url, wait, token)?;
    let deadline = Instant::now() + wait;
    let health = format!("{base}/healthz");
    while Instant::now() < deadline {
        if agent(Duration::from_secs(2)).get(&health).call().is_err() {
            return Ok(pretty(&body));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(OpsError::Invalid(format!(
        "the service accepted the stop ({}) but still answers at {base} after {}",
        pretty(&body),
        humantime::format_duration(wait)
    )))
}

/// A container health check: GETs `url` (the instance's `/healthz`, or `/readyz`) and
/// answers with its body when the status is 2xx, else an error naming the status.
pub fn probe(url: &str, timeout: Duration) -> Result<String, OpsError> {
    call("GET", url, timeout, None).map(|body| {
        let body = body.trim();
        if body.is_empty() {
            "ok".to_string()
        } else {
            body.to_string()
        }
    })
}
