//! Connections a remote host does not list as active. AutoKitteh's FindActiveConnectionIDs
//! names only org-level connections and those of projects with an active deployment, so a
//! connection set up before its project is deployed is not listed; the fake host does the same
//! with `active`. The service must still route its webhooks (Zoom validates the endpoint
//! before anyone deploys), apply its `app_deauthorized`, and keep its tokens alive, after
//! routing's periodic reload and after a restart, until the host shows it deleted.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use zoom_integration::ids::ConnectionId;

use crate::connection_setup::{consent, submit};
use crate::fake_host::FakeHost;
use crate::fake_zoom::*;
use crate::helpers::{TestApp, spawn_app_configured, var};
use crate::user_agent::UserAgent;
use crate::webhooks::{fixture, now, post_to};

/// How often routing reloads in these tests (60 s in production).
const RELOAD: Duration = Duration::from_millis(200);

/// The service on `data_dir`, with `host` as its remote host (listing no connection as
/// active) and `zoom` as Zoom, reloading routing every [`RELOAD`]; ready.
async fn app_on(
    data_dir: &Path,
    zoom: &FakeZoom,
    host: &FakeHost,
    extra: &[(&str, &str)],
) -> TestApp {
    host.state
        .lock()
        .unwrap()
        .active
        .get_or_insert_with(Vec::new);
    let mut env: Vec<(&str, String)> = zoom.env();
    env.push(("HOST_ENGINE_URL", host.url()));
    env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let app = spawn_app_configured(data_dir, &env, |config| config.routing_reload = RELOAD).await;
    zoom.register_redirect_uri(app.url("/oauth/redirect/zoom"));
    app.ready().await;
    app
}

/// Sets a connection up through the service with a Server-to-Server app whose webhooks
/// `secret_token` signs; returns its id.
async fn set_up_server_to_server(app: &TestApp, secret_token: &str) -> String {
    let cid = ConnectionId::generate().to_string();
    let agent = UserAgent::new(&app.url(""));
    crate::connection_setup::set_up_server_to_server(app, &agent, &cid, secret_token).await;
    cid
}

/// Sets a connection up through the service with the default OAuth app, or (with
/// `secret_token`) a private OAuth app; returns its id.
async fn set_up_oauth(app: &TestApp, secret_token: Option<&str>) -> String {
    let cid = ConnectionId::generate().to_string();
    let agent = UserAgent::new(&app.url(""));
    let mut form = vec![("cid", cid.as_str()), ("origin", "test")];
    match secret_token {
        None => form.push(("auth_type", "oauthDefault")),
        Some(token) => form.extend([
            ("auth_type", "oauthPrivate"),
            ("client_id", PRIVATE_CLIENT_ID),
            ("client_secret", PRIVATE_CLIENT_SECRET),
            ("secret_token", token),
        ]),
    }
    let consent_page = submit(app, &agent, &form).await;
    let done = consent(&agent, &consent_page, true).await;
    assert_eq!(done.status, 200, "{}", done.body);
    cid
}

/// Waits until routing has made a whole full reload that started after this call: until it
/// has listed the connections twice more (reloads run one after the other, so the first of
/// those has ended when the second starts).
async fn reloaded(host: &FakeHost) {
    let listings = || {
        let state = host.state.lock().unwrap();
        state
            .find_requests
            .iter()
            .filter(|r| r.value.is_empty())
            .count()
    };
    let target = listings() + 2;
    let deadline = Instant::now() + Duration::from_secs(30);
    while listings() < target {
        assert!(Instant::now() < deadline, "routing did not reload");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Zoom's URL validation signed with `secret`: the status, and whether the answer is the
/// token encrypted with it.
async fn url_validation(app: &TestApp, secret: &str) -> (u16, bool) {
    let (status, answer) = post_to(
        &app.http_client,
        &app.url("/zoom/event"),
        secret,
        now(),
        &fixture("endpoint.url_validation"),
    )
    .await;
    (status, answer["encryptedToken"].is_string())
}

/// Whether the fake host still holds any variable of `cid` named `name`.
fn stored(host: &FakeHost, cid: &str, name: &str) -> bool {
    let state = host.state.lock().unwrap();
    state
        .vars
        .contains_key(&(cid.to_string(), name.to_string()))
}

/// Posts a `event` webhook of the Server-to-Server app's account, signed with its secret, and
/// checks it was recorded.
async fn record_s2s_event(app: &TestApp, event: &str, id: &str) {
    let body = json!({"event": event,
                      "payload": {"account_id": S2S_ACCOUNT_ID, "object": {"id": id}}});
    let (status, answer) = post_to(
        &app.http_client,
        &app.url("/zoom/event"),
        "s2s-webhook-secret",
        now(),
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!((status, answer["status"].as_str()), (200, Some("recorded")));
}

#[tokio::test]
async fn a_connection_the_host_does_not_list_as_active_keeps_its_webhooks_after_a_reload() {
    let (zoom, host) = (FakeZoom::start().await, FakeHost::start().await);
    let dir = tempfile::tempdir().unwrap();
    let app = app_on(dir.path(), &zoom, &host, &[]).await;
    let s2s = set_up_server_to_server(&app, "s2s-webhook-secret").await;
    let oauth = set_up_oauth(&app, Some("oauth-webhook-secret")).await;
    // Routed at once, by the setup's own reload.
    assert_eq!(
        url_validation(&app, "s2s-webhook-secret").await,
        (200, true)
    );

    reloaded(&host).await;
    // Zoom validates the endpoint before it enables a subscription: usually before the
    // project is deployed.
    for secret in ["s2s-webhook-secret", "oauth-webhook-secret"] {
        assert_eq!(url_validation(&app, secret).await, (200, true), "{secret}");
    }
    record_s2s_event(&app, "meeting.started", "1").await;
    let sent = host.wait_for_dispatched(1, Duration::from_secs(30)).await;
    assert_eq!(sent[0].destination_id, s2s);

    // The app removed in Zoom: its tokens are deleted, not left to a webhook "unrouted".
    assert!(stored(&host, &oauth, "oauth_refresh_token"));
    let body = json!({"event": "app_deauthorized",
                      "payload": {"account_id": USER_ACCOUNT_ID, "user_id": USER_ID,
                                  "client_id": PRIVATE_CLIENT_ID,
                                  "event_ts": now() * 1000}});
    let (status, answer) = post_to(
        &app.http_client,
        &app.url("/zoom/event"),
        "oauth-webhook-secret",
        now(),
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!((status, answer["status"].as_str()), (200, Some("recorded")));
    host.wait_for_dispatched(2, Duration::from_secs(30)).await;
    assert!(
        !stored(&host, &oauth, "oauth_refresh_token"),
        "tokens deleted"
    );
    assert!(stored(&host, &oauth, "connection_error"));
}

#[tokio::test]
async fn a_connection_the_host_does_not_list_as_active_keeps_its_webhooks_after_a_restart_of_the_service()
 {
    let (zoom, host) = (FakeZoom::start().await, FakeHost::start().await);
    let dir = tempfile::tempdir().unwrap();
    let app = app_on(dir.path(), &zoom, &host, &[]).await;
    let cid = set_up_server_to_server(&app, "s2s-webhook-secret").await;
    app.stop().await.unwrap();

    let app = app_on(dir.path(), &zoom, &host, &[]).await;
    assert_eq!(
        url_validation(&app, "s2s-webhook-secret").await,
        (200, true)
    );
    reloaded(&host).await;
    assert_eq!(
        url_validation(&app, "s2s-webhook-secret").await,
        (200, true)
    );
    record_s2s_event(&app, "meeting.ended", "2").await;
    let sent = host.wait_for_dispatched(1, Duration::from_secs(30)).await;
    assert_eq!(sent[0].destination_id, cid);
}

#[tokio::test]
async fn an_idle_connection_the_host_does_not_list_as_active_is_kept_alive_after_a_restart() {
    let (zoom, host) = (FakeZoom::start().await, FakeHost::start().await);
    let dir = tempfile::tempdir().unwrap();
    let keepalive = [("TOKEN_KEEPALIVE_DAYS", "30")];
    let app = app_on(dir.path(), &zoom, &host, &keepalive).await;
    let cid = set_up_oauth(&app, None).await;
    app.stop().await.unwrap();
    // Its refresh token last used 40 days ago.
    let long_ago = (chrono::Utc::now() - chrono::Duration::days(40))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    host.put(var(&cid, "oauth_expiry", &long_ago, false));
    let refreshes = zoom.token_requests_of("refresh_token");

    // The keep-alive task makes a pass when the service starts.
    let _app = app_on(dir.path(), &zoom, &host, &keepalive).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while zoom.token_requests_of("refresh_token") == refreshes {
        assert!(
            Instant::now() < deadline,
            "the idle connection was not refreshed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(zoom.token_requests_of("refresh_token"), refreshes + 1);
}

#[tokio::test]
async fn a_deleted_connection_loses_its_route_at_the_next_reload_and_is_forgotten() {
    let (zoom, host) = (FakeZoom::start().await, FakeHost::start().await);
    let dir = tempfile::tempdir().unwrap();
    let app = app_on(dir.path(), &zoom, &host, &[]).await;
    let emptied = set_up_server_to_server(&app, "emptied-secret").await;
    let unknown = set_up_server_to_server(&app, "unknown-secret").await;
    let kept = set_up_server_to_server(&app, "kept-secret").await;
    // Deleted in the host: one's variables are gone (Get answers none), the other the host
    // no longer knows at all (Get answers NOT_FOUND).
    {
        let mut state = host.state.lock().unwrap();
        state
            .vars
            .retain(|(scope, _), _| *scope != emptied && *scope != unknown);
        state.unknown.push(unknown.clone());
    }
    reloaded(&host).await;
    assert_eq!(url_validation(&app, "emptied-secret").await.0, 401);
    assert_eq!(url_validation(&app, "unknown-secret").await.0, 401);
    assert_eq!(url_validation(&app, "kept-secret").await, (200, true));
    app.stop().await.unwrap();

    // Forgotten: a restart does not read them again.
    host.state.lock().unwrap().get_scopes.clear();
    let app = app_on(dir.path(), &zoom, &host, &[]).await;
    reloaded(&host).await;
    let read = host.state.lock().unwrap().get_scopes.clone();
    assert!(read.contains(&kept), "{read:?}");
    assert!(
        !read.contains(&emptied) && !read.contains(&unknown),
        "{read:?}"
    );
    assert_eq!(url_validation(&app, "kept-secret").await, (200, true));
}
