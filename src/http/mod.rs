//! The HTTP server: one `router()` per area, merged here.

pub mod health;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::AppState;
use crate::integration::LOGO_PATH;

/// Every HTTP route of the service.
pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(health::router())
        .merge(crate::setup::router())
        .merge(crate::webhook::router())
        .route(LOGO_PATH, get(logo))
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

async fn logo() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "image/svg+xml"),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        include_str!("../../assets/zoom-logo.svg"),
    )
}
