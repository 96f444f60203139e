//! Zoom, as this service talks to it: the OAuth server ([`oauth::ZoomOAuth`]) and the REST API
//! ([`api::ZoomApi`]), both over the one HTTP client of the process ([`http_client`]).

pub mod api;
pub mod oauth;

use std::time::Duration;

use reqwest::StatusCode;

use crate::config::Config;

/// The largest response body read from Zoom's OAuth server.
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// The largest response body read from Zoom's REST API: a page of 300 meetings with their
/// recording files can pass 1 MiB. What the answer may become as a value is bounded apart (by
/// the number of values, see `webhook::normalize`); this bounds the bytes each call in flight
/// holds.
pub const MAX_API_RESPONSE_BYTES: usize = 4 << 20;

/// Makes ring the process's TLS crypto provider. reqwest is built without one (ring builds
/// faster than aws-lc-rs), so this must run before any HTTP client is built; calling it again
/// is harmless.
pub fn init_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The process's one HTTP client for Zoom: TLS with the system's roots, redirects never
/// followed (a token endpoint that redirects is not one we trust), bounded time per request.
pub fn http_client(config: &Config) -> anyhow::Result<reqwest::Client> {
    init_tls();
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(config.zoom_http_timeout.min(Duration::from_secs(5)))
        .timeout(config.zoom_http_timeout)
        .pool_idle_timeout(Duration::from_secs(60))
        .user_agent(concat!("zoom-integration/", env!("CARGO_PKG_VERSION")))
        .build()?;
    Ok(client)
}

/// What went wrong talking to Zoom. Messages never contain tokens, secrets or URLs.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ZoomError {
    /// Zoom refused the request (4xx); `reason` is Zoom's own explanation.
    #[error("Zoom refused the request ({status}): {reason}")]
    Rejected {
        /// The HTTP status Zoom answered.
        status: u16,
        /// Zoom's `reason`, `message` or `error`, as sent.
        reason: String,
    },
    /// Zoom no longer accepts the grant (a used, revoked or expired refresh token, or an
    /// authorization code): only setting the connection up again helps.
    #[error("Zoom no longer accepts the connection's grant: {0}")]
    InvalidGrant(String),
    /// Zoom did not answer in time.
    #[error("Zoom did not answer in time")]
    Timeout,
    /// Zoom could not be reached, or answered with a server error (5xx).
    #[error("Zoom is unavailable: {0}")]
    Unavailable(String),
    /// Zoom answered something this service cannot understand.
    #[error("unexpected answer from Zoom: {0}")]
    Protocol(String),
}

impl ZoomError {
    /// Classifies a transport failure of reqwest, without its URL.
    pub fn from_transport(err: reqwest::Error) -> Self {
        if err.is_timeout() {
            ZoomError::Timeout
        } else if err.is_connect() {
            ZoomError::Unavailable("cannot connect".into())
        } else {
            ZoomError::Unavailable(err.without_url().to_string())
        }
    }
}

/// A response from Zoom read into memory (at most [`MAX_RESPONSE_BYTES`], or
/// [`MAX_API_RESPONSE_BYTES`] from the REST API). `Debug` shows the body's length only: the
/// token endpoint's carries tokens.
pub struct RawResponse {
    /// Its status.
    pub status: StatusCode,
    /// Its headers.
    pub headers: reqwest::header::HeaderMap,
    /// Its body.
    pub body: Vec<u8>,
}

impl std::fmt::Debug for RawResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawResponse")
            .field("status", &self.status)
            .field("body_bytes", &self.body.len())
            .finish_non_exhaustive()
    }
}

/// Sends `request`, reads the whole answer (bounded), and turns 5xx answers into
/// [`ZoomError::Unavailable`].
pub async fn send(
    http: &reqwest::Client,
    request: reqwest::Request,
) -> Result<RawResponse, ZoomError> {
    read(http, request, false, MAX_RESPONSE_BYTES, "").await
}

/// Sends a REST API `request` and reads the whole answer (up to [`MAX_API_RESPONSE_BYTES`]),
/// whatever its status: a workflow's call passes Zoom's own 5xx status, code and message on.
pub async fn send_any(
    http: &reqwest::Client,
    request: reqwest::Request,
) -> Result<RawResponse, ZoomError> {
    read(
        http,
        request,
        true,
        MAX_API_RESPONSE_BYTES,
        " (ask for smaller pages: page_size)",
    )
    .await
}

async fn read(
    http: &reqwest::Client,
    request: reqwest::Request,
    server_errors_too: bool,
    limit: usize,
    hint: &str,
) -> Result<RawResponse, ZoomError> {
    let too_large = || {
        ZoomError::Protocol(format!(
            "the response is larger than {} MiB{hint}",
            limit >> 20
        ))
    };
    let mut response = http
        .execute(request)
        .await
        .map_err(ZoomError::from_transport)?;
    let status = response.status();
    if status.is_server_error() && !server_errors_too {
        return Err(ZoomError::Unavailable(format!("Zoom answered {status}")));
    }
    if response
        .content_length()
        .is_some_and(|len| len > limit as u64)
    {
        return Err(too_large());
    }
    let headers = std::mem::take(response.headers_mut());
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(ZoomError::from_transport)? {
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(RawResponse {
        status,
        headers,
        body,
    })
}

/// Sends `request` and reads a successful answer as JSON; a refusal (4xx) becomes
/// [`ZoomError::Rejected`] with Zoom's reason. `what` names the answer in errors.
pub async fn fetch_json<T: serde::de::DeserializeOwned>(
    http: &reqwest::Client,
    request: reqwest::RequestBuilder,
    what: &str,
) -> Result<T, ZoomError> {
    let request = request
        .header(reqwest::header::ACCEPT, "application/json")
        .build()
        .map_err(|e| ZoomError::Protocol(e.without_url().to_string()))?;
    let response = send(http, request).await?;
    if !response.status.is_success() {
        return Err(ZoomError::Rejected {
            status: response.status.as_u16(),
            reason: error_reason(response.status, &response.body),
        });
    }
    serde_json::from_slice(&response.body)
        .map_err(|_| ZoomError::Protocol(format!("{what} cannot be read")))
}

/// Zoom's explanation in an error body: `reason` (OAuth), `message` (API) or `error`,
/// shortened; the HTTP status when the body says nothing.
pub fn error_reason(status: StatusCode, body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Body {
        reason: Option<String>,
        message: Option<String>,
        error_description: Option<String>,
        error: Option<String>,
    }
    let reason = serde_json::from_slice::<Body>(body)
        .ok()
        .and_then(|b| b.reason.or(b.message).or(b.error_description).or(b.error))
        .filter(|r| !r.trim().is_empty());
    match reason {
        Some(r) => crate::ids::truncate(&r, 200),
        None => format!("HTTP {status}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raw_responses_debug_output_leaves_out_its_body() {
        let response = RawResponse {
            status: StatusCode::OK,
            headers: reqwest::header::HeaderMap::new(),
            body: br#"{"access_token":"TOKEN-VALUE"}"#.to_vec(),
        };
        let printed = format!("{response:?}");
        assert!(!printed.contains("TOKEN-VALUE"), "{printed}");
        assert!(printed.contains("200"), "{printed}");
    }
}
