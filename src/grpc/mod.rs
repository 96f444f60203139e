//! The gRPC server: one struct per service, assembled here.

pub mod events;
pub mod integrations;
pub mod vars;

use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::AppState;
use crate::proto::autokitteh::events::v1::events_service_server::EventsServiceServer;
use crate::proto::autokitteh::integrations::v1::integrations_service_server::IntegrationsServiceServer;
use crate::proto::autokitteh::vars::v1::vars_service_server::VarsServiceServer;

/// The longest a gRPC call may run before it is cancelled.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves gRPC on `listener` until `shutdown` is cancelled, then lets in-flight calls finish.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<IntegrationsServiceServer<integrations::IntegrationsApi>>()
        .await;

    let integrations = integrations::IntegrationsApi::new(&state);
    let mut router =
        Server::builder()
            .timeout(REQUEST_TIMEOUT)
            // Callers' mistakes (INVALID_ARGUMENT, NOT_FOUND) are not our failures: log every
            // outcome at debug; internal errors are logged where they are mapped (error.rs).
            .layer(tower_http::trace::TraceLayer::new_for_grpc().on_failure(
                tower_http::trace::DefaultOnFailure::new().level(tracing::Level::DEBUG),
            ))
            .add_service(health)
            .add_service(IntegrationsServiceServer::new(integrations));
    if let Some(embedded) = &state.embedded {
        reporter
            .set_serving::<VarsServiceServer<vars::VarsApi>>()
            .await;
        reporter
            .set_serving::<EventsServiceServer<events::EventsApi>>()
            .await;
        router = router
            .add_service(VarsServiceServer::new(vars::VarsApi::new(embedded.clone())))
            .add_service(EventsServiceServer::new(events::EventsApi::new(
                embedded.clone(),
            )));
    }

    let stopping = shutdown.clone();
    tokio::spawn(async move {
        stopping.cancelled().await;
        reporter
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
    });
    router
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), shutdown.cancelled_owned())
        .await
}
