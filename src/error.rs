//! The error callers of the HTTP and gRPC APIs see, and the one place where it becomes an
//! HTTP status or a gRPC status. Internal errors are logged here and reach callers only as
//! "internal error".

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::host::HostError;

/// An API-level failure.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed; the message says how.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request names something that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A dependency (the host engine) is down; retrying later may work.
    #[error("{0}")]
    Unavailable(String),
    /// Stored data is corrupt (a secret that no longer decrypts); the message says what, and
    /// how to recover. Retrying does not help.
    #[error("{0}")]
    DataLoss(String),
    /// A bug or a broken dependency; details are logged, not returned.
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl From<HostError> for ApiError {
    fn from(err: HostError) -> Self {
        match err {
            HostError::InvalidArgument(m) => ApiError::InvalidArgument(m),
            HostError::NotFound(m) => ApiError::NotFound(m),
            HostError::Unavailable(m) => {
                tracing::warn!(error = %m, "host engine unavailable");
                ApiError::Unavailable("host engine unavailable, try again later".into())
            }
            HostError::Undecryptable { .. } => {
                tracing::error!(error = %err, "stored data is corrupt");
                ApiError::DataLoss(err.with_way_out())
            }
            other => ApiError::Internal(Box::new(other)),
        }
    }
}

impl From<crate::ids::IdError> for ApiError {
    fn from(err: crate::ids::IdError) -> Self {
        ApiError::InvalidArgument(err.to_string())
    }
}

impl ApiError {
    fn log_if_internal(&self) {
        if let ApiError::Internal(source) = self {
            tracing::error!(error = %source, "internal error");
        }
    }
}

impl From<ApiError> for tonic::Status {
    fn from(err: ApiError) -> Self {
        err.log_if_internal();
        let message = err.to_string();
        match err {
            ApiError::InvalidArgument(_) => tonic::Status::invalid_argument(message),
            ApiError::NotFound(_) => tonic::Status::not_found(message),
            ApiError::Unavailable(_) => tonic::Status::unavailable(message),
            ApiError::DataLoss(_) => tonic::Status::data_loss(message),
            ApiError::Internal(_) => tonic::Status::internal(message),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.log_if_internal();
        let status = match &self {
            ApiError::InvalidArgument(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::DataLoss(_) | ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (
            status,
            axum::Json(serde_json::json!({ "error": self.to_string() })),
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_details_stay_inside() {
        let err = ApiError::from(HostError::Internal("disk sector 7 failed".into()));
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), tonic::Code::Internal);
        assert_eq!(status.message(), "internal error");
    }

    #[test]
    fn host_errors_map_to_their_codes() {
        let s = tonic::Status::from(ApiError::from(HostError::NotFound("no such".into())));
        assert_eq!(s.code(), tonic::Code::NotFound);
        let s = tonic::Status::from(ApiError::from(HostError::Unavailable("refused".into())));
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(!s.message().contains("refused"));
        let r = ApiError::InvalidArgument("bad".into()).into_response();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    }
}
