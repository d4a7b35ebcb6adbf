//! Admin HTTP server: the operator page at `/`, `/metrics`, `/healthz`, `/readyz`, and the
//! checkpoint and savepoint API (`api`). Handlers read shared state and the store; requests
//! that need the processing loop (savepoint, stop) go to it as `Command`s.

mod api;
pub mod page;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use tokio::sync::{mpsc, oneshot};

use crate::checkpoint::history::History;
use crate::event_time::EventTime;
use crate::lock::lock;
use crate::metrics::Metrics;
use crate::position::Partition;
use crate::source::Shared;
use crate::store::{SavepointMeta, Store};

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {addr} (http.listen): {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Why the processing loop refused or failed a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Failed(String),
}

pub type Reply<T> = oneshot::Sender<Result<T, CommandError>>;

/// Requests for the processing loop.
pub enum Command {
    /// Take a savepoint now; `None` names it after its checkpoint id.
    Savepoint {
        name: Option<String>,
        reply: Reply<SavepointMeta>,
    },
    /// Stop gracefully, after a savepoint if `savepoint` is set (`Some(None)`: default name).
    Stop {
        savepoint: Option<Option<String>>,
        reply: Reply<Option<SavepointMeta>>,
    },
}

/// Event-time progress, refreshed by the processing loop about every second.
#[derive(Debug, Clone, Default)]
pub struct EventTimeProgress {
    pub watermark: Option<EventTime>,
    pub max_event_time: HashMap<Partition, EventTime>,
}

/// What the endpoints read; written by the service loop.
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub ready: AtomicBool,
    pub ready_reason: Mutex<String>,
    pub history: Mutex<History>,
    pub store: Arc<Store>,
    pub shared: Arc<Shared>,
    pub commands: mpsc::UnboundedSender<Command>,
    pub restored_from: String,
    pub progress: Mutex<EventTimeProgress>,
}

impl AdminState {
    pub fn new(
        metrics: Arc<Metrics>,
        history: History,
        store: Arc<Store>,
        shared: Arc<Shared>,
        commands: mpsc::UnboundedSender<Command>,
        restored_from: String,
    ) -> Self {
        AdminState {
            metrics,
            ready: AtomicBool::new(false),
            ready_reason: Mutex::new("starting".to_string()),
            history: Mutex::new(history),
            store,
            shared,
            commands,
            restored_from,
            progress: Mutex::new(EventTimeProgress::default()),
        }
    }

    pub fn set_ready(&self, ready: bool, reason: &str) {
        self.ready.store(ready, Ordering::SeqCst);
        self.metrics.ready.set(i64::from(ready));
        let mut r = lock(&self.ready_reason);
        if *r != reason {
            *r = reason.to_string();
        }
    }

    pub fn ready_reason(&self) -> String {
        lock(&self.ready_reason).clone()
    }

    pub fn history(&self) -> std::sync::MutexGuard<'_, History> {
        lock(&self.history)
    }

    pub fn set_progress(&self, progress: EventTimeProgress) {
        *lock(&self.progress) = progress;
    }

    pub fn progress(&self) -> EventTimeProgress {
        lock(&self.progress).clone()
    }
}

pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/checkpoints", get(api::checkpoints))
        .route("/api/partitions", get(api::partitions))
        .route("/api/checkpoints/{id}", get(api::checkpoint))
        .route(
            "/api/savepoints",
            get(api::savepoints).post(api::trigger_savepoint),
        )
        .route("/api/savepoints/{name}", delete(api::delete_savepoint))
        .route("/api/stop", post(api::stop))
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
    let reason = state.ready_reason();
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

async fn index(State(state): State<Arc<AdminState>>) -> Response {
    match api::page_view(&state).await {
        Ok(view) => Html(page::render(&view)).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}
