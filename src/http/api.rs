//! `/api/checkpoints`, `/api/savepoints`, `/api/stop`, and the data behind the page. Errors are
//! `{"error": "..."}` with a status that says whose problem it is.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use tokio::sync::oneshot;

use super::page::{PageView, PartitionView, SavepointView};
use super::{AdminState, Command, CommandError};
use crate::checkpoint::history::merge_page;
use crate::checkpoint_id::CheckpointId;
use crate::clock::epoch_ms;
use crate::store::{Store, StoreError};

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (
        status,
        Json(serde_json::json!({ "error": message.to_string() })),
    )
        .into_response()
}

fn store_error(e: StoreError) -> Response {
    let status = match e {
        StoreError::NoSuchCheckpoint { .. } | StoreError::NoSuchSavepoint { .. } => {
            StatusCode::NOT_FOUND
        }
        StoreError::SavepointExists { .. } => StatusCode::CONFLICT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e)
}

fn command_error(e: CommandError) -> Response {
    let status = match e {
        CommandError::BadRequest(_) => StatusCode::BAD_REQUEST,
        CommandError::Conflict(_) => StatusCode::CONFLICT,
        CommandError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        CommandError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
        CommandError::TooMany(_, after) => {
            // whole seconds, rounded up
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            let mut response = error(StatusCode::TOO_MANY_REQUESTS, &e);
            if let Ok(value) = secs.max(1).to_string().parse() {
                response
                    .headers_mut()
                    .insert(axum::http::header::RETRY_AFTER, value);
            }
            return response;
        }
    };
    error(status, e)
}

/// Runs a store read off the async threads.
async fn read<T: Send + 'static>(
    state: &AdminState,
    f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Response> {
    let store = state.store.clone();
    match tokio::task::spawn_blocking(move || f(&store)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(store_error(e)),
        Err(e) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, e)),
    }
}

#[derive(Deserialize)]
pub(super) struct PageQuery {
    limit: Option<usize>,
    before: Option<CheckpointId>,
}

/// Attempts newest first; `before` pages back (the `next_before` of the previous page).
pub(super) async fn checkpoints(
    State(state): State<Arc<AdminState>>,
    Query(q): Query<PageQuery>,
) -> Response {
    let limit = q.limit.unwrap_or(20).clamp(1, 1000);
    let before = q.before;
    let persisted = match read(&state, move |s| s.history(before, limit)).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let live = state.board.history().recent(1000);
    let items = merge_page(persisted, live, before, limit);
    let next_before = (items.len() == limit)
        .then(|| items.last().map(|r| r.id))
        .flatten();
    Json(serde_json::json!({ "checkpoints": items, "next_before": next_before })).into_response()
}

pub(super) async fn checkpoint(
    State(state): State<Arc<AdminState>>,
    Path(id): Path<CheckpointId>,
) -> Response {
    let live = state
        .board
        .history()
        .recent(1000)
        .into_iter()
        .find(|r| r.id == id);
    let found = read(&state, move |s| {
        let retained = match s.checkpoint(id) {
            Ok(r) => Some(r),
            Err(StoreError::NoSuchCheckpoint { .. }) => None,
            Err(e) => return Err(e),
        };
        Ok((s.attempt(id)?, retained))
    })
    .await;
    let (persisted, retained) = match found {
        Ok(v) => v,
        Err(r) => return r,
    };
    let Some(record) = live.or(persisted) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("no checkpoint {id} in the history"),
        );
    };
    Json(serde_json::json!({
        "checkpoint": record,
        "retained": retained.is_some(),
        "entries": retained.map(|r| r.live_entries),
    }))
    .into_response()
}

pub(super) async fn savepoints(State(state): State<Arc<AdminState>>) -> Response {
    match read(&state, |s| s.savepoints()).await {
        Ok(list) => Json(serde_json::json!({ "savepoints": list })).into_response(),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
pub(super) struct NameQuery {
    name: Option<String>,
}

/// Takes a savepoint and answers once it is durable.
pub(super) async fn trigger_savepoint(
    State(state): State<Arc<AdminState>>,
    Query(q): Query<NameQuery>,
) -> Response {
    let (reply, rx) = oneshot::channel();
    let name = q.name.filter(|n| !n.is_empty());
    if state
        .commands
        .send(Command::Savepoint { name, reply })
        .is_err()
    {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the service is stopping");
    }
    match rx.await {
        Ok(Ok(meta)) => (StatusCode::CREATED, Json(meta)).into_response(),
        Ok(Err(e)) => command_error(e),
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the service stopped before the savepoint completed",
        ),
    }
}

pub(super) async fn delete_savepoint(
    State(state): State<Arc<AdminState>>,
    Path(name): Path<String>,
) -> Response {
    match read(&state, move |s| s.delete_savepoint(&name)).await {
        Ok(meta) => Json(serde_json::json!({ "deleted": meta.name })).into_response(),
        Err(r) => r,
    }
}

/// Graceful stop, after a savepoint with `?savepoint[=NAME]`. Answers 202 once the stop has
/// begun (and the savepoint, if asked for, is durable).
pub(super) async fn stop(
    State(state): State<Arc<AdminState>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let savepoint = q
        .get("savepoint")
        .map(|n| Some(n.clone()).filter(|n| !n.is_empty()));
    let (reply, rx) = oneshot::channel();
    if state
        .commands
        .send(Command::Stop { savepoint, reply })
        .is_err()
    {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the service is stopping");
    }
    match rx.await {
        Ok(Ok(meta)) => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({ "stopping": true, "savepoint": meta })),
        )
            .into_response(),
        Ok(Err(e)) => command_error(e),
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "the service is stopping"),
    }
}

/// `GET /api/partitions`: the partitions this instance holds now, with their next offset, lag
/// and highest event time.
pub(super) async fn partitions(State(state): State<Arc<AdminState>>) -> Json<Vec<PartitionView>> {
    Json(partition_views(&state))
}

fn partition_views(state: &AdminState) -> Vec<PartitionView> {
    let progress = state.board.progress();
    state
        .board
        .partitions()
        .into_iter()
        .map(|held| PartitionView {
            max_event_time: progress.max_event_time.get(&held.partition).copied(),
            topic: held.partition.topic,
            partition: held.partition.partition,
            next_offset: held.next.map(|n| n.0),
            lag: held.lag,
        })
        .collect()
}

pub(super) async fn page_view(state: &AdminState) -> Result<PageView, StoreError> {
    let store = state.store.clone();
    let read = tokio::task::spawn_blocking(move || {
        Ok::<_, StoreError>((
            store.history(None, 200)?,
            store.savepoints()?,
            store.checkpoint_ids()?.len(),
        ))
    })
    .await
    .map_err(|e| StoreError::Corrupt {
        path: state.store.path().to_path_buf(),
        detail: format!("store read task ended abnormally: {e}"),
    })?;
    let (persisted, savepoints, retained) = read?;
    let progress = state.board.progress();
    let partitions = partition_views(state);
    let (ready, ready_reason) = state.board.readiness();
    Ok(PageView {
        attempts: merge_page(persisted, state.board.history().recent(200), None, 200),
        partitions,
        watermark: progress.watermark,
        ready,
        ready_reason,
        savepoints: savepoints
            .into_iter()
            .map(|s| SavepointView {
                name: s.name,
                checkpoint_id: s.checkpoint_id,
                created_ms: s.created_ms,
                entries: s.entries,
            })
            .collect(),
        restored_from: state.restored_from.clone(),
        retained,
        now_ms: epoch_ms(),
    })
}
