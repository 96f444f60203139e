//! The HTTP server: one `router()` per area, merged here.

pub mod guard;
pub mod health;
pub mod server;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::AppState;
use crate::integration::LOGO_PATH;

/// Probes (`/healthz`, `/readyz`, `/metrics`) answered at once, apart from the other requests.
const PROBE_CONCURRENCY: usize = 16;

/// Every HTTP route of the service, each behind a [`guard`]: bounded, timed, measured. Probes
/// have small guards of their own, so a service busy with `MAX_CONCURRENT_REQUESTS` slow
/// requests still answers its liveness probe (and is not restarted for being busy), and the
/// liveness probe has its own apart from `/readyz` and `/metrics` (which wait for the host
/// engine and the outbox), so a slow host does not make the process look dead.
pub fn router(state: AppState) -> Router {
    let guard = |max_concurrent| {
        guard::GuardLayer::new(
            max_concurrent,
            state.config.request_timeout,
            state.metrics.clone(),
        )
    };
    let liveness = health::liveness().layer(guard(PROBE_CONCURRENCY));
    let probes = Router::new()
        .merge(health::readiness())
        .route("/metrics", get(metrics))
        .layer(guard(PROBE_CONCURRENCY));
    // Zoom's webhooks have a pool of their own: slow setup requests (a form trickling in)
    // cannot make them 503.
    let webhooks = crate::webhook::router(state.webhooks.clone())
        .layer(guard(state.config.max_concurrent_requests));
    Router::new()
        .merge(crate::setup::router())
        .route(LOGO_PATH, get(logo))
        .layer(guard(state.config.max_concurrent_requests))
        .merge(webhooks)
        .merge(probes)
        .merge(liveness)
        .with_state(state)
}

/// `GET /metrics`: Prometheus's text format; the outbox gauges are read now.
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    match state.webhooks.outbox.depth().await {
        Ok((depth, oldest)) => {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            state.metrics.outbox_depth.set(depth as i64);
            state
                .metrics
                .outbox_oldest_age
                .set(oldest.map_or(0.0, |ms| (now_ms - ms).max(0) as f64 / 1000.0));
        }
        Err(e) => tracing::warn!(error = %e, "cannot read the outbox depth for /metrics"),
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

async fn logo() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "image/svg+xml"),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        include_str!("../../assets/zoom-logo.svg"),
    )
}
