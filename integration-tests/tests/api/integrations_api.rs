//! IntegrationsService and health over gRPC, on the embedded host.

use std::time::Duration;

use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use zoom_integration::connection::StatusCode;
use zoom_integration::ids::ConnectionId;
use zoom_integration::proto::autokitteh::events::v1 as events;
use zoom_integration::proto::autokitteh::integrations::v1::*;
use zoom_integration::proto::autokitteh::vars::v1 as vars;

use crate::helpers::{spawn_app, spawn_app_with, var, zoom_id};

#[tokio::test]
async fn get_and_list_describe_the_zoom_integration() {
    let app = spawn_app().await;
    let mut client = app.integrations();

    let by_name = app
        .integration(GetRequest {
            name: "zoom".into(),
            ..Default::default()
        })
        .await;
    let by_id = app
        .integration(GetRequest {
            integration_id: zoom_id(),
            ..Default::default()
        })
        .await;
    assert_eq!(by_name, by_id);
    assert_eq!(by_id.integration_id, zoom_id());
    assert!(by_id.integration_id.starts_with("int_3kth00z00m"));
    assert_eq!(by_id.unique_name, "zoom");
    assert_eq!(by_id.display_name, "Zoom");
    assert!(!by_id.description.is_empty());
    assert_eq!(by_id.connection_url, app.url("/zoom/"));
    assert_eq!(by_id.logo_url, app.url("/zoom/logo.svg"));
    let caps = by_id.connection_capabilities.unwrap();
    assert!(
        caps.supports_connection_test
            && caps.supports_connection_init
            && caps.requires_connection_init
    );
    assert_eq!(
        by_id.initial_connection_status.unwrap().code(),
        StatusCode::InitRequired
    );

    for (needle, expected) in [("", 1), ("zo", 1), ("ZOOM", 1), ("slack", 0)] {
        let list = client
            .list(ListRequest {
                name_substring: needle.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .integrations;
        assert_eq!(list.len(), expected, "List({needle:?})");
    }

    let logo = app.get("/zoom/logo.svg").await;
    assert_eq!(logo.status(), 200);
    assert_eq!(logo.headers()["content-type"], "image/svg+xml");
}

async fn status_of(app: &crate::helpers::TestApp, cid: &str) -> (StatusCode, String) {
    let status = app.connection_status(cid).await.unwrap();
    (status.code(), status.message)
}

#[tokio::test]
async fn connection_status_follows_the_stored_variables() {
    let app = spawn_app_with(&[
        ("ZOOM_CLIENT_ID", "default-client"),
        ("ZOOM_CLIENT_SECRET", "default-secret"),
    ])
    .await;
    let cid = ConnectionId::generate().to_string();

    assert_eq!(status_of(&app, "").await.0, StatusCode::InitRequired);
    assert_eq!(status_of(&app, &cid).await.0, StatusCode::InitRequired);

    let set = |vs: Vec<vars::Var>| {
        let mut client = app.vars();
        async move { client.set(vars::SetRequest { vars: vs }).await.unwrap() }
    };
    set(vec![
        var(&cid, "auth_type", "oauthDefault", false),
        var(&cid, "oauth_access_token", "access-1", true),
        var(&cid, "oauth_refresh_token", "refresh-1", true),
    ])
    .await;
    let (code, message) = status_of(&app, &cid).await;
    assert_eq!(code, StatusCode::Ok);
    assert!(message.contains("default OAuth app"), "{message}");
    // Issued to another default app than the one configured: unusable here.
    set(vec![var(&cid, "oauth_client_id", "another-client", false)]).await;
    let (code, message) = status_of(&app, &cid).await;
    assert_eq!(code, StatusCode::Error);
    assert!(message.contains("another-client"), "{message}");
    // On a server with no default app at all, likewise.
    let bare = spawn_app().await;
    let mut bare_vars = bare.vars();
    bare_vars
        .set(vars::SetRequest {
            vars: vec![
                var(&cid, "auth_type", "oauthDefault", false),
                var(&cid, "oauth_refresh_token", "refresh-1", true),
            ],
        })
        .await
        .unwrap();
    let (code, message) = status_of(&bare, &cid).await;
    assert_eq!(code, StatusCode::Error);
    assert!(message.contains("no longer configured"), "{message}");

    set(vec![var(&cid, "auth_type", "serverToServer", false)]).await;
    let (code, message) = status_of(&app, &cid).await;
    assert_eq!(code, StatusCode::Ok);
    assert!(message.contains("Server-to-Server"), "{message}");

    set(vec![var(&cid, "auth_type", "carrierPigeon", false)]).await;
    assert_eq!(status_of(&app, &cid).await.0, StatusCode::Error);

    set(vec![
        var(&cid, "auth_type", "oauthPrivate", false),
        var(&cid, "connection_error", "re-authorization required", false),
    ])
    .await;
    assert_eq!(
        status_of(&app, &cid).await,
        (StatusCode::Error, "re-authorization required".into())
    );
}

#[tokio::test]
async fn connection_config_shows_only_non_secret_settings() {
    let app = spawn_app().await;
    let cid = ConnectionId::generate().to_string();
    app.vars()
        .set(vars::SetRequest {
            vars: vec![
                var(&cid, "auth_type", "oauthPrivate", false),
                var(&cid, "private_client_id", "my-client-id", false),
                var(&cid, "private_client_secret", "my-client-secret", true),
                var(&cid, "account_id", "acc-123", false),
            ],
        })
        .await
        .unwrap();

    let config = app.connection_config(&cid).await.unwrap();
    assert_eq!(config.len(), 3);
    assert_eq!(config["private_client_id"], "my-client-id");
    assert_eq!(config["account_id"], "acc-123");
    assert!(!config.contains_key("private_client_secret"));

    let configured = app
        .integrations()
        .configure(ConfigureRequest {
            integration_id: zoom_id(),
            connection_id: cid,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(configured.config, config);
    // Its values are the module's functions (calls.rs), never the connection's variables.
    assert!(configured.values.values().all(|v| v.function.is_some()));
    assert!(!configured.values.contains_key("private_client_secret"));
}

fn assert_status<T: std::fmt::Debug>(
    result: Result<tonic::Response<T>, tonic::Status>,
    code: Code,
    says: &str,
) {
    let status = result.expect_err("the request should be refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(says),
        "{:?} should mention {says:?}",
        status.message()
    );
}

#[tokio::test]
async fn malformed_requests_get_clear_grpc_errors() {
    let app = spawn_app().await;
    let mut client = app.integrations();
    let cid = ConnectionId::generate().to_string();

    assert_status(
        client.get(GetRequest::default()).await,
        Code::InvalidArgument,
        "exactly one",
    );
    assert_status(
        client
            .get(GetRequest {
                integration_id: zoom_id(),
                name: "zoom".into(),
            })
            .await,
        Code::InvalidArgument,
        "exactly one",
    );
    // Another integration is none, as AutoKitteh answers; a malformed name or id is refused.
    for other in [
        GetRequest {
            name: "slack".into(),
            ..Default::default()
        },
        GetRequest {
            integration_id: "int_3kth00s1ac0000000000000000".into(),
            ..Default::default()
        },
    ] {
        let answer = client.get(other).await.unwrap().into_inner();
        assert_eq!(answer.integration, None);
    }
    assert_status(
        client
            .get(GetRequest {
                name: "no such name!".into(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "name",
    );
    assert_status(
        client
            .get(GetRequest {
                integration_id: "zoom".into(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "integration_id",
    );
    assert_status(
        client
            .get_connection_status(GetConnectionStatusRequest {
                integration_id: String::new(),
                connection_id: cid.clone(),
            })
            .await,
        Code::InvalidArgument,
        "integration_id is required",
    );
    assert_status(
        client
            .get_connection_status(GetConnectionStatusRequest {
                integration_id: "int_3kth00slackaf9d33c5697341f0".into(),
                connection_id: cid.clone(),
            })
            .await,
        Code::NotFound,
        "unknown integration",
    );
    assert_status(
        client
            .get_connection_status(GetConnectionStatusRequest {
                integration_id: zoom_id(),
                connection_id: "con_../../etc/passwd".into(),
            })
            .await,
        Code::InvalidArgument,
        "connection_id",
    );
    assert_status(
        client
            .get_connection_config(GetConnectionConfigRequest {
                integration_id: zoom_id(),
                connection_id: String::new(),
            })
            .await,
        Code::InvalidArgument,
        "connection_id is required",
    );
    assert_status(
        client
            .configure(ConfigureRequest {
                integration_id: "github".into(),
                connection_id: cid.clone(),
            })
            .await,
        Code::NotFound,
        "github",
    );

    let mut vars_client = app.vars();
    assert_status(
        vars_client
            .set(vars::SetRequest {
                vars: vec![var("prj_x", "auth_type", "x", false)],
            })
            .await,
        Code::InvalidArgument,
        "connection_id",
    );
    // One bad variable, even of another connection: nothing of the request is written.
    assert_status(
        vars_client
            .set(vars::SetRequest {
                vars: vec![
                    var(&cid, "auth_type", "oauthDefault", false),
                    var(
                        &ConnectionId::generate().to_string(),
                        "bad name",
                        "x",
                        false,
                    ),
                ],
            })
            .await,
        Code::InvalidArgument,
        "bad name",
    );
    let stored = app.stored_vars(&cid, &[]).await;
    assert!(stored.is_empty(), "{stored:?}");
    assert_status(
        vars_client
            .find_active_connection_i_ds(vars::FindActiveConnectionIDsRequest::default())
            .await,
        Code::InvalidArgument,
        "integration_id",
    );

    let mut events_client = app.events();
    assert_status(
        events_client.get(events::GetRequest::default()).await,
        Code::InvalidArgument,
        "event_id is required",
    );
    assert_status(
        events_client
            .get(events::GetRequest {
                event_id: "evt_01jf3xabcdefghjkmnpqrstvwx".into(),
                json_values: false,
            })
            .await,
        Code::NotFound,
        "no event",
    );
    assert_status(
        events_client
            .get(events::GetRequest {
                event_id: "evt_../../etc".into(),
                json_values: false,
            })
            .await,
        Code::InvalidArgument,
        "malformed",
    );
    assert_status(
        events_client
            .list(events::ListRequest {
                order: "sideways".into(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "ASC or DESC",
    );
}

#[tokio::test]
async fn on_shutdown_grpc_health_reports_every_service_not_serving() {
    let app = spawn_app().await;
    let mut watches = Vec::new();
    for service in [
        "",
        "autokitteh.integrations.v1.IntegrationsService",
        "autokitteh.vars.v1.VarsService",
        "autokitteh.events.v1.EventsService",
    ] {
        let mut watch = app
            .health()
            .watch(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        let first = watch.message().await.unwrap().unwrap();
        assert_eq!(first.status(), ServingStatus::Serving, "{service:?}");
        watches.push((service, watch));
    }
    // The watches stay open: the shutdown ends them, and does not wait for them to go.
    let started = std::time::Instant::now();
    let stopped = tokio::spawn(app.stop());
    for (service, watch) in &mut watches {
        let next = tokio::time::timeout(Duration::from_secs(5), watch.message())
            .await
            .expect("a status change before the streams close");
        // A closed stream would mean no one was told: the status must come first.
        let next = next.unwrap().expect("a status, not the end of the stream");
        assert_eq!(next.status(), ServingStatus::NotServing, "{service:?}");
        let end = tokio::time::timeout(Duration::from_secs(5), watch.message())
            .await
            .expect("the stream ends");
        assert!(matches!(end, Ok(None)), "{service:?}: {end:?}");
    }
    stopped.await.unwrap().unwrap();
    // SHUTDOWN_TIMEOUT is 25 s.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    drop(watches);
}

#[tokio::test]
async fn grpc_and_http_health_report_serving() {
    let app = spawn_app().await;
    for service in [
        "",
        "autokitteh.integrations.v1.IntegrationsService",
        "autokitteh.vars.v1.VarsService",
    ] {
        assert_eq!(
            app.grpc_health(service).await,
            tonic_health::pb::health_check_response::ServingStatus::Serving,
            "{service:?}"
        );
    }
    let healthz = app.get("/healthz").await;
    assert_eq!(healthz.status(), 200);
    assert_eq!(app.ready().await["host"], "embedded");
}

#[tokio::test]
async fn a_call_still_running_cannot_hold_shutdown_past_the_timeout() {
    let zoom = crate::fake_zoom::FakeZoom::start().await;
    let mut env = zoom.env();
    env.push(("SHUTDOWN_TIMEOUT", "1".into()));
    let app = crate::connection_setup::app_with(&zoom, env).await;
    let cid = crate::calls::connected(&app, &zoom).await;
    // A call Zoom takes 20 s to answer.
    zoom.state.lock().unwrap().api_delay = Duration::from_secs(20);
    let held = tokio::spawn({
        let (mut client, cid) = (app.integrations(), cid.clone());
        async move {
            client
                .call(
                    zoom_integration::proto::autokitteh::integrations::v1::CallRequest {
                        integration_id: zoom_id(),
                        function: Some(crate::calls::function("get_user", &cid)),
                        ..Default::default()
                    },
                )
                .await
        }
    });
    crate::helpers::eventually("the call reached Zoom", || {
        !zoom.state.lock().unwrap().api_requests.is_empty()
    })
    .await;

    let started = std::time::Instant::now();
    app.stop().await.expect("stops cleanly");
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_secs(4), "took {took:?}");
    held.abort();
}
