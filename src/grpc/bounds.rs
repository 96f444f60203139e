//! How many calls the gRPC port serves at once and for how long, as a layer inside the
//! Connect translation ([`super::connect`]), so Connect clients get these refusals in their
//! own protocol too. tonic's own limits (`Server::timeout`, `load_shed`) answer outside every
//! layer, in gRPC only, where a Connect client reads them as an unknown error.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::{Request, Response};
use tokio::sync::Semaphore;
use tonic::body::Body;

/// The prefix of `grpc.health.v1.Health`'s methods.
const HEALTH_PATH: &str = "/grpc.health.v1.Health/";

/// Bounds every call: at most `max_calls` at once, health checks apart (past it,
/// RESOURCE_EXHAUSTED at once instead of a queue) and at most `timeout`, or the caller's shorter `grpc-timeout` (past
/// it, CANCELLED, as tonic answers a server-side timeout).
#[derive(Debug, Clone)]
pub struct BoundsLayer {
    permits: Arc<Semaphore>,
    timeout: Duration,
}

impl BoundsLayer {
    /// `max_calls` at once, each for at most `timeout`.
    pub fn new(max_calls: usize, timeout: Duration) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max_calls)),
            timeout,
        }
    }
}

impl<S> tower::Layer<S> for BoundsLayer {
    type Service = Bounds<S>;

    fn layer(&self, inner: S) -> Bounds<S> {
        Bounds {
            inner,
            permits: self.permits.clone(),
            timeout: self.timeout,
        }
    }
}

/// See [`BoundsLayer`].
#[derive(Debug, Clone)]
pub struct Bounds<S> {
    inner: S,
    permits: Arc<Semaphore>,
    timeout: Duration,
}

impl<S, RB> tower::Service<Request<Body>> for Bounds<S>
where
    S: tower::Service<Request<Body>, Response = Response<RB>>,
    S::Future: Send + 'static,
    RB: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    RB::Error: Into<tonic::codegen::StdError>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        // Health checks answer from memory and are never refused: a port busy with slow
        // calls must not make a probe take the process for dead.
        let permit = if request.uri().path().starts_with(HEALTH_PATH) {
            None
        } else {
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                let refused = tonic::Status::resource_exhausted(
                    "too many calls at once (MAX_CONCURRENT_REQUESTS): try again shortly",
                );
                return Box::pin(async move { Ok(refused.into_http()) });
            };
            Some(permit)
        };
        let timeout = request
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(super::grpc_timeout)
            .map_or(self.timeout, |t| t.min(self.timeout));
        let call = self.inner.call(request);
        Box::pin(async move {
            let answer = match tokio::time::timeout(timeout, call).await {
                Ok(answer) => answer.map(|r| r.map(Body::new)),
                Err(_) => Ok(tonic::Status::cancelled("Timeout expired").into_http()),
            };
            drop(permit);
            answer
        })
    }
}
