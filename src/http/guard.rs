//! The bounds every HTTP request passes, as one tower layer: oversized headers (431), past the
//! concurrency limit (503 at once, never queued), past the request timeout (503), and each
//! request's latency recorded for `/metrics`.
//!
//! One hand-written layer rather than a stack of tower and axum middleware: each of those boxes
//! a future and clones state per request, and on `/zoom/event` the stack cost a third of the
//! whole request (see the README's benchmark notes).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::metrics::Metrics;

/// The most header bytes (names and values) a request may carry; hyper bounds what it reads
/// (about 400 KiB), this bounds what handlers see.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Failed requests (5xx) are logged at most once per [`FAILURE_LOG_EVERY`]: anyone can make
/// webhooks fail while the service is busy, and a line each would flood the logs. The metrics
/// count every one.
static FAILURE_LOG: LogLimiter = LogLimiter::new();

/// How often a failed request is logged at most.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(1);

/// Lets one log line through per [`FAILURE_LOG_EVERY`], counting the ones held back.
struct LogLimiter {
    state: std::sync::Mutex<Option<(Instant, u64)>>,
}

impl LogLimiter {
    const fn new() -> Self {
        Self {
            state: std::sync::Mutex::new(None),
        }
    }

    /// `Some(lines held back since the last one)` when a line may be written at `now`.
    fn admit(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *state {
            Some((last, held)) if now.duration_since(*last) < FAILURE_LOG_EVERY => {
                *held += 1;
                None
            }
            Some((last, held)) => {
                let suppressed = *held;
                (*last, *held) = (now, 0);
                Some(suppressed)
            }
            None => {
                *state = Some((now, 0));
                Some(0)
            }
        }
    }
}

/// What the guard enforces and where it reports.
struct Limits {
    /// Requests being handled at once, across every route.
    permits: Semaphore,
    /// The longest a request may take.
    timeout: Duration,
    metrics: Arc<Metrics>,
}

/// The layer; clones share one concurrency limit (axum gives each route its own copy of a
/// layer, and a per-route limit would not bound the server).
#[derive(Clone)]
pub struct GuardLayer {
    limits: Arc<Limits>,
}

impl GuardLayer {
    /// At most `max_concurrent` requests at once, each answered within `timeout`.
    pub fn new(max_concurrent: usize, timeout: Duration, metrics: Arc<Metrics>) -> Self {
        Self {
            limits: Arc::new(Limits {
                permits: Semaphore::new(max_concurrent.max(1)),
                timeout,
                metrics,
            }),
        }
    }
}

impl<S> tower::Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Guard {
            inner,
            limits: self.limits.clone(),
        }
    }
}

/// The service [`GuardLayer`] wraps around each route.
#[derive(Clone)]
pub struct Guard<S> {
    inner: S,
    limits: Arc<Limits>,
}

impl<S> tower::Service<Request> for Guard<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let started = Instant::now();
        let limits = self.limits.clone();
        // The clone is not ready; the one `poll_ready` readied is the one to call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let route = request.extensions().get::<MatchedPath>().cloned();
        let method = method_label(request.method());
        // Query strings stay out of logs: Zoom's redirect carries a one-time authorization
        // code and the OAuth state in them.
        let span = tracing::debug_span!("request", method, path = %request.uri().path());
        Box::pin(
            async move {
                let response = guarded(&limits, &mut inner, request).await;
                let status = response.status();
                if status.is_server_error()
                    && let Some(suppressed) = FAILURE_LOG.admit(Instant::now())
                {
                    tracing::warn!(status = status.as_u16(), latency = ?started.elapsed(), suppressed, "request failed");
                }
                limits
                    .metrics
                    .http_requests
                    .with_label_values(&[
                        method,
                        route.as_ref().map_or("unmatched", MatchedPath::as_str),
                        status.as_str(),
                    ])
                    .observe(started.elapsed().as_secs_f64());
                Ok(response)
            }
            .instrument(span),
        )
    }
}

async fn guarded<S>(limits: &Limits, inner: &mut S, request: Request) -> Response
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
{
    let header_bytes: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if header_bytes > MAX_HEADER_BYTES {
        return refuse(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            &format!("request headers exceed {MAX_HEADER_BYTES} bytes"),
        );
    }
    let Ok(_permit) = limits.permits.try_acquire() else {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many requests at once: try again shortly",
        );
    };
    match tokio::time::timeout(limits.timeout, inner.call(request)).await {
        Ok(Ok(response)) => response,
        Ok(Err(never)) => match never {},
        Err(_) => refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "the request took too long: try again shortly",
        ),
    }
}

/// The method as a metric label: HTTP allows any token as a method, and every new label
/// value would be a new histogram kept forever.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

fn refuse(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_requests_are_logged_once_a_second_with_the_count_held_back() {
        let limiter = LogLimiter::new();
        let start = Instant::now();
        assert_eq!(limiter.admit(start), Some(0));
        for ms in [1, 10, 500, 999] {
            assert_eq!(limiter.admit(start + Duration::from_millis(ms)), None);
        }
        assert_eq!(limiter.admit(start + Duration::from_millis(1000)), Some(4));
        assert_eq!(limiter.admit(start + Duration::from_millis(1500)), None);
        assert_eq!(limiter.admit(start + Duration::from_millis(2100)), Some(1));
    }
}
