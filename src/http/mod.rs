//! The HTTP server: one `router()` per area, merged here.

pub mod health;

use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::AppState;
use crate::integration::LOGO_PATH;

/// Every HTTP route of the service, with request latency recorded for `/metrics`.
pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(health::router())
        .merge(crate::setup::router())
        .merge(crate::webhook::router())
        .route(LOGO_PATH, get(logo))
        .route("/metrics", get(metrics))
        // Bounds: a request that takes too long is answered 503; past the concurrency limit,
        // new requests are answered 503 at once instead of queueing without end.
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            state.config.request_timeout,
        ))
        .layer(
            tower::ServiceBuilder::new()
                .layer(axum::error_handling::HandleErrorLayer::new(
                    |_: tower::BoxError| async {
                        (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            axum::Json(serde_json::json!({
                                "error": "too many requests at once: try again shortly"
                            })),
                        )
                    },
                ))
                .load_shed()
                // Global: `Router::layer` gives each route its own copy of a layer, and a
                // per-route limit would not bound the server.
                .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
                    state.config.max_concurrent_requests,
                )),
        )
        .layer(axum::middleware::from_fn(limit_headers))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            observe_latency,
        ))
        .layer(
            tower_http::trace::TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_failure(tower_http::trace::DefaultOnFailure::new().level(tracing::Level::WARN)),
        )
        .with_state(state)
}

/// The span of one request: method and path only. Query strings stay out of logs: Zoom's
/// redirect carries a one-time authorization code and the OAuth state in them.
fn request_span(request: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    tracing::debug_span!(
        "request",
        method = %request.method(),
        path = %request.uri().path(),
    )
}

/// The most header bytes (names and values) a request may carry; hyper bounds what it reads
/// (about 400 KiB), this bounds what handlers see.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Refuses requests with more than [`MAX_HEADER_BYTES`] of headers: 431.
async fn limit_headers(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let size: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if size > MAX_HEADER_BYTES {
        return (
            axum::http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            axum::Json(serde_json::json!({
                "error": format!("request headers exceed {MAX_HEADER_BYTES} bytes")
            })),
        )
            .into_response();
    }
    next.run(request).await
}

/// Records each request's latency by method, route (the pattern, not the path) and status.
async fn observe_latency(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let started = Instant::now();
    let response = next.run(request).await;
    state
        .metrics
        .http_requests
        .with_label_values(&[method.as_str(), route.as_str(), response.status().as_str()])
        .observe(started.elapsed().as_secs_f64());
    response
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
