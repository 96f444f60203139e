//! `autokitteh.integrations.v1.IntegrationsService`: what host engines call on this integration.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::AppState;
use crate::connection::{
    AuthType, StatusCode, connection_status, init_required, public_config, status, vars,
};
use crate::credentials::{Access, CredentialError, Credentials};
use crate::error::ApiError;
use crate::functions::Functions;
use crate::host::{HostEngine, HostError};
use crate::ids::ConnectionId;
use crate::integration::is_this_integration;
use crate::proto::autokitteh::integrations::v1::integrations_service_server::IntegrationsService;
use crate::proto::autokitteh::integrations::v1::*;
use crate::zoom::api::ZoomApi;

/// The IntegrationsService of the `zoom` integration.
pub struct IntegrationsApi {
    host: Arc<dyn HostEngine>,
    descriptor: Integration,
    credentials: Arc<Credentials>,
    zoom_api: ZoomApi,
    functions: Functions,
    /// `REQUEST_TIMEOUT`: the longest a call may take, whatever its caller allows.
    request_timeout: std::time::Duration,
    /// `ZOOM_CLIENT_ID`, the default app's, if configured.
    default_client_id: Option<String>,
}

impl IntegrationsApi {
    /// The service of this process: connections from its host engine, tokens from its
    /// credentials, Zoom through its API client.
    pub fn new(state: &AppState) -> Self {
        Self {
            host: state.host.clone(),
            descriptor: crate::integration::descriptor(&state.config),
            credentials: state.credentials.clone(),
            zoom_api: state.zoom_api.clone(),
            functions: Functions::new(state.credentials.clone(), state.zoom_api.clone()),
            request_timeout: state.config.request_timeout,
            default_client_id: state
                .config
                .default_app
                .as_ref()
                .map(|app| app.client_id.clone()),
        }
    }

    /// What `TestConnection` reports: whether Zoom accepts the connection's credentials.
    async fn test(&self, cid: &ConnectionId) -> Result<crate::connection::Status, ApiError> {
        let access = match self.access(cid).await? {
            Ok(access) => access,
            Err(status) => return Ok(status),
        };
        let mut result = self.try_token(&access).await;
        if let Err(crate::zoom::ZoomError::Rejected { status: 401, .. }) = &result {
            // Revoked or deauthorized: never used again, and the test is made once more with
            // a new token, as a call is.
            self.credentials.reject(cid, &access.token).await;
            let renewed = match self.access(cid).await? {
                Ok(renewed) => renewed,
                Err(status) => return Ok(status),
            };
            if renewed.token != access.token {
                result = self.try_token(&renewed).await;
                if let Err(crate::zoom::ZoomError::Rejected { status: 401, .. }) = &result {
                    self.credentials.reject(cid, &renewed.token).await;
                }
            }
        }
        Ok(match result {
            Ok(message) => status(StatusCode::Ok, message),
            Err(e) => status(StatusCode::Error, e.to_string()),
        })
    }

    /// A token for `cid`, or the status that says why there is none.
    async fn access(
        &self,
        cid: &ConnectionId,
    ) -> Result<Result<Access, crate::connection::Status>, ApiError> {
        Ok(Err(match self.credentials.access_token(cid).await {
            Ok(access) => return Ok(Ok(access)),
            Err(CredentialError::NotSetUp) => init_required(),
            Err(CredentialError::Broken(reason) | CredentialError::Refused(reason)) => {
                status(StatusCode::Error, reason)
            }
            Err(CredentialError::Zoom(e)) => status(StatusCode::Error, e.to_string()),
            Err(CredentialError::Host(e @ HostError::Undecryptable { .. })) => corrupt(&e),
            Err(CredentialError::Host(e)) => return Err(e.into()),
        }))
    }

    /// What Zoom says of `access`: who it belongs to, or how many users a Server-to-Server
    /// app's account lists.
    async fn try_token(&self, access: &Access) -> Result<String, crate::zoom::ZoomError> {
        match access.auth_type {
            AuthType::ServerToServer => self.zoom_api.count_users(&access.token).await.map(|n| {
                format!("Server-to-Server app works: Zoom lists {n} users in its account")
            }),
            _ => self
                .zoom_api
                .me(&access.token)
                .await
                .map(|user| format!("connected as {}", user.describe())),
        }
    }

    /// A fresh access token for `Configure`'s config: AutoKitteh puts a connection's config
    /// into its sessions as `<connection>__<key>`, and its Python SDK (`zoom_client`) sends
    /// `<connection>__oauth_access_token` to Zoom. The refresh token is never handed out: a
    /// workflow refreshing with it would rotate it away from this service. None when there is
    /// no token to be had; the session's calls of this integration's functions then say why.
    async fn token_for_workflow(&self, cid: &ConnectionId) -> Option<crate::credentials::Access> {
        // Well within the call's own timeout, which began earlier: a token slow to come must
        // leave the session its config, not fail the whole call (the refresh goes on).
        let token =
            tokio::time::timeout(self.request_timeout / 3, self.credentials.access_token(cid));
        match token.await {
            // Not one about to expire (handed out while Zoom's OAuth server is down): the
            // session would start with a token that dies in its first call.
            Ok(Ok(access)) if access.expires_at - chrono::Utc::now() < MIN_TOKEN_LEFT => {
                tracing::info!(connection_id = %cid, "configured a connection without an access token: the only one to be had is about to expire");
                None
            }
            Ok(Ok(access)) => Some(access),
            Ok(Err(e)) => {
                tracing::info!(connection_id = %cid, error = %e, "configured a connection without an access token");
                None
            }
            Err(_) => {
                tracing::warn!(connection_id = %cid, "configured a connection without an access token: none came in time");
                None
            }
        }
    }

    async fn connection_vars(
        &self,
        integration_id: &str,
        connection_id: &str,
    ) -> Result<Vec<crate::host::Var>, ApiError> {
        check_integration(integration_id)?;
        let cid = ConnectionId::parse(connection_id)?;
        Ok(self.host.get_vars(&cid, &[]).await?)
    }
}

/// The least time a token `Configure` hands a session must have left.
const MIN_TOKEN_LEFT: chrono::TimeDelta = chrono::TimeDelta::minutes(1);

/// The status of a connection whose stored secret no longer decrypts: the owner must set it
/// up again (retrying cannot help, so it is not an error of the call).
fn corrupt(err: &HostError) -> crate::connection::Status {
    tracing::error!(error = %err, "stored data is corrupt");
    status(StatusCode::Error, err.with_way_out())
}

/// Requests must name this integration, by id or unique name.
pub(crate) fn check_integration(integration_id: &str) -> Result<(), ApiError> {
    if integration_id.is_empty() {
        return Err(ApiError::InvalidArgument(
            "integration_id is required".into(),
        ));
    }
    if !is_this_integration(integration_id) {
        return Err(ApiError::NotFound(format!(
            "unknown integration {:?}: this service is the zoom integration",
            crate::ids::truncate(integration_id, 64)
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl IntegrationsService for IntegrationsApi {
    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let req = request.into_inner();
        let (key, by_name) = match (req.integration_id.is_empty(), req.name.is_empty()) {
            (false, true) => (req.integration_id, false),
            (true, false) => (req.name, true),
            _ => {
                return Err(ApiError::InvalidArgument(
                    "exactly one of integration_id and name is required".into(),
                )
                .into());
            }
        };
        let well_formed = if by_name {
            crate::ids::is_symbol(&key)
        } else {
            crate::ids::is_integration_id(&key)
        };
        if !well_formed {
            return Err(ApiError::InvalidArgument(format!(
                "{} {:?} is malformed",
                if by_name { "name" } else { "integration_id" },
                crate::ids::truncate(&key, 64)
            ))
            .into());
        }
        // As AutoKitteh answers: another integration is not an error, just none.
        Ok(Response::new(GetResponse {
            integration: is_this_integration(&key).then(|| self.descriptor.clone()),
        }))
    }

    async fn list(&self, request: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let needle = request.into_inner().name_substring.to_lowercase();
        let d = &self.descriptor;
        let matches =
            d.unique_name.contains(&needle) || d.display_name.to_lowercase().contains(&needle);
        Ok(Response::new(ListResponse {
            integrations: if matches { vec![d.clone()] } else { Vec::new() },
        }))
    }

    async fn configure(
        &self,
        request: Request<ConfigureRequest>,
    ) -> Result<Response<ConfigureResponse>, Status> {
        let req = request.into_inner();
        if req.connection_id.is_empty() {
            // As AutoKitteh's modules do: the functions, with no connection in them.
            check_integration(&req.integration_id)?;
            return Ok(Response::new(ConfigureResponse {
                config: Default::default(),
                values: crate::functions::configured(&crate::ids::INTEGRATION_ID, None),
            }));
        }
        let vars = self
            .connection_vars(&req.integration_id, &req.connection_id)
            .await?;
        let cid = ConnectionId::parse(&req.connection_id).map_err(ApiError::from)?;
        let mut config: std::collections::HashMap<String, String> =
            public_config(&vars).into_iter().collect();
        // A `token_error` does not keep the token back: asking is what clears it once the
        // app is fixed, and a session start is when someone is waiting for one.
        let without_token_error: Vec<_> = vars
            .iter()
            .filter(|v| v.name != vars::TOKEN_ERROR)
            .cloned()
            .collect();
        if connection_status(&without_token_error).code() == StatusCode::Ok
            && let Some(access) = self.token_for_workflow(&cid).await
        {
            config.insert(
                vars::OAUTH_ACCESS_TOKEN.into(),
                access.token.expose().to_string(),
            );
            config.insert(
                vars::OAUTH_EXPIRY.into(),
                access
                    .expires_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            );
        }
        Ok(Response::new(ConfigureResponse {
            config,
            values: crate::functions::configured(&crate::ids::INTEGRATION_ID, Some(&cid)),
        }))
    }

    async fn test_connection(
        &self,
        request: Request<TestConnectionRequest>,
    ) -> Result<Response<TestConnectionResponse>, Status> {
        let req = request.into_inner();
        check_integration(&req.integration_id)?;
        let cid = ConnectionId::parse(&req.connection_id).map_err(ApiError::from)?;
        let status = self.test(&cid).await?;
        Ok(Response::new(TestConnectionResponse {
            status: Some(status),
        }))
    }

    async fn get_connection_status(
        &self,
        request: Request<GetConnectionStatusRequest>,
    ) -> Result<Response<GetConnectionStatusResponse>, Status> {
        let req = request.into_inner();
        check_integration(&req.integration_id)?;
        // No connection id: the status a new connection starts with.
        let status = if req.connection_id.is_empty() {
            init_required()
        } else {
            match self
                .connection_vars(&req.integration_id, &req.connection_id)
                .await
            {
                Ok(vars) => match crate::connection::default_app_mismatch(
                    &vars,
                    self.default_client_id.as_deref(),
                ) {
                    Some(why) if connection_status(&vars).code() == StatusCode::Ok => {
                        status(StatusCode::Error, why)
                    }
                    _ => connection_status(&vars),
                },
                Err(ApiError::DataLoss(message)) => status(StatusCode::Error, message),
                Err(e) => return Err(e.into()),
            }
        };
        Ok(Response::new(GetConnectionStatusResponse {
            status: Some(status),
        }))
    }

    async fn get_connection_config(
        &self,
        request: Request<GetConnectionConfigRequest>,
    ) -> Result<Response<GetConnectionConfigResponse>, Status> {
        let req = request.into_inner();
        let vars = self
            .connection_vars(&req.integration_id, &req.connection_id)
            .await?;
        Ok(Response::new(GetConnectionConfigResponse {
            config: public_config(&vars).into_iter().collect(),
        }))
    }

    async fn call(&self, request: Request<CallRequest>) -> Result<Response<CallResponse>, Status> {
        let deadline = tokio::time::Instant::now()
            + super::caller_timeout(request.metadata())
                .map_or(self.request_timeout, |t| t.min(self.request_timeout));
        let req = request.into_inner();
        check_integration(&req.integration_id)?;
        let function = req.function.unwrap_or_default();
        let (name, data) = match (&function.function, &function.string) {
            (Some(f), _) => (f.name.clone(), f.data.clone()),
            (None, Some(s)) => (s.v.clone(), Vec::new()),
            (None, None) => {
                return Err(ApiError::InvalidArgument(
                    "function must be a function value (or its name as text)".into(),
                )
                .into());
            }
        };
        let mut kwargs = req.kwargs;
        // AutoKitteh's SDK puts the connection id in the function value's data; a
        // `connection_id` keyword argument is taken too, and never passed on to Zoom.
        let named =
            match kwargs.remove("connection_id") {
                None => None,
                Some(v) if v.nothing.is_some() => None,
                Some(v) => Some(v.string.map(|s| s.v).ok_or_else(|| {
                    ApiError::InvalidArgument("connection_id must be text".into())
                })?),
            };
        let in_data = String::from_utf8(data).ok().filter(|cid| !cid.is_empty());
        let cid = match (in_data, named) {
            (Some(in_data), Some(named)) if named != in_data => {
                return Err(ApiError::InvalidArgument(
                    "connection_id differs from the connection the function was configured with"
                        .into(),
                )
                .into());
            }
            (Some(cid), _) | (None, Some(cid)) => cid,
            (None, None) => String::new(),
        };
        let cid = ConnectionId::parse(&cid).map_err(ApiError::from)?;
        let response = match self
            .functions
            .call(&cid, &name, req.args, kwargs, deadline)
            .await
        {
            Ok(value) => CallResponse {
                value: Some(value),
                error: None,
            },
            Err(failure) => CallResponse {
                value: None,
                error: Some(crate::proto::autokitteh::program::v1::Error {
                    value: Some(failure.to_value()),
                    callstack: Vec::new(),
                    extra: [
                        failure
                            .status
                            .map(|s| ("status".to_string(), s.to_string())),
                        failure.code.map(|c| ("code".to_string(), c.to_string())),
                    ]
                    .into_iter()
                    .flatten()
                    .collect(),
                }),
            },
        };
        Ok(Response::new(response))
    }
}
