//! The Connect protocol's unary calls with binary protobuf (`application/proto`), which
//! AutoKitteh's own clients (its `ak` CLI, its Go SDK) speak by default, on the gRPC port beside
//! gRPC: each such call is turned into a gRPC call of the same service on the way in, and its
//! answer back into Connect's on the way out, so both protocols reach the same code.
//!
//! A Connect unary request is a plain POST whose body is the message itself; the answer is
//! 200 with the message, or an error status with `{"code", "message"}` in JSON. Streaming,
//! GET requests, JSON messages and compressed bodies are not supported and say so.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Full, Limited};
use tonic::body::Body;

/// The largest Connect request read; larger ones are refused before decoding. Services keep
/// their own, smaller limits ([`super::request_limit`]).
pub const MAX_CONNECT_REQUEST_BYTES: usize = 4 << 20;

/// The content type of Connect's unary calls with binary protobuf.
const CONNECT_PROTO: &str = "application/proto";

/// Wraps the gRPC services so that they answer Connect unary calls too.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConnectLayer;

impl<S> tower::Layer<S> for ConnectLayer {
    type Service = Connect<S>;

    fn layer(&self, inner: S) -> Connect<S> {
        Connect { inner }
    }
}

/// See [`ConnectLayer`].
#[derive(Debug, Clone)]
pub struct Connect<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, RB> tower::Service<Request<Body>> for Connect<S>
where
    S: tower::Service<Request<Body>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<tonic::codegen::StdError>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        if from_a_browser(request.headers()) {
            let refused = "this port serves host engines and tools, not browsers";
            let response = match connect_kind(&request) {
                Some(_) => error(StatusCode::FORBIDDEN, "permission_denied", refused),
                None => tonic::Status::permission_denied(refused).into_http(),
            };
            return Box::pin(async move { Ok(response) });
        }
        let Some(kind) = connect_kind(&request) else {
            let call = self.inner.call(request);
            return Box::pin(async move { Ok(call.await?.map(Body::new)) });
        };
        // The clone is the one polled ready; the ready one stays for the next call.
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        Box::pin(async move {
            if let ConnectKind::Unsupported(why) = kind {
                return Ok(error(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unimplemented",
                    why,
                ));
            }
            let (parts, body) = request.into_parts();
            // A service's own, smaller limit applies before the body is read.
            let limit = super::request_limit(parts.uri.path());
            let message = match Limited::new(body, limit).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    return Ok(error(
                        StatusCode::TOO_MANY_REQUESTS,
                        "resource_exhausted",
                        &format!("the request is larger than {limit} bytes"),
                    ));
                }
                Err(_) => {
                    return Ok(error(
                        StatusCode::BAD_REQUEST,
                        "invalid_argument",
                        "the request body could not be read",
                    ));
                }
            };
            let request = grpc_request(parts, &message);
            let response = inner.call(request).await?;
            Ok(connect_response(response).await)
        })
    }
}

/// Whether a browser sent this request: browsers add `Origin` to every cross-origin request
/// and to every POST, and `Sec-Fetch-*` to everything; gRPC and Connect clients send neither.
/// The port has no authentication of its own and speaks HTTP/1.1 for Connect, so a web page
/// could otherwise reach it: with DNS rebinding (its site's name pointed at this address) even
/// as same-origin, reading what `VarsService` and `Configure` answer.
fn from_a_browser(headers: &HeaderMap) -> bool {
    headers.contains_key(header::ORIGIN)
        || headers
            .keys()
            .any(|name| name.as_str().starts_with("sec-fetch-"))
}

enum ConnectKind {
    Unary,
    Unsupported(&'static str),
}

/// Whether `request` is a Connect call (and one this layer can serve); `None` for gRPC and
/// anything else, which go on unchanged.
fn connect_kind<B>(request: &Request<B>) -> Option<ConnectKind> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let media = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let connect = request.headers().contains_key("connect-protocol-version");
    // A Connect GET call carries its message in the query (`encoding=…&message=…`, with an
    // optional `connect=v1`) and has no content type.
    let connect_get = request.method() == Method::GET
        && request.uri().query().is_some_and(|q| {
            q.split('&').any(|pair| {
                pair == "connect=v1" || pair.starts_with("message=") || pair == "message"
            })
        });
    if connect_get {
        return Some(ConnectKind::Unsupported(
            "Connect calls are served as POST only",
        ));
    }
    match media.as_str() {
        CONNECT_PROTO if request.method() != Method::POST => Some(ConnectKind::Unsupported(
            "Connect calls are served as POST only",
        )),
        CONNECT_PROTO => Some(
            if request
                .headers()
                .get(header::CONTENT_ENCODING)
                .is_some_and(|v| v.as_bytes() != b"identity")
            {
                ConnectKind::Unsupported("compressed Connect requests are not supported")
            } else {
                ConnectKind::Unary
            },
        ),
        "application/json" | "application/connect+proto" | "application/connect+json"
            if connect || media.starts_with("application/connect+") =>
        {
            Some(ConnectKind::Unsupported(
                "only unary Connect calls with binary protobuf (application/proto) are supported",
            ))
        }
        _ => None,
    }
}

/// The gRPC request carrying the Connect request's `message`.
fn grpc_request(mut parts: axum::http::request::Parts, message: &[u8]) -> Request<Body> {
    let mut framed = BytesMut::with_capacity(5 + message.len());
    framed.put_u8(0);
    framed.put_u32(u32::try_from(message.len()).expect("bounded by MAX_CONNECT_REQUEST_BYTES"));
    framed.put_slice(message);
    let headers = &mut parts.headers;
    let timeout = headers
        .get("connect-timeout-ms")
        .and_then(|v| v.to_str().ok())
        .filter(|v| (1..=8).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|v| HeaderValue::from_str(&format!("{v}m")).ok());
    for name in [
        "connect-protocol-version",
        "connect-timeout-ms",
        "grpc-timeout",
        "accept-encoding",
        "content-length",
    ] {
        headers.remove(name);
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
    if let Some(timeout) = timeout {
        headers.insert("grpc-timeout", timeout);
    }
    Request::from_parts(parts, Body::new(Full::new(framed.freeze())))
}

/// The Connect answer to a gRPC `response`: the message, or the error its status says.
async fn connect_response<RB>(response: Response<RB>) -> Response<Body>
where
    RB: http_body::Body<Data = Bytes>,
    RB::Error: Into<tonic::codegen::StdError>,
{
    let (parts, body) = response.into_parts();
    // Errors come as headers only (tonic's trailers-only answers).
    if let Some(status) = grpc_status(&parts.headers) {
        return status_response(&status);
    }
    let collected = match body.collect().await {
        Ok(collected) => collected,
        Err(e) => {
            tracing::warn!(error = %e.into(), "a gRPC answer for a Connect call broke off");
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error",
            );
        }
    };
    let status = collected.trailers().and_then(grpc_status);
    let mut data = collected.to_bytes();
    match status {
        Some(status) if status.code() != tonic::Code::Ok => status_response(&status),
        _ if data.len() < 5 || data[0] != 0 => {
            tracing::warn!("a gRPC answer for a Connect call had no message");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error",
            )
        }
        _ => {
            data.advance(1);
            let len = data.get_u32() as usize;
            let message = data.slice(..len.min(data.len()));
            let mut response = Response::new(Body::new(Full::new(message)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(CONNECT_PROTO),
            );
            response
        }
    }
}

fn grpc_status(headers: &HeaderMap) -> Option<tonic::Status> {
    let code = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse::<i32>()
        .ok()?;
    let message = headers
        .get("grpc-message")
        .map(|v| {
            percent_encoding::percent_decode(v.as_bytes())
                .decode_utf8_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    Some(tonic::Status::new(tonic::Code::from_i32(code), message))
}

fn status_response(status: &tonic::Status) -> Response<Body> {
    let (http, code) = connect_code(status.code());
    error(http, code, status.message())
}

/// Connect's name and HTTP status for a gRPC code.
fn connect_code(code: tonic::Code) -> (StatusCode, &'static str) {
    use tonic::Code::*;
    match code {
        Ok => (StatusCode::OK, "ok"),
        Cancelled => (StatusCode::from_u16(499).expect("valid"), "canceled"),
        Unknown => (StatusCode::INTERNAL_SERVER_ERROR, "unknown"),
        InvalidArgument => (StatusCode::BAD_REQUEST, "invalid_argument"),
        DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded"),
        NotFound => (StatusCode::NOT_FOUND, "not_found"),
        AlreadyExists => (StatusCode::CONFLICT, "already_exists"),
        PermissionDenied => (StatusCode::FORBIDDEN, "permission_denied"),
        ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "resource_exhausted"),
        FailedPrecondition => (StatusCode::BAD_REQUEST, "failed_precondition"),
        Aborted => (StatusCode::CONFLICT, "aborted"),
        OutOfRange => (StatusCode::BAD_REQUEST, "out_of_range"),
        Unimplemented => (StatusCode::NOT_IMPLEMENTED, "unimplemented"),
        Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        DataLoss => (StatusCode::INTERNAL_SERVER_ERROR, "data_loss"),
        Unauthenticated => (StatusCode::UNAUTHORIZED, "unauthenticated"),
    }
}

/// A Connect error: `status` with `{"code", "message"}`.
fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({ "code": code, "message": message }).to_string();
    let mut response = Response::new(Body::new(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_grpc_code_has_connects_name_and_status() {
        for n in 0..=16 {
            let code = tonic::Code::from_i32(n);
            let (http, name) = connect_code(code);
            assert_eq!(http == StatusCode::OK, n == 0, "{code:?}");
            assert!(name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
        }
        assert_eq!(
            connect_code(tonic::Code::NotFound),
            (StatusCode::NOT_FOUND, "not_found")
        );
    }
}
