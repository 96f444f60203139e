//! Why connection setup stopped, and the one place that turns it into a status and a page.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::form::{FormError, Target};
use super::page::message_page;
use super::state::StateError;
use crate::host::HostError;
use crate::zoom::ZoomError;

/// A failed step of connection setup. Nothing is saved when one of these happens, except
/// that a failed save on a remote host may have landed in part (its set before its delete).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The form or query is wrong.
    #[error("{0}")]
    Form(#[from] FormError),
    /// The OAuth `state` was not accepted.
    #[error("{0}")]
    State(#[from] StateError),
    /// Zoom sent the browser back with an error (for example, the user pressed Deny).
    #[error("Zoom did not authorize the connection: {0}")]
    Denied(String),
    /// The default app was chosen, but this server has none.
    #[error(
        "this server has no default OAuth app (its operator has not set ZOOM_CLIENT_ID and ZOOM_CLIENT_SECRET): choose a private app"
    )]
    NoDefaultApp,
    /// `WEBHOOK_ADDRESS` is not set, so there is no redirect URI.
    #[error(
        "this server cannot run OAuth flows: its operator has not set WEBHOOK_ADDRESS, so Zoom would not know where to send you back"
    )]
    NoPublicAddress,
    /// Zoom refused, failed or timed out.
    #[error("{0}")]
    Zoom(#[from] ZoomError),
    /// Zoom refused this server's own default app credentials: the operator must fix them.
    #[error(
        "Zoom refused this server's default app ({0}): its operator must check ZOOM_CLIENT_ID and ZOOM_CLIENT_SECRET"
    )]
    DefaultAppRefused(String),
    /// The request was not sent here by the operator (no valid setup link).
    #[error("{0}")]
    Forbidden(super::links::LinkError),
    /// The form is larger than any real one.
    #[error("the form is larger than {} KiB", super::MAX_FORM_BYTES / 1024)]
    TooLarge,
    /// The host engine failed.
    #[error("{0}")]
    Host(#[from] HostError),
}

impl SetupError {
    fn status(&self) -> StatusCode {
        match self {
            SetupError::Form(_) | SetupError::Denied(_) | SetupError::NoDefaultApp => {
                StatusCode::BAD_REQUEST
            }
            SetupError::State(StateError::Busy) => StatusCode::SERVICE_UNAVAILABLE,
            SetupError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            SetupError::Forbidden(_) => StatusCode::FORBIDDEN,
            SetupError::State(_) => StatusCode::BAD_REQUEST,
            SetupError::NoPublicAddress => StatusCode::SERVICE_UNAVAILABLE,
            SetupError::Zoom(ZoomError::Rejected { status: 429, .. }) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            SetupError::Zoom(ZoomError::Rejected { .. } | ZoomError::InvalidGrant(_)) => {
                StatusCode::BAD_REQUEST
            }
            SetupError::DefaultAppRefused(_) => StatusCode::BAD_GATEWAY,
            SetupError::Zoom(ZoomError::Timeout) => StatusCode::GATEWAY_TIMEOUT,
            SetupError::Zoom(_) => StatusCode::BAD_GATEWAY,
            SetupError::Host(HostError::InvalidArgument(_)) => StatusCode::BAD_REQUEST,
            SetupError::Host(HostError::Unavailable(_)) => StatusCode::SERVICE_UNAVAILABLE,
            SetupError::Host(HostError::NotFound(_)) => StatusCode::NOT_FOUND,
            SetupError::Host(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// What people see: the error itself, except for internal failures, which are logged.
    fn message(&self) -> String {
        match self {
            SetupError::Host(HostError::InvalidArgument(m)) => m.clone(),
            SetupError::Host(HostError::Unavailable(_)) => {
                "the host engine is unavailable, so the setup did not complete: try again later"
                    .into()
            }
            SetupError::Host(HostError::NotFound(_)) => {
                "the host engine does not know this connection (was it deleted?): open the connection page from the host again"
                    .into()
            }
            SetupError::Host(_) => "internal error: the setup did not complete, try again".into(),
            SetupError::Zoom(ZoomError::Rejected { status: 429, .. }) => {
                "Zoom is limiting requests right now, so the setup did not complete: try again in a minute"
                    .into()
            }
            SetupError::Zoom(
                ZoomError::Rejected { reason, .. } | ZoomError::InvalidGrant(reason),
            ) => {
                format!("Zoom refused: {reason}")
            }
            other => other.to_string(),
        }
    }

    /// The error page's title: what happened to the connection, as far as this request knows.
    fn title(&self) -> &'static str {
        match self {
            // A finished flow opened again (the success page reloaded, say): it may well
            // have saved the connection the first time.
            SetupError::State(StateError::Used) => "Zoom sign-in already used or no longer known",
            _ => "Zoom connection not saved",
        }
    }

    /// The error page, with a way back to the connection page when the connection is known.
    pub fn page(self, back: Option<&Target>) -> Response {
        let title = self.title();
        self.page_titled(title, back)
    }

    /// [`Self::page`] under another title (the connection page's own errors: nothing was
    /// submitted, so nothing was "not saved").
    pub fn page_titled(self, title: &str, back: Option<&Target>) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(error = %self, "connection setup failed");
        } else {
            tracing::info!(error = %self, "connection setup refused");
        }
        message_page(status, title, &self.message(), back).into_response()
    }
}

impl IntoResponse for SetupError {
    fn into_response(self) -> Response {
        self.page(None)
    }
}
