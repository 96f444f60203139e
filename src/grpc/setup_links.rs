//! `zoomintegration.v1.SetupLinksService`: signed links to the connection page, for host
//! engines and operators (see [`crate::setup::links`]).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::AppState;
use crate::config::Config;
use crate::error::ApiError;
use crate::ids::ConnectionId;
use crate::proto::zoomintegration::v1::setup_links_service_server::SetupLinksService;
use crate::proto::zoomintegration::v1::{CreateRequest, CreateResponse};
use crate::setup::form::check_origin;
use crate::setup::links::SetupLinks;

/// The SetupLinksService of this process.
pub struct SetupLinksApi {
    links: Arc<SetupLinks>,
    config: Arc<Config>,
}

impl SetupLinksApi {
    /// Links signed with this process's key, pointing at its public address.
    pub fn new(state: &AppState) -> Self {
        Self {
            links: state.links.clone(),
            config: state.config.clone(),
        }
    }
}

#[tonic::async_trait]
impl SetupLinksService for SetupLinksApi {
    async fn create(
        &self,
        request: Request<CreateRequest>,
    ) -> Result<Response<CreateResponse>, Status> {
        let req = request.into_inner();
        let cid = ConnectionId::parse(&req.connection_id).map_err(ApiError::from)?;
        check_origin(&req.origin).map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        let link = self.links.issue(&self.config, &cid, &req.origin);
        Ok(Response::new(CreateResponse {
            url: link.url.unwrap_or_default(),
            grant: link.grant,
            expires_at: i64::try_from(link.expires_at).unwrap_or(i64::MAX),
        }))
    }
}
