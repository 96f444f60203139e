//! A fake AutoKitteh host engine: VarsService, DispatcherService and health, in memory, on
//! port 0. It is the outside world, so it records what it was sent.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic::{Request, Response, Status};
use zoom_integration::proto::autokitteh::dispatcher::v1::dispatcher_service_server::{
    DispatcherService, DispatcherServiceServer,
};
use zoom_integration::proto::autokitteh::dispatcher::v1::{
    DispatchRequest, DispatchResponse, RedispatchRequest, RedispatchResponse,
};
use zoom_integration::proto::autokitteh::events::v1::Event;
use zoom_integration::proto::autokitteh::vars::v1 as pb;
use zoom_integration::proto::autokitteh::vars::v1::vars_service_server::{
    VarsService, VarsServiceServer,
};

#[derive(Default)]
pub struct FakeHostState {
    /// (scope, name) → var.
    pub vars: BTreeMap<(String, String), pb::Var>,
    pub dispatched: Vec<Event>,
    /// The `authorization` header of every call.
    pub authorization: Vec<Option<String>>,
    pub find_requests: Vec<pb::FindActiveConnectionIDsRequest>,
    /// The scope of every Get.
    pub get_scopes: Vec<String>,
    /// While set, FindActiveConnectionIDs names only these connections, as AutoKitteh names
    /// only org-level connections and those of projects with an active deployment; Get still
    /// answers for every connection.
    pub active: Option<Vec<String>>,
    /// While set, Dispatch answers UNAVAILABLE (a host that is up but cannot take events).
    pub refuse_dispatch: bool,
    /// Every Dispatch waits this long first (a slow host).
    pub dispatch_delay: std::time::Duration,
    /// Dispatch calls begun, answered or not.
    pub dispatch_calls: usize,
    /// While set, Dispatch fails with INTERNAL (a host with a bug).
    pub fail_dispatch: bool,
    /// Connections whose variables Get answers with INTERNAL (one the host cannot read).
    pub unreadable: Vec<String>,
    /// While set, FindActiveConnectionIDs answers UNAVAILABLE.
    pub fail_find: bool,
    /// Connections the host does not know (deleted there): Set and Get answer NOT_FOUND for
    /// them, as AutoKitteh's access check does, and Dispatch to them INVALID_ARGUMENT
    /// `not_found`, as its dispatcher does.
    pub unknown: Vec<String>,
    /// How many of the next Delete calls answer UNAVAILABLE (a host briefly down).
    pub fail_deletes: u32,
    /// While set, Set answers UNAVAILABLE (a host that reads but cannot write for now).
    pub refuse_sets: bool,
    /// Set by `stop`: a connection still draining after the listener closed gets UNAVAILABLE
    /// from Dispatch and Get, as from a host that is going away, instead of quietly answering.
    pub stopped: bool,
}

#[derive(Clone)]
pub struct FakeHost {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<FakeHostState>>,
    stop: CancellationToken,
}

impl FakeHost {
    pub async fn start() -> Self {
        Self::start_on(TcpListener::bind("127.0.0.1:0").await.unwrap()).await
    }

    /// Waits up to `within` until at least `n` events were dispatched, and returns them all;
    /// fails the test, naming what was seen, if they do not come.
    pub async fn wait_for_dispatched(&self, n: usize, within: std::time::Duration) -> Vec<Event> {
        let deadline = std::time::Instant::now() + within;
        loop {
            let dispatched = self.state.lock().unwrap().dispatched.clone();
            if dispatched.len() >= n {
                return dispatched;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} of {n} events dispatched within {within:?}",
                dispatched.len()
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    pub async fn start_on(listener: TcpListener) -> Self {
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(FakeHostState::default()));
        let stop = CancellationToken::new();
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        let svc = Svc(state.clone());
        tokio::spawn(
            Server::builder()
                .add_service(health)
                .add_service(VarsServiceServer::new(svc.clone()))
                .add_service(DispatcherServiceServer::new(svc))
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener),
                    stop.clone().cancelled_owned(),
                ),
        );
        Self { addr, state, stop }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn stop(&self) {
        self.state.lock().unwrap().stopped = true;
        self.stop.cancel();
    }

    pub fn put(&self, var: pb::Var) {
        self.state
            .lock()
            .unwrap()
            .vars
            .insert((var.scope_id.clone(), var.name.clone()), var);
    }
}

#[derive(Clone)]
struct Svc(Arc<Mutex<FakeHostState>>);

impl Svc {
    fn record<T>(&self, request: &Request<T>) {
        let auth = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        self.0.lock().unwrap().authorization.push(auth);
    }
}

#[tonic::async_trait]
impl VarsService for Svc {
    async fn set(
        &self,
        request: Request<pb::SetRequest>,
    ) -> Result<Response<pb::SetResponse>, Status> {
        self.record(&request);
        let mut state = self.0.lock().unwrap();
        if state.refuse_sets {
            return Err(Status::unavailable("the fake host cannot write now"));
        }
        let vars = request.into_inner().vars;
        if let Some(v) = vars.iter().find(|v| state.unknown.contains(&v.scope_id)) {
            return Err(Status::not_found(format!(
                "connection {} not found",
                v.scope_id
            )));
        }
        for v in vars {
            state.vars.insert((v.scope_id.clone(), v.name.clone()), v);
        }
        Ok(Response::new(pb::SetResponse {}))
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        self.record(&request);
        let req = request.into_inner();
        if req.scope_id.is_empty() {
            return Err(Status::invalid_argument(
                "scope_id: value length must be at least 1",
            ));
        }
        let mut state = self.0.lock().unwrap();
        state.get_scopes.push(req.scope_id.clone());
        if state.stopped {
            return Err(Status::unavailable("the fake host is going away"));
        }
        if state.unknown.contains(&req.scope_id) {
            return Err(Status::not_found(format!(
                "connection {} not found",
                req.scope_id
            )));
        }
        if state.unreadable.contains(&req.scope_id) {
            return Err(Status::internal(
                "the fake host cannot read this connection",
            ));
        }
        let vars = state
            .vars
            .values()
            .filter(|v| v.scope_id == req.scope_id)
            .filter(|v| req.names.is_empty() || req.names.contains(&v.name))
            .cloned()
            .collect();
        Ok(Response::new(pb::GetResponse { vars }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        self.record(&request);
        let req = request.into_inner();
        let mut state = self.0.lock().unwrap();
        if state.fail_deletes > 0 {
            state.fail_deletes -= 1;
            return Err(Status::unavailable("the fake host cannot delete now"));
        }
        state.vars.retain(|(scope, name), _| {
            !(scope == &req.scope_id && (req.names.is_empty() || req.names.contains(name)))
        });
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn find_active_connection_i_ds(
        &self,
        request: Request<pb::FindActiveConnectionIDsRequest>,
    ) -> Result<Response<pb::FindActiveConnectionIDsResponse>, Status> {
        self.record(&request);
        let req = request.into_inner();
        let mut state = self.0.lock().unwrap();
        if state.fail_find {
            return Err(Status::unavailable(
                "the fake host cannot list connections now",
            ));
        }
        state.find_requests.push(req.clone());
        let mut ids: Vec<String> = state
            .vars
            .values()
            .filter(|v| req.name.is_empty() || v.name == req.name)
            .filter(|v| req.value.is_empty() || v.value == req.value)
            .map(|v| v.scope_id.clone())
            .filter(|id| {
                state
                    .active
                    .as_ref()
                    .is_none_or(|active| active.contains(id))
            })
            .collect();
        ids.dedup();
        Ok(Response::new(pb::FindActiveConnectionIDsResponse {
            connection_ids: ids,
        }))
    }
}

#[tonic::async_trait]
impl DispatcherService for Svc {
    async fn dispatch(
        &self,
        request: Request<DispatchRequest>,
    ) -> Result<Response<DispatchResponse>, Status> {
        self.record(&request);
        let event = request.into_inner().event.ok_or_else(|| {
            Status::invalid_argument("validation error:\n - event: value is required")
        })?;
        if !event.event_id.is_empty() {
            return Err(Status::invalid_argument(
                "validation error:\n - event_id: event_id must not be specified",
            ));
        }
        let delay = {
            let mut state = self.0.lock().unwrap();
            state.dispatch_calls += 1;
            state.dispatch_delay
        };
        tokio::time::sleep(delay).await;
        let mut state = self.0.lock().unwrap();
        if state.fail_dispatch {
            return Err(Status::internal("the fake host failed"));
        }
        if state.refuse_dispatch || state.stopped {
            return Err(Status::unavailable("the fake host refuses events for now"));
        }
        if state.unknown.contains(&event.destination_id) {
            // AutoKitteh's dispatcher returns its database's ErrNotFound as it is, and its
            // gRPC service answers every dispatcher failure as INVALID_ARGUMENT.
            return Err(Status::invalid_argument("not_found"));
        }
        state.dispatched.push(event);
        Ok(Response::new(DispatchResponse {
            event_id: format!("evt_fake{}", state.dispatched.len()),
            ..Default::default()
        }))
    }

    async fn redispatch(
        &self,
        _request: Request<RedispatchRequest>,
    ) -> Result<Response<RedispatchResponse>, Status> {
        Err(Status::unimplemented("the fake host does not redispatch"))
    }
}
