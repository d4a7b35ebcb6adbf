//! Admin HTTP server: the operator page at `/`, `/metrics`, `/healthz`, `/readyz`, and the
//! checkpoint and savepoint API (`api`). Handlers read shared state and the store; requests
//! that need the processing loop (savepoint, stop) go to it as `Command`s. Requests that
//! change something pass [`auth`] first.

mod api;
pub mod auth;
pub mod page;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use tokio::sync::{mpsc, oneshot};

use crate::board::StatusBoard;
use crate::metrics::Metrics;
use crate::ratelimit::RateLimit;
use crate::store::{SavepointMeta, Store};

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {addr} (http.listen): {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the admin token from {path} (http.admin_token_file): {source}")]
    TokenFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("unusable admin token in {path} (http.admin_token_file): {reason}")]
    BadToken {
        path: std::path::PathBuf,
        reason: String,
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
    /// Too many requests: ask again after the duration.
    #[error("{0}")]
    TooMany(String, std::time::Duration),
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

/// What the endpoints read: the status board (written by the service), the store, the
/// metrics; requests that need the processing loop go over `commands`.
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub board: Arc<StatusBoard>,
    pub store: Arc<Store>,
    pub commands: mpsc::UnboundedSender<Command>,
    pub restored_from: String,
    /// Required of requests that change something, when set (`http.admin_token_file`).
    pub admin_token: Option<auth::AdminToken>,
    /// At most one log line per period for refused requests (a flood of them is counted).
    pub refused_log: std::sync::Mutex<RateLimit>,
}

/// How often a refused request is logged at most.
pub const REFUSED_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

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
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// Lets a request that changes something through only if [`auth::authorize`] does; refused:
/// 401, counted and logged (without the token), and nothing happens.
async fn guard(State(state): State<Arc<AdminState>>, request: Request, next: Next) -> Response {
    if auth::reads_only(request.method()) {
        return next.run(request).await;
    }
    match auth::authorize(request.headers(), state.admin_token.as_ref()) {
        Ok(()) => next.run(request).await,
        Err(denied) => {
            state
                .metrics
                .admin_refused
                .with_label_values(&[denied.label()])
                .inc();
            let logged = state
                .refused_log
                .lock()
                .map_or(Some(0), |mut limit| limit.check());
            if let Some(suppressed) = logged {
                tracing::warn!(method = %request.method(), path = request.uri().path(), reason = denied.label(), suppressed, "{denied}");
            }
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer realm=\"checkpointer\"")],
                axum::Json(serde_json::json!({ "error": denied.to_string() })),
            )
                .into_response()
        }
    }
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
    let (ready, reason) = state.board.readiness();
    if ready {
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
