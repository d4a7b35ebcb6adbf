//! Admin HTTP endpoints: `/metrics`, `/healthz`, `/readyz`, `/api/checkpoints`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;

use crate::checkpoint::history::History;
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {addr} (http.listen): {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What the endpoints read; written by the service loop.
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub ready: AtomicBool,
    pub ready_reason: Mutex<String>,
    pub history: Mutex<History>,
}

impl AdminState {
    pub fn new(metrics: Arc<Metrics>, history: History) -> Self {
        AdminState {
            metrics,
            ready: AtomicBool::new(false),
            ready_reason: Mutex::new("starting".to_string()),
            history: Mutex::new(history),
        }
    }

    pub fn set_ready(&self, ready: bool, reason: &str) {
        self.ready.store(ready, Ordering::SeqCst);
        self.metrics.ready.set(i64::from(ready));
        let mut r = self
            .ready_reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if *r != reason {
            *r = reason.to_string();
        }
    }

    pub fn history(&self) -> std::sync::MutexGuard<'_, History> {
        self.history.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/checkpoints", get(checkpoints))
        .with_state(state)
}

/// Binds `addr` and serves until the process ends.
pub async fn serve(addr: SocketAddr, state: Arc<AdminState>) -> Result<SocketAddr, HttpError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })?;
    let local = listener.local_addr().unwrap_or(addr);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(state)).await {
            tracing::error!(error = %e, "http server stopped");
        }
    });
    Ok(local)
}

async fn metrics(State(state): State<Arc<AdminState>>) -> Response {
    let (ctype, body) = state.metrics.render();
    ([(header::CONTENT_TYPE, ctype)], body).into_response()
}

async fn readyz(State(state): State<Arc<AdminState>>) -> Response {
    let reason = state
        .ready_reason
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    if state.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, format!("ready: {reason}\n")).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        )
            .into_response()
    }
}

#[derive(Deserialize)]
struct Page {
    limit: Option<usize>,
}

async fn checkpoints(State(state): State<Arc<AdminState>>, Query(page): Query<Page>) -> Response {
    let limit = page.limit.unwrap_or(20).min(1000);
    let recent = state.history().recent(limit);
    Json(serde_json::json!({ "checkpoints": recent })).into_response()
}
