//! Soak run (not a test): `cargo run --release -p integration-tests --bin bench-soak`.
//!
//! The whole service in-process (embedded host, temp `DATA_DIR`) under mixed load for
//! `SOAK_SECONDS` (600): signed webhooks to `/zoom/event`, `Call(api GET /users/me)` and
//! `TestConnection` against a minimal local fake Zoom, `/healthz` and `/metrics`. Reports the
//! process's resident memory at the start, every minute and at the end, and what was done.
//! The process also holds the load and the fake Zoom, so memory is an upper bound.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tokio::net::TcpListener;

use support::{fake_zoom, rss_mib};
use tonic::transport::Channel;
use zoom_integration::config::Config;
use zoom_integration::ids::ConnectionId;
use zoom_integration::proto::autokitteh::integrations::v1::integrations_service_client::IntegrationsServiceClient;
use zoom_integration::proto::autokitteh::integrations::v1::{CallRequest, TestConnectionRequest};
use zoom_integration::proto::autokitteh::values::v1 as pb;
use zoom_integration::proto::autokitteh::vars::v1 as vars;
use zoom_integration::proto::autokitteh::vars::v1::vars_service_client::VarsServiceClient;

const KEY: &str = "soak key material, at least 32 characters long";
const SECRET: &str = "soak-zoom-secret-token";
const ACCOUNT: &str = "lAAAAAAAAAAAAA";

fn signature(ts: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("v0:{ts}:").as_bytes());
    mac.update(body);
    format!("v0={}", hex::encode(mac.finalize().into_bytes()))
}

#[derive(Default)]
struct Done {
    webhooks: AtomicU64,
    calls: AtomicU64,
    tests: AtomicU64,
    probes: AtomicU64,
    failures: AtomicU64,
}

#[tokio::main]
async fn main() {
    zoom_integration::zoom::init_tls();
    let seconds: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let zoom = fake_zoom().await;
    let dir = tempfile::tempdir().unwrap();
    let config = Config::load([
        ("DATA_DIR".to_string(), dir.path().display().to_string()),
        ("SECRET_KEY".to_string(), KEY.to_string()),
        ("ZOOM_SECRET_TOKEN".to_string(), SECRET.to_string()),
        ("ZOOM_OAUTH_URL".to_string(), zoom.clone()),
        ("ZOOM_API_URL".to_string(), format!("{zoom}/v2")),
        ("ZOOM_CLIENT_ID".to_string(), "soakClient".to_string()),
        ("ZOOM_CLIENT_SECRET".to_string(), "soak-secret".to_string()),
    ])
    .unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", http.local_addr().unwrap());
    let channel = Channel::from_shared(format!("http://{}", grpc.local_addr().unwrap()))
        .unwrap()
        .connect_lazy();
    tokio::spawn(zoom_integration::run(
        config,
        http,
        grpc,
        std::future::pending(),
    ));

    let cid = ConnectionId::generate().to_string();
    let expiry = (chrono::Utc::now() + chrono::Duration::days(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let var = |name: &str, value: &str, is_secret: bool| vars::Var {
        scope_id: cid.clone(),
        name: name.into(),
        value: value.into(),
        is_secret,
        description: String::new(),
    };
    let mut vars_client = VarsServiceClient::new(channel.clone());
    let deadline = Instant::now() + Duration::from_secs(10);
    while vars_client
        .set(vars::SetRequest {
            vars: vec![
                var("auth_type", "oauthDefault", false),
                var("oauth_access_token", "soak-access", true),
                var("oauth_refresh_token", "soak-refresh", true),
                var("oauth_expiry", &expiry, false),
                var("account_id", ACCOUNT, false),
            ],
        })
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "the service did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let done = Arc::new(Done::default());
    let stop_at = Instant::now() + Duration::from_secs(seconds);
    let start_rss = rss_mib();
    println!("bench-soak: {seconds} s of mixed load; resident memory at start {start_rss:.1} MiB");
    let mut tasks = Vec::new();
    // Webhooks: 8 senders, paced, distinct bodies.
    for worker in 0..8u64 {
        let (done, url) = (done.clone(), format!("{base}/zoom/event"));
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut n = 0u64;
            while Instant::now() < stop_at {
                n += 1;
                let body = format!(
                    r#"{{"event":"meeting.started","event_ts":{},"payload":{{"account_id":"{ACCOUNT}","object":{{"id":"{worker}-{n}","topic":"Grüße"}}}}}}"#,
                    n * 8 + worker
                );
                let ts = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap()
                    .as_secs()
                    .to_string();
                let ok = client
                    .post(&url)
                    .header("x-zm-request-timestamp", &ts)
                    .header("x-zm-signature", signature(&ts, body.as_bytes()))
                    .body(body)
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200);
                let counter = if ok { &done.webhooks } else { &done.failures };
                counter.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    // Calls and connection tests: 8 callers.
    for worker in 0..8u64 {
        let (done, cid) = (done.clone(), cid.clone());
        let mut client = IntegrationsServiceClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < stop_at {
                if worker == 0 {
                    let ok = client
                        .test_connection(TestConnectionRequest {
                            integration_id: "zoom".into(),
                            connection_id: cid.clone(),
                        })
                        .await
                        .is_ok();
                    let counter = if ok { &done.tests } else { &done.failures };
                    counter.fetch_add(1, Ordering::Relaxed);
                } else {
                    let ok = client
                        .call(CallRequest {
                            integration_id: "zoom".into(),
                            function: Some(pb::Value {
                                function: Some(pb::Function {
                                    name: "api".into(),
                                    data: cid.as_bytes().to_vec(),
                                    ..Default::default()
                                }),
                                ..Default::default()
                            }),
                            args: vec![
                                zoom_integration::values::string("GET"),
                                zoom_integration::values::string("/users/me"),
                            ],
                            ..Default::default()
                        })
                        .await
                        .is_ok_and(|r| r.into_inner().error.is_none());
                    let counter = if ok { &done.calls } else { &done.failures };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    // Probes: health and metrics, as a monitoring system would.
    {
        let (done, base) = (done.clone(), base.clone());
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            while Instant::now() < stop_at {
                for path in ["/healthz", "/readyz", "/metrics"] {
                    let ok = client
                        .get(format!("{base}{path}"))
                        .send()
                        .await
                        .is_ok_and(|r| r.status() == 200);
                    let counter = if ok { &done.probes } else { &done.failures };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    let started = Instant::now();
    while Instant::now() < stop_at {
        tokio::time::sleep(Duration::from_secs(60).min(stop_at - Instant::now())).await;
        println!(
            "  {:>4} s: {:.1} MiB resident, {} webhooks, {} calls, {} tests, {} probes, {} failed",
            started.elapsed().as_secs(),
            rss_mib(),
            done.webhooks.load(Ordering::Relaxed),
            done.calls.load(Ordering::Relaxed),
            done.tests.load(Ordering::Relaxed),
            done.probes.load(Ordering::Relaxed),
            done.failures.load(Ordering::Relaxed),
        );
    }
    for task in tasks {
        task.await.unwrap();
    }
    println!(
        "bench-soak: resident memory {start_rss:.1} MiB at start, {:.1} MiB at the end",
        rss_mib()
    );
}
