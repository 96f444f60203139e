//! `spawn_app()`: the whole service on port 0, with clients for every API.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use zoom_integration::config::Config;
use zoom_integration::connection::Status;
use zoom_integration::proto::autokitteh::events::v1::events_service_client::EventsServiceClient;
use zoom_integration::proto::autokitteh::integrations::v1::integrations_service_client::IntegrationsServiceClient;
use zoom_integration::proto::autokitteh::integrations::v1::{
    GetConnectionConfigRequest, GetConnectionStatusRequest, GetRequest, Integration,
};
use zoom_integration::proto::autokitteh::vars::v1 as vars;
use zoom_integration::proto::autokitteh::vars::v1::vars_service_client::VarsServiceClient;

/// Key material used by test apps (tests that check key handling set their own).
pub const TEST_SECRET_KEY: &str = "integration-test key material, not for production";

/// A running service.
pub struct TestApp {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    _owned_dir: Option<TempDir>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    channel: Channel,
    pub http_client: reqwest::Client,
}

/// The service with the embedded host in a fresh data directory.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

/// The service with extra configuration variables, in a fresh data directory.
pub async fn spawn_app_with(env: &[(&str, &str)]) -> TestApp {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut app = spawn_app_in(dir.path(), env).await;
    app._owned_dir = Some(dir);
    app
}

/// The service on an existing data directory (to test restarts).
pub async fn spawn_app_in(data_dir: &Path, env: &[(&str, &str)]) -> TestApp {
    spawn_app_configured(data_dir, env, |_| {}).await
}

/// [`spawn_app_in`], with `configure` applied to the configuration loaded from `env` (for
/// settings that are not variables, such as how often routing reloads).
pub async fn spawn_app_configured(
    data_dir: &Path,
    env: &[(&str, &str)],
    configure: impl FnOnce(&mut Config),
) -> TestApp {
    zoom_integration::zoom::init_tls();
    // As the binary does at start: tests with a thousand connections in flight, all in this
    // one process, must not meet a soft limit of 1,024 open files.
    static RAISED: std::sync::Once = std::sync::Once::new();
    RAISED.call_once(zoom_integration::http::server::raise_open_files_limit);
    let http_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (http, grpc) = (
        http_listener.local_addr().unwrap(),
        grpc_listener.local_addr().unwrap(),
    );
    // The public address is the listener itself, so OAuth redirects come back here.
    let mut pairs: Vec<(String, String)> = vec![
        ("DATA_DIR".into(), data_dir.display().to_string()),
        ("SECRET_KEY".into(), TEST_SECRET_KEY.into()),
        ("WEBHOOK_ADDRESS".into(), http.to_string()),
        ("WEBHOOK_SCHEME".into(), "http".into()),
        // Tests are this machine's clients; signed-link tests set SETUP_ACCESS=signed.
        ("SETUP_ACCESS".into(), "loopback".into()),
    ];
    pairs.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let mut config = Config::load(pairs).expect("test configuration is valid");
    configure(&mut config);
    zoom_integration::telemetry::init(config.log_format, "warn");
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(zoom_integration::run(
        config,
        http_listener,
        grpc_listener,
        async move {
            let _ = stopped.await;
        },
    ));
    let channel = Channel::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(20))
        .connect_lazy();
    TestApp {
        http,
        grpc,
        _owned_dir: None,
        stop: Some(stop),
        task: Some(task),
        channel,
        http_client: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap(),
    }
}

impl TestApp {
    /// The gRPC channel to the service.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    pub fn integrations(&self) -> IntegrationsServiceClient<Channel> {
        IntegrationsServiceClient::new(self.channel.clone())
    }

    pub fn vars(&self) -> VarsServiceClient<Channel> {
        VarsServiceClient::new(self.channel.clone())
    }

    pub fn events(&self) -> EventsServiceClient<Channel> {
        EventsServiceClient::new(self.channel.clone())
    }

    pub fn health(&self) -> tonic_health::pb::health_client::HealthClient<Channel> {
        tonic_health::pb::health_client::HealthClient::new(self.channel.clone())
    }

    /// What `grpc.health.v1.Health/Check` says of `service`.
    pub async fn grpc_health(&self, service: &str) -> ServingStatus {
        grpc_health(self.channel.clone(), service).await
    }

    /// `IntegrationsService.Get`, which must succeed.
    pub async fn integration(&self, request: GetRequest) -> Integration {
        self.integrations()
            .get(request)
            .await
            .expect("Get succeeds")
            .into_inner()
            .integration
            .expect("Get returns the integration")
    }

    /// `IntegrationsService.GetConnectionStatus` of the zoom integration.
    pub async fn connection_status(&self, connection_id: &str) -> Result<Status, tonic::Status> {
        let response = self
            .integrations()
            .get_connection_status(GetConnectionStatusRequest {
                integration_id: zoom_id(),
                connection_id: connection_id.into(),
            })
            .await?;
        Ok(response.into_inner().status.expect("a status"))
    }

    /// `IntegrationsService.GetConnectionConfig` of the zoom integration.
    pub async fn connection_config(
        &self,
        connection_id: &str,
    ) -> Result<HashMap<String, String>, tonic::Status> {
        let response = self
            .integrations()
            .get_connection_config(GetConnectionConfigRequest {
                integration_id: zoom_id(),
                connection_id: connection_id.into(),
            })
            .await?;
        Ok(response.into_inner().config)
    }

    /// The embedded host's variables of a connection (`VarsService.Get`, which must succeed).
    pub async fn stored_vars(&self, connection_id: &str, names: &[&str]) -> Vec<vars::Var> {
        self.vars()
            .get(vars::GetRequest {
                scope_id: connection_id.into(),
                names: names.iter().map(|n| n.to_string()).collect(),
            })
            .await
            .expect("VarsService.Get succeeds")
            .into_inner()
            .vars
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http_client.get(self.url(path)).send().await.unwrap()
    }

    pub async fn post(&self, path: &str, body: &'static str) -> reqwest::Response {
        self.http_client
            .post(self.url(path))
            .body(body)
            .send()
            .await
            .unwrap()
    }

    /// `GET /readyz` once it answers 200 (within 10 s: routing loads at start).
    pub async fn ready(&self) -> serde_json::Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let answer = self.get("/readyz").await;
            if answer.status() == 200 {
                return answer.json().await.unwrap();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never ready: {}",
                answer.text().await.unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Shuts the service down gracefully and returns how `run` ended.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.task.take().unwrap())
            .await
            .expect("service stops within 10 s")
            .expect("service task did not panic")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// What `grpc.health.v1.Health/Check` on `channel` says of `service`.
pub async fn grpc_health(channel: Channel, service: &str) -> ServingStatus {
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("Health/Check succeeds")
        .into_inner()
        .status()
}

/// A plain HTTP client for tests (reqwest needs the TLS provider installed first).
pub fn http_client() -> reqwest::Client {
    http_client_builder().build().unwrap()
}

/// A builder of [`http_client`], for tests that set timeouts or redirects.
pub fn http_client_builder() -> reqwest::ClientBuilder {
    zoom_integration::zoom::init_tls();
    reqwest::Client::builder()
}

/// The integration id hosts send.
pub fn zoom_id() -> String {
    zoom_integration::ids::INTEGRATION_ID.clone()
}

/// A `Var` message for the VarsService.
pub fn var(scope: &str, name: &str, value: &str, secret: bool) -> vars::Var {
    vars::Var {
        scope_id: scope.into(),
        name: name.into(),
        value: value.into(),
        is_secret: secret,
        description: String::new(),
    }
}

/// Corrupts the sealed value of `name` of `cid` in the embedded database under `data_dir`, as
/// a disk fault would: it no longer decrypts.
pub fn corrupt_stored_secret(data_dir: &Path, cid: &str, name: &str) {
    let db = rusqlite::Connection::open(data_dir.join("zoom-integration.db")).unwrap();
    db.busy_timeout(Duration::from_secs(5)).unwrap();
    let changed = db
        .execute(
            "UPDATE vars SET value = x'00112233445566778899aabbccddeeff00112233445566778899'
             WHERE scope_id = ?1 AND name = ?2",
            [cid, name],
        )
        .unwrap();
    assert_eq!(changed, 1);
}

/// Waits until `done` holds, checking every 5 ms, for up to 20 s (however long a busy machine
/// takes); panics with `what` past that.
pub async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Listens again on `addr`, which a fake server of the test let go of (a host coming back);
/// retried for a while, as the port may linger, and failing rather than hanging the suite.
pub async fn listen_again(addr: std::net::SocketAddr) -> TcpListener {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => return listener,
            Err(e) => assert!(
                std::time::Instant::now() < deadline,
                "cannot listen on {addr} again: {e}"
            ),
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
