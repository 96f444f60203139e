//! Resource bounds: past `MAX_CONCURRENT_REQUESTS` requests are answered 503 (gRPC:
//! RESOURCE_EXHAUSTED) at once, a request taking longer than `REQUEST_TIMEOUT` is answered 503
//! (neither changes stored data), and oversized headers get 431.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use zoom_integration::ids::ConnectionId;

use zoom_integration::proto::autokitteh::integrations::v1::TestConnectionRequest;

use crate::connection_setup::{app_with, redirect_back_url, snapshot};
use crate::fake_zoom::FakeZoom;
use crate::fresh_tokens::expired_connection;
use crate::helpers::{eventually, zoom_id};
use crate::user_agent::UserAgent;

#[tokio::test]
async fn past_the_concurrency_limit_requests_are_refused_at_once_not_queued() {
    let zoom = FakeZoom::start().await;
    let mut env = zoom.env();
    env.push(("MAX_CONCURRENT_REQUESTS", "2".into()));
    let app = app_with(&zoom, env).await;
    // Two requests held inside the service: OAuth redirects waiting on a slow Zoom.
    let mut held = Vec::new();
    for _ in 0..2 {
        let agent = UserAgent::new(&app.url(""));
        let cid = ConnectionId::generate().to_string();
        let back = redirect_back_url(&app, &agent, &cid).await;
        held.push((agent, back));
    }
    zoom.state.lock().unwrap().token_delay = Duration::from_secs(4);
    let mut running = Vec::new();
    for (agent, back) in held {
        running.push(tokio::spawn(async move {
            agent.get(back.as_str()).await.status
        }));
    }
    eventually("both held requests reached Zoom", || {
        zoom.state.lock().unwrap().token_arrivals == 2
    })
    .await;

    let started = Instant::now();
    let refused = app
        .get(&format!(
            "/zoom/?cid={}&origin=test",
            ConnectionId::generate()
        ))
        .await;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "refused at once, not after the held ones"
    );
    // Probes have their own small pool: a busy service is still alive and ready.
    for probe in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(app.get(probe).await.status(), StatusCode::OK, "{probe}");
    }
    // And so do Zoom's webhooks (this one is unsigned: 401, not 503).
    assert_eq!(
        app.post("/zoom/event", "{}").await.status(),
        StatusCode::UNAUTHORIZED
    );
    for task in running {
        assert_eq!(
            task.await.unwrap(),
            StatusCode::OK,
            "the held requests finish"
        );
    }
    assert_eq!(app.get("/healthz").await.status(), StatusCode::OK);
}

/// Reads until the server closes the connection; how long that took.
async fn closed_after(socket: &mut tokio::net::TcpStream) -> Duration {
    use tokio::io::AsyncReadExt;
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(8), socket.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {}
            Err(_) => panic!("the connection was left open"),
        }
    }
}

#[tokio::test]
async fn a_connection_that_sends_nothing_half_a_request_or_sits_idle_is_closed() {
    use tokio::io::AsyncWriteExt;
    let app = crate::helpers::spawn_app_with(&[("REQUEST_TIMEOUT", "2")]).await;
    let addr = app.url("").trim_start_matches("http://").to_string();
    let addr = addr.trim_end_matches('/');

    // Nothing at all; the first byte of HTTP/2's preface; half a request; then one request
    // answered and nothing more (an idle connection).
    for sent in [
        &b""[..],
        b"P",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
        socket.write_all(sent).await.unwrap();
        let waited = closed_after(&mut socket).await;
        assert!(waited >= Duration::from_millis(1500), "{waited:?}");
    }
}

#[tokio::test]
async fn readiness_probes_waiting_on_a_silent_host_do_not_make_the_service_look_dead() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let host = crate::fake_host::FakeHost::start_on(listener).await;
    let app = crate::helpers::spawn_app_with(&[("HOST_ENGINE_URL", &host.url())]).await;
    app.ready().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    // The host goes silent: its address accepts connections and never answers.
    host.stop();
    let silent = crate::helpers::listen_again(addr).await;
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let _silent = tokio::spawn({
        let accepted = accepted.clone();
        async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = silent.accept().await {
                held.push(socket);
                accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    // Until the service's channel has reconnected to the silent address (calls on the old
    // connection fail at once as it closes).
    while accepted.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "never reconnected");
        app.get("/readyz").await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut waiting = Vec::new();
    for _ in 0..16 {
        let (client, url) = (app.http_client.clone(), app.url("/readyz"));
        waiting.push(tokio::spawn(async move {
            client.get(url).send().await.unwrap().status()
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    assert_eq!(app.get("/healthz").await.status(), StatusCode::OK);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "not behind the readiness probes"
    );
    for probe in waiting {
        assert_eq!(probe.await.unwrap(), StatusCode::SERVICE_UNAVAILABLE);
    }
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "the readiness probes did wait for the host"
    );
}

#[tokio::test]
async fn past_the_concurrency_limit_grpc_calls_are_refused_at_once_not_queued() {
    let zoom = FakeZoom::start().await;
    let mut env = zoom.env();
    env.push(("MAX_CONCURRENT_REQUESTS", "1".into()));
    let app = app_with(&zoom, env).await;
    let (cid, _) = expired_connection(&app, &zoom).await;
    // One call held inside the service: a refresh whose answer takes a second to come back.
    zoom.state.lock().unwrap().refresh_answer_delay = Duration::from_secs(3);
    let integrations = app.integrations();
    let request = || TestConnectionRequest {
        integration_id: zoom_id(),
        connection_id: cid.clone(),
    };
    let held = tokio::spawn({
        let (mut integrations, request) = (integrations.clone(), request());
        async move { integrations.test_connection(request).await }
    });
    eventually("the held call's refresh reached Zoom", || {
        zoom.token_requests_of("refresh_token") == 1
    })
    .await;

    let started = Instant::now();
    let refused = integrations
        .clone()
        .test_connection(request())
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "refused at once, not queued: {:?}",
        started.elapsed()
    );
    // Health checks are never refused: a busy port must not look dead to a probe.
    app.health()
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("the health check is answered while the limit is reached");
    let held = held.await.unwrap().unwrap().into_inner();
    assert_eq!(
        held.status.unwrap().code(),
        zoom_integration::connection::StatusCode::Ok,
        "the held call finishes"
    );
    assert_eq!(zoom.token_requests_of("refresh_token"), 1);
}

#[tokio::test]
async fn a_request_past_the_timeout_is_answered_503_and_saves_nothing() {
    let zoom = FakeZoom::start().await;
    let mut env = zoom.env();
    env.push(("REQUEST_TIMEOUT", "1".into()));
    let app = app_with(&zoom, env).await;
    let agent = UserAgent::new(&app.url(""));
    let cid = ConnectionId::generate().to_string();
    let back = redirect_back_url(&app, &agent, &cid).await;
    zoom.state.lock().unwrap().token_delay = Duration::from_secs(4);
    let started = Instant::now();
    let visit = agent.get(back.as_str()).await;
    assert_eq!(visit.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // Past the moment Zoom would have answered: nothing was saved later either.
    tokio::time::sleep_until((started + Duration::from_millis(4500)).into()).await;
    assert!(snapshot(&app, &cid).await.is_empty());
}

#[tokio::test]
async fn oversized_headers_are_refused_with_431() {
    let app = crate::helpers::spawn_app().await;
    let big = "x".repeat(20 * 1024);
    let response = app
        .http_client
        .get(app.url("/healthz"))
        .header("x-padding", big)
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    let fine = app
        .http_client
        .get(app.url("/healthz"))
        .header("x-padding", "x".repeat(8 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(fine.status(), StatusCode::OK);

    // Headers that never end are refused once they pass the read buffer, without waiting
    // for the rest (hyper would otherwise buffer ~400 KiB per connection first).
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(app.http).await.unwrap();
    let head = format!(
        "GET /healthz HTTP/1.1\r\nhost: x\r\nx-padding: {}",
        "x".repeat(48 * 1024)
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut answer))
        .await
        .expect("answered at once, not after the header timeout")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
}
