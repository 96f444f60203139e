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
                .on_failure(tower_http::trace::DefaultOnFailure::new().level(tracing::Level::WARN)),
        )
        .with_state(state)
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
