//! A remote, AutoKitteh-compatible host engine reached over gRPC (`HOST_ENGINE_URL`).
//!
//! One lazily connected channel serves every call; tonic reconnects it after failures, and
//! every call has a deadline so a stuck host never holds a request forever.

use std::time::Duration;

use async_trait::async_trait;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use super::{HostEngine, HostError, Var, check_var, check_var_name};
use crate::config::{BaseUrl, ConfigError};
use crate::ids::{ConnectionId, INTEGRATION_ID};
use crate::proto::autokitteh::dispatcher::v1::DispatchRequest;
use crate::proto::autokitteh::dispatcher::v1::dispatcher_service_client::DispatcherServiceClient;
use crate::proto::autokitteh::events::v1::Event;
use crate::proto::autokitteh::vars::v1 as pb;
use crate::proto::autokitteh::vars::v1::vars_service_client::VarsServiceClient;
use crate::secret::Secret;

/// How long to wait for a TCP connection to the host.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one `Dispatch` may take: AutoKitteh saves the event and starts its workflows
/// before answering, slowly when loaded, and a Dispatch given up on is sent again, so its
/// workflows would start twice.
const DISPATCH_TIMEOUT: Duration = Duration::from_secs(60);

type Svc = InterceptedService<Channel, BearerToken>;

/// Adds `authorization: Bearer …` to every call when the host needs a token.
#[derive(Clone)]
struct BearerToken(Option<MetadataValue<tonic::metadata::Ascii>>);

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Client of a remote host engine's `VarsService` and `DispatcherService`.
#[derive(Clone)]
pub struct RemoteHost {
    vars: VarsServiceClient<Svc>,
    dispatcher: DispatcherServiceClient<Svc>,
    health: HealthClient<Svc>,
}

impl RemoteHost {
    /// A client of the host at `url`; connects on first use.
    pub fn new(url: &BaseUrl, token: Option<&Secret>) -> Result<Self, ConfigError> {
        let endpoint = Endpoint::from_shared(url.as_str().to_string())
            .map_err(|e| ConfigError::new("HOST_ENGINE_URL", format!("is unusable: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        // Without this an `https` URL would get plain HTTP/2 on the TLS port: the token would
        // cross the network in the clear and no call would ever succeed.
        let endpoint = if url.as_str().starts_with("https://") {
            endpoint
                .tls_config(ClientTlsConfig::new().with_native_roots())
                .map_err(|e| ConfigError::new("HOST_ENGINE_URL", format!("is unusable: {e}")))?
        } else {
            endpoint
        };
        // Its own channel (connection), since a channel's timeout bounds every call on it.
        let dispatch_channel = endpoint.clone().timeout(DISPATCH_TIMEOUT).connect_lazy();
        let channel = endpoint.connect_lazy();
        let token = token
            .map(|t| {
                let mut value: MetadataValue<tonic::metadata::Ascii> =
                    format!("Bearer {}", t.expose()).parse().map_err(|_| {
                        ConfigError::new("HOST_ENGINE_TOKEN", "is not valid header text")
                    })?;
                // Kept out of HTTP/2's header compression table.
                value.set_sensitive(true);
                Ok::<_, ConfigError>(value)
            })
            .transpose()?;
        let auth = BearerToken(token);
        Ok(Self {
            vars: VarsServiceClient::with_interceptor(channel.clone(), auth.clone()),
            dispatcher: DispatcherServiceClient::with_interceptor(dispatch_channel, auth.clone()),
            health: HealthClient::with_interceptor(channel, auth),
        })
    }
}

fn map_status(status: Status) -> HostError {
    let message = status.message().to_string();
    match status.code() {
        Code::InvalidArgument | Code::OutOfRange => HostError::InvalidArgument(message),
        // The host's state, not the request, is at fault (and may change): an event waits and
        // is retried rather than becoming a dead letter within a minute, and a caller of ours
        // is not told its own request was invalid.
        Code::FailedPrecondition => HostError::Remote(format!("FailedPrecondition: {message}")),
        Code::NotFound => HostError::NotFound(message),
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::ResourceExhausted
        | Code::Aborted => HostError::Unavailable(format!("{:?}: {message}", status.code())),
        // The host refuses us, not the request: nothing works until HOST_ENGINE_TOKEN is
        // fixed, so callers should retry later and events must wait, not become dead letters.
        Code::Unauthenticated | Code::PermissionDenied => HostError::Unavailable(format!(
            "{:?}: {message} (check HOST_ENGINE_TOKEN)",
            status.code()
        )),
        code => HostError::Remote(format!("{code:?}: {message}")),
    }
}

/// What AutoKitteh's Dispatch answers (`INVALID_ARGUMENT`) when the event's destination does
/// not exist: its dispatcher returns the database's `sdkerrors.ErrNotFound` as it is, whose
/// text is `not_found`.
const DISPATCH_NOT_FOUND: &str = "not_found";

/// Dispatch's statuses. AutoKitteh answers `INVALID_ARGUMENT` for every failure of its
/// dispatcher too (its database, its workflow engine, an authorization refused), so only the
/// request validator's own answer ("validation error…") and the dispatcher's bare `not_found`
/// (no such destination connection, which retrying will not create) are taken as the event
/// being at fault; any other is the host failing, and the event waits and is retried rather
/// than becoming a dead letter within a minute.
fn map_dispatch_status(status: Status) -> HostError {
    if status.code() == Code::InvalidArgument {
        // Its authorization refusing us ("save event: unauthorized"): nothing is delivered
        // until HOST_ENGINE_TOKEN is fixed, so events wait rather than become dead letters.
        let message = status.message().trim();
        if ["unauthorized", "unauthenticated"]
            .iter()
            .any(|refusal| message == *refusal || message.ends_with(&format!(": {refusal}")))
        {
            return HostError::Unavailable(format!(
                "InvalidArgument: {message} (check HOST_ENGINE_TOKEN)"
            ));
        }
        if status.message().trim() == DISPATCH_NOT_FOUND {
            return HostError::NotFound(format!(
                "the host engine has no such destination connection ({})",
                status.message()
            ));
        }
        if !status.message().starts_with("validation error") {
            return HostError::Remote(format!("InvalidArgument: {}", status.message()));
        }
    }
    map_status(status)
}

/// VarsService.Set's statuses. AutoKitteh answers `INVALID_ARGUMENT` "integration id … not
/// found" when the connection does not exist (its database finds no connection to take the
/// integration id from): that is the connection missing, not the request malformed.
fn map_set_status(status: Status) -> HostError {
    let message = status.message().trim();
    if status.code() == Code::InvalidArgument
        && message.starts_with("integration id")
        && message.ends_with("not found")
    {
        return HostError::NotFound(format!(
            "the host engine has no such connection ({message})"
        ));
    }
    map_status(status)
}

#[async_trait]
impl HostEngine for RemoteHost {
    fn kind(&self) -> &'static str {
        "remote"
    }

    async fn get_vars(
        &self,
        scope: &ConnectionId,
        names: &[String],
    ) -> Result<Vec<Var>, HostError> {
        let response = self
            .vars
            .clone()
            .get(pb::GetRequest {
                scope_id: scope.to_string(),
                names: names.to_vec(),
            })
            .await
            .map_err(map_status)?;
        Ok(response
            .into_inner()
            .vars
            .into_iter()
            .map(|v| Var {
                name: v.name,
                value: v.value,
                is_secret: v.is_secret,
                description: v.description,
            })
            .collect())
    }

    async fn set_vars(&self, scope: &ConnectionId, vars: Vec<Var>) -> Result<(), HostError> {
        for var in &vars {
            check_var(var)?;
        }
        let vars = vars
            .into_iter()
            .map(|v| pb::Var {
                scope_id: scope.to_string(),
                name: v.name,
                value: v.value,
                is_secret: v.is_secret,
                description: v.description,
            })
            .collect();
        self.vars
            .clone()
            .set(pb::SetRequest { vars })
            .await
            .map_err(map_set_status)?;
        Ok(())
    }

    async fn delete_vars(&self, scope: &ConnectionId, names: &[String]) -> Result<(), HostError> {
        for name in names {
            check_var_name(name)?;
        }
        self.vars
            .clone()
            .delete(pb::DeleteRequest {
                scope_id: scope.to_string(),
                names: names.to_vec(),
            })
            .await
            .map_err(map_status)?;
        Ok(())
    }

    async fn find_connections(
        &self,
        name: &str,
        value: &str,
    ) -> Result<Vec<ConnectionId>, HostError> {
        let response = self
            .vars
            .clone()
            .find_active_connection_i_ds(pb::FindActiveConnectionIDsRequest {
                integration_id: INTEGRATION_ID.clone(),
                name: name.to_string(),
                value: value.to_string(),
            })
            .await
            .map_err(map_status)?;
        let mut ids = Vec::new();
        for id in response.into_inner().connection_ids {
            match ConnectionId::parse(&id) {
                Ok(id) => ids.push(id),
                Err(e) => {
                    tracing::warn!(error = %e, "host engine returned a malformed connection id")
                }
            }
        }
        Ok(ids)
    }

    async fn dispatch(&self, event: Event) -> Result<String, HostError> {
        let response = self
            .dispatcher
            .clone()
            .dispatch(DispatchRequest {
                event: Some(event),
                ..Default::default()
            })
            .await
            .map_err(map_dispatch_status)?;
        Ok(response.into_inner().event_id)
    }

    async fn check(&self) -> Result<(), HostError> {
        match self
            .health
            .clone()
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
        {
            Ok(response) => {
                use tonic_health::pb::health_check_response::ServingStatus;
                if response.into_inner().status() == ServingStatus::Serving {
                    Ok(())
                } else {
                    Err(HostError::Unavailable(
                        "host engine reports not serving".into(),
                    ))
                }
            }
            // The host answered, so it is reachable; it just does not serve the health API.
            Err(status) if matches!(status.code(), Code::Unimplemented | Code::NotFound) => Ok(()),
            Err(status) => Err(map_status(status)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// The first bytes a host at `scheme://127.0.0.1:port` receives from a call.
    async fn first_bytes_sent(scheme: &str) -> Vec<u8> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = crate::config::parse_base_url(
            "HOST_ENGINE_URL",
            &format!(
                "{scheme}://127.0.0.1:{}",
                listener.local_addr().unwrap().port()
            ),
        )
        .unwrap();
        let host = RemoteHost::new(&url, Some(&Secret::new("host-token"))).unwrap();
        let call = tokio::spawn(async move { host.check().await });
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut bytes = vec![0; 24];
        socket.read_exact(&mut bytes).await.unwrap();
        call.abort();
        bytes
    }

    #[tokio::test]
    async fn an_https_host_is_spoken_to_over_tls_and_an_http_one_in_plain_http2() {
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        assert_eq!(first_bytes_sent("http").await, preface);
        let tls = first_bytes_sent("https").await;
        assert_eq!(tls[0], 0x16, "a TLS handshake record comes first");
        assert!(!tls.windows(3).any(|w| w == b"PRI"));
    }

    #[test]
    fn a_host_refusing_our_credentials_is_unavailable_not_an_error_in_the_request() {
        for code in [Code::Unauthenticated, Code::PermissionDenied] {
            match map_status(Status::new(code, "no")) {
                HostError::Unavailable(m) => assert!(m.contains("HOST_ENGINE_TOKEN"), "{m}"),
                other => panic!("{code:?} became {other:?}"),
            }
        }
        assert!(matches!(
            map_status(Status::invalid_argument("bad")),
            HostError::InvalidArgument(_)
        ));
        assert!(matches!(
            map_status(Status::failed_precondition("no active deployment")),
            HostError::Remote(_)
        ));
        assert!(matches!(
            map_status(Status::internal("oops")),
            HostError::Remote(_)
        ));
    }

    #[test]
    fn a_dispatch_the_host_failed_on_is_retried_and_only_a_request_it_found_malformed_is_invalid() {
        // AutoKitteh's answers: its dispatcher's failures, then its request validator's.
        for failed in [
            "failed starting workflow: context deadline exceeded",
            "save event: database is locked",
            "permission denied",
        ] {
            match map_dispatch_status(Status::invalid_argument(failed)) {
                HostError::Remote(m) => assert!(m.contains(failed), "{m}"),
                other => panic!("{failed:?} became {other:?}"),
            }
        }
        assert!(matches!(
            map_dispatch_status(Status::invalid_argument(
                "validation error:\n - event_id: event_id must not be specified"
            )),
            HostError::InvalidArgument(_)
        ));
        assert!(matches!(
            map_dispatch_status(Status::unavailable("down")),
            HostError::Unavailable(_)
        ));
    }

    #[test]
    fn a_dispatch_the_hosts_authorization_refused_waits_for_the_token_to_be_fixed() {
        for refused in ["save event: unauthorized", "unauthenticated"] {
            match map_dispatch_status(Status::invalid_argument(refused)) {
                HostError::Unavailable(m) => {
                    assert!(
                        m.contains(refused) && m.contains("HOST_ENGINE_TOKEN"),
                        "{m}"
                    )
                }
                other => panic!("{refused:?} became {other:?}"),
            }
        }
        assert!(matches!(
            map_dispatch_status(Status::invalid_argument("save event: unauthorized user x")),
            HostError::Remote(_)
        ));
    }

    #[test]
    fn setting_variables_of_a_connection_the_host_does_not_have_is_not_found() {
        // AutoKitteh prints the missing connection's (empty) integration id.
        match map_set_status(Status::invalid_argument("integration id  not found")) {
            HostError::NotFound(m) => assert!(m.contains("integration id"), "{m}"),
            other => panic!("became {other:?}"),
        }
        assert!(matches!(
            map_set_status(Status::invalid_argument("var #0: invalid name")),
            HostError::InvalidArgument(_)
        ));
    }

    #[test]
    fn a_dispatch_to_a_connection_the_host_does_not_have_is_refused_not_retried() {
        // AutoKitteh's dispatcher returns its database's `sdkerrors.ErrNotFound` unwrapped,
        // and its gRPC service answers it as INVALID_ARGUMENT.
        match map_dispatch_status(Status::invalid_argument("not_found")) {
            HostError::NotFound(m) => assert!(m.contains("not_found"), "{m}"),
            other => panic!("not_found became {other:?}"),
        }
        // A not_found inside another failure's text is still the host failing.
        assert!(matches!(
            map_dispatch_status(Status::invalid_argument(
                "failed starting workflow: not_found"
            )),
            HostError::Remote(_)
        ));
    }
}
