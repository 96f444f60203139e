//! `autokitteh.vars.v1.VarsService`, served by the embedded host so tools and hosts can read
//! and write connection variables when no host engine is configured.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::connection::vars::SECRETS;
use crate::error::ApiError;
use crate::grpc::integrations::check_integration;
use crate::host::embedded::EmbeddedHost;
use crate::host::{HostEngine, Var};
use crate::ids::ConnectionId;
use crate::proto::autokitteh::vars::v1 as pb;
use crate::proto::autokitteh::vars::v1::vars_service_server::VarsService;
use crate::webhook::routing::RoutingIndex;

/// VarsService over the embedded host's database.
pub struct VarsApi {
    host: EmbeddedHost,
    /// Webhook routing, brought up to date with a change before it is answered.
    routing: Arc<RoutingIndex>,
}

impl VarsApi {
    /// Serves `host`'s variables; `routing` follows their changes.
    pub fn new(host: EmbeddedHost, routing: Arc<RoutingIndex>) -> Self {
        Self { host, routing }
    }

    /// Reads the connections in `scopes` again for webhook routing, so a webhook sent once a
    /// change is answered finds it (the change's announcement does the same, a moment later).
    async fn route_again(&self, scopes: impl IntoIterator<Item = ConnectionId>) {
        let scopes: std::collections::BTreeSet<ConnectionId> = scopes.into_iter().collect();
        for scope in scopes {
            if let Err(e) = self.routing.reload_connection(&self.host, &scope).await {
                tracing::debug!(connection_id = %scope, error = %e, "routing will follow the change when it is announced");
            }
        }
    }
}

fn to_pb(scope: &ConnectionId, v: Var) -> pb::Var {
    pb::Var {
        scope_id: scope.to_string(),
        name: v.name,
        value: v.value,
        is_secret: v.is_secret,
        description: v.description,
    }
}

#[tonic::async_trait]
impl VarsService for VarsApi {
    async fn set(
        &self,
        request: Request<pb::SetRequest>,
    ) -> Result<Response<pb::SetResponse>, Status> {
        let vars = request.into_inner().vars;
        // AutoKitteh sets nothing and answers OK.
        if vars.is_empty() {
            return Ok(Response::new(pb::SetResponse {}));
        }
        let mut scoped = Vec::with_capacity(vars.len());
        for v in vars {
            let scope = ConnectionId::parse(&v.scope_id).map_err(ApiError::from)?;
            let var = Var {
                // The integration's own secrets are sealed whatever the caller says.
                is_secret: v.is_secret || SECRETS.contains(&v.name.as_str()),
                name: v.name,
                value: v.value,
                description: v.description,
            };
            scoped.push((scope, var));
        }
        // One transaction: a bad variable or a failed write leaves every connection as it was.
        let scopes: Vec<ConnectionId> = scoped.iter().map(|(scope, _)| scope.clone()).collect();
        self.host
            .set_scoped_vars(scoped)
            .await
            .map_err(ApiError::from)?;
        self.route_again(scopes).await;
        Ok(Response::new(pb::SetResponse {}))
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let req = request.into_inner();
        let scope = ConnectionId::parse(&req.scope_id).map_err(ApiError::from)?;
        for name in &req.names {
            crate::host::check_var_name(name).map_err(ApiError::from)?;
        }
        let vars = self
            .host
            .get_vars(&scope, &req.names)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::GetResponse {
            vars: vars.into_iter().map(|v| to_pb(&scope, v)).collect(),
        }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let req = request.into_inner();
        let scope = ConnectionId::parse(&req.scope_id).map_err(ApiError::from)?;
        self.host
            .delete_vars(&scope, &req.names)
            .await
            .map_err(ApiError::from)?;
        self.route_again([scope]).await;
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn find_active_connection_i_ds(
        &self,
        request: Request<pb::FindActiveConnectionIDsRequest>,
    ) -> Result<Response<pb::FindActiveConnectionIDsResponse>, Status> {
        let req = request.into_inner();
        check_integration(&req.integration_id)?;
        let ids = self
            .host
            .find_connections(&req.name, &req.value)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::FindActiveConnectionIDsResponse {
            connection_ids: ids.into_iter().map(|id| id.to_string()).collect(),
        }))
    }
}
