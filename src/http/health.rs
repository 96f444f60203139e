//! Liveness and readiness.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::AppState;

/// How long readiness waits for the host engine.
const READY_TIMEOUT: Duration = Duration::from_secs(3);

/// `/healthz`.
pub fn liveness() -> Router<AppState> {
    Router::new().route("/healthz", get(healthz))
}

/// `/readyz`.
pub fn readiness() -> Router<AppState> {
    Router::new().route("/readyz", get(readyz))
}

/// Alive: the process answers.
async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready: webhook routing is loaded (webhooks get 503 until then) and the host engine
/// (embedded database or remote host) answers.
async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let host = state.host.kind();
    if state.webhooks.routing.snapshot().is_none() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(
                json!({ "status": "not ready", "host": host, "error": "webhook routing not loaded yet" }),
            ),
        );
    }
    match tokio::time::timeout(READY_TIMEOUT, state.host.check()).await {
        Ok(Ok(())) => (
            StatusCode::OK,
            Json(json!({ "status": "ready", "host": host })),
        ),
        Ok(Err(err)) => {
            tracing::warn!(error = %err, host, "not ready");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(
                    json!({ "status": "not ready", "host": host, "error": "host engine unavailable" }),
                ),
            )
        }
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not ready", "host": host, "error": "host engine timed out" })),
        ),
    }
}
