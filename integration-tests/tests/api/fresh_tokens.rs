//! Fresh credentials through `IntegrationsService.TestConnection`: one refresh at a time,
//! rotated refresh tokens saved before use, `invalid_grant` ending token requests, and
//! Server-to-Server tokens cached until shortly before they expire.

use std::time::Duration;

use tonic::transport::Channel;
use zoom_integration::connection::StatusCode as ConnStatus;
use zoom_integration::ids::ConnectionId;
use zoom_integration::proto::autokitteh::integrations::v1::{CallRequest, TestConnectionRequest};
use zoom_integration::proto::autokitteh::values::v1 as pb;
use zoom_integration::proto::autokitteh::vars::v1 as vars;
use zoom_integration::proto::autokitteh::vars::v1::vars_service_client::VarsServiceClient;

use crate::connection_setup::{app_with, snapshot, value_of};
use crate::fake_zoom::*;
use crate::helpers::{TestApp, eventually, spawn_app_in, spawn_app_with, var, zoom_id};

/// A default-app connection whose access token expired an hour ago; returns its id and its
/// (live) refresh token.
pub(crate) async fn expired_connection(app: &TestApp, zoom: &FakeZoom) -> (String, String) {
    let cid = ConnectionId::generate().to_string();
    let refresh = zoom.issue_refresh_token(DEFAULT_CLIENT_ID);
    app.vars()
        .set(vars::SetRequest {
            vars: vec![
                var(&cid, "auth_type", "oauthDefault", false),
                var(&cid, "oauth_access_token", "access-long-expired", true),
                var(&cid, "oauth_refresh_token", &refresh, true),
                var(&cid, "oauth_expiry", &a_minute_ago(), false),
                var(&cid, "oauth_token_type", "bearer", false),
                var(&cid, "account_id", USER_ACCOUNT_ID, false),
            ],
        })
        .await
        .unwrap();
    (cid, refresh)
}

async fn test_connection(app: &TestApp, cid: &str) -> (ConnStatus, String) {
    let status = app
        .integrations()
        .test_connection(TestConnectionRequest {
            integration_id: zoom_id(),
            connection_id: cid.into(),
        })
        .await
        .expect("TestConnection answers")
        .into_inner()
        .status
        .expect("a status");
    (status.code(), status.message)
}

#[tokio::test]
async fn a_thousand_concurrent_calls_on_an_expired_connection_make_exactly_one_refresh() {
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    let (cid, old_refresh) = expired_connection(&app, &zoom).await;

    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..1000 {
        let mut client = app.integrations();
        let request = CallRequest {
            integration_id: zoom_id(),
            function: Some(pb::Value {
                function: Some(pb::Function {
                    name: "get_user".into(),
                    data: cid.as_bytes().to_vec(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        calls.spawn(async move { client.call(request).await });
    }
    let mut answered = 0;
    while let Some(result) = calls.join_next().await {
        let answer = result.unwrap().expect("Call answers").into_inner();
        assert!(answer.error.is_none(), "{:?}", answer.error);
        let user = zoom_integration::values::to_json(&answer.value.unwrap());
        assert_eq!(user["display_name"], USER_DISPLAY_NAME);
        answered += 1;
    }
    assert_eq!(answered, 1000);
    assert_eq!(zoom.token_requests_of("refresh_token"), 1);

    let stored = snapshot(&app, &cid).await;
    let (new_refresh, secret) = value_of(&stored, "oauth_refresh_token").unwrap();
    assert!(secret);
    assert_ne!(new_refresh, old_refresh);
    assert!(
        zoom.refresh_token_is_live(&new_refresh),
        "the stored refresh token is the new one"
    );
    assert!(!zoom.refresh_token_is_live(&old_refresh));
    let expiry = value_of(&stored, "oauth_expiry").unwrap().0;
    let expiry = chrono::DateTime::parse_from_rfc3339(&expiry).unwrap();
    assert!(expiry > chrono::Utc::now(), "{expiry}");
}

#[tokio::test]
async fn a_restart_between_refresh_and_use_loses_nothing() {
    let zoom = FakeZoom::start().await;
    let dir = tempfile::tempdir().unwrap();
    let env: Vec<(&str, String)> = zoom.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();

    let app = spawn_app_in(dir.path(), &env).await;
    let (cid, _) = expired_connection(&app, &zoom).await;
    assert_eq!(test_connection(&app, &cid).await.0, ConnStatus::Ok);
    app.stop().await.unwrap();

    let app = spawn_app_in(dir.path(), &env).await;
    let (code, message) = test_connection(&app, &cid).await;
    assert_eq!(code, ConnStatus::Ok, "{message}");
    assert_eq!(
        zoom.token_requests_of("refresh_token"),
        1,
        "the saved token is used after the restart, not refreshed again"
    );
    let stored = snapshot(&app, &cid).await;
    assert!(zoom.refresh_token_is_live(&value_of(&stored, "oauth_refresh_token").unwrap().0));
}

/// The stored refresh token of `cid`, once it is one Zoom accepts (within 5 s).
async fn live_stored_refresh_token(app: &TestApp, zoom: &FakeZoom, cid: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let stored = snapshot(app, cid).await;
        if let Some((token, _)) = value_of(&stored, "oauth_refresh_token")
            && zoom.refresh_token_is_live(&token)
        {
            return token;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no live refresh token stored: {stored:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_caller_giving_up_during_a_refresh_does_not_lose_the_rotated_refresh_token() {
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    let (cid, old_refresh) = expired_connection(&app, &zoom).await;
    // Zoom rotates the token at once, and its answer takes 500 ms to come back; the caller
    // gives up after 100 ms.
    zoom.state.lock().unwrap().refresh_answer_delay = Duration::from_millis(500);
    let mut request = tonic::Request::new(TestConnectionRequest {
        integration_id: zoom_id(),
        connection_id: cid.clone(),
    });
    request.set_timeout(Duration::from_millis(100));
    let gave_up = app
        .integrations()
        .test_connection(request)
        .await
        .unwrap_err();
    assert_eq!(gave_up.code(), tonic::Code::Cancelled, "{gave_up:?}");
    eventually("Zoom rotated it", || {
        !zoom.refresh_token_is_live(&old_refresh)
    })
    .await;

    // The refresh finished without its caller: the new token is saved.
    live_stored_refresh_token(&app, &zoom, &cid).await;
    zoom.state.lock().unwrap().refresh_answer_delay = Duration::ZERO;
    let (code, message) = test_connection(&app, &cid).await;
    assert_eq!(code, ConnStatus::Ok, "{message}");
    assert_eq!(zoom.token_requests_of("refresh_token"), 1);
}

#[tokio::test]
async fn a_refresh_answered_later_than_zoom_http_timeout_still_keeps_the_rotated_token() {
    let zoom = FakeZoom::start().await;
    let mut env = zoom.env();
    env.push(("ZOOM_HTTP_TIMEOUT", "1".into()));
    let app = app_with(&zoom, env).await;
    let (cid, old_refresh) = expired_connection(&app, &zoom).await;
    // Zoom rotates the token at once and answers after 1.5 s, past the 1 s other requests get.
    zoom.state.lock().unwrap().refresh_answer_delay = Duration::from_millis(1500);
    let (code, message) = test_connection(&app, &cid).await;
    assert_eq!(code, ConnStatus::Ok, "{message}");
    assert!(!zoom.refresh_token_is_live(&old_refresh), "Zoom rotated it");
    live_stored_refresh_token(&app, &zoom, &cid).await;
    assert_eq!(zoom.token_requests_of("refresh_token"), 1);
}

#[tokio::test]
async fn a_token_s_lifetime_counts_from_when_its_request_left_not_from_its_late_answer() {
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    let (cid, _) = expired_connection(&app, &zoom).await;
    // Zoom issues the token (expires_in 3599) and its answer takes 4 s to come back.
    zoom.state.lock().unwrap().refresh_answer_delay = Duration::from_secs(4);
    let started = chrono::Utc::now();
    let (code, message) = test_connection(&app, &cid).await;
    assert_eq!(code, ConnStatus::Ok, "{message}");
    let stored = snapshot(&app, &cid).await;
    let expiry = value_of(&stored, "oauth_expiry").unwrap().0;
    let lifetime = chrono::DateTime::parse_from_rfc3339(&expiry)
        .unwrap()
        .to_utc()
        - started;
    // Counted from the answer, it would be 3602 s or more (a busy machine may take a second
    // or two to send the request).
    assert!(lifetime.num_seconds() <= 3601, "{lifetime}");
}

#[tokio::test]
async fn a_shutdown_during_a_refresh_waits_for_the_rotated_refresh_token_to_be_saved() {
    let zoom = FakeZoom::start().await;
    let dir = tempfile::tempdir().unwrap();
    let env = zoom.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let app = crate::helpers::spawn_app_in(dir.path(), &env).await;
    let (cid, old_refresh) = expired_connection(&app, &zoom).await;
    // A refresh whose caller gave up, still waiting for Zoom's answer when the service stops.
    zoom.state.lock().unwrap().refresh_answer_delay = Duration::from_millis(800);
    let mut request = tonic::Request::new(TestConnectionRequest {
        integration_id: zoom_id(),
        connection_id: cid.clone(),
    });
    request.set_timeout(Duration::from_millis(100));
    app.integrations()
        .test_connection(request)
        .await
        .unwrap_err();
    eventually("Zoom rotated it", || {
        !zoom.refresh_token_is_live(&old_refresh)
    })
    .await;
    app.stop().await.unwrap();

    // Once stopped, the rotated token is saved: nothing was left running.
    let again = crate::helpers::spawn_app_in(dir.path(), &env).await;
    let stored = snapshot(&again, &cid).await;
    let (token, _) = value_of(&stored, "oauth_refresh_token").expect("a refresh token");
    assert!(zoom.refresh_token_is_live(&token), "the rotated one");
}

#[tokio::test]
async fn setting_a_connection_up_again_during_a_refresh_keeps_the_new_setup() {
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    let (cid, _) = expired_connection(&app, &zoom).await;
    zoom.state.lock().unwrap().refresh_answer_delay = Duration::from_millis(700);
    let refreshing = tokio::spawn({
        let (integrations, cid) = (app.integrations(), cid.clone());
        async move {
            let mut integrations = integrations;
            integrations
                .test_connection(TestConnectionRequest {
                    integration_id: zoom_id(),
                    connection_id: cid,
                })
                .await
        }
    });
    // While Zoom's answer to the refresh is on its way, the owner switches the connection to a
    // Server-to-Server app (Zoom answers that token request at once).
    eventually("a refresh under way", || {
        zoom.token_requests_of("refresh_token") == 1
    })
    .await;
    let saved = app
        .http_client
        .post(app.url("/zoom/save"))
        .form(&[
            ("cid", cid.as_str()),
            ("origin", "test"),
            ("auth_type", "serverToServer"),
            ("account_id", S2S_ACCOUNT_ID),
            ("client_id", S2S_CLIENT_ID),
            ("client_secret", S2S_CLIENT_SECRET),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(saved.status(), 200, "{}", saved.text().await.unwrap());
    refreshing.await.unwrap().unwrap();

    // The refresh that started before did not write the old app's tokens over the new setup.
    let stored = snapshot(&app, &cid).await;
    let names: Vec<&str> = stored.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "account_id",
            "auth_type",
            "private_account_id",
            "private_client_id",
            "private_client_secret"
        ]
    );
    let (code, message) = test_connection(&app, &cid).await;
    assert_eq!(code, ConnStatus::Ok, "{message}");
    assert!(message.contains("Server-to-Server"), "{message}");
}

#[tokio::test]
async fn invalid_grant_marks_the_connection_broken_and_stops_token_requests_until_set_up_again() {
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    let (cid, refresh) = expired_connection(&app, &zoom).await;
    // Someone else used the refresh token: Zoom rotated it away.
    zoom.state.lock().unwrap().token_requests.clear();
    assert!(zoom.refresh_token_is_live(&refresh));
    let other = crate::helpers::http_client()
        .post(format!("{}/oauth/token", zoom.oauth_url()))
        .basic_auth(DEFAULT_CLIENT_ID, Some(DEFAULT_CLIENT_SECRET))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", &refresh)])
        .send()
        .await
        .unwrap();
    assert!(other.status().is_success());

    let (code, message) = test_connection(&app, &cid).await;
    assert_eq!(
        (code, message.as_str()),
        (ConnStatus::Error, "re-authorization required")
    );
    for _ in 0..5 {
        assert_eq!(test_connection(&app, &cid).await.0, ConnStatus::Error);
    }
    assert_eq!(
        zoom.token_requests_of("refresh_token"),
        2,
        "the other party's refresh and ours; no retries after invalid_grant"
    );
    let status = app.connection_status(&cid).await.unwrap();
    assert_eq!(
        (status.code(), status.message.as_str()),
        (ConnStatus::Error, "re-authorization required")
    );
    let stored = snapshot(&app, &cid).await;
    assert!(
        value_of(&stored, "oauth_refresh_token").is_none(),
        "the dead token is dropped"
    );

    // Set up again through the connection page: working again.
    let agent = crate::user_agent::UserAgent::new(&app.url(""));
    let consent = agent
        .get(&app.url(&format!("/oauth/start/zoom?cid={cid}")))
        .await;
    let done = agent.get(consent.link("allow").as_str()).await;
    assert_eq!(done.status, 200, "{}", done.body);
    assert_eq!(test_connection(&app, &cid).await.0, ConnStatus::Ok);
    assert_eq!(
        app.connection_status(&cid).await.unwrap().code(),
        ConnStatus::Ok
    );
}

/// What another process on the same host engine does with `refresh`: refreshes it at Zoom
/// (rotating it); Zoom's answer.
async fn refresh_elsewhere(zoom: &FakeZoom, refresh: &str) -> serde_json::Value {
    crate::helpers::http_client()
        .post(format!("{}/oauth/token", zoom.oauth_url()))
        .basic_auth(DEFAULT_CLIENT_ID, Some(DEFAULT_CLIENT_SECRET))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", refresh)])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Saves the pair of Zoom's `answer` as `cid`'s tokens, as the process that got it does.
async fn save_pair(
    mut vars_client: VarsServiceClient<Channel>,
    cid: &str,
    answer: &serde_json::Value,
) {
    let token = |name: &str| answer[name].as_str().unwrap().to_string();
    vars_client
        .set(vars::SetRequest {
            vars: vec![
                var(cid, "oauth_access_token", &token("access_token"), true),
                var(cid, "oauth_refresh_token", &token("refresh_token"), true),
            ],
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn a_refresh_token_rotated_by_another_process_that_saves_it_late_does_not_break_the_connection()
 {
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    let (cid, refresh) = expired_connection(&app, &zoom).await;
    // Another process on the same host engine has rotated the token at Zoom; its save of the
    // new pair reaches the host a little after ours was refused (a slow host, a retry).
    let other = refresh_elsewhere(&zoom, &refresh).await;
    let late_save = tokio::spawn({
        let (vars_client, cid) = (app.vars(), cid.clone());
        async move {
            tokio::time::sleep(Duration::from_millis(700)).await;
            save_pair(vars_client, &cid, &other).await;
        }
    });
    let (status, message) = test_connection(&app, &cid).await;
    late_save.await.unwrap();
    assert_eq!(status, ConnStatus::Ok, "{message}");
    assert_eq!(
        app.connection_status(&cid).await.unwrap().code(),
        ConnStatus::Ok
    );
    let stored = snapshot(&app, &cid).await;
    assert!(zoom.refresh_token_is_live(&value_of(&stored, "oauth_refresh_token").unwrap().0));
}

#[tokio::test]
async fn a_refresh_token_rotated_and_saved_by_another_process_meanwhile_does_not_break_the_connection()
 {
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    let (cid, refresh) = expired_connection(&app, &zoom).await;
    // Our refresh reaches Zoom and waits there; meanwhile another process on the same host
    // engine (a rolling deploy) refreshes with the same token and saves the new pair.
    zoom.state.lock().unwrap().token_delay = Duration::from_millis(1500);
    let ours = tokio::spawn({
        let (integrations, cid) = (app.integrations(), cid.clone());
        async move {
            integrations
                .clone()
                .test_connection(TestConnectionRequest {
                    integration_id: zoom_id(),
                    connection_id: cid,
                })
                .await
                .unwrap()
                .into_inner()
                .status
                .unwrap()
        }
    });
    eventually("our refresh reached Zoom", || {
        zoom.state.lock().unwrap().token_arrivals == 1
    })
    .await;
    zoom.state.lock().unwrap().token_delay = Duration::ZERO;
    let other = refresh_elsewhere(&zoom, &refresh).await;
    save_pair(app.vars(), &cid, &other).await;

    let status = ours.await.unwrap();
    assert_eq!(status.code(), ConnStatus::Ok, "{}", status.message);
    let stored = snapshot(&app, &cid).await;
    let saved = value_of(&stored, "oauth_refresh_token").unwrap();
    assert!(
        zoom.refresh_token_is_live(&saved.0),
        "the pair saved is live"
    );
    assert_eq!(
        app.connection_status(&cid).await.unwrap().code(),
        ConnStatus::Ok
    );
}

#[tokio::test]
async fn server_to_server_tokens_are_cached_and_renewed_before_they_expire() {
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    let cid = server_to_server_connection(&app).await;
    for _ in 0..5 {
        let (code, message) = test_connection(&app, &cid).await;
        assert_eq!(code, ConnStatus::Ok, "{message}");
        assert_eq!(
            message,
            "Server-to-Server app works: Zoom lists 3 users in its account"
        );
    }
    assert_eq!(zoom.token_requests_of("account_credentials"), 1, "cached");

    // A token living 8 s is renewed halfway through its life (the 5 minutes do not fit).
    zoom.state.lock().unwrap().s2s_expires_in = 8;
    let fresh = server_to_server_connection(&app).await;
    assert_eq!(test_connection(&app, &fresh).await.0, ConnStatus::Ok);
    assert_eq!(test_connection(&app, &fresh).await.0, ConnStatus::Ok);
    assert_eq!(zoom.token_requests_of("account_credentials"), 2);
    tokio::time::sleep(Duration::from_millis(4500)).await;
    assert_eq!(test_connection(&app, &fresh).await.0, ConnStatus::Ok);
    assert_eq!(
        zoom.token_requests_of("account_credentials"),
        3,
        "renewed before it expired"
    );
}

#[tokio::test]
async fn test_connection_reports_zoom_reason_and_init_required() {
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    let cid = ConnectionId::generate().to_string();
    assert_eq!(
        test_connection(&app, &cid).await.0,
        ConnStatus::InitRequired
    );

    app.vars()
        .set(vars::SetRequest {
            vars: vec![
                var(&cid, "auth_type", "oauthDefault", false),
                var(&cid, "oauth_access_token", "revoked-in-zoom", true),
                var(&cid, "oauth_expiry", "2099-01-01T00:00:00Z", false),
            ],
        })
        .await
        .unwrap();
    // Zoom's reason for refusing.
    zoom.state.lock().unwrap().canned_answers.push_back((
        axum::http::StatusCode::FORBIDDEN,
        "application/json",
        r#"{"code":124,"message":"No permission to read users."}"#.into(),
    ));
    let (code, message) = test_connection(&app, &cid).await;
    assert_eq!(
        (code, message.as_str()),
        (
            ConnStatus::Error,
            "Zoom refused the request (403): No permission to read users."
        )
    );
    // A token Zoom refuses (401) and no refresh token to get another: the way out.
    let (code, message) = test_connection(&app, &cid).await;
    assert_eq!(
        (code, message.as_str()),
        (
            ConnStatus::Error,
            "no OAuth refresh token is stored: reconnect"
        )
    );
    assert!(zoom.token_requests().is_empty());
}

#[tokio::test]
async fn a_token_zoom_rejects_before_its_expiry_is_refreshed_and_the_connection_tested_again() {
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    let (cid, _) = expired_connection(&app, &zoom).await;
    assert_eq!(test_connection(&app, &cid).await.0, ConnStatus::Ok);
    // Revoked in Zoom while its stored expiry is an hour away; the refresh token still works.
    zoom.revoke_access_tokens();
    let (code, message) = test_connection(&app, &cid).await;
    assert_eq!(code, ConnStatus::Ok, "{message}");
    assert_eq!(zoom.token_requests_of("refresh_token"), 2);
    assert_eq!(
        zoom.state.lock().unwrap().api_requests.len(),
        3,
        "the first test, the one Zoom refused and the one made again"
    );
}

#[tokio::test]
async fn keep_alive_refreshes_connections_idle_for_the_configured_days_and_no_others() {
    let zoom = FakeZoom::start().await;
    let dir = tempfile::tempdir().unwrap();
    let env: Vec<(&str, String)> = zoom.env();
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    env.push(("TOKEN_KEEPALIVE_DAYS", "30"));

    let app = spawn_app_in(dir.path(), &env).await;
    let idle = ConnectionId::generate().to_string();
    let recent = ConnectionId::generate().to_string();
    let idle_refresh = zoom.issue_refresh_token(DEFAULT_CLIENT_ID);
    let recent_refresh = zoom.issue_refresh_token(DEFAULT_CLIENT_ID);
    let days_ago = |days: i64| {
        (chrono::Utc::now() - chrono::Duration::days(days))
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    };
    let mut vars = Vec::new();
    for (cid, refresh, expiry) in [
        (&idle, &idle_refresh, days_ago(31)),
        (&recent, &recent_refresh, days_ago(29)),
    ] {
        vars.extend([
            var(cid, "auth_type", "oauthDefault", false),
            var(cid, "oauth_access_token", "old-access", true),
            var(cid, "oauth_refresh_token", refresh, true),
            var(cid, "oauth_expiry", &expiry, false),
        ]);
    }
    app.vars().set(vars::SetRequest { vars }).await.unwrap();
    app.stop().await.unwrap();

    // The keep-alive task makes a pass when the service starts.
    let app = spawn_app_in(dir.path(), &env).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while zoom.refresh_token_is_live(&idle_refresh) {
        assert!(
            std::time::Instant::now() < deadline,
            "the idle connection was not refreshed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(zoom.token_requests_of("refresh_token"), 1);
    assert!(
        zoom.refresh_token_is_live(&recent_refresh),
        "a recently used one is left alone"
    );
    let stored = snapshot(&app, &idle).await;
    assert!(zoom.refresh_token_is_live(&value_of(&stored, "oauth_refresh_token").unwrap().0));
}

#[tokio::test]
async fn keep_alive_goes_past_a_connection_the_host_cannot_read() {
    let zoom = FakeZoom::start().await;
    let host = crate::fake_host::FakeHost::start().await;
    let mut cids = [
        ConnectionId::generate().to_string(),
        ConnectionId::generate().to_string(),
    ];
    // The host lists them in order: the unreadable one comes first.
    cids.sort();
    let [unreadable, idle] = cids;
    let idle_refresh = zoom.issue_refresh_token(DEFAULT_CLIENT_ID);
    let expiry = (chrono::Utc::now() - chrono::Duration::days(31))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    for cid in [&unreadable, &idle] {
        host.put(var(cid, "auth_type", "oauthDefault", false));
        host.put(var(cid, "oauth_access_token", "old-access", true));
        host.put(var(cid, "oauth_refresh_token", &idle_refresh, true));
        host.put(var(cid, "oauth_expiry", &expiry, false));
    }
    host.state
        .lock()
        .unwrap()
        .unreadable
        .push(unreadable.clone());
    let env: Vec<(&str, String)> = zoom.env();
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let url = host.url();
    env.extend([
        ("TOKEN_KEEPALIVE_DAYS", "30"),
        ("HOST_ENGINE_URL", url.as_str()),
    ]);
    let _app = spawn_app_with(&env).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while zoom.refresh_token_is_live(&idle_refresh) {
        assert!(
            std::time::Instant::now() < deadline,
            "the connection after the unreadable one was not refreshed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_stored_secret_that_no_longer_decrypts_is_reported_as_such_with_the_way_out() {
    let zoom = FakeZoom::start().await;
    let dir = tempfile::tempdir().unwrap();
    let env: Vec<(&str, String)> = zoom.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let app = spawn_app_in(dir.path(), &env).await;
    let (cid, _) = expired_connection(&app, &zoom).await;
    crate::helpers::corrupt_stored_secret(dir.path(), &cid, "oauth_refresh_token");
    let says_what_and_how = |message: &str| {
        assert!(
            message.contains("oauth_refresh_token") && message.contains("cannot be decrypted"),
            "{message}"
        );
        assert!(message.contains("set the connection up again"), "{message}");
    };

    let (code, message) = test_connection(&app, &cid).await;
    assert_eq!(code, ConnStatus::Error);
    says_what_and_how(&message);

    let status = app.connection_status(&cid).await.expect("a status");
    assert_eq!(status.code(), ConnStatus::Error);
    says_what_and_how(&status.message);

    let answer = app
        .integrations()
        .call(CallRequest {
            integration_id: zoom_id(),
            function: Some(pb::Value {
                function: Some(pb::Function {
                    name: "get_user".into(),
                    data: cid.as_bytes().to_vec(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("Call answers")
        .into_inner();
    let error = zoom_integration::values::to_json(&answer.error.unwrap().value.unwrap());
    says_what_and_how(error["message"].as_str().unwrap());

    let page = app.get(&format!("/zoom/?cid={cid}&origin=test")).await;
    assert_eq!(page.status(), 200);
    let page = page.text().await.unwrap();
    assert!(
        page.contains("cannot be decrypted") && page.contains("set the connection up again"),
        "{page}"
    );
    assert!(
        page.contains("value=\"oauthDefault\" checked"),
        "the stored choice is still shown: {page}"
    );

    let read = app
        .vars()
        .get(vars::GetRequest {
            scope_id: cid.clone(),
            names: vec![],
        })
        .await
        .expect_err("the variables cannot be read whole");
    assert_eq!(read.code(), tonic::Code::DataLoss);
    says_what_and_how(read.message());
    assert_eq!(
        zoom.token_requests_of("refresh_token"),
        0,
        "nothing is sent to Zoom"
    );
}

/// Starts a TestConnection of `cid` whose refresh Zoom answers slowly, and returns once Zoom
/// has rotated the refresh token (the answer is on its way back).
async fn refresh_in_flight(
    app: &TestApp,
    zoom: &FakeZoom,
    cid: &str,
) -> tokio::task::JoinHandle<(ConnStatus, String)> {
    zoom.state.lock().unwrap().refresh_answer_delay = Duration::from_millis(500);
    let testing = tokio::spawn({
        let mut client = app.integrations();
        let cid = cid.to_string();
        async move {
            let status = client
                .test_connection(TestConnectionRequest {
                    integration_id: zoom_id(),
                    connection_id: cid,
                })
                .await
                .expect("TestConnection answers")
                .into_inner()
                .status
                .expect("a status");
            (status.code(), status.message)
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while zoom.token_requests_of("refresh_token") == 0 {
        assert!(std::time::Instant::now() < deadline, "no refresh started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    testing
}

#[tokio::test]
async fn a_connection_deleted_while_its_token_is_refreshed_stays_deleted() {
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    let (cid, _) = expired_connection(&app, &zoom).await;
    let testing = refresh_in_flight(&app, &zoom, &cid).await;
    app.vars()
        .delete(vars::DeleteRequest {
            scope_id: cid.clone(),
            names: vec![],
        })
        .await
        .unwrap();

    let (code, message) = testing.await.unwrap();
    assert_eq!(code, ConnStatus::InitRequired, "{message}");
    assert!(
        snapshot(&app, &cid).await.is_empty(),
        "the refreshed tokens did not bring it back"
    );
    // Nor later: the new pair was dropped, not kept to be saved on the next use.
    assert_eq!(
        test_connection(&app, &cid).await.0,
        ConnStatus::InitRequired
    );
    assert!(snapshot(&app, &cid).await.is_empty());
}

#[tokio::test]
async fn a_connection_deleted_in_a_remote_host_while_its_token_is_refreshed_stays_deleted() {
    let zoom = FakeZoom::start().await;
    let host = crate::fake_host::FakeHost::start().await;
    let app = crate::connection_setup::app_with_remote_host(&zoom, &host).await;
    let cid = ConnectionId::generate().to_string();
    let refresh = zoom.issue_refresh_token(DEFAULT_CLIENT_ID);
    for (name, value, secret) in [
        ("auth_type", "oauthDefault", false),
        ("oauth_refresh_token", refresh.as_str(), true),
        ("oauth_expiry", &a_minute_ago(), false),
    ] {
        host.put(var(&cid, name, value, secret));
    }
    let testing = refresh_in_flight(&app, &zoom, &cid).await;
    host.state
        .lock()
        .unwrap()
        .vars
        .retain(|(scope, _), _| *scope != cid);

    let (code, message) = testing.await.unwrap();
    assert_eq!(code, ConnStatus::InitRequired, "{message}");
    let gone = || {
        host.state
            .lock()
            .unwrap()
            .vars
            .keys()
            .all(|(scope, _)| *scope != cid)
    };
    assert!(gone(), "the refreshed tokens did not bring it back");
    // Nor are they kept to be saved at the next use: the pair was dropped.
    assert_eq!(
        test_connection(&app, &cid).await.0,
        ConnStatus::InitRequired
    );
    assert!(gone(), "the next use did not bring it back either");
}

#[tokio::test]
async fn a_refresh_answered_as_plain_text_without_a_token_type_still_saves_the_rotated_token() {
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    let (cid, old_refresh) = expired_connection(&app, &zoom).await;
    zoom.state.lock().unwrap().token_answers_as_text = true;

    let (code, message) = test_connection(&app, &cid).await;
    assert_eq!(code, ConnStatus::Ok, "{message}");
    assert!(!zoom.refresh_token_is_live(&old_refresh), "Zoom rotated it");
    let stored = live_stored_refresh_token(&app, &zoom, &cid).await;
    assert_ne!(stored, old_refresh);
    let stored = snapshot(&app, &cid).await;
    assert_eq!(value_of(&stored, "oauth_token_type").unwrap().0, "bearer");
}

#[tokio::test]
async fn app_deauthorized_while_a_refresh_is_in_flight_leaves_no_tokens_behind() {
    use crate::webhooks::{ACCOUNT, SECRET, app_deauthorized_now, post_until_recorded};
    let zoom = FakeZoom::start().await;
    let mut env = zoom.env();
    env.push(("ZOOM_SECRET_TOKEN", SECRET.into()));
    let app = app_with(&zoom, env).await;
    let cid = crate::calls::connected(&app, &zoom).await;
    app.vars()
        .set(vars::SetRequest {
            vars: vec![var(&cid, "account_id", ACCOUNT, false)],
        })
        .await
        .unwrap();
    // Zoom rotates at once and its answer takes a second to come back; the app is removed
    // meanwhile.
    zoom.state.lock().unwrap().refresh_answer_delay = Duration::from_secs(1);
    let testing = tokio::spawn({
        let mut client = app.integrations();
        let cid = cid.clone();
        async move {
            client
                .test_connection(TestConnectionRequest {
                    integration_id: zoom_id(),
                    connection_id: cid,
                })
                .await
        }
    });
    eventually("the refresh reached Zoom", || {
        zoom.token_requests_of("refresh_token") == 1
    })
    .await;
    post_until_recorded(
        &app.http_client,
        &app.url("/zoom/event"),
        SECRET,
        &app_deauthorized_now(),
    )
    .await;
    testing.await.unwrap().unwrap();
    // Once the event is handled, whatever order the two took: no tokens, marked broken.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let stored = snapshot(&app, &cid).await;
        if value_of(&stored, "connection_error").is_some() {
            assert_eq!(value_of(&stored, "oauth_refresh_token"), None, "{stored:?}");
            assert_eq!(value_of(&stored, "oauth_access_token"), None, "{stored:?}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not deauthorized: {stored:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // And they stay gone.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stored = snapshot(&app, &cid).await;
    assert_eq!(value_of(&stored, "oauth_refresh_token"), None, "{stored:?}");
}

/// A default-app connection in the remote `host` whose access token expired a minute ago
/// (recently used: the keep-alive task leaves it alone); returns its id and its (live) refresh
/// token.
fn expired_remote_connection(
    host: &crate::fake_host::FakeHost,
    zoom: &FakeZoom,
) -> (String, String) {
    let cid = ConnectionId::generate().to_string();
    let refresh = zoom.issue_refresh_token(DEFAULT_CLIENT_ID);
    let expiry = (chrono::Utc::now() - chrono::Duration::minutes(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    for (name, value, secret) in [
        ("auth_type", "oauthDefault", false),
        ("oauth_access_token", "access-expired", true),
        ("oauth_refresh_token", refresh.as_str(), true),
        ("oauth_expiry", expiry.as_str(), false),
    ] {
        host.put(var(&cid, name, value, secret));
    }
    (cid, refresh)
}

/// The value of `cid`'s variable `name` in the remote `host`.
fn held_by(host: &crate::fake_host::FakeHost, cid: &str, name: &str) -> Option<String> {
    let state = host.state.lock().unwrap();
    state
        .vars
        .get(&(cid.to_string(), name.to_string()))
        .map(|v| v.value.clone())
}

/// Refreshes `cid` through TestConnection while the remote `host` cannot write: Zoom rotates
/// the refresh token, the new pair is not saved, and the call fails.
async fn refresh_the_host_cannot_save(
    app: &TestApp,
    host: &crate::fake_host::FakeHost,
    zoom: &FakeZoom,
    cid: &str,
    old_refresh: &str,
) {
    host.state.lock().unwrap().refuse_sets = true;
    let failed = app
        .integrations()
        .test_connection(TestConnectionRequest {
            integration_id: zoom_id(),
            connection_id: cid.into(),
        })
        .await
        .expect_err("the new pair could not be saved");
    assert_eq!(failed.code(), tonic::Code::Unavailable, "{failed:?}");
    assert!(!zoom.refresh_token_is_live(old_refresh), "Zoom rotated it");
    assert_eq!(
        held_by(host, cid, "oauth_refresh_token").as_deref(),
        Some(old_refresh)
    );
    host.state.lock().unwrap().refuse_sets = false;
}

#[tokio::test]
async fn refreshed_tokens_the_host_could_not_save_are_saved_in_the_background_without_another_call()
{
    let zoom = FakeZoom::start().await;
    let host = crate::fake_host::FakeHost::start().await;
    let app = crate::connection_setup::app_with_remote_host(&zoom, &host).await;
    let (cid, old_refresh) = expired_remote_connection(&host, &zoom);
    refresh_the_host_cannot_save(&app, &host, &zoom, &cid, &old_refresh).await;

    // Nobody uses the connection again; the host takes writes again.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let held = held_by(&host, &cid, "oauth_refresh_token").unwrap();
        if zoom.refresh_token_is_live(&held) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the rotated refresh token was not saved"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, message) = test_connection(&app, &cid).await;
    assert_eq!(code, ConnStatus::Ok, "{message}");
    assert_eq!(zoom.token_requests_of("refresh_token"), 1);
}

#[tokio::test]
async fn refreshed_tokens_saved_late_do_not_overwrite_a_refresh_token_stored_meanwhile() {
    let zoom = FakeZoom::start().await;
    let host = crate::fake_host::FakeHost::start().await;
    let app = crate::connection_setup::app_with_remote_host(&zoom, &host).await;
    let (cid, old_refresh) = expired_remote_connection(&host, &zoom);
    host.state.lock().unwrap().refuse_sets = true;
    refresh_the_host_cannot_save(&app, &host, &zoom, &cid, &old_refresh).await;
    // Meanwhile the owner connected again through another process, which saved its pair
    // (not through Set, which the host refused until now).
    let theirs = refresh_elsewhere(&zoom, &zoom.issue_refresh_token(DEFAULT_CLIENT_ID)).await;
    let their_refresh = theirs["refresh_token"].as_str().unwrap().to_string();
    for (name, value) in [
        (
            "oauth_access_token",
            theirs["access_token"].as_str().unwrap(),
        ),
        ("oauth_refresh_token", their_refresh.as_str()),
        ("oauth_expiry", "2099-01-01T00:00:00Z"),
    ] {
        host.put(var(&cid, name, value, name != "oauth_expiry"));
    }

    // The background retry and the next call both find another refresh token stored.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (code, message) = test_connection(&app, &cid).await;
    assert_eq!(code, ConnStatus::Ok, "{message}");
    assert_eq!(
        held_by(&host, &cid, "oauth_refresh_token").as_deref(),
        Some(their_refresh.as_str()),
        "the new setup's refresh token stays"
    );
    assert_eq!(
        zoom.token_requests_of("refresh_token"),
        2,
        "ours and theirs; none since"
    );
}

/// A minute ago, as `oauth_expiry` takes it: expired, but recently used (the keep-alive task
/// leaves it alone, however late its pass at start runs).
pub(crate) fn a_minute_ago() -> String {
    (chrono::Utc::now() - chrono::Duration::minutes(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[tokio::test]
async fn an_app_whose_secret_zoom_refuses_is_reported_in_its_status_and_not_asked_again_on_every_call()
 {
    use crate::calls::{call, err};
    let zoom = FakeZoom::start().await;
    let dir = tempfile::tempdir().unwrap();
    let env = zoom.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let app = spawn_app_in(dir.path(), &env).await;
    let refused =
        "Zoom refused the private app's client id or secret: update them and connect again";
    // A private OAuth app and a Server-to-Server app whose secrets were changed in Zoom.
    let (private, s2s) = (
        ConnectionId::generate().to_string(),
        ConnectionId::generate().to_string(),
    );
    let refresh = zoom.issue_refresh_token(PRIVATE_CLIENT_ID);
    let old_secret = "a-secret-zoom-no-longer-takes";
    app.vars()
        .set(vars::SetRequest {
            vars: vec![
                var(&private, "auth_type", "oauthPrivate", false),
                var(&private, "private_client_id", PRIVATE_CLIENT_ID, false),
                var(&private, "private_client_secret", old_secret, true),
                var(&private, "oauth_refresh_token", &refresh, true),
                var(&private, "oauth_expiry", &a_minute_ago(), false),
                var(&s2s, "auth_type", "serverToServer", false),
                var(&s2s, "private_account_id", S2S_ACCOUNT_ID, false),
                var(&s2s, "private_client_id", S2S_CLIENT_ID, false),
                var(&s2s, "private_client_secret", old_secret, true),
            ],
        })
        .await
        .unwrap();
    for cid in [&private, &s2s] {
        let (code, message) = test_connection(&app, cid).await;
        assert_eq!((code, message.as_str()), (ConnStatus::Error, refused));
        for _ in 0..3 {
            let error = err(call(&app, cid, "get_user", vec![], vec![]).await);
            assert!(
                error["message"].as_str().unwrap().contains(refused),
                "{error}"
            );
        }
        let status = app.connection_status(cid).await.unwrap();
        assert_eq!(
            (status.code(), status.message.as_str()),
            (ConnStatus::Error, refused)
        );
    }
    assert_eq!(
        zoom.token_requests_of("refresh_token"),
        1,
        "asked once, then not again during the back-off"
    );
    assert_eq!(zoom.token_requests_of("account_credentials"), 1);
    // The grant is not dead: its refresh token is kept, the connection not marked broken.
    let stored = snapshot(&app, &private).await;
    assert_eq!(value_of(&stored, "oauth_refresh_token").unwrap().0, refresh);
    assert_eq!(value_of(&stored, "connection_error"), None);

    // The owner corrects the Server-to-Server app's secret: a token is asked for at once.
    let correct = |cid: &str, secret: &str| vars::SetRequest {
        vars: vec![var(cid, "private_client_secret", secret, true)],
    };
    app.vars()
        .set(correct(&s2s, S2S_CLIENT_SECRET))
        .await
        .unwrap();
    let (code, message) = test_connection(&app, &s2s).await;
    assert_eq!(code, ConnStatus::Ok, "{message}");
    let status = app.connection_status(&s2s).await.unwrap();
    assert_eq!(status.code(), ConnStatus::Ok, "{}", status.message);

    // After a restart the private app's status still says what is wrong, until it is corrected.
    app.stop().await.unwrap();
    let app = spawn_app_in(dir.path(), &env).await;
    let status = app.connection_status(&private).await.unwrap();
    assert_eq!(
        (status.code(), status.message.as_str()),
        (ConnStatus::Error, refused)
    );
    app.vars()
        .set(correct(&private, PRIVATE_CLIENT_SECRET))
        .await
        .unwrap();
    let (code, message) = test_connection(&app, &private).await;
    assert_eq!(code, ConnStatus::Ok, "{message}");
    let status = app.connection_status(&private).await.unwrap();
    assert_eq!(status.code(), ConnStatus::Ok, "{}", status.message);
}

#[tokio::test]
async fn a_rate_limited_token_endpoint_is_not_asked_again_until_its_back_off_ends() {
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    let cid = server_to_server_connection(&app).await;
    zoom.state.lock().unwrap().token_rate_limited = true;
    for _ in 0..5 {
        let (code, message) = test_connection(&app, &cid).await;
        assert_eq!(code, ConnStatus::Error);
        assert!(message.contains("(429)"), "{message}");
    }
    assert_eq!(zoom.token_requests_of("account_credentials"), 1);
}

/// Sets `cid`'s stored `oauth_expiry` to `from_now` from now, and waits for the embedded host's
/// announcement to reach the token cache.
async fn expiring_in(app: &TestApp, cid: &str, from_now: chrono::Duration) {
    let expiry = (chrono::Utc::now() + from_now).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    app.vars()
        .set(vars::SetRequest {
            vars: vec![var(cid, "oauth_expiry", &expiry, false)],
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn while_the_token_endpoint_is_down_a_token_with_minutes_left_is_still_used() {
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    let (cid, refresh) = expired_connection(&app, &zoom).await;
    // A pair Zoom issued earlier, with two minutes left: within the margin a token is
    // refreshed before. Zoom's OAuth server is down, its API is not.
    let pair = refresh_elsewhere(&zoom, &refresh).await;
    save_pair(app.vars(), &cid, &pair).await;
    expiring_in(&app, &cid, chrono::Duration::minutes(2)).await;
    zoom.state.lock().unwrap().token_unavailable = true;
    let (code, message) = test_connection(&app, &cid).await;
    assert_eq!(code, ConnStatus::Ok, "{message}");
    assert_eq!(
        zoom.token_requests_of("refresh_token"),
        2,
        "theirs, and ours, which failed"
    );
    // A token that has expired is not handed out.
    expiring_in(&app, &cid, chrono::Duration::minutes(-1)).await;
    let (code, message) = test_connection(&app, &cid).await;
    assert_eq!(code, ConnStatus::Error);
    assert!(message.contains("Zoom is unavailable"), "{message}");
}

/// A Server-to-Server connection with the fake Zoom's app.
async fn server_to_server_connection(app: &TestApp) -> String {
    let cid = ConnectionId::generate().to_string();
    app.vars()
        .set(vars::SetRequest {
            vars: vec![
                var(&cid, "auth_type", "serverToServer", false),
                var(&cid, "private_account_id", S2S_ACCOUNT_ID, false),
                var(&cid, "private_client_id", S2S_CLIENT_ID, false),
                var(&cid, "private_client_secret", S2S_CLIENT_SECRET, true),
            ],
        })
        .await
        .unwrap();
    cid
}

#[tokio::test]
async fn tokens_living_less_than_the_refresh_margin_are_not_requested_again_on_every_call() {
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    // OAuth tokens said to live two minutes: refreshed a minute before they expire.
    zoom.state.lock().unwrap().oauth_expires_in = 120;
    let (cid, _) = expired_connection(&app, &zoom).await;
    for _ in 0..5 {
        let (code, message) = test_connection(&app, &cid).await;
        assert_eq!(code, ConnStatus::Ok, "{message}");
    }
    assert_eq!(zoom.token_requests_of("refresh_token"), 1);
    // Server-to-Server tokens said to live a minute, no time at all, or less: within seconds of
    // one, no other is requested.
    for expires_in in [60, 0, -5] {
        zoom.state.lock().unwrap().s2s_expires_in = expires_in;
        let cid = server_to_server_connection(&app).await;
        for _ in 0..5 {
            let (code, message) = test_connection(&app, &cid).await;
            assert_eq!(code, ConnStatus::Ok, "{expires_in}: {message}");
        }
    }
    assert_eq!(
        zoom.token_requests_of("account_credentials"),
        3,
        "one for each connection"
    );
}

#[tokio::test]
async fn a_connection_of_another_default_app_than_the_configured_one_is_refused_and_kept_for_it() {
    let zoom = FakeZoom::start().await;
    let dir = tempfile::tempdir().unwrap();
    let first = zoom.env();
    let first: Vec<(&str, &str)> = first.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let app = spawn_app_in(dir.path(), &first).await;
    zoom.register_redirect_uri(app.url("/oauth/redirect/zoom"));
    let cid = ConnectionId::generate().to_string();
    let agent = crate::user_agent::UserAgent::new(&app.url(""));
    let consent = agent
        .get(&app.url(&format!("/oauth/start/zoom?cid={cid}")))
        .await;
    let done = agent.get(consent.link("allow").as_str()).await;
    assert_eq!(done.status, 200, "{}", done.body);
    let stored = snapshot(&app, &cid).await;
    assert_eq!(
        value_of(&stored, "oauth_client_id"),
        Some((DEFAULT_CLIENT_ID.to_string(), false)),
        "the app that issued the tokens"
    );
    let refresh = value_of(&stored, "oauth_refresh_token").unwrap().0;
    // Its access token has expired.
    app.vars()
        .set(vars::SetRequest {
            vars: vec![var(&cid, "oauth_expiry", &a_minute_ago(), false)],
        })
        .await
        .unwrap();
    app.stop().await.unwrap();

    // The operator configures another default app.
    let mut second = first.clone();
    second.retain(|(k, _)| !k.starts_with("ZOOM_CLIENT_"));
    second.extend([
        ("ZOOM_CLIENT_ID", "anotherClientId"),
        ("ZOOM_CLIENT_SECRET", "another-client-secret"),
    ]);
    let app = spawn_app_in(dir.path(), &second).await;
    // Its status says so before anything is tried, and so does a test.
    let status = app.connection_status(&cid).await.unwrap();
    assert_eq!(status.code(), ConnStatus::Error);
    assert!(
        status.message.contains(DEFAULT_CLIENT_ID),
        "{}",
        status.message
    );
    let (code, message) = test_connection(&app, &cid).await;
    assert_eq!(code, ConnStatus::Error);
    assert!(
        message.contains(DEFAULT_CLIENT_ID) && message.contains("ZOOM_CLIENT_ID"),
        "{message}"
    );
    assert_eq!(
        zoom.token_requests_of("refresh_token"),
        0,
        "Zoom is not asked"
    );
    let stored = snapshot(&app, &cid).await;
    assert_eq!(value_of(&stored, "connection_error"), None);
    assert_eq!(value_of(&stored, "oauth_refresh_token").unwrap().0, refresh);
    app.stop().await.unwrap();

    // Back with the app that issued them, the connection works as before.
    let app = spawn_app_in(dir.path(), &first).await;
    let (code, message) = test_connection(&app, &cid).await;
    assert_eq!(code, ConnStatus::Ok, "{message}");
    assert_eq!(
        app.connection_status(&cid).await.unwrap().code(),
        ConnStatus::Ok
    );
}

#[tokio::test]
async fn a_default_app_connection_set_up_before_its_issuer_was_recorded_learns_it_on_refresh() {
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    let (cid, _) = expired_connection(&app, &zoom).await;
    assert_eq!(
        value_of(&snapshot(&app, &cid).await, "oauth_client_id"),
        None
    );
    let (code, message) = test_connection(&app, &cid).await;
    assert_eq!(code, ConnStatus::Ok, "{message}");
    assert_eq!(
        value_of(&snapshot(&app, &cid).await, "oauth_client_id"),
        Some((DEFAULT_CLIENT_ID.to_string(), false))
    );
}

#[tokio::test]
async fn a_refusal_of_an_app_replaced_meanwhile_is_not_recorded_on_the_new_one() {
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    let cid = ConnectionId::generate().to_string();
    app.vars()
        .set(vars::SetRequest {
            vars: vec![
                var(&cid, "auth_type", "serverToServer", false),
                var(&cid, "private_account_id", S2S_ACCOUNT_ID, false),
                var(&cid, "private_client_id", S2S_CLIENT_ID, false),
                var(&cid, "private_client_secret", "a-secret-zoom-refuses", true),
            ],
        })
        .await
        .unwrap();
    // Zoom takes its time to refuse the old secret; meanwhile the owner saves the right one
    // (as another process of the same host engine would).
    zoom.state.lock().unwrap().token_delay = Duration::from_millis(800);
    let refused = tokio::spawn({
        let app_grpc = app.integrations();
        let cid = cid.clone();
        async move {
            let mut client = app_grpc;
            client
                .test_connection(TestConnectionRequest {
                    integration_id: zoom_id(),
                    connection_id: cid,
                })
                .await
        }
    });
    eventually("the old secret's token request reached Zoom", || {
        zoom.state.lock().unwrap().token_arrivals == 1
    })
    .await;
    app.vars()
        .set(vars::SetRequest {
            vars: vec![var(&cid, "private_client_secret", S2S_CLIENT_SECRET, true)],
        })
        .await
        .unwrap();
    let refused = refused.await.unwrap().unwrap().into_inner().status.unwrap();
    assert_eq!(refused.code(), ConnStatus::Error, "{}", refused.message);
    let stored = snapshot(&app, &cid).await;
    assert_eq!(value_of(&stored, "token_error"), None, "{stored:?}");
    zoom.state.lock().unwrap().token_delay = Duration::ZERO;
    let (code, message) = test_connection(&app, &cid).await;
    assert_eq!(code, ConnStatus::Ok, "{message}");
}
