//! Benchmark of `IntegrationsService.Call` (not a test):
//! `cargo run --release -p integration-tests --bin bench-calls`.
//!
//! 1. `Call(api, GET /users/me)` through one connection from `CALLERS` concurrent gRPC callers
//!    for `SECONDS`, against a minimal local fake Zoom: calls per second, p50 and p99.
//! 2. Memory: `CONNECTIONS` connections each used once (so each has its token cached), then
//!    the process's resident memory. The process holds the service, the fake Zoom and the
//!    callers, so the figure is an upper bound for the service alone.
//!
//! Environment knobs: `CALLERS` (64), `SECONDS` (5), `CONNECTIONS` (10000).

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;

use support::{fake_zoom, rss_mib};
use tonic::transport::Channel;
use zoom_integration::config::Config;
use zoom_integration::ids::ConnectionId;
use zoom_integration::proto::autokitteh::integrations::v1::CallRequest;
use zoom_integration::proto::autokitteh::integrations::v1::integrations_service_client::IntegrationsServiceClient;
use zoom_integration::proto::autokitteh::values::v1 as pb;
use zoom_integration::proto::autokitteh::vars::v1 as vars;
use zoom_integration::proto::autokitteh::vars::v1::vars_service_client::VarsServiceClient;

const KEY: &str = "bench key material, at least 32 characters long";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn call_request(cid: &str) -> CallRequest {
    CallRequest {
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
        kwargs: HashMap::new(),
    }
}

fn connection_vars(cid: &str, expiry: &str) -> Vec<vars::Var> {
    let var = |name: &str, value: &str, is_secret: bool| vars::Var {
        scope_id: cid.into(),
        name: name.into(),
        value: value.into(),
        is_secret,
        description: String::new(),
    };
    vec![
        var("auth_type", "oauthDefault", false),
        var("oauth_access_token", &format!("access-{cid}"), true),
        var("oauth_refresh_token", &format!("refresh-{cid}"), true),
        var("oauth_expiry", expiry, false),
        var("account_id", "lAAAAAAAAAAAAA", false),
    ]
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() {
    let callers = env_or("CALLERS", 64);
    let seconds = env_or("SECONDS", 5);
    let connections = env_or("CONNECTIONS", 10_000);
    zoom_integration::zoom::init_tls();

    let zoom = fake_zoom().await;
    let dir = tempfile::tempdir().unwrap();
    let config = Config::load([
        ("DATA_DIR".to_string(), dir.path().display().to_string()),
        ("SECRET_KEY".to_string(), KEY.to_string()),
        ("ZOOM_OAUTH_URL".to_string(), zoom.clone()),
        ("ZOOM_API_URL".to_string(), format!("{zoom}/v2")),
        ("ZOOM_CLIENT_ID".to_string(), "benchClient".to_string()),
        ("ZOOM_CLIENT_SECRET".to_string(), "bench-secret".to_string()),
        ("RUST_LOG".to_string(), "warn".to_string()),
    ])
    .unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_url = format!("http://{}", grpc.local_addr().unwrap());
    tokio::spawn(zoom_integration::run(
        config,
        http,
        grpc,
        std::future::pending(),
    ));
    let channel = Channel::from_shared(grpc_url)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy();
    let expiry = (chrono::Utc::now() + chrono::Duration::hours(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);

    // 1. Throughput and latency through one connection.
    let cid = ConnectionId::generate().to_string();
    let mut vars_client = VarsServiceClient::new(channel.clone());
    let deadline = Instant::now() + Duration::from_secs(10);
    while vars_client
        .set(vars::SetRequest {
            vars: connection_vars(&cid, &expiry),
        })
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "the service did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rss_start = rss_mib();
    let stop_at = Instant::now() + Duration::from_secs(seconds);
    let failures = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let mut client = IntegrationsServiceClient::new(channel.clone());
        let (cid, failures) = (cid.clone(), failures.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < stop_at {
                let started = Instant::now();
                let answer = client.call(call_request(&cid)).await;
                latencies.push(started.elapsed());
                if !answer.is_ok_and(|a| a.into_inner().error.is_none()) {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    latencies.sort();
    let rate = latencies.len() as f64 / seconds as f64;
    println!(
        "Call(api GET /users/me), {callers} callers, {seconds} s: {rate:.0} calls/s, p50 {:.2} ms, p99 {:.2} ms, {} failed",
        percentile(&latencies, 0.50).as_secs_f64() * 1000.0,
        percentile(&latencies, 0.99).as_secs_f64() * 1000.0,
        failures.load(Ordering::Relaxed),
    );

    // 2. Memory with many connections' tokens cached.
    let ids: Vec<String> = (0..connections)
        .map(|_| ConnectionId::generate().to_string())
        .collect();
    for chunk in ids.chunks(500) {
        vars_client
            .set(vars::SetRequest {
                vars: chunk
                    .iter()
                    .flat_map(|c| connection_vars(c, &expiry))
                    .collect(),
            })
            .await
            .expect("connections are stored");
    }
    let ids = Arc::new(ids);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let mut client = IntegrationsServiceClient::new(channel.clone());
        let (ids, next, failures) = (ids.clone(), next.clone(), failures.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(cid) = ids.get(i) else { break };
                let answer = client.call(call_request(cid)).await;
                if !answer.is_ok_and(|a| a.into_inner().error.is_none()) {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    println!(
        "resident memory: {rss_start:.1} MiB after the first phase, {:.1} MiB with {connections} connections' tokens cached (service, fake Zoom and callers in one process), {} failed calls in all",
        rss_mib(),
        failures.load(Ordering::Relaxed),
    );
}
