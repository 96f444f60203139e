//! The HTTP accept loop: hyper with a timer, so a client cannot hold connections open for free.
//!
//! `axum::serve` gives hyper no timer, which switches off hyper's header read timeout: a
//! connection that sends half a request line, or sits idle between requests, would stay open
//! forever, and enough of them exhaust the process's file descriptors. Here every connection
//! must deliver a request's headers within [`header_read_timeout`] (timed from when hyper
//! starts waiting for them: the connection's start, or right after the previous response, so
//! idle keep-alive connections are included), and at most [`MAX_CONNECTIONS`] are open at once
//! (more wait in the kernel's backlog). It speaks HTTP/1.1 only: telling HTTP/1 from HTTP/2
//! waits for bytes with no time limit, and an idle HTTP/2 connection that answers pings is
//! never closed, so either would let idle sockets hold every connection. Zoom, browsers and
//! probes speak HTTP/1.1 here (behind TLS, the proxy does).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Connections open at once.
pub const MAX_CONNECTIONS: usize = 4096;

/// The most a connection buffers while reading: request headers past it are refused (431)
/// without being read further. Twice the guard's header limit, so the guard answers those
/// between the two with its own message.
pub const MAX_READ_BUFFER: usize = 2 * crate::http::guard::MAX_HEADER_BYTES;

/// How long a connection may take to send a request's headers, or sit idle between
/// requests: `REQUEST_TIMEOUT`, at most 10 s (Zoom and browsers send headers at once).
pub fn header_read_timeout(request_timeout: Duration) -> Duration {
    request_timeout.min(Duration::from_secs(10))
}

/// Serves `router` on `listener` until `stop`, then stops accepting and waits for the open
/// connections to finish their requests (the caller bounds that wait).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    request_timeout: Duration,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout(request_timeout))
        // hyper's default buffer holds ~400 KiB of headers before anything checks them (the
        // guard's limit applies once they are read): 4,096 connections could hold 1.6 GiB.
        // Headers past this are answered 431 at once, and the connection closed.
        .max_buf_size(MAX_READ_BUFFER);
    let graceful = GracefulShutdown::new();
    let open = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            permit = open.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = stop.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Per-connection errors (reset before accept) and resource errors
                    // (EMFILE) alike: the listener itself is fine; pause a little on the latter.
                    if !is_connection_error(&e) {
                        tracing::warn!(error = %e, "accepting an HTTP connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let service =
            TowerToHyperService::new(tower::service_fn(move |request: axum::http::Request<_>| {
                let mut request = request.map(axum::body::Body::new);
                request
                    .extensions_mut()
                    .insert(ConnectInfo::<SocketAddr>(peer));
                router.clone().oneshot(request)
            }));
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Raises this process's soft limit of open files to its hard limit (containers often start
/// with 1,024), so [`MAX_CONNECTIONS`] connections and the databases fit; logs what it got.
pub fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on a struct owned here.
    let raised = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        let wanted = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        limit.rlim_cur < limit.rlim_max && libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0
    };
    let open_files = if raised {
        limit.rlim_max
    } else {
        limit.rlim_cur
    };
    if open_files < (MAX_CONNECTIONS as libc::rlim_t) + 256 {
        tracing::warn!(
            open_files,
            "the open files limit is low: past it, new connections wait until others close"
        );
    }
}

/// Whether an accept failed for that one connection (reset before it was accepted), not for
/// a lack of resources.
pub(crate) fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        e.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    )
}
