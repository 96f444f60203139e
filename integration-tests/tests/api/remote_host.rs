//! The service pointed at a remote host engine (a fake AutoKitteh host on port 0).

use std::time::{Duration, Instant};

use tonic::Code;
use zoom_integration::config::Config;
use zoom_integration::connection::StatusCode;
use zoom_integration::host::remote::RemoteHost;
use zoom_integration::host::{HostEngine, HostError, Var};
use zoom_integration::ids::ConnectionId;
use zoom_integration::proto::autokitteh::events::v1::Event;
use zoom_integration::proto::autokitteh::integrations::v1::*;
use zoom_integration::proto::autokitteh::vars::v1 as vars;

use crate::fake_host::FakeHost;
use crate::helpers::{spawn_app_with, var, zoom_id};

#[tokio::test]
async fn integrations_api_reads_connections_from_the_remote_host() {
    let host = FakeHost::start().await;
    let cid = ConnectionId::generate().to_string();
    host.put(var(&cid, "auth_type", "serverToServer", false));
    host.put(var(&cid, "private_account_id", "acc-42", false));
    host.put(var(&cid, "private_client_secret", "remote-secret", true));

    let app = spawn_app_with(&[
        ("HOST_ENGINE_URL", &host.url()),
        ("HOST_ENGINE_TOKEN", "ak-token-1"),
    ])
    .await;
    let mut client = app.integrations();

    let integration = app
        .integration(GetRequest {
            name: "zoom".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(integration.integration_id, zoom_id());
    let listed = client
        .list(ListRequest::default())
        .await
        .unwrap()
        .into_inner()
        .integrations;
    assert_eq!(listed, vec![integration]);

    let status = app.connection_status(&cid).await.unwrap();
    assert_eq!(status.code(), StatusCode::Ok);

    let unknown = app
        .connection_status(&ConnectionId::generate().to_string())
        .await
        .unwrap();
    assert_eq!(unknown.code(), StatusCode::InitRequired);

    let config = app.connection_config(&cid).await.unwrap();
    assert_eq!(config.len(), 2);
    assert_eq!(config["private_account_id"], "acc-42");

    let malformed = app.connection_status("con_1").await.unwrap_err();
    assert_eq!(malformed.code(), Code::InvalidArgument);

    let state = host.state.lock().unwrap();
    assert!(!state.authorization.is_empty());
    assert!(
        state
            .authorization
            .iter()
            .all(|a| a.as_deref() == Some("Bearer ak-token-1"))
    );
}

#[tokio::test]
async fn the_embedded_host_services_are_not_served_with_a_remote_host() {
    let host = FakeHost::start().await;
    let app = spawn_app_with(&[("HOST_ENGINE_URL", &host.url())]).await;
    let err = app
        .vars()
        .get(vars::GetRequest {
            scope_id: ConnectionId::generate().to_string(),
            names: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    // Paths nothing serves share one metrics label: callers cannot add series at will.
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(
            r#"grpc_request_duration_seconds_count{code="Unimplemented",method="unknown"} 1"#
        ),
        "{metrics}"
    );
    assert!(!metrics.contains("autokitteh.vars.v1.VarsService/Get"));
}

#[tokio::test]
async fn not_ready_until_webhook_routing_is_loaded() {
    let host = FakeHost::start().await;
    host.state.lock().unwrap().fail_find = true;
    let app = spawn_app_with(&[("HOST_ENGINE_URL", &host.url())]).await;
    // The host answers, but the connections cannot be listed: webhooks would get 503.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let answer = app.get("/readyz").await;
    assert_eq!(answer.status(), 503);
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(body["error"], "webhook routing not loaded yet");
    host.state.lock().unwrap().fail_find = false;
    app.ready().await;
}

#[tokio::test]
async fn readiness_follows_the_remote_host() {
    let host = FakeHost::start().await;
    let app = spawn_app_with(&[("HOST_ENGINE_URL", &host.url())]).await;
    assert_eq!(app.ready().await["host"], "remote");

    host.stop();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = app.get("/readyz").await.status();
        if status == 503 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still ready after the host stopped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        app.get("/healthz").await.status(),
        200,
        "alive while the host is down"
    );
}

#[tokio::test]
async fn an_unreachable_host_gives_unavailable_quickly() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let app = spawn_app_with(&[("HOST_ENGINE_URL", &format!("http://127.0.0.1:{port}"))]).await;
    let started = Instant::now();
    let err = app
        .connection_status(&ConnectionId::generate().to_string())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        !err.message().contains(&port.to_string()),
        "no internals: {}",
        err.message()
    );
    assert!(started.elapsed() < Duration::from_secs(6));
    assert_eq!(app.get("/readyz").await.status(), 503);
}

#[tokio::test]
async fn the_remote_client_sets_gets_deletes_finds_and_dispatches() {
    let host = FakeHost::start().await;
    let config = Config::load(vec![("HOST_ENGINE_URL".into(), host.url())]).unwrap();
    let remote = RemoteHost::new(config.host_engine_url.as_ref().unwrap(), None).unwrap();
    let cid = ConnectionId::generate();

    remote
        .set_vars(
            &cid,
            vec![
                Var::plain("account_id", "acc-7"),
                Var::secret("oauth_refresh_token", "r-1"),
            ],
        )
        .await
        .unwrap();
    let stored = remote.get_vars(&cid, &[]).await.unwrap();
    assert_eq!(stored.len(), 2);
    assert!(
        stored
            .iter()
            .any(|v| v.name == "oauth_refresh_token" && v.is_secret && v.value == "r-1")
    );

    assert_eq!(
        remote
            .find_connections("account_id", "acc-7")
            .await
            .unwrap(),
        vec![cid.clone()]
    );
    assert_eq!(
        host.state.lock().unwrap().find_requests[0].integration_id,
        zoom_id()
    );

    remote
        .delete_vars(&cid, &["oauth_refresh_token".into()])
        .await
        .unwrap();
    assert_eq!(remote.get_vars(&cid, &[]).await.unwrap().len(), 1);

    let event_id = remote
        .dispatch(Event {
            destination_id: cid.to_string(),
            event_type: "meeting.started".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(event_id, "evt_fake1");
    {
        let state = host.state.lock().unwrap();
        assert_eq!(state.dispatched[0].destination_id, cid.to_string());
        assert!(
            state.authorization.iter().all(Option::is_none),
            "no token configured, none sent"
        );
    }

    remote.check().await.unwrap();
    let bad = remote
        .set_vars(&cid, vec![Var::plain("no spaces allowed", "x")])
        .await;
    assert!(bad.is_err());
}

#[tokio::test]
async fn the_service_reconnects_when_the_host_comes_back() {
    let host = FakeHost::start().await;
    let addr = host.addr;
    let cid = ConnectionId::generate().to_string();
    host.put(var(&cid, "auth_type", "serverToServer", false));
    let app = spawn_app_with(&[("HOST_ENGINE_URL", &host.url())]).await;
    let status = async || app.connection_status(&cid).await.map(|s| s.code());
    assert_eq!(status().await.unwrap(), StatusCode::Ok);

    host.stop();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match status().await {
            Err(e) if e.code() == Code::Unavailable => break,
            _ => assert!(
                Instant::now() < deadline,
                "calls still succeed with the host down"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The host comes back on the same address, with its data.
    let back = FakeHost::start_on(crate::helpers::listen_again(addr).await).await;
    back.put(var(&cid, "auth_type", "serverToServer", false));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(code) = status().await {
            assert_eq!(code, StatusCode::Ok);
            break;
        }
        assert!(Instant::now() < deadline, "no reconnect within 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_dispatch_to_a_connection_the_host_does_not_have_is_not_found_not_a_host_failure() {
    let host = FakeHost::start().await;
    let config = Config::load(vec![("HOST_ENGINE_URL".into(), host.url())]).unwrap();
    let remote = RemoteHost::new(config.host_engine_url.as_ref().unwrap(), None).unwrap();
    let cid = ConnectionId::generate();
    host.state.lock().unwrap().unknown.push(cid.to_string());
    let refused = remote
        .dispatch(Event {
            destination_id: cid.to_string(),
            event_type: "meeting.started".into(),
            ..Default::default()
        })
        .await;
    // NotFound is what the forwarder takes as the event being at fault (a dead letter after
    // `max_attempts`), not as the host failing (retried for an hour).
    assert!(
        matches!(refused, Err(HostError::NotFound(_))),
        "{refused:?}"
    );
    assert!(host.state.lock().unwrap().dispatched.is_empty());
}
