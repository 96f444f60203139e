//! The gRPC server: one struct per service, assembled here.

pub mod bounds;
pub mod connect;
pub mod events;
pub mod integrations;
pub mod setup_links;
pub mod vars;

use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::AppState;
use crate::proto::autokitteh::events::v1::events_service_server::EventsServiceServer;
use crate::proto::autokitteh::integrations::v1::integrations_service_server::IntegrationsServiceServer;
use crate::proto::autokitteh::vars::v1::vars_service_server::VarsServiceServer;
use crate::proto::zoomintegration::v1::setup_links_service_server::SetupLinksServiceServer;

/// The largest header list a gRPC request may carry.
const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// The largest request `IntegrationsService` reads (tonic's default is 4 MiB). Each value of
/// a `Call`'s arguments takes about 600 bytes decoded, from as little as 2 bytes on the wire,
/// so 4 MiB of empty list items would decode to over a gigabyte before any check; a Zoom API
/// call's arguments are a few KiB.
pub const MAX_CALL_REQUEST_BYTES: usize = 256 * 1024;

/// The largest request `EventsService` reads: a saved event's data is values, which grow as a
/// `Call`'s arguments do (see [`MAX_CALL_REQUEST_BYTES`]).
pub const MAX_EVENTS_REQUEST_BYTES: usize = 256 * 1024;

/// The largest request a service reads, by the request's path (`/package.Service/Method`): the
/// values services' own limits, else tonic's default.
pub fn request_limit(path: &str) -> usize {
    if path.starts_with("/autokitteh.integrations.v1.IntegrationsService/") {
        MAX_CALL_REQUEST_BYTES
    } else if path.starts_with("/autokitteh.events.v1.EventsService/") {
        MAX_EVENTS_REQUEST_BYTES
    } else {
        connect::MAX_CONNECT_REQUEST_BYTES
    }
}

/// Serves gRPC on `listener` until `shutdown` is cancelled, then lets in-flight calls finish.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let (mut reporter, health) = tonic_health::server::health_reporter();
    // Every service reported serving, so each is reported not serving on shutdown.
    let mut served = vec![
        <IntegrationsServiceServer<integrations::IntegrationsApi> as NamedService>::NAME,
        <SetupLinksServiceServer<setup_links::SetupLinksApi> as NamedService>::NAME,
    ];

    let integrations = integrations::IntegrationsApi::new(&state);
    let mut router =
        Server::builder()
            // HTTP/1.1 too: Connect clients (AutoKitteh's `ak` CLI and Go SDK) use it.
            .accept_http1(true)
            .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
            // A peer that stops answering pings is closed, as on the HTTP port's clients.
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            // Outermost, so Connect clients get every answer below in their protocol.
            .layer(connect::ConnectLayer)
            // Callers' mistakes (INVALID_ARGUMENT, NOT_FOUND) are not our failures: log every
            // outcome at debug; internal errors are logged where they are mapped (error.rs).
            .layer(tower_http::trace::TraceLayer::new_for_grpc().on_failure(
                tower_http::trace::DefaultOnFailure::new().level(tracing::Level::DEBUG),
            ))
            .layer(tower::layer::layer_fn({
                let metrics = state.metrics.clone();
                move |inner| ObserveLatency {
                    inner,
                    metrics: metrics.clone(),
                }
            }))
            // Past the limit a call is answered RESOURCE_EXHAUSTED at once instead of queueing
            // behind the slow ones; inside the latency layer, so refusals and timeouts count.
            .layer(bounds::BoundsLayer::new(
                state.config.max_concurrent_requests,
                state.config.request_timeout,
            ))
            .add_service(health)
            .add_service(
                IntegrationsServiceServer::new(integrations)
                    .max_decoding_message_size(MAX_CALL_REQUEST_BYTES),
            )
            .add_service(SetupLinksServiceServer::new(
                setup_links::SetupLinksApi::new(&state),
            ));
    if let Some(embedded) = &state.embedded {
        served.push(<VarsServiceServer<vars::VarsApi> as NamedService>::NAME);
        served.push(<EventsServiceServer<events::EventsApi> as NamedService>::NAME);
        router = router
            .add_service(VarsServiceServer::new(vars::VarsApi::new(
                embedded.clone(),
                state.webhooks.routing.clone(),
            )))
            .add_service(
                EventsServiceServer::new(events::EventsApi::new(embedded.clone()))
                    .max_decoding_message_size(MAX_EVENTS_REQUEST_BYTES),
            );
    }

    for service in &served {
        reporter
            .set_service_status(*service, tonic_health::ServingStatus::Serving)
            .await;
    }
    let stopping = shutdown.clone();
    tokio::spawn(async move {
        stopping.cancelled().await;
        let services: Vec<&str> = served.into_iter().chain([""]).collect();
        for service in &services {
            reporter
                .set_service_status(*service, tonic_health::ServingStatus::NotServing)
                .await;
        }
        // Then `Health.Watch` streams end, once they have sent that (a stream delivers the
        // last status before it sees its channel closed): an open one would otherwise hold
        // the shutdown until SHUTDOWN_TIMEOUT. `Check` says NOT_FOUND from then on.
        for service in services {
            reporter.clear_service_status(service).await;
        }
    });
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(TCP_KEEPALIVE));
    router
        .serve_with_incoming_shutdown(PauseOnErrors::new(incoming), shutdown.cancelled_owned())
        .await
}

/// How long a gRPC connection may be silent before the kernel probes its peer: a host engine
/// that vanished without closing does not hold its socket forever.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// Accepted connections, with a pause of [`ACCEPT_ERROR_PAUSE`] after an accept fails for a
/// lack of resources (EMFILE): tonic's accept loop retries at once, and the connection still
/// waiting in the backlog makes every retry fail the same way, spinning a core.
struct PauseOnErrors {
    incoming: TcpIncoming,
    pause: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

/// How long the gRPC accept loop rests after an accept failed for a lack of resources.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

impl PauseOnErrors {
    fn new(incoming: TcpIncoming) -> Self {
        Self {
            incoming,
            pause: None,
        }
    }
}

impl tokio_stream::Stream for PauseOnErrors {
    type Item = std::io::Result<tokio::net::TcpStream>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        if let Some(pause) = self.pause.as_mut() {
            if pause.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.pause = None;
        }
        let next = std::pin::Pin::new(&mut self.incoming).poll_next(cx);
        if let Poll::Ready(Some(Err(e))) = &next
            && !crate::http::server::is_connection_error(e)
        {
            tracing::warn!(error = %e, "accepting a gRPC connection failed");
            self.pause = Some(Box::pin(tokio::time::sleep(ACCEPT_ERROR_PAUSE)));
        }
        next
    }
}

/// Records each gRPC call's latency by method and status code (`Ok` unless the call failed
/// before its body: tonic sends errors as headers-only responses).
#[derive(Clone)]
struct ObserveLatency<S> {
    inner: S,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
}

impl<S, B, RB> tower::Service<axum::http::Request<B>> for ObserveLatency<S>
where
    S: tower::Service<axum::http::Request<B>, Response = axum::http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: axum::http::Request<B>) -> Self::Future {
        let method = request.uri().path().to_string();
        let metrics = self.metrics.clone();
        let started = std::time::Instant::now();
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = call.await;
            let code = match &response {
                Ok(r) => r
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or_else(
                        || "Ok".to_string(),
                        |c| format!("{:?}", tonic::Code::from_i32(c)),
                    ),
                Err(_) => "TransportError".to_string(),
            };
            // tonic answers UNIMPLEMENTED for paths no service serves (with a remote host,
            // the embedded host's services too): one label for all of them.
            let method = if code == "Unimplemented" {
                "unknown"
            } else {
                method_label(&method)
            };
            metrics
                .grpc_requests
                .with_label_values(&[method, code.as_str()])
                .observe(started.elapsed().as_secs_f64());
            response
        })
    }
}

/// Every method this port can serve (VarsService and EventsService with the embedded host
/// only), as its request path.
const METHODS: &[&str] = &[
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/autokitteh.integrations.v1.IntegrationsService/Get",
    "/autokitteh.integrations.v1.IntegrationsService/List",
    "/autokitteh.integrations.v1.IntegrationsService/Configure",
    "/autokitteh.integrations.v1.IntegrationsService/TestConnection",
    "/autokitteh.integrations.v1.IntegrationsService/GetConnectionStatus",
    "/autokitteh.integrations.v1.IntegrationsService/GetConnectionConfig",
    "/autokitteh.integrations.v1.IntegrationsService/Call",
    "/zoomintegration.v1.SetupLinksService/Create",
    "/autokitteh.vars.v1.VarsService/Set",
    "/autokitteh.vars.v1.VarsService/Get",
    "/autokitteh.vars.v1.VarsService/Delete",
    "/autokitteh.vars.v1.VarsService/FindActiveConnectionIDs",
    "/autokitteh.events.v1.EventsService/Save",
    "/autokitteh.events.v1.EventsService/Get",
    "/autokitteh.events.v1.EventsService/List",
];

/// The metrics label of a call to `path`: the path for a method of ours, else `unknown`. A
/// call refused before it reaches a service (too many at once, timed out) may name any path:
/// labelling those as sent would let callers add series at will.
fn method_label(path: &str) -> &str {
    METHODS
        .iter()
        .find(|m| **m == path)
        .copied()
        .unwrap_or("unknown")
}

/// The time the caller allows a call, from its `grpc-timeout` header (1 to 8 digits and a
/// unit: `H`, `M`, `S`, `m`, `u` or `n`); `None` when it set none or the header is malformed
/// (tonic's server applies the same header, so a malformed one bounds nothing there either).
pub(crate) fn caller_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    grpc_timeout(metadata.get("grpc-timeout")?.to_str().ok()?)
}

/// A `grpc-timeout` header's value as a duration (see [`caller_timeout`]).
pub(crate) fn grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/package.Service/Method` of every rpc of `service` in the proto file at `path`.
    fn proto_methods(path: &str, service: &str) -> Vec<String> {
        let text =
            std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        let package = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("package "))
            .unwrap()
            .trim_end_matches(';');
        let body = text.split(&format!("service {service} {{")).nth(1).unwrap();
        let body = &body[..body.find('}').unwrap()];
        body.lines()
            .filter_map(|l| l.trim().strip_prefix("rpc "))
            .map(|l| format!("/{package}.{service}/{}", &l[..l.find('(').unwrap()].trim()))
            .collect()
    }

    #[test]
    fn every_served_method_has_its_own_label_and_any_other_path_is_unknown() {
        let served = [
            (
                "proto/autokitteh/integrations/v1/svc.proto",
                "IntegrationsService",
            ),
            (
                "proto/zoomintegration/v1/setup_links.proto",
                "SetupLinksService",
            ),
            ("proto/autokitteh/vars/v1/svc.proto", "VarsService"),
            ("proto/autokitteh/events/v1/svc.proto", "EventsService"),
        ];
        let mut expected: Vec<String> = served
            .iter()
            .flat_map(|(path, service)| proto_methods(path, service))
            .chain([
                "/grpc.health.v1.Health/Check".into(),
                "/grpc.health.v1.Health/Watch".into(),
            ])
            .collect();
        let mut listed: Vec<String> = METHODS.iter().map(|m| m.to_string()).collect();
        expected.sort();
        listed.sort();
        assert_eq!(listed, expected);
        for method in METHODS {
            assert_eq!(method_label(method), *method);
        }
        for made_up in [
            "/x/1",
            "/autokitteh.integrations.v1.IntegrationsService/Nope",
            "/autokitteh.dispatcher.v1.DispatcherService/Dispatch",
            "",
        ] {
            assert_eq!(method_label(made_up), "unknown");
        }
    }

    fn timeout_of(header: &str) -> Option<Duration> {
        let mut metadata = tonic::metadata::MetadataMap::new();
        metadata.insert("grpc-timeout", header.parse().unwrap());
        caller_timeout(&metadata)
    }

    #[test]
    fn a_callers_grpc_timeout_is_read_in_each_unit_and_a_malformed_one_is_ignored() {
        assert_eq!(timeout_of("2S"), Some(Duration::from_secs(2)));
        assert_eq!(timeout_of("1500m"), Some(Duration::from_millis(1500)));
        assert_eq!(timeout_of("3M"), Some(Duration::from_secs(180)));
        assert_eq!(timeout_of("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            timeout_of("99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(timeout_of("7n"), Some(Duration::from_nanos(7)));
        for bad in ["S", "2", "2s", "-1S", "123456789S", "1.5S", " 2S"] {
            assert_eq!(timeout_of(bad), None, "{bad:?}");
        }
        assert_eq!(caller_timeout(&tonic::metadata::MetadataMap::new()), None);
    }
}
